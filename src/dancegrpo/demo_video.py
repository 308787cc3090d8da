"""``make demo-video``: reinforcement learning visibly improves the shapes world's video models
on a laptop CPU.

For text-to-video and image-to-video, with the motion and alignment rewards:

1. scores the shipped base model on held-out prompts (motion reward, % of clips making the
   asked motion, alignment; for image-to-video also how well it keeps the given frame);
2. trains it once per seed, the seeds in parallel processes (one CPU core each), with GRPO
   (``--algorithm grpo``, the default: configs ``shapes_t2v`` / ``shapes_i2v``) or DiffusionNFT
   (``--algorithm nft``: ``shapes_t2v_nft`` / ``shapes_i2v_nft``);
3. scores every trained model on the same prompts with the same noise and prints before /
   after per seed, with how many prompts each seed newly gets right and newly gets wrong (the
   same prompts and noise make the comparison paired), and writes side-by-side GIFs (each
   prompt: base, then each seed).

    python -m dancegrpo.demo_video [--algorithm grpo|nft] [--tasks t2v,i2v] [--seeds 0,1] [--steps N]
                                   [--out outputs/demo_video]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

import torch

GIF_PROMPTS = 16
ALGORITHMS = {"grpo": ("", "GRPO"), "nft": ("_nft", "NFT")}   # config suffix, table label
# (key, label, percent?) rows of the before / after table.
ROWS = (
    ("reward_mean", "reward (weighted sum)", False),
    ("reward_motion_mean", "motion reward", False),
    ("correct_rate_motion", "% asked motion", True),
    ("reward_shapes_alignment_mean", "alignment reward", False),
    ("correct_rate_color_shape", "% colour+shape right", True),
    ("frame_trust_rate", "% keep a contradicted frame", True),
    ("first_frame_error", "first-frame error", False),
)


def _evaluate(model, cfg):
    """The held-out statistics (``evaluation.evaluate_shapes``), whether each held-out clip makes
    its asked motion (a list of bools, prompt by prompt) and the first GIF_PROMPTS prompts' samples."""
    from .trainer.evaluate import first_samples
    from .trainer.policy import build_run_dataset
    from .worlds.shapes.evaluation import evaluate_shapes
    from .worlds.shapes.rewards import MotionReward

    stats, samples = evaluate_shapes(model, cfg, device="cpu")
    items = build_run_dataset(cfg, cfg.data.eval_split).fixed(cfg.eval.num_prompts)
    texts = [it.text for it in items for _ in range(cfg.eval.samples_per_prompt)]
    right = MotionReward().correct(samples, texts).tolist()
    return stats, right, first_samples(model, cfg, samples, GIF_PROMPTS)


def _paired(before: list[bool], after: list[bool]) -> dict:
    """Per held-out clip, base against trained (same prompt, same noise): how many clips the
    trained model newly makes move as asked, how many it newly gets wrong, and the standard
    error of the change in the rate (of the per-clip differences, so prompt difficulty cancels)."""
    diff = torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64)
    se = float(diff.std() / diff.numel() ** 0.5) if diff.numel() > 1 else float("nan")
    return {"motion_gained": int((diff > 0).sum()), "motion_lost": int((diff < 0).sum()),
            "motion_change": float(diff.mean()), "motion_change_se": se}


def _config(name: str, out: Path, seed: int, args, progress: bool = True) -> object:
    from .trainer import load_config

    overrides = [f"output_dir={out}", "overwrite=true", "device=cpu", f"seed={seed}", f"log.progress={progress}"]
    if args.steps is not None:
        overrides.append(f"max_steps={args.steps}")
    if args.eval_prompts is not None:
        overrides.append(f"eval.num_prompts={args.eval_prompts}")
    return load_config(name, overrides + list(args.overrides))


def _train_seed(job: tuple) -> dict:
    """One training run in its own process: train, then evaluate; returns the stats and samples."""
    name, run_dir, seed, threads, progress, args = job
    torch.set_num_threads(threads)
    from .trainer import Trainer

    cfg = _config(name, Path(run_dir), seed, args, progress)
    t0 = time.time()
    trainer = Trainer(cfg)
    trainer.train()
    train_s = time.time() - t0
    stats, right, samples = _evaluate(trainer.model, cfg)
    return {"seed": seed, "stats": stats, "right": right, "samples": samples, "train_seconds": round(train_s, 1)}


def _side_by_side(before: torch.Tensor, afters: list[torch.Tensor]) -> torch.Tensor:
    """(B, ...) tiles ordered prompt by prompt: base, then each seed's sample."""
    return torch.stack([before, *afters], 1).flatten(0, 1)


