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

    accelerate launch examples/train_arcopo.py                                   # tiny model, toy reward, CPU
    accelerate launch examples/train_arcopo.py --config examples/configs/tiny.yaml
    accelerate launch --config_file examples/accelerate_configs/multi_gpu.yaml examples/train_arcopo.py \\
        --pipeline_name_or_path path/to/self-forcing-diffusers --prompts_file prompts.txt --reward_funcs mymod.reward

Two CPU processes (DDP over gloo):

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 examples/train_arcopo.py --max_steps 2

Without `--pipeline_name_or_path` the script builds a tiny random pixel-space model and trains it toward red videos
(the `redness` reward) in a minute: a check of the plumbing, not a useful model.
"""

import importlib
from dataclasses import dataclass, field

import torch
from datasets import Dataset, load_dataset
from peft import LoraConfig
from trl import TrlParser

from trl_arcopo import ARCoPOConfig, ARCoPOTrainer, SelfForcingPipeline
from trl_arcopo.testing_utils import tiny_pipeline


TOY_PROMPTS = ["a red fox jumps over a blue car", "a cat runs on the beach", "a dog in snow at night"]


def redness(prompts, videos, **kwargs):
    """Toy reward in [0, 1]: how much red dominates the video (`videos` `[N, F, C, H, W]` in [0, 1])."""
    r, g, b = videos[:, :, 0], videos[:, :, 1], videos[:, :, 2]
    return ((r - (g + b) / 2).mean(dim=(1, 2, 3)) * 0.5 + 0.5).tolist()


@dataclass
class ScriptArguments:
    pipeline_name_or_path: str | None = field(
        default=None, metadata={"help": "SelfForcingPipeline folder or Hub id; None builds a tiny random model."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "A datasets name/path with a 'prompt' column."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    prompts_file: str | None = field(default=None, metadata={"help": "Text file, one prompt per line."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["redness"],
        metadata={"help": "Reward functions: 'redness' or dotted import paths ('package.module.function')."},
    )
    torch_dtype: str = field(default="float32", metadata={"help": "Transformer dtype: float32, bfloat16, float16."})


@dataclass
class LoraArguments:
    lora_r: int = field(default=64, metadata={"help": "LoRA rank (paper: 64)."})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA alpha (paper: 128)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"],
        metadata={"help": "Module name suffixes that get a LoRA."},
    )


def resolve_reward(name):
    if name == "redness":
        return redness
    module, _, attr = name.rpartition(".")
    if not module:
        raise ValueError(f"Unknown reward {name!r}: use 'redness' or a dotted path 'package.module.function'.")
    return getattr(importlib.import_module(module), attr)


def main(script_args, training_args, lora_args):
    # Model
    if script_args.pipeline_name_or_path is None:
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

    # Dataset
    if script_args.dataset_name is not None:
        dataset = load_dataset(script_args.dataset_name, split=script_args.dataset_train_split)
    elif script_args.prompts_file is not None:
        with open(script_args.prompts_file) as f:
            dataset = Dataset.from_dict({"prompt": [line.strip() for line in f if line.strip()]})
    else:
        dataset = Dataset.from_dict({"prompt": TOY_PROMPTS})

    # Training
    trainer = ARCoPOTrainer(
        pipeline=pipeline,
        reward_funcs=[resolve_reward(name) for name in script_args.reward_funcs],
        args=training_args,
        train_dataset=dataset,
        peft_config=peft_config,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.check_adapters_in_sync()
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)


if __name__ == "__main__":
    parser = TrlParser((ScriptArguments, ARCoPOConfig, LoraArguments))
    script_args, training_args, lora_args = parser.parse_args_and_config(args=None, return_remaining_strings=False)
    main(script_args, training_args, lora_args)
