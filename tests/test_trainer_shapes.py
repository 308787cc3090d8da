"""Short end-to-end GRPO runs on the shapes world (T2I, T2V, I2V) with the shipped configs.

Uses tiny overrides (one prompt, two samples, three sampler steps, 16-pixel frames, a randomly
initialised policy) so each run takes seconds.
"""

from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "dancegrpo" / "configs"


@pytest.mark.parametrize("task", ["t2i", "t2v", "i2v"])
def test_shapes_short_run(tmp_path, task):
    from dancegrpo.trainer import Trainer, load_config

    # small frames (16 px, 4 frames) and 3 sampler steps (the video configs train a window of 2) keep each
    # run to a few seconds on CPU
    cfg = load_config(CONFIGS / f"shapes_{task}.yaml", [
        f"output_dir={tmp_path}", "max_steps=1", "device=cpu", "log.progress=false", "log.sample_every=1",
        "log.num_sample_prompts=1", "checkpoint_every=1", "model.kwargs.pretrained=false",
        "model.kwargs.size=16", "data.kwargs.size=16", "model.kwargs.frames=4", "data.kwargs.frames=4",
        "rollout.prompts_per_step=1", "rollout.group_size=2", "sampler.num_steps=3",
        "optim.train_batch_size=2", "optim.gradient_accumulation_steps=1", "eval.batch_size=2"])
    history = Trainer(cfg).train()
    assert [m["step"] for m in history] == [1]
    for m in history:
        assert m["skipped"] == 0 and m["loss"] == m["loss"]
        assert abs(m["ratio_first_update"] - 1) < 1e-4
    suffix = ".png" if task == "t2i" else ".gif"
    assert (tmp_path / "samples" / f"step_000001{suffix}").is_file()
    assert (tmp_path / "checkpoints" / "step_00000001" / "COMPLETE").is_file()
