import os

import pytest
import torch
from helpers import LORA, redness, tiny_trainer
from peft import LoraConfig
from transformers import TrainerCallback

from trl_arcopo import ARCoPOConfig
from trl_arcopo.replay_buffer import ReplayBuffer
from trl_arcopo.testing_utils import tiny_pipeline


SEMI = dict(training_mode="semi_on_policy", replay_buffer_size=4, max_steps=4, per_device_train_batch_size=4)


def _trainer(output_dir, pipe=None, reward_funcs=(redness,), **kwargs):
    return tiny_trainer(output_dir, pipe=pipe, reward_funcs=reward_funcs, **{**SEMI, **kwargs})


def _history(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h]


def _adapter(transformer, name):
    return {k: v.detach().clone() for k, v in transformer.named_parameters() if f".{name}." in k}


def test_semi_on_policy_trains_only_the_semi_adapter_from_reference_rollouts(tmp_path):
    pipe = tiny_pipeline()
    # an on-policy adapter from an earlier run, loaded next to the one being trained: it must stay untouched
    pipe.transformer.add_adapter(LoraConfig(**LORA, init_lora_weights=False), adapter_name="on_policy")
    on_policy_before = _adapter(pipe.transformer, "on_policy")
    base_before = {k: v.clone() for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    trainer = _trainer(tmp_path, pipe=pipe, max_steps=6)
    assert trainer.adapter_name == "semi"
    semi_before = _adapter(pipe.transformer, "semi")
    assert semi_before and all(not v.any() for k, v in semi_before.items() if "lora_B" in k)  # zero init
    trainer.train()

    # the buffer was rolled out once by the reference; the current policy never was
    assert trainer.rollout_counts == {"policy": 0, "reference": 4, "eval": 0}
    assert len(trainer.replay_buffer) == 4 and os.path.exists(tmp_path / "replay_buffer.pt")
    assert _history(trainer, "buffer/groups") == [4.0]
    memory, disk = _history(trainer, "buffer/memory_mb")[0], _history(trainer, "buffer/disk_mb")[0]
    assert 0 < memory <= disk < 1.1 * memory + 0.05  # entries are compact copies, not views of whole rollouts

    # the first step draws all 4 groups with the adapter at zero: the ratio is exactly 1 on every one of them
    assert _history(trainer, "ratio/min")[0] == 1.0 and _history(trainer, "ratio/max")[0] == 1.0
    assert _history(trainer, "clip_fraction")[0] == 0.0
    # later steps move the policy away from the reference and the clip (the trust region) engages
    assert max(_history(trainer, "ratio/max")[1:]) > 1.0
    assert max(_history(trainer, "clip_fraction")[1:]) > 0

    for name, value in _adapter(pipe.transformer, "semi").items():
        assert not torch.equal(value, semi_before[name]), f"{name} did not change"
    for name, value in _adapter(pipe.transformer, "on_policy").items():
        assert torch.equal(value, on_policy_before[name]), f"{name} changed"
    for name, value in pipe.transformer.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, base_before[name]), f"{name} changed"


def test_semi_on_policy_resume_equals_uninterrupted(tmp_path):
    straight = _trainer(tmp_path / "a", per_device_train_batch_size=2)
    straight.train()

    first = _trainer(tmp_path / "b", per_device_train_batch_size=2, save_strategy="steps", save_steps=2)

    class Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 2
            return control

    first.add_callback(Stop())
    first.train()
    checkpoint = tmp_path / "b" / "checkpoint-2"
    assert (checkpoint / "replay_buffer.pt").exists()
    # the checkpoint's copy is what a resume reads: remove the collection file to prove it
    os.remove(tmp_path / "b" / "replay_buffer.pt")
    resumed = _trainer(tmp_path / "b", per_device_train_batch_size=2)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.rollout_counts["reference"] == 0  # restored, not collected again
    expected, got = straight.adapter_state_dict(), resumed.adapter_state_dict()
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_replay_buffer_path_is_reused_and_checked(tmp_path):
    path = str(tmp_path / "buffers" / "reference.pt")
    first = _trainer(tmp_path / "a", max_steps=1, replay_buffer_path=path)
    first.train()
    assert first.rollout_counts["reference"] == 4 and os.path.exists(path)
    stored = ReplayBuffer.load(path)
    assert [e.prompt for e in stored.entries] == [e.prompt for e in first.replay_buffer.entries]

    second = _trainer(tmp_path / "b", max_steps=1, replay_buffer_path=path)
    second.train()
    assert second.rollout_counts == {"policy": 0, "reference": 0, "eval": 0}

    # a buffer made with another group size is refused with the fix, before any update
    other = _trainer(tmp_path / "c", max_steps=1, replay_buffer_path=path, num_generations=4)
    with pytest.raises(ValueError, match="replay buffer .*reference.pt.*collected with.*replay_buffer_path"):
        other.train()


def test_buffer_without_reward_spread_fails_with_the_fix_and_keeps_the_file(tmp_path):
    def constant(prompts, videos, **kwargs):
        return [1.0] * len(prompts)

    trainer = _trainer(tmp_path, max_steps=1, reward_funcs=[constant])
    with pytest.raises(ValueError, match="equal rewards.*replay_buffer_size.*num_generations"):
        trainer.train()
    assert len(ReplayBuffer.load(str(tmp_path / "replay_buffer.pt"))) == 4  # the collected rollouts are not lost


def test_mode_config_errors_and_unsafe_no_clip_warning(tmp_path):
    with pytest.raises(ValueError, match="training_mode='offline'"):
        ARCoPOConfig("out", training_mode="offline", use_cpu=True)
    with pytest.raises(ValueError, match="replay_buffer_size=0"):
        ARCoPOConfig("out", replay_buffer_size=0, use_cpu=True)
    with pytest.raises(ValueError, match="delta=1.0` must exceed 1 \\+ epsilon"):
        ARCoPOConfig("out", delta=1.0, use_cpu=True)
    with pytest.warns(UserWarning, match="ratio_clip=False.*ablation"):
        ARCoPOConfig("out", ratio_clip=False, use_cpu=True)


def test_off_policy_ablation_without_clip_leaves_the_trust_region(tmp_path):
    clipped = _trainer(tmp_path / "clip", max_steps=6)
    clipped.train()
    with pytest.warns(UserWarning, match="ratio_clip=False"):
        unclipped = _trainer(tmp_path / "no-clip", ratio_clip=False, max_steps=6)
    unclipped.train()
    # same buffer, same draws: only the clip differs, and without it the ratio runs further from 1
    assert _history(unclipped, "ratio/min")[0] == 1.0 == _history(unclipped, "ratio/max")[0]
    far = [max(_history(t, "log_ratio/abs_max")[1:]) for t in (clipped, unclipped)]
    assert far[1] > far[0]
