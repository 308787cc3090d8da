"""The shapes world: grammar, split, renderer, tokenizer, text encoder and datasets.

Renderer checks measure the pixels directly (coverage from the known colours), never
through the detector, so a renderer bug cannot hide behind a matching detector bug.
"""

import math
from collections import Counter

import pytest
import torch

from dancegrpo.worlds.shapes import (
    BACKGROUNDS,
    COLORS,
    MOTIONS,
    POSITIONS,
    SHAPES,
    SIZES,
    PromptDataset,
    SceneSpec,
    TextEncoder,
    Tokenizer,
    all_specs,
    first_frame,
    first_frames,
    parse_prompt,
    render_batch,
    render_image,
    render_video,
    sample_specs,
    split_of,
)
from dancegrpo.worlds.shapes.grammar import compatible
from dancegrpo.worlds.shapes.renderer import GROW_TO, SHRINK_TO, TRAVEL, scene_geometry


def coverage(pixels: torch.Tensor, specs) -> torch.Tensor:
    """Per-pixel object coverage of renders (B, 3, [T,] H, W), from the specs' true colours."""
    bg = torch.tensor([BACKGROUNDS[s.background] for s in specs])
    col = torch.tensor([COLORS[s.color] for s in specs])
    extra = (1,) * (pixels.dim() - 2)
    bg, col = bg.reshape(-1, 3, *extra), col.reshape(-1, 3, *extra)
    return ((pixels - bg) * (col - bg)).sum(1) / ((col - bg) ** 2).sum(1)


def centroid(a: torch.Tensor):
    """Coverage-weighted (x, y) in pixels of (..., H, W)."""
    h, w = a.shape[-2:]
    ys = torch.arange(h, dtype=torch.float32) + 0.5
    xs = torch.arange(w, dtype=torch.float32) + 0.5
    m = a.sum((-1, -2))
    return (a.sum(-2) * xs).sum(-1) / m, (a.sum(-1) * ys).sum(-1) / m


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: these ops are small, and on the shared 2-core CI machine a
    second OpenMP thread under load makes them ~5x slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- grammar

def test_vocabulary_sizes():
    assert 6 <= len(COLORS) <= 8 and 4 <= len(SHAPES) <= 6
    assert set(SIZES) == {"small", "large"} and set(BACKGROUNDS) >= {"white", "black", "gray"}
    assert set(MOTIONS) == {"moving left", "moving right", "moving up", "moving down", "bouncing", "growing",
                            "shrinking"}
    # Colours well separated from each other and from every background.
    cols = torch.tensor(list(COLORS.values()))
    d = torch.cdist(cols, cols) + torch.eye(len(cols)) * 9
    assert d.min() > 0.3
    assert torch.cdist(cols, torch.tensor(list(BACKGROUNDS.values()))).min() > 0.4


@pytest.mark.parametrize("video", [False, True])
def test_prompt_round_trip_all_specs(video):
    specs = all_specs(video)
    assert len(specs) == (6300 if video else 1050)
    prompts = [s.prompt for s in specs]
    assert len(set(prompts)) == len(prompts)
    for s, p in zip(specs, prompts, strict=True):
        assert parse_prompt(p) == s
        assert (s.motion is not None) == video
    assert prompts[0] == "a small red circle in the center, white background" + (", moving left" if video else "")


def test_prompt_examples_and_leniency():
    s = SceneSpec("red", "circle", "small", "left", "white")
    assert s.prompt == "a small red circle on the left, white background"
    v = SceneSpec("blue", "triangle", "large", "top", "black", "moving down")
    assert v.prompt == "a large blue triangle at the top, black background, moving down"
    assert parse_prompt("  A Small RED circle   on the left ,white   background ") == s


@pytest.mark.parametrize("text, word", [
    ("a small pink circle on the left, white background", "pink"),
    ("a small red hexagon on the left, white background", "hexagon"),
    ("a tiny red circle on the left, white background", "tiny"),
    ("a small red circle on the far left, white background", "on the far left"),
    ("a small red circle on the left, beige background", "beige"),
    ("a small red circle on the left, white background, spinning", "spinning"),
])
def test_parse_prompt_names_unknown_word(text, word):
    with pytest.raises(ValueError, match=word):
        parse_prompt(text)


