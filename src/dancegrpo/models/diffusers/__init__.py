"""Adapters that make diffusers pipelines ``GenerativeModel``s: ``flux`` (FLUX.1), ``sd3``
(Stable Diffusion 3 / 3.5), ``sd`` (Stable Diffusion 1.x / 2.x), ``qwen_image`` (Qwen-Image), and
the video models ``wan`` / ``wan_i2v`` (Wan 2.1 / 2.2), ``hunyuanvideo`` and ``skyreels_i2v``.

Each loads only what training needs (denoiser, text encoders, VAE) from a pipeline folder given
as ``model.kwargs.path``; see docs/models.md and docs/models_video.md. Importing this package imports nothing from
diffusers: the registry imports a family's module when that model is built.
"""

__all__: list[str] = []
