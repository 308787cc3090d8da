"""Backends and dispatch for the GRPO ops (see dispatch.py); users call dancegrpo.functional."""

from .dispatch import PRIORITY, Backend, availability, backend_names, get_backend, select_backend

__all__ = ["PRIORITY", "Backend", "availability", "backend_names", "get_backend", "select_backend"]
