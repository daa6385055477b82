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
How much of one group's AR-CoPO gradient is signal, on the shipped Moving Shapes generator.

    python benchmarks/moving_shapes_gradient_signal.py                     # 40 groups over the 20 prompts of each shape
    python benchmarks/moving_shapes_gradient_signal.py --same_prompt       # one prompt per shape, 40 noises each

For each group (one prompt, G candidates forked at the first chunk, the main job's configuration) the benchmark takes
the gradient of the first inner update's loss with respect to the fresh LoRA, `g`, twice on the same rollout and the
same anchors: with the advantages of the four Moving Shapes rewards, and with those of uniform noise (the `random`
control of `examples/train_arcopo.py`), which have no signal by construction.

Write `g = μ + n` with `μ` the expected gradient (the direction the update should take) and `n` the group's own noise.
For independent groups `E[g_a · g_b] = |μ|²`, so the **signal share** `Σ_{a≠b} g_a · g_b / ((M − 1) Σ_a |g_a|²)`
estimates `|μ|² / E|g|²`: 1 if every group pointed the same way, 0 for pure noise. The control shows how far the
estimate strays from 0 with this many groups. A step that averages B groups has a signal-to-noise ratio of about
`sqrt(B · share / (1 − share))`, so a share `s` needs about `(1 − s) / s` groups per step for a ratio of 1.

Also printed: the mean pairwise cosine and `1 / E[cos²]`, the number of directions the gradients effectively spread
over (a handful means every group pushes along the same few directions with a sign of its own, which is what Adam
turns into drift). Prints a markdown table; about 5 minutes on 2 CPU cores for 120 groups of 8.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import warnings

import torch
from peft import LoraConfig
from tqdm.auto import tqdm

from trl_arcopo import ARCoPOConfig, ARCoPOTrainer
from trl_arcopo.loss import group_advantages
from trl_arcopo.policy import DEFAULT_LORA_TARGETS
from trl_arcopo.shapes import SHAPES, TRAIN_PROMPTS, load_pretrained_pipeline, make_dataset
from trl_arcopo.shapes import rewards as shape_rewards


REWARDS = [
    shape_rewards.colour_reward,
    shape_rewards.shape_reward,
    shape_rewards.direction_reward,
    shape_rewards.temporal_quality_reward,
]


def signal_statistics(grads: torch.Tensor) -> dict[str, float]:
    """`grads` `[M, D]`, one gradient per group: the signal share, mean pairwise cosine and effective directions."""
    m = grads.shape[0]
    gram = grads @ grads.T  # [M, M]
    off = ~torch.eye(m, dtype=torch.bool)
    share = gram[off].sum() / ((m - 1) * gram.diagonal().sum())
    unit = grads / grads.norm(dim=1, keepdim=True)  # [M, D]
    cosine = (unit @ unit.T)[off]  # [M * (M - 1)]
    return {
        "signal_share": share.item(),
        "mean_cosine": cosine.mean().item(),
        "directions": 1.0 / cosine.square().mean().item(),
    }


def group_gradients(trainer, prompts, seed, desc=None):
    """Per group: the LoRA gradient with the real rewards' advantages and with the control's. `[M, D]` each."""
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    real, control = [], []
    noise = torch.Generator().manual_seed(seed)
    for index, prompt in enumerate(tqdm(prompts, desc=desc)):
        rollout = trainer.generate_and_score(
            [{"prompt": prompt}], generator=torch.Generator().manual_seed(seed + index)
        )
        scores = torch.rand(rollout.rewards.shape, generator=noise)  # [1, G] the control: no signal
        fake = dataclasses.replace(rollout, advantages=group_advantages(scores, trainer.args.scale_rewards))
        for batch, out in ((rollout, real), (fake, control)):
            for p in params:
                p.grad = None
            trainer.accumulate_gradients(batch, iteration=0)
            out.append(torch.cat([p.grad.flatten() for p in params if p.grad is not None]))
    return torch.stack(real), torch.stack(control)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups_per_shape", type=int, default=40)
    parser.add_argument("--same_prompt", action="store_true", help="One prompt per shape, a fresh noise per group.")
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--num_anchors", type=int, default=4)
    parser.add_argument("--fork_noise_scale", type=float, default=0.5)
    parser.add_argument(
        "--scale_rewards", default="group", help="'group' (the default) or 'none' (advantages r - mean)."
    )
    parser.add_argument("--loss_type", default="arcopo", help="'arcopo' or 'sde_grpo' (the baseline's own rollouts).")
    parser.add_argument("--train_denoising_steps", type=int, nargs="+", default=None, help="Default: every step.")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    pipeline = load_pretrained_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as output_dir:
        config = ARCoPOConfig(
            output_dir,
            per_device_train_batch_size=1,
            num_generations=args.num_generations,
            num_anchors=args.num_anchors,
            fork_noise_scale=args.fork_noise_scale,
            pivot_chunk=0,
            scale_rewards=args.scale_rewards,
            loss_type=args.loss_type,
            # SDE-GRPO explores through the re-noise of Self-Forcing's consistency sampler (as in moving_shapes.py)
            sampler="consistency" if args.loss_type == "sde_grpo" else None,
            train_denoising_steps=args.train_denoising_steps,
            report_to="none",
            seed=args.seed,
        )
        lora = LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            target_modules=DEFAULT_LORA_TARGETS,
        )
        trainer = ARCoPOTrainer(
            pipeline=pipeline, reward_funcs=REWARDS, args=config, train_dataset=make_dataset("train"), peft_config=lora
        )

        rows = []
        all_real, all_control = [], []
        for shape in SHAPES:
            candidates = [p for p in TRAIN_PROMPTS if f" {shape} " in p]
            count = args.groups_per_shape
            prompts = candidates[:1] * count if args.same_prompt else (candidates * count)[:count]
            seed = 1000 * (SHAPES.index(shape) + 1) + args.seed
            real, control = group_gradients(trainer, prompts, seed, desc=shape)
            all_real.append(real)
            all_control.append(control)
            distinct = len(set(prompts))
            label = f"{shape} ({count} groups, {distinct} prompt{'s' if distinct > 1 else ''})"
            rows.append((label, signal_statistics(real), signal_statistics(control)))
        rows.append(("all", signal_statistics(torch.cat(all_real)), signal_statistics(torch.cat(all_control))))

    print(
        f"{args.groups_per_shape} groups per shape of G = {args.num_generations}, {args.num_anchors} anchors, "
        f"fork_noise_scale {args.fork_noise_scale}, scale_rewards {args.scale_rewards!r}, loss {args.loss_type!r}, "
        f"denoising steps {args.train_denoising_steps or 'all'}"
    )
    print()
    print(
        "| groups | signal share, rewards | signal share, control | mean cosine, rewards | mean cosine, control | "
        "directions, rewards | directions, control |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, real, control in rows:
        print(
            f"| {name} | {real['signal_share']:+.4f} | {control['signal_share']:+.4f} | {real['mean_cosine']:+.4f} | "
            f"{control['mean_cosine']:+.4f} | {real['directions']:.1f} | {control['directions']:.1f} |"
        )


if __name__ == "__main__":
    main()
