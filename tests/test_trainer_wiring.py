"""
The trainer as wiring: a loss variant is one override, the micro-steps of one optimizer step draw their own noise,
`save_model` writes the model card next to the adapter, and the public building blocks are exported.
"""

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
    from trl_arcopo.rollout import AnchorBatch, RolloutGroup, RolloutSpec, sample_group

    assert trl_arcopo.combine_adapters is combine_adapters
    assert trl_arcopo.sample_group is sample_group and trl_arcopo.RolloutGroup is RolloutGroup
    assert trl_arcopo.RolloutSpec is RolloutSpec and trl_arcopo.AnchorBatch is AnchorBatch
