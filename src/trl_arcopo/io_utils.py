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
File I/O shared by the library: atomic writes (a crash leaves either the previous file or the new one, never a
truncated file; every file is written under one temporary-name pattern) and torch files read without running
pickled code.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


#: The names [`atomic_path`] writes under, `<name>.tmp-<pid>`: what a killed process may leave behind
#: (`checkpointing.remove_stale_temporaries` removes them).
TEMPORARY_NAME_RE = re.compile(r".+\.tmp-\d+")


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """
    Yield a temporary path next to `path` (`<path>.tmp-<pid>`, [`TEMPORARY_NAME_RE`]); write the file there, and on
    leaving the block it replaces `path` durably ([`durable_replace`]). On an error the temporary file is removed and
    `path` is left as it was.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        yield tmp
        durable_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def process_file(path: str, rank: int = 0, num_processes: int = 1) -> str:
    """This process's file of `path`, which every process writes its own of: `-rank{rank}` before the extension."""
    if num_processes == 1:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}-rank{rank}{ext}"


def load_tensors_only(path: str | os.PathLike, what: str, fix: str = "", mmap: bool = False) -> Any:
    """
    `torch.load(path, weights_only=True)` on CPU: tensors, numbers, strings and plain containers only, so a crafted
    file cannot run code. Anything else raises a `ValueError` saying that `path` is not `what`, then `fix`.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} is not {what}: it holds objects other than tensors and plain containers, which are not loaded "
            f"(that could run code).{' ' + fix if fix else ''} ({str(error).splitlines()[0]})"
        ) from None


def fsync_dir(path: str) -> None:
    # Makes a rename durable on POSIX; directories cannot be opened (nor need to be synced) on Windows.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def default_file_mode() -> int:
    """The mode `open()` gives a new file under the current umask (usually `0o644`); `mkstemp` would give `0o600`."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def durable_replace(src: str, dst: str) -> None:
    """Move the finished file `src` over `dst` durably: flushed to disk, with the default file mode, the folder synced."""
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(src, default_file_mode())
    os.replace(src, dst)
    fsync_dir(os.path.dirname(os.path.abspath(dst)))
