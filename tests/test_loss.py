import math

import pytest
import torch

from trl_arcopo.loss import LossStats, arcopo_loss, group_advantages, sde_grpo_loss, sde_transition_log_prob


# ---------------------------------------------------------------------------------------------------- advantages
REWARDS = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 4.0, 4.0]])
# group 0: mean 3, centered [-2, -1, 0, 3], population variance 14 / 4 = 3.5
# group 1: mean 2, centered [-2, -2, 2, 2], population std 2
# batch: mean 2.5, squared deviations sum to 32, population variance 32 / 8 = 4 -> std 2
CENTERED = [[-2.0, -1.0, 0.0, 3.0], [-2.0, -2.0, 2.0, 2.0]]


def _assert_rows(actual, expected, atol=1e-6):
    assert actual.shape == (len(expected), len(expected[0]))
    assert torch.allclose(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_group_advantages_closed_forms():
    eps = 1e-4
    group = group_advantages(REWARDS, "group", eps=eps)
    _assert_rows(group, [[c / (math.sqrt(3.5) + eps) for c in CENTERED[0]], [c / (2 + eps) for c in CENTERED[1]]])
    batch = group_advantages(REWARDS, "batch", eps=eps)
    _assert_rows(batch, [[c / (2 + eps) for c in row] for row in CENTERED])
    none = group_advantages(REWARDS, "none")
    _assert_rows(none, CENTERED)
    assert group.dtype == torch.float32
    assert group_advantages(REWARDS.long(), "none").dtype == torch.float32
    assert group_advantages(REWARDS.double()).dtype == torch.float64
    for adv in (group, batch, none):
        assert torch.allclose(adv.sum(dim=1), torch.zeros(2), atol=1e-6)


def test_group_advantages_quasi_norm():
    eps = 1e-4
    # p = 2 is the population standard deviation, whatever `scale_rewards` says
    assert torch.allclose(group_advantages(REWARDS, "none", quasi_norm_p=2.0), group_advantages(REWARDS, "group"))
    adv = group_advantages(REWARDS, "group", quasi_norm_p=0.8, eps=eps)
    # group 0: (mean |c|^0.8)^(1 / 0.8) = ((2^0.8 + 1 + 0 + 3^0.8) / 4)^1.25 ~= 1.3713
    scale0 = ((2**0.8 + 1.0 + 0.0 + 3**0.8) / 4) ** 1.25
    assert abs(scale0 - 1.3713) < 1e-3
    # group 1: |c| = 2 everywhere, so the quasi-norm scale is exactly 2
    _assert_rows(adv, [[c / (scale0 + eps) for c in CENTERED[0]], [c / (2 + eps) for c in CENTERED[1]]])
    assert torch.allclose(adv.sum(dim=1), torch.zeros(2), atol=1e-6)


def test_group_advantages_constant_group_is_exactly_zero():
    # in float32, 0.9 - mean([0.9, 0.9, 0.9]) is 6e-8, not 0: the zeros must not come from `r - mean` alone
    rewards = torch.tensor([[0.9, 0.9, 0.9], [0.7, 0.7, 0.7], [1.0, 2.0, 3.0]])
    for kwargs in ({"scale_rewards": "group"}, {"scale_rewards": "batch"}, {"quasi_norm_p": 0.8}):
        adv = group_advantages(rewards, **kwargs)
        assert torch.isfinite(adv).all()
        assert torch.equal(adv[:2], torch.zeros(2, 3))
        assert (adv[2] != 0).sum() == 2


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="at least 2 candidates"):
        group_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"2-D.*\(4,\)"):
        group_advantages(torch.ones(4))
    with pytest.raises(ValueError, match="NaN or infinite"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="NaN or infinite"):
        group_advantages(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(REWARDS, "std")
    with pytest.raises(ValueError, match="quasi_norm_p"):
        group_advantages(REWARDS, quasi_norm_p=3.0)


# ---------------------------------------------------------------------------------------------------- AR-CoPO
# one problem (P = 1), G = 3 candidates with 2-element predictions, K = 2 anchors (candidates 0 and 2)
OLD = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]
ANCHORS = [0, 2]
ADV = [1.0, -0.25, -0.75]
# current predictions: the anchors' stored predictions moved by hand
THETA = [[0.3, 0.1], [0.2, 1.6]]


