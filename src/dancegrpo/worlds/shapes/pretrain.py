"""Pretrain a shapes base model by flow matching on rendered data (reproducible from a seed).

    python -m dancegrpo.worlds.shapes.pretrain --task t2i --steps 3000 --out dancegrpo/assets/shapes_t2i

``make base-models`` runs the recipe of the shipped models: the image model first, then both
4-frame video models started from it (``--init-image``: ``inflate_image_policy``, which puts
the image model in every frame; ``--init-t2v`` can start image-to-video from a text-to-video
model instead). A video step costs several image steps, so on a CPU the video models would
otherwise spend their whole budget relearning what the image model knows. The shipped video runs add
``--motion-weight 2`` (see :func:`flow_matching_loss`); docs/shapes_video.md says what was and
was not measured about it.

Rectified flow: x_sigma = (1 - sigma) x0 + sigma noise, the model regresses the velocity
noise - x0 at timestep 1000 sigma, with sigma drawn half from a logit-normal (SD3's choice: most
weight on the middle of the path) and half uniformly (a small model must also learn the last,
low-noise steps, or its samples keep visible grain).

The base model is *deliberately imperfect*, the way a model pretrained on web captions is:
with probability ``label_noise`` a caption names a wrong colour, and independently a wrong
shape (for video also a wrong motion). The model therefore learns to follow a prompt only part
of the time, leaving the headroom GRPO is meant to close. For image-to-video a wrong colour or
shape contradicts the given first frame, which the clip always follows: the model learns to
trust the frame over the caption. Pretraining sees every scene, held-out ones included (GRPO
trains on the train split only). ``<out>/eval.json`` holds :func:`evaluate`'s held-out scores.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from ...models.rope import absolute_position_embedding
from ...trainer.config import load_config
from ...trainer.ema import EMA
from .dataset import PromptDataset
from .evaluation import evaluate_shapes
from .grammar import COLORS, MOTIONS, SHAPES, SceneSpec, compatible, parse_prompt
from .policy import ShapesPolicy

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def corrupt(specs: list[SceneSpec], p: float, generator: torch.Generator, *,
            appearance: float | None = None) -> list[SceneSpec]:
    """Each spec with, independently, a wrong colour and a wrong shape with probability
    ``appearance`` (default ``p``) and a wrong motion with probability ``p``.

    For image-to-video the clip still shows the true first frame, so a wrong colour or shape
    is a caption contradicting the frame (what teaches the model to keep the frame)."""
    q = p if appearance is None else appearance
    out = []
    for s in specs:
        u = torch.rand(3, generator=generator).tolist()
        pick = lambda seq, cur: [x for x in seq if x != cur][int(torch.randint(len(seq) - 1, (1,), generator=generator))]
        changes = {}
        if u[0] < q:
            changes["color"] = pick(list(COLORS), s.color)
        if u[1] < q:
            changes["shape"] = pick(list(SHAPES), s.shape)
        if s.motion is not None and u[2] < p:
            options = [m for m in MOTIONS if m != s.motion and compatible(s.position, m)]
            changes["motion"] = options[int(torch.randint(len(options), (1,), generator=generator))]
        out.append(dataclasses.replace(s, **changes) if changes else s)
    return out


def training_batch(data: PromptDataset, n: int, generator: torch.Generator, *, label_noise: float,
                   contradict: float | None = None):
    """``(x0 (n, 3, [T,] H, W) in [-1, 1], captions, first frames (n, 3, H, W) in [0, 1] or
    None)``: rendered scenes of ``data`` with captions corrupted at rate ``label_noise``
    (colour and shape at rate ``contradict`` where given: see :func:`corrupt`)."""
    pixels, prompts, *first = data.training_batch(n, generator)
    specs = [parse_prompt(p) for p in prompts]
    captions = [s.prompt for s in corrupt(specs, label_noise, generator, appearance=contradict)]
    return pixels * 2 - 1, captions, (first[0] if first else None)


def flow_matching_loss(policy: ShapesPolicy, x0: torch.Tensor, captions, first, generator: torch.Generator,
                       *, motion_weight: float = 0.0):
    """Mean squared error of the predicted velocity ``noise - x0`` at sigma drawn half from a
    logit-normal, half uniformly; ``first``: the i2v first frames in [0, 1], as GRPO gives them.

    ``motion_weight`` (videos) adds that times the mean squared error of the velocity's
    frame-to-frame differences. An error the same in every frame (a wrong colour) costs nothing
    more, one that changes over time (an object in the wrong place in later frames, i.e. wrong
    motion) costs up to ``1 + 4 motion_weight`` times as much: motion is a small share of the
    pixels, and the extra weight points the loss at it."""
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator)
    sigma = torch.where(torch.rand(n, generator=generator) < 0.5, torch.sigmoid(torch.randn(n, generator=generator)),
                        torch.rand(n, generator=generator))
    sv = sigma.view(-1, *[1] * (x0.dim() - 1))
    xt = (1 - sv) * x0 + sv * noise
    cond = policy.encode_prompts(captions, first)
    err = policy.predict(xt, 1000 * sigma, cond) - (noise - x0)
    loss = err.pow(2).mean()
    if motion_weight and x0.dim() == 5 and x0.shape[2] > 1:
        loss = loss + motion_weight * (err[:, :, 1:] - err[:, :, :-1]).pow(2).mean()
    return loss


def evaluate(policy: ShapesPolicy, *, num_prompts: int = 128) -> dict:
    """The held-out evaluation of a base model: ``dancegrpo eval`` of its task's shipped config
    (``configs/shapes_<task>.yaml``: its fixed held-out prompts, sampler in its eval mode, rewards
    and seed), so a base model's number is the one the demo and a GRPO run start from, plus the
    per-attribute, motion and first-frame diagnostics of ``evaluation.evaluate_shapes``."""
    name = f"shapes_{policy.task}"
    cfg = load_config(CONFIGS / f"{name}.yaml", [f"eval.num_prompts={num_prompts}", "device=cpu",
                                                 f"data.kwargs.size={policy.size}",
                                                 f"data.kwargs.frames={policy.frames}"])
    stats, _ = evaluate_shapes(policy, cfg, device="cpu")
    s, e = cfg.sampler, cfg.eval
    stats["evaluation"] = (f"{name}.yaml: {num_prompts} fixed {cfg.data.eval_split} prompts, {s.num_steps}-step "
                           f"{s.kind} sampler in {e.mode} mode, seed {e.seed}")
    return stats


def _copy_latent_patch_embed(dst: torch.Tensor, src: torch.Tensor, channels: int, pt_src: int, pt_dst: int) -> None:
    """Write ``src`` (hidden, channels * pt_src * P), a patch embedding of the latent alone, into
    ``dst`` (hidden, C' * pt_dst * P), C' >= channels, latent channels first: the other input
    channels get zero weight, and each of the pt_dst frames of a temporal patch gets the source
    kernel (pt_src = 1) divided by pt_dst, or its own (pt_src == pt_dst)."""
    hidden = src.shape[0]
    w = dst.zero_().view(hidden, -1, pt_dst, src.shape[1] // (channels * pt_src))
    w[:, :channels] = src.view(hidden, channels, pt_src, -1) / (pt_dst // pt_src)


@torch.no_grad()
def inflate_image_policy(image: ShapesPolicy, task: str, *, frames: int | None = None,
                         temporal_patch: int = 1) -> ShapesPolicy:
    """A video ``task`` ("t2v" / "i2v") policy initialised from a trained text-to-image one.

    Video training is several times dearer per step than image training, so the video base
    models start from what the image model already knows (colours, shapes, places; the text
    encoder) and only have to learn time. Everything but the two ends of the DiT is copied as
    is (same widths). The patch embedding is inflated the I3D way: each frame of a temporal
    patch gets the image kernel divided by ``pt``, so a static clip embeds exactly like its
    image; extra image-to-video input channels (first frame, flag) start at zero, i.e. the
    conditioning is learned from scratch without disturbing the rest. The final layer
    predicts the same patch for each frame of a temporal patch.
    """
    if image.task != "t2i":
        raise ValueError(f"inflate_image_policy: image must be a 't2i' policy, got task {image.task!r}")
    if task not in ("t2v", "i2v"):
        raise ValueError(f"inflate_image_policy: task must be 't2v' or 'i2v', got {task!r}")
    icfg = image.dit.config
    if icfg.patch_size[0] != 1:
        raise ValueError(f"inflate_image_policy: image patch_size must have pt = 1, got {icfg.patch_size}")
    args = copy.deepcopy(image._init_args)
    dit = {k: v for k, v in args["dit"].items() if k != "image_condition"}
    frames = frames or image.frames
    if not isinstance(temporal_patch, int) or temporal_patch < 1 or frames % temporal_patch:
        raise ValueError(f"inflate_image_policy: temporal_patch must be a positive int dividing frames, "
                         f"got {temporal_patch!r}")
    dit["patch_size"] = (temporal_patch, *icfg.patch_size[1:])
    grid_t = frames // temporal_patch
    if icfg.absolute_pos:
        dit["frame_embedding"] = grid_t
    if task == "i2v":
        dit["image_condition"] = True
    video = ShapesPolicy(task, size=image.size, frames=frames, text_dim=args["text_dim"],
                         text_layers=args["text_layers"], dit=dit)
    src, dst = image.state_dict(), video.state_dict()
    pt, ph, pw = video.dit.config.patch_size
    for name, value in src.items():
        if name not in dst:
            raise ValueError(f"inflate_image_policy: parameter {name!r} has no counterpart in the video model")
        if name == "dit.patch_embed.weight":
            _copy_latent_patch_embed(dst[name], value, icfg.in_channels, 1, pt)
        elif name in ("dit.final.linear.weight", "dit.final.linear.bias"):  # rows (C_out, 1, ph, pw)
            co = icfg.output_channels
            dst[name].view(co, pt, ph * pw, -1).copy_(value.view(co, 1, ph * pw, -1).expand(co, pt, ph * pw, -1))
        elif dst[name].shape != value.shape:
            raise ValueError(f"inflate_image_policy: {name!r} has shape {tuple(value.shape)} in the image model "
                             f"but {tuple(dst[name].shape)} in the video model")
        else:
            dst[name].copy_(value)
    if icfg.absolute_pos:
        # The image's tokens carry the time coordinate of a one-frame clip; a video's carry one
        # per frame, and those (high-frequency sinusoids) would scramble every feature the image
        # model learned. The learned frame embedding starts at the difference, so each frame's
        # tokens start exactly as the image's, and it is free to learn a sense of time.
        hid = icfg.hidden_size
        still = absolute_position_embedding((1, 1, 1), hid)[0]
        moving = absolute_position_embedding((grid_t, 1, 1), hid)
        dst["dit.frame_embed"] = still[None] - moving
    video.load_state_dict(dst)
    return video


@torch.no_grad()
def add_image_condition(t2v: ShapesPolicy) -> ShapesPolicy:
    """An image-to-video policy initialised from a trained text-to-video one: every weight is
    copied, and the patch embedding's new inputs (the broadcast first frame and its flag)
    start at zero, so the model starts as the text-to-video model and learns to use the frame."""
    if t2v.task != "t2v":
        raise ValueError(f"add_image_condition: expected a 't2v' policy, got task {t2v.task!r}")
    args = copy.deepcopy(t2v._init_args)
    args["dit"]["patch_size"] = tuple(args["dit"]["patch_size"])
    args["dit"]["image_condition"] = True
    i2v = ShapesPolicy("i2v", **{k: v for k, v in args.items() if k != "task"})
    dst = i2v.state_dict()
    pt = t2v.dit.config.patch_size[0]
    for name, value in t2v.state_dict().items():
        if name == "dit.patch_embed.weight":
            _copy_latent_patch_embed(dst[name], value, t2v.dit.config.in_channels, pt, pt)
        else:
            dst[name].copy_(value)
    i2v.load_state_dict(dst)
    return i2v


def _save_ema(policy: ShapesPolicy, ema: EMA, out: Path, *, step: int) -> None:
    """Save the EMA weights (atomically, via save_pretrained) without touching the live ones."""
    policy.save_pretrained(out, state_dict={**policy.state_dict(), **ema.state_dict()})
    (out / "progress.json").write_text(json.dumps({"step": step}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=("t2i", "t2v", "i2v"), default="t2i")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--label-noise", type=float, default=0.35)
    p.add_argument("--contradict", type=float, default=None,
                   help="i2v: rate of captions naming another colour / shape than the given frame "
                        "(default: --label-noise)")
    p.add_argument("--motion-weight", type=float, default=0.0,
                   help="videos: weight of the frame-to-frame velocity error (see flow_matching_loss)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-n", type=int, default=128, help="held-out prompts of the final evaluation")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--dit", default="{}", help='DiT config overrides as JSON, e.g. \'{"depth": 6}\'')
    p.add_argument("--init", default=None, help="start from this ShapesPolicy folder")
    p.add_argument("--init-image", default=None,
                   help="video tasks: start from this t2i ShapesPolicy folder, inflated (see inflate_image_policy)")
    p.add_argument("--init-t2v", default=None,
                   help="i2v: start from this t2v ShapesPolicy folder (see add_image_condition)")
    p.add_argument("--save-every", type=int, default=0,
                   help="also save the EMA weights to --out every N steps (a run stopped early keeps them)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="train only the first N of --steps (the schedule stays that of --steps), then "
                        "save and evaluate as at the end")
    p.add_argument("--snapshots", default="",
                   help="comma-separated steps whose EMA weights are also kept in <out>/step_<N> "
                        "(e.g. to start a video model from an early image checkpoint)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    try:
        snapshots = {int(x) for x in args.snapshots.split(",") if x.strip()}
    except ValueError:
        p.error(f"--snapshots must be comma-separated ints, got {args.snapshots!r}")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    if args.stop_after is not None and args.stop_after < 1:
        p.error(f"--stop-after must be >= 1, got {args.stop_after}")
    if args.steps < 1 or args.batch < 1:
        p.error(f"--steps and --batch must be >= 1, got {args.steps} and {args.batch}")
    if sum(x is not None for x in (args.init, args.init_image, args.init_t2v)) > 1:
        p.error("--init, --init-image and --init-t2v are exclusive")
    if args.contradict is not None and (args.task != "i2v" or not 0 <= args.contradict <= 1):
        p.error(f"--contradict is a rate in [0, 1] for --task i2v, got {args.contradict} with --task {args.task}")
    if args.init_t2v and args.task != "i2v":
        p.error("--init-t2v starts an i2v model: use it with --task i2v")
    if args.init:  # continue from an earlier run's weights (same architecture)
        policy = ShapesPolicy.from_pretrained(args.init)
    elif args.init_image:
        policy = inflate_image_policy(ShapesPolicy.from_pretrained(args.init_image), args.task, frames=args.frames)
    elif args.init_t2v:
        policy = add_image_condition(ShapesPolicy.from_pretrained(args.init_t2v))
    else:
        policy = ShapesPolicy(args.task, size=args.size, frames=args.frames, dit=json.loads(args.dit))
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    warmup = max(1, min(200, args.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) *
                                              (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.steps))))
    ema = EMA(policy.named_parameters(), 0.995)
    data = PromptDataset(args.task, split=None, size=policy.size, frames=policy.frames)  # an --init model keeps its own
    t0, running = time.time(), 0.0
    policy.train()
    last = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    for step in range(1, last + 1):
        x0, captions, first = training_batch(data, args.batch, g, label_noise=args.label_noise,
                                             contradict=args.contradict)
        loss = flow_matching_loss(policy, x0, captions, first, g, motion_weight=args.motion_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update()
        running = 0.98 * running + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 100 == 0 or step == last:
            print(f"step {step:5d}  loss {running:.4f}  lr {sched.get_last_lr()[0]:.2e}  {time.time() - t0:6.0f}s",
                  flush=True)
        if args.save_every and step % args.save_every == 0 and step < last:
            _save_ema(policy, ema, Path(args.out), step=step)
        if step in snapshots:
            _save_ema(policy, ema, Path(args.out) / f"step_{step}", step=step)
    ema.copy_to(policy.named_parameters())
    out = Path(args.out)
    policy.save_pretrained(out)
    stats = evaluate(policy, num_prompts=args.eval_n)
    stats.update(task=args.task, steps=last, schedule_steps=args.steps, init=args.init, init_image=args.init_image, init_t2v=args.init_t2v, batch=args.batch, label_noise=args.label_noise, contradict=args.contradict, motion_weight=args.motion_weight, lr=args.lr, seed=args.seed,
                 train_seconds=round(time.time() - t0), parameters=sum(p.numel() for p in policy.parameters()))
    (out / "eval.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
