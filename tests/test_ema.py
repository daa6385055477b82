"""The moving average of the adapter: its closed form, exact resume with it on, and which weights are saved."""

import os

import pytest
import torch
from helpers import redness, tiny_trainer
from test_reliability import RecordAdapter

from trl_arcopo.ema import EMA_FILE
from trl_arcopo.lora_files import load_lora_adapter_weights


def _trainer(output_dir, **kwargs):
    return tiny_trainer(output_dir, reward_funcs=(redness,), **{"max_steps": 3, "num_iterations": 1, **kwargs})


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_average_follows_its_closed_form(tmp_path):
    decay = 0.5
    trainer = _trainer(tmp_path, ema_decay=decay)
    record = RecordAdapter(trainer)
    trainer.add_callback(record)
    trainer.train()
    # ema_s = decay^s θ_0 + Σ_{k=1..s} (1 - decay) decay^(s-k) θ_k, in float32
    states = record.states
    for name in states[0]:
        expected = decay**3 * states[0][name].float() + sum(
            (1 - decay) * decay ** (3 - k) * states[k][name].float() for k in (1, 2, 3)
        )
        assert torch.allclose(trainer.ema.shadow[name], expected, rtol=0, atol=1e-6)
    assert not _equal(trainer.ema.state_dict(), {k: v.float() for k, v in trainer.adapter_state_dict().items()})


def test_resume_with_ema_is_exact(tmp_path):
    kwargs = dict(ema_decay=0.9, max_steps=4, num_iterations=2)
    straight = _trainer(tmp_path / "straight", **kwargs)
    straight.train()
    saving = _trainer(tmp_path / "saving", save_strategy="steps", save_steps=1, **kwargs)
    saving.train()
    assert _equal(straight.ema.state_dict(), saving.ema.state_dict())
    for step in (1, 2, 3):
        assert os.path.isfile(tmp_path / "saving" / f"checkpoint-{step}" / EMA_FILE)
        resumed = _trainer(tmp_path / f"resumed-{step}", **kwargs)
        resumed.train(resume_from_checkpoint=str(tmp_path / "saving" / f"checkpoint-{step}"))
        assert _equal(straight.adapter_state_dict(), resumed.adapter_state_dict()), step
        assert _equal(straight.ema.state_dict(), resumed.ema.state_dict()), step
    # a checkpoint without its EMA cannot resume this run exactly
    os.remove(tmp_path / "saving" / "checkpoint-2" / EMA_FILE)
    resumed = _trainer(tmp_path / "resumed-missing", **kwargs)
    with pytest.raises(ValueError, match=rf"EMA of the adapter .*{EMA_FILE} is missing"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "saving" / "checkpoint-2"))


@pytest.mark.parametrize("use_ema_weights", [True, False])
def test_saved_model_holds_the_average_and_checkpoints_the_last_weights(tmp_path, use_ema_weights):
    trainer = _trainer(tmp_path, ema_decay=0.5, use_ema_weights=use_ema_weights, save_strategy="steps", save_steps=3)
    trainer.train()
    live = {k: v.clone() for k, v in trainer.adapter_state_dict().items()}
    trainer.save_model(str(tmp_path / "final"))
    assert _equal(live, trainer.adapter_state_dict())  # saving swaps the average in and back out

    def loaded(folder):
        fresh = _trainer(tmp_path / "fresh", ema_decay=0.5)
        load_lora_adapter_weights(fresh.accelerator.unwrap_model(fresh.model), str(folder), fresh.adapter_name)
        return fresh.adapter_state_dict()

    ema = {k: v.to(live[k].dtype) for k, v in trainer.ema.state_dict().items()}
    assert _equal(loaded(tmp_path / "final"), ema if use_ema_weights else live)
    assert _equal(loaded(tmp_path / "checkpoint-3"), live)