def _log_softmax(values):
    top = max(values)
    log_norm = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_norm for v in values]


def _reference(theta, old, anchors, adv, epsilon, tau=1.0, reduction="mean", clip=True):
    """Loss, d(loss)/d(theta) and clip count of one problem, with explicit loops over anchors and candidates."""
    size, num_anchors, num_candidates = len(old[0]), len(anchors), len(old)
    scale = 1.0 / size if reduction == "mean" else 1.0

    def dist(a, b):
        return scale * sum((x - y) ** 2 for x, y in zip(a, b, strict=True))

    total, clipped, grads, ratios = 0.0, 0, [], []
    for k, anchor in enumerate(anchors):
        d = [dist(theta[k], o) for o in old]
        d_old = [dist(old[anchor], o) for o in old]
        log_pi = _log_softmax([-x / tau for x in d])
        log_pi_old = _log_softmax([-x / tau for x in d_old])
        pi = [math.exp(x) for x in log_pi]
        # gradient of d_i with respect to theta[k]
        grad_d = [[2 * scale * (theta[k][e] - old[i][e]) for e in range(size)] for i in range(num_candidates)]
        grad_k = [0.0] * size
        for i in range(num_candidates):
            ratio = math.exp(log_pi[i] - log_pi_old[i])
            ratios.append(ratio)
            lo, hi = 1 - epsilon, 1 + epsilon
            is_clipped = clip and ((ratio > hi and adv[i] > 0) or (ratio < lo and adv[i] < 0))
            clipped += (ratio > hi and adv[i] > 0) or (ratio < lo and adv[i] < 0)
            if is_clipped:
                total += min(max(ratio, lo), hi) * adv[i]  # a constant: no gradient
                continue
            total += ratio * adv[i]
            # d ratio_i = ratio_i * d log pi_i = ratio_i * (-d d_i + sum_j pi_j d d_j) / tau
            for e in range(size):
                grad_log_pi = (-grad_d[i][e] + sum(pi[j] * grad_d[j][e] for j in range(num_candidates))) / tau
                grad_k[e] += -adv[i] * ratio * grad_log_pi / (num_anchors * num_candidates)
        grads.append(grad_k)
    return -total / (num_anchors * num_candidates), grads, clipped, ratios


def _arcopo(theta, epsilon, **kwargs):
    x0_theta = torch.tensor([theta], requires_grad=True)  # [1, K, 2]
    loss, stats = arcopo_loss(
        x0_theta, torch.tensor([OLD]), torch.tensor([ANCHORS]), torch.tensor([ADV]), epsilon, **kwargs
    )
    loss.backward()
    return loss, stats, x0_theta.grad[0]


def test_arcopo_at_old_policy_ratio_is_one():
    theta = [OLD[a] for a in ANCHORS]
    loss, stats, _ = _arcopo(theta, epsilon=1e-4)
    assert stats.ratio_min.item() == 1.0 and stats.ratio_max.item() == 1.0 and stats.ratio_mean.item() == 1.0
    assert stats.log_ratio_abs_max.item() == 0.0
    assert stats.clip_fraction.item() == 0.0
    assert abs(loss.item()) < 1e-7  # -mean(A) = 0
    # distances from anchor 0: [0, 0.5, 2]; from anchor 2: [2, 2.5, 0] -> mean 7 / 6
    assert stats.distance_mean.item() == pytest.approx(7 / 6, abs=1e-6)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_arcopo_inside_band_is_unclipped(tau):
    loss, stats, grad = _arcopo(THETA, epsilon=10.0, temperature=tau)
    expected, expected_grad, clipped, ratios = _reference(THETA, OLD, ANCHORS, ADV, epsilon=10.0, tau=tau)
    assert clipped == 0 and stats.clip_fraction.item() == 0.0
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(grad, torch.tensor(expected_grad), atol=1e-6)
    assert stats.ratio_min.item() == pytest.approx(min(ratios), abs=1e-6)
    assert stats.ratio_max.item() == pytest.approx(max(ratios), abs=1e-6)
    assert stats.ratio_mean.item() == pytest.approx(sum(ratios) / 6, abs=1e-6)
    # the loss really moved away from the old policy's 0
    assert abs(expected) > 1e-2


