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
Any reward function served over HTTP with FastAPI and uvicorn (`pip install 'trl_arcopo[server]'`), so that a reward
model can live in another process, on another GPU or machine, than the trainer. The wire format is in
[`~trl_arcopo.rewards.wire`]; the client is [`~trl_arcopo.rewards.server_client.RewardServerClient`].

What a request may cost the server is bounded before it is read:
- its size (`max_body_mb`, from `Content-Length`: 413, the body unread);
- the requests admitted at once (`max_concurrency` computing plus `max_queue` reading or waiting for a slot; others
  wait with their body unread), so the memory of bodies is at most `(max_concurrency + max_queue) * max_body_mb`;
- its time: a connection must send a whole request head within `idle_timeout` seconds of opening or of its last
  reply, the body must keep coming (`read_timeout` seconds at most between pieces), and the request has a deadline,
  the smaller of `timeout` and the client's `X-Reward-Timeout`.

A reward call runs in a daemon thread of its own. When the deadline passes (or the client goes away) the request is
answered 504 and its slot freed, and the call is abandoned: Python cannot stop a thread, so it runs on and its result
is dropped. While more than `max_abandoned` abandoned calls run, new requests get 503 with `Retry-After` instead of
stacking more work on a stuck model.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import math
import os
import socket
import threading
import time
from typing import Any

from .base import RewardFunc, check_rewards, reward_func_name
from .server_limits import ServerLimits
from .wire import API_KEY_ENV, TIMEOUT_HEADER, decode_request


try:
    import uvicorn
    from fastapi import FastAPI, Request, Response
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError as error:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"The reward server needs FastAPI and uvicorn ({error}): pip install 'trl_arcopo[server]'."
    ) from None


logger = logging.getLogger(__name__)

#: The listen backlog: connections the kernel queues before the server accepts them.
BACKLOG = 2048


def _reply(status: int, payload: dict[str, Any], close: bool = False, retry_after: float | None = None) -> Response:
    """A JSON reply (`NaN` allowed, as the wire format says); `close` ends the connection (its body was not read)."""
    headers = {"Connection": "close"} if close else {}
    if retry_after is not None:
        headers["Retry-After"] = f"{math.ceil(retry_after)}"
    return Response(json.dumps(payload).encode(), status, headers, media_type="application/json")


def _error(status: int, message: str, retry: bool, **kwargs) -> Response:
    return _reply(status, {"error": message, "retry": retry}, **kwargs)


class _Call:
    """A reward call in a daemon thread of its own; its result reaches `future` on the server's event loop."""

    def __init__(self, state: _State, loop: asyncio.AbstractEventLoop, reward_func: RewardFunc, kwargs: dict):
        self.state, self.loop, self.abandoned = state, loop, False
        self.future: asyncio.Future = loop.create_future()
        threading.Thread(target=self._run, args=(reward_func, kwargs), name="reward-call", daemon=True).start()

    def _run(self, reward_func: RewardFunc, kwargs: dict) -> None:
        try:
            outcome = (reward_func(**kwargs), None)
        except Exception as error:  # noqa: BLE001 - any failure of the reward becomes a 500
            outcome = (None, error)
        with self.state.lock:
            if self.abandoned:
                self.state.abandoned -= 1
        try:
            self.loop.call_soon_threadsafe(self._deliver, outcome)
        except RuntimeError:  # the server has stopped
            pass

    def _deliver(self, outcome) -> None:
        if not self.future.done():
            self.future.set_result(outcome)

    def abandon(self) -> None:
        with self.state.lock:
            if not self.abandoned and not self.future.done():
                self.abandoned = True
                self.state.abandoned += 1


class _State:
    """The server's admission and call slots (made on its event loop), and its abandoned calls still running."""

    def __init__(self, limits: ServerLimits):
        self.limits, self.abandoned = limits, 0
        self.lock = threading.Lock()
        self.admission: asyncio.Semaphore | None = None  # requests reading their body, waiting or computing
        self.slots: asyncio.Semaphore | None = None  # reward calls


