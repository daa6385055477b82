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
"""A dependency's import-time kernel warning is demoted to DEBUG; its other warnings are not."""

import logging
import subprocess
import sys

import trl_arcopo  # noqa: F401 - installs the filters


def test_the_kernel_download_warning_is_demoted_to_debug_and_nothing_else():
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "no trust")
        assert records == []  # not shown at the default level
        logger.setLevel(logging.DEBUG)
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "no trust")
        logger.warning("Something else went wrong")
        assert [(r.levelname, r.getMessage()[:36]) for r in records] == [
            ("DEBUG", "Failed to load CPU gemm_4bit_forward"),
            ("WARNING", "Something else went wrong"),
        ]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def test_importing_the_package_prints_nothing():
    result = subprocess.run(
        [sys.executable, "-c", "import trl_arcopo"], check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout == "" and result.stderr == ""