def test_arcopo_outside_band_is_clipped_for_both_signs():
    epsilon = 0.01
    loss, stats, grad = _arcopo(THETA, epsilon=epsilon)
    expected, expected_grad, clipped, ratios = _reference(THETA, OLD, ANCHORS, ADV, epsilon=epsilon)
    # ratios (anchor 0): [0.878, 1.185, 1.072]; (anchor 2): [1.777, 2.171, 0.799] against A = [1, -0.25, -0.75]:
    #   clipped: (anchor 2, i=0) A > 0 with ratio > 1 + eps; (anchor 2, i=2) A < 0 with ratio < 1 - eps
    #   unclipped: A > 0 with ratio < 1 - eps (anchor 0, i=0), A < 0 with ratio > 1 + eps (the three others)
    assert ratios[3] > 1 + epsilon and ratios[5] < 1 - epsilon
    assert ratios[0] < 1 - epsilon and min(ratios[1], ratios[2], ratios[4]) > 1 + epsilon
    assert clipped == 2
    assert stats.clip_fraction.item() == pytest.approx(2 / 6)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(grad, torch.tensor(expected_grad), atol=1e-6)
    # the clipped terms are constants: removing their gradient changes the result
    unclipped, unclipped_grad, _, _ = _reference(THETA, OLD, ANCHORS, ADV, epsilon=epsilon, clip=False)
    assert abs(unclipped - expected) > 1e-2
    assert not torch.allclose(grad, torch.tensor(unclipped_grad), atol=1e-3)
    # only anchor 2 has clipped terms: the gradient of anchor 0 is the unclipped one
    assert torch.allclose(grad[0], torch.tensor(unclipped_grad[0]), atol=1e-6)


def test_arcopo_without_clip_is_unclipped():
    epsilon = 0.01
    loss, stats, grad = _arcopo(THETA, epsilon=epsilon, clip=False)
    expected, expected_grad, clipped, _ = _reference(THETA, OLD, ANCHORS, ADV, epsilon=epsilon, clip=False)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(grad, torch.tensor(expected_grad), atol=1e-6)
    # nothing is clipped, but the stat reports the fraction that would have been
    assert stats.clip_fraction.item() == pytest.approx(clipped / 6) and clipped == 2
    wide, _, _ = _arcopo(THETA, epsilon=10.0)
    assert loss.item() == pytest.approx(wide.item(), abs=1e-6)


