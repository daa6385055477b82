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
The options of rewards by name ([`~trl_arcopo.rewards.registry`]): converters that turn an option's value (a string
from the command line, or a YAML or Python value) into what the reward takes, or refuse it saying what they expected.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


# ------------------------------------------------------------------------------------------------ option converters
# A converter turns an option's value (a string from the command line, or a YAML / Python value) into what the
# reward takes, or raises an `_Invalid` (a `ValueError`) saying what it expected (a `FileNotFoundError` for a missing path).
Converter = Callable[[Any], Any]


class _Invalid(ValueError):
    """A value an option does not take; the message says what it expected."""


def _scalar(value: Any) -> Any:
    """A command-line value typed as JSON (`8`, `0.5`, `true`, `null`, `[1, 10]`, `{"a": 1}`), else the text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _integer(minimum: int | None = None, nullable: bool = False) -> Converter:
    expected = "an integer" + (f" >= {minimum}" if minimum is not None else "") + (" or null" if nullable else "")

    def convert(value):
        value = _scalar(value)
        if nullable and value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            raise _Invalid(expected)
        return value

    return convert


def _number(positive: bool = False, nullable: bool = False) -> Converter:
    expected = ("a positive number" if positive else "a number") + (" or null" if nullable else "")

    def convert(value):
        value = _scalar(value)
        if nullable and value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or (positive and not value > 0):
            raise _Invalid(expected)
        return float(value)

    return convert


def _boolean(value):
    value = _scalar(value)
    if isinstance(value, str) and value.lower() in ("true", "yes", "false", "no"):
        value = value.lower() in ("true", "yes")
    if not isinstance(value, bool):
        raise _Invalid("true or false")
    return value


def _string(nullable: bool = False) -> Converter:
    def convert(value):
        if nullable and (value is None or value == "null"):
            return None
        if not isinstance(value, str) or not value:
            raise _Invalid("a non-empty string" + (" or null" if nullable else ""))
        return value

    return convert


def _choice(*choices: str) -> Converter:
    def convert(value):
        if value not in choices:
            raise _Invalid("one of " + ", ".join(repr(c) for c in choices))
        return value

    return convert


def _numbers(count: int) -> Converter:
    def convert(value):
        value = _scalar(value)
        if isinstance(value, str):
            value = [_scalar(v) for v in re.split(r"[+,]", value)]
        if not isinstance(value, Sequence) or len(value) != count:
            raise _Invalid(f"{count} numbers, e.g. [{', '.join(['0.5'] * count)}]")
        return tuple(_number()(v) for v in value)

    return convert


def _score_range(value):
    value = _scalar(value)
    return None if value is None else _numbers(2)(value)


def _mapping(value):
    value = _scalar(value)
    if not isinstance(value, Mapping):
        raise _Invalid('a mapping (on the command line a JSON object, e.g. {"key": 1})')
    return dict(value)


def _dtype(value):
    import torch

    if isinstance(value, torch.dtype):
        return value
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}  # fmt: skip
    key = value.removeprefix("torch.") if isinstance(value, str) else None
    if key not in names:
        raise _Invalid("one of 'float32', 'bfloat16', 'float16'")
    return names[key]


def _device(value):
    import torch

    try:
        return str(torch.device(value))
    except (RuntimeError, TypeError):
        raise _Invalid("a torch device, e.g. 'cuda', 'cuda:1' or 'cpu'") from None


def _dimensions(value):
    from .videoalign import VIDEOALIGN_DIMENSIONS

    value = _scalar(value)
    if isinstance(value, str):
        value = [part.strip() for part in re.split(r"[+,]", value)]
    names = tuple(value) if isinstance(value, Sequence) else ()
    if not names or len(set(names)) != len(names) or not set(names) <= set(VIDEOALIGN_DIMENSIONS):
        raise _Invalid(f"distinct names among {', '.join(VIDEOALIGN_DIMENSIONS)}, e.g. VQ+MQ+TA or [VQ, MQ, TA]")
    return names


def _calibration(value):
    from .videoalign import VIDEOALIGN_DIMENSIONS

    value = _mapping(value)
    if not set(value) <= set(VIDEOALIGN_DIMENSIONS):
        raise _Invalid(f"a mapping from {', '.join(VIDEOALIGN_DIMENSIONS)} to [mean, std]")
    return {key: _numbers(2)(pair) for key, pair in value.items()}


def _http_url(value):
    parts = urllib.parse.urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise _Invalid("an http(s) URL, e.g. http://localhost:8000/v1")
    return value


def _http_urls(value):
    urls = value.split(",") if isinstance(value, str) else value
    if not isinstance(urls, Sequence) or not urls:
        raise _Invalid("one or more http(s) URLs, comma-separated or a list")
    try:
        return tuple(_http_url(u.strip() if isinstance(u, str) else u) for u in urls)
    except ValueError:
        raise _Invalid("http(s) URLs, e.g. http://127.0.0.1:8000,http://127.0.0.1:8001 or a list") from None


def _local_path(what: str) -> Converter:
    """A file or folder that must exist."""

    def convert(value):
        if not isinstance(value, str | os.PathLike) or not os.fspath(value):
            raise _Invalid(f"a path: {what}")
        path = os.path.expanduser(os.fspath(value))
        if not os.path.exists(path):
            raise FileNotFoundError(f"no file or folder at {os.fspath(value)!r}; give {what}")
        return path

    return convert


def _model_source(what: str) -> Converter:
    """A local folder, or a Hub id (`org/name`): a path-like value that does not exist is refused now."""

    def convert(value):
        if not isinstance(value, str | os.PathLike) or not os.fspath(value):
            raise _Invalid(f"a folder or a Hub id: {what}")
        text = os.fspath(value)
        path = os.path.expanduser(text)
        if os.path.exists(path):
            return path
        if _HUB_ID.match(text):
            return text
        raise FileNotFoundError(f"no file or folder at {text!r}; give {what}")

    return convert
