"""The base-model pretraining script: label noise, image -> video inflation, and a few real
steps of each task end to end (tiny models, so it runs in seconds)."""

import json

import pytest
import torch

from dancegrpo.worlds.shapes.dataset import PromptDataset
from dancegrpo.worlds.shapes.grammar import COLORS, SHAPES, sample_specs
from dancegrpo.worlds.shapes.policy import ShapesPolicy
from dancegrpo.worlds.shapes.pretrain import (
    add_image_condition,
    corrupt,
    flow_matching_loss,
    inflate_image_policy,
    main,
    training_batch,
)
from dancegrpo.worlds.shapes.rewards import AlignmentReward

TINY = dict(hidden_size=32, depth=2, num_heads=2)


def _image_policy(seed=0):
    torch.manual_seed(seed)
    policy = ShapesPolicy("t2i", dit=TINY)
    # adaLN-Zero starts with a zero final layer and zero gates: randomise every parameter so
    # the inflation checks below compare real numbers, not zeros.
    with torch.no_grad():
        for p in policy.parameters():
            p.normal_(0, 0.1)
    return policy.eval()


def test_corrupt_rates():
    g = torch.Generator().manual_seed(0)
    specs = sample_specs(4000, g, video=True)
    noisy = corrupt(specs, 0.3, torch.Generator().manual_seed(1))
    for attr in ("color", "shape", "motion"):
        rate = sum(getattr(a, attr) != getattr(b, attr) for a, b in zip(specs, noisy, strict=True)) / len(specs)
        assert abs(rate - 0.3) < 0.03, (attr, rate)
    assert all(n.size == s.size and n.position == s.position for s, n in zip(specs, noisy, strict=True))
    assert all(c in COLORS for c in (s.color for s in noisy)) and all(s.shape in SHAPES for s in noisy)
    assert corrupt(specs[:50], 0.0, g) == specs[:50]


def test_i2v_captions_contradict_the_frame_and_the_clip_follows_the_frame():
    """Image-to-video pretraining: a corrupted caption names another colour or shape than the
    given first frame shows, and the clip to learn is the frame's scene, not the caption's."""
    data = PromptDataset("i2v", split=None, frames=4)
    x0, captions, first = training_batch(data, 64, torch.Generator().manual_seed(0), label_noise=0.5)
    align = AlignmentReward(("color", "shape"))
    # The frames and clips are the true scenes; about 3/4 of the captions misname colour or shape.
    true = align.correct(first, [c for c in captions])
    assert 0.6 * 64 < int((~true).sum()) < 0.9 * 64
    torch.testing.assert_close(first, (x0[:, :, 0] + 1) / 2)
    clean = training_batch(data, 64, torch.Generator().manual_seed(0), label_noise=0.0)[1]
    assert align.correct(first, clean).all()


def test_motion_weight_adds_the_frame_difference_error():
    """loss(w) = mse(err) + w mse(err[t+1] - err[t]) with err the velocity error; images ignore w."""
    policy = inflate_image_policy(_image_policy(), "t2v", frames=4)
    data = PromptDataset("t2v", split=None, frames=4)
    x0, captions, _ = training_batch(data, 3, torch.Generator().manual_seed(0), label_noise=0.0)
    pred = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    policy.predict = lambda *a: pred
    g = lambda: torch.Generator().manual_seed(1)
    plain = flow_matching_loss(policy, x0, captions, None, g())
    weighted = flow_matching_loss(policy, x0, captions, None, g(), motion_weight=2.0)
    noise = torch.randn(x0.shape, generator=g())
    err = pred - (noise - x0)
    torch.testing.assert_close(plain, err.pow(2).mean())
    torch.testing.assert_close(weighted, err.pow(2).mean() + 2.0 * (err[:, :, 1:] - err[:, :, :-1]).pow(2).mean())
    image = _image_policy()
    xi = x0[:, :, 0]
    image.predict = lambda *a: pred[:, :, 0]
    torch.testing.assert_close(flow_matching_loss(image, xi, captions, None, g(), motion_weight=2.0),
                               flow_matching_loss(image, xi, captions, None, g()))


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_inflated_video_policy_starts_from_the_image_model(task):
    image = _image_policy()
    video = inflate_image_policy(image, task, frames=4, temporal_patch=2)
    assert video.task == task and video.dit.config.patch_size == (2, 4, 4)
    assert video.dit.config.image_condition == (task == "i2v")
    # Same text encoder and transformer blocks.
    for name, p in image.state_dict().items():
        if not name.startswith(("dit.patch_embed.weight", "dit.final.linear")):
            assert torch.equal(p, video.state_dict()[name]), name
    # A static clip's tokens enter the blocks exactly as its image's do (patch, absolute
    # position and frame embeddings together), whatever the i2v condition says.
    x = torch.randn(2, 3, 32, 32)
    clip = x[:, :, None].expand(2, 3, 4, 32, 32)
    first = torch.randn(2, 3, 32, 32) if task == "i2v" else None
    with torch.no_grad():
        ei, _ = image.dit.embed(x)                                        # (2, 64, hidden)
        ev, grid = video.dit.embed(clip, first)
        assert grid == (2, 8, 8)
        ev = ev.view(2, 2, 64, -1)
        torch.testing.assert_close(ev, ei[:, None].expand_as(ev), rtol=1e-5, atol=1e-5)
        # The final layer writes the image's patch into both frames of a temporal patch.
        h = torch.randn(2, 64, image.dit.config.hidden_size)
        c = torch.randn(2, image.dit.config.hidden_size)
        out_i = image.dit._unpatchify(image.dit.final(h, c), (1, 8, 8))  # (2, 3, 1, 32, 32)
        out_v = video.dit._unpatchify(video.dit.final(h, c), (1, 8, 8))  # (2, 3, 2, 32, 32)
    torch.testing.assert_close(out_v, out_i.expand_as(out_v))


