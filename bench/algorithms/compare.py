"""Training algorithms compared on equal compute, on the shapes world (CPU).

For each config (a shipped name or a YAML path) and seed, the policy trains from the shipped
base model until its cumulative model calls (NFE: rollout and training forwards, per sample)
reach the budget; each time they cross one of ``--eval-points`` equally spaced NFE marks (and
before the first step) it is evaluated on the
same held-out prompts with the same deterministic sampler (Euler ODE, the shapes_t2i sampler),
so every algorithm is measured by one yardstick: held-out reward (the trained alignment reward
on prompts never trained on), held-out correctness (the shapes evaluator: colour and shape both
right) and a held-out reward not trained on (position and size alignment). Evaluation costs
no budget and no wall-clock.

    python bench/algorithms/compare.py                      # the default list, 2 seeds
    python bench/algorithms/compare.py --configs shapes_t2i shapes_t2i_mixgrpo --seeds 0 --budget 20000

Writes ``results.json`` (every curve point), ``results.md`` (final values, mean +- std over
seeds) and ``results.png`` (held-out reward and correctness against NFE and wall-clock) into
``--out`` (default: this folder). A config name that is not shipped is skipped with a message.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: CPU seconds then measure work, also on a shared machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT = {  # label -> config
    "dance": "shapes_t2i",
    "flowgrpo": "shapes_t2i_flowgrpo",
    "flowgrpo_fast": "shapes_t2i_flowgrpo_fast",
    "mixgrpo": "shapes_t2i_mixgrpo",
    "mixgrpo_flash": "shapes_t2i_mixgrpo_flash",
    "branchgrpo": "shapes_t2i_branchgrpo",
    "nft": "shapes_t2i_nft",
}
# The same scaled-down rollout for every algorithm, so one run fits the CPU budget.
SMALL = ["rollout.prompts_per_step=4", "rollout.group_size=8", "optim.train_batch_size=8",
         "optim.gradient_accumulation_steps=2", "log.num_sample_prompts=0", "log.sample_every=0",
         "log.tensorboard=false", "log.progress=false", "checkpoint_every=0", "device=cpu", "eval.every=0"]


def _label(ref: str) -> str:
    for k, v in DEFAULT.items():
        if v == ref:
            return k
    return Path(ref).stem


def _exists(ref: str) -> bool:
    from dancegrpo.trainer.config import shipped_configs

    return Path(ref).is_file() or ref in shipped_configs()


class Yardstick:
    """One evaluation for every algorithm: shapes_t2i's eval split and deterministic sampler."""

    def __init__(self, num_prompts: int):
        from dancegrpo.registry import build_dataset
        from dancegrpo.trainer.config import RewardConfig, load_config
        from dancegrpo.trainer.scoring import build_rewards

        self.cfg = load_config("shapes_t2i", [f"eval.num_prompts={num_prompts}", "device=cpu"])
        d = self.cfg.data
        self.items = build_dataset(d.name, split=d.eval_split, **d.kwargs).fixed(num_prompts)
        self.rewards = build_rewards(self.cfg.rewards + [
            RewardConfig("shapes_alignment", 0.0, {"attributes": ["position", "size"]})])
        self.rewards[-1].name = "position_size"

    def __call__(self, model) -> dict:
        from dancegrpo.trainer.evaluate import evaluate_policy
        from dancegrpo.trainer.policy import build_run_sampler

        e = self.cfg.eval
        out = evaluate_policy(model, build_run_sampler(self.cfg, model), self.items, self.rewards, mode="ode",
                              seed=e.seed, device="cpu", batch_size=64)
        return {"heldout_reward": out["reward_mean"], "heldout_correct": out["correct_rate"],
                "heldout_position_size": out["reward_position_size_mean"]}


