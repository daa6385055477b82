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
The reward path under broken and hostile services, one test per fault, all on 127.0.0.1: a redirect that would leak
the key, a 1 GiB body, idle connections past the descriptor limit, a trickling server, a server killed during
training, a hung reward, bad return values, `Retry-After`, a failing async reward, and a replica killed mid-run.
Servers that are killed or limited run in their own processes (`trl-arcopo reward-server`), started together.
"""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers import ROOT, FakeServer, tiny_trainer
from transformers import TrainerCallback

from trl_arcopo.rewards.base import redness
from trl_arcopo.rewards.judge import VLMJudgeReward
from trl_arcopo.rewards.remote import RemoteRewardError
from trl_arcopo.rewards.server import serve
from trl_arcopo.rewards.server_client import RewardServerClient


PROMPTS = ["a red fox jumps", "a dog in snow", "a blue car at night", "a cat on a roof"]
VIDEOS = torch.rand(4, 3, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # [N, F, C, H, W]


# ---------------------------------------------------------------------------------------------------- servers
def _spawn(*flags: str, descriptors: int | None = None) -> subprocess.Popen:
    """`trl-arcopo reward-server` serving `redness` on a free port, in its own process (with at most `descriptors`
    open files)."""
    limit = f"resource.setrlimit(resource.RLIMIT_NOFILE, ({descriptors}, {descriptors}))" if descriptors else "0"
    code = f"import resource; {limit}; from trl_arcopo.cli import main; main()"
    command = [sys.executable, "-c", code, "reward-server", "trl_arcopo.rewards.base:redness", "--port", "0", *flags]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _url(process: subprocess.Popen, timeout: float = 60.0) -> str:
    """The URL a spawned server prints once it listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline()
            if line.startswith("Serving reward"):
                return line.split(" on ")[1].split()[0]
            if not line and process.poll() is not None:
                break
    raise RuntimeError(f"the reward server did not start (exit code {process.poll()})")


@pytest.fixture(scope="module")
def processes():
    """The servers that run in processes of their own, started at once (their imports overlap)."""
    spawned = {
        "limited": _spawn("--idle-timeout", "1", descriptors=64),
        "training": _spawn(),
        "replica": _spawn(),
    }
    yield spawned
    for process in spawned.values():
        process.kill()
        process.wait()


def scripted(replies) -> FakeServer:
    """A server that answers request `i` with `replies[i]` (`(status, body, headers)`), then with the last one."""
    return FakeServer(lambda server, path, body: replies[min(len(server.requests), len(replies)) - 1])


def chat(content: str) -> tuple[int, bytes, dict]:
    return 200, json.dumps({"choices": [{"message": {"content": content}}]}).encode(), {}


