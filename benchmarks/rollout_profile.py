"""
Where a forked group's time goes, next to `G` independent rollouts of the same videos: torch.profiler's operator
totals for one pass over every pivot (tiny model of `benchmarks/rollout.py`, `G = 12`).

Usage:
    python benchmarks/rollout_profile.py [--config tiny] [--group_size 12]      # under a minute
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from trl_arcopo import RolloutNoise, forked_rollout, neighbor_noise


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rollout import CHUNK, CONFIGS, build  # the same models as the rollout benchmark


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=list(CONFIGS))
    parser.add_argument("--group_size", type=int, default=12)
    args = parser.parse_args()
    cfg, g = CONFIGS[args.config], args.group_size
    size, frames = cfg["size"], cfg["frames"]
    pipe = build(cfg)
    embeds, _ = pipe.encode_prompt(["a red fox jumps"])
    noise = RolloutNoise.sample((1, 3, frames, size, size), CHUNK, 4, generator=torch.Generator().manual_seed(0))
    timesteps, sigmas = pipe.get_schedule()
    branches = [
        neighbor_noise(noise.chunk_initial(p), g, 0.5, torch.Generator().manual_seed(p))
        for p in range(noise.num_chunks)
    ]

    def forked():
        for p, branch in enumerate(branches):
            forked_rollout(pipe, embeds, noise, p, branch, timesteps, sigmas, size, size)

    @torch.no_grad()
    def independent():
        for p, branch in enumerate(branches):
            cache = pipe.prepare_cache(g, frames - CHUNK, size, size)
            pipe.generate_latents(
                embeds.repeat_interleave(g, 0), noise.repeat_interleave(g).with_chunk_initial(p, branch), cache,
                timesteps, sigmas,
            )  # fmt: skip

    totals = {}
    for fn in (forked, independent):
        fn()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            fn()
            seconds = time.perf_counter() - start
        totals[fn.__name__] = seconds, {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    (t_fork, fork), (t_ind, ind) = totals["forked"], totals["independent"]
    print(f"{args.config}, G={g}: forked {t_fork:.3f} s, independent {t_ind:.3f} s, ratio {t_fork / t_ind:.3f}")
    print(f"{'operator':<48} {'forked s':>9} {'indep. s':>9} {'ratio':>6}")
    for key in sorted(ind, key=ind.get, reverse=True)[:10]:
        print(f"{key:<48} {fork.get(key, 0):9.3f} {ind[key]:9.3f} {fork.get(key, 0) / ind[key]:6.2f}")


if __name__ == "__main__":
    main()
