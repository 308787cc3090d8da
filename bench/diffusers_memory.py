"""Memory arithmetic of one training step for the full-size diffusers models (docs/models.md).

    python bench/diffusers_memory.py

Computed, not measured on an accelerator. Parameter counts are exact: each component is built
on the meta device from its published config. Activations: the bytes autograd saves for
backward are counted (``saved_tensors_hooks``, bf16 network) per block in a real forward of the
real block classes at full width on the CPU, with few tokens, then scaled linearly to the real
token count (saved tensors are linear in tokens once attention keeps no (n, n) matrix, as
flash / memory-efficient attention does on GPUs; any (n, n) tensor the CPU kernel saves is left
out and reported). Full checkpointing keeps each block's input and recomputes one block at a
time in backward; selective (every 2nd block) keeps half the blocks' activations.
"""

from __future__ import annotations

import contextlib

import torch

GB = 1e9


def count(module_fn) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in module_fn().parameters())


class SavedBytes:
    """Bytes saved for backward, attributed to the innermost running unit (or "outside")."""

    def __init__(self, units, model, seq_lens):
        self.units, self.current, self.bytes, self.inputs, self.square = units, ["outside"], {}, {}, 0
        self.seq_lens = set(seq_lens)  # attention matrices are (..., n, n) for these n
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}  # weights are not activations
        self.handles = []
        for name, unit in units.items():
            self.handles.append(unit.register_forward_pre_hook(self._enter(name), with_kwargs=True))
            self.handles.append(unit.register_forward_hook(self._leave, with_kwargs=True))

    def _enter(self, name):
        def hook(module, args, kwargs):
            self.current.append(name)
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.dim() >= 3]
            self.inputs[name] = sum(t.numel() * t.element_size() for t in tensors)
        return hook

    def _leave(self, module, args, kwargs, out):
        self.current.pop()

    def pack(self, t):
        n = t.numel() * t.element_size()
        if t.untyped_storage().data_ptr() in self.params:
            pass
        elif t.dim() >= 2 and t.shape[-1] == t.shape[-2] and t.shape[-1] in self.seq_lens:
            self.square += n  # an (n, n) attention matrix: flash attention keeps none
        else:
            self.bytes[self.current[-1]] = self.bytes.get(self.current[-1], 0) + n
        return t

    @contextlib.contextmanager
    def hooks(self):
        with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
            yield
        for h in self.handles:
            h.remove()


def lora(model, targets, rank):
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    return inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)), model)


def lora_params(model_fn, targets, rank) -> int:
    with torch.device("meta"):
        model = lora(model_fn(), targets, rank)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- the models

ATTN = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out"]


def flux_transformer(layers=19, single=38):
    from diffusers import FluxTransformer2DModel
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single,
                                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                  pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))


def sd35m_transformer(layers=24, dual=tuple(range(13))):
    from diffusers import SD3Transformer2DModel
    return SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, num_layers=layers,
                                 attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                 caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
                                 pos_embed_max_size=384, dual_attention_layers=dual, qk_norm="rms_norm")


def sd14_unet():
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(sample_size=64, cross_attention_dim=768)


def clip(hidden, layers, inter, heads, projection=False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, max_position_embeddings=77, projection_dim=hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def t5_xxl():
    from transformers import T5Config, T5EncoderModel
    return T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu"))


def vae(latent, quant):
    from diffusers import AutoencoderKL
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=latent,
                         use_quant_conv=quant, use_post_quant_conv=quant)


# --------------------------------------------------------------------------- activations per block

def transformer_activations(kind: str, lora_rank: int | None, n_img: int, n_txt: int):
    """{unit kind: (saved bytes per token, input bytes per token)} for a bf16 training forward."""
    torch.manual_seed(0)
    if kind == "flux":
        model = flux_transformer(1, 1).to(torch.bfloat16)
        blocks = {"double": model.transformer_blocks[0], "single": model.single_transformer_blocks[0]}
        side = int(n_img ** 0.5)
        ids = torch.zeros(side, side, 3)
        ids[..., 1] += torch.arange(side)[:, None]
        ids[..., 2] += torch.arange(side)[None, :]
        inputs = dict(hidden_states=torch.randn(1, n_img, 64), encoder_hidden_states=torch.randn(1, n_txt, 4096),
                      pooled_projections=torch.randn(1, 768), timestep=torch.tensor([0.5]),
                      guidance=torch.tensor([3.5]), img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(n_txt, 3))
    else:
        model = sd35m_transformer(3, (0,)).to(torch.bfloat16)
        blocks = {"dual": model.transformer_blocks[0], "joint": model.transformer_blocks[1],
                  "last": model.transformer_blocks[2]}
        side = int(n_img ** 0.5) * 2
        inputs = dict(hidden_states=torch.randn(1, 16, side, side), encoder_hidden_states=torch.randn(1, n_txt, 4096),
                      pooled_projections=torch.randn(1, 2048), timestep=torch.tensor([500.0]))
    if lora_rank:
        model = lora(model, ATTN, lora_rank)
    model.train()
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v
              for k, v in inputs.items()}
    inputs["hidden_states"].requires_grad_(True)
    counter = SavedBytes(blocks, model, {n_img, n_txt, n_img + n_txt})
    with counter.hooks():
        model(**inputs, return_dict=False)
    n = n_img + n_txt
    return {k: (counter.bytes.get(k, 0) / n, counter.inputs[k] / n) for k in blocks}, counter.square


