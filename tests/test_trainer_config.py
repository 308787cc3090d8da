"""Config: YAML round trip, overrides with type checking, clear errors, shipped configs validate."""

from pathlib import Path

import pytest

from dancegrpo.trainer.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    load_config,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "dancegrpo" / "configs"


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = TrainConfig().validate()
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_round_trip_after_overrides(tmp_path):
    cfg = load_config(CONFIGS / "toy.yaml", ["max_steps=7", "optim.lr=1e-4", "loss.clip_range_high=2e-4",
                                             "rewards=[{name: toy, weight: 0.5}, {name: toy, weight: 2}]",
                                             "lora.target_modules=[net.0, net.2]", "model.kwargs.hidden=32"])
    assert cfg.max_steps == 7 and cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.loss.clip_range_high == 2e-4
    assert [r.weight for r in cfg.rewards] == [0.5, 2.0]
    assert cfg.lora.target_modules == ["net.0", "net.2"]
    assert cfg.model.kwargs == {"task": "t2i", "hidden": 32}
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_override_types_and_list_index():
    cfg = load_config(None, ["resume=true", "rollout.group_size=4", "rewards.0.weight=3",
                             "advantage.clip=null", "optim.betas=[0.8, 0.9]"])
    assert cfg.resume is True and cfg.rollout.group_size == 4 and cfg.rewards[0].weight == 3.0
    assert cfg.advantage.clip is None and cfg.optim.betas == [0.8, 0.9]


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", r"unknown config key 'optim.lrr'; did you mean lr"),
    ("bogus=1", r"unknown config key 'bogus'"),
    ("max_steps=ten", r"max_steps: expected an integer, got 'ten'"),
    ("max_steps=1.5", r"max_steps: expected an integer"),
    ("resume=maybe", r"resume: expected true or false"),
    ("optim.lr=fast", r"optim.lr: expected a number"),
    ("optim=3", r"optim: expected a mapping"),
    ("rollout.group_size=1", r"rollout.group_size must be >= 2"),
    ("advantage.best_of_k=7", r"advantage.best_of_k must be <= group_size / 2"),
    ("timesteps.strategy=some", r"timesteps.strategy must be one of"),
    ("sampler.eta=0", r"sampler.eta must be finite > 0"),
    ("rewards.3.weight=1", r"expected a list index in \[0, 1\)"),
    ("noequals", r"override must look like key=value"),
    ("max_invalid_steps=-1", r"max_invalid_steps must be >= 0"),
    ("overwrite=true resume=true", r"overwrite must be false when resume=true"),
])
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override.split(" "))


def test_yaml_file_errors(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("optim:\n  lr: 1e-4\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match="optim.momentum"):
        load_config(p)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    # YAML 1.1 reads 1e-4 (no dot) as a string: a float field still takes it
    p.write_text("optim:\n  lr: 1e-4\n")
    assert load_config(p).optim.lr == 1e-4
    # a syntax error names the file, line and column
    p.write_text("seed: 0\nrewards:\n  - {name: toy, weight: 1.0\nmax_steps: 3\n")
    with pytest.raises(ConfigError, match=rf"^{p}:4:\d+: invalid YAML: .*expected ',' or '}}'"):
        load_config(p)


def test_configs_by_name_or_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("toy") == load_config(CONFIGS / "toy.yaml")
    assert load_config("toy.yaml") == load_config(CONFIGS / "toy.yaml")
    assert load_config("shapes_t2i").model.name == "shapes"
    (tmp_path / "toy").write_text("max_steps: 7\n")  # an existing file wins over a shipped name
    assert load_config("toy").max_steps == 7
    with pytest.raises(ConfigError, match=r"'toyy' is neither a file nor a shipped config \(did you mean toy\?\); "
                                          r"shipped configs: .*shapes_t2i.*toy"):
        load_config("toyy")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    from dancegrpo.trainer.config import shipped_configs

    configs = shipped_configs()
    assert configs["shapes_t2i"].startswith("GRPO on the shapes world, text-to-image")
    assert set(configs) == {p.stem for p in CONFIGS.glob("*.yaml")}


def test_apply_overrides_creates_sections():
    d = apply_overrides({}, ["a.b.c=1", "x=[1, 2]"])
    assert d == {"a": {"b": {"c": 1}}, "x": [1, 2]}
    with pytest.raises(ConfigError, match="is a value, not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])
    assert config_from_dict({}) == TrainConfig()


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_load_and_validate(name):
    cfg = load_config(CONFIGS / name)
    from dancegrpo.registry import DATASETS, MODELS, REWARDS

    assert cfg.model.name in MODELS
    assert cfg.data.name in DATASETS
    assert all(r.name in REWARDS for r in cfg.rewards)


def test_required_configs_exist():
    for name in ("toy", "shapes_t2i", "shapes_t2v", "shapes_i2v"):
        assert (CONFIGS / f"{name}.yaml").is_file(), name


def test_registries_build_by_name_and_explain_unknown_names():
    from dancegrpo.registry import (
        DATASETS,
        MODELS,
        REWARDS,
        build_dataset,
        build_model,
        build_reward,
    )

    assert set(MODELS.names()) == {"toy", "shapes", "flux", "sd3", "sd", "qwen_image", "wan", "wan_i2v",
                                   "hunyuanvideo", "skyreels_i2v"}
    assert set(DATASETS.names()) == {"toy", "shapes", "prompt_file"}
    assert set(REWARDS.names()) == {"toy", "shapes_alignment", "shapes_binary", "shapes_aesthetic",
                                    "shapes_motion", "jpeg_compressibility", "clip_score", "pickscore", "aesthetic",
                                    "hps_v2", "binary", "remote", "vlm_judge", "image_reward", "videoalign"}
    with pytest.raises(ValueError, match=r"unknown model 'tyo' \(did you mean toy"):
        build_model("tyo")
    with pytest.raises(ValueError, match=r"unknown model 'cogvideox'; known: toy, shapes, flux, sd3, sd"):
        build_model("cogvideox")
    with pytest.raises(ValueError, match=r"unknown reward 'shapes_alignmnt' \(did you mean shapes_alignment"):
        build_reward("shapes_alignmnt")
    with pytest.raises(ValueError, match=r"unknown prompt dataset 'shape' \(did you mean shapes"):
        build_dataset("shape")
    model = build_model("toy", task="t2v")
    assert model.latent_shape() == (3, 4, 2, 2)
    assert build_reward("toy").name == "toy_colour"
    assert len(build_dataset("toy", split="heldout").fixed(3)) == 3


def test_prompt_file_dataset(tmp_path):
    from dancegrpo.registry import build_dataset

    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(f"prompt {i}" for i in range(20)) + "\n\n")
    train = build_dataset("prompt_file", path=str(p), split="train")
    test = build_dataset("prompt_file", path=str(p), split="heldout")
    assert len(train) == 18 and len(test) == 2 and not set(train.prompts) & set(test.prompts)
    import torch

    assert [it.text for it in train.sample(3, torch.Generator().manual_seed(0))][0].startswith("prompt")
    with pytest.raises(FileNotFoundError, match="data.kwargs.path"):
        build_dataset("prompt_file", path=str(tmp_path / "none.txt"))
