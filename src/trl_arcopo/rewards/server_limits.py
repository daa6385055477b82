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
The limits of the reward server, apart from the server itself so that the command line can read them without
importing FastAPI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class ServerLimits:
    r"""
    What one request may cost the reward server ([`~trl_arcopo.rewards.server.RewardServer`]); `trl-arcopo
    reward-server` has a flag per field (`--max-body-mb`, ...) with the same default and help.

    Args:
        max_concurrency (`int`, defaults to `1`): reward calls at a time (1: a GPU model is never called from two
            threads at once).
        max_queue (`int`, defaults to `2`): requests admitted beyond those computing (reading their body or waiting
            for a slot). Others wait with their body unread, and get 503 with `Retry-After: 1` if their deadline
            passes first. Bodies in memory are at most `(max_concurrency + max_queue) * max_body_mb`.
        max_body_mb (`float`, defaults to `256`): the largest request body, in MiB (413 beyond, unread); clients split
            their batches to fit it.
        timeout (`float`, defaults to `300`): seconds a request may take in all, waiting and computing included; a
            client's `X-Reward-Timeout` may shorten it. Then 504, and the call is abandoned.
        read_timeout (`float`, defaults to `30`): seconds the body may pause between two pieces (408 beyond).
        idle_timeout (`float`, defaults to `5`): seconds a connection may stay open without a whole request head,
            from its opening or from its last reply (then it is closed).
        max_abandoned (`int`, defaults to `1`): abandoned calls that may still run while new calls start.
    """

    max_concurrency: int = field(default=1, metadata={"help": "reward calls at a time"})
    max_queue: int = field(
        default=2,
        metadata={"help": "requests admitted beyond those computing (their bodies read); others wait unread"},
    )
    max_body_mb: float = field(
        default=256.0, metadata={"help": "largest request body in MiB; larger ones get 413 unread"}
    )
    timeout: float = field(
        default=300.0,
        metadata={"help": "seconds a request may take in all (a client's deadline may shorten it); then 504"},
    )
    read_timeout: float = field(default=30.0, metadata={"help": "seconds a request body may pause"})
    idle_timeout: float = field(
        default=5.0, metadata={"help": "seconds a connection may stay open without sending a request head"}
    )
    max_abandoned: int = field(
        default=1, metadata={"help": "abandoned (timed-out) calls that may still run while new calls start"}
    )

    def __post_init__(self):
        for name in ("max_concurrency", "max_queue", "max_abandoned"):
            value, low = getattr(self, name), 1 if name == "max_concurrency" else 0
            if isinstance(value, bool) or not (isinstance(value, int) and value >= low):
                raise ValueError(f"`{name}={value!r}` must be an integer >= {low}.")
        for name in ("max_body_mb", "timeout", "read_timeout", "idle_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not (isinstance(value, int | float) and 0 < value < math.inf):
                raise ValueError(f"`{name}={value!r}` must be a positive, finite number.")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)