def test_arcopo_sum_reduction_closed_form():
    loss, stats, grad = _arcopo(THETA, epsilon=0.01, reduction="sum", temperature=2.0)
    expected, expected_grad, clipped, _ = _reference(THETA, OLD, ANCHORS, ADV, 0.01, tau=2.0, reduction="sum")
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(grad, torch.tensor(expected_grad), atol=1e-6)
    assert stats.clip_fraction.item() == pytest.approx(clipped / 6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_arcopo_gradient_identity_at_old_policy(reduction, tau):
    g = torch.Generator().manual_seed(0)
    num_problems, num_anchors, num_candidates = 2, 3, 4
    x0_old = torch.randn(num_problems, num_candidates, 2, 3, generator=g)  # [P, G, 2, 3]
    anchor_index = torch.tensor([[0, 2, 3], [1, 1, 0]])  # [P, K]
    assert anchor_index.shape == (num_problems, num_anchors)
    advantages = group_advantages(torch.randn(num_problems, num_candidates, generator=g))  # [P, G]
    rows = torch.arange(num_problems).unsqueeze(1)  # [P, 1]

    x0_theta = x0_old[rows, anchor_index].clone().requires_grad_()  # [P, K, 2, 3]; theta = theta_old
    loss, stats = arcopo_loss(x0_theta, x0_old, anchor_index, advantages, temperature=tau, reduction=reduction)
    (grad,) = torch.autograd.grad(loss, x0_theta)
    assert stats.ratio_min.item() == 1.0 and stats.ratio_max.item() == 1.0

    theta = x0_old[rows, anchor_index].clone().requires_grad_()  # [P, K, 2, 3]
    sq = (theta.unsqueeze(2) - x0_old.detach().unsqueeze(1)) ** 2  # [P, K, G, 2, 3]
    d = sq.mean(dim=(-2, -1)) if reduction == "mean" else sq.sum(dim=(-2, -1))  # [P, K, G]
    # loss = -J and grad J = -(1 / (G tau)) sum_i A_i grad d_i, so grad loss = +(1 / (G tau)) sum_i A_i grad d_i
    target = ((advantages.unsqueeze(1) * d).sum(dim=-1) / (num_candidates * tau)).mean()  # []
    (expected,) = torch.autograd.grad(target, theta)
    assert expected.abs().max() > 1e-2
    assert torch.allclose(grad, expected, atol=1e-6, rtol=1e-5)
    # a small gradient step lowers the loss (minimised) and pulls toward high-advantage candidates
    stepped, _ = arcopo_loss(x0_theta.detach() - 1e-2 * grad, x0_old, anchor_index, advantages, 1.0, tau, reduction)
    assert stepped.item() < loss.item()


def test_arcopo_upcasts_low_precision():
    x0_old = torch.tensor([OLD], dtype=torch.bfloat16)  # [1, G, 2]
    x0_theta = torch.tensor([THETA], dtype=torch.bfloat16, requires_grad=True)  # [1, K, 2]
    loss, _ = arcopo_loss(x0_theta, x0_old, torch.tensor([ANCHORS]), torch.tensor([ADV]), epsilon=10.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert x0_theta.grad.dtype == torch.bfloat16
    expected, _, _, _ = _reference(THETA, OLD, ANCHORS, ADV, epsilon=10.0)
    assert loss.item() == pytest.approx(expected, abs=2e-2)  # THETA is rounded to bfloat16 on input


def test_arcopo_shape_errors():
    x0_theta, x0_old = torch.zeros(2, 3, 4, 5), torch.zeros(2, 6, 4, 5)
    anchors, adv = torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 6)
    arcopo_loss(x0_theta, x0_old, anchors, adv)  # the valid call
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 5\).*\(2, 6, 4, 4\)"):
        arcopo_loss(x0_theta, torch.zeros(2, 6, 4, 4), anchors, adv)
    with pytest.raises(ValueError, match=r"\(3, 6, 4, 5\)"):
        arcopo_loss(x0_theta, torch.zeros(3, 6, 4, 5), anchors, adv)
    with pytest.raises(ValueError, match=r"\[P, K\] = \(2, 3\).*got \(2, 2\)"):
        arcopo_loss(x0_theta, x0_old, anchors[:, :2], adv)
    with pytest.raises(ValueError, match=r"\[P, G\] = \(2, 6\).*got \(2, 5\)"):
        arcopo_loss(x0_theta, x0_old, anchors, adv[:, :5])
    with pytest.raises(ValueError, match=r"G >= 2"):
        arcopo_loss(x0_theta, x0_old[:, :1], anchors, adv[:, :1])
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        arcopo_loss(x0_theta, x0_old, anchors + 6, adv)
    with pytest.raises(ValueError, match="integer"):
        arcopo_loss(x0_theta, x0_old, anchors.float(), adv)
    with pytest.raises(ValueError, match="reduction"):
        arcopo_loss(x0_theta, x0_old, anchors, adv, reduction="max")
    with pytest.raises(ValueError, match="temperature"):
        arcopo_loss(x0_theta, x0_old, anchors, adv, temperature=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        arcopo_loss(x0_theta, x0_old, anchors, adv, epsilon=-0.1)


# ---------------------------------------------------------------------------------------------------- SDE baseline
def test_sde_transition_log_prob_matches_normal():
    g = torch.Generator().manual_seed(0)
    x0, x_next = torch.randn(3, 2, 4, 5, generator=g), torch.randn(3, 2, 4, 5, generator=g)  # [B, 2, 4, 5]
    for sigma in (0.625, torch.tensor(0.625), torch.tensor([0.25, 0.5, 0.9375])):
        s = torch.as_tensor(sigma).reshape(-1, 1, 1, 1)  # [B or 1, 1, 1, 1]
        expected = torch.distributions.Normal((1 - s) * x0, s).log_prob(x_next).mean(dim=(1, 2, 3))  # [B]
        actual = sde_transition_log_prob(x_next, x0, sigma)
        assert actual.shape == (3,) and actual.dtype == torch.float32
        assert torch.allclose(actual, expected, atol=1e-6)
    # one element by hand: x = 1, mean = (1 - 0.5) * 1 = 0.5, sigma = 0.5 -> -0.5 - log 0.5 - 0.5 log 2 pi
    single = sde_transition_log_prob(torch.ones(1, 1), torch.ones(1, 1), 0.5)
    assert single.item() == pytest.approx(-0.5 - math.log(0.5) - 0.5 * math.log(2 * math.pi), abs=1e-6)
    low = sde_transition_log_prob(x_next.bfloat16(), x0.bfloat16(), 0.625)
    assert low.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\(3, 2, 4, 5\).*\(3, 2, 4, 4\)"):
        sde_transition_log_prob(x_next, x0[..., :4], 0.5)
    with pytest.raises(ValueError, match=r"\[B\] = \[3\].*\(2,\)"):
        sde_transition_log_prob(x_next, x0, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="positive"):
        sde_transition_log_prob(x_next, x0, 0.0)


# log-ratios and advantages: each column of row 0 is one case of the PPO clip with eps = 0.1
LOG_PROB = [[0.2, -0.3, 0.2, -0.3], [0.05, 0.0, -0.05, 0.0]]
SDE_ADV = [[1.0, -1.0, -1.0, 1.0], [-2.0, 2.0, 0.5, -0.5]]


def _sde(epsilon, clip=True):
    log_prob = torch.tensor(LOG_PROB, requires_grad=True)  # [2, 4]
    old = torch.zeros(2, 4) + 0.7  # [2, 4]
    loss, stats = sde_grpo_loss(log_prob + 0.7, old, torch.tensor(SDE_ADV), epsilon, clip)
    loss.backward()
    return loss, stats, log_prob.grad


def test_sde_grpo_loss_closed_forms():
    e = math.exp
    loss, stats, grad = _sde(0.1)
    # ratio e^0.2 > 1.1 with A > 0 and e^-0.3 < 0.9 with A < 0: clipped; with the opposite signs: unclipped
    terms = [1.1, -0.9, -e(0.2), e(-0.3), -2 * e(0.05), 2.0, 0.5 * e(-0.05), -0.5]
    assert loss.item() == pytest.approx(-sum(terms) / 8, abs=1e-6)
    assert stats.clip_fraction.item() == pytest.approx(2 / 8)
    # d loss / d log_prob = -A * ratio / 8 on unclipped terms, 0 on clipped ones
    ratios = [[e(x) for x in row] for row in LOG_PROB]
    expected_grad = [
        [-a * r / 8 for a, r in zip(arow, rrow, strict=True)] for arow, rrow in zip(SDE_ADV, ratios, strict=True)
    ]
    expected_grad[0][0] = expected_grad[0][1] = 0.0
    assert torch.allclose(grad, torch.tensor(expected_grad), atol=1e-7)
    assert stats.ratio_max.item() == pytest.approx(e(0.2)) and stats.ratio_min.item() == pytest.approx(e(-0.3))
    assert stats.log_ratio_abs_max.item() == pytest.approx(0.3)
    assert stats.distance_mean is None

    unclipped, stats_u, grad_u = _sde(0.1, clip=False)
    all_terms = [a * r for arow, rrow in zip(SDE_ADV, ratios, strict=True) for a, r in zip(arow, rrow, strict=True)]
    assert unclipped.item() == pytest.approx(-sum(all_terms) / 8, abs=1e-6)
    assert torch.allclose(grad_u, -torch.tensor(SDE_ADV) * torch.tensor(ratios) / 8, atol=1e-7)
    assert stats_u.clip_fraction.item() == pytest.approx(2 / 8)

    wide, stats_w, _ = _sde(1.0)  # every ratio in (0, 2): nothing clipped
    assert wide.item() == pytest.approx(unclipped.item(), abs=1e-6) and stats_w.clip_fraction.item() == 0.0


def test_sde_grpo_loss_ratio_one_and_errors():
    log_prob = torch.tensor([[-1.3, 0.4, 2.0]], requires_grad=True)  # [1, 3]
    adv = torch.tensor([[0.5, -1.0, 0.5]])  # [1, 3]
    loss, stats = sde_grpo_loss(log_prob, log_prob.detach().clone(), adv)
    assert stats.ratio_min.item() == 1.0 and stats.ratio_max.item() == 1.0 and stats.clip_fraction.item() == 0.0
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, log_prob)
    assert torch.allclose(grad, -adv / 3)
    with pytest.raises(ValueError, match=r"\(1, 3\).*\(1, 2\).*\(1, 3\)"):
        sde_grpo_loss(log_prob, log_prob[:, :2].detach(), adv)


