"""Adapters that make diffusers pipelines ``GenerativeModel``s: ``flux`` (FLUX.1), ``sd3``
(Stable Diffusion 3 / 3.5), ``sd`` (Stable Diffusion 1.x / 2.x) and ``qwen_image`` (Qwen-Image).

Each loads only what training needs (denoiser, text encoders, VAE) from a pipeline folder given
as ``model.kwargs.path``; see docs/models.md. Importing this package imports nothing from
diffusers: the registry imports a family's module when that model is built.
"""

__all__: list[str] = []
