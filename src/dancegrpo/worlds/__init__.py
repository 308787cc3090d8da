"""Embedded worlds: procedural data, prompts and weight-free rewards that need no downloads.

``dancegrpo.worlds.shapes`` is the default: coloured shapes on flat backgrounds, as images
(text-to-image) and videos (text-to-video, image-to-video). Import it explicitly; nothing
here is loaded by ``import dancegrpo``.
"""

__all__ = ["shapes"]
