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
Any reward function served over HTTP (the standard library's `ThreadingHTTPServer`), and the client that is a reward
function calling it: a reward model can live in another process, on another GPU or machine, than the trainer.

Wire format (no pickle: nothing a request or reply holds can run code):
- `POST /score`, `Content-Type: application/vnd.safetensors`: the body is a safetensors file
  (`safetensors.torch.save`) with one tensor `"videos"` `[N, F, C, H, W]`, in the trainer's dtype (bit-exact), and
  two metadata strings: `"prompts"`, a JSON list of `N` strings, and `"kwargs"`, a JSON object of the extra keyword
  columns (lists of `N` JSON values).
- Reply `200`, `application/json`: `{"rewards": [float | null, ...]}`, one per video (`NaN` and `Infinity` as Python's
  `json` writes them).
- Errors: `{"error": "<message>"}` with `400` (the request cannot be read), `404` (unknown path) or `500` (the reward
  function raised or returned the wrong number of values).
- `GET /health`: `{"name": "<reward name>", "status": "ok"}`.
"""

from __future__ import annotations

import json
import logging
import numbers
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .base import RewardFunc, reward_func_name
from .remote import AttemptError, RemoteReward, RemoteRewardError, http_request, parse_json, quoted


logger = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.safetensors"


# ---------------------------------------------------------------------------------------------------- wire format
def encode_request(prompts: Sequence[str], videos: torch.Tensor, columns: dict[str, Any] | None = None) -> bytes:
    """The body of `POST /score`: `videos` `[N, F, C, H, W]` as safetensors, prompts and columns as JSON metadata."""
    metadata = {"prompts": json.dumps(list(prompts)), "kwargs": json.dumps(columns or {})}
    return save_safetensors({"videos": videos.detach().cpu().contiguous()}, metadata=metadata)


def decode_request(body: bytes) -> tuple[list[str], torch.Tensor, dict[str, Any]]:
    """The prompts, videos `[N, F, C, H, W]` and columns of a `POST /score` body, or a `ValueError` saying what is
    wrong."""
    if len(body) < 8 or not 0 < (size := int.from_bytes(body[:8], "little")) <= len(body) - 8:
        raise ValueError(f"the body ({len(body)} bytes) is not a safetensors file")
    try:
        header = json.loads(body[8 : 8 + size])
        metadata = header.get("__metadata__") or {}
        prompts, columns = json.loads(metadata["prompts"]), json.loads(metadata.get("kwargs", "{}"))
        videos = load_safetensors(body)["videos"]
    except (ValueError, KeyError, TypeError, AttributeError, SafetensorError) as error:
        raise ValueError(
            f"the body is not a reward request ({type(error).__name__}: {error}); expected a safetensors file with a "
            "tensor 'videos' and metadata 'prompts' (JSON list) and 'kwargs' (JSON object)"
        ) from None
    if videos.ndim != 5 or not isinstance(prompts, list) or len(prompts) != videos.shape[0]:
        raise ValueError(
            f"{len(prompts) if isinstance(prompts, list) else prompts!r} prompts for videos of shape "
            f"{tuple(videos.shape)}: send one prompt per video, videos [N, F, C, H, W]"
        )
    if not isinstance(columns, dict) or "prompts" in columns or "videos" in columns:
        raise ValueError(f"the 'kwargs' metadata must be a JSON object of columns, got {quoted(json.dumps(columns))}")
    return prompts, videos, columns


# ---------------------------------------------------------------------------------------------------- server
class _RewardHandler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"

    def _reply(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/health":
            self._reply(200, {"name": self.server.name, "status": "ok"})
        else:
            self._reply(404, {"error": f"unknown path {self.path!r}: use POST /score or GET /health"})

    def do_POST(self) -> None:
        if self.path.rstrip("/") != "/score":
            self.close_connection = True  # the body is not read
            return self._reply(404, {"error": f"unknown path {self.path!r}: use POST /score or GET /health"})
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            return self._reply(411, {"error": "a Content-Length header is required (no chunked bodies)"})
        try:
            prompts, videos, columns = decode_request(self.rfile.read(int(length)))
        except ValueError as error:
            return self._reply(400, {"error": str(error)})
        name = self.server.name
        try:
            with self.server.slots:
                values = self.server.reward_func(prompts=prompts, videos=videos, **columns)
        except Exception as error:  # the reward's own failure: reported to the client, the server keeps serving
            logger.exception(f"Reward `{name}` failed on {len(prompts)} videos")
            return self._reply(500, {"error": f"reward `{name}` raised {type(error).__name__}: {error}"})
        try:
            rewards = _check_rewards(values, len(prompts))
        except ValueError as error:
            return self._reply(500, {"error": f"reward `{name}` {error}"})
        self._reply(200, {"rewards": rewards})

    def log_message(self, format: str, *args) -> None:
        logger.info(f"{self.address_string()} {format % args}")


def _check_rewards(values: Any, n: int) -> list[float | None]:
    """`values` as JSON-ready floats and `None`s, or a `ValueError` saying what is wrong."""
    if values is None or len(values) != n:
        got = "None" if values is None else len(values)
        raise ValueError(f"returned {got} values for {n} videos: return one float (or None) per video")
    out = []
    for j, value in enumerate(values):
        if value is not None and not (
            isinstance(value, numbers.Real) or (torch.is_tensor(value) and value.numel() == 1)
        ):
            raise ValueError(f"returned {value!r} ({type(value).__name__}) for video {j}: return a float or None")
        out.append(None if value is None else float(value))
    return out


class RewardServer(ThreadingHTTPServer):
    """A `ThreadingHTTPServer` that scores videos with `reward_func`, at most `max_concurrency` calls at a time."""

    daemon_threads = True

    def __init__(self, reward_func: RewardFunc, host: str = "127.0.0.1", port: int = 8000, max_concurrency: int = 1):
        if not callable(reward_func):
            raise TypeError(f"`reward_func={reward_func!r}` is not callable: serve a reward function or instance.")
        if not (isinstance(max_concurrency, int) and max_concurrency >= 1):
            raise ValueError(f"`max_concurrency={max_concurrency!r}` must be an integer >= 1.")
        self.reward_func, self.name = reward_func, reward_func_name(reward_func)
        self.slots = threading.BoundedSemaphore(max_concurrency)
        super().__init__((host, port), _RewardHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


def serve(
    reward_func: RewardFunc,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_concurrency: int = 1,
    block: bool = True,
) -> RewardServer:
    r"""
    Serve `reward_func` over HTTP (the wire format is in this module's docstring).

    Args:
        reward_func (`RewardFunc`): any reward function (`fn(prompts, videos, **kwargs) -> list[float | None]`).
        host (`str`, defaults to `"127.0.0.1"`): the address to listen on (`"0.0.0.0"`: every interface; the server
            has no authentication, so expose it on trusted networks only).
        port (`int`, defaults to `8000`): `0` picks a free port (read it from `server.url`).
        max_concurrency (`int`, defaults to `1`): calls of `reward_func` at a time (1: a GPU model is never called from
            two threads at once). Requests beyond that wait.
        block (`bool`, defaults to `True`): serve until interrupted (Ctrl-C) and return the closed server; with
            `False`, serve from a daemon thread and return at once (stop it with `server.shutdown()`, then
            `server.server_close()`).

    Returns:
        [`RewardServer`]: the server.
    """
    server = RewardServer(reward_func, host, port, max_concurrency)
    logger.info(f"Serving reward `{server.name}` on {server.url} (POST /score, GET /health)")
    if not block:
        threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name=f"reward-server-{server.name}",
            daemon=True,
        ).start()
        return server
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return server


# ---------------------------------------------------------------------------------------------------- client
class RewardServerClient(RemoteReward):
    r"""
    A reward function whose values come from a reward server ([`serve`], or `trl-arcopo reward-server`): it posts the
    videos and prompts to `{url}/score` and returns the server's values. The dataset columns the trainer passes are
    forwarded as JSON; `trainer_state` is not, and a column that is not JSON is skipped with a warning.

    Args:
        url (`str`): the server, e.g. `"http://127.0.0.1:8000"`.
        name (`str`, *optional*): the name the reward is logged under; by default the served reward's, asked from
            `GET /health` the first time it is needed (the trainer asks when it is built).
        batch_size (`int`, *optional*): videos per request (all in one request by default); a failed request gives
            `None` to its videos only.
        timeout (`float`, defaults to `60.0`), max_retries (`int`, defaults to `3`), backoff (`float`, defaults to
            `1.0`), on_failure (`str`, defaults to `"none"`): the policy of
            [`~trl_arcopo.rewards.remote.RemoteReward`]. `timeout` bounds each wait for the server, including the
            reward's computation, so give it the slowest batch's time.

    Attributes: those of [`~trl_arcopo.rewards.remote.RemoteReward`], `failures` (videos scored `None` because their
    request failed; the trainer logs it as `rewards/<name>/failures`) and `last_error`.
    """

    def __init__(
        self,
        url: str,
        name: str | None = None,
        batch_size: int | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        on_failure: str = "none",
    ):
        super().__init__(timeout, max_retries, backoff, on_failure)
        if batch_size is not None and not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"`batch_size={batch_size!r}` must be None (one request) or an integer >= 1.")
        self.url, self.batch_size, self._name = url.rstrip("/"), batch_size, name
        self._skipped_columns: set[str] = set()

    @property
    def __name__(self) -> str:
        if self._name is None:
            url = self.url + "/health"

            def attempt() -> str:
                payload = parse_json(http_request(url, timeout=self.timeout), "the /health reply")
                if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
                    raise AttemptError(
                        f"the /health reply has no string `name`: {quoted(json.dumps(payload))}", retry=False
                    )
                return payload["name"]

            try:
                self._name = self._attempts(attempt, url)
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

    def _post(self, prompts: list[str], videos: torch.Tensor, columns: dict[str, Any]) -> list[float | None] | None:
        url, data = self.url + "/score", encode_request(prompts, videos, columns)

        def attempt() -> list[float | None]:
            payload = parse_json(
                http_request(url, data, {"Content-Type": CONTENT_TYPE}, self.timeout), '{"rewards": [...]}'
            )
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

        return self._request(attempt, url, len(prompts))

    def __call__(self, prompts: Sequence[str], videos: torch.Tensor, **kwargs) -> list[float | None]:
        n = len(prompts)
        if videos.ndim != 5 or videos.shape[0] != n:
            raise ValueError(
                f"`videos` must be [N, F, C, H, W] with N = {n} prompts, got shape {tuple(videos.shape)}."
            )
        columns = self._columns(kwargs)
        size = self.batch_size or max(n, 1)
        failures, out = self.failures, []
        for start in range(0, n, size):
            stop = min(start + size, n)
            part = {k: v[start:stop] if isinstance(v, list) and len(v) == n else v for k, v in columns.items()}
            values = self._post(list(prompts[start:stop]), videos[start:stop], part)
            out.extend(values if values is not None else [None] * (stop - start))
        self._warn_failures(self._name or self.url, self.failures - failures, n)
        return out
