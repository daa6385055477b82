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
Import-time warnings of dependencies that are not the user's concern, demoted to DEBUG when this module is imported
(the package imports it first). Only `logging` filters on the dependencies' own loggers: nothing is patched, and a
user who logs at DEBUG still sees them.

- bitsandbytes (which peft imports) warns on CPUs with AVX-512 BF16 that it could not fetch an optional CPU 4-bit
  matmul kernel from the Hub ("Failed to load CPU gemm_4bit_forward from kernels-community ..."). It falls back to its
  own kernel, and training uses 4-bit matmuls on GPUs only. Offline, `kernels` says instead that it skips the
  publisher check of that download.
"""

from __future__ import annotations

import logging


class DemoteToDebug(logging.Filter):
    """Turns the records whose message starts with one of `prefixes` into DEBUG records."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and record.msg.startswith(self.prefixes):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


#: logger name -> the message prefixes demoted on it.
DEMOTED = {
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "kernels._internals.hf_hub": ("Skipping publisher trust check",),  # the same fetch, offline
}

for _name, _prefixes in DEMOTED.items():
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, DemoteToDebug) for f in _logger.filters):
        _logger.addFilter(DemoteToDebug(*_prefixes))
