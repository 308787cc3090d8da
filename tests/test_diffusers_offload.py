"""offload_vae: the VAE goes back to the CPU after each decode and first-frame encode.

This machine has no accelerator, so the move itself is a no-op here: the test records the
``.to("cpu")`` calls the adapter makes on its VAE instead.
"""

import pytest
import torch
from diffusers_fixtures import MODEL, WAN_MODEL, tiny_pipeline, wan_images

from dancegrpo.errors import ConfigError
from dancegrpo.registry import build_model


def _spy_vae(model):
    calls = []
    vae = model.frozen.vae
    real = vae.to

    def to(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("device"))
        return real(*args, **kwargs)

    vae.to = to
    return calls


@pytest.mark.parametrize("offload", [True, False])
def test_decode_releases_the_vae(tmp_path_factory, offload):
    name, kwargs = MODEL["flux"]
    model = build_model(name, path=str(tiny_pipeline("flux", tmp_path_factory)), offload_vae=offload, **kwargs)
    calls = _spy_vae(model)
    pixels = model.decode(torch.randn(2, *model.latent_shape()))
    assert pixels.shape[0] == 2
    assert calls == (["cpu"] if offload else [])


def test_first_frame_encode_releases_the_vae(tmp_path_factory):
    name, kwargs = WAN_MODEL["wan_i2v"]
    model = build_model(name, path=str(tiny_pipeline("wan_i2v", tmp_path_factory)), offload_vae=True, **kwargs)
    calls = _spy_vae(model)
    cond = model.encode_prompts(["a red ball rolls"], wan_images(1))
    assert "condition" in cond and calls == ["cpu"]


def test_offload_vae_must_be_a_bool(tmp_path_factory):
    name, kwargs = MODEL["flux"]
    with pytest.raises(ConfigError, match="model.kwargs.offload_vae must be true or false"):
        build_model(name, path=str(tiny_pipeline("flux", tmp_path_factory)), offload_vae="yes", **kwargs)
