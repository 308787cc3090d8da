"""Command line: ``dancegrpo train | sample | eval``.

    dancegrpo train CONFIG [key=value ...]
    dancegrpo sample (--config CONFIG | --checkpoint PATH) [--prompt TEXT ...] [--num N]
                     [--best-of K --reward NAME] [--out DIR] [key=value ...]
    dancegrpo eval (CONFIG | --checkpoint PATH) [key=value ...]

``eval`` prints ONE JSON object on stdout (reward_mean, per-reward stats, correct_rate when a
reward offers ``correct``); logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["main"]

log = logging.getLogger("dancegrpo.cli")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dancegrpo", description="GRPO for image and video generators")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a policy with GRPO")
    t.add_argument("config", help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. max_steps=10 optim.lr=3e-4")

    s = sub.add_parser("sample", help="generate with a policy (best-of-K by a reward)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="config: sample the untrained base model")
    src.add_argument("--checkpoint", help="checkpoint directory or a run's output_dir")
    s.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable; default: the "
                   "eval split's fixed prompts)")
    s.add_argument("--image", action="append", default=None, help="first-frame PNG for image-to-video "
                   "(one for all prompts, or one per prompt)")
    s.add_argument("--num", type=int, default=1, help="samples per prompt")
    s.add_argument("--best-of", type=int, default=1, help="each sample is the best of K candidates")
    s.add_argument("--reward", default=None, help="reward registry name used for best-of and scores")
    s.add_argument("--out", default="samples", help="output directory")
    s.add_argument("--mode", choices=("ode", "sde"), default=None, help="sampler (default: the config's eval.mode)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    s.add_argument("overrides", nargs="*", help="key=value config overrides")

    e = sub.add_parser("eval", help="reward statistics on held-out prompts, as one JSON object")
    e.add_argument("config", nargs="?", help="config: evaluate the untrained base model")
    e.add_argument("--checkpoint", help="checkpoint directory or a run's output_dir")
    e.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    e.add_argument("overrides", nargs="*", help="key=value config overrides")
    return p


def _split_overrides(args) -> list[str]:
    """argparse puts a lone CONFIG-less override in ``config``: keep every key=value together."""
    extra = list(args.overrides)
    if getattr(args, "config", None) and "=" in args.config and not Path(args.config).exists():
        extra.insert(0, args.config)
        args.config = None
    return extra


def _policy(args, overrides):
    """(model, cfg, device) from --config (base model) or --checkpoint (trained)."""
    from .trainer.config import load_config
    from .trainer.policy import build_policy, load_trained_policy, resolve_device

    if args.checkpoint:
        model, cfg = load_trained_policy(args.checkpoint, use_ema=args.ema, overrides=overrides)
        return model, cfg, resolve_device(cfg.device)
    if not args.config:
        raise SystemExit("give a CONFIG or --checkpoint")
    cfg = load_config(args.config, overrides)
    device = resolve_device(cfg.device)
    return build_policy(cfg, device), cfg, device


def _cmd_train(args) -> int:
    from .trainer import load_config, train

    cfg = load_config(args.config, args.overrides)
    history = train(cfg)
    if history:
        last = history[-1]
        log.info("done: step %d, reward_mean %.4f, outputs in %s", last["step"], last["reward_mean"], cfg.output_dir)
    return 0


def _eval_items(cfg, n: int):
    from .registry import build_dataset

    return build_dataset(cfg.data.name, split=cfg.data.eval_split, **cfg.data.kwargs).fixed(n)


def _cmd_eval(args) -> int:
    from .trainer.evaluate import evaluate_policy
    from .trainer.policy import build_run_sampler
    from .trainer.scoring import build_rewards

    overrides = _split_overrides(args)
    model, cfg, device = _policy(args, overrides)
    e = cfg.eval
    result = evaluate_policy(model, build_run_sampler(cfg, model), _eval_items(cfg, e.num_prompts),
                             build_rewards(cfg.rewards), samples_per_prompt=e.samples_per_prompt, mode=e.mode,
                             seed=e.seed, device=device, batch_size=e.batch_size,
                             mixed_precision=cfg.mixed_precision, backend=cfg.loss.backend)
    result["source"] = str(args.checkpoint or args.config)
    print(json.dumps(result))
    return 0


@dataclass(frozen=True)
class _Prompt:
    """A prompt given on the command line (what datasets' items look like: text, image)."""

    text: str
    image: object = None


def _prompt_items(args, cfg):
    import torch

    if not args.prompt:
        return _eval_items(cfg, cfg.eval.num_prompts)
    images = [None] * len(args.prompt)
    if args.image:
        import numpy as np
        from PIL import Image

        if len(args.image) not in (1, len(args.prompt)):
            raise SystemExit(f"--image: give one image or one per prompt ({len(args.prompt)}), got {len(args.image)}")
        loaded = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                  for p in args.image]
        images = loaded * len(args.prompt) if len(loaded) == 1 else loaded
    return [_Prompt(t, im) for t, im in zip(args.prompt, images, strict=True)]


def _cmd_sample(args) -> int:
    from .registry import build_reward
    from .trainer.evaluate import best_of_n, generate
    from .trainer.images import save_grid
    from .trainer.policy import build_run_sampler
    from .trainer.scoring import WeightedReward

    if args.num < 1 or args.best_of < 1:
        raise SystemExit("--num and --best-of must be >= 1")
    if args.best_of > 1 and not args.reward:
        raise SystemExit("--best-of K needs --reward NAME to rank the candidates")
    model, cfg, device = _policy(args, args.overrides)
    items = _prompt_items(args, cfg)
    reward = WeightedReward(build_reward(args.reward), 1.0, args.reward) if args.reward else None
    samples, prompts = generate(model, build_run_sampler(cfg, model), items,
                                samples_per_prompt=args.num * args.best_of, mode=args.mode or cfg.eval.mode,
                                seed=cfg.eval.seed if args.seed is None else args.seed, device=device,
                                batch_size=cfg.eval.batch_size, mixed_precision=cfg.mixed_precision,
                                backend=cfg.loss.backend)
    samples, prompts, scores = best_of_n(samples, prompts, args.best_of, reward)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(samples.shape[0]):
        f = save_grid(samples[i:i + 1], out / f"sample_{i:04d}")
        rec = {"file": f.name, "prompt": prompts[i]}
        if scores is not None:
            rec["score"] = float(scores[i])
        records.append(rec)
    grid = save_grid(samples, out / "grid", columns=args.num)
    (out / "samples.json").write_text(json.dumps(records, indent=1))
    log.info("wrote %d samples and %s to %s", len(records), grid.name, out)
    return 0


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    from .registry import UnknownNameError
    from .trainer.checkpoint import CheckpointError
    from .trainer.config import ConfigError

    try:
        return {"train": _cmd_train, "sample": _cmd_sample, "eval": _cmd_eval}[args.command](args)
    except (ConfigError, FileNotFoundError, CheckpointError, UnknownNameError) as exc:
        # user errors (bad config, missing file or checkpoint, an unknown model/reward/dataset): no traceback
        print(f"dancegrpo {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
