"""Communication and memory per rank of a training step: DDP vs FSDP2, and Ulysses sequence
parallelism, on CPU with gloo (docs/distributed_scaling.md).

    python bench/dist_scaling.py [--out bench/results/dist_scaling-cpu-gloo.json]

1. Measured on 2 gloo ranks with a small VideoDiT ("small" preset): every collective of one
   forward + backward + AdamW step is counted at the dispatcher (a TorchDispatchMode sees the
   c10d ops of DDP's reducer, of FSDP2 and of our all-to-all) with the bytes of its logical
   tensor; the per-rank memory of parameters + gradients + optimizer state is summed from the
   tensors each rank holds. Both are compared with the formulas below.
2. The ``wan-1.3b`` preset (1.4B parameters) is too large for two CPU processes here, so it is
   built on the meta device: its exact parameter shapes give the formulas' numbers, and
   FSDP2 ``fully_shard`` is applied to the meta model on the 2 gloo ranks to read the shard
   each rank would hold (meta tensors: shapes only, no memory).

Formulas (P parameters, N ranks, fp32 master weights and AdamW, bf16 compute for FSDP):
    DDP   all-reduce 4P bytes (fp32 grads)                  memory 16P (4 param + 4 grad + 8 Adam)
    FSDP  all-gather 2P (forward) + 2P (backward, resharded) + reduce-scatter 4P (fp32)
          memory 16P / N + the unsharded bf16 blocks in flight
    SP (degree k, n tokens, hidden h, per self-attention, per rank, activation bytes e):
          forward 4 all-to-alls of B (n/k) h e bytes (q, k, v; output), backward 4 more.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# c10d op -> which argument holds the logical tensor (the whole thing reduced or gathered)
_OPS = {"allreduce_": "all_reduce", "_allgather_base_": "all_gather", "allgather_": "all_gather",
        "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
        "alltoall_base_": "all_to_all", "broadcast_": "broadcast"}


def _bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_bytes(t) for t in x)
    return 0


def comm_counter():
    """A dispatch mode that adds up, per kind of collective, the bytes of its logical tensor:
    all-reduce and all-to-all their input, all-gather its output, reduce-scatter its input."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes: dict[str, int] = {}
            self.calls: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name
            if name.startswith("c10d::"):
                kind = _OPS.get(name.split("::")[1])
                if kind is not None:
                    # allgather*: output first; the others: the (input) tensor(s) first
                    arg = args[0] if kind != "reduce_scatter" else args[1]
                    self.bytes[kind] = self.bytes.get(kind, 0) + _bytes(arg)
                    self.calls[kind] = self.calls.get(kind, 0) + 1
            return func(*args, **(kwargs or {}))

    return Counter()


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def _state_bytes(model, opt) -> dict:
    params = sum(_bytes(_local(p)) for p in model.parameters())
    grads = sum(_bytes(_local(p.grad)) for p in model.parameters() if p.grad is not None)
    state = sum(_bytes(_local(v)) for s in opt.state.values() for v in s.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"params": params, "grads": grads, "optimizer": state, "total": params + grads + state}


def _small_inputs(cfg, tokens_hw=(2, 8, 8), b=1):
    g = torch.Generator().manual_seed(0)
    t, h, w = tokens_hw
    pt, ph, pw = cfg.patch_size
    x = torch.randn(b, cfg.in_channels, t * pt, h * ph, w * pw, generator=g)
    text = torch.randn(b, 8, cfg.text_dim, generator=g)
    return x, torch.full((b,), 500.0), text


def _step(model, opt, cfg, counter, tokens_hw=(2, 8, 8)):
    x, ts, text = _small_inputs(cfg, tokens_hw)
    with counter:
        out = model(x, ts, text)
        out.float().square().mean().backward()
        opt.step()
    return out


def _build_small():
    from dancegrpo.models.config import DiTConfig
    from dancegrpo.models.dit import VideoDiT

    torch.manual_seed(0)
    cfg = DiTConfig.preset("small", in_channels=4, patch_size=(1, 2, 2), attention_backend="sdpa")
    return cfg, VideoDiT(cfg).train()


