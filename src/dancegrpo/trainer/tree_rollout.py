"""BranchGRPO rollouts: each prompt's G samples grow as a tree that shares its prefixes.

Li et al., "BranchGRPO: Stable and Efficient GRPO with Structured Branching in Diffusion
Models" (arXiv 2509.06040); docs/algorithms_branchgrpo.md gives the scheme in words.

One root latent per prompt is denoised; at each ``branch_steps`` step every live node draws
``branch_factor`` children (independent SDE noise from the same x_i and the same model output),
so the ``branch_factor ** len(branch_steps) = G`` leaves of a group share every step before their
last common branch and those model calls are paid once. Leaves are decoded and scored; each
node's reward is the fusion of its descendants' leaf rewards (their mean, or a softmax over
the children's edge log-probs, applied bottom up), and its advantage is normalised against the
other nodes of its tree at the same depth (``group_advantages`` with one group per tree and
depth). The edge x_i -> x_{i+1} of a node trains with that node's advantage.

Leaves come out in the flat layout (group p holds samples p*G .. p*G+G-1) and the children of a
node are contiguous, so the ancestor of leaf j at depth l is ``j // (G / nodes_per_tree[l])``.

Pruning cuts gradient work only (the rollout is unchanged): depth pruning leaves the edges of
chosen steps out (optionally a window that slides earlier during training); width pruning keeps,
below the last branch, only the edges of each tree's best and worst leaves.

The trained edges go to the ordinary :class:`Updater` as a one-step :class:`Rollout` per edge
(latents (E, 2, ...)), with the per-edge advantages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from ..functional import group_advantages, sample_step
from ..models.interface import Conditioning, select
from .rollout import Rollout, _chunks, autocast_context, encode_items

__all__ = ["TreeRollout", "collect_tree", "fuse_rewards", "tree_advantages", "prune_edges", "training_items",
           "tree_train_step"]


@dataclass
class TreeRollout:
    """A forest of P trees (one per prompt) over N sampler steps.

    levels[l]:  (n_l, *latent_shape) the nodes at depth l (x_l); n_0 = P, n_N = P * G.
    parent[i]:  (n_{i+1},) long, the index in levels[i] of each node of levels[i + 1].
    log_probs[i], a[i], b[i], std[i], timesteps[i]: (n_{i+1},) fp32, the edge into each node
                of depth i + 1 (log-prob NaN and std 0 at ODE steps).
    branch:     (N,) bool, the branch steps.  sde_mask: (N,) bool, the stochastic steps.
    cond:       per tree (P rows). prompts: P * G strings (leaf order). samples: decoded leaves.
    nfe:        model forwards (per sample row) spent on the rollout.
    """

    levels: list[torch.Tensor]
    parent: list[torch.Tensor]
    log_probs: list[torch.Tensor]
    a: list[torch.Tensor]
    b: list[torch.Tensor]
    std: list[torch.Tensor]
    timesteps: list[torch.Tensor]
    branch: torch.Tensor
    sde_mask: torch.Tensor
    cond: Conditioning
    prompts: list[str]
    samples: torch.Tensor
    nfe: int

    @property
    def trees(self) -> int:
        return self.levels[0].shape[0]

    @property
    def num_steps(self) -> int:
        return len(self.parent)

    def per_tree(self, level: int) -> int:
        """Nodes per tree at depth ``level``."""
        return self.levels[level].shape[0] // self.trees

    def tree_of(self, level: int) -> torch.Tensor:
        """(n_level,) long: the tree (prompt) of each node at depth ``level``."""
        return torch.arange(self.trees).repeat_interleave(self.per_tree(level))


@torch.no_grad()
def collect_tree(model, sampler, items, branch_steps, branch_factor: int, sde_mask: torch.Tensor,
                 generator: torch.Generator, *, device, noise_scale: float = 1.0, chunk: int = 0,
                 store_on_cpu: bool = False, mixed_precision: str = "no", decode: str = "x0",
                 backend: str = "auto") -> TreeRollout:
    """Roll out one tree per prompt item (eval mode, no grad); see the module docstring.

    Branch steps are always sampled with noise (their std times ``noise_scale``; the edge's
    log-prob and stored std are those of that wider Gaussian, so the update sees the kernel that
    drew the sample). The random draws are the flat rollout's with ``share_noise``: P root
    noises, then each step's noise for the nodes it creates.
    """
    device = torch.device(device)
    n_steps = sampler.num_steps
    if sde_mask.shape != (n_steps,):
        raise ValueError(f"sde_mask must have shape ({n_steps},), got {tuple(sde_mask.shape)}")
    branch = torch.zeros(n_steps, dtype=torch.bool)
    branch[list(branch_steps)] = True
    sde = sde_mask.detach().cpu().bool() | branch
    was_training = model.training if hasattr(model, "training") else False
    if hasattr(model, "eval"):
        model.eval()
    try:
        texts, cond = encode_items(model, items, device)
        n_trees = len(items)
        store = torch.device("cpu") if store_on_cpu else device
        x = torch.randn((n_trees, *model.latent_shape()), generator=generator, device=device)
        tree_of = torch.arange(n_trees, device=device)
        levels, parents, lps, aa, bb, ss, ts = [x.to(store)], [], [], [], [], [], []
        nfe = 0
        for i in range(n_steps):
            n = x.shape[0]
            t = sampler.model_timesteps(i, n).to(device)
            node_cond = select(cond, tree_of)
            v = torch.empty_like(x)
            for sl in _chunks(n, chunk):
                with autocast_context(device, mixed_precision):
                    out = model.predict(x[sl], t[sl], select(node_cond, sl))
                v[sl] = out.to(x.dtype)
            nfe += n
            k = branch_factor if bool(branch[i]) else 1
            parent = torch.arange(n, device=device).repeat_interleave(k)
            if k > 1:  # the children share x_i and the model output; only their noise differs
                x, v, t, tree_of = x[parent], v[parent], t[parent], tree_of[parent]
            m = x.shape[0]
            if bool(sde[i]):
                c = sampler.coeffs(i, m)
                if k > 1 and noise_scale != 1.0:
                    c = replace(c, std=c.std * noise_scale)
                y, lp = sample_step(v, x, c.to(device), generator=generator, backend=backend)
            else:
                c = sampler.ode_coeffs(i, m)
                y = sampler.ode_step(i, x, v)
                lp = torch.full((m,), float("nan"), dtype=torch.float32, device=device)
            parents.append(parent.to(store))
            lps.append(lp.float().to(store))
            aa.append(c.a.float().expand(m).to(store))
            bb.append(c.b.float().expand(m).to(store))
            ss.append(c.std.float().expand(m).to(store))
            ts.append(t.float().to(store))
            levels.append(y.to(store))
            out_latent = sampler.x0(i, x, v) if (i == n_steps - 1 and decode == "x0") else y
            x = y
        samples = model.decode(out_latent)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    leaves = levels[-1].shape[0] // n_trees
    prompts = [t for t in texts for _ in range(leaves)]
    if store_on_cpu:
        cond = {k: v.cpu() for k, v in cond.items()}
    return TreeRollout(levels, parents, lps, aa, bb, ss, ts, branch, sde, cond, prompts, samples, nfe)


def fuse_rewards(tree: TreeRollout, rewards: torch.Tensor, fusion: str = "mean") -> list[torch.Tensor]:
    """Each node's reward from its leaves': a list over depths 0..N of (n_l, K) fp32.

    ``mean``: the mean of the node's finite leaf rewards. ``prob``: bottom up, a node with
    several children takes the softmax (over the children with a finite reward) of their edge
    log-probs as weights. A node without a finite leaf below it gets NaN.
    """
    r = rewards.detach().float().cpu().reshape(rewards.shape[0], -1)
    leaves = r.shape[0]
    out = [None] * (tree.num_steps + 1)
    out[-1] = r
    for level in range(tree.num_steps - 1, -1, -1):
        n = tree.levels[level].shape[0]
        if fusion == "mean":
            block = r.view(n, leaves // n, -1)
            finite = torch.isfinite(block)
            total = torch.where(finite, block, torch.zeros(())).sum(1)
            count = finite.sum(1)
            out[level] = torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))
        elif fusion == "prob":
            child = out[level + 1].view(n, -1, r.shape[1])
            lp = tree.log_probs[level].detach().float().cpu().view(n, -1)
            ok = torch.isfinite(child).all(2)
            w = torch.softmax(torch.where(ok, torch.nan_to_num(lp, nan=0.0), torch.full_like(lp, float("-inf"))), 1)
            fused = (torch.nan_to_num(w, nan=0.0)[..., None] * torch.where(ok[..., None], child, 0.0)).sum(1)
            out[level] = torch.where(ok.any(1, keepdim=True), fused, torch.full_like(fused, float("nan")))
        else:
            raise ValueError(f"fusion must be 'mean' or 'prob', got {fusion!r}")
    return out


def tree_advantages(tree: TreeRollout, rewards: torch.Tensor, *, fusion: str = "mean", weights=None,
                    std: str = "group", unbiased: bool = True, eps: float = 1e-8, clip: float | None = 5.0,
                    aggregate: str = "advantage") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Depth-wise advantages of every node: ``(adv, valid)``, lists over depths 1..N (index i
    holds depth i + 1, the edge of step i) of (n_{i+1},) fp32 / bool.

    At each depth the fused node rewards of a tree form one group of :func:`group_advantages`
    (same std / eps / clip / multi-reward conventions as the flat trainer). A node with no finite
    leaf below it is invalid (advantage 0, not trained).
    """
    fused = fuse_rewards(tree, rewards, fusion)
    adv, valid = [], []
    for level in range(1, tree.num_steps + 1):
        r = fused[level]
        ok = torch.isfinite(r).all(1)
        if bool(ok.any()):
            a = group_advantages(r, group_ids=tree.tree_of(level), weights=weights, std=std, unbiased=unbiased,
                                 eps=eps, clip=clip, aggregate=aggregate, nan_policy="drop", backend="torch")
        else:
            a = torch.zeros(r.shape[0])
        adv.append(a.float())
        valid.append(ok)
    return adv, valid


