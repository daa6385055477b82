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
Checkpoints a run can resume from: what makes one complete, the newest complete one, and the temporary files an
interrupted save leaves behind.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from safetensors import SafetensorError, safe_open
from transformers import TrainerState
from transformers.trainer import OPTIMIZER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .ema import EMA_FILE, nonfinite_ema_names, summarize_names
from .io_utils import TEMPORARY_NAME_RE, process_file
from .lora_files import LORA_WEIGHT_NAME, load_lora_adapter_weights
from .rollout_group import rollout_settings, saved_rollout_problems


logger = logging.get_logger(__name__)

ROLLOUT_FILE = "rollout"
CHECKPOINT_RE = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


def is_checkpoint_folder(folder: str) -> bool:
    """Whether `folder` is a checkpoint's (`checkpoint-<step>`), whose adapter holds the last weights, never the EMA."""
    return CHECKPOINT_RE.fullmatch(os.path.basename(os.path.normpath(folder))) is not None


def readable_safetensors(path: str) -> bool:
    """Whether `path` is a complete safetensors file (the header is read and checked against the file size)."""
    try:
        with safe_open(path, framework="pt"):
            return True
    except (OSError, SafetensorError):
        return False


def checkpoint_problems(
    folder: str, needs_optimizer: bool = True, required_files: Callable[[int], dict[str, str]] | None = None
) -> list[str]:
    """
    What keeps `folder` from resuming a run (an empty list: nothing). `trainer_state.json` is written last, so a
    readable one marks a complete save; the adapter must be a complete safetensors file, the optimizer present
    (`needs_optimizer`), and every safetensors file `required_files(global_step)` maps (to why it is needed)
    complete.
    """
    if not os.path.isdir(folder):
        return [f"{folder} is not a folder"]
    try:
        state = TrainerState.load_from_json(os.path.join(folder, TRAINER_STATE_NAME))
    except (OSError, ValueError) as error:
        return [f"its {TRAINER_STATE_NAME} is missing or unreadable ({type(error).__name__}): the save was cut off"]
    problems = []
    if not readable_safetensors(os.path.join(folder, LORA_WEIGHT_NAME)):
        problems.append(f"its adapter {LORA_WEIGHT_NAME} is missing or truncated")
    if needs_optimizer and not os.path.isfile(os.path.join(folder, OPTIMIZER_NAME)):
        problems.append(f"it has no {OPTIMIZER_NAME}")
    for name, why in (required_files(state.global_step) if required_files is not None else {}).items():
        if not readable_safetensors(os.path.join(folder, name)):
            problems.append(f"{why} but {name} is missing or truncated")
    return problems


def last_complete_checkpoint(output_dir: str, problems: Callable[[str], list[str]]) -> str:
    """
    The newest checkpoint folder of `output_dir` without `problems`; newer incomplete ones are skipped with a warning
    that names each and what it lacks. Raises a `ValueError` listing them if none is complete.
    """
    folders = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            match = CHECKPOINT_RE.fullmatch(name)
            if match and os.path.isdir(os.path.join(output_dir, name)):
                folders.append((int(match.group(1)), os.path.join(output_dir, name)))
    skipped = []
    for _, folder in sorted(folders, reverse=True):
        found = problems(folder)
        if not found:
            if skipped:
                logger.warning(
                    f"Resuming from {folder}; skipped the incomplete newer checkpoint(s) "
                    + "; ".join(f"{f} ({', '.join(p)})" for f, p in skipped)
                    + ". Delete them once this run has saved past them."
                )
            return folder
        skipped.append((folder, found))
    raise ValueError(
        f"`resume_from_checkpoint=True` but {output_dir} holds no complete checkpoint"
        + (": " + "; ".join(f"{f} ({', '.join(p)})" for f, p in skipped) if skipped else "")
        + ". Start without `resume_from_checkpoint`, or pass a checkpoint folder."
    )