def _rank_ddp(rank, world):
    from torch.nn.parallel import DistributedDataParallel as DDP

    cfg, model = _build_small()
    n_params = sum(p.numel() for p in model.parameters())
    ddp = DDP(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    counter = comm_counter()
    _step(ddp, opt, cfg, counter)
    return {"params": n_params, "comm": counter.bytes, "calls": counter.calls, "memory": _state_bytes(model, opt)}


def _rank_fsdp(rank, world):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cfg, model = _build_small()
    n_params = sum(p.numel() for p in model.parameters())
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    counter = comm_counter()
    _step(model, opt, cfg, counter)
    block_params = sum(p.numel() for p in _build_small()[1].blocks.parameters())
    return {"params": n_params, "block_params": block_params, "comm": counter.bytes, "calls": counter.calls,
            "memory": _state_bytes(model, opt)}


def _rank_sp(rank, world, tokens_hw, joint):
    from dancegrpo.models.config import DiTConfig
    from dancegrpo.models.dit import VideoDiT

    torch.manual_seed(0)
    cfg = DiTConfig.preset("small", in_channels=4, patch_size=(1, 2, 2), attention_backend="sdpa",
                           joint_attention=joint)
    model = VideoDiT(cfg).train()
    model.set_sequence_parallel(torch.distributed.group.WORLD)
    counter = comm_counter()
    x, ts, text = _small_inputs(cfg, tokens_hw)
    with counter:
        model(x, ts, text).square().mean().backward()
    return {"comm": counter.bytes, "calls": counter.calls, "hidden": cfg.hidden_size, "depth": cfg.depth,
            "text_tokens": text.shape[1]}


def _rank_wan_meta(rank, world):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from dancegrpo.models.config import DiTConfig
    from dancegrpo.models.dit import VideoDiT

    with torch.device("meta"):
        model = VideoDiT(DiTConfig.preset("wan-1.3b"))
    shapes = [tuple(p.shape) for p in model.parameters()]
    block = [tuple(p.shape) for p in model.blocks[0].parameters()]
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for b in model.blocks:
        fully_shard(b, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    local = sum(_local(p).numel() for p in model.parameters())
    return {"shapes": shapes, "block_shapes": block, "fsdp_local_params": local}


def shard_numel(shapes, n: int) -> int:
    """The largest per-rank share under FSDP2's dim-0 sharding (chunks of ceil(dim0 / n) rows)."""
    return sum(math.ceil(s[0] / n) * math.prod(s[1:]) if s else (1 if n else 0) for s in shapes)


def ring_wire(kind: str, nbytes: float, n: int) -> float:
    """Bytes each rank sends for a collective over n ranks (ring / pairwise algorithms)."""
    f = (n - 1) / n
    return {"all_reduce": 2 * f, "all_gather": f, "reduce_scatter": f, "all_to_all": f}[kind] * nbytes


def scaling_model(p: int, shapes, block_shapes, gpus=(8, 64)) -> dict:
    """Per-rank memory (GB) and sent bytes (GB) per optimizer step, DDP vs FSDP, for P params."""
    gb = 1e9
    block = sum(math.prod(s) for s in block_shapes)
    out = {}
    for n in gpus:
        shard = shard_numel(shapes, n)
        out[n] = {
            "ddp": {"memory_gb": 16 * p / gb, "payload_gb": {"all_reduce": 4 * p / gb},
                    "sent_per_rank_gb": ring_wire("all_reduce", 4 * p, n) / gb},
            "fsdp": {"memory_gb": 16 * shard / gb,
                     "unsharded_blocks_in_flight_gb": 2 * 2 * block / gb,  # current + prefetched, bf16
                     "payload_gb": {"all_gather": 4 * p / gb, "reduce_scatter": 4 * p / gb},
                     "sent_per_rank_gb": (ring_wire("all_gather", 4 * p, n) + ring_wire("reduce_scatter", 4 * p, n)) / gb},
        }
    return out


def sp_model(hidden: int, depth: int, tokens: int, ks=(1, 2, 4, 8), batch: int = 1, elem: int = 2) -> dict:
    """Ulysses all-to-all bytes per rank for one forward + backward of a cross-attention DiT."""
    out = {}
    for k in ks:
        local = math.ceil(tokens / k)
        per_a2a = batch * local * hidden * elem
        per_layer = 8 * per_a2a  # q, k, v, output; forward and backward
        out[k] = {"tokens_per_rank": local, "a2a_payload_per_layer_mb": per_layer / 1e6,
                  "sent_per_rank_per_step_gb": ring_wire("all_to_all", per_layer * depth, k) / 1e9}
    return out


def main(argv=None):
    from tests.distributed_utils import run_ranks

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "dist_scaling-cpu-gloo.json"))
    args = ap.parse_args(argv)

    res = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__, "backend": "gloo",
           "ranks": 2}
    ddp = run_ranks(_rank_ddp, 2)[0]
    fsdp = run_ranks(_rank_fsdp, 2)
    p = ddp["params"]
    res["small_measured"] = {
        "params": p,
        "ddp": {"comm_bytes": ddp["comm"], "calls": ddp["calls"], "memory_bytes": ddp["memory"],
                "predicted": {"all_reduce": 4 * p, "memory": 16 * p}},
        "fsdp": {"comm_bytes": fsdp[0]["comm"], "calls": fsdp[0]["calls"],
                 "memory_bytes_per_rank": [r["memory"] for r in fsdp],
                 "predicted": {"all_gather": 2 * p + 2 * fsdp[0]["block_params"], "reduce_scatter": 4 * p,
                               "memory_sum_over_ranks": 16 * p},
                 "note": "the root module (embeddings, final layer) stays unsharded between forward and "
                         "backward, so only the blocks are gathered twice"},
    }
    sp = {}
    for joint in (False, True):
        r = run_ranks(_rank_sp, 2, (2, 8, 8), joint)[0]
        n, h, depth = 128, r["hidden"], r["depth"]
        pred = 8 * depth * (n // 2) * h * 4  # fp32 activations in this measurement
        sp["joint" if joint else "cross"] = {"tokens": n, "comm_bytes": r["comm"], "calls": r["calls"],
                                            "predicted_all_to_all": pred}
    res["small_sequence_parallel_measured"] = sp

    wan = run_ranks(_rank_wan_meta, 2)
    shapes = wan[0]["shapes"]
    pw = sum(math.prod(s) for s in shapes)
    res["wan_1_3b"] = {
        "params": pw,
        "fsdp2_local_params_per_rank_2_ranks_meta": [r["fsdp_local_params"] for r in wan],
        "predicted_local_params_2_ranks": shard_numel(shapes, 2),
        "scaling": scaling_model(pw, shapes, wan[0]["block_shapes"], gpus=(2, 8, 64)),
        # Wan 2.1 at 480x832, 81 frames: latent 21 x 60 x 104, patch 1x2x2 -> 21 x 30 x 52 tokens
        "sequence_parallel_480x832x81": sp_model(1536, 30, 21 * 30 * 52),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