def test_parse_prompt_rejects_malformed():
    for bad in ["", "a small red circle", "red circle on the left, white background",
                "a small red circle on the left, white", "a, b, c, d"]:
        with pytest.raises(ValueError):
            parse_prompt(bad)
    with pytest.raises(TypeError):
        parse_prompt(3)


def test_scene_spec_validation():
    with pytest.raises(ValueError, match="color"):
        SceneSpec("pink", "circle", "small", "left", "white")
    with pytest.raises(TypeError, match="shape"):
        SceneSpec("red", 1, "small", "left", "white")
    with pytest.raises(ValueError, match="moving left"):
        SceneSpec("red", "circle", "small", "left", "white", "moving left")
    with pytest.raises(ValueError, match="leave"):
        parse_prompt("a small red circle at the top, white background, bouncing")
    # Every motion is possible from some positions, and from the centre.
    for m in MOTIONS:
        assert compatible("center", m)
    assert sum(compatible(p, "moving left") for p in POSITIONS) == len(POSITIONS) - 1


# Regression values: the split must be the same on every machine and every run (a salted
# hash() would change between processes).
KNOWN_SPLITS = {
    "red|circle|small|center|white": "train", "red|circle|small|left|gray": "train",
    "red|diamond|small|right|black": "train", "orange|cross|large|right|white": "train",
    "red|circle|small|right|gray": "heldout", "red|circle|small|bottom|white": "heldout",
    "red|circle|large|top|black": "heldout", "yellow|triangle|large|bottom|black": "heldout",
    "red|circle|small|center|white|moving left": "train", "red|diamond|large|top|gray|shrinking": "train",
    "red|circle|small|center|gray|moving right": "heldout",
    "orange|triangle|large|right|gray|moving up": "heldout",
    "purple|square|small|left|black|moving up": "heldout",
}


def test_split_stable_and_about_80_20():
    for key, want in KNOWN_SPLITS.items():
        parts = key.split("|")
        spec = SceneSpec(*parts[:5], parts[5] if len(parts) > 5 else None)
        assert split_of(spec) == want, key
    for video in (False, True):
        specs = all_specs(video)
        counts = Counter(split_of(s) for s in specs)
        assert 0.75 <= counts["train"] / len(specs) <= 0.85, counts
        # Held-out scenes are new combinations of attribute values all seen in training.
        train = [s for s in specs if split_of(s) == "train"]
        for attr in ("color", "shape", "size", "position", "background"):
            assert {getattr(s, attr) for s in train} == {getattr(s, attr) for s in specs}


def test_sample_specs():
    a = sample_specs(50, torch.Generator().manual_seed(3), split="heldout")
    b = sample_specs(50, torch.Generator().manual_seed(3), split="heldout")
    c = sample_specs(50, torch.Generator().manual_seed(4), split="heldout")
    assert a == b and a != c
    assert all(split_of(s) == "heldout" and s.motion is None for s in a)
    v = sample_specs(40, torch.Generator().manual_seed(0), video=True, split="train")
    assert all(s.motion is not None and split_of(s) == "train" for s in v)
    assert sample_specs(0, torch.Generator()) == []
    with pytest.raises(ValueError, match="n"):
        sample_specs(-1, torch.Generator())
    with pytest.raises(ValueError, match="split"):
        sample_specs(3, torch.Generator(), split="test")
    with pytest.raises(TypeError, match="generator"):
        sample_specs(3, 5)


# ----------------------------------------------------------------------------- renderer

@pytest.mark.parametrize("size", [32, 64])
def test_render_shapes_dtypes_ranges(size):
    g = torch.Generator().manual_seed(0)
    specs = sample_specs(12, g)
    img = render_batch(specs, size, generator=g)
    assert img.shape == (12, 3, size, size) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1
    vspecs = sample_specs(5, g, video=True)
    vid = render_batch(vspecs, size, frames=6, generator=g)
    assert vid.shape == (5, 3, 6, size, size) and vid.min() >= 0 and vid.max() <= 1
    assert render_image(specs[0], size).shape == (3, size, size)
    assert render_video(vspecs[0], 8, size).shape == (3, 8, size, size)
    # Corners show the background; the object's colour is present at full strength.
    for s, x in zip(specs, img, strict=True):
        assert torch.allclose(x[:, 0, 0], torch.tensor(BACKGROUNDS[s.background]))
        a = coverage(x[None], [s])[0]
        assert a.max() > 0.999


