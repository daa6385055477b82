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
The client of the reward server ([`~trl_arcopo.rewards.server`]): a reward function whose values come from one or
several replicas of a served reward, with `httpx2` (the HTTP client of `huggingface_hub` and `openai`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

import httpx2
import torch

from .remote import (
    AttemptError,
    RemoteReward,
    RemoteRewardError,
    parse_json,
    quoted,
    run_sync,
    ssl_context,
    status_error,
)
from .wire import API_KEY_ENV, CONTENT_TYPE, TIMEOUT_HEADER, encode_request


logger = logging.getLogger(__name__)

#: Seconds a replica that refused a connection is tried after the others.
DOWN_SECONDS = 30.0


def check_urls(url: str | Sequence[str]) -> list[str]:
    """The replicas' base URLs: a URL, a comma-separated string of URLs, or a list; each `http(s)://host[:port]`."""
    urls = [u.strip().rstrip("/") for u in (url.split(",") if isinstance(url, str) else url)]
    for u in urls:
        parts = urllib.parse.urlsplit(u)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"`url={u!r}` is not an http(s) URL: give e.g. 'http://127.0.0.1:8000'.")
    if not urls:
        raise ValueError("`url` is empty: give the reward server's URL, e.g. 'http://127.0.0.1:8000'.")
    return urls


