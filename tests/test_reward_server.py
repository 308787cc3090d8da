"""The reward service and the ``remote`` and ``binary`` rewards.

Real servers (``dancegrpo serve-reward`` in a subprocess) on the loopback address: health,
scores equal to in-process scoring bit for bit, a GRPO run through the service equal to the
in-process run, a server killed mid-run and restarted, a server down for good, garbage and
slow answers. Every wait is bounded and every server is killed in a ``finally``.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from dancegrpo.cli import main
from dancegrpo.errors import ConfigError, RewardError
from dancegrpo.registry import build_reward
from dancegrpo.rewards.remote import RemoteReward, RemoteRewardError
from dancegrpo.rewards.wire import from_wire, to_wire
from dancegrpo.trainer import Trainer, load_config
from dancegrpo.trainer.scoring import WeightedReward, score_samples
from dancegrpo.worlds.shapes.grammar import sample_specs
from dancegrpo.worlds.shapes.renderer import render_batch
from dancegrpo.worlds.toy import ToyColourReward

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "dancegrpo" / "configs"
START_TIMEOUT = 90.0  # seconds for a server process to import torch and answer /health


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``dancegrpo serve-reward`` in a subprocess; ``start`` waits (bounded) for /health."""

    def __init__(self, name: str, *args: str, port: int | None = None, log_dir: Path):
        self.name, self.args, self.port, self.log_dir = name, args, port or free_port(), log_dir
        self.proc, self.starts = None, 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.starts += 1
        self.log = self.log_dir / f"server_{self.port}_{self.starts}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "dancegrpo", "serve-reward", self.name,
                                          "--port", str(self.port), *self.args], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}: {self.log.read_text()}")
            with contextlib.suppress(OSError):
                return self._check_health()
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"server not up in {START_TIMEOUT} s: {self.log.read_text()}")

    def _check_health(self) -> Server:
        with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
            self.health = json.loads(r.read())
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None


@contextlib.contextmanager
def serving(name, *args, tmp_path, port=None):
    server = Server(name, *args, port=port, log_dir=tmp_path)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def shapes_batch():
    """Rendered shapes scenes with a little noise, so their pixels are not all 8-bit values."""
    g = torch.Generator().manual_seed(0)
    specs = sample_specs(12, g)
    x = (render_batch(specs, generator=g) + 0.01 * torch.randn(12, 3, 32, 32, generator=g)).clamp(0, 1)
    return x, [s.prompt for s in specs]


def toy_cfg(tmp_path, *overrides):
    return load_config(CONFIGS / "toy.yaml", [f"output_dir={tmp_path}", "log.progress=false", "checkpoint_every=0",
                                              "log.sample_every=0", "log.num_sample_prompts=0",
                                              "rollout.prompts_per_step=2", "rollout.group_size=4", *overrides])


def remote_spec(url, **kwargs):
    return "rewards=" + json.dumps([{"name": "remote", "kwargs": {"url": url, **kwargs}}])


# --------------------------------------------------------------------------- binary