def unet_activations(lora_rank: int | None, latent: int):
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    torch.manual_seed(0)
    model = sd14_unet().to(torch.bfloat16)
    units = {f"u{i}": m for i, m in enumerate(m for m in model.modules()
                                               if isinstance(m, (ResnetBlock2D, BasicTransformerBlock)))}
    if lora_rank:
        model = lora(model, ["to_q", "to_k", "to_v", "to_out.0"], lora_rank)
    model.train()
    x = torch.randn(1, 4, latent, latent, dtype=torch.bfloat16, requires_grad=True)
    # self-attention at the three upper levels (the last level has none)
    counter = SavedBytes(units, model, {(latent >> level) ** 2 for level in range(3)})
    with counter.hooks():
        model(x, torch.tensor([500]), encoder_hidden_states=torch.randn(1, 77, 768, dtype=torch.bfloat16))
    return counter


# --------------------------------------------------------------------------- the table

def row(name, denoiser, trained, full_ft, acts, forwards, batch, mode, frozen_gb, note):
    """One training step: weights (fp32 masters + autocast's bf16 copies for a full fine-tune,
    bf16 for LoRA), fp32 gradients and AdamW moments of the trained parameters, activations of
    ``batch`` samples (``forwards`` network passes each: 2 with CFG) under ``mode``."""
    weights = denoiser * (4 + 2 if full_ft else 2) / GB
    optim = trained * (4 + 8) / GB
    act = acts[mode] * forwards * batch / GB
    total = weights + optim + act + frozen_gb
    print(f"| {name} | {trained / 1e6:,.0f} M | {weights:.1f} | {optim:.1f} | "
          + " / ".join(f"{acts[m] * forwards / GB:.2f}" for m in ("none", "selective", "full"))
          + f" | {batch} x {mode}: {act:.1f} | {frozen_gb:.1f} | **{total:.0f}** | {note} |")


def transformer_totals(per_kind, counts, n):
    none = sum(per_kind[k][0] * c for k, c in counts.items()) * n
    inputs = sum(per_kind[k][1] * c for k, c in counts.items()) * n
    biggest = max(per_kind[k][0] for k in counts) * n
    full = inputs + biggest
    # selective: blocks 0, 2, 4, ... recomputed, the others keep their activations
    kinds = [k for k, c in counts.items() for _ in range(c)]
    sel = sum(per_kind[k][1] if i % 2 == 0 else per_kind[k][0] for i, k in enumerate(kinds)) * n + biggest
    return none, sel, full


