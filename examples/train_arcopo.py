# /// script
# dependencies = ["trl_arcopo"]
# ///
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
Align a streaming video generator with AR-CoPO.

    accelerate launch examples/train_arcopo.py                      # Moving Shapes: the shipped model, verifiable rewards
    accelerate launch examples/train_arcopo.py --config examples/configs/moving_shapes.yaml --max_steps 20
    accelerate launch examples/train_arcopo.py --pipeline_name_or_path tiny-random --config examples/configs/tiny.yaml
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/train_arcopo.py \\
        --pipeline_name_or_path path/to/self-forcing-diffusers --prompts_file prompts.txt --reward_funcs mymod.reward

Without `--config` (and without another `--pipeline_name_or_path`) the script reads
`examples/configs/moving_shapes.yaml`, and arguments on the command line override it: it aligns the Moving Shapes generator shipped
in `trl_arcopo.shapes` on the RL-training prompts with a preference (`prominence_reward`: larger objects) next to the
colour, shape, direction and temporal-quality rewards, and writes to `output_dir`: the LoRA adapter and model card,
`eval_table.md` / `eval_results.json` (base vs trained, on the training and the held-out prompts, fresh seeds; trained
− base per seed set for the preference, all-correct and temporal quality next to the base's spread), `samples.gif`
(held-out prompts, base vs trained) and `reward_curve.png` (each reward).

`--config examples/configs/moving_shapes_binding.yaml` is the shape-binding job (the four verifiable rewards alone);
adding `--reward_funcs random` trains on a control reward with no signal (uniform noise): what its run does to the
model is what the update costs by itself, the baseline a real reward's gain should be read against.

`--pipeline_name_or_path tiny-random` builds a tiny random pixel-space model trained toward red videos (the `redness`
reward): a check of the plumbing, not a useful model. Two CPU processes (DDP over gloo):

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 examples/train_arcopo.py --pipeline_name_or_path tiny-random \\
        --max_steps 2
"""

import importlib
import json
import os
import sys
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from datasets import Dataset, load_dataset
from peft import LoraConfig
from trl import TrlParser

from trl_arcopo import ARCoPOConfig, ARCoPOTrainer, SelfForcingPipeline, shapes
from trl_arcopo.policy import DEFAULT_LORA_TARGETS
from trl_arcopo.shapes.evaluation import (
    evaluate_generator,
    format_table,
    generate_videos,
    paired_difference,
    plot_curves,
    save_video_grid,
    smooth,
)
from trl_arcopo.testing_utils import tiny_pipeline


MOVING_SHAPES, TINY_RANDOM = "moving-shapes", "tiny-random"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "moving_shapes.yaml")
TOY_PROMPTS = ["a red fox jumps over a blue car", "a cat runs on the beach", "a dog in snow at night"]
SHAPES_REWARDS = ["colour_reward", "shape_reward", "direction_reward", "temporal_quality_reward"]
#: The main job's report: trained - base per evaluation seed set for these scores (name in the table, result key).
REPORTED_DIFFERENCES = (
    ("Preference (prominence)", "prominence"),
    ("All-correct rate", "all_correct"),
    ("Temporal quality", "temporal_quality"),
    ("Combined reward", "combined"),
)
REPORT_KEYS = ["prominence", "colour_acc", "shape_acc", "direction_acc", "all_correct", "temporal_quality", "combined"]


def redness(prompts, videos, **kwargs):
    """Toy reward in [0, 1]: how much red dominates the video (`videos` `[N, F, C, H, W]` in [0, 1])."""
    r, g, b = videos[:, :, 0], videos[:, :, 1], videos[:, :, 2]
    return ((r - (g + b) / 2).mean(dim=(1, 2, 3)) * 0.5 + 0.5).tolist()


def random_reward(prompts, videos, **kwargs):
    """
    Control reward: uniform in [0, 1] from torch's global generator, whatever the video. A run on it alone has no
    signal, so what it does to the model is what the update costs by itself (its drift from noisy advantages).
    """
    return torch.rand(len(prompts)).tolist()


BUILTIN_REWARDS = {"redness": redness, "random": random_reward}


@dataclass
class ScriptArguments:
    pipeline_name_or_path: str = field(
        default=MOVING_SHAPES,
        metadata={
            "help": "SelfForcingPipeline folder or Hub id; 'moving-shapes' (the shipped Moving Shapes model) or "
            "'tiny-random' (a tiny random model)."
        },
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A datasets name/path with a 'prompt' column."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    prompts_file: str | None = field(default=None, metadata={"help": "Text file, one prompt per line."})
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions: names from trl_arcopo.shapes, 'redness', 'random' (a control with no signal) "
            "or dotted import paths ('package.module.function'). None: the four verifiable Moving Shapes rewards, or "
            "'redness' for tiny-random (the main job's YAML sets the preference and these four, with weights)."
        },
    )
    shapes_pipeline_path: str | None = field(
        default=None,
        metadata={
            "help": "Moving Shapes: a folder made by examples/moving_shapes/pretrain.py instead of the shipped model."
        },
    )
    eval_num_seeds: int = field(
        default=32,
        metadata={
            "help": "Moving Shapes: videos per held-out prompt in the before/after evaluation (2 per training prompt); "
            "32 puts the standard error of the all-correct difference (about 0.02) below the 0.03 it is judged by."
        },
    )
    torch_dtype: str = field(default="float32", metadata={"help": "Transformer dtype: float32, bfloat16, float16."})
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads for torch. None: every core this process may use when it trains on the CPU as a "
            "single process (`accelerate launch` otherwise pins OMP_NUM_THREADS=1), else torch's default."
        },
    )


@dataclass
class LoraArguments:
    lora_r: int = field(default=64, metadata={"help": "LoRA rank (paper: 64)."})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA alpha (paper: 128)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata={"help": "Module name suffixes that get a LoRA."},
    )


def cpu_threads(requested, num_processes, device_type, num_cores):
    """
    Threads torch should use, or `None` to keep its default. Without `--num_cpu_threads_per_process`,
    `accelerate launch` sets OMP_NUM_THREADS=1 even for a single process on a CPU-only machine, which leaves the other
    cores idle (the Moving Shapes main job runs about 1.6 times faster on 2 cores than on 1).
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--num_threads must be at least 1, got {requested}; omit it to use every core.")
        return requested
    if device_type != "cpu" or num_processes > 1:
        return None
    return num_cores


def resolve_reward(name):
    if name in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[name]
    if hasattr(shapes, name):
        return getattr(shapes, name)
    module, _, attr = name.rpartition(".")
    if not module:
        raise ValueError(
            f"Unknown reward {name!r}: use 'redness', 'random', a Moving Shapes reward ({', '.join(SHAPES_REWARDS)}, "
            "prominence_reward, combined_reward) or a dotted path 'package.module.function'."
        )
    return getattr(importlib.import_module(module), attr)


def evaluate_shapes(pipeline, training_args, num_seeds):
    """Scores on the training (2 videos each) and held-out prompts (fresh seeds, not the training rollouts')."""
    seed = training_args.seed + 1
    return {
        "train": evaluate_generator(pipeline, shapes.TRAIN_PROMPTS, 2, seed=seed, sampler=training_args.sampler),
        "heldout": evaluate_generator(
            pipeline, shapes.HELDOUT_PROMPTS, num_seeds, seed=seed, sampler=training_args.sampler
        ),
    }


def write_shapes_report(output_dir, before, after, videos_before, videos_after, log_history, reward_names):
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "eval_results.json"), "w") as f:
        json.dump({"base": before, "trained": after}, f, indent=2)
    lines = ["# Moving Shapes: base vs AR-CoPO", ""]
    for split, title in (("train", "RL-training prompts (60)"), ("heldout", "held-out prompts (12)")):
        table = format_table({"base": before[split], "AR-CoPO": after[split]}, keys=REPORT_KEYS)
        lines += [f"## {title}", "", table, ""]
        lines += [
            "| trained − base | per seed set | mean ± std | base spread | mean / spread |",
            "| --- |" + " --- |" * 4,
        ]
        for name, key in REPORTED_DIFFERENCES:
            diff = paired_difference(before[split], after[split], key=key)
            per_seed = ", ".join(f"{d:+.3f}" for d in diff["by_seed"])
            ratio = diff["mean"] / diff["base_spread"] if diff["base_spread"] > 0 else float("nan")
            lines.append(
                f"| {name} | {per_seed} | {diff['mean']:+.3f} ± {diff['std']:.3f} | {diff['base_spread']:.3f} | "
                f"{ratio:+.1f}× |"
            )
        noise = before[split]["prominence"].get("within_prompt_std")
        if noise is not None:
            lines += [
                "",
                f"The base's preference varies with the initial noise alone: within-prompt std over seeds {noise:.3f}.",
            ]
        lines.append("")
    lines.append(
        "mean ± std over evaluation seed sets (the same noises for both models); `*_acc` are the fractions of videos "
        "scoring ≥ 0.5; `prominence` is the preference the job trains for (`trl_arcopo.shapes.prominence_reward`)."
    )
    table = "\n".join(lines)
    with open(os.path.join(output_dir, "eval_table.md"), "w") as f:
        f.write(table + "\n")
    save_video_grid(
        os.path.join(output_dir, "samples.gif"),
        {"base": videos_before, "AR-CoPO": videos_after},
        list(shapes.HELDOUT_PROMPTS),
    )
    steps = [h["step"] for h in log_history if "reward" in h]
    curves = {}  # each reward on its own scale ([0, 1] for the Moving Shapes rewards), not their weighted sum
    for name in reward_names:
        key = f"rewards/{name}/mean"
        values = [h[key] for h in log_history if key in h]
        if len(values) == len(steps):
            curves[name.replace("_reward", "")] = (steps, smooth(values), None)
    if not curves:
        curves["reward"] = (steps, smooth([h["reward"] for h in log_history if "reward" in h]), None)
    plot_curves(
        os.path.join(output_dir, "reward_curve.png"),
        curves,
        "step",
        "training reward (moving average of 5 steps)",
        "AR-CoPO on Moving Shapes",
    )
    return table


