"""The training configuration: nested dataclasses, loaded from YAML, overridden from the command line.

``load_config("toy", ["max_steps=10", "optim.lr=3e-4"])`` reads a config (a YAML file, or the
name of a config shipped in ``dancegrpo/configs``), applies each ``a.b=value`` override (values
parsed as YAML, then checked against the field's type), builds the dataclasses (an unknown key
is an error naming the key and the close matches) and validates the values. ``save_config``
writes it back; loading that file gives an equal config. Defaults follow DanceGRPO's FLUX
setup (docs/math.md gives the sources); the shipped configs set the rest.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..errors import ConfigError, MissingFileError

__all__ = ["TrainConfig", "ModelConfig", "DataConfig", "RewardConfig", "SamplerConfig", "RolloutConfig",
           "AdvantageConfig", "TimestepConfig", "OptimConfig", "LossConfig", "LoraConfig", "LogConfig",
           "EvalConfig", "DistributedConfig", "NFTConfig", "ConfigError", "load_config", "save_config", "config_from_dict", "config_to_dict",
           "apply_overrides", "find_config", "shipped_configs"]


@dataclass
class ModelConfig:
    name: str = "toy"              # dancegrpo.registry.MODELS name: toy, shapes
    kwargs: dict = field(default_factory=dict)  # passed to the model builder (task, pretrained, ...)


@dataclass
class DataConfig:
    name: str = "toy"              # dancegrpo.registry.DATASETS name: toy, shapes, prompt_file
    kwargs: dict = field(default_factory=dict)  # passed to the dataset (task, size, frames...)
    train_split: str = "train"
    eval_split: str = "heldout"


@dataclass
class RewardConfig:
    name: str = "toy"              # dancegrpo.registry.REWARDS name
    weight: float = 1.0            # w_k in A = sum_k w_k A_k
    kwargs: dict = field(default_factory=dict)


@dataclass
class SamplerConfig:
    kind: str = "auto"             # auto (from model.prediction) | flow | ddim | scheduler (the model's own)
    num_steps: int = 16
    eta: float = 0.3               # DanceGRPO g (flow), DDIM eta
    shift: float = 1.0             # flow schedule shift: 3 FLUX/Wan, 5 HunyuanVideo, 7 SkyReels
    variant: str = "dance"         # flow: dance | flow_grpo | cps
    num_train_timesteps: int = 1000  # ddim: training schedule (when the model has no alphas_cumprod)
    beta_start: float = 0.00085
    beta_end: float = 0.012
    steps_offset: int = 1
    solver: str = "euler"          # flow: the ODE steps after the last SDE step: euler | dpmpp_2m (MixGRPO-Flash)
    post_compress: float = 1.0     # flow: fraction of those steps kept (MixGRPO-Flash: 0.4; 1 keeps all)


@dataclass
class TreeConfig:
    """BranchGRPO tree rollouts (trainer/tree_rollout.py, docs/algorithms_branchgrpo.md)."""
    branch_steps: list[int] = field(default_factory=lambda: [0, 3, 6])  # sampler steps where nodes branch
    branch_factor: int = 2         # children per branch; branch_factor ** len(branch_steps) = group_size
    noise_scale: float = 1.0       # std multiplier of the branch steps' noise (4.0 in BranchGRPO's script)
    fusion: str = "mean"           # node reward from its leaves: mean | prob (softmax of child log-probs)
    prune_steps: list[int] = field(default_factory=list)  # depth pruning: steps whose edges are not trained
    prune_slide_every: int = 0     # > 0: the pruned window moves one step earlier every that many iterations
    prune_stop: int | None = None  # the window's first step never goes below this (default: last branch + 1)
    width_keep: int = 0            # > 0: below the last branch train only each tree's k best and k worst leaves


@dataclass
class RolloutConfig:
    prompts_per_step: int = 1      # P prompts per iteration
    group_size: int = 12           # G samples per prompt (12 FLUX, 24 HunyuanVideo, 16 SD, 8 SkyReels)
    share_noise: bool = True       # same initial noise within a group (DanceGRPO)
    batch_size: int = 0            # rollout forward chunk; 0 = all P*G at once
    store_on_cpu: bool = False     # keep trajectories in host memory (saves accelerator memory)
    decode: str = "x0"             # x0 (DanceGRPO: last step's clean prediction) | final
    async_rewards: bool = False    # score chunk k (of batch_size) in a thread while chunk k+1 rolls out
    tree: TreeConfig | None = None  # BranchGRPO: roll the group out as a tree (null: flat rollouts)


@dataclass
class AdvantageConfig:
    std: str = "group"             # group (DanceGRPO) | global (Flow-GRPO) | none (Dr.GRPO)
    unbiased: bool = True
    eps: float = 1e-8
    clip: float | None = 5.0
    aggregate: str = "advantage"   # advantage | reward (MixGRPO reward aggregation)
    best_of_k: int = 0             # > 0: train on the top k and bottom k of each group only


@dataclass
class TimestepConfig:
    strategy: str = "dance"        # dance (random fraction) | all (Flow-GRPO) | window (MixGRPO) | random_window (Flow-GRPO-Fast)
    fraction: float = 0.6          # tau, for "dance"
    window_size: int = 4           # for "window": SDE steps trained; ODE steps elsewhere
    window_stride: int = 1
    window_shift_every: int = 25   # iterations between window moves (wraps around)
    window_range: list[int] = field(default_factory=list)  # random_window: starts in [lo, hi); empty: [0, N // 2) (Flow-GRPO-Fast)


@dataclass
class OptimConfig:
    lr: float = 1e-5               # 1e-5 full fine-tune, 3e-4 LoRA
    weight_decay: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0     # <= 0 disables clipping (the norm is still logged)
    train_batch_size: int = 1      # samples per training forward
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    ema_decay: float = 0.0         # 0 disables EMA (0.995 in DanceGRPO when used)


@dataclass
class LossConfig:
    clip_range: float = 1e-4
    clip_range_high: float | None = None  # DAPO-style asymmetric upper range
    kl_beta: float = 0.0           # Flow-GRPO: 0.004 - 0.04; DanceGRPO: 0
    backend: str = "auto"          # op backend: auto | torch | native | triton
    ratio_norm: bool = False       # GRPO-Guard: per-step normalised importance ratio (Gaussian log-prob only)


@dataclass
class LoraConfig:
    enabled: bool = False          # needs `pip install peft`
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=list)  # empty: every nn.Linear


@dataclass
class LogConfig:
    sample_every: int = 0          # sample grid of fixed prompts every K steps (0: only at the end)
    num_sample_prompts: int = 8
    tensorboard: bool = True       # when the tensorboard package is installed
    progress: bool = True          # tqdm bar with the live reward


@dataclass
class EvalConfig:
    num_prompts: int = 32          # held-out prompts (the dataset's fixed ones of eval_split)
    samples_per_prompt: int = 1
    batch_size: int = 32
    mode: str = "ode"              # ode (deterministic) | sde (the training sampler)
    seed: int = 1234
    every: int = 0                 # held-out evaluation every K steps during training (0: never)
    heldout_rewards: list[RewardConfig] = field(default_factory=list)  # scored there, never trained on


@dataclass
class DistributedConfig:
    """Used when the run is launched by torchrun (docs/distributed.md); ignored by one process."""
    strategy: str = "ddp"          # ddp (replicated weights) | fsdp (FSDP2: weights, grads, optimizer sharded)
    sequence_parallel: int = 1     # ranks that split one sample's tokens (Ulysses attention)
    backend: str = "auto"          # auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    timeout_s: float = 600.0       # a collective waiting longer than this ends the run with an error
    reference: str = "shard"       # KL reference copy under fsdp: shard (like the policy) | cpu


@dataclass
class NFTConfig:
    """DiffusionNFT (``algorithm: nft``; docs/algorithms_nft.md). Defaults: the paper's SD3.5 setup."""
    beta: float = 1.0              # implicit policies (1 - beta) v_old + beta v, (1 + beta) v_old - beta v
    adv_clip: float = 5.0          # r = 1/2 + 1/2 clip(A / adv_clip, -1, 1); the loss is scaled by it
    weighting: str = "adaptive"    # adaptive (x0 error / its mean |.|) | none (velocity MSE)
    timestep_fraction: float = 0.99  # share of the sampler's noise levels trained per sample
    decay_start: int = 0           # old <- d old + (1 - d) theta, d = min(rate (updates - start), max)
    decay_rate: float = 0.001
    decay_max: float = 0.5
    deterministic_rollout: bool = True  # ODE sampler for data collection (else the SDE of sampler.*)
    rollout_policy: str = "old"    # old (the paper) | current


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 200           # iterations: one rollout and its updates each
    output_dir: str = "runs/default"
    checkpoint_every: int = 50     # 0: only at the end
    keep_checkpoints: int = 2      # newest complete checkpoints kept (0: keep all)
    resume: bool = False           # continue from the newest complete checkpoint in output_dir
    overwrite: bool = False        # start afresh in an output_dir holding a run, deleting that run
    max_invalid_steps: int = 3     # stop after this many steps in a row with no valid sample (0: never)
    device: str = "auto"           # auto | cpu | cuda | cuda:N
    mixed_precision: str = "no"    # no | bf16 (autocast the network; log-probs stay fp32)
    update_mode: str = "train"     # module mode of the training forward (rollouts run in eval)
    ratio_tolerance: float = 1e-3  # |mean ratio - 1| allowed at the first update after a rollout
    algorithm: str = "grpo"        # grpo (clipped-ratio policy gradient) | nft (DiffusionNFT)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig()])
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    nft: NFTConfig = field(default_factory=NFTConfig)

    def validate(self) -> TrainConfig:
        """Check values (types are checked on load). Raises ConfigError naming the key."""
        _validate(self)
        return self