def read_reply(sock: socket.socket) -> str:
    """One whole HTTP reply (head and `Content-Length` body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
        data.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]
    ):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode()


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as status:
        kib = next(line for line in status if line.startswith("VmRSS:")).split()[1]
    return int(kib) * 1024


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------------- the faults
def test_a_redirect_is_not_followed_and_the_key_goes_nowhere_else(start):
    thief = start(scripted([chat("10"), (200, b'{"rewards": [1.0, 1.0]}', {})]))
    moved = {"Location": thief.url + "/v1/chat/completions"}
    origin = start(scripted([(302, b"", moved), (307, b"", moved), (301, b"", {"Location": thief.url + "/score"})]))
    for _ in range(2):  # 302 and 307
        judge = VLMJudgeReward(origin.url + "/v1", "judge", api_key="sk-secret", timeout=2, max_retries=3)
        assert judge(PROMPTS[:1], VIDEOS[:1]) == [None]
        assert f"redirect to '{thief.url}/v1/chat/completions' not followed" in judge.last_error
        assert "1 attempt (not retried)" in judge.last_error
    client = RewardServerClient(origin.url, name="remote", api_key="sk-secret", timeout=2, max_retries=3)
    assert client(PROMPTS[:2], VIDEOS[:2]) == [None, None] and "HTTP 301 redirect" in client.last_error
    assert thief.requests == []  # neither the key nor the videos reached the other origin
    assert [r["headers"]["authorization"] for r in origin.requests] == ["Bearer sk-secret"] * 3


def test_a_1_gib_body_is_refused_unread_and_memory_stays_flat(start):
    server = start(serve(redness, port=0, block=False))
    port = int(server.url.rsplit(":", 1)[1])
    idle = rss_bytes()
    head = "POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/vnd.safetensors\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"{head}Content-Length: {2**30}\r\n\r\n".encode())
        reply = read_reply(sock)
        assert reply.startswith("HTTP/1.1 413") and "connection: close" in reply.lower()
        assert "larger than the server's limit (--max-body-mb 256)" in reply
        chunk, sent = b"\x00" * 2**20, 0
        with pytest.raises(OSError):  # the server closed the connection: the body is not read
            while sent < 2**30:
                sent += sock.send(chunk)
        assert sent < 2**28
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # no length, no reading
        sock.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + b"40000000\r\n" + chunk)
        assert read_reply(sock).startswith("HTTP/1.1 411")
    assert rss_bytes() - idle < 300 * 2**20
    client = RewardServerClient(server.url, timeout=5, max_retries=0)  # and the server still serves
    assert client(PROMPTS, VIDEOS) == pytest.approx(redness(PROMPTS, VIDEOS), abs=1e-6)


def test_idle_connections_past_the_descriptor_limit_do_not_starve_a_client(processes):
    process = processes["limited"]  # at most 64 descriptors, idle connections closed after 1 s
    url = _url(process)
    port = int(url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(70)]
    try:
        cpu, begin = cpu_seconds(process.pid), time.monotonic()
        client = RewardServerClient(url, timeout=10, max_retries=0, on_failure="raise")
        assert client(PROMPTS, VIDEOS) == pytest.approx(redness(PROMPTS, VIDEOS), abs=1e-6)
        elapsed = time.monotonic() - begin
        assert elapsed < 10
        assert cpu_seconds(process.pid) - cpu < 0.5 * elapsed + 0.2  # the server waited, it did not spin
        assert sum(s.recv(1) == b"" for s in idle[:5]) == 5  # the idle connections it accepted were closed
    finally:
        for s in idle:
            s.close()


class Trickler:
    """A server that answers every request one byte every `pause` seconds, head included."""

    def __init__(self, pause: float):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url, self.pause, self.stop = f"http://127.0.0.1:{self.sock.getsockname()[1]}", pause, threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn):
        conn.recv(1 << 20)
        body = b'{"rewards": [1.0]}'
        reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            len(body),
            body,
        )
        try:
            for byte in reply:
                if self.stop.wait(self.pause):
                    break
                conn.sendall(bytes([byte]))
        except OSError:
            pass
        conn.close()

    def close(self):
        self.stop.set()
        self.sock.close()


@pytest.mark.parametrize("kind", ["server_client", "judge"])
def test_a_trickling_server_is_cut_at_the_total_deadline(kind):
    trickler = Trickler(pause=0.3)
    try:
        if kind == "judge":
            reward = VLMJudgeReward(trickler.url + "/v1", "judge", timeout=1.5, max_retries=0)
        else:
            reward = RewardServerClient(trickler.url, name="slow", timeout=1.5, max_retries=0)
        begin = time.monotonic()
        assert reward(PROMPTS[:1], VIDEOS[:1]) == [None]
        assert abs(time.monotonic() - begin - 1.5) < 1.0
        assert "no complete reply within timeout=1.5 s" in reward.last_error
    finally:
        trickler.close()


class KillServerAfterFirstStep(TrainerCallback):
    def __init__(self, process, trainer_ref):
        self.process, self.trainer_ref, self.adapter = process, trainer_ref, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.adapter = {k: v.clone() for k, v in self.trainer_ref[0].adapter_state_dict().items()}


def test_a_server_killed_during_training_stops_the_run_without_moving_the_adapter(tmp_path, processes):
    process = processes["training"]
    client = RewardServerClient(_url(process), timeout=2, max_retries=1, backoff=0.05)
    ref = []
    trainer = tiny_trainer(tmp_path, reward_funcs=[client], max_steps=6, max_nonfinite_steps=2, num_iterations=1)
    ref.append(trainer)
    killer = KillServerAfterFirstStep(process, ref)
    trainer.add_callback(killer)
    with pytest.raises(RuntimeError, match=r"2 consecutive optimizer steps .*no candidate of 2 of 2 groups was scored .*reward `redness`: \d+ videos failed so far, last error: .*cannot connect"):  # fmt: skip
        trainer.train()
    assert killer.adapter is not None
    after = trainer.adapter_state_dict()
    assert all(torch.equal(after[k], killer.adapter[k]) for k in after)  # no step on optimizer momentum alone
    assert [s["step"] for s in trainer.skipped_steps] == [2, 3]


def test_a_hung_reward_does_not_hold_the_slot_past_the_deadline(start):
    release, calls = threading.Event(), []

    def sometimes_stuck(prompts, videos, **kwargs):
        calls.append(prompts[0])
        if prompts[0] == "hang":
            release.wait(30)
        return redness(prompts, videos)

    server = start(serve(sometimes_stuck, port=0, block=False, max_abandoned=0))
    try:
        hung = RewardServerClient(server.url, name="r", timeout=1, max_retries=0)
        begin = time.monotonic()
        assert hung(["hang"], VIDEOS[:1]) == [None]
        assert (
            time.monotonic() - begin < 1.5 and "HTTP 504: reward `sometimes_stuck` did not finish" in hung.last_error
        )
        # the slot is free, but one abandoned call still runs: with max_abandoned=0 the server says so at once
        busy = RewardServerClient(server.url, name="r", timeout=5, max_retries=0)
        begin = time.monotonic()
        assert busy(PROMPTS[:1], VIDEOS[:1]) == [None] and time.monotonic() - begin < 1
        assert "HTTP 503: 1 abandoned calls of reward `sometimes_stuck` are still running" in busy.last_error
        release.set()  # the stuck call ends; the next request is served
        time.sleep(0.1)
        client = RewardServerClient(server.url, name="r", timeout=5, max_retries=0)
        assert client(PROMPTS, VIDEOS) == pytest.approx(redness(PROMPTS, VIDEOS), abs=1e-6)
    finally:
        release.set()
    assert calls == ["hang", PROMPTS[0]]  # the refused request never reached the reward

    lenient = start(serve(sometimes_stuck, port=0, block=False))  # the default max_abandoned=1
    release.clear()
    RewardServerClient(lenient.url, name="r", timeout=1, max_retries=0)(["hang"], VIDEOS[:1])
    begin = time.monotonic()
    client = RewardServerClient(lenient.url, name="r", timeout=5, max_retries=0)
    assert client(PROMPTS, VIDEOS) == pytest.approx(redness(PROMPTS, VIDEOS), abs=1e-6)
    assert time.monotonic() - begin < 1  # served while the abandoned call still hangs
    release.set()


@pytest.mark.parametrize(
    "value, message",
    [
        (0.5, "returned '0.5' (float) for 4 videos: return a list"),
        ([10**400] * 4, "returned '1000"),
        (["high"] * 4, "returned \"'high'\" (str) for video 0: return a float or None"),
        ([0.5], "returned 1 values for 4 videos"),
    ],
)
def test_a_bad_return_value_is_a_500_with_the_message(start, value, message):
    def bad(prompts, videos, **kwargs):
        return value

    server = start(serve(bad, port=0, block=False))
    client = RewardServerClient(server.url, name="bad", timeout=2, max_retries=3, on_failure="raise")
    with pytest.raises(RemoteRewardError, match="failed after 1 attempt \\(not retried\\); last error: HTTP 500: reward `bad` ") as error:  # fmt: skip
        client(PROMPTS, VIDEOS)
    assert message in str(error.value)


def test_retry_after_is_honoured(start):
    ok = (200, b'{"rewards": [0.25]}', {})
    server = start(scripted([(429, b'{"error": "slow down"}', {"Retry-After": "1"}), ok]))
    client = RewardServerClient(server.url, name="r", timeout=2, max_retries=2, backoff=0.01)
    assert client(PROMPTS[:1], VIDEOS[:1]) == [0.25]
    gap = server.requests[1]["time"] - server.requests[0]["time"]
    assert 1.0 <= gap < 2.0  # the server's wait, not the 0.01 s backoff

    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 3))
    server = start(scripted([(503, b'{"error": "restarting"}', {"Retry-After": date}), ok]))
    late = RewardServerClient(server.url, name="r", timeout=1, max_retries=2, backoff=0.01)
    begin = time.monotonic()
    assert late(PROMPTS[:1], VIDEOS[:1]) == [None] and time.monotonic() - begin < 0.5  # asks for more than timeout
    assert "Retry-After" in late.last_error and "> timeout" in late.last_error and len(server.requests) == 1


def test_an_async_reward_failure_ends_the_process_at_once(tmp_path):
    script = f"""