def run_one(ref: str, seed: int, budget: int, eval_points: int, max_steps: int, yard: Yardstick, extra) -> dict:
    from dancegrpo.trainer.config import load_config
    from dancegrpo.trainer.loop import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ref, [*SMALL, f"seed={seed}", f"output_dir={tmp}/run", f"max_steps={max_steps}", *extra])
        trainer = Trainer(cfg)
        points = [{"step": 0, "nfe": 0, "wall_s": 0.0, "cpu_s": 0.0, **yard(trainer.model)}]
        nfe, wall, cpu, rewards = 0, 0.0, 0.0, []
        while nfe < budget and trainer.step < max_steps:
            t0, c0 = time.perf_counter(), time.process_time()
            m = trainer.train_step()
            wall += time.perf_counter() - t0
            cpu += time.process_time() - c0
            trainer.step += 1
            if "nfe" not in m:
                raise RuntimeError(f"{ref}: its train_step logs no 'nfe' metric (model calls); it cannot be compared")
            nfe += int(m["nfe"])
            rewards.append(m.get("reward_mean", float("nan")))
            if nfe >= budget * (len(points)) / eval_points or nfe >= budget or trainer.step == max_steps:
                points.append({"step": trainer.step, "nfe": nfe, "wall_s": wall, "cpu_s": cpu, "train_reward": rewards[-1],
                               **yard(trainer.model)})
        return {"config": ref, "seed": seed, "points": points, "steps": trainer.step}


