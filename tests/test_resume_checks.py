"""
What a resume loads is checked before it is used: the rollout saved between two updates (its shapes, its pivot and
the settings it was made with, against the current run) and the moving average of the adapter (its shapes and its
values). Each case asserts the one error the user gets, naming every mismatch, its saved and current values and the
fix; and that a valid resume still runs.
"""

import json
import logging
import os
import shutil

import pytest
import torch
from helpers import redness, tiny_trainer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from trl_arcopo.ema import EMA_FILE
from trl_arcopo.rollout_group import RolloutGroup


RUN = dict(max_steps=2, num_iterations=2)  # checkpoint-1 is between the two updates on one rollout: it carries it


def _trainer(output_dir, **kwargs):
    return tiny_trainer(output_dir, reward_funcs=(redness,), **{**RUN, **kwargs})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run saved at every step: `checkpoint-1` holds `rollout.safetensors` (2 prompts x G = 3, 3 steps)."""
    out = tmp_path_factory.mktemp("saved")
    _trainer(out, save_strategy="steps", save_steps=1).train()
    assert os.path.isfile(out / "checkpoint-1" / "rollout.safetensors")
    return out


def _copy_checkpoint(saved, tmp_path, step=1):
    folder = tmp_path / f"checkpoint-{step}"
    shutil.copytree(saved / f"checkpoint-{step}", folder)
    return folder


def _rewrite_rollout(path, edit_tensors=None, edit_metadata=None):
    """Rewrite the rollout file with its tensors and metadata edited in place (a crafted or older file)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
    tensors = load_file(str(path))
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        edit_metadata(metadata)
    save_file(tensors, str(path), metadata=metadata)


# ---------------------------------------------------------------- the saved rollout
def test_the_rollout_records_its_settings_and_a_resume_with_them_runs(saved, tmp_path):
    with safe_open(str(saved / "checkpoint-1" / "rollout.safetensors"), framework="pt") as f:
        settings = json.loads(f.metadata()["settings"])
    assert settings == {
        "loss_type": "arcopo", "num_generations": 3, "per_device_train_batch_size": 2, "num_iterations": 2,
        "gradient_accumulation_steps": 1,
    }  # fmt: skip
    resumed = _trainer(tmp_path)
    resumed.train(resume_from_checkpoint=str(saved / "checkpoint-1"))
    assert resumed.state.global_step == 2
    assert resumed.rollout_counts["policy"] == 0  # step 2, the second update on step 1's rollout, used the saved one


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (dict(num_generations=4), ["`num_generations`: saved 3, current 4"]),
        (dict(per_device_train_batch_size=1), ["`per_device_train_batch_size`: saved 2, current 1"]),
        (
            dict(denoising_sigmas=[1.0, 0.5]),
            [
                "sigmas (the schedule from `denoising_sigmas`): saved [1.0, 0.9375, 0.8333, 0.0], current [1.0, 0.8333, 0.0]"
            ],
        ),
        (dict(loss_type="sde_grpo", sampler="consistency"), ["`loss_type`: saved 'arcopo', current 'sde_grpo'"]),
        (dict(num_iterations=3), ["`num_iterations`: saved 2, current 3"]),
        (dict(num_iterations=1), ["`num_iterations`: saved 2, current 1"]),  # the rollout would be dropped
        (dict(pivot_chunk=2), ["`pivot_chunk`: saved "]),
        (
            dict(num_generations=4, loss_type="sde_grpo", sampler="consistency", denoising_sigmas=[1.0, 0.5]),
            ["`num_generations`: saved 3, current 4", "`loss_type`: saved 'arcopo', current 'sde_grpo'", "sigmas"],
        ),
    ],
)
def test_a_rollout_made_with_other_settings_is_refused_naming_each(saved, tmp_path, kwargs, expected):
    checkpoint = _copy_checkpoint(saved, tmp_path)
    with safe_open(str(checkpoint / "rollout.safetensors"), framework="pt") as f:
        pivot = int(f.metadata()["pivot"])
    if kwargs.get("pivot_chunk") == pivot:
        kwargs = {**kwargs, "pivot_chunk": (pivot + 1) % 3}
    resumed = _trainer(tmp_path / "resumed", **kwargs)
    with pytest.raises(ValueError) as error:
        resumed.train(resume_from_checkpoint=str(checkpoint))
    message = str(error.value)
    assert message.startswith(f"Cannot resume from {checkpoint}: its saved rollout rollout.safetensors")
    for text in expected:
        assert text in message
    assert message.count(";") == len(expected) - 1  # every mismatch, and only those
    assert "Resume with the settings that saved it" in message and "start a fresh `output_dir`" in message
    assert resumed.state.global_step == 0 and resumed.rollout_counts["policy"] == 0  # refused before training