import atexit, sys, time
atexit.register(lambda: print("shutdown", time.monotonic(), flush=True))  # runs last: after the threads are joined
sys.path.insert(0, {os.path.join(ROOT, "tests")!r})
from helpers import tiny_trainer

def fails(prompts, videos, **kwargs):
    time.sleep(0.2)
    raise ValueError("the reward model crashed")

def slow(prompts, videos, **kwargs):
    time.sleep(20)
    return [0.0] * len(prompts)

trainer = tiny_trainer({str(tmp_path)!r}, reward_funcs=[slow, fails], async_rewards=True)
try:
    trainer.train()
except ValueError as error:
    print("raised", time.monotonic(), error, flush=True)
    raise SystemExit(3)
"""
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    output, _ = process.communicate(timeout=120)
    ended = time.monotonic()
    assert process.returncode == 3, output
    raised, shutdown = (line.split(" ", 2) for line in output.splitlines())
    assert raised[0] == "raised" and "the reward model crashed" in raised[2]
    # the slow reward (20 s) holds neither the exit (threads joined, exit handlers run) nor the process; what is left
    # after the exit handlers is the interpreter's own teardown (about 1.5 s with torch loaded, with or without it)
    assert float(shutdown[1]) - float(raised[1]) < 1.0
    assert ended - float(raised[1]) < 5.0


def test_two_replicas_one_killed_mid_run_every_score_arrives_bit_equal(start, processes):
    process = processes["replica"]
    doomed, alive = _url(process), start(serve(redness, port=0, block=False))
    single = RewardServerClient(alive.url, name="r", batch_size=1, timeout=5, max_retries=0)
    replicas = RewardServerClient([doomed, alive.url], name="r", batch_size=1, timeout=5, max_retries=1, backoff=0.05)
    expected = single(PROMPTS, VIDEOS)
    assert replicas(PROMPTS, VIDEOS) == expected  # pieces 0 and 2 on the first replica, 1 and 3 on the second
    killer = threading.Timer(0.05, process.kill)
    killer.start()
    for seed in range(3):  # calls in flight while the replica dies, and after
        videos = torch.rand(4, 3, 3, 8, 8, generator=torch.Generator().manual_seed(seed + 1))
        assert replicas(PROMPTS, videos) == single(PROMPTS, videos)
    killer.join()
    assert process.wait(5) is not None and replicas.failures == 0
