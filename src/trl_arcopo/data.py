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
"""Prompt datasets: what the trainer accepts, and the order it draws them in."""

from __future__ import annotations

import torch
from datasets import Dataset, IterableDataset
from trl.trainer.utils import RepeatSampler


class EpochRepeatSampler(RepeatSampler):
    """
    TRL's `RepeatSampler` whose shuffle depends only on `(seed, epoch)`: a run resumed in a later epoch draws the
    prompts the uninterrupted run drew (the base class advances one generator per pass, from the start of a process).
    """

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle:
            self.generator.manual_seed((self.seed or 0) + epoch)


def check_prompt_dataset(dataset: Dataset | IterableDataset, name: str) -> None:
    """Refuse a dataset without a text `"prompt"` column, or without rows, with an error naming the fix."""
    if "prompt" not in (dataset.column_names or []):
        raise ValueError(
            f"`{name}` has no 'prompt' column (columns: {dataset.column_names}); rename the text column, "
            "e.g. `dataset.rename_column('text', 'prompt')`."
        )
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"`{name}` has no rows: give at least one prompt.")
    feature = (dataset.features or {}).get("prompt")
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise ValueError(
            f"The 'prompt' column of `{name}` holds {feature} values, not text: give one string per row "
            "(e.g. `dataset.cast_column('prompt', Value('string'))`)."
        )


def check_datasets(train_dataset, eval_dataset, per_device_batch_size: int, processes: int, training_mode: str):
    """Both datasets ([`check_prompt_dataset`]), the training one required, and what the training mode needs of it."""
    for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
        if dataset is not None:
            check_prompt_dataset(dataset, name)
    check_train_dataset(train_dataset, per_device_batch_size, processes)
    if training_mode == "semi_on_policy" and not isinstance(train_dataset, Dataset):
        raise ValueError(
            "`training_mode='semi_on_policy'` collects its replay buffer from a map-style `datasets.Dataset`; "
            f"got {type(train_dataset).__name__}."
        )


def check_train_dataset(dataset: Dataset | IterableDataset | None, per_device_batch_size: int, processes: int) -> None:
    """A training dataset is required and must hold at least one step's prompts (`per_device_batch_size × processes`)."""
    if dataset is None:
        raise ValueError("`train_dataset` is required: a datasets.Dataset with a 'prompt' column.")
    prompts_per_step = per_device_batch_size * processes
    if isinstance(dataset, Dataset) and len(dataset) < prompts_per_step:
        raise ValueError(
            f"`train_dataset` has {len(dataset)} prompts but one step takes {prompts_per_step} "
            f"(`per_device_train_batch_size={per_device_batch_size}` x {processes} processes); "
            "lower `per_device_train_batch_size` or add prompts."
        )


def seeded_generator(
    seed: int, step: int, rank: int, purpose: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """
    A generator that depends only on `(seed, step, rank, purpose)`: what a run draws at a (micro-)step replays exactly
    after a resume, differs between processes, and differs between purposes (rollout, anchors, buffer draws).
    """
    key = seed * 1_000_003 + step * 10_007 + rank * 101
    generator = torch.Generator(device=device)
    generator.manual_seed((key * 13 + purpose) % (2**63))
    return generator
