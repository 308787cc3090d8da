"""group_advantages(..., group_ids=...): groups given by ids, in any order and of any sizes."""

import itertools

import pytest
import torch

import dancegrpo as dg
from dancegrpo.ops import get_backend
from dancegrpo.ops.reference import dense_group_ids

F64 = torch.float64
OPTIONS = [dict(std=s, unbiased=u, aggregate=g) for s, u, g in
           itertools.product(("group", "global", "none"), (True, False), ("advantage", "reward"))]


def _id(kw):
    return f"{kw['std']}-{'unbiased' if kw['unbiased'] else 'pop'}-{kw['aggregate']}"


def _loop_advantages(rewards, ids, weights, *, std, unbiased, aggregate, eps=1e-8, clip=None):
    """One group at a time in Python, straight from the definition (docs/math.md, "Advantages"):
    non-finite samples are left out; a group's advantage is (r - mean) / (std + eps)."""
    r = rewards.double().reshape(rewards.shape[0], -1)
    w = weights.double()
    valid = torch.isfinite(r).all(1)
    if aggregate == "reward":
        r, w = (torch.where(valid[:, None], r, 0.0) * w).sum(1, keepdim=True), torch.ones(1, dtype=F64)
    out = torch.zeros(r.shape[0], dtype=F64)
    ok = r[valid]
    global_std = ok.std(0, unbiased=unbiased) if ok.shape[0] > 1 or not unbiased else torch.zeros(r.shape[1], dtype=F64)
    for g in ids.unique().tolist():
        members = ((ids == g) & valid).nonzero().flatten()
        if len(members) == 0:
            continue
        rg = r[members]
        centred = rg - rg.mean(0)
        constant = rg.max(0).values == rg.min(0).values
        centred[:, constant] = 0.0
        if std == "group":
            s = rg.std(0, unbiased=unbiased) if len(members) > 1 else torch.zeros(r.shape[1], dtype=F64)
            adv = centred / (s + eps)
        elif std == "global":
            adv = centred / (global_std + eps)
        else:
            adv = centred
        out[members] = (adv * w).sum(1)
    return out if clip is None else out.clamp(-clip, clip)


def test_dense_group_ids_relabels_any_ids(seed):
    ids = torch.tensor([7, -3, 7, 10**12, -3, 5])
    dense = dense_group_ids(ids)
    assert sorted(set(dense.tolist())) == [0, 1, 2, 3]
    for i in range(len(ids)):
        for j in range(len(ids)):
            assert (dense[i] == dense[j]) == (ids[i] == ids[j])


@pytest.mark.parametrize("kw", OPTIONS, ids=_id)
def test_permuted_groups_equal_contiguous_form(kw, seed):
    """Shuffle a contiguous batch (any id values): each sample keeps its advantage."""
    P, G, K = 5, 4, 3
    rewards = torch.randn(P * G, K, dtype=F64)
    rewards[G:2 * G] = torch.randn(1, K, dtype=F64)  # a constant group
    weights = torch.tensor([0.5, 1.25, -0.75])
    perm = torch.randperm(P * G)
    labels = torch.randint(-10**9, 10**9, (P,))
    while labels.unique().numel() < P:
        labels = torch.randint(-10**9, 10**9, (P,))
    ids = labels.repeat_interleave(G)
    for clip in (None, 0.7):
        contiguous = dg.group_advantages(rewards, G, weights=weights, clip=clip, backend="torch", **kw)
        shuffled = dg.group_advantages(rewards[perm], group_ids=ids[perm], weights=weights, clip=clip,
                                       backend="torch", **kw)
        torch.testing.assert_close(shuffled, contiguous[perm], rtol=1e-12, atol=1e-12)
        assert torch.equal(contiguous[G:2 * G], torch.zeros(G, dtype=F64))