def test_add_image_condition_starts_as_the_t2v_model():
    t2v = inflate_image_policy(_image_policy(), "t2v", frames=4)
    with torch.no_grad():
        for p in t2v.parameters():
            p.normal_(0, 0.1)
    i2v = add_image_condition(t2v.eval()).eval()
    assert i2v.task == "i2v" and i2v.dit.config.image_condition and i2v.frames == 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 32, 32, generator=g)
    prompts = ["a small red circle on the left, white background, moving right"] * 2
    first = torch.rand(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        want = t2v.predict(x, torch.full((2,), 300.0), t2v.encode_prompts(prompts))
        got = i2v.predict(x, torch.full((2,), 300.0), i2v.encode_prompts(prompts, first))
    # The frame's inputs start at zero weight: the frames after the first are the t2v model's.
    torch.testing.assert_close(got[:, :, 1:], want[:, :, 1:])
    # Frame 0 is pinned to the given frame: its exact velocity (x - frame) / sigma.
    torch.testing.assert_close(got[:, :, 0], (x[:, :, 0] - (2 * first - 1)) / 0.3)
    i2v.pin_first_frame = False
    with torch.no_grad():
        torch.testing.assert_close(i2v.predict(x, torch.full((2,), 300.0), i2v.encode_prompts(prompts, first)), want)
    with pytest.raises(ValueError, match="expected a 't2v' policy"):
        add_image_condition(_image_policy())


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_inflated_video_policy_with_one_frame_per_token_predicts_like_the_image_model(task):
    """With one frame per token and a static clip, every frame's prediction is (nearly) the
    image's: each token starts as its image token, and attention to the other frames' copies of
    the same tokens mostly repeats keys (only the relative temporal RoPE rotation differs:
    measured 5e-5 relative error). Without the frame embedding's correction it is O(1)."""
    image = _image_policy()
    video = inflate_image_policy(image, task, frames=4).eval()
    assert video.dit.config.patch_size == (1, 4, 4) and video.dit.config.frame_embedding == 4
    prompts = ["a large blue square in the center, black background, moving left"] * 2
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    first = x.clamp(-1, 1) * 0.5 + 0.5 if task == "i2v" else None
    t = torch.full((2,), 400.0)
    with torch.no_grad():
        ei, _ = image.dit.embed(x)
        ev, _ = video.dit.embed(x[:, :, None].expand(2, 3, 4, 32, 32), first)
        torch.testing.assert_close(ev.view(2, 4, 64, -1), ei[:, None].expand(2, 4, 64, -1), rtol=1e-5, atol=1e-5)
        want = image.predict(x, t, image.encode_prompts(prompts))
        video.pin_first_frame = False  # the network's own prediction for every frame
        got = video.predict(x[:, :, None].expand(2, 3, 4, 32, 32), t, video.encode_prompts(prompts, first))
    err = (got - want[:, :, None]).norm() / (want[:, :, None].expand_as(got).norm())
    assert err < 1e-3, float(err)
    with torch.no_grad():  # the frame embedding is what makes it so
        video.dit.frame_embed.zero_()
        off = video.predict(x[:, :, None].expand(2, 3, 4, 32, 32), t, video.encode_prompts(prompts, first))
    assert (off - want[:, :, None]).norm() / want[:, :, None].expand_as(off).norm() > 0.05


def test_i2v_sampling_lands_the_first_frame_on_the_given_one():
    """With the first frame pinned, the deterministic sampler ends frame 0 exactly on the given
    frame (up to float rounding), whatever the network's weights; the t2v model does not."""
    from dancegrpo.trainer.config import load_config
    from dancegrpo.trainer.evaluate import generate
    from dancegrpo.trainer.policy import build_run_sampler

    i2v = inflate_image_policy(_image_policy(), "i2v", frames=4).eval()
    assert i2v.pin_first_frame and ShapesPolicy("t2v").pin_first_frame is False
    items = PromptDataset("i2v", split="heldout").fixed(3)
    cfg = load_config("shapes_i2v")
    samples, _ = generate(i2v, build_run_sampler(cfg, i2v), items, mode="ode", seed=0)
    given = torch.stack([it.image for it in items])
    torch.testing.assert_close(samples[:, :, 0], given, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="pin_first_frame needs task 'i2v'"):
        ShapesPolicy("t2v", pin_first_frame=True)


def test_inflate_rejects_wrong_inputs():
    image = _image_policy()
    with pytest.raises(ValueError, match="temporal_patch"):
        inflate_image_policy(image, "t2v", frames=8, temporal_patch=3)
    with pytest.raises(ValueError, match="task must be 't2v' or 'i2v'"):
        inflate_image_policy(image, "t2i")
    with pytest.raises(ValueError, match="must be a 't2i' policy"):
        inflate_image_policy(ShapesPolicy("t2v", dit=TINY), "t2v")


def test_training_batch_corrupts_captions_only():
    clean = PromptDataset("t2v", split=None, frames=4).training_batch(6, torch.Generator().manual_seed(0))
    x0, captions, first = training_batch(PromptDataset("t2v", split=None, frames=4), 6,
                                         torch.Generator().manual_seed(0), label_noise=0.0)
    torch.testing.assert_close(x0, clean[0] * 2 - 1)
    assert captions == clean[1] and first is None


def test_i2v_pretraining_conditions_on_the_first_frame_as_a_rollout_does():
    """The policy gets the clip's own first frame in [0, 1], the range GRPO rollouts and
    evaluation give it (the shipped I2V model was pretrained on (frame + 1) / 2 by mistake)."""
    data = PromptDataset("i2v", split=None, frames=4)
    x0, captions, first = training_batch(data, 3, torch.Generator().manual_seed(0), label_noise=0.0)
    frame = (x0[:, :, 0] + 1) / 2
    torch.testing.assert_close(first, frame)
    policy = inflate_image_policy(_image_policy(), "i2v", frames=4)
    seen, encode = [], policy.encode_prompts
    policy.encode_prompts = lambda texts, images=None: seen.append(images) or encode(texts, images)
    loss = flow_matching_loss(policy, x0, captions, first, torch.Generator().manual_seed(1))
    assert torch.isfinite(loss) and len(seen) == 1
    torch.testing.assert_close(seen[0], frame)


def _run(tmp_path, name, *extra):
    out = tmp_path / name
    main(["--steps", "4", "--batch", "2", "--eval-n", "2", "--threads", "1", "--dit", json.dumps(TINY),
          "--out", str(out), *extra])
    return out


def test_pretrain_script_end_to_end(tmp_path):
    out = _run(tmp_path, "t2i", "--task", "t2i", "--save-every", "2", "--snapshots", "1,3")
    stats = json.loads((out / "eval.json").read_text())
    assert stats["task"] == "t2i" and stats["steps"] == 4 and stats["num_prompts"] == 2
    assert 0 <= stats["correct_rate"] <= 1
    assert all(0 <= stats[f"correct_rate_{a}"] <= 1 for a in ("color", "shape", "size", "position"))
    assert json.loads((out / "progress.json").read_text()) == {"step": 2}
    for step in (1, 3):  # kept snapshots load as policies
        assert ShapesPolicy.from_pretrained(out / f"step_{step}").task == "t2i"
    assert not (out / "step_2").exists()
    trained = ShapesPolicy.from_pretrained(out)
    # Continue the image model, then inflate it into both video tasks.
    more = _run(tmp_path, "t2i_more", "--task", "t2i", "--init", str(out))
    assert json.loads((more / "eval.json").read_text())["init"] == str(out)
    for task in ("t2v", "i2v"):
        vid = _run(tmp_path, task, "--task", task, "--frames", "4", "--init-image", str(out))
        stats = json.loads((vid / "eval.json").read_text())
        assert stats["task"] == task and "reward_shapes_motion_mean" in stats and stats["init_image"] == str(out)
        policy = ShapesPolicy.from_pretrained(vid)
        assert policy.task == task and policy.frames == 4
        # The text encoder was copied from the image model, then trained further.
        assert policy.text_encoder.token.weight.shape == trained.text_encoder.token.weight.shape
    i2v = _run(tmp_path, "i2v_from_t2v", "--task", "i2v", "--frames", "4", "--init-t2v", str(tmp_path / "t2v"))
    assert json.loads((i2v / "eval.json").read_text())["init_t2v"] == str(tmp_path / "t2v")
    for bad in (["--task", "t2v", "--init", str(out), "--init-image", str(out)],
                ["--task", "t2v", "--init-t2v", str(tmp_path / "t2v")],
                ["--task", "t2i", "--snapshots", "100,x"],
                ["--task", "t2i", "--steps", "0"]):
        with pytest.raises(SystemExit):
            _run(tmp_path, "bad", *bad)
