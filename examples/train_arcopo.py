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

    accelerate launch examples/train_arcopo.py                      # the main job: Moving Shapes, the shipped model
    accelerate launch examples/train_arcopo.py --seed 1 --max_steps 20
    accelerate launch examples/train_arcopo.py --pipeline_name_or_path tiny-random --config examples/configs/tiny.yaml
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/train_arcopo.py \\
        --pipeline_name_or_path path/to/self-forcing-diffusers --prompts_file prompts.txt \\
        --reward_funcs "videoalign:checkpoints/VideoReward?dimensions=VQ+MQ+TA" "flicker"

Without `--config` (or another `--pipeline_name_or_path`) it reads `examples/configs/moving_shapes.yaml`, the main
job: the Moving Shapes generator of `trl_arcopo.shapes`, a preference next to the verifiable rewards, and the report
of `trl_arcopo.shapes.write_report`. Rewards are names with options, resolved by `trl_arcopo.rewards.load_reward_func`
(docs/rewards.md, "Rewards by name"): on the command line `--reward_funcs NAME[:ARGUMENT][?KEY=VALUE&...] ...`, in a
YAML config a `reward_funcs:` list whose entries are such strings or mappings `{name: NAME, KEY: VALUE, ...}`.
"""

import os
import sys
from dataclasses import dataclass, field

import torch
from accelerate import PartialState
from datasets import Dataset, load_dataset
from trl import TrlParser

from trl_arcopo import ARCoPOConfig, ARCoPOTrainer, SelfForcingPipeline, shapes
from trl_arcopo.policy import DEFAULT_LORA_TARGETS
from trl_arcopo.quantization import pipeline_quantization_config
from trl_arcopo.rewards import RewardSpec, parse_reward_spec
from trl_arcopo.testing_utils import tiny_pipeline


MOVING_SHAPES, TINY_RANDOM = "moving-shapes", "tiny-random"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "moving_shapes.yaml")
TOY_PROMPTS = ["a red fox jumps over a blue car", "a cat runs on the beach", "a dog in snow at night"]


@dataclass
class ScriptArguments:
    pipeline_name_or_path: str = field(
        default=MOVING_SHAPES,
        metadata={"help": "SelfForcingPipeline folder or Hub id, 'moving-shapes' or 'tiny-random'."},
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A datasets name/path with a 'prompt' column."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    prompts_file: str | None = field(default=None, metadata={"help": "Text file, one prompt per line."})
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={"help": "Rewards by name, with options: 'videoalign:checkpoints/VideoReward?dimensions=VQ+MQ+TA', "
                  "'motion_magnitude?scale=20', ...; in YAML also mappings {name: videoalign, path: ...}."},
    )  # fmt: skip
    shapes_pipeline_path: str | None = field(
        default=None, metadata={"help": "Moving Shapes: a pretrain.py folder instead of the shipped model."}
    )
    eval_num_seeds: int = field(default=32, metadata={"help": "Moving Shapes: held-out evaluation videos per prompt."})
    torch_dtype: str = field(default="float32", metadata={"help": "Transformer dtype: float32, bfloat16, float16."})
    load_in_bits: int | None = field(
        default=None, metadata={"help": "QLoRA: load the frozen transformer in 4 or 8 bits (bitsandbytes, GPU only)."}
    )
    num_threads: int | None = field(
        default=None, metadata={"help": "CPU threads (None: every core, if alone on CPU)."}
    )


@dataclass
class LoraArguments:
    lora_r: int = field(default=64, metadata={"help": "LoRA rank (paper: 64)."})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA alpha (paper: 128)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))


def cpu_threads(requested, num_processes, device_type, num_cores):
    """`accelerate launch` pins OMP_NUM_THREADS=1: take every core back for a single CPU process (None: keep it)."""
    if requested is not None and requested < 1:
        raise ValueError(f"--num_threads must be at least 1, got {requested}; omit it to use every core.")
    return requested or (num_cores if device_type == "cpu" and num_processes == 1 else None)


def reward_specs(reward_funcs, world):
    """
    The run's rewards, resolved and checked before anything loads (an unknown name or option, or a missing
    checkpoint, fails now): each entry of `--reward_funcs` or of the YAML list is a name with options or a mapping
    ([`~trl_arcopo.rewards.parse_reward_spec`]). Without any, the Moving Shapes world's verifiable rewards, or the toy
    `redness` on another generator.
    """
    names = reward_funcs or (shapes.VERIFIABLE_REWARDS if world else ["redness"])
    return [parse_reward_spec(name) for name in names]


def main(script_args, training_args, lora_args):
    # peft imports bitsandbytes, whose import-time warning about an optional CPU kernel `import trl_arcopo` (above)
    # demotes to DEBUG; imported at the top, it would come first and print it
    from peft import LoraConfig

    state = PartialState()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if (threads := cpu_threads(script_args.num_threads, state.num_processes, state.device.type, cores)) is not None:
        torch.set_num_threads(threads)
    world = script_args.pipeline_name_or_path == MOVING_SHAPES
    rewards: list[RewardSpec] = reward_specs(script_args.reward_funcs, world)
    if script_args.load_in_bits is not None and script_args.pipeline_name_or_path in (MOVING_SHAPES, TINY_RANDOM):
        raise ValueError(
            f"--load_in_bits {script_args.load_in_bits} quantises a pipeline loaded from a folder or the Hub on a GPU, "
            f"not {script_args.pipeline_name_or_path!r}: pass --pipeline_name_or_path or drop --load_in_bits."
        )
    if world:  # Model
        pipeline = shapes.load_pretrained_pipeline(script_args.shapes_pipeline_path)
    elif script_args.pipeline_name_or_path == TINY_RANDOM:
        pipeline = tiny_pipeline()
    else:
        dtype = getattr(torch, script_args.torch_dtype)
        quantization = pipeline_quantization_config(script_args.load_in_bits, dtype)
        pipeline = SelfForcingPipeline.from_pretrained(
            script_args.pipeline_name_or_path, torch_dtype=dtype, quantization_config=quantization
        )
    pipeline.set_progress_bar_config(disable=True)
    if script_args.dataset_name is not None:  # Dataset
        dataset = load_dataset(script_args.dataset_name, split=script_args.dataset_train_split)
    elif script_args.prompts_file is not None:
        with open(script_args.prompts_file) as f:
            dataset = Dataset.from_dict({"prompt": [line.strip() for line in f if line.strip()]})
    else:
        dataset = shapes.make_dataset("train") if world else Dataset.from_dict({"prompt": TOY_PROMPTS})
    report = world and state.is_main_process  # the base's scores and samples, before the adapter exists
    measure = lambda: shapes.evaluate_main_job(  # noqa: E731
        pipeline, training_args.seed, script_args.eval_num_seeds, training_args.sampler
    )
    before = measure() if report else None

    trainer = ARCoPOTrainer(  # Training
        pipeline=pipeline,
        reward_funcs=[spec.build() for spec in rewards],
        args=training_args,
        train_dataset=dataset,
        peft_config=LoraConfig(r=lora_args.lora_r, lora_alpha=lora_args.lora_alpha, lora_dropout=lora_args.lora_dropout,
                               target_modules=lora_args.lora_target_modules),
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.check_adapters_in_sync()
    trainer.save_model(training_args.output_dir)
    if report:  # the adapter is active: the pipeline now samples from the trained policy
        log, names = trainer.state.log_history, trainer.reward_func_names  # the names rewards are logged under
        print(shapes.write_report(training_args.output_dir, before, measure(), log, names))
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)


def with_default_config(argv):
    """The command line, plus the main job's YAML unless it names a `--config` or another `--pipeline_name_or_path`."""
    for i, arg in enumerate(argv := list(argv)):
        name, _, value = arg.partition("=")
        if name == "--config":
            return argv
        if name == "--pipeline_name_or_path" and (value or (argv[i + 1 :] or [""])[0]) != MOVING_SHAPES:
            return argv
    return argv + ["--config", DEFAULT_CONFIG]


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, ARCoPOConfig, LoraArguments))
    args = parser.parse_args_and_config(args=with_default_config(sys.argv[1:]), return_remaining_strings=False)
    main(*args)
