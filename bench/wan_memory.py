"""Memory arithmetic of one Wan training step at 480x832 x 33 frames (docs/models_video.md).

    python bench/wan_memory.py

Computed, not measured on an accelerator, with bench/diffusers_memory.py's method: exact
parameter counts (components built on the meta device from the published configs), and the
bytes autograd saves for backward (bf16 network) counted per block in real forwards of one
full-width Wan block on the CPU. A Wan block's saved bytes are ``a + b n`` for ``n`` video
tokens (``a``: the cross-attention's keys and values of the 512 text tokens), so they are
measured at two token counts and extrapolated to the real one. With CFG (guidance > 1) a
training sample is a forward of two (unconditional and conditional halves).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from diffusers_memory import GB, SavedBytes, count, lora, lora_params  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the adapter's default LoRA targets
TEXT = 512  # UMT5 tokens (the pipelines pad to max_sequence_length = 512)
GPUS = (80, 141)


def wan(size: str, layers: int | None = None, i2v: bool = False):
    from diffusers import WanTransformer3DModel

    heads, ffn, n = {"1.3B": (12, 8960, 30), "14B": (40, 13824, 40)}[size]
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=128,
                                 in_channels=36 if i2v else 16, out_channels=16, text_dim=4096, freq_dim=256,
                                 ffn_dim=ffn, num_layers=n if layers is None else layers, cross_attn_norm=True,
                                 qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280 if i2v else None,
                                 added_kv_proj_dim=heads * 128 if i2v else None, rope_max_seq_len=1024)


def umt5_xxl():
    from transformers import UMT5Config, UMT5EncoderModel
    return UMT5EncoderModel(UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                       num_heads=64, feed_forward_proj="gated-gelu"))


def wan_vae():
    from diffusers import AutoencoderKLWan
    return AutoencoderKLWan()  # the defaults are Wan 2.1's VAE


def clip_h():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    return CLIPVisionModel(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                            num_attention_heads=16, image_size=224, patch_size=14))


def block_bytes(size: str, rank: int | None, latent_thw) -> tuple[int, int, int]:
    """(saved bytes in the block, its input bytes, saved bytes outside the blocks) for one sample."""
    torch.manual_seed(0)
    model = wan(size, layers=1).to(torch.bfloat16)
    if rank:
        model = lora(model, TARGETS, rank)
    model.train()
    t, h, w = latent_thw
    x = torch.randn(1, 16, t, h, w, dtype=torch.bfloat16, requires_grad=True)
    n = t * (h // 2) * (w // 2)
    counter = SavedBytes({"block": model.blocks[0]}, model, {n, TEXT, n + TEXT})
    with counter.hooks():
        model(hidden_states=x, timestep=torch.tensor([500.0]), return_dict=False,
              encoder_hidden_states=torch.randn(1, TEXT, 4096, dtype=torch.bfloat16))
    return counter.bytes["block"], counter.inputs["block"], counter.bytes.get("outside", 0), counter.square


def per_sample(size: str, rank: int | None, layers: int, n_real: int) -> dict[str, float]:
    """Saved bytes of one forward at ``n_real`` tokens under each checkpointing mode."""
    small, big = (2, 16, 20), (2, 32, 40)  # 160 and 640 video tokens
    n1, n2 = 2 * 8 * 10, 2 * 16 * 20
    s1, i1, o1, q1 = block_bytes(size, rank, small)
    s2, i2, o2, q2 = block_bytes(size, rank, big)

    def fit(y1, y2):
        return y1 + (y2 - y1) / (n2 - n1) * (n_real - n1)

    block, inputs, outside = fit(s1, s2), fit(i1, i2), fit(o1, o2)
    label = f"LoRA r{rank}" if rank else "full FT"
    print(f"  Wan-{size} {label}: a block saves {s1 / n1:.0f} B/token at "
          f"{n1} tokens, {s2 / n2:.0f} at {n2} (constant part {(s1 - (s2 - s1) / (n2 - n1) * n1) / 1e6:.1f} MB); "
          f"(n, n) bytes left out {q1 + q2}")
    return {"none": outside + layers * block,
            "selective": outside + block + sum(inputs if i % 2 == 0 else block for i in range(layers)),
            "full": outside + layers * inputs + block}


def main():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    frames, height, width = 33, 480, 832
    n = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)  # 9 latent frames x 30 x 52 patches
    params = {"1.3B": count(lambda: wan("1.3B")), "14B I2V": count(lambda: wan("14B", i2v=True))}
    text, vae, image = count(umt5_xxl), count(wan_vae), count(clip_h)
    lora_n = {"1.3B": lora_params(lambda: wan("1.3B"), TARGETS, 32)}
    print(f"parameters: Wan-1.3B transformer {params['1.3B']:,}, Wan-14B I2V transformer {params['14B I2V']:,}, "
          f"UMT5-XXL encoder {text:,}, Wan VAE {vae:,}, CLIP ViT-H/14 vision {image:,}; "
          f"LoRA r32 on {TARGETS} of Wan-1.3B: {lora_n['1.3B']:,}")
    print(f"\n{frames} frames at {height}x{width}: {n} video tokens + {TEXT} text tokens; saved bytes per block:")
    acts = {r: per_sample("1.3B", r, 30, n) for r in (None, 32)}
    frozen_vae = vae * 2 / GB
    print("\n| Wan-1.3B, 480x832 x 33 | trained params | weights GB | grads + AdamW GB | VAE GB "
          "| activations GB a sample, CFG (none / selective / full) | fixed GB | largest micro-batch 80 GB / 141 GB "
          "(none / selective / full) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, rank, trained, full_ft in (("LoRA r32", 32, lora_n["1.3B"], False),
                                          ("full fine-tune", None, params["1.3B"], True)):
        weights = params["1.3B"] * (4 + 2 if full_ft else 2) / GB
        optim = trained * 12 / GB
        fixed = weights + optim + frozen_vae
        a = {m: 2 * v / GB for m, v in acts[rank].items()}  # CFG: 2 forwards a sample
        fits = {g: [int((g - fixed) // a[m]) for m in ("none", "selective", "full")] for g in GPUS}
        print(f"| {label} | {trained / 1e6:,.1f} M | {weights:.1f} | {optim:.1f} | {frozen_vae:.2f} | "
              + " / ".join(f"{a[m]:.1f}" for m in ("none", "selective", "full"))
              + f" | {fixed:.1f} | " + " ; ".join("/".join(map(str, fits[g])) for g in GPUS) + " |")
    print(f"\nnot in the table: UMT5-XXL {text * 2 / GB:.1f} GB bf16 while encoding (offload_text_encoders), "
          f"CLIP vision {image * 2 / GB:.1f} GB (I2V), the VAE decoder's working memory in the rollout; "
          f"Wan-14B I2V weights alone: {params['14B I2V'] * 2 / GB:.1f} GB bf16")


if __name__ == "__main__":
    main()