class RewardServerClient(RemoteReward):
    r"""
    A reward function whose values come from a reward server ([`~trl_arcopo.rewards.server.serve`], or `trl-arcopo
    reward-server`), or from several replicas of it: it posts the videos and prompts to `{url}/score` and returns the
    server's values. The dataset columns the trainer passes are forwarded as JSON; `trainer_state` is not, and a column
    that is not JSON is skipped with a warning.

    With several replicas (one per GPU or node), each call is split into pieces of `batch_size` videos (by default
    as many pieces as replicas), sent concurrently, piece `k` first to replica `k mod R`. An attempt that fails in a
    way that may pass (a refused or lost connection, a timeout, HTTP 408/425/429/5xx) moves at once to the next
    replica; after a round of every replica, the client waits (`backoff`, or the server's `Retry-After`) and starts
    another, up to `max_retries` more rounds. A replica that refused a connection is tried last for 30 s. The values
    do not depend on which replica scored a piece.

    Args:
        url (`str` or `list[str]`): the server, e.g. `"http://127.0.0.1:8000"`, or its replicas (a list, or one string
            of comma-separated URLs).
        name (`str`, *optional*): the name the reward is logged under; by default the served reward's, asked from
            `GET /health` the first time it is needed (the trainer asks when it is built).
        batch_size (`int`, *optional*): videos per request (by default the call's videos split evenly over the
            replicas); a failed request gives `None` to its videos only. Once the client has asked `GET /health`
            (for its name), pieces are also cut to fit the server's body limit.
        timeout (`float`, defaults to `60.0`), max_retries (`int`, defaults to `3`), backoff (`float`, defaults to
            `1.0`), on_failure (`str`, defaults to `"none"`): the policy of
            [`~trl_arcopo.rewards.remote.RemoteReward`]. `timeout` is each attempt's whole deadline, the reward's
            computation included, so give it the slowest batch's time; the server is told it and answers 504 in time
            rather than keep the slot. A request takes at most `(max_retries + 1) * R * timeout` plus the waits.
        api_key (`str`, *optional*): the server's bearer token; by default the environment variable
            `TRL_ARCOPO_REWARD_SERVER_API_KEY`, if set. Sent to the configured URLs only: redirects are not followed.

    Attributes: those of [`~trl_arcopo.rewards.remote.RemoteReward`], `failures` (videos scored `None` because their
    request failed; the trainer logs it as `rewards/<name>/failures`) and `last_error`.
    """

    def __init__(
        self,
        url: str | Sequence[str],
        name: str | None = None,
        batch_size: int | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        on_failure: str = "none",
        api_key: str | None = None,
    ):
        super().__init__(timeout, max_retries, backoff, on_failure)
        if batch_size is not None and (isinstance(batch_size, bool) or not (isinstance(batch_size, int) and batch_size >= 1)):  # fmt: skip
            raise ValueError(f"`batch_size={batch_size!r}` must be None (split over the replicas) or an integer >= 1.")
        self.urls, self.batch_size, self._name = check_urls(url), batch_size, name
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._skipped_columns: set[str] = set()
        self._down: dict[str, float] = {}  # replica -> when it last refused a connection (monotonic seconds)
        self._max_body_bytes: int | None = None  # the server's body limit, from `GET /health`

    @property
    def url(self) -> str:
        """The replicas' URLs, comma-separated."""
        return ",".join(self.urls)

    def _client(self) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(
            timeout=httpx2.Timeout(self.timeout), follow_redirects=False, verify=ssl_context(), headers=self._headers
        )

    def _order(self, home: int) -> list[str]:
        """The replicas in the order a piece tries them: from its own, replicas that refused recently last."""
        urls = self.urls[home:] + self.urls[:home]
        now = time.monotonic()
        return sorted(urls, key=lambda u: now - self._down.get(u, -math.inf) < DOWN_SECONDS)

    async def _send(self, client: httpx2.AsyncClient, url: str, content: bytes | None = None) -> bytes:
        """One request (a POST of `content` to `/score`, or `GET /health`) and its reply body, or an [`AttemptError`]."""
        base = url.rsplit("/", 1)[0]
        try:
            if content is None:
                response = await client.get(url)
            else:
                headers = {"Content-Type": CONTENT_TYPE, TIMEOUT_HEADER: f"{0.9 * self.timeout:.3f}"}
                response = await client.post(url, content=content, headers=headers)
        except httpx2.ConnectError as error:
            self._down[base] = time.monotonic()
            raise AttemptError(f"cannot connect to {base}: {error or type(error).__name__}", retry=True) from None
        except httpx2.TimeoutException:
            raise AttemptError(f"no complete reply within timeout={self.timeout:g} s", retry=True) from None
        except httpx2.TransportError as error:  # the server closed the connection or died mid-reply
            raise AttemptError(f"connection lost: {type(error).__name__}: {error}", retry=True) from None
        if not 200 <= response.status_code < 300:
            raise status_error(url, response.status_code, response.content, response.headers)
        self._down.pop(base, None)
        return response.content

    async def _health(self, client: httpx2.AsyncClient) -> dict[str, Any]:
        """The reply of `GET /health` from the first replica that answers; it also gives the server's body limit."""

        async def attempt(i: int) -> dict[str, Any]:
            url = self._order(0)[i % len(self.urls)] + "/health"
            payload = parse_json(await self._send(client, url), "the /health reply")
            if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
                raise AttemptError(
                    f"the /health reply has no string `name`: {quoted(json.dumps(payload))}", retry=False
                )
            if isinstance(limit := payload.get("max_body_bytes"), int) and limit > 0:
                self._max_body_bytes = limit
            return payload

        return await self._attempts(attempt, self.url, len(self.urls))

    async def _name_from_health(self) -> str:
        async with self._client() as client:
            return (await self._health(client))["name"]

    @property
    def __name__(self) -> str:
        if self._name is None:
            try:
                self._name = run_sync(self._name_from_health())
            except RemoteRewardError as error:
                raise RemoteRewardError(
                    f"Cannot name the reward served at {self.url} ({error}): start the server or pass `name=`."
                ) from None
        return self._name

    def _columns(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The keyword columns that JSON can carry (not `trainer_state`); one warning per skipped column."""
        columns = {}
        for key, value in kwargs.items():
            if key == "trainer_state":
                continue
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                if key not in self._skipped_columns:
                    self._skipped_columns.add(key)
                    logger.warning(
                        f"Reward server {self.url}: column `{key}` ({type(value).__name__}) is not JSON and is not sent."
                    )
                continue
            columns[key] = value
        return columns

    async def _post(self, client: httpx2.AsyncClient, home: int, prompts: list[str], videos: torch.Tensor,
                    columns: dict[str, Any]) -> list[float | None] | None:  # fmt: skip
        """One piece's values, from replica `home` or the next ones; `None` (or a raise) after the last attempt."""
        data, order = encode_request(prompts, videos, columns), self._order(home)

        async def attempt(i: int) -> list[float | None]:
            url = order[i % len(order)] + "/score"
            payload = parse_json(await self._send(client, url, data), '{"rewards": [...]}')
            rewards = payload.get("rewards") if isinstance(payload, dict) else None
            if (
                not isinstance(rewards, list)
                or len(rewards) != len(prompts)
                or not all(r is None or (isinstance(r, int | float) and not isinstance(r, bool)) for r in rewards)
            ):
                raise AttemptError(
                    f"the reply's `rewards` is not a list of {len(prompts)} numbers or nulls: {quoted(json.dumps(payload))}",
                    retry=False,
                )
            return [None if r is None else float(r) for r in rewards]

        return await self._request(attempt, self.url, len(prompts), len(order))

    async def _score(
        self, prompts: Sequence[str], videos: torch.Tensor, columns: dict[str, Any]
    ) -> list[float | None]:
        n = len(prompts)
        size = self.batch_size or max(1, math.ceil(n / len(self.urls)))
        async with self._client() as client:
            if self._max_body_bytes is not None and n:  # pieces that fit the server's body limit, once it is known
                per_video = videos[0].numel() * videos.element_size() + 4 * max(len(p) for p in prompts) + 1024
                size = max(1, min(size, (self._max_body_bytes - 2**16) // per_video))
            starts = list(range(0, n, size))
            tasks = []
            for k, start in enumerate(starts):
                stop = min(start + size, n)
                part = {c: v[start:stop] if isinstance(v, list) and len(v) == n else v for c, v in columns.items()}
                piece = self._post(client, k % len(self.urls), list(prompts[start:stop]), videos[start:stop], part)
                tasks.append(asyncio.ensure_future(piece))
            try:
                values = await asyncio.gather(*tasks)
            finally:  # under on_failure="raise", the first failure cancels the other pieces
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        out = []
        for start, piece in zip(starts, values):
            out.extend(piece if piece is not None else [None] * (min(start + size, n) - start))
        return out

    def __call__(self, prompts: Sequence[str], videos: torch.Tensor, **kwargs) -> list[float | None]:
        n = len(prompts)
        if videos.ndim != 5 or videos.shape[0] != n:
            raise ValueError(
                f"`videos` must be [N, F, C, H, W] with N = {n} prompts, got shape {tuple(videos.shape)}."
            )
        failures = self.failures
        out = run_sync(self._score(prompts, videos, self._columns(kwargs)))
        self._warn_failures(self._name or self.url, self.failures - failures, n)
        return out
