"""Memory arithmetic of one training step for HunyuanVideo-13B (and SkyReels-V1, the same
transformer with CFG) at 480p x 33 frames, and the largest micro-batch it predicts on 80 GB and
141 GB GPUs (docs/models_hunyuanvideo.md).

    python -m bench.hunyuan_memory

Computed, not measured on an accelerator, with bench/diffusers_memory.py's method: exact
parameter counts (meta device, the published config = diffusers' defaults), bytes autograd saves
for backward counted per block in a bf16 training forward of the real block classes at full
width on the CPU with few tokens, scaled linearly to the real token count (no (n, n) attention
matrix kept, as flash / memory-efficient attention does).
"""

from __future__ import annotations

import torch

from bench.diffusers_memory import (
    ATTN,
    GB,
    SavedBytes,
    count,
    lora,
    lora_params,
    transformer_totals,
)

HEIGHT, WIDTH, FRAMES, TEXT = 480, 848, 33, 256  # 480p 16:9; the pipeline's 256 text tokens
RANK = 32
RESERVE_GB = 4.0  # CUDA context, allocator fragmentation, the step's transient buffers (a guess, stated)


def transformer(layers=20, single=40, in_channels=16):
    from diffusers import HunyuanVideoTransformer3DModel
    return HunyuanVideoTransformer3DModel(in_channels=in_channels, num_layers=layers, num_single_layers=single)


def vae():
    from diffusers import AutoencoderKLHunyuanVideo
    return AutoencoderKLHunyuanVideo()


def llama8b():
    from transformers import LlamaConfig, LlamaModel
    return LlamaModel(LlamaConfig(vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8))


def clip_l():
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12))


def activations(rank: int | None, frames: int, side: int, n_txt: int):
    """{"double" | "single": (saved bytes per token, input bytes per token)}, bf16 forward."""
    torch.manual_seed(0)
    model = transformer(1, 1).to(torch.bfloat16)
    blocks = {"double": model.transformer_blocks[0], "single": model.single_transformer_blocks[0]}
    if rank:
        model = lora(model, ATTN, rank)
    model.train()
    x = torch.randn(1, 16, frames, side * 2, side * 2, dtype=torch.bfloat16, requires_grad=True)
    inputs = dict(hidden_states=x, timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, n_txt, 4096, dtype=torch.bfloat16),
                  encoder_attention_mask=torch.ones(1, n_txt), pooled_projections=torch.randn(1, 768, dtype=torch.bfloat16),
                  guidance=torch.tensor([6000.0], dtype=torch.bfloat16))
    n_img = frames * side * side
    counter = SavedBytes(blocks, model, {n_img + n_txt})
    with counter.hooks():
        model(**inputs, return_dict=False)
    n = n_img + n_txt
    return {k: (counter.bytes.get(k, 0) / n, counter.inputs[k] / n) for k in blocks}, counter.square


def main():
    n_params = count(transformer)
    vae_n, llama_n, clip_n = count(vae), count(llama8b), count(clip_l)
    lora_n = lora_params(transformer, ATTN, RANK)
    print(f"parameters: HunyuanVideo transformer {n_params:,}, VAE {vae_n:,}, Llama-3-8B text encoder {llama_n:,}, "
          f"CLIP-L {clip_n:,}; LoRA r{RANK} on {ATTN}: {lora_n:,}")
    t = (FRAMES - 1) // 4 + 1
    n = t * (HEIGHT // 16) * (WIDTH // 16) + TEXT
    print(f"tokens at {HEIGHT}x{WIDTH}x{FRAMES}: {t} latent frames x {HEIGHT // 16}x{WIDTH // 16} patches + {TEXT} "
          f"text = {n}")
    acts = {}
    for rank in (None, RANK):
        small, sq = activations(rank, 1, 6, 20)
        big, _ = activations(rank, 2, 6, 40)
        ratio = {k: round(big[k][0] / small[k][0], 3) for k in big}
        acts[rank] = dict(zip(("none", "selective", "full"),
                              transformer_totals(big, {"double": 20, "single": 40}, n), strict=True))
        print(f"  {f'LoRA r{RANK}' if rank else 'full'}: " + ", ".join(
            f"{k} {v[0] / 1e3:.0f} kB/token (input {v[1] / 1e3:.0f} kB)" for k, v in big.items())
              + f"; per-token ratio at 2x tokens {ratio}; (n, n) bytes left out {sq}")
    vae_gb = vae_n * 2 / GB
    print(f"\nnot resident while training (offloaded): Llama {llama_n * 2 / GB:.1f} GB + CLIP {clip_n * 2 / GB:.1f} GB bf16;"
          f" resident: VAE {vae_gb:.2f} GB; reserve {RESERVE_GB} GB")
    print("\n| config | trained params | weights GB | grads + AdamW GB | activations GB a sample (none / selective / "
          "full) | fixed GB | largest micro-batch on 80 GB (none / selective / full) | on 141 GB |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rank, forwards in (("T2V full fine-tune", None, 1), (f"T2V LoRA r{RANK}", RANK, 1),
                                 ("SkyReels I2V full fine-tune (CFG)", None, 2), (f"SkyReels I2V LoRA r{RANK} (CFG)", RANK, 2)):
        full_ft = rank is None
        trained = n_params if full_ft else lora_n
        weights = n_params * (4 + 2 if full_ft else 2) / GB  # fp32 masters + bf16 autocast copies, or bf16 base
        optim = trained * 12 / GB
        fixed = weights + optim + vae_gb + RESERVE_GB
        per = {m: acts[rank][m] * forwards / GB for m in ("none", "selective", "full")}
        fits = {gpu: " / ".join(str(max(0, int((gpu - fixed) // per[m]))) if gpu > fixed else "0 (does not fit)"
                                for m in per) for gpu in (80, 141)}
        print(f"| {name} | {trained / 1e6:,.0f} M | {weights:.1f} | {optim:.1f} | "
              + " / ".join(f"{v:.2f}" for v in per.values()) + f" | {fixed:.1f} | {fits[80]} | {fits[141]} |")


if __name__ == "__main__":
    main()
