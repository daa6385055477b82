"""
The trainer as wiring: a loss variant is one override, the micro-steps of one optimizer step draw their own noise,
`save_model` writes the model card next to the adapter, and the public building blocks are exported.
"""

import threading

import pytest
import torch
from helpers import PROMPTS, redness, tiny_trainer

from trl_arcopo import ARCoPOTrainer


def _trainer(output_dir, cls=ARCoPOTrainer, reward_funcs=(redness,), prompts=PROMPTS, **kwargs):
    return tiny_trainer(output_dir, cls=cls, reward_funcs=reward_funcs, prompts=prompts, **kwargs)


class ZeroLossTrainer(ARCoPOTrainer):
    """A loss variant in a few lines: a loss with zero gradient, counted per call."""

    calls = 0

    def _compute_loss(self, inputs, x0_theta, x0_old, x0_ref):
        type(self).calls += 1
        assert x0_theta.shape[:2] == inputs.anchor_index.shape and x0_old.shape[1] == inputs.group.num_generations
        return 0.0 * x0_theta.sum()


def test_a_loss_variant_is_one_override(tmp_path):
    trainer = _trainer(tmp_path, cls=ZeroLossTrainer, max_steps=2, num_iterations=2)
    before = {k: v.clone() for k, v in trainer.adapter_state_dict().items()}
    trainer.train()
    # 2 optimizer steps x 3 trained denoising steps, the variant alone decides the gradient (zero: no update)
    assert ZeroLossTrainer.calls == 2 * 3
    assert all(torch.equal(before[k], v) for k, v in trainer.adapter_state_dict().items())
    default = _trainer(tmp_path / "default", max_steps=2, num_iterations=2)
    default.train()
    assert any(not torch.equal(before[k], v) for k, v in default.adapter_state_dict().items())


def test_micro_steps_of_one_optimizer_step_draw_their_own_noise(tmp_path):
    seen = []

    def recording(prompts, videos, **kwargs):
        seen.append(videos.clone())
        return redness(prompts, videos)

    # one prompt twice: the two micro-steps of the optimizer step roll out the same prompt
    trainer = _trainer(
        tmp_path, reward_funcs=[recording], prompts=["a red fox jumps"] * 2, per_device_train_batch_size=1,
        gradient_accumulation_steps=2, num_iterations=1, max_steps=1,
    )  # fmt: skip
    trainer.train()
    assert len(seen) == 2
    assert not torch.equal(seen[0], seen[1])  # keyed on the micro-step, not on the optimizer step


def test_resume_with_gradient_accumulation_equals_uninterrupted(tmp_path):
    kwargs = dict(gradient_accumulation_steps=2, num_iterations=2, max_steps=3, per_device_train_batch_size=1)
    straight = _trainer(tmp_path / "straight", **kwargs)
    straight.train()
    saving = _trainer(tmp_path / "saving", save_strategy="steps", save_steps=1, **kwargs)
    saving.train()
    resumed = _trainer(tmp_path / "resumed", **kwargs)
    resumed.train(resume_from_checkpoint=str(tmp_path / "saving" / "checkpoint-1"))
    expected, got = straight.adapter_state_dict(), resumed.adapter_state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("folder", [None, "elsewhere"])
def test_save_model_writes_the_model_card_next_to_the_adapter(tmp_path, folder):
    trainer = _trainer(tmp_path / "run", max_steps=1)  # save_strategy="no": no checkpoint ever wrote a card
    trainer.train()
    target = tmp_path / "run" if folder is None else tmp_path / folder
    trainer.save_model(None if folder is None else str(target))
    assert (target / "pytorch_lora_weights.safetensors").exists()
    card = (target / "README.md").read_text()
    assert "load_lora_weights" in card and "arcopo" in card


def test_building_blocks_are_exported():
    import trl_arcopo
    from trl_arcopo.merging import combine_adapters
    from trl_arcopo.rollout import RolloutSpec, sample_group
    from trl_arcopo.rollout_group import AnchorBatch, RolloutGroup

    assert trl_arcopo.combine_adapters is combine_adapters
    assert trl_arcopo.sample_group is sample_group and trl_arcopo.RolloutGroup is RolloutGroup
    assert trl_arcopo.RolloutSpec is RolloutSpec and trl_arcopo.AnchorBatch is AnchorBatch


class EventTrainer(ARCoPOTrainer):
    """Records when each rollout starts and when its rewards are collected."""

    def _start_rollout(self, inputs, mode, generator=None):
        self.events.append(("rollout", inputs[0]["prompt"]))
        return super()._start_rollout(inputs, mode, generator)

    def _finish_group(self, group, *args):
        self.events.append(("rewards", group.prompts[0]))
        return super()._finish_group(group, *args)


def test_async_rewards_equal_sync_overlap_the_next_rollout_and_log_per_reward_timings(tmp_path):
    def brightness(prompts, videos, **kwargs):
        threads.append(threading.current_thread().name)
        return videos.mean(dim=(1, 2, 3, 4)).tolist()

    kwargs = dict(
        cls=EventTrainer, reward_funcs=(redness, brightness), per_device_train_batch_size=1, num_iterations=1,
        gradient_accumulation_steps=2, max_steps=2, logging_steps=1,
    )  # fmt: skip
    runs = {}
    for mode in ("sync", "async"):
        threads = []
        trainer = _trainer(tmp_path / mode, async_rewards=mode == "async", **kwargs)
        trainer.events = []
        trainer.train()
        runs[mode] = trainer, threads
    (sync, sync_threads), (asynchronous, async_threads) = runs["sync"], runs["async"]
    expected, got = sync.adapter_state_dict(), asynchronous.adapter_state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert sync.reward_func_names == asynchronous.reward_func_names == ["redness", "brightness"]
    assert sync_threads == ["MainThread"] * 4 and all(name.startswith("reward") for name in async_threads)
    # within an optimizer step, the second rollout starts before the first one's rewards are collected
    order = [kind for kind, _ in sync.events]
    assert order == ["rollout", "rewards"] * 4
    assert [kind for kind, _ in asynchronous.events] == ["rollout", "rollout", "rewards", "rewards"] * 2
    assert sorted(asynchronous.events) == sorted(sync.events)
    for trainer in (sync, asynchronous):
        logged = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert len(logged) == 2
        assert all(entry["timing/rewards/redness"] >= 0 and "timing/rewards/brightness" in entry for entry in logged)
    assert [e["reward"] for e in asynchronous.state.log_history if "loss" in e] == [
        e["reward"] for e in sync.state.log_history if "loss" in e
    ]


class PivotZeroTrainer(ARCoPOTrainer):
    """Another exploration in one override: every group forks at the first chunk."""

    pivots = []

    def sample_rollouts(self, prompts, prompt_embeds, generator, branches=None):
        from trl_arcopo.rollout import sample_group

        args = self.args
        group = sample_group(
            self.pipeline, self.spec, prompts, prompt_embeds, args.num_generations, generator, pivot=0,
            branches=branches,
        )  # fmt: skip
        type(self).pivots.append(group.pivot)
        return group


def test_training_rollouts_go_through_sample_rollouts(tmp_path):
    trainer = _trainer(tmp_path, cls=PivotZeroTrainer, max_steps=2, num_iterations=1)
    trainer.train()
    assert PivotZeroTrainer.pivots == [0, 0]  # one rollout per optimizer step, both from the override
    assert trainer.generate_and_score([{"prompt": "a red fox jumps"}]).pivot == 0