def test_loss_stats_to_dict():
    stats = LossStats(*(torch.tensor(float(i)) for i in range(5)))
    assert stats.to_dict() == {
        "ratio/mean": 0.0,
        "ratio/min": 1.0,
        "ratio/max": 2.0,
        "clip_fraction": 3.0,
        "log_ratio/abs_max": 4.0,
    }
    with_distance = LossStats(*(torch.tensor(float(i)) for i in range(6)))
    assert with_distance.to_dict(prefix="train/")["train/distance/mean"] == 5.0
    assert all(isinstance(v, float) for v in with_distance.to_dict().values())


def test_arcopo_loss_per_problem_temperature_equals_separate_calls():
    import torch

    from trl_arcopo.loss import arcopo_loss

    g = torch.Generator().manual_seed(0)
    x0_old = torch.randn(2, 4, 3, generator=g)
    x0_theta = x0_old[:, :2] + 0.1 * torch.randn(2, 2, 3, generator=g)
    anchors = torch.tensor([[0, 1], [2, 3]])
    adv = torch.tensor([[1.0, -1.0, 0.5, -0.5], [0.2, -0.2, 1.0, -1.0]])
    tau = torch.tensor([0.5, 2.0])
    loss, _ = arcopo_loss(x0_theta, x0_old, anchors, adv, epsilon=10.0, temperature=tau)
    parts = [
        arcopo_loss(x0_theta[i : i + 1], x0_old[i : i + 1], anchors[i : i + 1], adv[i : i + 1], 10.0, tau[i].item())[0]
        for i in range(2)
    ]
    assert torch.allclose(loss, sum(parts) / 2)