@pytest.mark.parametrize("kw", OPTIONS, ids=_id)
def test_unequal_group_sizes_match_a_loop(kw, seed):
    sizes = [1, 2, 5, 3, 7]
    ids = torch.repeat_interleave(torch.tensor([40, 11, 3, 27, 8]), torch.tensor(sizes))
    perm = torch.randperm(len(ids))
    ids = ids[perm]
    rewards = torch.randn(len(ids), 2, dtype=F64) * 2
    weights = torch.tensor([0.3, -1.1], dtype=F64)
    out = dg.group_advantages(rewards, group_ids=ids, weights=weights, clip=None, backend="torch", **kw)
    expected = _loop_advantages(rewards, ids, weights, **kw)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # the group of one sample (id 40) gets exactly 0: it is its own mean
    assert torch.equal(out[ids == 40], torch.zeros(1, dtype=F64))


def test_singleton_groups_are_zero_in_every_mode():
    rewards = torch.tensor([0.3, -1.2, 5.0, 0.7])
    for kw in OPTIONS:
        out = dg.group_advantages(rewards, group_ids=torch.arange(4), **kw)
        assert torch.equal(out, torch.zeros(4)), kw


@pytest.mark.parametrize("kw", OPTIONS, ids=_id)
def test_nan_drop_leaves_samples_out_of_their_group(kw, seed):
    ids = torch.tensor([2, 0, 1, 2, 0, 1, 2, 0, 2, 1, 0])
    rewards = torch.randn(len(ids), 2, dtype=F64)
    rewards[3, 1] = float("nan")  # group 2 keeps three valid members
    rewards[4, 0] = float("inf")  # group 0 keeps three
    rewards[[2, 5]] = float("nan")  # group 1 keeps one: advantage 0
    weights = torch.tensor([1.0, 0.5], dtype=F64)
    with pytest.raises(ValueError, match=r"non-finite values.*\(samples \[2, 3, 4, 5\]\)"):
        dg.group_advantages(rewards, group_ids=ids, weights=weights)
    out = dg.group_advantages(rewards, group_ids=ids, weights=weights, nan_policy="drop", clip=None,
                              backend="torch", **kw)
    torch.testing.assert_close(out, _loop_advantages(rewards, ids, weights, **kw), rtol=1e-12, atol=1e-12)
    assert torch.equal(out[[2, 3, 4, 5, 9]], torch.zeros(5, dtype=F64))


def test_every_backend_gives_the_reference(seed):
    """The group_ids form runs the reference whatever the backend; fp32 stays fp32."""
    ids = torch.tensor([1, 0, 1, 1, 0, 2, 2])
    rewards = torch.randn(7)
    want = dg.group_advantages(rewards, group_ids=ids, backend="torch")
    assert want.dtype == torch.float32
    for name in ("native", "triton"):
        backend = get_backend(name)
        if backend.unavailable_reasons() or "cpu" not in backend.devices:
            continue
        assert torch.equal(dg.group_advantages(rewards, group_ids=ids, backend=name), want), name
    assert torch.equal(dg.group_advantages(rewards, group_ids=ids.tolist()), want)  # a list of ints works


def test_group_ids_trace_without_graph_breaks(seed):
    rewards, ids = torch.randn(9, 2), torch.tensor([3, 1, 3, 2, 1, 1, 3, 2, 2])
    f = lambda r, i: dg.group_advantages(r, group_ids=i, nan_policy="drop", backend="torch")  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(rewards, ids), f(rewards, ids))


def test_group_ids_bad_input():
    r = torch.randn(6)
    with pytest.raises(ValueError, match="pass group_size .* or group_ids .*exactly one"):
        dg.group_advantages(r, 3, group_ids=torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one"):
        dg.group_advantages(r)
    with pytest.raises(TypeError, match="group_ids must be an integer tensor"):
        dg.group_advantages(r, group_ids=torch.zeros(6))
    with pytest.raises(ValueError, match="group_ids must have shape \\(6,\\)"):
        dg.group_advantages(r, group_ids=torch.zeros(5, dtype=torch.long))
