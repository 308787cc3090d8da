"""The reward service: any registered reward behind HTTP, in its own process.

    dancegrpo serve-reward NAME [--host 127.0.0.1] [--port 8765] [--device D] [key=value ...]

* ``GET /health`` -> ``{"reward": name, "device": ..., "version": ...}``.
* ``POST /score`` -> a batch in :mod:`dancegrpo.rewards.wire`'s format (raw uint8 or float32
  samples and their prompts) in, float32 scores out; a sample the reward fails on scores NaN
  and the errors come back in the answer's header (the batch is retried sample by sample, as
  in the trainer's scoring). A malformed request is answered 400 with the reason.

Scoring runs one batch at a time (a lock), off the event loop, so ``/health`` answers while a
batch is scored. Needs ``pip install 'dancegrpo[serve]'`` (starlette and uvicorn).
"""

from __future__ import annotations

import logging
import threading

import torch

from ..errors import MissingDependencyError, UsageError
from .wire import CONTENT_TYPE, WireError, decode_samples, encode_scores

__all__ = ["build_app", "serve"]

log = logging.getLogger("dancegrpo.rewards.server")


def _starlette():
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(f"serve-reward needs starlette and uvicorn ({exc}); "
                                     "install them with: pip install 'dancegrpo[serve]'") from None


class _Scorer:
    """The reward and the device it scores on; one batch at a time."""

    def __init__(self, reward, name: str, device: torch.device):
        from ..trainer.scoring import WeightedReward

        self.entry = [WeightedReward(reward, 1.0, name)]
        self.name, self.device = name, device
        self.lock = threading.Lock()

    def __call__(self, body: bytes) -> bytes:
        from ..trainer.scoring import score_samples

        samples, prompts = decode_samples(body)
        with self.lock, torch.inference_mode():
            result = score_samples(self.entry, samples.to(self.device), prompts)
        return encode_scores(result.rewards[:, 0], self.name, result.errors)


def build_app(reward, name: str, device="cpu"):
    """The ASGI app serving ``reward`` (a built reward object) under ``name``."""
    _starlette()
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    from .. import __version__

    scorer = _Scorer(reward, name, torch.device(device))

    async def health(request):
        return JSONResponse({"reward": name, "device": str(scorer.device), "version": __version__})

    async def score(request):
        body = await request.body()
        try:
            answer = await run_in_threadpool(scorer, body)
        except WireError as exc:
            return PlainTextResponse(f"bad request: {exc}", status_code=400)
        return Response(answer, media_type=CONTENT_TYPE)

    return Starlette(routes=[Route("/health", health, methods=["GET"]), Route("/score", score, methods=["POST"])])


def _check_address(host: str, port: int) -> None:
    """A port in use or a host this machine does not have: one line, before the server starts."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            s.bind(infos[0][4])
    except OSError as exc:
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None


def serve(name: str, *, host: str = "127.0.0.1", port: int = 8765, device: str = "cpu", kwargs=None) -> None:
    """Build reward ``name`` with ``kwargs`` on ``device`` and serve it until interrupted."""
    _starlette()
    import uvicorn

    from ..trainer.policy import build_named, resolve_device

    try:
        torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r}: expected cpu, cuda, cuda:N or mps") from None
    dev = resolve_device(device)
    _check_address(host, port)  # before a reward model takes minutes to load
    reward = build_named("reward", name, "NAME", **(kwargs or {}))
    if isinstance(reward, torch.nn.Module):
        reward = reward.to(dev).eval()
    app = build_app(reward, name, dev)
    log.info("serving reward %r on %s at http://%s:%d", name, dev, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