def test_resume_true_refuses_a_mismatched_rollout_too(saved, tmp_path):
    _copy_checkpoint(saved, tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint-1: its saved rollout .*`num_generations`: saved 3, current 4"):
        _trainer(tmp_path, num_generations=4).train(resume_from_checkpoint=True)


def test_a_crafted_rollout_with_2_states_against_3_predictions_is_refused(saved, tmp_path):
    checkpoint = _copy_checkpoint(saved, tmp_path)
    path = checkpoint / "rollout.safetensors"

    def drop_a_state(tensors):
        tensors["states"] = tensors["states"][:, :, :2].contiguous()

    _rewrite_rollout(path, drop_a_state)
    with pytest.raises(ValueError) as error:
        _trainer(tmp_path / "resumed").train(resume_from_checkpoint=str(checkpoint))
    message = str(error.value)
    assert message.startswith(f"Cannot resume from {checkpoint}: its saved rollout")
    assert "`states` has 2 denoising steps but `x0_preds` has 3" in message
    assert "`temperature` has shape [2, 3], but 2 prompts x 3 candidates x 2 steps need [2, 2]" in message
    # the trainer's own load refuses it too, whoever calls it
    with pytest.raises(
        ValueError, match=r"is not a usable rollout: `states` has 2 denoising steps but `x0_preds` has 3"
    ):
        RolloutGroup.load(str(path))


def test_a_crafted_rollout_with_pivot_99_is_refused(saved, tmp_path):
    checkpoint = _copy_checkpoint(saved, tmp_path)
    path = checkpoint / "rollout.safetensors"
    _rewrite_rollout(path, edit_metadata=lambda m: m.update(pivot="99", frame_offset=str(99 * 3)))
    with pytest.raises(ValueError) as error:
        _trainer(tmp_path / "resumed").train(resume_from_checkpoint=str(checkpoint))
    message = str(error.value)
    assert "pivot: saved 99, but the video has 3 chunks (an index in [0, 3))" in message
    assert "the prefix cache ends at token" in message  # the cache was not made for that pivot either

    _rewrite_rollout(path, edit_metadata=lambda m: m.update(pivot="2", frame_offset="1"))
    with pytest.raises(ValueError, match="pivot 2 with chunks of 3 frames does not start at frame 1"):
        RolloutGroup.load(str(path))


def test_a_rollout_saved_without_settings_is_checked_on_its_tensors(saved, tmp_path, caplog):
    checkpoint = _copy_checkpoint(saved, tmp_path)
    _rewrite_rollout(checkpoint / "rollout.safetensors", edit_metadata=lambda m: m.pop("settings"))
    # what the tensors tell is still checked: the group size, the batch, the schedule
    with pytest.raises(ValueError, match=r"`num_generations`: saved 3, current 4"):
        _trainer(tmp_path / "other", num_generations=4).train(resume_from_checkpoint=str(checkpoint))
    with pytest.raises(ValueError, match=r"`per_device_train_batch_size`: saved 2, current 1"):
        _trainer(tmp_path / "other", per_device_train_batch_size=1).train(resume_from_checkpoint=str(checkpoint))
    # the same settings resume, with a warning naming what could not be checked
    resumed = _trainer(tmp_path / "resumed")
    with caplog.at_level(logging.WARNING, logger="trl_arcopo"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 2
    assert "was saved before rollouts recorded their settings" in caplog.text and "`loss_type`" in caplog.text


# ---------------------------------------------------------------- the moving average of the adapter
@pytest.fixture(scope="module")
def saved_ema(tmp_path_factory):
    """A run with an EMA saved at every step (`num_iterations=1`: no rollout files)."""
    out = tmp_path_factory.mktemp("saved_ema")
    _trainer(out, ema_decay=0.9, num_iterations=1, save_strategy="steps", save_steps=1).train()
    return out


def _ema_trainer(output_dir, **kwargs):
    return _trainer(output_dir, ema_decay=0.9, num_iterations=1, **kwargs)


def test_an_ema_with_a_first_dimension_of_1_is_refused_not_broadcast(saved_ema, tmp_path):
    checkpoint = _copy_checkpoint(saved_ema, tmp_path, step=2)
    ema = load_file(str(checkpoint / EMA_FILE))
    name = next(k for k, v in ema.items() if v.shape[0] > 1)
    shape = list(ema[name].shape)
    ema[name] = ema[name][:1].contiguous()
    save_file(ema, str(checkpoint / EMA_FILE))
    resumed = _ema_trainer(tmp_path / "resumed")
    before = {k: v.clone() for k, v in resumed.ema.shadow.items()}
    with pytest.raises(ValueError) as error:
        resumed.train(resume_from_checkpoint=str(checkpoint))
    message = str(error.value)
    assert (
        f"{EMA_FILE} does not match the adapter ({name} has shape {[1, *shape[1:]]}, the parameter {shape})" in message
    )
    assert "resume with the adapter configuration (`peft_config`) that saved it" in message
    assert all(torch.equal(before[k], v) for k, v in resumed.ema.shadow.items())  # nothing was copied in


def test_a_nonfinite_ema_is_refused_on_load(saved_ema, tmp_path):
    checkpoint = _copy_checkpoint(saved_ema, tmp_path, step=2)
    ema = load_file(str(checkpoint / EMA_FILE))
    save_file({k: torch.full_like(v, float("nan")) for k, v in ema.items()}, str(checkpoint / EMA_FILE))
    trainer = _ema_trainer(tmp_path / "direct")
    with pytest.raises(ValueError, match=rf"{EMA_FILE} is not finite \(.* and \d+ more hold NaN .*earlier checkpoint"):
        trainer.ema.load(str(checkpoint))
    assert all(torch.isfinite(v).all() for v in trainer.ema.shadow.values())


def test_resume_never_uses_a_checkpoint_whose_ema_is_not_finite(saved_ema, tmp_path, caplog):
    for step in (1, 2):
        _copy_checkpoint(saved_ema, tmp_path, step=step)
    path = tmp_path / "checkpoint-2" / EMA_FILE
    ema = load_file(str(path))
    name = min(ema)
    ema[name][0, 0] = float("inf")
    save_file(ema, str(path))
    # a path is refused, naming the file and the tensor
    with pytest.raises(
        ValueError, match=rf"Cannot resume from .*checkpoint-2: its EMA {EMA_FILE} is not finite \({name}"
    ):
        _ema_trainer(tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    # `True` skips it, with a warning saying why, and resumes from the one before
    resumed = _ema_trainer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="trl_arcopo"):
        resumed.train(resume_from_checkpoint=True)
    assert f"Resuming from {tmp_path}/checkpoint-1;" in caplog.text and "is not finite" in caplog.text
    assert resumed.state.global_step == 2 and all(torch.isfinite(v).all() for v in resumed.ema.shadow.values())


class PoisonEMA(TrainerCallback):
    """Makes the EMA NaN after optimizer step `step` (after its update: callbacks run in the order added)."""

    def __init__(self, trainer, step):
        self.trainer, self.step = trainer, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            for value in self.trainer.ema.shadow.values():
                value.fill_(float("nan"))


def test_a_nonfinite_ema_is_not_saved_and_its_checkpoint_stays_incomplete(tmp_path, caplog):
    trainer = _ema_trainer(tmp_path, save_strategy="steps", save_steps=1)
    trainer.add_callback(PoisonEMA(trainer, step=2))
    with pytest.raises(
        RuntimeError, match=r"moving average of the adapter .* is not finite .*checkpoint-2 is left inc"
    ):
        trainer.train()
    assert not os.path.exists(tmp_path / "checkpoint-2" / "trainer_state.json")
    assert not os.path.exists(tmp_path / "checkpoint-2" / EMA_FILE)
    # the final save names the average, not the learning rate
    with pytest.raises(RuntimeError, match=r"moving average of the adapter \(`ema_decay`\) is not finite"):
        trainer.save_model(str(tmp_path / "final"))
    resumed = _ema_trainer(tmp_path)
    with caplog.at_level(logging.WARNING, logger="trl_arcopo"):
        resumed.train(resume_from_checkpoint=True)
    assert f"Resuming from {tmp_path}/checkpoint-1;" in caplog.text
    assert all(torch.isfinite(v).all() for v in resumed.ema.shadow.values())
