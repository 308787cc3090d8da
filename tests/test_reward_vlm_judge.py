"""vlm_judge against a fake OpenAI-compatible chat server on the loopback address."""

import base64
import io
import json
import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dancegrpo.registry import build_reward
from dancegrpo.rewards.remote import RemoteRewardError
from dancegrpo.trainer import Trainer, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "dancegrpo" / "configs"


class FakeJudge:
    """A chat server that answers ``answers[i % len]`` and keeps every request it got."""

    def __init__(self, answers, status=200):
        self.answers, self.status, self.requests = list(answers), status, []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    n = len(judge.requests)
                    judge.requests.append((self.path, body, dict(self.headers)))
                reply = {"choices": [{"message": {"role": "assistant", "content": judge.answers[n % len(judge.answers)]}}]}
                data = json.dumps(reply).encode() if judge.status == 200 else b'{"error": "no such model"}'
                self.send_response(judge.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def _decode(url: str) -> torch.Tensor:
    assert url.startswith("data:image/png;base64,")
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))), dtype=np.float32) / 255
    return torch.from_numpy(pixels).permute(2, 0, 1)


def _eight_bit(x):
    return (x * 255).round() / 255


def test_scores_are_parsed_and_mapped_and_the_request_carries_prompt_and_image():
    g = torch.Generator().manual_seed(0)
    samples = torch.rand(3, 3, 8, 10, generator=g)
    with FakeJudge(["Score: 7", "I'd say 10/10", "1"]) as judge:
        reward = build_reward("vlm_judge", url=judge.url, model="judge-vl", score_range=[1, 10], concurrency=1,
                              template="Does it show {prompt}? Score 1-10.")
        scores = reward(samples, ["a cat", "a dog", "a fox"])
    torch.testing.assert_close(scores, torch.tensor([6 / 9, 1.0, 0.0]))
    assert len(judge.requests) == 3
    for (path, body, _), sample, prompt in zip(judge.requests, samples, ["a cat", "a dog", "a fox"], strict=True):
        assert path == "/v1/chat/completions" and body["model"] == "judge-vl" and body["temperature"] == 0.0
        text, image = body["messages"][0]["content"]
        assert text == {"type": "text", "text": f"Does it show {prompt}? Score 1-10."}
        torch.testing.assert_close(_decode(image["image_url"]["url"]), _eight_bit(sample), rtol=0, atol=1e-6)


def test_video_sends_evenly_spaced_frames():
    clip = torch.rand(1, 3, 7, 6, 6, generator=torch.Generator().manual_seed(1))
    with FakeJudge(["5"]) as judge:
        build_reward("vlm_judge", url=judge.url, model="m", frames=3)(clip, ["moving right"])
    images = [part for part in judge.requests[0][1]["messages"][0]["content"] if part["type"] == "image_url"]
    assert len(images) == 3
    for part, t in zip(images, [0, 3, 6], strict=True):
        torch.testing.assert_close(_decode(part["image_url"]["url"]), _eight_bit(clip[0, :, t]), rtol=0, atol=1e-6)


def test_an_answer_without_a_score_is_nan_and_logged(caplog):
    with FakeJudge(["I cannot rate this.", "11", "8"]) as judge, caplog.at_level(logging.WARNING):
        scores = build_reward("vlm_judge", url=judge.url, model="m", score_range=[1, 10], concurrency=1)(
            torch.rand(3, 3, 4, 4), ["a", "b", "c"])
    assert math.isnan(scores[0]) and math.isnan(scores[1]) and scores[2] == pytest.approx(7 / 9)
    assert "I cannot rate this." in caplog.text and "'11'" in caplog.text


def test_unreachable_and_refused_endpoints_fail_the_batch_with_the_cause():
    with FakeJudge(["1"]) as judge:
        url = judge.url
    with pytest.raises(RemoteRewardError, match="unreachable") as exc:  # the server is gone
        build_reward("vlm_judge", url=url, model="m", retries=1, backoff=0.0, timeout=5)(torch.rand(1, 3, 4, 4), ["a"])
    assert exc.value.whole_batch and "after 2 attempts" in str(exc.value)
    with FakeJudge(["1"], status=404) as judge:
        with pytest.raises(RemoteRewardError, match="HTTP 404.*no such model"):
            build_reward("vlm_judge", url=judge.url, model="m", retries=3, backoff=0.0)(torch.rand(1, 3, 4, 4), ["a"])
    assert len(judge.requests) == 1  # a 4xx is not retried


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({"url": "localhost:8000"}, "url must look like"),
    ({"template": "no placeholder"}, "{prompt}"),
    ({"score_range": [10, 1]}, "score_range"),
    ({"frames": 0}, "frames must be an integer >= 1"),
    ({"api_key_env": "DANCEGRPO_TEST_NO_SUCH_KEY"}, "environment variable is empty"),
])
def test_bad_settings_are_one_line(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("{", r"\{").replace("}", r"\}")):
        build_reward("vlm_judge", **{"url": "http://127.0.0.1:9/v1", "model": "m", **kwargs})


def test_grpo_trains_with_the_judge(tmp_path):
    with FakeJudge(["3", "9", "6", "4"]) as judge:
        spec = [{"name": "vlm_judge", "kwargs": {"url": judge.url, "model": "m", "score_range": [1, 10]}}]
        cfg = load_config(CONFIGS / "toy.yaml", [f"output_dir={tmp_path}", "max_steps=2", "log.progress=false",
                                                 "checkpoint_every=0", "log.sample_every=0", "log.num_sample_prompts=0",
                                                 "rollout.prompts_per_step=2", "rollout.group_size=4",
                                                 "rewards=" + json.dumps(spec)])
        history = Trainer(cfg).train()
    assert [m["step"] for m in history] == [1, 2] and len(judge.requests) == 16
    assert all(0 <= m["reward_mean"] <= 1 for m in history)
