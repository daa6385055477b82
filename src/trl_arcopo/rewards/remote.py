# Copyright 2026 The trl_arcopo contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""
Rewards computed by a remote server: one HTTP request with the standard library, and the timeout, retry and failure
policy that the VLM judge ([`~trl_arcopo.rewards.judge.VLMJudgeReward`]) and the reward-server client
([`~trl_arcopo.rewards.server.RewardServerClient`]) share.
"""

from __future__ import annotations

import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import TypeVar


logger = logging.getLogger(__name__)

T = TypeVar("T")

FAILURE_POLICIES = ("none", "raise")
#: HTTP statuses worth another attempt: the server is busy, restarting or overloaded. Other 4xx are not retried.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class AttemptError(Exception):
    """One attempt failed; `retry` says whether another attempt may succeed (a timeout) or not (a malformed reply)."""

    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


class RemoteRewardError(RuntimeError):
    """A request that failed after all its attempts: raised under `on_failure="raise"`, and by a client that cannot
    learn its reward's name."""


def quoted(text: str | bytes, limit: int = 500) -> str:
    """`text` as a Python literal, cut to `limit` characters (replies can be long)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _error_message(body: bytes) -> str:
    """The message of an error reply: `{"error": "..."}` (reward server), `{"error": {"message": ...}}` (OpenAI) or
    the raw body."""
    try:
        payload = json.loads(body)
        error = payload.get("error", payload) if isinstance(payload, dict) else payload
        if isinstance(error, dict):
            error = error.get("message", error)
        return str(error) if isinstance(error, str) else quoted(json.dumps(error))
    except (ValueError, UnicodeDecodeError):
        return quoted(body)


def http_request(
    url: str, data: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 60.0
) -> bytes:
    """
    One request (a POST of `data`, or a GET when `data` is `None`) and its reply body. Every failure is an
    [`AttemptError`]: timeouts, refused or dropped connections and HTTP 408/425/429/5xx may be retried, other HTTP
    errors may not. `timeout` bounds the connection and each read, in seconds (`urllib` semantics).
    """
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        body = error.read() if error.fp is not None else b""
        raise AttemptError(
            f"HTTP {error.code} {error.reason}: {_error_message(body)}", retry=error.code in RETRY_STATUSES
        ) from None
    except TimeoutError:  # `socket.timeout` is `TimeoutError` since Python 3.10
        raise AttemptError(f"no answer within timeout={timeout} s", retry=True) from None
    except urllib.error.URLError as error:
        if isinstance(error.reason, TimeoutError):
            raise AttemptError(f"no connection within timeout={timeout} s", retry=True) from None
        raise AttemptError(f"cannot connect: {error.reason}", retry=True) from None
    except (http.client.HTTPException, ConnectionError, OSError) as error:
        # the server closed the connection or died mid-reply (RemoteDisconnected, IncompleteRead, reset, ...)
        raise AttemptError(f"connection lost: {type(error).__name__}: {error}", retry=True) from None


def parse_json(body: bytes, what: str) -> object:
    """`body` as JSON, or an [`AttemptError`] (not retried) that quotes it and says what it should have been."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise AttemptError(f"the reply is not JSON ({what} expected): {quoted(body)}", retry=False) from None


class RemoteReward:
    r"""
    The timeout, retry and failure policy of a reward computed by a server, and its failure count.

    An attempt that fails with a timeout, a lost connection or HTTP 408/425/429/5xx is retried up to `max_retries`
    times, after `backoff * 2**i` seconds before retry `i` (0, 1, ...). A failure that is not worth retrying (another
    4xx, a malformed reply) ends the request at once. Then `on_failure` applies: `"none"` gives the videos of that
    request no opinion (`None`), adds them to `failures` and logs a warning per call; `"raise"` raises a
    [`RemoteRewardError`] (a `RuntimeError`) naming the URL, the attempts and the last error.

    Args:
        timeout (`float`, defaults to `60.0`): seconds an attempt may wait for the connection and for each read.
        max_retries (`int`, defaults to `3`): attempts after the first one.
        backoff (`float`, defaults to `1.0`): base of the exponential wait between attempts, in seconds.
        on_failure (`str`, defaults to `"none"`): `"none"` or `"raise"`.

    Attributes:
        failures (`int`): videos given `None` because their request failed, since creation (reset it by assigning 0).
        last_error (`str` or `None`): the message of the last failure.
    """

    def __init__(self, timeout: float = 60.0, max_retries: int = 3, backoff: float = 1.0, on_failure: str = "none"):
        if not timeout > 0:
            raise ValueError(f"`timeout={timeout}` must be a positive number of seconds.")
        if not (isinstance(max_retries, int) and max_retries >= 0):
            raise ValueError(f"`max_retries={max_retries!r}` must be an integer >= 0 (0: one attempt, no retry).")
        if not backoff >= 0:
            raise ValueError(f"`backoff={backoff}` must be >= 0 seconds.")
        if on_failure not in FAILURE_POLICIES:
            raise ValueError(f"`on_failure={on_failure!r}` is not a failure policy; use one of {FAILURE_POLICIES}.")
        self.timeout, self.max_retries, self.backoff, self.on_failure = timeout, max_retries, backoff, on_failure
        self.failures = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()

    def _attempts(self, attempt: Callable[[], T], url: str) -> T:
        """`attempt()` under the retry policy: its result, or a [`RemoteRewardError`] after the last attempt."""
        for i in range(self.max_retries + 1):
            if i:
                time.sleep(self.backoff * 2 ** (i - 1))
            try:
                return attempt()
            except AttemptError as error:
                last = error
                if not error.retry:
                    break
        tried = f"{i + 1} attempt{'s' if i else ''}"
        why = f"timeout={self.timeout} s, max_retries={self.max_retries}" if last.retry else "not retried"
        raise RemoteRewardError(f"{url} failed after {tried} ({why}); last error: {last}") from last

    def _request(self, attempt: Callable[[], T], url: str, num_videos: int) -> T | None:
        """`attempt()` under the retry policy; after the last attempt `None` (counting `num_videos` failures) or a
        raise, according to `on_failure`. Thread-safe."""
        try:
            return self._attempts(attempt, url)
        except RemoteRewardError as error:
            if self.on_failure == "raise":
                raise
            with self._lock:
                self.failures += num_videos
                self.last_error = str(error)
            return None

    def _warn_failures(self, name: str, failed: int, total: int) -> None:
        """One warning per call that had failures (not one per video)."""
        if failed:
            logger.warning(
                f"Reward `{name}`: {failed} of {total} videos got no opinion (None) because their request failed; "
                f"last error: {self.last_error}"
            )
