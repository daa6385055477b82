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
A vision-language model as a judge: the frames of each video and a prompt sent to an OpenAI-compatible
chat-completions server (vLLM or SGLang serving Qwen3-VL, UnifiedReward, ...), the score parsed from the reply.
Standard library HTTP only.
"""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from .frames import frame_indices
from .remote import AttemptError, RemoteReward, RemoteRewardError, http_request, parse_json, quoted


DEFAULT_PROMPT_TEMPLATE = (
    'These images are frames of a video generated for the prompt "{prompt}", in order. Rate how well the video '
    "matches the prompt and how good it looks, from 1 (bad) to 10 (excellent). Answer with the number only."
)
# a decimal number, optionally signed, with an optional fraction and exponent: "7", "-0.5", "8.", "1e-3"
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def encode_png(image: torch.Tensor) -> bytes:
    """
    A PNG file of `image` `[H, W, C]` uint8 with `C` 1 (grey), 3 (RGB) or 4 (RGBA), in plain Python and zlib: 8 bits
    per channel, no filter, no interlacing.
    """
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"A PNG frame must be [H, W, C] uint8 with C in (1, 3, 4), got {image.dtype} {tuple(image.shape)}."
        )
    h, w, c = image.shape
    rows = torch.cat([image.new_zeros(h, 1), image.reshape(h, w * c)], dim=1)  # [H, 1 + W * C]: filter byte 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    color_type = {1: 0, 3: 2, 4: 6}[c]
    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    data = zlib.compress(rows.contiguous().numpy().tobytes(), 6)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def png_data_url(image: torch.Tensor) -> str:
    """`image` `[H, W, C]` uint8 as a `data:image/png;base64,...` URL."""
    return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode("ascii")


def first_number(reply: str) -> float:
    """The default score parser: the first number in the reply (`"Score: 7/10"` -> 7.0)."""
    match = _NUMBER.search(reply)
    if match is None:
        raise ValueError("no number in the reply")
    return float(match.group())


class RegexParser:
    """A score parser: the first match of `pattern` (its first group, if it has one) as a float."""

    def __init__(self, pattern: str):
        self.pattern = re.compile(pattern)
        self.__name__ = f"regex {pattern!r}"

    def __call__(self, reply: str) -> float:
        match = self.pattern.search(reply)
        if match is None:
            raise ValueError("the pattern does not match the reply")
        return float(match.group(1) if self.pattern.groups else match.group())


class VLMJudgeReward(RemoteReward):
    r"""
    A vision-language model served behind an OpenAI-compatible chat-completions endpoint (`POST
    {base_url}/chat/completions`) scores each video: one request per video, with the selected frames as PNG data URLs
    (`image_url` content parts, in frame order) followed by the text `prompt_template.format(prompt=prompt)`. The score
    is parsed from the reply by `score_parser`. Up to `max_concurrency` requests are in flight at once; each follows
    the retry and failure policy of [`~trl_arcopo.rewards.remote.RemoteReward`].

    Args:
        base_url (`str`): the server's OpenAI base URL, e.g. `"http://localhost:8000/v1"` (a URL that already ends with
            `/chat/completions` is used as it is).
        model (`str`): the served model's name, e.g. `"Qwen/Qwen3-VL-8B-Instruct"`.
        prompt_template (`str`, defaults to `DEFAULT_PROMPT_TEMPLATE`): the text after the frames; `{prompt}` is
            replaced by the video's prompt (write literal braces as `{{` and `}}`).
        score_parser (`str` or `Callable[[str], float]`, *optional*): how a reply becomes a score. `None`: the first
            number in the reply ([`first_number`]); a string: a regular expression whose first group (or whole match,
            without groups) is the number, e.g. `r"Final Score:\s*([0-9.]+)"`; a callable: any function of the reply
            that returns a float or raises `ValueError`.
        frames (`str`, defaults to `"uniform"`): `"first"`, `"uniform"` (`num_frames` evenly spaced) or `"fps"`
            ([`~trl_arcopo.rewards.frames.frame_indices`]).
        num_frames (`int`, defaults to `4`), fps (`float`, *optional*), video_fps (`float`, defaults to `16`).
        system_prompt (`str`, *optional*): a system message before the user message.
        max_tokens (`int`, *optional*): the reply's length limit (the server's default if `None`).
        temperature (`float`, defaults to `0.0`): sampling temperature (0: greedy, the same video gets the same score).
        extra_body (`dict`, *optional*): more request fields, e.g. `{"chat_template_kwargs": {"enable_thinking":
            False}}` for vLLM; they override the ones above.
        api_key (`str`, *optional*): sent as `Authorization: Bearer <api_key>`; if `None`, read from the environment
            variable `api_key_env` when that is given; no header without a key.
        api_key_env (`str`, *optional*): e.g. `"VLLM_API_KEY"`.
        max_concurrency (`int`, defaults to `8`): requests in flight at once (threads).
        timeout (`float`, defaults to `60.0`), max_retries (`int`, defaults to `3`), backoff (`float`, defaults to
            `1.0`), on_failure (`str`, defaults to `"none"`): the policy of
            [`~trl_arcopo.rewards.remote.RemoteReward`]. A reply that cannot be parsed is not retried.
        name (`str`, defaults to `"vlm_judge"`): the name the reward is logged under (`rewards/<name>/mean`).

    Attributes: those of [`~trl_arcopo.rewards.remote.RemoteReward`], `failures` (videos scored `None` because their
    request failed; the trainer logs it as `rewards/<name>/failures`) and `last_error`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        score_parser: str | Callable[[str], float] | None = None,
        frames: str = "uniform",
        num_frames: int = 4,
        fps: float | None = None,
        video_fps: float = 16.0,
        system_prompt: str | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        extra_body: dict[str, Any] | None = None,
        api_key: str | None = None,
        api_key_env: str | None = None,
        max_concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 1.0,
        on_failure: str = "none",
        name: str = "vlm_judge",
    ):
        super().__init__(timeout, max_retries, backoff, on_failure)
        base_url = base_url.rstrip("/")
        self.url = base_url if base_url.endswith("/chat/completions") else base_url + "/chat/completions"
        self.model, self.system_prompt, self.max_tokens, self.temperature = (
            model,
            system_prompt,
            max_tokens,
            temperature,
        )
        self.extra_body = dict(extra_body or {})
        try:
            prompt_template.format(prompt="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"`prompt_template={prompt_template!r}` cannot be formatted with `{{prompt}}` alone ({error!r}): "
                "use `{prompt}` for the prompt and write other braces as `{{` and `}}`."
            ) from None
        self.prompt_template = prompt_template
        if score_parser is None:
            self.score_parser = first_number
        elif isinstance(score_parser, str):
            self.score_parser = RegexParser(score_parser)
        elif callable(score_parser):
            self.score_parser = score_parser
        else:
            raise TypeError(f"`score_parser={score_parser!r}` must be None, a regular expression or a callable.")
        self.policy = dict(policy=frames, k=num_frames, fps=fps, video_fps=video_fps)
        frame_indices(num_frames, **self.policy)  # the policy is checked now, not at the first rollout
        if api_key is None and api_key_env is not None:
            api_key = os.environ.get(api_key_env)
            if api_key is None:
                raise ValueError(
                    f"`api_key_env={api_key_env!r}` is not set in the environment: export it or pass `api_key=`."
                )
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        if not (isinstance(max_concurrency, int) and max_concurrency >= 1):
            raise ValueError(f"`max_concurrency={max_concurrency!r}` must be an integer >= 1.")
        self.max_concurrency = max_concurrency
        self.__name__ = name

    @property
    def parser_name(self) -> str:
        return getattr(self.score_parser, "__name__", type(self.score_parser).__name__)

    def request_body(self, prompt: str, frames: torch.Tensor) -> dict[str, Any]:
        """The chat-completions request for one video: `frames` `[K, H, W, C]` uint8 and its prompt."""
        content = [{"type": "image_url", "image_url": {"url": png_data_url(frame)}} for frame in frames]
        content.append({"type": "text", "text": self.prompt_template.format(prompt=prompt)})
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": content})
        body = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return {**body, **self.extra_body}

    def parse_reply(self, body: bytes) -> float:
        """The score in a chat-completions reply, or an [`AttemptError`] (not retried) quoting the reply."""
        payload = parse_json(body, "a chat completion")
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise AttemptError(f"the reply has no `choices[0].message.content`: {quoted(body)}", retry=False) from None
        if isinstance(content, list):  # content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        reply = content if isinstance(content, str) else ""
        try:
            return float(self.score_parser(reply))
        except (ValueError, TypeError) as error:
            raise AttemptError(
                f"score parser `{self.parser_name}` failed on the reply {quoted(reply)} ({error}); change "
                "`prompt_template` so that the model answers in the expected form, or `score_parser`",
                retry=False,
            ) from None

    def _score(self, prompt: str, frames: torch.Tensor, stop: threading.Event) -> float | None:
        """One video's score; once a request has raised (`on_failure="raise"`), the others are not sent."""
        if stop.is_set():
            return None
        data = json.dumps(self.request_body(prompt, frames)).encode()
        try:
            return self._request(
                lambda: self.parse_reply(http_request(self.url, data, self._headers, self.timeout)), self.url, 1
            )
        except RemoteRewardError:
            stop.set()
            raise

    def __call__(self, prompts: Sequence[str], videos: torch.Tensor, **kwargs) -> list[float | None]:
        if videos.ndim != 5 or videos.shape[2] not in (1, 3):
            raise ValueError(
                f"`videos` must be [N, F, C, H, W] in [0, 1] with C in (1, 3), got shape {tuple(videos.shape)}."
            )
        if len(prompts) != videos.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {videos.shape[0]} videos: give one prompt per video.")
        index = frame_indices(videos.shape[1], **self.policy)
        frames = (videos[:, index].detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # [N, K, C, H, W]
        frames = frames.permute(0, 1, 3, 4, 2).cpu()  # [N, K, H, W, C]
        failures, stop = self.failures, threading.Event()
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_concurrency, len(prompts)))) as pool:
            scores = list(pool.map(self._score, prompts, frames, [stop] * len(prompts)))
        self._warn_failures(self.__name__, self.failures - failures, len(prompts))
        return scores