def prune_edges(tree: TreeRollout, adv: list[torch.Tensor], valid: list[torch.Tensor], *, iteration: int = 0,
                prune_steps=(), prune_slide_every: int = 0, prune_stop: int | None = None,
                width_keep: int = 0) -> list[torch.Tensor]:
    """Which edges train: a list over steps of (n_{i+1},) bool.

    Never trained: ODE steps, the last step (its sample is not what is scored with the x0
    decode, as in the flat trainer), steps before the first branch (one node per tree: the
    advantage is 0 there by construction) and invalid nodes. Then the pruning options:

    * depth: the steps ``prune_steps`` are left out; with ``prune_slide_every > 0`` the window
      moves one step earlier every that many iterations, its first step never below
      ``prune_stop`` (default: the step after the last branch).
    * width (``width_keep > 0``): below the last branch only the edges leading to each tree's
      ``width_keep`` best and ``width_keep`` worst leaves (by leaf advantage) train.
    """
    n = tree.num_steps
    keep = []
    for i in range(n):
        k = valid[i].clone() & bool(tree.sde_mask[i]) & (i < n - 1) & (tree.per_tree(i + 1) > 1)
        keep.append(k)
    steps = sorted(int(s) for s in prune_steps)
    if steps:
        if prune_slide_every > 0:
            last_branch = int(tree.branch.nonzero().max())
            stop = last_branch + 1 if prune_stop is None else int(prune_stop)
            shift = min(iteration // prune_slide_every, max(0, steps[0] - stop))
            steps = [s - shift for s in steps]
        for s in steps:
            if 0 <= s < n:
                keep[s] = torch.zeros_like(keep[s])
    if width_keep > 0:
        last = int(tree.branch.nonzero().max())
        leaf_adv = torch.where(valid[-1], adv[-1], torch.full_like(adv[-1], float("nan")))
        g = tree.per_tree(n)
        chosen = torch.zeros(leaf_adv.shape[0], dtype=torch.bool)
        for p in range(tree.trees):
            members = torch.arange(p * g, (p + 1) * g)
            members = members[torch.isfinite(leaf_adv[members])]
            if members.numel() <= 2 * width_keep:
                chosen[members] = True
                continue
            order = members[leaf_adv[members].argsort(descending=True, stable=True)]
            chosen[order[:width_keep]] = True
            chosen[order[-width_keep:]] = True
        for i in range(last + 1, n):  # one node per leaf below the last branch
            keep[i] = keep[i] & chosen
    return keep


def training_items(tree: TreeRollout, adv: list[torch.Tensor], keep: list[torch.Tensor]):
    """The kept edges as a one-step :class:`Rollout` (E samples, latents (E, 2, ...)) and their
    advantages (E,), ready for :meth:`Updater.run` with steps = zeros (E, 1)."""
    xs, ys, lp, a, b, std, ts, trees, advs = [], [], [], [], [], [], [], [], []
    for i in range(tree.num_steps):
        idx = keep[i].nonzero().flatten()
        if idx.numel() == 0:
            continue
        src = idx.to(tree.levels[i + 1].device)
        xs.append(tree.levels[i][tree.parent[i][src]])
        ys.append(tree.levels[i + 1][src])
        for dst, table in ((lp, tree.log_probs), (a, tree.a), (b, tree.b), (std, tree.std), (ts, tree.timesteps)):
            dst.append(table[i][src])
        trees.append(tree.tree_of(i + 1)[idx])
        advs.append(adv[i][idx])
    if not xs:
        return None, torch.zeros(0)
    col = lambda parts: torch.cat(parts)[:, None]
    tree_idx = torch.cat(trees)
    leaves = tree.per_tree(tree.num_steps)
    rollout = Rollout(torch.stack([torch.cat(xs), torch.cat(ys)], 1), col(lp), col(a), col(b), col(std), col(ts),
                      torch.ones(1, dtype=torch.bool), select(tree.cond, tree_idx.to(next(iter(tree.cond.values())).device)),
                      [tree.prompts[int(p) * leaves] for p in tree_idx], torch.zeros((tree_idx.numel(), 0)))
    return rollout, torch.cat(advs)


def tree_train_step(trainer) -> dict:
    """One BranchGRPO iteration of a :class:`Trainer` (its ``train_step`` when ``rollout.tree`` is set)."""
    from .noise import iteration_seed
    from .scoring import score_samples

    cfg, tc = trainer.cfg, trainer.cfg.rollout.tree
    t0 = time.perf_counter()
    items = trainer.dataset.sample(cfg.rollout.prompts_per_step, generator=trainer.generators["data"])
    # the iteration's noise from (seed, iteration): nothing to carry in checkpoints
    noise = torch.Generator(trainer.device).manual_seed(iteration_seed(cfg.seed, trainer.step, stream=3))
    tree = collect_tree(trainer.model, trainer.sampler, items, tc.branch_steps, tc.branch_factor,
                        trainer.selector.sde_mask(trainer.step), noise, device=trainer.device,
                        noise_scale=tc.noise_scale, chunk=cfg.rollout.batch_size, store_on_cpu=cfg.rollout.store_on_cpu,
                        mixed_precision=cfg.mixed_precision, decode=cfg.rollout.decode, backend=cfg.loss.backend)
    t1 = time.perf_counter()
    scored = score_samples(trainer.rewards, tree.samples, tree.prompts)
    a = cfg.advantage
    weights = torch.tensor([r.weight for r in trainer.rewards])
    adv, valid = tree_advantages(tree, scored.rewards, fusion=tc.fusion, weights=weights, std=a.std,
                                 unbiased=a.unbiased, eps=a.eps, clip=a.clip, aggregate=a.aggregate)
    keep = prune_edges(tree, adv, valid, iteration=trainer.step, prune_steps=tc.prune_steps,
                       prune_slide_every=tc.prune_slide_every, prune_stop=tc.prune_stop, width_keep=tc.width_keep)
    train, edge_adv = training_items(tree, adv, keep)
    t2 = time.perf_counter()
    edges = int(edge_adv.numel())
    steps = torch.zeros((edges, 1), dtype=torch.long)
    if edges > 0:
        stats = trainer.updater.run(train, edge_adv, steps, trainer.generators["data"]).summary()
    else:
        stats = {"skipped": 1, "optimizer_steps": 0}
    leaf_valid = scored.valid
    trainer.record_outcome(leaf_valid, scored.failures, stats["skipped"])
    t3 = time.perf_counter()
    m = trainer._metrics(scored, weights, adv[-1], leaf_valid, leaf_valid.nonzero().flatten(), steps, stats,
                         (t0, t1, t2, t3), len(tree.prompts))
    update_nfe = edges * (2 if cfg.loss.kl_beta > 0 else 1)  # the frozen reference is one more forward
    m.update({"trained_edges": edges, "nfe_rollout": tree.nfe, "nfe_update": update_nfe,
              "nfe": tree.nfe + update_nfe})
    return m
