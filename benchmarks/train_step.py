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
Where the time of one AR-CoPO iteration goes, and how many transformer passes it makes.

Usage:
    python benchmarks/train_step.py [--config tiny|small] [--rollouts 3] [--num_generations 12] [--num_anchors 4]

One iteration = one rollout (prefix once, G forked branches, rewards) + `num_iterations` inner updates. The script
counts, with a forward pre-hook on the transformer, every forward by chunk-samples (a call on a batch of n chunks
counts n) and splits them into rollout forwards (no autograd) and update forward+backward passes (autograd), and
compares the latter with the bound `num_iterations x num_anchors x T` per group.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from datasets import Dataset
from peft import LoraConfig

from trl_arcopo import ARCoPOConfig, ARCoPOTrainer
from trl_arcopo.sampling import SELF_FORCING_SIGMAS


def redness(prompts, videos, **kwargs):
    return (videos[:, :, 0] - videos[:, :, 1:].mean(dim=2)).mean(dim=(1, 2, 3)).tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--rollouts", type=int, default=3)
    parser.add_argument("--num_generations", type=int, default=12)
    parser.add_argument("--num_anchors", type=int, default=4)
    parser.add_argument("--num_iterations", type=int, default=2)
    parser.add_argument("--output_dir", default="outputs/benchmark_train_step")
    args = parser.parse_args()

    import os
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from rollout import CONFIGS, build  # the same model sizes as the rollout benchmark

    cfg = CONFIGS[args.config]
    pipe = build(cfg)
    steps = len(SELF_FORCING_SIGMAS)
    num_chunks = cfg["frames"] // 3
    config = ARCoPOConfig(
        output_dir=args.output_dir,
        max_steps=args.rollouts * args.num_iterations,
        per_device_train_batch_size=1,
        num_generations=args.num_generations,
        num_anchors=args.num_anchors,
        num_iterations=args.num_iterations,
        learning_rate=1e-4,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = ARCoPOTrainer(
        pipeline=pipe,
        reward_funcs=[redness],
        args=config,
        train_dataset=Dataset.from_dict({"prompt": ["a red fox jumps", "a cat runs", "a blue car"]}),
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
    )

    counts = defaultdict(int)

    def count(module, inputs, kwargs):
        kind = "update" if torch.is_grad_enabled() else "rollout"
        counts[kind] += inputs[0].shape[0]
        counts[f"{kind}_calls"] += 1

    handle = pipe.transformer.register_forward_pre_hook(count, with_kwargs=True)
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    handle.remove()

    history = [h for h in trainer.state.log_history if "timing/update_seconds" in h]
    rollout_s = sum(h.get("timing/rollout_seconds", 0.0) for h in history)
    reward_s = sum(h.get("timing/reward_seconds", 0.0) for h in history)
    update_s = sum(h["timing/update_seconds"] for h in history)
    n = args.rollouts
    bound = args.num_iterations * args.num_anchors * steps
    print(
        f"[{args.config}] G={args.num_generations}, anchors={args.num_anchors}, num_iterations={args.num_iterations}, "
        f"T={steps}, {num_chunks} chunks; {n} rollouts"
    )
    print(
        f"seconds per iteration: total {total / n:.3f} = rollout {rollout_s / n:.3f} + reward {reward_s / n:.4f} "
        f"+ update {update_s / n:.3f} (+ {max(0.0, total - rollout_s - reward_s - update_s) / n:.3f} other)"
    )
    print(
        f"rollout forwards per iteration (chunk-samples, no grad): {counts['rollout'] / n:.1f} "
        f"(independent rollouts would need G*L*(T+1) = {args.num_generations * num_chunks * (steps + 1)})"
    )
    print(
        f"update forward+backward passes per iteration (chunk-samples): {counts['update'] / n:.1f} "
        f"in {counts['update_calls'] / n:.1f} calls; bound num_iterations*num_anchors*T = {bound}"
    )


if __name__ == "__main__":
    main()