def remove_stale_temporaries(output_dir: str) -> list[str]:
    """
    Remove the temporary files and folders that a killed save left in `output_dir` and its checkpoint folders (every
    file is written under a temporary name, then renamed). Returns the removed paths.
    """
    folders = [output_dir] + [
        os.path.join(output_dir, name)
        for name in os.listdir(output_dir)
        if CHECKPOINT_RE.fullmatch(name) and os.path.isdir(os.path.join(output_dir, name))
    ]
    removed = []
    for folder in folders:
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if TEMPORARY_NAME_RE.fullmatch(name) and os.path.isfile(path):
                os.remove(path)
                removed.append(path)
    if removed:
        logger.info(f"Removed {len(removed)} temporary file(s) left by an interrupted save: {', '.join(removed)}.")
    return removed


def rollout_file(folder: str, rank: int = 0, num_processes: int = 1) -> str:
    """This process's buffered-rollout file in a checkpoint `folder` (`rollout.safetensors`, `-rank{i}` with several)."""
    return process_file(os.path.join(folder, f"{ROLLOUT_FILE}.safetensors"), rank, num_processes)


def between_iterations(micro_steps: int, num_iterations: int, training_mode: str = "on_policy") -> bool:
    """Whether, after `micro_steps`, the next micro-step updates on the buffered rollout instead of making a new one."""
    return training_mode == "on_policy" and micro_steps % num_iterations != 0


def resolve_resume(resume_from_checkpoint: str | bool | None, output_dir: str, problems: Callable[[str], list[str]]):
    """
    The checkpoint a `train(resume_from_checkpoint=...)` call resumes from: `True` takes the newest complete one of
    `output_dir` ([`last_complete_checkpoint`]); a path is returned if it has no `problems`, else refused with them.
    """
    if resume_from_checkpoint is True:
        return last_complete_checkpoint(output_dir, problems)
    if isinstance(resume_from_checkpoint, str | os.PathLike):
        path = os.fspath(resume_from_checkpoint)
        if found := problems(path):
            raise ValueError(
                f"Cannot resume from {path}: {'; '.join(found)}. Resume from an earlier checkpoint, or pass "
                "`resume_from_checkpoint=True` to take the newest complete one."
            )
        return path
    return None


def rollout_requirement(folder: str, step: int, micro_steps_per_step: int, num_iterations: int, training_mode: str,
                        rank: int = 0, num_processes: int = 1) -> dict[str, str]:  # fmt: skip
    """The rollout file a checkpoint at optimizer `step` needs (when taken between two updates on one rollout)."""
    if not between_iterations(step * micro_steps_per_step, num_iterations, training_mode):
        return {}
    why = f"it was saved between two updates on one rollout (step {step}, `num_iterations={num_iterations}`)"
    return {os.path.basename(rollout_file(folder, rank, num_processes)): why}