def test_binary_thresholds_any_reward_and_keeps_nan():
    x = torch.rand(16, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    prompts = ["red", "green", "blue", "white"] * 4
    inner = ToyColourReward()(x, prompts)
    t = float(inner.median())
    b = build_reward("binary", reward="toy", threshold=t)
    assert b.name == "binary(toy_colour)"
    assert torch.equal(b(x, prompts), (inner >= t).float())
    assert 0 < float(b(x, prompts).sum()) < 16
    b.inner = lambda s, p: torch.tensor([0.2, float("nan"), 0.9])
    out = b(x[:3], prompts[:3])
    assert out[0] == 0 and torch.isnan(out[1]) and out[2] == 1


def test_binary_bad_arguments_name_the_culprit():
    from dancegrpo.trainer.policy import build_named

    with pytest.raises(ConfigError, match="threshold"):
        build_named("reward", "binary", "rewards.0.name", reward="toy", threshold="high")
    with pytest.raises(ConfigError, match="unknown reward 'nosuch'"):
        build_named("reward", "binary", "rewards.0.name", reward="nosuch", threshold=0.5)


# --------------------------------------------------------------------------- the service


def test_serve_reward_health_and_scores_equal_in_process(tmp_path, shapes_batch, caplog):
    x, prompts = shapes_batch
    local = build_reward("shapes_alignment")
    with serving("shapes_alignment", "attributes=[color, shape]", tmp_path=tmp_path) as server:
        assert server.health["reward"] == "shapes_alignment" and server.health["device"] == "cpu"
        import dancegrpo
        assert server.health["version"] == dancegrpo.__version__
        exact = RemoteReward(server.url, dtype="float32")(x, prompts)
        assert exact.dtype == torch.float32 and torch.equal(exact, local(x, prompts))
        # 8-bit pixels (the default): the scores of the 8-bit samples, bit for bit
        eight = RemoteReward(server.url)(x, prompts)
        assert torch.equal(eight, local(from_wire(to_wire(x, "uint8")), prompts))
        assert not torch.equal(eight, exact)  # the noise is below 8 bits: the two wires differ
        # videos go through as (B, 3, T, H, W)
        v = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        assert torch.equal(RemoteReward(server.url, dtype="float32")(v, prompts[:2]), local(v, prompts[:2]))
        # a sample the served reward fails on is NaN, the others still scored; the cause is logged
        bad = [*prompts[:3], "not a prompt of the grammar"]
        with caplog.at_level(logging.WARNING, logger="dancegrpo.rewards.remote"):
            out = RemoteReward(server.url, dtype="float32")(x[:4], bad)
        assert torch.isnan(out[3]) and torch.equal(out[:3], local(x[:3], prompts[:3]))
        assert "failed on 1/4 samples" in caplog.text
        # a malformed request is a 400 naming what is wrong, not a crash of the server
        req = urllib.request.Request(f"{server.url}/score", data=b"\x05\x00\x00\x00{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=10)
        assert info.value.code == 400 and "header length" in info.value.read().decode()


def test_grpo_through_the_service_equals_in_process(tmp_path):
    def eight_bit_toy(samples, prompts):  # in-process scoring of what the uint8 wire carries
        return ToyColourReward()(from_wire(to_wire(samples, "uint8")), prompts)

    local = Trainer(toy_cfg(tmp_path / "local", "max_steps=3")).train()
    local8 = Trainer(toy_cfg(tmp_path / "local8", "max_steps=3"), rewards=[eight_bit_toy]).train()
    with serving("toy", tmp_path=tmp_path) as server:
        remote = Trainer(toy_cfg(tmp_path / "remote", "max_steps=3", remote_spec(server.url, dtype="float32"))).train()
        remote8 = Trainer(toy_cfg(tmp_path / "remote8", "max_steps=3", remote_spec(server.url))).train()
    keys = ("reward_mean", "reward_std", "adv_mean", "adv_std", "loss", "grad_norm", "ratio_first_update", "dropped")
    assert [[m[k] for k in keys] for m in remote] == [[m[k] for k in keys] for m in local]
    assert [m["reward_remote_mean"] for m in remote] == [m["reward_toy_mean"] for m in local]
    assert [[m[k] for k in keys] for m in remote8] == [[m[k] for k in keys] for m in local8]
    assert [m["reward_mean"] for m in remote8] != [m["reward_mean"] for m in local]  # 8 bits do differ


class Killer:
    """Forwards to a RemoteReward; kills the server before call ``kill_at`` and starts it again
    (same port) before call ``restart_at`` (calls counted from 1, one per training step)."""

    def __init__(self, server, remote, kill_at, restart_at):
        self.server, self.remote, self.kill_at, self.restart_at, self.calls = server, remote, kill_at, restart_at, 0

    def __call__(self, samples, prompts):
        self.calls += 1
        if self.calls == self.kill_at:
            self.server.stop()
        if self.calls == self.restart_at:
            self.server.start()
        return self.remote(samples, prompts)


def test_server_killed_mid_run_then_restarted(tmp_path, caplog):
    server = Server("toy", log_dir=tmp_path)
    try:
        server.start()
        remote = RemoteReward(server.url, timeout=5, retries=1, backoff=0.05)
        killer = Killer(server, remote, kill_at=3, restart_at=5)
        cfg = toy_cfg(tmp_path / "run", "max_steps=6", "max_invalid_steps=3")
        with caplog.at_level(logging.WARNING, logger="dancegrpo.trainer"):
            history = Trainer(cfg, rewards=[WeightedReward(killer, 1.0, "remote")]).train()
    finally:
        server.stop()
    batch = 2 * 4
    assert len(history) == 6 and server.starts == 2 and killer.calls == 6
    assert [m["dropped"] for m in history] == [0, 0, batch, batch, 0, 0]
    assert [m.get("reward_errors", 0) for m in history] == [0, 0, 1, 1, 0, 0]
    assert [m["trained_samples"] for m in history] == [batch, batch, 0, 0, batch, batch]
    assert "RemoteRewardError" in caplog.text and "unreachable" in caplog.text and "after 2 attempts" in caplog.text


def test_server_down_longer_than_max_invalid_steps_stops_the_run(tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    cfg = toy_cfg(tmp_path / "a", "max_steps=10", "max_invalid_steps=2", remote_spec(url, retries=0))
    with pytest.raises(RewardError, match=r"reward 'remote': RemoteRewardError: .*unreachable") as info:
        Trainer(cfg).train()
    assert "2 steps in a row" in str(info.value)
    # the command line: exit status 2 and one line naming the reward
    code = main(["train", str(CONFIGS / "toy.yaml"), f"output_dir={tmp_path / 'b'}", "log.progress=false",
                 "checkpoint_every=0", "log.num_sample_prompts=0", "max_invalid_steps=2", remote_spec(url, retries=0)])
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code == 2 and len(err) == 1 and "reward 'remote'" in err[0] and "unreachable" in err[0]


@contextlib.contextmanager
def fake_server(body: bytes, delay: float = 0.0):
    """A tiny HTTP server (stdlib, test only) that answers every POST with ``body``; yields its
    URL and the list of paths POSTed to."""
    posts = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            posts.append(self.path)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            time.sleep(delay)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            with contextlib.suppress(OSError):
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", posts
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def test_garbage_answer_is_nan_with_a_clear_cause(caplog):
    x, prompts = torch.rand(4, 3, 2, 2), ["red"] * 4
    with fake_server(b"<html>hello</html>") as (url, posts):
        remote = RemoteReward(url, timeout=5, retries=3)
        with pytest.raises(RemoteRewardError, match="garbage answer from .*header length"):
            remote(x, prompts)
        with caplog.at_level(logging.WARNING, logger="dancegrpo.trainer"):
            result = score_samples([WeightedReward(remote, 1.0, "remote")], x, prompts)
    assert torch.isnan(result.rewards).all() and not result.valid.any()
    assert "garbage answer" in result.failures["remote"] and "failed on 4/4 samples" in caplog.text
    # garbage is not retried, and the batch is not asked again sample by sample
    assert posts == ["/score", "/score"]


def test_slow_server_times_out_into_nan():
    x, prompts = torch.rand(2, 3, 2, 2), ["red"] * 2
    with fake_server(b"", delay=3.0) as (url, posts):
        result = score_samples([WeightedReward(RemoteReward(url, timeout=0.3, retries=1, backoff=0.0), 1.0, "remote")],
                               x, prompts)
    assert torch.isnan(result.rewards).all()
    assert "timed out" in result.failures["remote"] and "after 2 attempts" in result.failures["remote"]
    assert len(posts) == 2  # 1 + retries, for the whole batch


@pytest.mark.parametrize("argv, expected", [
    (["serve-reward", "nosuch"], "unknown reward 'nosuch'"),
    (["serve-reward", "toy", "--port", "0"], "--port must be in 1..65535"),
    (["serve-reward", "toy", "oops"], "key=value"),
    (["serve-reward", "toy", "colour=red"], "unexpected keyword argument 'colour'"),
    (["serve-reward", "toy", "--device", "warp9"], "--device 'warp9'"),
    (["serve-reward", "binary", "reward=toy", "threshold=x"], "threshold must be a finite number"),
])
def test_serve_reward_bad_arguments_are_one_line(argv, expected, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dancegrpo serve-reward: error:") and expected in err[0]


def test_remote_bad_kwargs_are_config_errors():
    from dancegrpo.trainer.policy import build_named

    for kwargs, match in [({"url": "localhost:1"}, "url must look like"), ({"url": "http://h:1", "timeout": 0},
                          "timeout"), ({"url": "http://h:1", "retries": -1}, "retries"),
                          ({"url": "http://h:1", "dtype": "float16"}, "dtype")]:
        with pytest.raises(ConfigError, match=match):
            build_named("reward", "remote", "rewards.0.name", **kwargs)


def test_serve_reward_port_in_use_is_one_line(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        assert main(["serve-reward", "toy", "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot listen there" in err[0]
