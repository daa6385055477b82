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
chat-completions server (vLLM or SGLang serving Qwen3-VL, UnifiedReward, ...) with the `openai` client, the score
parsed from the reply.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import re
import struct
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import httpx2
import torch

from .frames import frame_indices, quantize_8bit
from .remote import AttemptError, RemoteReward, parse_json, quoted, run_sync, ssl_context, status_error


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


# A scale the reply restates, not a score: "1 to 10", "1-10", "between 1 and 10", "/10", "out of 10".
_SCALE = re.compile(
    r"(?:between\s+)?[-+]?\d+(?:\.\d+)?\s*(?:to|-|–|and)\s*[-+]?\d+(?:\.\d+)?|(?:/|\bout\s+of\b)\s*\d+(?:\.\d+)?",
    re.IGNORECASE,
)


class ScoreParser:
    r"""
    The default score parser: the last number of the reply that lies in `score_range`, once the scale the reply may
    restate is removed ("1 to 10", "1-10", "between 1 and 10", "/10", "out of 10"). So "On a scale of 1 to 10, I give
    it 8." reads 8.0, "Score: 7/10" reads 7.0, and "1e999" or "11" with the range `(1, 10)` read nothing (a
    `ValueError`).

    Args:
        score_range (`tuple[float, float]` or `None`, defaults to `(1, 10)`): the scale the prompt asks for; `None`:
            any finite number.
    """

    def __init__(self, score_range: tuple[float, float] | None = (1.0, 10.0)):
        self.score_range = check_score_range(score_range)
        self.__name__ = "last number" + (f" in [{score_range[0]:g}, {score_range[1]:g}]" if score_range else "")

    def __call__(self, reply: str) -> float:
        numbers = [float(m.group()) for m in _NUMBER.finditer(_SCALE.sub(" ", reply))]
        numbers = [x for x in numbers if in_range(x, self.score_range)]
        if not numbers:
            raise ValueError("no number in the reply" + self.__name__[len("last number") :])
        return numbers[-1]


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


def check_score_range(score_range: tuple[float, float] | None) -> tuple[float, float] | None:
    """`score_range` as two floats `low <= high`, or a `ValueError` naming it."""
    if score_range is None:
        return None
    try:
        low, high = (float(x) for x in score_range)
    except (TypeError, ValueError):
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(
            f"`score_range={score_range!r}` must be two finite numbers (low, high) with low <= high, or None."
        )
    return low, high


def in_range(value: float, score_range: tuple[float, float] | None) -> bool:
    """Whether `value` is finite and within `score_range` (`None`: any finite value)."""
    return math.isfinite(value) and (score_range is None or score_range[0] <= value <= score_range[1])


