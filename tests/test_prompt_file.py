"""prompt_file: text prompts from .txt, prompts with first frames from .jsonl (image-to-video)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dancegrpo.errors import ConfigError, MissingFileError
from dancegrpo.registry import build_dataset


def _png(path, h, w, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return np.asarray(Image.open(path), dtype=np.float32) / 255.0


def _jsonl(tmp_path, rows):
    p = tmp_path / "sub" / "prompts.jsonl"
    p.parent.mkdir(exist_ok=True)
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def test_jsonl_images_are_read_relative_to_the_file(tmp_path):
    (tmp_path / "sub" / "frames").mkdir(parents=True)
    pixels = [_png(tmp_path / "sub" / "frames" / f"{i}.png", 12, 20, i) for i in range(4)]
    p = _jsonl(tmp_path, [{"prompt": f"clip {i}", "image": f"frames/{i}.png"} for i in range(4)])
    train = build_dataset("prompt_file", path=str(p), task="i2v", split="train", eval_fraction=0.25)
    held = build_dataset("prompt_file", path=str(p), task="i2v", split="heldout", eval_fraction=0.25)
    assert train.prompts == ["clip 0", "clip 1", "clip 2"] and held.prompts == ["clip 3"]
    items = train.fixed(4)
    assert [it.text for it in items] == ["clip 0", "clip 1", "clip 2", "clip 0"]
    for it, want in zip(items, [pixels[0], pixels[1], pixels[2], pixels[0]], strict=True):
        assert it.image.shape == (3, 12, 20) and it.image.dtype == torch.float32
        torch.testing.assert_close(it.image, torch.from_numpy(want).permute(2, 0, 1), rtol=0, atol=0)
    drawn = train.sample(5, torch.Generator().manual_seed(0))
    assert all(it.image.shape == (3, 12, 20) for it in drawn)


def test_jsonl_image_size_resizes_and_mixed_sizes_need_it(tmp_path):
    (tmp_path / "sub").mkdir()
    _png(tmp_path / "sub" / "a.png", 12, 20, 0)
    _png(tmp_path / "sub" / "b.png", 30, 16, 1)
    p = _jsonl(tmp_path, [{"prompt": "a", "image": "a.png"}, {"prompt": "b", "image": "b.png"}])
    with pytest.raises(ConfigError, match=r"different sizes.*data.kwargs.image_size"):
        build_dataset("prompt_file", path=str(p), task="i2v")
    ds = build_dataset("prompt_file", path=str(p), task="i2v", image_size=[8, 10], eval_fraction=0.5)
    assert ds.fixed(1)[0].image.shape == (3, 8, 10)
    with pytest.raises(ConfigError, match="image_size"):
        build_dataset("prompt_file", path=str(p), task="i2v", image_size=[8])


@pytest.mark.parametrize(("rows", "error", "needle"), [
    ([{"prompt": "a", "image": "nope.png"}, {"prompt": "b"}], MissingFileError, "prompts.jsonl:1: image 'nope.png'"),
    ([{"prompt": "a"}, {"text": "b"}], ConfigError, "prompts.jsonl:2: expected an object"),
    ([{"prompt": "a"}, {"prompt": "b"}], ConfigError, "task=i2v needs a first frame"),
])
def test_jsonl_mistakes_name_the_line(tmp_path, rows, error, needle):
    p = _jsonl(tmp_path, rows)
    with pytest.raises(error, match=needle):
        build_dataset("prompt_file", path=str(p), task="i2v")


def test_jsonl_without_images_serves_text_tasks_and_bad_json_names_the_line(tmp_path):
    p = _jsonl(tmp_path, [{"prompt": "a cat"}, {"prompt": "a dog"}, {"prompt": "a fox"}])
    ds = build_dataset("prompt_file", path=str(p), task="t2v", eval_fraction=0.34)
    assert ds.prompts == ["a cat", "a dog"] and ds.fixed(1)[0].image is None
    p.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ConfigError, match=r"prompts.jsonl:2: invalid JSON"):
        build_dataset("prompt_file", path=str(p))


def test_txt_cannot_serve_image_to_video(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("a\nb\n")
    with pytest.raises(ConfigError, match="task=i2v needs a first frame"):
        build_dataset("prompt_file", path=str(p), task="i2v")
