"""The loss registry (`trl_arcopo.loss.register_loss`): a new loss is one registration, read by the config, the
rollout, the update and the planner."""

import pytest
import torch
from helpers import tiny_trainer

from trl_arcopo.loss import LOSS_STRATEGIES, LossStats, LossStrategy, get_loss_strategy, register_loss
from trl_arcopo.planning import RunSettings


CALLS = []


def _best_of_group_loss(anchors, x0_theta, x0_old, args):
    """Pull each anchor's prediction toward the old prediction of its group's best candidate."""
    CALLS.append(
        dict(step=anchors.step, theta=x0_theta.shape, old=x0_old.shape, temperature=anchors.group.temperature)
    )
    best = anchors.group.advantages.argmax(dim=1)  # [N]
    target = x0_old[torch.arange(best.shape[0]), best].float()  # [N, C, Fc, H, W]
    loss = (x0_theta.float() - target[:, None]).pow(2).mean()
    one, zero = torch.ones(()), torch.zeros(())
    return loss, LossStats(one, one, one, zero, zero)


@pytest.fixture
def best_of_group():
    CALLS.clear()
    strategy = register_loss(
        LossStrategy(
            "best_of_group",
            _best_of_group_loss,
            trains_last_step=False,
            temperature=lambda x0_preds, args: torch.full((x0_preds.shape[0], x0_preds.shape[2]), 2.0),
        )
    )
    yield strategy
    del LOSS_STRATEGIES[strategy.name]


def test_a_registered_loss_trains_with_its_steps_and_temperature(tmp_path, best_of_group):
    trainer = tiny_trainer(tmp_path, loss_type="best_of_group", max_steps=2, num_iterations=1)
    before = {n: p.detach().clone() for n, p in trainer.adapter_state_dict().items()}
    trainer.train()
    after = trainer.adapter_state_dict()
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the new loss trained the adapter
    args, steps = trainer.args, len(trainer.args.denoising_sigmas)
    # 2 optimizer steps of one update (both prompts' groups in one batch), each ran the loss at every step but the last
    assert sorted({c["step"] for c in CALLS}) == list(range(steps - 1))
    assert len(CALLS) == 2 * (steps - 1)
    n, k, g = args.per_device_train_batch_size, args.num_anchors, args.num_generations
    assert all(c["theta"][:2] == (n, k) and c["old"][:2] == (n, g) for c in CALLS)
    assert all(torch.equal(c["temperature"], torch.full((n, steps), 2.0)) for c in CALLS)  # the loss's own


def test_the_planner_and_the_errors_read_the_registry(tmp_path, best_of_group):
    settings = RunSettings(loss_type="best_of_group", num_denoising_steps=4)
    assert settings.trained_steps == (0, 1, 2)  # it cannot train the last step
    with pytest.raises(ValueError, match="already registered"):
        register_loss(best_of_group)
    with pytest.raises(ValueError, match="`loss_type='dpo'` is not a registered loss.*'best_of_group'.*register_loss"):
        get_loss_strategy("dpo")
    with pytest.raises(ValueError, match="`loss_type='best_of_group'` cannot train the last.*at least 2"):
        RunSettings(loss_type="best_of_group", num_denoising_steps=1)
    unknown = register_loss(LossStrategy("wander", _best_of_group_loss, exploration="wander"))
    try:  # refused when the trainer is built, before any rollout
        with pytest.raises(ValueError, match="`loss_type='wander'` explores with 'wander'.*'neighbors', 'sde'"):
            tiny_trainer(tmp_path, loss_type="wander")
    finally:
        del LOSS_STRATEGIES[unknown.name]
