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
Rewards computed by a remote server: the deadline, retry and failure policy that the VLM judge
([`~trl_arcopo.rewards.judge.VLMJudgeReward`]) and the reward-server client
([`~trl_arcopo.rewards.server_client.RewardServerClient`]) share, and how an HTTP reply becomes a result or an
[`AttemptError`].

Every attempt runs on `asyncio` (`httpx`'s and `openai`'s async clients) under `asyncio.wait_for`: `timeout` is the
whole attempt's deadline (connection, upload, the server's work and the full reply), whatever pace the server keeps,
and a late attempt is cancelled, its connection closed.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar


logger = logging.getLogger(__name__)

T = TypeVar("T")

FAILURE_POLICIES = ("none", "raise")
#: HTTP statuses worth another attempt: the server is busy, restarting or overloaded. Other 4xx are not retried, nor
#: a 5xx whose JSON body says `"retry": false` (the reward server's answer when the reward itself raised).
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


class AttemptError(Exception):
    """
    One attempt failed. `retry` says whether another attempt may succeed (a timeout, a busy server) or not (a
    malformed reply, a reward that raised); `retry_after` is the server's `Retry-After` in seconds, if it sent one.
    """

    def __init__(self, message: str, retry: bool, retry_after: float | None = None):
        super().__init__(message)
        self.retry, self.retry_after = retry, retry_after


class RemoteRewardError(RuntimeError):
    """A request that failed after all its attempts: raised under `on_failure="raise"`, and by a client that cannot
    learn its reward's name."""


def quoted(text: str | bytes, limit: int = 500) -> str:
    """`text` as a Python literal, cut to `limit` characters (replies can be long)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _error_payload(body: bytes) -> tuple[str, bool]:
    """The message of an error reply (`{"error": "..."}` from the reward server, `{"error": {"message": ...}}` from
    an OpenAI server, or the raw body) and whether the body allows a retry (`"retry": false` forbids it)."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return quoted(body), True
    retry = not (isinstance(payload, dict) and payload.get("retry") is False)
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    if isinstance(error, dict):
        error = error.get("message", error)
    return (error if isinstance(error, str) else quoted(json.dumps(error))), retry


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A `Retry-After` header in seconds: a number of seconds or an HTTP date; `None` if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            date = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = date.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None


def status_error(url: str, status: int, body: bytes, headers: Any) -> AttemptError:
    """
    The [`AttemptError`] of a reply with a status that is not 2xx. A redirect is never followed (the request, its key
    and its videos go to the configured URL only) and not retried. 408, 425, 429 and 5xx are retried unless the body
    says `"retry": false`; other 4xx are not.
    """
    if 300 <= status < 400:
        location = headers.get("location", "(no Location header)")
        return AttemptError(
            f"HTTP {status} redirect to {location!r} not followed: the request and its key go to {url} only; "
            "configure the client with the final URL",
            retry=False,
        )
    message, retry = _error_payload(body)
    wait = retry_after_seconds(headers.get("retry-after"))
    return AttemptError(f"HTTP {status}: {message}", retry=retry and status in RETRY_STATUSES, retry_after=wait)


