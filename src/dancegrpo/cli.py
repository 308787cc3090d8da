"""Command line: ``dancegrpo train | sample | eval | configs | serve-reward``.

    dancegrpo train CONFIG [key=value ...]
    dancegrpo sample (--config CONFIG | --checkpoint PATH) [--prompt TEXT ...] [--num N]
                     [--best-of K --reward NAME] [--out DIR] [key=value ...]
    dancegrpo eval (CONFIG | --checkpoint PATH) [key=value ...]
    dancegrpo configs
    dancegrpo serve-reward NAME [--host 127.0.0.1] [--port 8765] [--device D] [key=value ...]

CONFIG is a YAML file or the name of a shipped config (``dancegrpo configs`` lists them); an
existing file wins over a name. ``eval`` prints ONE JSON object on stdout (reward_mean,
per-reward stats, correct_rate when a reward offers ``correct``); logs go to stderr.

Exit status: 0 done; 2 a mistake the user can fix (a bad config key or value, an unknown
registry name, a missing file or checkpoint, a missing device or optional package, rewards
that left nothing to train on), reported as ONE line ``dancegrpo CMD: error: ...`` naming the
culprit; 130 interrupted (Ctrl-C), with the checkpoint to resume from. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError, UserError

__all__ = ["main"]

log = logging.getLogger("dancegrpo.cli")

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (argparse prints the usage block first)."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dancegrpo", description="GRPO for image and video generators")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("configs", help="list the shipped configs (train them by name)")

    t = sub.add_parser("train", help="train a policy with GRPO")
    t.add_argument("config", help="YAML file or shipped config name (see `dancegrpo configs`)")
    t.add_argument("overrides", nargs="*", default=[], help="key=value overrides, e.g. max_steps=10 optim.lr=3e-4")

    s = sub.add_parser("sample", help="generate with a policy (best-of-K by a reward)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="config (file or shipped name): sample the untrained base model")
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
    s.add_argument("overrides", nargs="*", default=[], help="key=value config overrides")

    e = sub.add_parser("eval", help="reward statistics on held-out prompts, as one JSON object")
    e.add_argument("config", nargs="?", help="config (file or shipped name): evaluate the untrained base model")
    e.add_argument("--checkpoint", help="checkpoint directory or a run's output_dir")
    e.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    e.add_argument("overrides", nargs="*", default=[], help="key=value config overrides")
    r = sub.add_parser("serve-reward", help="serve a registered reward over HTTP (see docs/rewards_service.md)")
    r.add_argument("name", help="reward registry name, e.g. shapes_alignment")
    r.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    r.add_argument("--port", type=int, default=8765)
    r.add_argument("--device", default="cpu", help="device the reward runs on: cpu, cuda, cuda:N")
    r.add_argument("kwargs", nargs="*", default=[], help="key=value arguments of the reward (values are YAML)")
    return p


def _cmd_serve_reward(args) -> int:
    import yaml

    from .rewards.server import serve

    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    kwargs = {}
    for item in args.kwargs:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"reward arguments look like key=value (e.g. threshold=0.5), got {item!r}")
        try:
            kwargs[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            kwargs[key.strip()] = text
    serve(args.name, host=args.host, port=args.port, device=args.device, kwargs=kwargs)
    return 0


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
        if getattr(args, "config", None):
            raise UsageError(f"give a CONFIG or --checkpoint, not both (the checkpoint holds its config; change it "
                             f"with key=value overrides): got {args.config!r} and --checkpoint {args.checkpoint!r}")
        model, cfg = load_trained_policy(args.checkpoint, use_ema=args.ema, overrides=overrides)
        return model, cfg, resolve_device(cfg.device)
    if not args.config:
        raise UsageError("give a CONFIG (file or shipped name) or --checkpoint PATH")
    if args.ema:
        raise UsageError("--ema needs --checkpoint (a base model has no EMA weights)")
    cfg = load_config(args.config, overrides)
    device = resolve_device(cfg.device)
    return build_policy(cfg, device), cfg, device


def _cmd_configs(args) -> int:
    from .trainer.config import shipped_configs

    configs = shipped_configs()
    width = max(map(len, configs), default=0)
    for name, description in configs.items():
        print(f"{name:<{width}}  {description}".rstrip())
    return 0


def _resume_hint(args, cfg) -> str:
    """What to tell a user whose training stopped: the checkpoint to resume from and the command."""
    from .trainer.checkpoint import CheckpointManager

    latest = CheckpointManager(Path(cfg.output_dir) / "checkpoints").latest()
    if latest is None:
        return f"no checkpoint in {cfg.output_dir} yet (checkpoint_every={cfg.checkpoint_every}): nothing to resume"
    keep = [o for o in args.overrides if o.split("=", 1)[0].strip() not in ("resume", "overwrite")]
    command = shlex.join(["dancegrpo", "train", args.config, *keep, "resume=true"])
    return f"resume from {latest} with: {command}"


def _cmd_train(args) -> int:
    from .trainer import Trainer, load_config

    if "=" in args.config and not Path(args.config).exists():
        raise UsageError(f"the first argument is the CONFIG (a YAML file or a shipped name, see `dancegrpo configs`), "
                         f"then key=value overrides; got {args.config!r} first")
    cfg = load_config(args.config, args.overrides)
    try:
        history = Trainer(cfg).train()
    except KeyboardInterrupt:
        print(f"dancegrpo train: interrupted; {_resume_hint(args, cfg)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if history:
        last = history[-1]
        log.info("done: step %d, reward_mean %.4f, outputs in %s", last["step"], last["reward_mean"], cfg.output_dir)
    return 0


def _eval_items(cfg, n: int):
    from .trainer.policy import build_run_dataset

    return build_run_dataset(cfg, cfg.data.eval_split).fixed(n)


def _cmd_eval(args) -> int:
    from .trainer.evaluate import evaluate_config

    overrides = _split_overrides(args)
    model, cfg, device = _policy(args, overrides)
    result = evaluate_config(model, cfg, device=device)
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
            raise UsageError(f"--image: give one image or one per prompt ({len(args.prompt)}), got {len(args.image)}")
        for path in args.image:
            if not Path(path).is_file():
                raise UsageError(f"--image {path!r}: no such file")
        loaded = [torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                  for p in args.image]
        images = loaded * len(args.prompt) if len(loaded) == 1 else loaded
    return [_Prompt(t, im) for t, im in zip(args.prompt, images, strict=True)]


def _cmd_sample(args) -> int:
    from .trainer.evaluate import best_of_n, generate
    from .trainer.images import save_grid
    from .trainer.policy import build_named, build_run_sampler, check_registered
    from .trainer.scoring import WeightedReward

    if args.num < 1 or args.best_of < 1:
        raise UsageError(f"--num and --best-of must be >= 1, got --num {args.num} --best-of {args.best_of}")
    if args.best_of > 1 and not args.reward:
        raise UsageError("--best-of K needs --reward NAME to rank the candidates")
    if args.reward:
        check_registered("reward", args.reward, "--reward")  # before the model loads
    model, cfg, device = _policy(args, args.overrides)
    items = _prompt_items(args, cfg)
    reward = WeightedReward(build_named("reward", args.reward, "--reward"), 1.0, args.reward) if args.reward else None
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
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "serve-reward" and not any(x.startswith("-") for x in extra):
        args.kwargs += extra  # key=value after --port and the like
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    commands = {"train": _cmd_train, "sample": _cmd_sample, "eval": _cmd_eval, "configs": _cmd_configs,
                "serve-reward": _cmd_serve_reward}
    return run_reporting(f"dancegrpo {args.command}", commands[args.command], args)


def run_reporting(prog: str, command, *args) -> int:
    """``command(*args)``'s exit status, with a user error as one line (status 2) and Ctrl-C as
    status 130; other exceptions are bugs and propagate with their traceback."""
    try:
        return command(*args)
    except UserError as exc:
        message = " ".join(str(exc).splitlines())
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:  # train names its checkpoint itself; elsewhere nothing is half-written
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
