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
The reward server's wire format, shared by the server ([`~trl_arcopo.rewards.server`]) and its client
([`~trl_arcopo.rewards.server_client`]). No pickle: nothing a request or reply holds can run code.

- `POST /score`, `Content-Type: application/vnd.safetensors`, with a `Content-Length`: the body is a safetensors file
  (`safetensors.torch.save`) with one tensor `"videos"` `[N, F, C, H, W]`, in the trainer's dtype (bit-exact), and
  two metadata strings: `"prompts"`, a JSON list of `N` strings, and `"kwargs"`, a JSON object of the extra keyword
  columns (lists of `N` JSON values). Optional headers: `Authorization: Bearer <key>` (when the server has a key) and
  `X-Reward-Timeout: <seconds>`, the client's remaining deadline.
- Reply `200`, `application/json`: `{"rewards": [float | null, ...]}`, one per video (`NaN` and `Infinity` as Python's
  `json` writes them).
- Errors, `application/json`: `{"error": "<message>", "retry": <bool>}`; `retry: false` says that another attempt
  will fail the same way (the reward itself raised or returned a bad value).
- `GET /health`: `{"name": "<reward name>", "status": "ok", "max_body_bytes": <int>}`; clients split their batches
  to fit `max_body_bytes`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from .remote import quoted


CONTENT_TYPE = "application/vnd.safetensors"
#: The header in which a client sends its remaining deadline, in seconds.
TIMEOUT_HEADER = "X-Reward-Timeout"
#: The environment variable the server and its clients read the bearer token from when none is given.
API_KEY_ENV = "TRL_ARCOPO_REWARD_SERVER_API_KEY"


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