# --------------------------------------------------------------------------- dict <-> dataclass


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """``value`` checked against (and lightly converted to) the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _from_dict(tp, value, key)
    if origin is list:
        (item,) = typing.get_args(tp) or (typing.Any,)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}.{i}") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is typing.Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in hints:
            close = difflib.get_close_matches(str(k), names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {key!r}{hint}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def config_from_dict(data: dict) -> TrainConfig:
    """A TrainConfig from a plain dict (missing keys take their defaults); not validated."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(data).__name__}")
    return _from_dict(TrainConfig, data)


def config_to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- overrides


def _parse_value(text: str):
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides) -> dict:
    """Apply ``a.b=value`` strings to the nested dict ``data`` (in place; returns it).

    Values are YAML (``true``, ``3``, ``[a, b]``, ``{k: v}``, ``null``). A numeric segment
    indexes a list (``rewards.0.weight=2``). Unknown keys are caught when the dict is turned
    into dataclasses, with the full dotted key in the message.
    """
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override must look like key=value (e.g. optim.lr=3e-4), got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key segment")
        parts = key.split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            path = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                node = node[_list_index(part, node, path)]
            else:
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
                if not isinstance(child, (dict, list)):
                    raise ConfigError(f"override {item!r}: {path!r} is a value, not a section")
                node = child
        last = parts[-1]
        if isinstance(node, list):
            node[_list_index(last, node, key)] = _parse_value(text)
        else:
            node[last] = _parse_value(text)
    return data


