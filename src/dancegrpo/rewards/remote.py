"""``remote``: a reward scored by a reward service (``dancegrpo serve-reward``) over HTTP.

    rewards: [{name: remote, kwargs: {url: "http://127.0.0.1:8765", timeout: 60, retries: 2}}]

Each call sends the batch (raw pixels, see :mod:`dancegrpo.rewards.wire`) to ``url/score``.
A server that is down, slow (past ``timeout`` seconds) or failing (HTTP 5xx) is retried
``retries`` times with a short backoff, then the call raises :class:`RemoteRewardError` with
the cause: the trainer's scoring records the error and those samples are dropped (NaN); after
``max_invalid_steps`` steps without a valid sample the run stops naming the reward. Every call
starts afresh, so a restarted server is picked up at the next step. An answer that does not
follow the format raises at once (retrying would get the same answer).
"""

from __future__ import annotations

import logging
import math
import time
import urllib.error
import urllib.parse
import urllib.request

import torch

from .wire import CONTENT_TYPE, DTYPES, WireError, decode_scores, encode_samples

__all__ = ["RemoteReward", "RemoteRewardError", "post_with_retries"]

log = logging.getLogger("dancegrpo.rewards.remote")


class RemoteRewardError(RuntimeError):
    """The reward service could not score a batch (the message says why). The trainer's
    scoring does not retry it sample by sample: the service would fail them alike."""

    whole_batch = True


def post_with_retries(request: urllib.request.Request, *, retries: int, backoff: float, timeout: float,
                      what: str = "") -> bytes:
    """The body of the answer to ``request``. Transport faults (down, slow) and HTTP 5xx are tried
    again ``retries`` times with a doubling backoff; a 4xx is not (asking again gets the same
    answer). Then :class:`RemoteRewardError` says why. ``what`` prefixes the message."""
    url = request.full_url
    base = urllib.parse.urlunsplit(urllib.parse.urlsplit(url)[:2] + ("", "", ""))
    cause = "no attempt"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(backoff * 2 ** (attempt - 1), 5.0))
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace").strip()
            cause = f"HTTP {exc.code} from {url}: {detail or exc.reason}"
            if exc.code < 500:
                break
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            cause = f"{base} unreachable: {type(reason).__name__}: {reason}"
    tries = f" (after {attempt + 1} attempts)" if attempt else ""
    raise RemoteRewardError(f"{what}{cause}{tries}")


class RemoteReward:
    """Scores through the reward service at ``url``.

    ``dtype`` ``uint8`` (default) sends 8-bit pixels, what learned rewards read; ``float32``
    sends the exact pixels, so the scores equal in-process scoring bit for bit.
    """

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 2, dtype: str = "uint8",
                 backoff: float = 0.5):
        parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"remote: url must look like http://HOST:PORT, got {url!r}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"remote: timeout must be a number of seconds > 0, got {timeout!r}")
        if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
            raise ValueError(f"remote: retries must be an integer >= 0, got {retries!r}")
        if dtype not in DTYPES:
            raise ValueError(f"remote: dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        if not isinstance(backoff, (int, float)) or isinstance(backoff, bool) or not backoff >= 0:
            raise ValueError(f"remote: backoff must be a number of seconds >= 0, got {backoff!r}")
        self.url = url.rstrip("/")
        self.timeout, self.retries, self.dtype, self.backoff = float(timeout), retries, dtype, float(backoff)
        self.name = "remote"
        self.served = None  # the served reward's name, from the last answer

    def __repr__(self) -> str:
        return f"RemoteReward(url={self.url!r}, dtype={self.dtype!r})"

    def _post(self, body: bytes) -> bytes:
        """The answer's body; transport faults and 5xx retried, then RemoteRewardError."""
        request = urllib.request.Request(f"{self.url}/score", data=body, method="POST",
                                         headers={"Content-Type": CONTENT_TYPE})
        return post_with_retries(request, retries=self.retries, backoff=self.backoff, timeout=self.timeout)

    def __call__(self, samples: torch.Tensor, prompts) -> torch.Tensor:
        if not isinstance(samples, torch.Tensor) or samples.dim() not in (4, 5) or samples.shape[1] != 3:
            raise ValueError(f"remote: samples must be (B, 3, H, W) or (B, 3, T, H, W), got "
                             f"{getattr(samples, 'shape', type(samples).__name__)}")
        prompts = list(prompts)
        answer = self._post(encode_samples(samples, prompts, self.dtype))
        try:
            scores, header = decode_scores(answer, samples.shape[0])
        except WireError as exc:
            raise RemoteRewardError(f"garbage answer from {self.url}/score: {exc}") from None
        self.served = header.get("reward")
        for error in header.get("errors") or []:
            log.warning("reward service %s (%s): %s", self.url, self.served, error)
        return scores.to(samples.device)
