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
The VLM judge and the reward server against local servers on 127.0.0.1 (ephemeral ports, no network): correct answers,
malformed answers, hanging and dying servers under both failure policies, the judge's request body, the wire format,
and the `trl-arcopo reward-server` command.
"""

import base64
import io
import json
import math
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from helpers import FakeServer

from trl_arcopo import cli
from trl_arcopo.rewards import server as server_module
from trl_arcopo.rewards.base import redness, reward_func_name
from trl_arcopo.rewards.frames import frame_indices
from trl_arcopo.rewards.judge import VLMJudgeReward, encode_png
from trl_arcopo.rewards.remote import RemoteRewardError
from trl_arcopo.rewards.server import serve
from trl_arcopo.rewards.server_client import RewardServerClient
from trl_arcopo.rewards.wire import decode_request, encode_request


PROMPTS = ["a red fox jumps", "a dog in snow", "a blue car at night"]


def chat_reply(content: str) -> tuple[int, bytes]:
    return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


def hang(server, path, body):  # no reply (None) once released at the end of the test
    server.release.wait(10)


def decode_png(url: str) -> torch.Tensor:
    """A `data:image/png;base64,...` URL as `[H, W, C]` uint8, decoded by PIL (independent of the encoder)."""
    image_module = pytest.importorskip("PIL.Image")
    assert url.startswith("data:image/png;base64,")
    image = image_module.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert image.format == "PNG"
    return torch.tensor(list(image.getdata()), dtype=torch.uint8).view(image.height, image.width, -1)


def videos_for_test(n=3, frames=9, h=6, w=10, seed=0):
    return torch.rand(n, frames, 3, h, w, generator=torch.Generator().manual_seed(seed))  # [N, F, C, H, W]


def judge(url, **kwargs):
    defaults = dict(model="judge-model", timeout=1, max_retries=0, backoff=0.05)
    return VLMJudgeReward(url + "/v1", **{**defaults, **kwargs})


# ---------------------------------------------------------------------------------------------------- the judge
def test_judge_scores_what_the_server_answers_with_the_right_request(start, monkeypatch):
    computed = {}

    def respond(server, path, body):  # the score: the mean of the first frame's pixels, computed by the server
        request = json.loads(body)
        content = request["messages"][-1]["content"]
        score = decode_png(content[0]["image_url"]["url"]).float().mean().item() / 255
        computed[content[-1]["text"]] = score
        time.sleep(0.2)  # long enough for concurrent requests to overlap
        return chat_reply(f"Score: {score:.6f} (out of 1)")

    server = start(FakeServer(respond))
    monkeypatch.setenv("JUDGE_TEST_KEY", "secret-key")
    template = "Frames of a video for <{prompt}>. Rate it {{0-1}}."
    reward = judge(server.url, prompt_template=template, score_range=(0, 1), frames="uniform", num_frames=3, max_concurrency=2,
                   system_prompt="You are a judge.", max_tokens=8, api_key_env="JUDGE_TEST_KEY",
                   extra_body={"chat_template_kwargs": {"enable_thinking": False}})  # fmt: skip
    prompts = [f"{p} (take {i})" for i, p in enumerate(PROMPTS * 2)]  # distinct: the texts key the scores
    videos = videos_for_test(n=6)
    scores = reward(prompts, videos)

    texts = [template.format(prompt=p) for p in prompts]
    assert scores == pytest.approx([computed[t] for t in texts], abs=1e-6)
    assert reward.failures == 0 and reward.__name__ == "vlm_judge"
    assert 2 == server.max_in_flight  # the limit is respected, and requests did run concurrently
    index = frame_indices(9, "uniform", k=3)
    assert index == [0, 4, 8]
    for record in server.requests:
        assert record["path"] == "/v1/chat/completions"
        assert record["headers"]["authorization"] == "Bearer secret-key"
        body = json.loads(record["body"])
        assert body["model"] == "judge-model" and body["max_tokens"] == 8 and body["temperature"] == 0.0
        assert body["chat_template_kwargs"] == {"enable_thinking": False}
        assert body["messages"][0] == {"role": "system", "content": "You are a judge."}
        content = body["messages"][1]["content"]
        assert [part["type"] for part in content] == ["image_url"] * 3 + ["text"]
        i = texts.index(content[-1]["text"])  # the template was applied to this video's prompt
        assert content[-1]["text"] == f"Frames of a video for <{prompts[i]}>. Rate it {{0-1}}."
        for part, j in zip(content[:-1], index):
            expected = (videos[i, j] * 255).round().to(torch.uint8).permute(1, 2, 0)  # [H, W, C]
            assert torch.equal(decode_png(part["image_url"]["url"]), expected)


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_png_encoder_is_lossless(channels):
    image = torch.randint(0, 256, (5, 7, channels), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    url = "data:image/png;base64," + base64.b64encode(encode_png(image)).decode()
    assert torch.equal(decode_png(url), image)


def test_judge_malformed_replies_name_the_parser_and_quote_the_reply(start):
    replies = iter([chat_reply("I cannot rate this video."), chat_reply("Score: 7"), (200, b"<html>busy</html>")])
    server = start(FakeServer(lambda server, path, body: next(replies)))
    videos = videos_for_test(n=1)

    with pytest.raises(RuntimeError, match=r"score parser `last number in \[1, 10\]` failed on the reply 'I cannot rate this video.'"):  # fmt: skip
        judge(server.url, on_failure="raise", max_retries=2)(PROMPTS[:1], videos)
    assert len(server.requests) == 1  # a malformed reply is not retried

    regex = judge(server.url, score_parser=r"Final Score:\s*([0-9.]+)", max_retries=2)
    assert regex(PROMPTS[:1], videos) == [None] and regex.failures == 1
    assert "score parser `regex 'Final Score:\\\\s*([0-9.]+)'` failed on the reply 'Score: 7'" in regex.last_error
    assert len(server.requests) == 2

    with pytest.raises(RuntimeError, match=r"the reply is not JSON .*'<html>busy</html>'"):
        judge(server.url, on_failure="raise")(PROMPTS[:1], videos)


def test_judge_parsers_and_knob_errors():
    reward = judge("http://127.0.0.1:9", score_parser=r"(\d+)/10")
    assert reward.score_parser("rating: 8/10, score 3") == 8.0
    parse = judge("http://127.0.0.1:9").score_parser  # the last number in [1, 10], once a restated scale is removed
    assert parse("On a scale of 1 to 10, I would give it 8.") == 8.0
    assert parse("Score: 7/10") == 7.0 and parse("8 out of 10") == 8.0 and parse("Between 1 and 10: 3.5") == 3.5
    assert parse("Rating (1-10): 6, final answer 9") == 9.0
    for reply in ["1e999", "Score: 11", "-3", "nan"]:
        with pytest.raises(ValueError, match=r"no number in the reply in \[1, 10\]"):
            parse(reply)
    assert judge("http://127.0.0.1:9", score_range=(-20, 0)).score_parser("Score: -1.5e1 of -20 to 0") == -15.0
    with pytest.raises(ValueError, match=r"`score_range=\(10, 1\)` must be two finite numbers"):
        judge("http://127.0.0.1:9", score_range=(10, 1))
    with pytest.raises(ValueError, match=r"`prompt_template='Rate {video}'` cannot be formatted"):
        judge("http://127.0.0.1:9", prompt_template="Rate {video}")
    with pytest.raises(ValueError, match=r"`on_failure='skip'` is not a failure policy"):
        judge("http://127.0.0.1:9", on_failure="skip")
    with pytest.raises(ValueError, match=r"`frames='last'` is not a frame policy"):
        judge("http://127.0.0.1:9", frames="last")
    with pytest.raises(ValueError, match=r"`api_key_env='NO_SUCH_KEY_VARIABLE_XYZ'` is not set"):
        judge("http://127.0.0.1:9", api_key_env="NO_SUCH_KEY_VARIABLE_XYZ")


@pytest.mark.parametrize("on_failure", ["none", "raise"])
def test_judge_times_out_on_a_hanging_server(start, on_failure):
    server = start(FakeServer(hang))
    reward = judge(server.url, on_failure=on_failure, timeout=1, max_retries=0, max_concurrency=2)
    begin = time.perf_counter()
    if on_failure == "raise":
        with pytest.raises(
            RuntimeError, match=rf"{server.url}/v1/chat/completions failed after 1 attempt .*timeout=1"
        ):
            reward(PROMPTS[:2], videos_for_test(n=2))
    else:
        assert reward(PROMPTS[:2], videos_for_test(n=2)) == [None, None]
        assert reward.failures == 2 and "no complete reply within timeout=1 s" in reward.last_error
    assert 0.9 <= time.perf_counter() - begin <= 2.0
    assert len(server.requests) == 2


@pytest.mark.parametrize("on_failure", ["none", "raise"])
def test_judge_retries_when_the_server_dies_mid_run(start, on_failure):
    def respond(server, path, body):  # answers once, then drops every connection
        return chat_reply("0.75") if len(server.requests) == 1 else None

    server = start(FakeServer(respond))
    reward = judge(
        server.url, on_failure=on_failure, max_retries=2, backoff=0.05, max_concurrency=1, score_range=(0, 1)
    )
    if on_failure == "raise":
        with pytest.raises(RuntimeError, match=r"failed after 3 attempts .*connection lost"):
            reward(PROMPTS, videos_for_test())
        assert len(server.requests) == 1 + 3  # the first failure stops the call; the last video is not sent
    else:
        assert reward(PROMPTS, videos_for_test()) == [0.75, None, None]
        assert reward.failures == 2
        assert len(server.requests) == 1 + 2 * 3  # each failed video: one attempt and two retries


# ---------------------------------------------------------------------------------------------------- reward server
def recording(reward_func):
    """`reward_func` that also keeps what it was called with."""
    calls = []

    def record(prompts, videos, **kwargs):
        calls.append((prompts, videos, kwargs))
        return reward_func(prompts, videos, **kwargs)

    record.calls, record.__name__ = calls, reward_func.__name__
    return record


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reward_server_gives_the_rewards_values_and_round_trips_bit_exactly(start, dtype):
    reward = recording(redness)
    server = start(serve(reward, port=0, block=False))
    client = RewardServerClient(server.url, timeout=2, max_retries=0)
    videos = videos_for_test(seed=1).to(dtype)
    videos[0, 0, 0, 0, 0] = float("nan")  # a NaN pixel and the smallest subnormal cross unchanged too
    videos[0, 0, 0, 0, 1] = torch.finfo(dtype).smallest_normal / 2

    values = client(PROMPTS, videos, scene=["a", "b", "c"], trainer_state=object(), tensor_column=[torch.ones(1)] * 3)
    assert client.__name__ == "redness"
    direct = redness(PROMPTS, videos)
    assert values[1:] == pytest.approx(direct[1:], abs=1e-6)
    prompts, received, kwargs = reward.calls[0]
    assert prompts == PROMPTS and kwargs == {"scene": ["a", "b", "c"]}  # no trainer_state, no non-JSON column
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32  # compared bit by bit: NaN == NaN
    assert received.dtype == dtype and torch.equal(received.view(bits), videos.view(bits))
    assert math.isnan(values[0])  # the NaN pixel's NaN reward crosses too, for the trainer's non-finite policy

    batched = RewardServerClient(server.url, name="red", batch_size=2, timeout=2, max_retries=0)
    assert batched.__name__ == "red"
    clean = videos_for_test(seed=2).to(dtype)
    assert batched(PROMPTS, clean, scene=["a", "b", "c"]) == pytest.approx(redness(PROMPTS, clean), abs=1e-6)
    assert [c[2]["scene"] for c in reward.calls[1:]] == [["a", "b"], ["c"]]  # two requests, columns split with them


def test_wire_format_and_server_errors(start):
    videos = videos_for_test(n=2)
    prompts, received, columns = decode_request(encode_request(PROMPTS[:2], videos, {"seed": [1, 2]}))
    assert prompts == PROMPTS[:2] and torch.equal(received, videos) and columns == {"seed": [1, 2]}
    with pytest.raises(ValueError, match="is not a safetensors file"):
        decode_request(b"\x00" * 4)

    def broken(prompts, videos, **kwargs):
        if prompts[0] == "wrong count":
            return [0.5]
        raise ValueError("the reward model ran out of memory")

    server = start(serve(broken, port=0, block=False))
    with urllib.request.urlopen(server.url + "/health", timeout=2) as response:
        assert json.loads(response.read()) == {"name": "broken", "status": "ok", "max_body_bytes": 256 * 2**20}
    for path, data, status, message in [
        ("/score", b"not safetensors at all", 400, "not a safetensors file"),
        ("/nope", b"", 404, "POST '/nope': Not Found; use POST /score or GET /health"),
        ("/score", encode_request(["wrong count", "x"], videos), 500, "returned 1 values for 2 videos"),
    ]:
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(urllib.request.Request(server.url + path, data=data), timeout=2)
        assert error.value.code == status and message in json.loads(error.value.read())["error"]

    client = RewardServerClient(server.url, timeout=2, max_retries=1, backoff=0.05, on_failure="raise")
    # the reward's own exception will not change: not retried
    with pytest.raises(RuntimeError, match=r"failed after 1 attempt \(not retried\); last error: HTTP 500: reward `broken` raised ValueError: the reward model ran out of memory"):  # fmt: skip
        client(PROMPTS[:2], videos)


def test_reward_server_client_rejects_malformed_replies(start):
    replies = iter([(200, b'{"scores": [0.1, 0.2]}'), (200, b'{"rewards": [0.1, "high"]}'), (200, b"oops")])
    health = (200, b'{"name": "remote", "status": "ok"}')
    server = start(FakeServer(lambda server, path, body: health if path == "/health" else next(replies)))
    client = RewardServerClient(server.url, name="remote", timeout=1, max_retries=2, on_failure="raise")
    videos = videos_for_test(n=2)
    with pytest.raises(RuntimeError, match=r"the reply's `rewards` is not a list of 2 numbers or nulls: '\{\"scores\": \[0.1, 0.2\]\}'"):  # fmt: skip
        client(PROMPTS[:2], videos)
    with pytest.raises(RuntimeError, match=r"`rewards` is not a list .*\"high\""):
        client(PROMPTS[:2], videos)
    lenient = RewardServerClient(server.url, name="remote", timeout=1, max_retries=2)
    assert lenient(PROMPTS[:2], videos) == [None, None]
    assert lenient.failures == 2 and "the reply is not JSON" in lenient.last_error and "'oops'" in lenient.last_error
    assert [r["path"] for r in server.requests].count("/score") == 3  # malformed replies are not retried


@pytest.mark.parametrize("on_failure", ["none", "raise"])
def test_reward_server_client_times_out_on_a_hanging_reward(start, on_failure):
    release = threading.Event()

    def stuck(prompts, videos, **kwargs):
        release.wait(10)
        return [0.0] * len(prompts)

    server = start(serve(stuck, port=0, block=False, max_concurrency=4))
    client = RewardServerClient(server.url, name="stuck", timeout=1, max_retries=0, on_failure=on_failure)
    begin = time.perf_counter()
    try:
        if on_failure == "raise":
            with pytest.raises(RuntimeError, match=rf"{server.url} failed after 1 attempt .*HTTP 504: reward `stuck` did not finish"):  # fmt: skip
                client(PROMPTS, videos_for_test())
        else:
            assert client(PROMPTS, videos_for_test()) == [None, None, None] and client.failures == 3
    finally:
        release.set()
    assert 0.9 <= time.perf_counter() - begin <= 2.0


@pytest.mark.parametrize("on_failure", ["none", "raise"])
def test_reward_server_client_retries_when_the_server_dies_mid_run(start, monkeypatch, on_failure):
    stopped = threading.Event()

    def once(prompts, videos, **kwargs):  # scores, then the server goes away
        def stop():
            server.shutdown()
            server.server_close()
            stopped.set()

        threading.Thread(target=stop, daemon=True).start()
        return redness(prompts, videos)

    server = serve(once, port=0, block=False)
    attempts, real = [], RewardServerClient._send

    async def counted(self, client, url, content=None):
        if url.endswith("/score"):
            attempts.append(url)
        return await real(self, client, url, content)

    monkeypatch.setattr(RewardServerClient, "_send", counted)
    client = RewardServerClient(server.url, name="once", batch_size=1, timeout=1, max_retries=2, backoff=0.05,
                                on_failure=on_failure)  # fmt: skip
    videos = videos_for_test()
    first = client(PROMPTS[:1], videos[:1])
    assert first == pytest.approx(redness(PROMPTS[:1], videos[:1]), abs=1e-6)
    assert stopped.wait(5)
    if on_failure == "raise":
        with pytest.raises(
            RuntimeError, match=rf"{server.url} failed after 3 attempts .*cannot connect to {server.url}"
        ):
            client(PROMPTS[1:], videos[1:])
        assert 1 + 3 <= len(attempts) <= 1 + 2 * 3  # the pieces go concurrently; the first to fail cancels the other
    else:
        assert client(PROMPTS[1:], videos[1:]) == [None, None]
        assert client.failures == 2 and len(attempts) == 1 + 2 * 3  # one attempt and two retries per request


def test_reward_server_client_name_needs_a_server():
    client = RewardServerClient("http://127.0.0.1:9", timeout=1, max_retries=0)
    with pytest.raises(RemoteRewardError, match=r"Cannot name the reward served at http://127.0.0.1:9 .*pass `name=`"):
        reward_func_name(client)  # what the trainer asks when it is built


# ---------------------------------------------------------------------------------------------------- command line
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_reward_server_serves_until_shut_down(monkeypatch):
    started = []

    class Recorded(server_module.RewardServer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(server_module, "RewardServer", Recorded)
    port = free_port()
    thread = threading.Thread(
        target=cli.main, args=(["reward-server", "trl_arcopo.rewards.base:redness", "--port", str(port)],), daemon=True
    )
    thread.start()
    client = RewardServerClient(f"http://127.0.0.1:{port}", timeout=1, max_retries=8, backoff=0.01)
    try:
        assert client.__name__ == "redness"  # retried until the server listens
        videos = videos_for_test()
        assert client(PROMPTS, videos) == pytest.approx(redness(PROMPTS, videos), abs=1e-6)
    finally:
        for server in started:
            server.shutdown()
    thread.join(5)
    assert not thread.is_alive()  # main returned once the server stopped


def test_cli_bad_callable_names_the_value_and_the_form(capsys):
    for spec, message in [
        ("no_such_reward", "Unknown reward 'no_such_reward'"),  # a name (e.g. `redness`) or MODULE:CALLABLE
        ("trl_arcopo.rewards.base:nope", "'trl_arcopo.rewards.base' has no attribute 'nope'"),
        ("no_such_module_xyz:reward", "Cannot import the module 'no_such_module_xyz'"),
        ("trl_arcopo.rewards.frames:CLIP_MEAN", "is a tuple, not a reward function"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["reward-server", spec, "--port", "0"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err and "MODULE:CALLABLE" in err
    with pytest.raises(SystemExit):
        cli.main(["reward-server", "trl_arcopo.rewards.base:redness", "--kwargs", "[1, 2]"])
    assert "--kwargs '[1, 2]' is not a JSON object" in capsys.readouterr().err


def test_load_callable_builds_classes_and_factories():
    from trl_arcopo.rewards.video_metrics import MotionMagnitudeReward, SharpnessReward

    motion = cli.load_callable("trl_arcopo.rewards.video_metrics:MotionMagnitudeReward", {"scale": 10})
    assert isinstance(motion, MotionMagnitudeReward) and motion.scale == 10
    assert isinstance(cli.load_callable("trl_arcopo.rewards.base:load_reward_func", {"name": "sharpness"}), SharpnessReward)  # fmt: skip
    assert cli.load_callable("trl_arcopo.rewards.base:redness") is redness
    with pytest.raises(TypeError, match=r"MotionMagnitudeReward' cannot be built with the keyword arguments \{'speed': 1\}"):  # fmt: skip
        cli.load_callable("trl_arcopo.rewards.video_metrics:MotionMagnitudeReward", {"speed": 1})


def test_cli_reward_server_bad_port_host_or_port_in_use_exit_cleanly(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for flags, message in [
            (["--port", "70000"], "`port=70000` is not a TCP port: use an integer in [0, 65535]"),
            (["--host", "no-such-host.invalid"], "`host='no-such-host.invalid'` is not an address"),
            (["--host", "10.255.255.1"], "`host='10.255.255.1'` is not an address of this machine"),
            (["--port", str(port)], f"port {port} on 127.0.0.1 is in use: pick another `port`, or 0 for a free one"),
            (["--port", "0", "--max-body-mb", "0"], "`max_body_mb=0.0` must be a positive, finite number"),
        ]:
            with pytest.raises(SystemExit) as exit_info:
                cli.main(["reward-server", "trl_arcopo.rewards.base:redness", *flags])
            assert exit_info.value.code == 2
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err