def test_huge_log_ratio_gives_a_finite_zero_gradient_not_nan():
    # exp(150) overflows float32: without the cap, inf times the zero gradient of the unselected branch is NaN
    for advantage in (1.0, -1.0):
        log_prob = torch.tensor([150.0, 0.0], requires_grad=True)
        loss, stats = sde_grpo_loss(log_prob, torch.zeros(2), torch.tensor([advantage, 0.0]), epsilon=0.2)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(log_prob.grad).all()
        assert log_prob.grad[0] == 0  # a capped (or clipped) term carries no gradient
        assert stats.log_ratio_abs_max == 150.0 and torch.isfinite(stats.ratio_max)


def test_two_sided_clip_caps_negative_advantage_terms_at_delta():
    old = torch.zeros(2)
    advantages = torch.tensor([-1.0, -1.0])
    log_prob = torch.log(torch.tensor([5.0, 2.0])).requires_grad_()
    # one-sided: -mean(min(ρA, clip(ρ)A)) = mean(ρ) for A = -1, gradient ρ / 2 per term
    loss, _ = sde_grpo_loss(log_prob, old, advantages, epsilon=0.2)
    loss.backward()
    assert loss.item() == pytest.approx((5 + 2) / 2)
    assert log_prob.grad.tolist() == pytest.approx([2.5, 1.0])
    # two-sided with delta = 3: the first term is the constant 3 (no gradient), the second (ρ = 2 < 3) is unchanged
    log_prob.grad = None
    loss, _ = sde_grpo_loss(log_prob, old, advantages, epsilon=0.2, delta=3.0)
    loss.backward()
    assert loss.item() == pytest.approx((3 + 2) / 2)
    assert log_prob.grad.tolist() == pytest.approx([0.0, 1.0])
    with pytest.raises(ValueError, match="delta=1.1"):
        sde_grpo_loss(log_prob, old, advantages, epsilon=0.2, delta=1.1)