def _list_index(part: str, node: list, path: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override key {path!r}: expected a list index in [0, {len(node)})")
    return int(part)


# --------------------------------------------------------------------------- files and shipped configs


def _shipped_dir():
    return resources.files("dancegrpo") / "configs"


def _description(text: str) -> str:
    """A config's one-line description: its first comment line."""
    for line in text.splitlines():
        if line.strip().startswith("#"):
            return line.strip().lstrip("#").strip()
    return ""


def shipped_configs() -> dict[str, str]:
    """The configs shipped with the package: name -> one-line description."""
    files = sorted((f for f in _shipped_dir().iterdir() if f.name.endswith(".yaml")), key=lambda f: f.name)
    return {f.name[: -len(".yaml")]: _description(f.read_text()) for f in files}


def find_config(ref):
    """The config file ``ref`` names: an existing path, else a shipped config's name (``toy``,
    ``shapes_t2i``; ``.yaml`` optional). A path wins over a shipped name."""
    p = Path(ref)
    if p.is_file():
        return p
    if p.exists():
        raise ConfigError(f"config {str(ref)!r} is a directory, not a YAML file (a run's output_dir or checkpoint "
                          "goes to --checkpoint)")
    names = shipped_configs()
    stem = p.name[: -len(".yaml")] if p.name.endswith(".yaml") else p.name
    if len(p.parts) == 1 and stem in names:
        return _shipped_dir() / f"{stem}.yaml"
    listing = f"shipped configs: {', '.join(names)} (see `dancegrpo configs`)"
    if len(p.parts) > 1 or p.suffix:
        hint = f" (for the shipped config of that name, pass {stem})" if stem in names else ""
        raise MissingFileError(f"config file {str(ref)!r} does not exist{hint}; {listing}")
    close = difflib.get_close_matches(stem, list(names), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise MissingFileError(f"config {str(ref)!r} is neither a file nor a shipped config{hint}; {listing}")


def _read_yaml(source, text: str):
    """Parsed YAML; a syntax error names the file, line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(source)
        what = "; ".join(x for x in (getattr(exc, "context", None), getattr(exc, "problem", None)) if x)
        raise ConfigError(f"{where}: invalid YAML: {what or str(exc).splitlines()[0]}") from None


def load_config(path=None, overrides=()) -> TrainConfig:
    """Read a YAML config (a path or a shipped config's name; the defaults when ``path`` is
    None), apply overrides, build and validate it."""
    data = {}
    if path is not None:
        p = find_config(path)
        data = _read_yaml(p, p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: a config must be a mapping at the top level")
    if overrides:
        # Overrides act on the full config (defaults under the file), so `rewards.0.weight=2`
        # works when the file leaves the rewards out; unknown keys still fail in from_dict.
        data = apply_overrides(_deep_merge(config_to_dict(TrainConfig()), data), overrides)
    return config_from_dict(data).validate()


def _deep_merge(base: dict, top: dict) -> dict:
    for k, v in top.items():
        base[k] = _deep_merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return base


def save_config(cfg: TrainConfig, path) -> None:
    """Write ``cfg`` as YAML (every key, so the file alone reproduces the run)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------- value checks


def _validate(cfg: TrainConfig) -> None:
    def need(ok: bool, key: str, expected: str, value):
        if not ok:
            raise ConfigError(f"{key} must be {expected}, got {value!r}")

    def pos_int(key, v, minimum=1):
        need(v >= minimum, key, f">= {minimum}", v)

    def choice(key, v, allowed):
        need(v in allowed, key, f"one of {allowed}", v)

    def finite(key, v, lo=None, hi=None, lo_open=False):
        ok = math.isfinite(v) and (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or v <= hi)
        rng = f"finite{'' if lo is None else (' > ' if lo_open else ' >= ') + str(lo)}{'' if hi is None else ' and <= ' + str(hi)}"
        need(ok, key, rng, v)

    pos_int("max_steps", cfg.max_steps, 0)
    pos_int("checkpoint_every", cfg.checkpoint_every, 0)
    pos_int("keep_checkpoints", cfg.keep_checkpoints, 0)
    pos_int("max_invalid_steps", cfg.max_invalid_steps, 0)
    need(not (cfg.resume and cfg.overwrite), "overwrite", "false when resume=true (continue the run, or replace it)",
         cfg.overwrite)
    need(bool(cfg.output_dir), "output_dir", "a non-empty path", cfg.output_dir)
    need(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda") or cfg.device == "mps",
         "device", "auto, cpu, cuda or cuda:N", cfg.device)
    choice("mixed_precision", cfg.mixed_precision, ("no", "bf16"))
    choice("update_mode", cfg.update_mode, ("train", "eval"))
    finite("ratio_tolerance", cfg.ratio_tolerance, 0, lo_open=True)
    need(len(cfg.rewards) >= 1, "rewards", "a list of at least one reward", cfg.rewards)
    for i, r in enumerate(cfg.rewards):
        need(bool(r.name), f"rewards.{i}.name", "a reward name", r.name)
        finite(f"rewards.{i}.weight", r.weight)
    s = cfg.sampler
    choice("sampler.kind", s.kind, ("auto", "flow", "ddim", "scheduler"))
    pos_int("sampler.num_steps", s.num_steps, 2)
    finite("sampler.eta", s.eta, 0, lo_open=True)
    finite("sampler.shift", s.shift, 0, lo_open=True)
    choice("sampler.variant", s.variant, ("dance", "flow_grpo", "cps"))
    choice("sampler.solver", s.solver, ("euler", "dpmpp_2m"))
    finite("sampler.post_compress", s.post_compress, 0, 1, lo_open=True)
    r = cfg.rollout
    pos_int("rollout.prompts_per_step", r.prompts_per_step)
    pos_int("rollout.group_size", r.group_size, 2)
    pos_int("rollout.batch_size", r.batch_size, 0)
    choice("rollout.decode", r.decode, ("x0", "final"))
    need(isinstance(r.async_rewards, bool), "rollout.async_rewards", "true or false", r.async_rewards)
    need(not r.async_rewards or r.batch_size > 0, "rollout.async_rewards",
         "rollout.batch_size > 0 with it (the chunk scored while the next one rolls out)", r.batch_size)
    need(not r.async_rewards or (s.solver == "euler" and s.post_compress == 1 and not cfg.loss.ratio_norm),
         "rollout.async_rewards", "false with sampler.solver=dpmpp_2m, sampler.post_compress < 1 or "
         "loss.ratio_norm=true (the chunked rollout does not support them yet)", r.async_rewards)
    a = cfg.advantage
    choice("advantage.std", a.std, ("group", "global", "none"))
    choice("advantage.aggregate", a.aggregate, ("advantage", "reward"))
    finite("advantage.eps", a.eps, 0)
    if a.clip is not None:
        finite("advantage.clip", a.clip, 0, lo_open=True)
    pos_int("advantage.best_of_k", a.best_of_k, 0)
    need(2 * a.best_of_k <= r.group_size, "advantage.best_of_k", f"<= group_size / 2 = {r.group_size // 2}",
         a.best_of_k)
    if r.tree is not None:
        _validate_tree(r.tree, r.group_size, s.num_steps, a.best_of_k, need)
        need(not r.async_rewards, "rollout.async_rewards", "false with rollout.tree (a tree is scored whole)",
             r.async_rewards)
    t = cfg.timesteps
    choice("timesteps.strategy", t.strategy, ("dance", "all", "window", "random_window"))
    finite("timesteps.fraction", t.fraction, 0, 1, lo_open=True)
    pos_int("timesteps.window_size", t.window_size)
    pos_int("timesteps.window_stride", t.window_stride, 0)
    pos_int("timesteps.window_shift_every", t.window_shift_every)
    if t.window_range:
        need(len(t.window_range) == 2 and 0 <= t.window_range[0] < t.window_range[1] <= s.num_steps - t.window_size,
             "timesteps.window_range", f"[lo, hi] with 0 <= lo < hi <= sampler.num_steps - window_size = "
             f"{s.num_steps - t.window_size}", t.window_range)
    if t.strategy in ("window", "random_window"):
        need(t.window_size < s.num_steps, "timesteps.window_size", f"< sampler.num_steps = {s.num_steps}",
             t.window_size)
    o = cfg.optim
    finite("optim.lr", o.lr, 0, lo_open=True)
    finite("optim.weight_decay", o.weight_decay, 0)
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", "two values in [0, 1)", o.betas)
    finite("optim.adam_eps", o.adam_eps, 0, lo_open=True)
    finite("optim.max_grad_norm", o.max_grad_norm)
    pos_int("optim.train_batch_size", o.train_batch_size)
    pos_int("optim.gradient_accumulation_steps", o.gradient_accumulation_steps)
    finite("optim.ema_decay", o.ema_decay, 0, 1)
    need(o.ema_decay < 1, "optim.ema_decay", "< 1 (0 disables EMA)", o.ema_decay)
    lo = cfg.loss
    finite("loss.clip_range", lo.clip_range, 0, 1)
    need(lo.clip_range < 1, "loss.clip_range", "< 1", lo.clip_range)
    if lo.clip_range_high is not None:
        finite("loss.clip_range_high", lo.clip_range_high, 0)
    finite("loss.kl_beta", lo.kl_beta, 0)
    choice("loss.backend", lo.backend, ("auto", "torch", "native", "triton"))
    lr_ = cfg.lora
    pos_int("lora.rank", lr_.rank)
    finite("lora.alpha", lr_.alpha, 0, lo_open=True)
    finite("lora.dropout", lr_.dropout, 0, 1)
    pos_int("log.sample_every", cfg.log.sample_every, 0)
    pos_int("log.num_sample_prompts", cfg.log.num_sample_prompts, 0)
    e = cfg.eval
    pos_int("eval.num_prompts", e.num_prompts)
    pos_int("eval.samples_per_prompt", e.samples_per_prompt)
    pos_int("eval.batch_size", e.batch_size)
    choice("eval.mode", e.mode, ("ode", "sde"))
    pos_int("eval.every", e.every, 0)
    for i, r in enumerate(e.heldout_rewards):
        need(bool(r.name), f"eval.heldout_rewards.{i}.name", "a reward name", r.name)
        finite(f"eval.heldout_rewards.{i}.weight", r.weight)
    d = cfg.distributed
    choice("distributed.strategy", d.strategy, ("ddp", "fsdp"))
    pos_int("distributed.sequence_parallel", d.sequence_parallel)
    choice("distributed.backend", d.backend, ("auto", "nccl", "gloo"))
    finite("distributed.timeout_s", d.timeout_s, 0, lo_open=True)
    choice("distributed.reference", d.reference, ("shard", "cpu"))

    choice("algorithm", cfg.algorithm, ("grpo", "nft"))
    n = cfg.nft
    finite("nft.beta", n.beta, 0, lo_open=True)
    finite("nft.adv_clip", n.adv_clip, 0, lo_open=True)
    choice("nft.weighting", n.weighting, ("adaptive", "none"))
    finite("nft.timestep_fraction", n.timestep_fraction, 0, 1, lo_open=True)
    pos_int("nft.decay_start", n.decay_start, 0)
    finite("nft.decay_rate", n.decay_rate, 0)
    finite("nft.decay_max", n.decay_max, 0, 1)
    need(n.decay_max < 1, "nft.decay_max", "< 1 (the old policy must follow the policy)", n.decay_max)
    choice("nft.rollout_policy", n.rollout_policy, ("old", "current"))
    if cfg.algorithm == "nft" and n.deterministic_rollout:
        need(not r.share_noise, "rollout.share_noise", "false with algorithm=nft and nft.deterministic_rollout=true "
             "(the ODE sampler from one shared noise gives G identical samples: every advantage would be 0)",
             r.share_noise)


def _validate_tree(tr: TreeConfig, group_size: int, num_steps: int, best_of_k: int, need) -> None:
    steps = tr.branch_steps
    need(len(steps) >= 1 and all(0 <= x < num_steps - 1 for x in steps), "rollout.tree.branch_steps",
         f"a non-empty list of steps in [0, {num_steps - 1}) (sampler.num_steps = {num_steps}; the last step "
         "cannot branch)", steps)
    need(steps == sorted(set(steps)), "rollout.tree.branch_steps", "strictly increasing", steps)
    need(tr.branch_factor >= 2, "rollout.tree.branch_factor", ">= 2", tr.branch_factor)
    leaves = tr.branch_factor ** len(steps)
    need(leaves == group_size, "rollout.tree.branch_factor",
         f"such that branch_factor ** len(branch_steps) = rollout.group_size = {group_size} "
         f"({tr.branch_factor} ** {len(steps)} = {leaves})", tr.branch_factor)
    need(math.isfinite(tr.noise_scale) and tr.noise_scale > 0, "rollout.tree.noise_scale", "finite > 0",
         tr.noise_scale)
    need(tr.fusion in ("mean", "prob"), "rollout.tree.fusion", "one of ('mean', 'prob')", tr.fusion)
    need(all(0 <= x < num_steps for x in tr.prune_steps), "rollout.tree.prune_steps",
         f"steps in [0, {num_steps})", tr.prune_steps)
    need(tr.prune_slide_every >= 0, "rollout.tree.prune_slide_every", ">= 0", tr.prune_slide_every)
    if tr.prune_stop is not None:
        need(0 <= tr.prune_stop < num_steps, "rollout.tree.prune_stop", f"in [0, {num_steps}) or null", tr.prune_stop)
    need(0 <= 2 * tr.width_keep < group_size, "rollout.tree.width_keep",
         f">= 0 and < group_size / 2 = {group_size / 2:g}", tr.width_keep)
    need(best_of_k == 0, "advantage.best_of_k", "0 with rollout.tree (width_keep prunes a tree)", best_of_k)