def main():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    clip_l = count(lambda: clip(768, 12, 3072, 12))
    clip_g = count(lambda: clip(1280, 32, 5120, 20, projection=True))
    t5 = count(t5_xxl)
    vae16, vae4 = count(lambda: vae(16, False)), count(lambda: vae(4, True))
    flux_n, sd35_n, unet_n = count(flux_transformer), count(sd35m_transformer), count(sd14_unet)
    print(f"parameters: FLUX.1-dev transformer {flux_n:,}, SD3.5-M transformer {sd35_n:,}, SD1.4 UNet {unet_n:,}, "
          f"CLIP-L {clip_l:,}, CLIP-G {clip_g:,}, T5-XXL encoder {t5:,}, VAE-16ch {vae16:,}, VAE-4ch {vae4:,}")
    flux_lora = lora_params(flux_transformer, ATTN, 32)
    sd35_lora = lora_params(sd35m_transformer, ATTN, 32)
    unet_lora = lora_params(sd14_unet, ["to_q", "to_k", "to_v", "to_out.0"], 4)
    print(f"LoRA parameters: FLUX r32 {flux_lora:,}, SD3.5-M r32 {sd35_lora:,}, SD1.4 UNet r4 {unet_lora:,}")

    print("\nper-token saved bytes per block (bf16), measured with few tokens; linearity check at 4x tokens:")
    acts = {}
    for kind, n_img, n_txt in (("flux", 100, 40), ("sd3", 100, 40)):  # n differs from every head size
        for rank in (None, 32):
            small, sq = transformer_activations(kind, rank, n_img, n_txt)
            big, _ = transformer_activations(kind, rank, n_img * 4, n_txt * 4)
            acts[kind, rank] = big
            ratio = {k: round(big[k][0] / small[k][0], 3) for k in big}
            print(f"  {kind} {'LoRA r32' if rank else 'full'}: "
                  + ", ".join(f"{k} {v[0]:.0f} B/token (input {v[1]:.0f})" for k, v in big.items())
                  + f"; per-token ratio 4x/1x tokens {ratio}; (n, n) bytes left out {sq}")
    units = {}
    for rank in (None, 4):
        c32, c64 = unet_activations(rank, 32), unet_activations(rank, 64)
        units[rank] = c64
        print(f"  sd1.4 UNet {'LoRA r4' if rank else 'full'}: 512 px total {sum(c64.bytes.values()) / GB:.2f} GB "
              f"(256 px: {sum(c32.bytes.values()) / GB:.2f} GB, ratio {sum(c64.bytes.values()) / sum(c32.bytes.values()):.2f})"
              f"; (n, n) bytes left out {c64.square}")

    print("\n| config | trained params | weights GB | grads + AdamW GB | activations GB a sample "
          "(none / selective / full) | activations GB in the step | VAE + resident encoders GB | step total GB | notes |")
    print("|---|---|---|---|---|---|---|---|---|")
    flux_text, sd3_text = (clip_l + t5) * 2 / GB, (clip_l + clip_g + t5) * 2 / GB
    n720, n1024 = (720 // 16) ** 2 + 512, (1024 // 16) ** 2 + 512
    flux = {(px, r): dict(zip(("none", "selective", "full"),
                              transformer_totals(acts["flux", r], {"double": 19, "single": 38}, n), strict=True))
            for px, n in ((720, n720), (1024, n1024)) for r in (None, 32)}
    n = (512 // 16) ** 2 + 77 + 256
    sd3 = {r: dict(zip(("none", "selective", "full"),
                       transformer_totals(acts["sd3", r], {"dual": 13, "joint": 10, "last": 1}, n), strict=True))
           for r in (None, 32)}
    sd = {}
    for r in (None, 4):
        c = units[r]
        per_unit = {k: v for k, v in c.bytes.items() if k != "outside"}
        peak = max(per_unit.values())
        names = list(per_unit)
        sd[r] = {"none": sum(c.bytes.values()),
                 "selective": c.bytes.get("outside", 0) + peak + sum(
                     c.inputs[k] if i % 2 == 0 else per_unit[k] for i, k in enumerate(names)),
                 "full": c.bytes.get("outside", 0) + sum(c.inputs.values()) + peak}
    vae_gb = vae16 * 2 / GB
    row("flux_dancegrpo (720 px, full FT)", flux_n, flux_n, True, flux[720, None], 1, 1, "full", vae_gb,
        f"text encoders offloaded (+{flux_text:.1f} GB while encoding)")
    row("flux_lora (720 px, LoRA r32)", flux_n, flux_lora, False, flux[720, 32], 1, 1, "full", vae_gb,
        f"text encoders offloaded (+{flux_text:.1f} GB while encoding)")
    row("flux_lora at 1024 px", flux_n, flux_lora, False, flux[1024, 32], 1, 1, "full", vae_gb, "")
    row("flux_lora, no checkpointing", flux_n, flux_lora, False, flux[720, 32], 1, 1, "none", vae_gb, "")
    row("sd35_flowgrpo (512 px, LoRA r32)", sd35_n, sd35_lora, False, sd3[32], 2, 8, "none", vae_gb,
        f"CFG; text encoders offloaded (+{sd3_text:.1f} GB while encoding)")
    row("SD3.5-M 512 px full FT", sd35_n, sd35_n, True, sd3[None], 2, 8, "full", vae_gb, "")
    row("sd14_dancegrpo (512 px, full FT)", unet_n, unet_n, True, sd[None], 2, 8, "selective",
        (clip_l + vae4) * 2 / GB, "CFG")
    row("SD1.4 512 px LoRA r4", unet_n, unet_lora, False, sd[4], 2, 8, "none", (clip_l + vae4) * 2 / GB, "")


if __name__ == "__main__":
    main()