class CheckpointMixin:
    """
    [`~trl_arcopo.ARCoPOTrainer`]'s checkpoint hooks on `transformers.Trainer`: a checkpoint carries the rollout being
    updated between inner iterations and the replay-buffer copy, `trainer_state.json` is written last, and a resume
    takes the newest complete checkpoint. Needs the trainer's `_step`, `_buffered_rollout`, `replay`, `ema`,
    `adapter_name`; the model it saves into a checkpoint folder holds the last weights ([`is_checkpoint_folder`]).
    """

    # `_save_checkpoint` and `_load_from_checkpoint` are private in `Trainer`, and no callback can add files to a
    # checkpoint before `trainer_state.json` is written or load an adapter into the model being resumed.
    def _save_checkpoint(self, model, trial):
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        os.makedirs(folder, exist_ok=True)
        if self.args.should_save:
            # `trainer_state.json` is written last: a folder with a readable one is complete. A leftover from a killed
            # save of the same step must not vouch for the files about to be written.
            if os.path.exists(os.path.join(folder, TRAINER_STATE_NAME)):
                os.remove(os.path.join(folder, TRAINER_STATE_NAME))
            self.create_model_card()
        path = self._rollout_file(folder)  # between two updates on one rollout, the checkpoint carries it
        if (
            between_iterations(self._step, self.args.num_iterations, self.args.training_mode)
            and self._buffered_rollout
        ):
            self._buffered_rollout.save(path, rollout_settings(self.args))
        elif os.path.exists(path):  # left by a killed save of this step
            os.remove(path)
        if self.replay is not None:
            self.replay.save_to(folder)
        if self.ema is not None:  # a non-finite average is refused before `trainer_state.json` marks it complete
            self.ema.check_finite(folder)  # on every process: the same average everywhere, so all stop together
            if self.args.should_save:
                self.ema.save(folder)
        super()._save_checkpoint(model, trial)

    def _rollout_file(self, folder: str) -> str:
        return rollout_file(folder, self.accelerator.process_index, self.accelerator.num_processes)

    def checkpoint_problems(self, folder: str) -> list[str]:
        """
        What keeps `folder` from resuming this run exactly (an empty list: it can): [`checkpoint_problems`], and an
        EMA (`ema_decay`) holding a NaN or an infinity.
        """
        args, rank, processes = self.args, self.accelerator.process_index, self.accelerator.num_processes
        ga, iterations, mode = args.gradient_accumulation_steps, args.num_iterations, args.training_mode
        optimizer_in_folder = not (args.save_only_model or self.is_deepspeed_enabled or self.is_fsdp_enabled)
        ema = {EMA_FILE: "the run keeps an EMA of the adapter (`ema_decay`)"} if self.ema is not None else {}

        def required(step: int) -> dict[str, str]:
            return {**rollout_requirement(folder, step, ga, iterations, mode, rank, processes), **ema}

        problems = checkpoint_problems(folder, optimizer_in_folder, required)
        ema_path = os.path.join(folder, EMA_FILE)
        if self.ema is not None and not problems and (bad := nonfinite_ema_names(ema_path)):
            problems.append(f"its EMA {EMA_FILE} is not finite ({summarize_names(bad)})")
        return problems

    def check_resumed_rollout(self, folder: str) -> None:
        """
        Refuse, with one `ValueError` naming each problem and the fix, a resume from `folder` whose saved rollout
        ([`rollout_file`]) this run would update on but that does not fit it: shapes that do not fit together, a
        pivot outside the video, or a group size, batch, sigma schedule, `loss_type`, `num_iterations`,
        `gradient_accumulation_steps` or pivot chunk other than this run's ([`~trl_arcopo.rollout_group.saved_rollout_problems`]).
        A file saved before the settings were recorded is checked on its tensors, with a warning.
        """
        path = self._rollout_file(folder)
        if self.args.training_mode != "on_policy" or not os.path.isfile(path):
            return  # a missing rollout that is needed is reported by `checkpoint_problems`
        problems = saved_rollout_problems(path, self.spec, rollout_settings(self.args), self.args.pivot_chunk)
        if problems:
            raise ValueError(
                f"Cannot resume from {folder}: its saved rollout {os.path.basename(path)} (the rollout being updated "
                f"when it was saved) does not fit this run: {'; '.join(problems)}. Resume with the settings that saved "
                "it (the saved values above), or from a checkpoint without a rollout file (one saved at a multiple of "
                "`num_iterations`), or start a fresh `output_dir`."
            )
        with safe_open(path, framework="pt") as f:
            if "settings" not in (f.metadata() or {}):
                logger.warning(
                    f"{path} was saved before rollouts recorded their settings: its shapes, schedule and pivot match "
                    "this run, but `loss_type`, `num_iterations` and `gradient_accumulation_steps` cannot be "
                    "checked. Resume with the settings that saved it."
                )

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """
        As [`~transformers.Trainer.train`]. `resume_from_checkpoint=True` takes the newest *complete* checkpoint of
        `output_dir`, skipping (with a warning naming them) folders a killed save left incomplete or whose EMA is not
        finite; a path is checked the same way and refused with the list of what is missing. A saved rollout that does
        not fit this run is refused ([`check_resumed_rollout`]). Temporary files a killed save left behind in
        `output_dir` are removed first.
        """
        if self.is_world_process_zero() and os.path.isdir(self.args.output_dir):
            remove_stale_temporaries(self.args.output_dir)
        self._resume_checkpoint = resolve_resume(
            resume_from_checkpoint, self.args.output_dir, self.checkpoint_problems
        )
        if self._resume_checkpoint is not None:
            self.check_resumed_rollout(self._resume_checkpoint)
        return super().train(self._resume_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        transformer = self.accelerator.unwrap_model(model if model is not None else self.model)
        load_lora_adapter_weights(transformer, resume_from_checkpoint, adapter_name=self.adapter_name)
        if self.replay is not None:
            self.replay.restore_from(resume_from_checkpoint)
        if self.ema is not None:
            self.ema.load(resume_from_checkpoint)
