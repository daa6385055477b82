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
"""Lazy exports of a package, as TRL's and diffusers' `_LazyModule`: each name is imported from its module on first use."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable


def lazy_exports(package: str, structure: dict[str, list[str]]) -> tuple[Callable, Callable, list[str]]:
    """
    `(__getattr__, __dir__, __all__)` for the package `package`, whose public names are those of `structure`
    (`{".module": ["Name", ...]}`, modules relative to the package). A name is imported from its module the first time
    it is read and then kept in the package, so `import package` imports none of the modules.
    """
    owners = {name: module for module, names in structure.items() for name in names}

    def __getattr__(name: str):
        if name not in owners:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(owners[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(owners))

    return __getattr__, __dir__, sorted(owners)
