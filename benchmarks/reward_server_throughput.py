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
Throughput of the reward server: `--clients` threads, each with its own `RewardServerClient`, send `--requests`
requests each to `trl-arcopo reward-server` (its default limits) in another process, on 127.0.0.1. Every value is
compared with the reward computed here; the run reports errors, mismatches, requests per second, and the p50 and p99
latency of a request (client to client: encoding, HTTP, the server's admission and call, decoding).

The ideal is the reward function alone: its calls per second in this process, with no HTTP (one at a time, as the
server's `--max-concurrency 1` runs them). The ratio measured / ideal is what the service costs.

Usage:
    python benchmarks/reward_server_throughput.py                 # 8 clients x 50 requests, 1 video of 9x3x32x32
    python benchmarks/reward_server_throughput.py --clients 16 --requests 100 --size 64
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time

import torch

from trl_arcopo.rewards.base import redness
from trl_arcopo.rewards.server_client import RewardServerClient


def start_server() -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "trl_arcopo.cli", "reward-server", "trl_arcopo.rewards.base:redness", "--port", "0"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if line.startswith("Serving reward"):
            return process, line.split(" on ")[1].split()[0]
    raise RuntimeError(f"the reward server did not start (exit code {process.poll()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="requests per client")
    parser.add_argument("--videos", type=int, default=1, help="videos per request")
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--size", type=int, default=32, help="frame height and width")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    shape = (args.videos, args.frames, 3, args.size, args.size)
    batches = [torch.rand(shape, generator=generator) for _ in range(args.requests)]
    prompts = [f"prompt {i}" for i in range(args.videos)]
    expected = [redness(prompts, videos) for videos in batches]

    start = time.perf_counter()
    for videos in batches:
        redness(prompts, videos)
    ideal = args.requests / (time.perf_counter() - start)

    process, url = start_server()
    latencies, errors, mismatches, lock = [], [0], [0], threading.Lock()

    def client_loop() -> None:
        client = RewardServerClient(url, name="redness", timeout=30, max_retries=0)
        for videos, want in zip(batches, expected):
            begin = time.perf_counter()
            got = client(prompts, videos)
            seconds = time.perf_counter() - begin
            with lock:
                latencies.append(seconds)
                errors[0] += sum(value is None for value in got)
                mismatches[0] += sum(g is not None and g != w for g, w in zip(got, want))

    try:
        RewardServerClient(url, name="redness")(prompts, batches[0])  # warm-up: imports and first connection
        threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
    finally:
        process.kill()
        process.wait()

    total = args.clients * args.requests
    rate = total / wall
    cuts = statistics.quantiles(latencies, n=100)
    body_kib = batches[0].numel() * batches[0].element_size() / 1024
    print(f"{args.clients} clients x {args.requests} requests, {args.videos} video(s) {list(shape[1:])} per request "
          f"({body_kib:.0f} KiB), torch threads {torch.get_num_threads()}")  # fmt: skip
    print("| requests | errors | mismatches | requests/s | p50 ms | p99 ms | max ms | ideal calls/s | measured / ideal |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {total} | {errors[0]} | {mismatches[0]} | {rate:.0f} | {cuts[49] * 1000:.1f} | {cuts[98] * 1000:.1f} | "
        f"{max(latencies) * 1000:.1f} | {ideal:.0f} | {rate / ideal:.3f} |"
    )


if __name__ == "__main__":
    main()