def main(script_args, training_args, lora_args):
    state = PartialState()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = cpu_threads(script_args.num_threads, state.num_processes, state.device.type, cores)
    if threads is not None:
        torch.set_num_threads(threads)
    shapes_world = script_args.pipeline_name_or_path == MOVING_SHAPES
    # Model
    if shapes_world:
        pipeline = shapes.load_pretrained_pipeline(script_args.shapes_pipeline_path)
    elif script_args.pipeline_name_or_path == TINY_RANDOM:
        pipeline = tiny_pipeline()
    else:
        dtype = getattr(torch, script_args.torch_dtype)
        pipeline = SelfForcingPipeline.from_pretrained(script_args.pipeline_name_or_path, torch_dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    peft_config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=lora_args.lora_target_modules,
    )
    reward_names = script_args.reward_funcs or (SHAPES_REWARDS if shapes_world else ["redness"])

    # Dataset
    if script_args.dataset_name is not None:
        dataset = load_dataset(script_args.dataset_name, split=script_args.dataset_train_split)
    elif script_args.prompts_file is not None:
        with open(script_args.prompts_file) as f:
            dataset = Dataset.from_dict({"prompt": [line.strip() for line in f if line.strip()]})
    elif shapes_world:
        dataset = shapes.make_dataset("train")
    else:
        dataset = Dataset.from_dict({"prompt": TOY_PROMPTS})

    # Moving Shapes: the base model's scores and samples, before the adapter exists
    report = shapes_world and state.is_main_process
    if report:
        grid_seeds = list(range(len(shapes.HELDOUT_PROMPTS)))
        before = evaluate_shapes(pipeline, training_args, script_args.eval_num_seeds)
        videos_before = generate_videos(pipeline, shapes.HELDOUT_PROMPTS, grid_seeds, sampler=training_args.sampler)

    # Training
    trainer = ARCoPOTrainer(
        pipeline=pipeline,
        reward_funcs=[resolve_reward(name) for name in reward_names],
        args=training_args,
        train_dataset=dataset,
        peft_config=peft_config,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.check_adapters_in_sync()
    trainer.save_model(training_args.output_dir)

    if report:  # the adapter is active: the pipeline now samples from the trained policy
        after = evaluate_shapes(pipeline, training_args, script_args.eval_num_seeds)
        videos_after = generate_videos(pipeline, shapes.HELDOUT_PROMPTS, grid_seeds, sampler=training_args.sampler)
        table = write_shapes_report(
            training_args.output_dir,
            before,
            after,
            videos_before,
            videos_after,
            trainer.state.log_history,
            trainer.reward_func_names,  # the names the trainer logs each reward under
        )
        print(table)
        print(
            f"adapter, model card, eval_table.md, samples.gif and reward_curve.png are in {training_args.output_dir}"
        )
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)


def with_default_config(argv):
    """
    The command line with the main job's file added when it names none: `--config examples/configs/moving_shapes.yaml`
    unless a `--config` or another model (`--pipeline_name_or_path` other than 'moving-shapes') is given, so that
    `train_arcopo.py --seed 1` is the main job with another seed (the command line overrides the file).
    """
    argv = list(argv)
    for i, arg in enumerate(argv):
        name, _, value = arg.partition("=")
        if name == "--config":
            return argv
        if name == "--pipeline_name_or_path":
            value = value or (argv[i + 1] if i + 1 < len(argv) else "")
            if value != MOVING_SHAPES:
                return argv
    return argv + ["--config", DEFAULT_CONFIG]


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, ARCoPOConfig, LoraArguments))
    script_args, training_args, lora_args = parser.parse_args_and_config(
        args=with_default_config(sys.argv[1:]), return_remaining_strings=False
    )
    main(script_args, training_args, lora_args)