def _mean_std(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def write_table(runs: list[dict], path: Path, meta: dict) -> None:
    by = {}
    for r in runs:
        by.setdefault(_label(r["config"]), []).append(r)
    lines = [f"Budget {meta['budget']} model calls (NFE, per sample, rollout + training forwards) per run, "
             f"{len(meta['seeds'])} seeds ({', '.join(map(str, meta['seeds']))}); held-out: {meta['eval_prompts']} "
             "prompts of the eval split, Euler ODE 16 steps, same noise for every run. mean +- std over seeds.", "",
             "| algorithm | config | steps | NFE | wall-clock s | CPU s | held-out reward | held-out correct | "
             "held-out position/size (not trained) | gain in held-out reward |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    fmt = lambda ms, p=3: f"{ms[0]:.{p}f} +- {ms[1]:.{p}f}"
    for label, rs in by.items():
        last = [r["points"][-1] for r in rs]
        first = [r["points"][0] for r in rs]
        lines.append("| " + " | ".join([
            label, rs[0]["config"], fmt(_mean_std([r["steps"] for r in rs]), 1), fmt(_mean_std([p["nfe"] for p in last]), 0),
            fmt(_mean_std([p["wall_s"] for p in last]), 1), fmt(_mean_std([p["cpu_s"] for p in last]), 1),
            fmt(_mean_std([p["heldout_reward"] for p in last])),
            fmt(_mean_std([p["heldout_correct"] for p in last])), fmt(_mean_std([p["heldout_position_size"] for p in last])),
            fmt(_mean_std([b["heldout_reward"] - a["heldout_reward"] for a, b in zip(first, last)]))]) + " |")
    lines += ["", "Wall-clock and CPU seconds count training only (rollouts, rewards, updates), not the held-out "
              "evaluations. CPU seconds (the process's, all threads) are the steadier measure on a shared machine.",
              "", f"Machine: {meta['machine']}, {meta['cpus']} CPUs, load average {meta['load']} at the start; torch "
              f"{meta['torch']}; {meta['threads']} threads; total {meta['total_s']:.0f} s. Made by "
              f"`python bench/algorithms/compare.py {meta['argv']}`."]
    path.write_text("\n".join(lines) + "\n")


def write_plot(runs: list[dict], path: Path) -> None:
    from PIL import Image, ImageDraw

    panels = [("nfe", "heldout_reward"), ("cpu_s", "heldout_reward"), ("nfe", "heldout_correct"),
              ("cpu_s", "heldout_correct")]
    colours = [(200, 30, 30), (30, 90, 200), (20, 140, 60), (230, 130, 0), (130, 40, 170), (0, 150, 170),
               (120, 120, 120), (0, 0, 0)]
    labels = sorted({_label(r["config"]) for r in runs}, key=lambda s: list(DEFAULT).index(s) if s in DEFAULT else 99)
    pw, ph, pad = 460, 300, 50
    img = Image.new("RGB", (2 * pw, 2 * ph + 40), "white")
    d = ImageDraw.Draw(img)
    for k, label in enumerate(labels):
        d.text((10 + 120 * k, 2 * ph + 14), label, fill=colours[k % len(colours)])
    for n, (xk, yk) in enumerate(panels):
        ox, oy = (n % 2) * pw, (n // 2) * ph
        pts = [(p[xk], p[yk]) for r in runs for p in r["points"] if math.isfinite(p[yk])]
        if not pts:
            continue
        x0, x1 = 0.0, max(p[0] for p in pts) or 1.0
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
        y1 = y1 if y1 > y0 else y0 + 1e-3
        px = lambda x: ox + pad + (x - x0) / (x1 - x0) * (pw - pad - 15)
        py = lambda y: oy + ph - 35 - (y - y0) / (y1 - y0) * (ph - 65)
        d.rectangle([ox + pad, oy + 30, ox + pw - 15, oy + ph - 35], outline="black")
        d.text((ox + pad, oy + 10), f"{yk} vs {xk} (mean over seeds)", fill="black")
        d.text((ox + 2, py(y1) - 6), f"{y1:.3g}", fill="black")
        d.text((ox + 2, py(y0) - 6), f"{y0:.3g}", fill="black")
        d.text((ox + pw - 70, oy + ph - 30), f"{x1:.3g}", fill="black")
        for k, label in enumerate(labels):
            rs = [r for r in runs if _label(r["config"]) == label]
            length = min(len(r["points"]) for r in rs)
            mean = [(sum(r["points"][i][xk] for r in rs) / len(rs), sum(r["points"][i][yk] for r in rs) / len(rs))
                    for i in range(length)]
            line = [(px(x), py(y)) for x, y in mean]
            if len(line) > 1:
                d.line(line, fill=colours[k % len(colours)], width=2)
            for cx, cy in line:
                d.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colours[k % len(colours)])
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(DEFAULT.values()))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--budget", type=int, default=16000, help="model calls (NFE, per sample) per run")
    p.add_argument("--eval-points", type=int, default=4, help="held-out evaluations per run, at equal NFE marks")
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--max-steps", type=int, default=200, help="a cap on steps whatever the NFE")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--override", nargs="*", default=[], help="extra key=value for every run")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    start = time.perf_counter()
    yard = Yardstick(args.eval_prompts)
    runs = []
    for ref in args.configs:
        if not _exists(ref):
            print(f"skipping {ref}: not a shipped config or a file here", flush=True)
            continue
        for seed in args.seeds:
            t0 = time.perf_counter()
            r = run_one(ref, seed, args.budget, args.eval_points, args.max_steps, yard, args.override)
            last = r["points"][-1]
            print(f"{_label(ref)} seed {seed}: {r['steps']} steps, NFE {last['nfe']}, train {last['wall_s']:.1f} s "
                  f"({last['cpu_s']:.1f} CPU s), "
                  f"held-out reward {last['heldout_reward']:.3f} correct {last['heldout_correct']:.3f} "
                  f"({time.perf_counter() - t0:.0f} s with evaluation)", flush=True)
            runs.append(r)
    if not runs:
        print("nothing to compare", file=sys.stderr)
        return 1
    meta = {"budget": args.budget, "seeds": args.seeds, "eval_prompts": args.eval_prompts,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "load": load,
            "threads": args.threads, "total_s": time.perf_counter() - start,
            "argv": " ".join(sys.argv[1:] if argv is None else argv)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "small_overrides": SMALL, "runs": runs}, indent=1))
    write_table(runs, args.out / "results.md", meta)
    write_plot(runs, args.out / "results.png")
    print(f"wrote {args.out / 'results.md'}, results.json, results.png ({meta['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