def build_app(reward_func: RewardFunc, limits: ServerLimits | None = None, api_key: str | None = None) -> FastAPI:
    """The FastAPI application that serves `reward_func` (`POST /score`, `GET /health`) under `limits`, with a bearer
    token `api_key` if given (checked in constant time)."""
    limits = limits or ServerLimits()
    name, state = reward_func_name(reward_func), _State(limits)
    expected = f"Bearer {api_key}".encode() if api_key else None
    app = FastAPI(title=f"trl_arcopo reward server: {name}", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.reward = state

    @app.exception_handler(HTTPException)
    async def unknown_path(request: Request, error: HTTPException) -> Response:
        return _error(
            error.status_code,
            f"{request.method} {request.url.path!r}: {error.detail}; use POST /score or GET /health",
            False,
            close=True,
        )

    def unauthorized(request: Request) -> Response | None:
        """A 401 unless the request carries the bearer token (when the server has one)."""
        given = request.headers.get("authorization", "").encode()
        if expected is None or hmac.compare_digest(given, expected):
            return None
        return _error(
            401,
            f"missing or wrong bearer token: send `Authorization: Bearer <key>` (the client's `api_key`, or "
            f"{API_KEY_ENV})",
            False,
            close=True,
        )

    @app.get("/health")
    async def health(request: Request) -> Response:
        if (refused := unauthorized(request)) is not None:
            return refused
        return _reply(200, {"name": name, "status": "ok", "max_body_bytes": limits.max_body_bytes})

    @app.post("/score")
    async def score(request: Request) -> Response:
        if (refused := unauthorized(request)) is not None:
            return refused
        loop = asyncio.get_running_loop()
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            return _error(411, "a Content-Length header is required (no chunked bodies)", False, close=True)
        if int(length) > limits.max_body_bytes:
            return _error(
                413,
                f"the body ({int(length) / 2**20:.1f} MiB) is larger than the server's limit (--max-body-mb "
                f"{limits.max_body_mb:g}): send fewer videos per request (the client's `batch_size`) or raise the limit",
                False,
                close=True,
            )
        seconds = limits.timeout
        try:
            seconds = min(seconds, float(request.headers.get(TIMEOUT_HEADER, math.inf)))
        except ValueError:
            pass
        deadline = loop.time() + max(seconds, 0.0)
        if state.admission is None:
            state.admission = asyncio.Semaphore(limits.max_concurrency + limits.max_queue)
            state.slots = asyncio.Semaphore(limits.max_concurrency)
        try:  # the body waits unread (in the kernel's buffers) until the request is admitted
            await asyncio.wait_for(state.admission.acquire(), max(deadline - loop.time(), 0.0))
        except asyncio.TimeoutError:
            return _error(
                503, f"busy until the deadline: {limits.max_concurrency + limits.max_queue} requests admitted "
                f"(--max-concurrency {limits.max_concurrency}, --max-queue {limits.max_queue})", True,
                close=True, retry_after=1,
            )  # fmt: skip
        try:
            return await _score(request, int(length), deadline)
        finally:
            state.admission.release()

    async def _score(request: Request, length: int, deadline: float) -> Response:
        loop = asyncio.get_running_loop()
        body = bytearray()
        stream = request.stream().__aiter__()
        try:
            while True:
                wait = min(limits.read_timeout, deadline - loop.time())
                try:
                    body += await asyncio.wait_for(stream.__anext__(), max(wait, 0.0))
                except StopAsyncIteration:
                    break
        except asyncio.TimeoutError:
            return _error(408, f"the body stopped coming ({len(body)} of {length} bytes read)", True, close=True)
        except ClientDisconnect:
            return _error(400, "the client went away", True, close=True)
        try:
            prompts, videos, columns = decode_request(bytes(body))
        except ValueError as error:
            return _error(400, str(error), False)
        del body
        try:
            await asyncio.wait_for(state.slots.acquire(), max(deadline - loop.time(), 0.0))
        except asyncio.TimeoutError:
            return _error(504, f"no free slot before the deadline (--max-concurrency {limits.max_concurrency})", True)
        try:
            if state.abandoned > limits.max_abandoned:
                return _error(
                    503, f"{state.abandoned} abandoned calls of reward `{name}` are still running "
                    f"(--max-abandoned {limits.max_abandoned}); the reward may be stuck", True, retry_after=5,
                )  # fmt: skip
            disconnect = asyncio.ensure_future(request.receive())  # `http.disconnect` when the client goes away
            await asyncio.sleep(0)
            if disconnect.done():
                return _error(400, "the client went away", True, close=True)
            call = _Call(state, loop, reward_func, dict(prompts=prompts, videos=videos, **columns))
            done, _ = await asyncio.wait(
                {call.future, disconnect},
                timeout=max(deadline - loop.time(), 0.0),
                return_when=asyncio.FIRST_COMPLETED,
            )
            disconnect.cancel()
            if call.future not in done:
                call.abandon()
                gone = disconnect in done
                logger.warning(
                    f"Reward `{name}`: call on {len(prompts)} videos abandoned ("
                    f"{'the client went away' if gone else 'past its deadline'}); {state.abandoned} abandoned running"
                )
                return _error(
                    504,
                    f"reward `{name}` did not finish within the request's deadline ({seconds_left(deadline, loop)}); "
                    "the call was abandoned",
                    True,
                )
        finally:
            state.slots.release()
        values, error = call.future.result()
        if error is not None:
            logger.error(f"Reward `{name}` failed on {len(prompts)} videos: {type(error).__name__}: {error}")
            return _error(500, f"reward `{name}` raised {type(error).__name__}: {error}", False)
        try:
            rewards = check_rewards(values, len(prompts))
        except ValueError as error:
            return _error(500, f"reward `{name}` {error}", False)
        return _reply(200, {"rewards": rewards})

    return app


def seconds_left(deadline: float, loop: asyncio.AbstractEventLoop) -> str:
    return f"{max(deadline - loop.time(), 0.0):.1f} s left"


class _HeadTimeoutProtocol(H11Protocol):
    """
    uvicorn's HTTP/1.1 protocol with a deadline on the request head: a connection that has not sent a whole head
    within `timeout_keep_alive` seconds of opening, or of its last reply, is closed. (uvicorn arms no timer on a new
    connection, and restarts its keep-alive timer at every byte received, so an idle or trickling client would hold a
    descriptor for ever.)
    """

    _head_timer: asyncio.TimerHandle | None = None
    _waiting_cycle: Any = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._check()

    def on_response_complete(self) -> None:
        self._arm()
        super().on_response_complete()
        self._check()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._waiting_cycle = self.cycle
        self._head_timer = self.loop.call_later(self.timeout_keep_alive, self._expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _check(self) -> None:
        if self._head_timer is not None and self.cycle is not self._waiting_cycle:  # a new request's head arrived
            self._disarm()

    def _expired(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on `host:port`, or a `ValueError` that names the bad value and the fix."""
    if isinstance(port, bool) or not (isinstance(port, int) and 0 <= port <= 65535):
        raise ValueError(f"`port={port!r}` is not a TCP port: use an integer in [0, 65535] (0: a free port).")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as error:
        raise ValueError(
            f"`host={host!r}` is not an address ({error}): use e.g. 127.0.0.1, or 0.0.0.0 for all."
        ) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(BACKLOG)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise ValueError(f"port {port} on {host} is in use: pick another `port`, or 0 for a free one.") from None
        if error.errno == errno.EADDRNOTAVAIL:
            raise ValueError(f"`host={host!r}` is not an address of this machine: use e.g. 127.0.0.1.") from None
        if error.errno == errno.EACCES:
            raise ValueError(f"port {port} needs privileges: use a port >= 1024, or 0 for a free one.") from None
        raise ValueError(f"cannot listen on {host}:{port}: {error}") from None
    return sock


class RewardServer:
    r"""
    A reward function served over HTTP: uvicorn with the FastAPI app of [`build_app`] on a socket bound at
    construction (a bad host or a port in use raises a `ValueError` here, not later).

    Args:
        reward_func (`RewardFunc`): any reward function (`fn(prompts, videos, **kwargs) -> list[float | None]`).
        host (`str`, defaults to `"127.0.0.1"`): the address to listen on (`"0.0.0.0"`: every interface; set an
            `api_key` then).
        port (`int`, defaults to `8000`): `0` picks a free port (read it from `server.url`).
        limits (`ServerLimits`, *optional*): what a request may cost; the defaults of [`ServerLimits`].
        api_key (`str`, *optional*): a bearer token every request must carry (401 otherwise); by default the
            environment variable `TRL_ARCOPO_REWARD_SERVER_API_KEY`, if set.
    """

    def __init__(self, reward_func: RewardFunc, host: str = "127.0.0.1", port: int = 8000,
                 limits: ServerLimits | None = None, api_key: str | None = None):  # fmt: skip
        if not callable(reward_func):
            raise TypeError(f"`reward_func={reward_func!r}` is not callable: serve a reward function or instance.")
        self.name, self.limits = reward_func_name(reward_func), limits or ServerLimits()
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.app = build_app(reward_func, self.limits, api_key)
        self.socket = bind(host, port)
        host, port = self.socket.getsockname()[:2]
        #: The base URL clients use, e.g. `http://127.0.0.1:8000` (the port picked when `port=0`).
        self.url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        # the asyncio event loop, not uvloop where it is installed: out of descriptors, asyncio pauses accepting (the
        # connections wait in the backlog) where uvloop accepts and resets them
        config = uvicorn.Config(
            self.app, loop="asyncio", http=_HeadTimeoutProtocol, lifespan="off", log_config=None, access_log=False,
            timeout_keep_alive=self.limits.idle_timeout, timeout_graceful_shutdown=1, backlog=BACKLOG,
        )  # fmt: skip
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        """Serve in this thread until [`shutdown`] (or Ctrl-C in the main thread)."""
        self._server.run(sockets=[self.socket])

    def run(self) -> None:
        """Serve in this thread until Ctrl-C or [`shutdown`], then close the socket."""
        try:
            self.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            self.server_close()

    def start(self) -> RewardServer:
        """Serve from a daemon thread; returns once the server accepts requests."""
        self._thread = threading.Thread(target=self.serve_forever, name=f"reward-server-{self.name}", daemon=True)
        self._thread.start()
        start = time.monotonic()
        while not self._server.started and self._thread.is_alive() and time.monotonic() - start < 30:
            time.sleep(0.01)
        return self

    def shutdown(self) -> None:
        """Stop serving (requests in flight get a second to finish)."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def server_close(self) -> None:
        """Close the listening socket."""
        self.socket.close()


def serve(
    reward_func: RewardFunc,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_concurrency: int = 1,
    block: bool = True,
    api_key: str | None = None,
    **limits,
) -> RewardServer:
    r"""
    Serve `reward_func` over HTTP (the wire format is in [`~trl_arcopo.rewards.wire`]).

    Args:
        reward_func (`RewardFunc`): any reward function (`fn(prompts, videos, **kwargs) -> list[float | None]`).
        host (`str`, defaults to `"127.0.0.1"`): the address to listen on.
        port (`int`, defaults to `8000`): `0` picks a free port (read it from `server.url`).
        max_concurrency (`int`, defaults to `1`): calls of `reward_func` at a time.
        block (`bool`, defaults to `True`): serve until interrupted (Ctrl-C) and return the closed server; with
            `False`, serve from a daemon thread and return once it accepts requests (stop it with
            `server.shutdown()`, then `server.server_close()`).
        api_key (`str`, *optional*): the bearer token requests must carry ([`RewardServer`]).
        **limits: the other fields of [`ServerLimits`] (`max_queue`, `max_body_mb`, `timeout`, `read_timeout`,
            `idle_timeout`, `max_abandoned`).

    Returns:
        [`RewardServer`]: the server.
    """
    server = RewardServer(reward_func, host, port, ServerLimits(max_concurrency=max_concurrency, **limits), api_key)
    logger.info(f"Serving reward `{server.name}` on {server.url} (POST /score, GET /health)")
    if not block:
        return server.start()
    server.run()
    return server