def test_render_batch_rejects_bad_input():
    s = SceneSpec("red", "circle", "small", "left", "white")
    with pytest.raises(TypeError):
        render_batch(s)
    with pytest.raises(TypeError):
        render_batch(["a small red circle"])
    with pytest.raises(ValueError, match="size"):
        render_batch([s], 4)
    with pytest.raises(ValueError, match="frames"):
        render_batch([s], 32, frames=0, video=True)
    with pytest.raises(ValueError, match="mix"):
        render_batch([s, SceneSpec("red", "circle", "small", "left", "white", "growing")])


def test_anti_aliased_edges_and_exact_areas():
    """Edge pixels take intermediate values, and the coverage integrates to the analytic
    area of each shape (the one-pixel ramp is exact along straight edges)."""
    areas = {"circle": math.pi, "square": 4.0, "triangle": 2.0, "diamond": 2.0, "cross": 4 * 5 / 9}
    size = 64
    specs = [SceneSpec("blue", s, "large", "center", "white") for s in SHAPES]
    img = render_batch(specs, size)
    a = coverage(img, specs)
    r_px = SIZES["large"] * size
    for s, cov in zip(SHAPES, a, strict=True):
        partial = (cov > 0.02) & (cov < 0.98)
        assert partial.sum() >= 8, s          # a smooth edge, not a hard 0/1 mask
        want = areas[s] * r_px ** 2
        assert abs(float(cov.sum()) - want) / want < 0.02, (s, float(cov.sum()), want)
    # The circle's partial pixels lie on its rim.
    cov = a[SHAPES.index("circle")]
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    rho = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2).sqrt()
    partial = (cov > 0.02) & (cov < 0.98)
    assert (rho[partial] - r_px).abs().max() < 1.0


def test_shapes_are_what_they_say():
    """Spot-check the geometry of each shape at its own reference points."""
    size = 64
    specs = [SceneSpec("red", s, "large", "center", "black") for s in SHAPES]
    a = coverage(render_batch(specs, size), specs)
    r = SIZES["large"] * size
    c = size / 2

    def at(shape, du, dv):  # coverage at offset (du, dv) in units of the half-extent
        return float(a[SHAPES.index(shape)][int(c + dv * r), int(c + du * r)])

    assert at("square", 0.85, 0.85) == 1 and at("circle", 0.85, 0.85) == 0
    assert at("diamond", 0.7, 0.0) == 1 and at("diamond", 0.6, 0.6) == 0
    assert at("cross", 0.8, 0.0) == 1 and at("cross", 0.6, 0.6) == 0
    assert at("triangle", -0.8, 0.85) == 1 and at("triangle", -0.8, -0.5) == 0   # points up