class VLMJudgeReward(RemoteReward):
    r"""
    A vision-language model served behind an OpenAI-compatible chat-completions endpoint (`POST
    {base_url}/chat/completions`, with the `openai` client) scores each video: one request per video, with the
    selected frames as PNG data URLs (`image_url` content parts, in frame order) followed by the text
    `prompt_template.format(prompt=prompt)`. The score is parsed from the reply by `score_parser` and must lie in
    `score_range`. Up to `max_concurrency` requests are in flight at once; each follows the deadline, retry and
    failure policy of [`~trl_arcopo.rewards.remote.RemoteReward`]. Redirects are not followed, so the key goes to
    `base_url` only.

    Args:
        base_url (`str`): the server's OpenAI base URL, e.g. `"http://localhost:8000/v1"` (a URL that already ends with
            `/chat/completions` is used as it is).
        model (`str`): the served model's name, e.g. `"Qwen/Qwen3-VL-8B-Instruct"`.
        prompt_template (`str`, defaults to `DEFAULT_PROMPT_TEMPLATE`): the text after the frames; `{prompt}` is
            replaced by the video's prompt (write literal braces as `{{` and `}}`).
        score_parser (`str` or `Callable[[str], float]`, *optional*): how a reply becomes a score. `None`: the last
            number in `score_range` once a restated scale is removed ([`ScoreParser`]); a string: a regular expression
            whose first group (or whole match, without groups) is the number, e.g. `r"Final Score:\s*([0-9.]+)"`; a
            callable: any function of the reply that returns a float or raises `ValueError`.
        score_range (`tuple[float, float]` or `None`, defaults to `(1, 10)`): the scale the prompt asks for. A parsed
            score outside it (or not finite) is a failed reply; `None`: any finite number.
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
        max_concurrency (`int`, defaults to `8`): requests in flight at once.
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
        score_range: tuple[float, float] | None = (1.0, 10.0),
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
        self.base_url = self.url.removesuffix("/chat/completions")
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
        self.score_range = check_score_range(score_range)
        if score_parser is None:
            self.score_parser = ScoreParser(score_range)
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
        self._api_key = api_key or None
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
            score = float(self.score_parser(reply))
            if not in_range(score, self.score_range):
                scale = list(self.score_range) if self.score_range is not None else "finite"
                raise ValueError(f"{score} is not in {scale} (`score_range`)")
        except (ValueError, TypeError, OverflowError) as error:
            raise AttemptError(
                f"score parser `{self.parser_name}` failed on the reply {quoted(reply)} ({error}); change "
                "`prompt_template` so that the model answers in the expected form, or `score_parser`/`score_range`",
                retry=False,
            ) from None
        return score

    def _client(self):
        """An `openai.AsyncOpenAI` client for one call: no retries of its own (the policy is ours), no redirects."""
        try:
            import openai
        except ImportError:
            raise ImportError("VLMJudgeReward needs the `openai` client: pip install 'trl_arcopo[judge]'.") from None
        http_client = httpx2.AsyncClient(
            follow_redirects=False, timeout=httpx2.Timeout(self.timeout), verify=ssl_context()
        )
        return openai.AsyncOpenAI(
            base_url=self.base_url, api_key=self._api_key or "none", max_retries=0, timeout=self.timeout,
            http_client=http_client,
        )  # fmt: skip

    async def _post(self, client, data: dict[str, Any]) -> float:
        """One attempt: the reply's score, or an [`AttemptError`]."""
        import openai

        try:
            auth = f"Bearer {self._api_key}" if self._api_key else openai.Omit()  # no header without a key
            response = await client.post(
                "/chat/completions", body=data, cast_to=httpx2.Response, options={"headers": {"Authorization": auth}}
            )
        except openai.APIStatusError as error:
            raise status_error(self.url, error.status_code, error.response.content, error.response.headers) from None
        except openai.APITimeoutError:
            raise AttemptError(f"no complete reply within timeout={self.timeout:g} s", retry=True) from None
        except openai.APIConnectionError as error:
            cause = error.__cause__ or error
            raise AttemptError(
                f"cannot connect or connection lost: {type(cause).__name__}: {cause}", retry=True
            ) from None
        if 300 <= response.status_code < 400:
            raise status_error(self.url, response.status_code, response.content, response.headers)
        return self.parse_reply(response.content)

    async def _score_all(self, prompts: Sequence[str], frames: torch.Tensor) -> list[float | None]:
        """Every video's score, `max_concurrency` requests at a time; once one raises (`on_failure="raise"`), the
        others are cancelled."""
        slots = asyncio.Semaphore(self.max_concurrency)
        async with self._client() as client:

            async def score(prompt: str, video_frames: torch.Tensor) -> float | None:
                async with slots:
                    data = self.request_body(prompt, video_frames)
                    return await self._request(lambda i: self._post(client, data), self.url, 1)

            tasks = [asyncio.ensure_future(score(p, f)) for p, f in zip(prompts, frames)]
            try:
                return list(await asyncio.gather(*tasks))
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def __call__(self, prompts: Sequence[str], videos: torch.Tensor, **kwargs) -> list[float | None]:
        if videos.ndim != 5 or videos.shape[2] not in (1, 3):
            raise ValueError(
                f"`videos` must be [N, F, C, H, W] in [0, 1] with C in (1, 3), got shape {tuple(videos.shape)}."
            )
        if len(prompts) != videos.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {videos.shape[0]} videos: give one prompt per video.")
        index = frame_indices(videos.shape[1], **self.policy)
        frames = quantize_8bit(videos[:, index].detach()).to(torch.uint8)  # [N, K, C, H, W]
        frames = frames.permute(0, 1, 3, 4, 2).cpu()  # [N, K, H, W, C]
        failures = self.failures
        scores = run_sync(self._score_all(list(prompts), frames))
        self._warn_failures(self.__name__, self.failures - failures, len(prompts))
        return scores
