"""BranchGRPO tree rollouts: shared prefixes, the flat equivalence, depth-wise advantages, pruning,
the ratio at the first update, model-call counts, config checks and a shapes run."""

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from dancegrpo import group_advantages, step_logprob
from dancegrpo.coeffs import StepCoeffs
from dancegrpo.samplers import FlowSampler
from dancegrpo.trainer import load_config
from dancegrpo.trainer.config import ConfigError, save_config
from dancegrpo.trainer.rollout import collect_rollout
from dancegrpo.trainer.tree_rollout import (
    TreeRollout,
    collect_tree,
    fuse_rewards,
    prune_edges,
    training_items,
    tree_advantages,
)
from dancegrpo.trainer.update import RatioCheckWarning, Updater
from dancegrpo.worlds.toy import ToyPromptDataset, build_toy_model

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "dancegrpo" / "configs"


def _tree(seed, branch_steps, factor, *, prompts=2, steps=6, eta=0.8, mask=None, noise_scale=1.0, model=None):
    model = model or build_toy_model(hidden=16)
    sampler = FlowSampler(steps, eta=eta)
    items = ToyPromptDataset().sample(prompts, torch.Generator().manual_seed(seed))
    mask = torch.ones(steps, dtype=torch.bool) if mask is None else mask
    tree = collect_tree(model, sampler, items, branch_steps, factor, mask, torch.Generator().manual_seed(seed),
                        device="cpu", noise_scale=noise_scale)
    return model, sampler, items, tree


def _path(tree, leaf):
    """x_0 .. x_N of one leaf, found by walking the parent pointers up from the leaf."""
    rows = [leaf]
    for i in range(tree.num_steps - 1, -1, -1):
        rows.append(int(tree.parent[i][rows[-1]]))
    rows.reverse()
    return [tree.levels[level][row] for level, row in enumerate(rows)]


