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
"""A thread pool of daemon threads, for reward functions that may hang: the process never waits for them to exit."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Executor, Future


class DaemonThreadPool(Executor):
    """
    An `Executor` of at most `max_workers` daemon threads. Unlike `concurrent.futures.ThreadPoolExecutor`, whose
    workers the interpreter joins at exit, a process whose training failed while another reward function still runs
    exits at once. `shutdown(cancel_futures=True)` cancels the calls that have not started; a running call cannot be
    stopped and ends with the process.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str = "pool"):
        if not (isinstance(max_workers, int) and max_workers >= 1):
            raise ValueError(f"`max_workers={max_workers!r}` must be an integer >= 1.")
        self.max_workers, self.prefix = max_workers, thread_name_prefix
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._shutdown = False

    def submit(self, fn, /, *args, **kwargs) -> Future:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot submit to a DaemonThreadPool after shutdown")
            future: Future = Future()
            self._queue.put((future, fn, args, kwargs))
            if self._idle == 0 and len(self._threads) < self.max_workers:
                name = f"{self.prefix}_{len(self._threads)}"
                thread = threading.Thread(target=self._work, name=name, daemon=True)
                self._threads.append(thread)
                thread.start()
            else:
                self._idle = max(self._idle - 1, 0)
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as error:  # noqa: BLE001 - delivered to the caller through the future
                    future.set_exception(error)
                else:
                    future.set_result(result)
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            threads = list(self._threads)
        if cancel_futures:
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in threads:
            self._queue.put(None)
        if wait:
            for thread in threads:
                thread.join()