def test_jitter_reproducible_and_small():
    specs = sample_specs(16, torch.Generator().manual_seed(1))
    a = render_batch(specs, generator=torch.Generator().manual_seed(7))
    b = render_batch(specs, generator=torch.Generator().manual_seed(7))
    c = render_batch(specs, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    canon = render_batch(specs)
    assert torch.equal(canon, render_batch(specs, generator=torch.Generator().manual_seed(7), jitter=0.0))
    assert not torch.equal(a, canon)
    # Centres move by at most the position jitter (0.02 of the side).
    ax, ay = centroid(coverage(a, specs))
    cx, cy = centroid(coverage(canon, specs))
    shift = torch.maximum((ax - cx).abs(), (ay - cy).abs()) / 32
    assert shift.max() <= 0.02 + 0.01 and shift.max() > 0.002


def test_positions_and_sizes_land_where_named():
    specs = [SceneSpec("green", "square", z, p, "white") for z in SIZES for p in POSITIONS]
    a = coverage(render_batch(specs, 64), specs)
    x, y = centroid(a)
    for s, xi, yi, ai in zip(specs, x, y, a, strict=True):
        px, py = POSITIONS[s.position]
        assert abs(xi / 64 - px) < 0.01 and abs(yi / 64 - py) < 0.01
        assert abs(float(ai.sum()) - 4 * (SIZES[s.size] * 64) ** 2) < 0.02 * float(ai.sum())


def test_first_frame_matches_video():
    specs = sample_specs(6, torch.Generator().manual_seed(2), video=True)
    vids = render_batch(specs, generator=torch.Generator().manual_seed(11))
    firsts = first_frames(specs, generator=torch.Generator().manual_seed(11))
    assert torch.equal(vids[:, :, 0], firsts)
    assert torch.equal(first_frame(specs[0], generator=torch.Generator().manual_seed(11)), firsts[0])


@pytest.mark.parametrize("motion", MOTIONS)
def test_motion_realised(motion):
    pos = "center" if motion not in ("moving left", "moving up") else "bottom" if motion == "moving up" else "right"
    spec = SceneSpec("orange", "circle", "small", pos, "gray", motion)
    size, frames = 64, 8
    v = render_video(spec, frames, size, generator=torch.Generator().manual_seed(5))
    a = coverage(v[None], [spec])[0]                     # (T, H, W)
    x, y = centroid(a)
    x, y = x / size, y / size
    area = a.sum((-1, -2))
    dx, dy, growth = x[-1] - x[0], y[-1] - y[0], area[-1] / area[0]
    tol = 0.01
    if motion == "moving right":
        assert dx > 0.8 * TRAVEL and abs(dy) < tol and (x.diff() > 0).all()
    elif motion == "moving left":
        assert dx < -0.8 * TRAVEL and abs(dy) < tol and (x.diff() < 0).all()
    elif motion == "moving up":
        assert dy < -0.8 * TRAVEL and abs(dx) < tol and (y.diff() < 0).all()
    elif motion == "moving down":
        assert dy > 0.8 * TRAVEL and abs(dx) < tol and (y.diff() > 0).all()
    elif motion == "bouncing":
        # Rises (y decreases) and comes back down to where it started, twice.
        assert abs(dy) < tol and abs(dx) < tol and y.min() < y[0] - 0.1
        assert (y.diff().sign().diff() != 0).sum() >= 2
    elif motion == "growing":
        assert growth > 0.9 * GROW_TO ** 2 and (area.diff() > 0).all() and abs(dx) < tol and abs(dy) < tol
    elif motion == "shrinking":
        assert growth < 1.1 * SHRINK_TO ** 2 and (area.diff() < 0).all() and abs(dx) < tol and abs(dy) < tol


def test_scene_geometry_matches_spec():
    specs = [SceneSpec("red", "circle", "large", "left", "white", "moving right")]
    g = scene_geometry(specs, 8)
    assert torch.allclose(g["cx"][0, 0], torch.tensor(0.3)) and torch.allclose(g["cx"][0, -1], torch.tensor(0.55))
    assert torch.allclose(g["r"], torch.full((1, 8), SIZES["large"]))


# ----------------------------------------------------------------------------- text

def test_tokenizer_round_trip_and_unknown_words():
    tok = Tokenizer()
    prompts = [s.prompt for s in all_specs(True)[::37]] + [s.prompt for s in all_specs()[::11]]
    ids, mask = tok.encode(prompts)
    assert ids.shape == mask.shape == (len(prompts), tok.max_len) and ids.dtype == torch.long
    assert mask.dtype == torch.bool
    assert (ids[~mask] == tok.pad_id).all() and (ids[mask] > tok.unk_id).all()
    assert tok.decode(ids, mask) == [" ".join(tok.words(p)) for p in prompts]
    ids, mask = tok.encode(["a small pink circle", ""])
    assert ids[0, 2] == tok.unk_id and mask[0].sum() == 4 and not mask[1].any()
    assert tok.unknown_words("a small PINK circle, zzz") == ["pink", "zzz"]
    ids, mask = Tokenizer(max_len=3).encode(["a small red circle"])
    assert ids.shape == (1, 3) and mask.all()
    with pytest.raises(TypeError):
        tok.encode("a small red circle")
    with pytest.raises(ValueError, match="max_len"):
        Tokenizer(max_len=0)


def test_text_encoder_shapes_and_masking(seed):
    enc = TextEncoder(dim=32, layers=2, heads=4).eval()
    prompts = ["a small red circle on the left, white background", "a large blue cross at the top, black "
               "background, moving down", ""]
    tokens, mask, pooled = enc.encode(prompts)
    assert tokens.shape == (3, enc.max_len, 32) and pooled.shape == (3, 32) and mask.shape == (3, enc.max_len)
    assert torch.isfinite(tokens).all() and torch.isfinite(pooled).all()
    assert (tokens[~mask] == 0).all() and (pooled[2] == 0).all()
    assert torch.allclose(pooled[0], tokens[0][mask[0]].mean(0), atol=1e-6)
    # Padding never leaks: the ids in padded slots and the batch mates change nothing.
    ids, m = enc.tokenizer.encode(prompts[:2])
    ids2 = ids.clone()
    ids2[~m] = torch.randint(2, enc.tokenizer.vocab_size, (int((~m).sum()),))
    with torch.no_grad():
        t1, _, p1 = enc(ids, m)
        t2, _, p2 = enc(ids2, m)
        t3, _, p3 = enc(ids[:1], m[:1])
    assert torch.allclose(t1, t2, atol=1e-5) and torch.allclose(p1, p2, atol=1e-5)
    assert torch.allclose(t1[:1], t3, atol=1e-5) and torch.allclose(p1[:1], p3, atol=1e-5)
    # Different prompts, different embeddings; gradients reach the embeddings.
    assert (p1[0] - p1[1]).abs().max() > 1e-3
    enc.train()
    _, _, p = enc.encode(prompts)
    p.square().sum().backward()
    assert enc.token.weight.grad is not None and enc.token.weight.grad.abs().sum() > 0


def test_text_encoder_bad_input():
    enc = TextEncoder(dim=16, layers=1, heads=2)
    ids, mask = enc.tokenizer.encode(["a red circle"])
    with pytest.raises(ValueError, match="mask"):
        enc(ids, mask.long())
    with pytest.raises(ValueError, match="ids"):
        enc(ids.float(), mask)
    with pytest.raises(ValueError, match="ids"):
        enc(ids + 1000, mask)
    with pytest.raises(ValueError, match="heads"):
        TextEncoder(dim=30, heads=4)


# ----------------------------------------------------------------------------- dataset

def test_prompt_dataset_tasks():
    g = torch.Generator().manual_seed(0)
    t2i = PromptDataset("t2i", "heldout")
    items = t2i.sample(5, g)
    assert len(items) == 5 and all(it.image is None for it in items)
    assert all(split_of(parse_prompt(it.text)) == "heldout" and parse_prompt(it.text).motion is None for it in items)
    t2v = PromptDataset("t2v", "train", frames=6)
    assert all(parse_prompt(it.text).motion is not None for it in t2v.sample(4, g))
    i2v = PromptDataset("i2v", "train", size=64)
    items = i2v.sample(3, torch.Generator().manual_seed(9))
    assert all(it.image.shape == (3, 64, 64) for it in items)
    # The i2v image is the first frame of its scene.
    for it in i2v.fixed(3):
        assert torch.equal(it.image, first_frame(parse_prompt(it.text), 64))
    with pytest.raises(ValueError, match="task"):
        PromptDataset("t2a")
    with pytest.raises(ValueError, match="split"):
        PromptDataset("t2i", "val")


def test_prompt_dataset_fixed_is_deterministic_and_varied():
    ds = PromptDataset("t2i", "heldout")
    a, b = ds.fixed(40), ds.fixed(40)
    assert [x.text for x in a] == [x.text for x in b]
    assert len({x.text for x in a}) == 40
    assert len({parse_prompt(x.text).color for x in a}) == len(COLORS)
    assert len({parse_prompt(x.text).shape for x in a}) == len(SHAPES)
    assert len(ds.fixed(len(ds) + 5)) == len(ds) + 5


def test_training_batch():
    g = torch.Generator().manual_seed(0)
    px, prompts = PromptDataset("t2i", size=32).training_batch(4, g)
    assert px.shape == (4, 3, 32, 32) and len(prompts) == 4
    px, prompts = PromptDataset("t2v", frames=5).training_batch(3, g)
    assert px.shape == (3, 3, 5, 32, 32)
    px, prompts, first = PromptDataset("i2v", frames=4).training_batch(2, g)
    assert px.shape == (2, 3, 4, 32, 32) and torch.equal(first, px[:, :, 0])
    assert all(split_of(parse_prompt(p)) == "train" for p in prompts)
    # Reproducible from the generator.
    a = PromptDataset("t2v").training_batch(3, torch.Generator().manual_seed(1))
    b = PromptDataset("t2v").training_batch(3, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