def _table(task: str, before: dict, afters: list[dict], seeds: list[int], label: str) -> list[str]:
    head = f"| {task} held-out | base | " + " | ".join(f"{label} seed {s}" for s in seeds) + " |"
    lines = [head, "|" + " --- |" * (2 + len(seeds))]
    for key, label, pct in ROWS:
        if key not in before:
            continue
        fmt = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.3f}")
        lines.append(f"| {label} | {fmt(before[key])} | " + " | ".join(fmt(a[key]) for a in afters) + " |")
    if all("motion_gained" in a for a in afters):
        lines.append("| asked motion vs base: clips gained / lost | | " +
                     " | ".join(f"+{a['motion_gained']} / -{a['motion_lost']}" for a in afters) + " |")
        lines.append("| change in % asked motion (paired s.e.) | | " +
                     " | ".join(f"{100 * a['motion_change']:+.1f} ({100 * a['motion_change_se']:.1f})" for a in afters)
                     + " |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithm", default="grpo", choices=sorted(ALGORITHMS),
                   help="grpo: GRPO (shapes_<task>); nft: DiffusionNFT (shapes_<task>_nft)")
    p.add_argument("--tasks", default="t2v,i2v", help="comma-separated: t2v, i2v")
    p.add_argument("--seeds", default="0,1", help="comma-separated training seeds, trained in parallel processes")
    p.add_argument("--out", default="outputs/demo_video")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: each config's max_steps)")
    p.add_argument("--eval-prompts", type=int, default=None, help="held-out prompts to score (default: config)")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = p.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    bad = [t for t in tasks if t not in ("t2v", "i2v")]
    if not tasks or bad:
        p.error(f"--tasks must list t2v and/or i2v, got {args.tasks!r}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated ints, got {args.seeds!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        p.error(f"--seeds must name distinct seeds, got {args.seeds!r}")

    from .trainer.images import save_grid
    from .trainer.policy import build_policy

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix, label = ALGORITHMS[args.algorithm]
    names = {t: f"shapes_{t}{suffix}" for t in tasks}
    configs = {t: _config(names[t], out / t / "base", seeds[0], args) for t in tasks}  # mistakes show first
    threads = max(1, (os.cpu_count() or 1) // len(seeds))
    summary, markdown = {}, []
    for task in tasks:
        cfg = configs[task]
        print(f"\n== {task}: base model on {cfg.eval.num_prompts} held-out prompts ==", flush=True)
        before, before_right, before_samples = _evaluate(build_policy(cfg, torch.device("cpu")), cfg)
        print(f"== {task}: {label} ({names[task]}), {cfg.max_steps} steps of {cfg.rollout.prompts_per_step} prompts x "
              f"{cfg.rollout.group_size} clips, seeds {seeds} in parallel ({threads} thread(s) each) ==", flush=True)
        t0 = time.time()
        # One progress bar (the first seed's): parallel bars would garble each other.
        jobs = [(names[task], str(out / task / f"seed_{s}"), s, threads, i == 0, args) for i, s in enumerate(seeds)]
        with mp.get_context("spawn").Pool(len(seeds)) as pool:
            results = pool.map(_train_seed, jobs)
        wall = time.time() - t0
        afters = [{**r["stats"], **_paired(before_right, r["right"])} for r in results]
        gif = save_grid(_side_by_side(before_samples, [r["samples"] for r in results]), out / f"{task}_before_after",
                        columns=2 * (1 + len(seeds)), fps=3)
        lines = _table(task, before, afters, seeds, label)
        print("\n".join(lines), flush=True)
        print(f"{label} wall time {wall / 60:.1f} min; GIF (each prompt: base, " +
              ", ".join(f"seed {s}" for s in seeds) + f"): {gif}", flush=True)
        summary[task] = {"before": before, "after": {str(r["seed"]): a for r, a in zip(results, afters, strict=True)},
                         "train_seconds": {str(r["seed"]): r["train_seconds"] for r in results},
                         "train_wall_seconds": round(wall, 1), "steps": cfg.max_steps, "gif": str(gif),
                         "algorithm": args.algorithm, "config": names[task]}
        markdown += lines + [""]
    summary["total_seconds"] = round(time.time() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text("\n".join(markdown))
    print(f"\ntotal {summary['total_seconds'] / 60:.1f} min; tables in {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    from .cli import run_reporting

    raise SystemExit(run_reporting("dancegrpo.demo_video", main))