def test_siblings_share_the_prefix_bit_for_bit_and_differ_after_their_branch(seed):
    _, sampler, _, tree = _tree(seed, [1, 3], 2, prompts=2, steps=6)
    assert [lv.shape[0] for lv in tree.levels] == [2, 2, 4, 4, 8, 8, 8]
    g = 4
    for p in range(2):
        paths = [_path(tree, p * g + j) for j in range(g)]
        for j1 in range(g):
            for j2 in range(j1 + 1, g):
                # leaves j1, j2 part at the last branch where their base-2 digits differ
                split = 1 if (j1 // 2) != (j2 // 2) else 3
                for level in range(7):
                    same = torch.equal(paths[j1][level], paths[j2][level])
                    assert same == (level <= split), (p, j1, j2, level)
    # trees of different prompts share nothing (independent root noise)
    assert not torch.equal(_path(tree, 0)[0], _path(tree, 4)[0])


def test_every_edge_is_a_step_of_the_sampler_with_its_log_prob(seed):
    model, sampler, _, tree = _tree(seed, [0, 2], 2, prompts=3, steps=5, noise_scale=2.5)
    for i in range(tree.num_steps):
        x = tree.levels[i][tree.parent[i]]
        y = tree.levels[i + 1]
        n = y.shape[0]
        cond = {k: v[tree.tree_of(i + 1)] for k, v in tree.cond.items()}
        with torch.no_grad():
            v = model.predict(x, tree.timesteps[i], cond)
        c = sampler.coeffs(i, n)
        scale = 2.5 if i in (0, 2) else 1.0  # branch steps draw wider noise and say so in std
        assert torch.allclose(tree.std[i], c.std * scale)
        coeffs = StepCoeffs(tree.a[i], tree.b[i], tree.std[i])
        assert torch.allclose(step_logprob(v, x, y, coeffs), tree.log_probs[i], atol=1e-5)


def test_one_branch_at_step_zero_is_the_flat_rollout_with_shared_noise(seed):
    """Branching G ways at step 0 from one root per prompt draws the same random numbers in the
    same order as the flat rollout with share_noise=True: the trajectories, log-probs and samples
    are the flat ones, every depth holds the G leaves of each group, so the depth-wise advantage
    of every edge is the flat group advantage of its sample, and the tree's training items are the
    flat (sample, step) items (equal up to the rounding of model calls on P vs P * G rows)."""
    g, steps = 4, 5
    model = build_toy_model(hidden=16)
    sampler = FlowSampler(steps, eta=0.8)
    items = ToyPromptDataset().sample(3, torch.Generator().manual_seed(seed))
    mask = torch.ones(steps, dtype=torch.bool)
    flat = collect_rollout(model, sampler, items, g, mask, torch.Generator().manual_seed(seed + 1), device="cpu",
                           share_noise=True)
    tree = collect_tree(model, sampler, items, [0], g, mask, torch.Generator().manual_seed(seed + 1), device="cpu")
    assert torch.equal(tree.levels[0].repeat_interleave(g, 0), flat.latents[:, 0])
    for i in range(steps):
        assert torch.allclose(tree.levels[i + 1], flat.latents[:, i + 1], atol=1e-6, rtol=0), i
        assert torch.allclose(tree.log_probs[i], flat.log_probs[:, i], atol=1e-5, rtol=0), i
    assert torch.allclose(tree.samples, flat.samples, atol=1e-6)
    assert tree.prompts == flat.prompts

    rewards = torch.randn(3 * g)
    flat_adv = group_advantages(rewards, g)
    adv, valid = tree_advantages(tree, rewards)
    for i in range(steps):
        assert torch.allclose(adv[i], flat_adv, atol=1e-6) and bool(valid[i].all())
    keep = prune_edges(tree, adv, valid)
    train, edge_adv = training_items(tree, adv, keep)
    # flat: every sample trains every step but the last ("all" strategy); edges come step by step
    s = torch.arange(3 * g).repeat(steps - 1)
    t = torch.arange(steps - 1).repeat_interleave(3 * g)
    x, y, ts, c, lp, cond = flat.step_batch(s, t, "cpu")
    x2, y2, ts2, c2, lp2, cond2 = train.step_batch(torch.arange(s.numel()), torch.zeros_like(s), "cpu")
    assert torch.allclose(x, x2, atol=1e-6) and torch.allclose(y, y2, atol=1e-6)
    assert torch.equal(ts, ts2) and torch.allclose(lp, lp2, atol=1e-5)
    assert torch.equal(c.a, c2.a) and torch.equal(c.b, c2.b) and torch.equal(c.std, c2.std)
    assert torch.equal(cond["prompt"], cond2["prompt"])
    assert torch.allclose(edge_adv, flat_adv[s], atol=1e-6)


def _hand_tree(log_probs=None):
    """Two trees, 4 steps, branches at steps 0 and 1 (factor 2): depths of 1, 2, 4, 4, 4 nodes per
    tree. Latents are irrelevant to the advantages (zeros)."""
    per_tree = [1, 2, 4, 4, 4]
    levels = [torch.zeros(2 * n, 1) for n in per_tree]
    parent = [torch.arange(2 * per_tree[i]).repeat_interleave(per_tree[i + 1] // per_tree[i]) for i in range(4)]
    lps = [torch.zeros(2 * per_tree[i + 1]) for i in range(4)] if log_probs is None else log_probs
    ones = [torch.ones(2 * per_tree[i + 1]) for i in range(4)]
    return TreeRollout(levels, parent, lps, ones, ones, ones, [o * 500 for o in ones],
                       torch.tensor([True, True, False, False]), torch.ones(4, dtype=torch.bool),
                       {"prompt": torch.tensor([0, 1])}, ["red"] * 4 + ["blue"] * 4, torch.zeros(8, 3), nfe=0)


def _standardise(values):
    """(r - mean) / unbiased std, written out."""
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return [(v - mean) / sd for v in values]


def test_depth_wise_advantages_of_a_hand_made_tree():
    tree = _hand_tree()
    # tree 0 leaves: (1, 3) under the first child of the root, (2, 6) under the second;
    # tree 1 is constant, so it must not leak into tree 0 and gets 0 everywhere
    rewards = torch.tensor([1.0, 3.0, 2.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    adv, valid = tree_advantages(tree, rewards, clip=None)
    depth1 = _standardise([(1 + 3) / 2, (2 + 6) / 2])  # the two children of the root: mean of their leaves
    leaves = _standardise([1, 3, 2, 6])
    expected = [depth1, leaves, leaves, leaves]
    for i in range(4):
        assert torch.allclose(adv[i][: len(expected[i])], torch.tensor(expected[i]), atol=1e-6), i
        assert torch.equal(adv[i][len(expected[i]):], torch.zeros(len(expected[i]))), i
        assert bool(valid[i].all())
    # a failed leaf: left out of its ancestors' mean and of its depth's statistics, not valid
    rewards[1] = float("nan")
    adv, valid = tree_advantages(tree, rewards, clip=None)
    assert torch.allclose(adv[0][:2], torch.tensor(_standardise([1.0, 4.0])), atol=1e-6)
    assert torch.allclose(adv[1][[0, 2, 3]], torch.tensor(_standardise([1, 2, 6])), atol=1e-6)
    assert not bool(valid[1][1]) and adv[1][1] == 0 and bool(valid[0].all())


def test_probability_weighted_fusion_of_a_hand_made_tree():
    # children's edge log-probs at step 1 (into depth 2): 0 and log 3 -> weights 1/4 and 3/4
    lps = [torch.tensor([0.0, math.log(2), 0, 0]), torch.tensor([0.0, math.log(3), 0, 0, 0, 0, 0, 0]),
           torch.zeros(8), torch.zeros(8)]
    tree = _hand_tree(lps)
    rewards = torch.tensor([1.0, 3.0, 2.0, 6.0, 5.0, 5.0, 5.0, 5.0])
    fused = fuse_rewards(tree, rewards, "prob")
    a = 0.25 * 1 + 0.75 * 3   # first child of tree 0's root
    b = 0.5 * 2 + 0.5 * 6     # second child: equal log-probs
    root = (1 / 3) * a + (2 / 3) * b  # step-0 log-probs 0 and log 2
    assert torch.allclose(fused[1][:2, 0], torch.tensor([a, b]))
    assert torch.allclose(fused[0][0, 0], torch.tensor(root))
    assert torch.allclose(fuse_rewards(tree, rewards, "mean")[1][:2, 0], torch.tensor([2.0, 4.0]))


def test_pruning_removes_what_it_should():
    tree = _hand_tree()
    rewards = torch.tensor([1.0, 3.0, 2.0, 6.0, 4.0, 0.0, 9.0, 7.0])
    adv, valid = tree_advantages(tree, rewards)
    count = lambda keep: [int(k.sum()) for k in keep]
    # the last step never trains; every other step trains every node
    assert count(prune_edges(tree, adv, valid)) == [4, 8, 8, 0]
    assert count(prune_edges(tree, adv, valid, prune_steps=[1])) == [4, 0, 8, 0]
    # sliding: one step earlier every 2 iterations, never before prune_stop
    slide = dict(prune_steps=[2], prune_slide_every=2, prune_stop=1)
    assert count(prune_edges(tree, adv, valid, iteration=1, **slide)) == [4, 8, 0, 0]
    assert count(prune_edges(tree, adv, valid, iteration=2, **slide)) == [4, 0, 8, 0]
    assert count(prune_edges(tree, adv, valid, iteration=9, **slide)) == [4, 0, 8, 0]
    # width: below the last branch (step 1) only each tree's best and worst leaf
    keep = prune_edges(tree, adv, valid, width_keep=1)
    assert count(keep) == [4, 8, 4, 0]
    assert keep[2].nonzero().flatten().tolist() == [0, 3, 5, 6]  # tree 0: 1 and 6; tree 1: 0 and 9
    # ODE steps and steps before the first branch never train
    tree.sde_mask = torch.tensor([True, False, True, True])
    assert count(prune_edges(tree, adv, valid)) == [4, 0, 8, 0]
    tree2 = _hand_tree()
    tree2.branch = torch.tensor([False, True, False, False])
    tree2.levels[1] = torch.zeros(2, 1)  # one node per tree at depth 1
    adv2, valid2 = tree_advantages(tree2, rewards)
    assert int(prune_edges(tree2, adv2, valid2)[0].sum()) == 0


def test_ratio_is_one_at_the_first_update_and_the_update_moves_the_weights(seed):
    model, sampler, _, tree = _tree(seed, [0, 2], 2, prompts=3, steps=6)
    rewards = torch.randn(12)
    adv, valid = tree_advantages(tree, rewards)
    train, edge_adv = training_items(tree, adv, prune_edges(tree, adv, valid))
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    updater = Updater(model, params, torch.optim.AdamW(params, lr=1e-3), train_batch_size=8, accumulation=2,
                      max_grad_norm=1.0, clip_range=1e-3, clip_range_high=None, kl_beta=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RatioCheckWarning)
        stats = updater.run(train, edge_adv, torch.zeros((train.batch, 1), dtype=torch.long),
                            torch.Generator().manual_seed(seed))
    assert stats.first_pairs > 0 and abs(stats.first_ratio / stats.first_pairs - 1) < 1e-5
    assert stats.optimizer_steps > 0 and any(not torch.equal(a, p) for a, p in zip(before, params, strict=True))


class CountingToy(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows = inner, 0
        self.prediction = inner.prediction

    def predict(self, x, t, cond):
        self.rows += x.shape[0]
        return self.inner.predict(x, t, cond)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def test_model_calls_are_counted_and_prefixes_are_paid_once(seed):
    model = CountingToy(build_toy_model(hidden=16))
    _, _, _, tree = _tree(seed, [1, 4], 2, prompts=3, steps=8, model=model, mask=torch.tensor([True] * 8))
    # nodes per tree entering each step: 1, 1, 2, 2, 2, 4, 4, 4 -> 20 per tree; flat pays 4 * 8 = 32
    assert tree.nfe == model.rows == 3 * 20


def test_tree_config_is_checked_with_one_line_errors(tmp_path):
    base = [f"output_dir={tmp_path}", "rollout.group_size=8", "sampler.num_steps=8"]
    cfg = load_config(CONFIGS / "toy.yaml", [*base, "rollout.tree={branch_steps: [0, 2, 4], branch_factor: 2}"])
    assert cfg.rollout.tree.branch_steps == [0, 2, 4] and cfg.rollout.tree.width_keep == 0
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    assert load_config(CONFIGS / "toy.yaml", base).rollout.tree is None
    bad = {
        "rollout.tree.branch_steps=[0, 2]": r"rollout.tree.branch_factor must be such that branch_factor \*\* "
                                            r"len\(branch_steps\) = rollout.group_size = 8 \(2 \*\* 2 = 4\)",
        "rollout.tree.branch_steps=[0, 2, 7]": r"rollout.tree.branch_steps must be .*the last step cannot branch",
        "rollout.tree.branch_steps=[4, 2, 0]": "rollout.tree.branch_steps must be strictly increasing",
        "rollout.tree.fusion=max": "rollout.tree.fusion must be one of",
        "rollout.tree.width_keep=4": "rollout.tree.width_keep must be >= 0 and < group_size / 2 = 4",
        "advantage.best_of_k=2": "advantage.best_of_k must be 0 with rollout.tree",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message) as err:
            load_config(CONFIGS / "toy.yaml", [*base, "rollout.tree.branch_steps=[0, 2, 4]", override])
        assert "\n" not in str(err.value)


def test_shapes_branchgrpo_config_trains_through_the_cli(tmp_path):
    from dancegrpo.cli import main

    rc = main(["train", "shapes_t2i_branchgrpo", f"output_dir={tmp_path}", "max_steps=2", "device=cpu",
               "log.progress=false", "log.num_sample_prompts=0", "log.sample_every=0", "checkpoint_every=0",
               "rollout.prompts_per_step=2"])
    assert rc == 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["nfe_rollout"] == 2 * 91  # branches at 0, 3, 6 of 16 steps: 1 + 3*2 + 3*4 + 9*8 per tree
        assert r["nfe"] == r["nfe_rollout"] + r["nfe_update"] and r["trained_edges"] == r["nfe_update"]
        assert abs(r["ratio_first_update"] - 1) < 1e-4 and r["skipped"] == 0