def parse_json(body: bytes, what: str) -> object:
    """`body` as JSON, or an [`AttemptError`] (not retried) that quotes it and says what it should have been."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise AttemptError(f"the reply is not JSON ({what} expected): {quoted(body)}", retry=False) from None


_SSL_CONTEXT: ssl.SSLContext | None = None


def ssl_context() -> ssl.SSLContext:
    """One default SSL context for every client of the process (building one per request costs milliseconds)."""
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = ssl.create_default_context()
    return _SSL_CONTEXT


def run_sync(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run `coroutine` to completion from synchronous code, also from a thread whose event loop is running (a
    notebook): then in a new thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(coroutine)
        except Exception as error:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = error

    thread = threading.Thread(target=target, name="remote-reward", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


class RemoteReward:
    r"""
    The deadline, retry and failure policy of a reward computed by a server, and its failure count.

    Each attempt has `timeout` seconds in all: to connect, send, wait for the server and read the whole reply. A late
    attempt is cancelled and its connection closed, however slowly the server trickles bytes. An attempt that fails
    with a timeout, a lost connection, or HTTP 408/425/429/5xx is retried up to `max_retries` times, after `backoff *
    2**i` seconds before retry `i` (0, 1, ...), or after the server's `Retry-After` when that is longer. A
    `Retry-After` longer than `timeout` ends the request. A failure that will not change (a redirect, another 4xx, a
    malformed reply, a reward that raised on the server) ends the request at once. So a request takes at most
    `(max_retries + 1) * timeout` plus the waits between attempts (each at most `max(timeout, backoff *
    2**(max_retries - 1))`). Then `on_failure` applies: `"none"` gives the videos of that request no opinion
    (`None`), adds them to `failures` and logs a warning per call; `"raise"` raises a [`RemoteRewardError`] (a
    `RuntimeError`) naming the URL, the attempts and the last error.

    Args:
        timeout (`float`, defaults to `60.0`): seconds an attempt may take in all.
        max_retries (`int`, defaults to `3`): attempts after the first one.
        backoff (`float`, defaults to `1.0`): base of the exponential wait between attempts, in seconds.
        on_failure (`str`, defaults to `"none"`): `"none"` or `"raise"`.

    Attributes:
        failures (`int`): videos given `None` because their request failed, since creation (reset it by assigning 0).
        last_error (`str` or `None`): the message of the last failure.
    """

    def __init__(self, timeout: float = 60.0, max_retries: int = 3, backoff: float = 1.0, on_failure: str = "none"):
        if isinstance(timeout, bool) or not (isinstance(timeout, int | float) and 0 < timeout < math.inf):
            raise ValueError(f"`timeout={timeout!r}` must be a positive, finite number of seconds.")
        if isinstance(max_retries, bool) or not (isinstance(max_retries, int) and max_retries >= 0):
            raise ValueError(f"`max_retries={max_retries!r}` must be an integer >= 0 (0: one attempt, no retry).")
        if isinstance(backoff, bool) or not (isinstance(backoff, int | float) and 0 <= backoff < math.inf):
            raise ValueError(f"`backoff={backoff!r}` must be a finite number of seconds >= 0.")
        if on_failure not in FAILURE_POLICIES:
            raise ValueError(f"`on_failure={on_failure!r}` is not a failure policy; use one of {FAILURE_POLICIES}.")
        self.timeout, self.max_retries, self.backoff, self.on_failure = (
            float(timeout),
            max_retries,
            backoff,
            on_failure,
        )
        self.failures = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()

    async def _attempt(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """One attempt under the total deadline `timeout`."""
        try:
            return await asyncio.wait_for(attempt(), self.timeout)
        except asyncio.TimeoutError:
            raise AttemptError(f"no complete reply within timeout={self.timeout:g} s", retry=True) from None

    def _wait(self, retry: int, error: AttemptError) -> float | None:
        """Seconds to wait before retry `retry` (0, 1, ...), or `None` when the server asks for longer than `timeout`."""
        wait = self.backoff * 2**retry
        if error.retry_after is not None:
            if error.retry_after > self.timeout:
                return None
            wait = max(wait, error.retry_after)
        return wait

    async def _attempts(self, attempts: Callable[[int], Awaitable[T]], url: str, replicas: int = 1) -> T:
        """
        `attempts(i)` for attempt `i` (0, 1, ...) under the retry policy: its result, or a [`RemoteRewardError`] after
        the last attempt. With `replicas > 1`, attempts come in rounds of `replicas` (a retryable failure moves to the
        next replica at once) and the wait comes between rounds.
        """
        total = (self.max_retries + 1) * replicas
        for i in range(total):
            try:
                return await self._attempt(lambda i=i: attempts(i))
            except AttemptError as error:
                last = error
                if not error.retry or i == total - 1:
                    break
                if (i + 1) % replicas:
                    continue
                wait = self._wait(i // replicas, error)
                if wait is None:
                    last = AttemptError(f"{error} (Retry-After {error.retry_after:g} s > timeout)", retry=True)
                    break
                await asyncio.sleep(wait)
        tried = f"{i + 1} attempt{'s' if i else ''}"
        why = f"timeout={self.timeout:g} s, max_retries={self.max_retries}" if last.retry else "not retried"
        raise RemoteRewardError(f"{url} failed after {tried} ({why}); last error: {last}") from last

    async def _request(
        self, attempts: Callable[[int], Awaitable[T]], url: str, num_videos: int, replicas: int = 1
    ) -> T | None:
        """`attempts` under the retry policy; after the last attempt `None` (counting `num_videos` failures) or a
        raise, according to `on_failure`."""
        try:
            return await self._attempts(attempts, url, replicas)
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
