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
Group advantages and policy losses of AR-CoPO (Neighbor-GRPO surrogate policy over clean predictions) and of the
SDE-likelihood baseline (Flow-GRPO / DanceGRPO), as pure functions; and the registry of loss strategies
([`LossStrategy`]), where `ARCoPOConfig.loss_type` finds each loss with what training it needs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch


if TYPE_CHECKING:
    from .rollout_group import AnchorBatch


SCALE_REWARDS = ("group", "batch", "none")
DISTANCE_REDUCTIONS = ("mean", "sum")
#: How several reward functions become one reward (`rewards.combine_rewards`), as TRL's `multi_objective_aggregation`.
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def check_aggregation(aggregation: str, name: str = "aggregation") -> None:
    """Refuse an unknown way of combining rewards, naming the field `name` and the choices."""
    if aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
        raise ValueError(f"`{name}={aggregation!r}` is not one of {MULTI_OBJECTIVE_AGGREGATIONS}.")


# ---------------------------------------------------------------------------------------------------- temperature
def median_pairwise_distance(x0: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """
    Median squared distance between the predictions of different candidates: `x0` `[N, G, T, *]` -> `[N, T]`. It
    depends only on the stored (old) predictions, so it is constant during an update.
    """
    n, g, t = x0.shape[:3]
    flat = x0.float().transpose(1, 2).reshape(n * t, g, -1)  # [N * T, G, D]
    d = torch.cdist(flat, flat).pow(2)  # [N * T, G, G]
    if reduction == "mean":
        d = d / flat.shape[-1]
    off_diagonal = ~torch.eye(g, dtype=torch.bool, device=x0.device)
    med = d[:, off_diagonal].median(dim=-1).values  # [N * T]
    return med.clamp_min(1e-12).view(n, t)  # [N, T]


def group_temperature(
    x0_preds: torch.Tensor, temperature: float | None = None, reduction: str = "mean"
) -> torch.Tensor:
    """
    `τ` `[N, T]` of groups with predictions `x0_preds` `[N, G, T, *]`: `temperature` when given, else the
    automatic choice, each group and step's [`median_pairwise_distance`] (logits O(1) at any latent scale).
    """
    if temperature is None:
        return median_pairwise_distance(x0_preds, reduction)
    return torch.full((x0_preds.shape[0], x0_preds.shape[2]), temperature, device=x0_preds.device)


# ---------------------------------------------------------------------------------------------------- advantages
def group_advantages(
    rewards: torch.Tensor, scale_rewards: str = "group", quasi_norm_p: float | None = None, eps: float = 1e-4
) -> torch.Tensor:
    r"""
    GRPO advantages of `N` groups of `G` candidates: rewards centered on their group mean, then scaled.

    Args:
        rewards (`torch.Tensor`):
            `[N, G]` finite rewards, one row per group.
        scale_rewards (`str`, defaults to `"group"`):
            `"group"` divides by each group's population standard deviation, `"batch"` by the population standard
            deviation of all rewards of the batch, `"none"` only centers (Dr. GRPO).
        quasi_norm_p (`float`, *optional*):
            If set (`0 < p <= 2`), replaces the scaling by Neighbor GRPO's group-wise quasi-norm:
            `A = c / (||c||_p / G^(1/p) + eps)` with `c` the centered rewards (`p = 2` is the population standard
            deviation; Neighbor GRPO recommends `p = 0.8`).
        eps (`float`, defaults to `1e-4`):
            Added to the scale to avoid a division by zero.

    Returns:
        `torch.Tensor`: `[N, G]` advantages in float32 (float64 if `rewards` is float64), zero-sum per group (up to
        rounding). A group whose rewards are all equal gets exactly zero advantages.
    """
    if rewards.ndim != 2:
        raise ValueError(
            f"`rewards` must be 2-D `[N, G]` (N groups of G candidates), got shape {tuple(rewards.shape)}."
        )
    n, g = rewards.shape
    if g < 2:
        raise ValueError(f"Group advantages need at least 2 candidates per group, got G={g} (shape {(n, g)}).")
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"`scale_rewards={scale_rewards!r}` must be one of {SCALE_REWARDS}.")
    if quasi_norm_p is not None and not 0 < quasi_norm_p <= 2:
        raise ValueError(f"`quasi_norm_p={quasi_norm_p}` must be in (0, 2].")
    if not torch.isfinite(rewards).all():
        raise ValueError("`rewards` contains NaN or infinite values; every candidate needs a finite reward.")

    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = rewards.to(dtype)  # [N, G]
    constant = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)).expand_as(r)  # [N, G]
    # exact zeros for constant groups: the mean of equal floats need not round back to the same value
    c = torch.where(constant, torch.zeros_like(r), r - r.mean(dim=1, keepdim=True))  # [N, G]

    if quasi_norm_p is not None:
        p = float(quasi_norm_p)
        scale = c.abs().pow(p).mean(dim=1, keepdim=True).pow(1.0 / p)  # [N, 1]; ||c||_p / G^(1/p)
        return c / (scale + eps)  # [N, G]
    if scale_rewards == "group":
        return c / (r.std(dim=1, unbiased=False, keepdim=True) + eps)  # [N, G]
    if scale_rewards == "batch":
        return c / (r.std(unbiased=False) + eps)  # [N, G]
    return c


# ---------------------------------------------------------------------------------------------------- stats
@dataclass
class LossStats:
    r"""
    Detached 0-dim float tensors describing one loss evaluation, for logging.

    Args:
        ratio_mean, ratio_min, ratio_max (`torch.Tensor`):
            Statistics of the importance ratios `ρ = π_θ / π_old` over all terms.
        clip_fraction (`torch.Tensor`):
            Fraction of terms where the PPO clip is active: `ρ > 1 + ε` with `A > 0`, or `ρ < 1 - ε` with `A < 0`.
            With `clip=False` this is the fraction that *would* be clipped (nothing is).
        log_ratio_abs_max (`torch.Tensor`):
            Largest `|log ρ|`.
        distance_mean (`torch.Tensor`, *optional*):
            AR-CoPO only: mean of the current-policy distances `d` over all `[P, K, G]` terms.
    """

    ratio_mean: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor
    clip_fraction: torch.Tensor
    log_ratio_abs_max: torch.Tensor
    distance_mean: torch.Tensor | None = None

    _NAMES: ClassVar[dict[str, str]] = {
        "ratio_mean": "ratio/mean",
        "ratio_min": "ratio/min",
        "ratio_max": "ratio/max",
        "clip_fraction": "clip_fraction",
        "log_ratio_abs_max": "log_ratio/abs_max",
        "distance_mean": "distance/mean",
    }

    @staticmethod
    def reduce(stats: list[LossStats]) -> dict[str, float]:
        """The statistics of several loss evaluations in one dict: min of minima, max of maxima, mean of the rest."""
        dicts = [s.to_dict() for s in stats]
        out = {}
        for key in dicts[0] if dicts else []:
            values = [d[key] for d in dicts]
            out[key] = (
                min(values)
                if key.endswith("min")
                else max(values)
                if key.endswith("max")
                else sum(values) / len(values)
            )
        return out

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """Python floats keyed by TRL-style names (`"ratio/mean"`, `"clip_fraction"`, ...), `None` fields omitted."""
        return {
            prefix + self._NAMES[f.name]: float(getattr(self, f.name))
            for f in fields(self)
            if getattr(self, f.name) is not None
        }


#: Log-ratios are capped here before `exp` (ratio <= 4.9e8): beyond ~88, `exp` overflows float32, and the `inf` times
#: the zero gradient of an unselected `min` branch is NaN, which would poison every weight. Capped terms get no gradient.
MAX_LOG_RATIO = 20.0


def _ratio(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.exp(log_ratio.clamp(max=MAX_LOG_RATIO))


def _clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, epsilon: float, clip: bool, delta: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Per-term PPO objective `min(ρA, clip(ρ)A)` (or `ρA`) and the mask of terms where the clip is active. With `delta`,
    `ρ` is first capped at `delta` (two-sided / dual clip): a negative-advantage term whose ratio ran past `delta`
    contributes a constant instead of a gradient growing with `ρ`.
    """
    if delta is not None:
        ratio = ratio.clamp(max=delta)
    unclipped = ratio * advantages  # broadcast shape of ratio and advantages
    clip_active = ((ratio > 1 + epsilon) & (advantages > 0)) | ((ratio < 1 - epsilon) & (advantages < 0))  # same
    if not clip:
        return unclipped, clip_active
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon) * advantages  # same shape as unclipped
    return torch.minimum(unclipped, clipped), clip_active


def _stats(
    ratio: torch.Tensor, log_ratio: torch.Tensor, clip_active: torch.Tensor, distance: torch.Tensor | None = None
) -> LossStats:
    ratio, log_ratio = ratio.detach(), log_ratio.detach()
    return LossStats(
        ratio_mean=ratio.mean(),  # []
        ratio_min=ratio.min(),  # []
        ratio_max=ratio.max(),  # []
        clip_fraction=clip_active.float().mean(),  # []
        log_ratio_abs_max=log_ratio.abs().max(),  # []
        distance_mean=None if distance is None else distance.detach().mean(),  # []
    )


def check_delta(delta: float | None, epsilon: float) -> None:
    """Raise if the two-sided clip `delta` does not exceed `1 + epsilon` (shared by the losses and `ARCoPOConfig`)."""
    if delta is not None and not 1 + epsilon < delta < math.inf:  # also refuses NaN
        raise ValueError(
            f"`delta={delta}` must exceed 1 + epsilon = {1 + epsilon} and be finite (e.g. 3), or be None (no cap)."
        )


def _check_epsilon(epsilon: float, delta: float | None = None) -> None:
    if epsilon < 0:
        raise ValueError(f"The clip range `epsilon={epsilon}` must be non-negative.")
    check_delta(delta, epsilon)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# ---------------------------------------------------------------------------------------------------- AR-CoPO
def _pairwise_distances(anchors: torch.Tensor, candidates: torch.Tensor, reduction: str) -> torch.Tensor:
    """`d[p, k, i] = reduce((anchors[p, k] - candidates[p, i])²)` over all trailing elements, in >= float32."""
    p, k, g = anchors.shape[0], anchors.shape[1], candidates.shape[1]
    diff = _upcast(anchors).unsqueeze(2) - _upcast(candidates).unsqueeze(1)  # [P, K, G, *]
    sq = diff.square().reshape(p, k, g, -1)  # [P, K, G, E]
    return sq.mean(dim=-1) if reduction == "mean" else sq.sum(dim=-1)  # [P, K, G]


def arcopo_loss(
    x0_theta: torch.Tensor,
    x0_old: torch.Tensor,
    anchor_index: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float = 1e-4,
    temperature: float | torch.Tensor = 1.0,
    reduction: str = "mean",
    clip: bool = True,
    delta: float | None = None,
) -> tuple[torch.Tensor, LossStats]:
    r"""
    AR-CoPO / Neighbor GRPO clipped surrogate loss over clean predictions.

    A "problem" is one (group, denoising step) pair: `G` candidates whose old clean predictions `x̂0_old^(i)` were
    stored by the rollout. For anchor candidate `k` the current policy recomputes `x̂0_θ` at `k`'s stored state and
    defines the surrogate policy `log π_θ(i) = log_softmax_i(-d_i / τ)` with `d_i = ||x̂0_old^(i) - x̂0_θ||²`
    (mean- or sum-reduced). The old policy uses `x̂0_old^(k)` in place of `x̂0_θ`. With `ρ_i = π_θ(i) / π_old(i)`:

    `loss = -mean_{p, k, i} min(ρ_i A_i, clip(ρ_i, 1 - ε, 1 + ε) A_i)`.

    At `θ = θ_old`, `ρ = 1` and, since `Σ_i A_i = 0`, `∇loss = (1 / (G τ)) Σ_i A_i ∇d_i` (averaged over anchors and
    problems): the current prediction is pulled toward high-advantage candidates and pushed from low ones.

    Args:
        x0_theta (`torch.Tensor`):
            `[P, K, *]` current-policy clean predictions at `K` anchors of each of `P` problems (carries the gradient).
        x0_old (`torch.Tensor`):
            `[P, G, *]` stored old-policy clean predictions of all `G` candidates (treated as constants).
        anchor_index (`torch.Tensor`):
            `[P, K]` integer index in `[0, G)` of the candidate each anchor is.
        advantages (`torch.Tensor`):
            `[P, G]` advantages of the candidates (zero-sum per problem for the gradient identity above).
        epsilon (`float`, defaults to `1e-4`):
            PPO clip range `ε` of the ratio.
        temperature (`float` or `torch.Tensor` of shape `[P]`, defaults to `1.0`):
            Softmax temperature `τ > 0`, one for all problems or one per problem.
        reduction (`str`, defaults to `"mean"`):
            How squared differences are reduced to a distance: `"mean"` or `"sum"` over all elements.
        clip (`bool`, defaults to `True`):
            `False` uses the unclipped `ρ A` (ablation only).
        delta (`float` or `None`, defaults to `None`):
            Upper bound of the ratio in the unclipped term (two-sided clip, TRL's `delta`); must exceed `1 + ε`.

    Returns:
        `tuple[torch.Tensor, LossStats]`: the scalar float32 loss (to minimise) and detached statistics.
    """
    _check_epsilon(epsilon, delta)
    if torch.as_tensor(temperature).le(0).any():
        raise ValueError(f"`temperature={temperature}` must be positive.")
    if reduction not in DISTANCE_REDUCTIONS:
        raise ValueError(f"`reduction={reduction!r}` must be one of {DISTANCE_REDUCTIONS}.")
    if x0_theta.ndim < 2 or x0_old.ndim < 2:
        raise ValueError(
            f"`x0_theta` must be [P, K, *] and `x0_old` [P, G, *], got shapes {tuple(x0_theta.shape)} and "
            f"{tuple(x0_old.shape)}."
        )
    p, k = x0_theta.shape[:2]
    g = x0_old.shape[1]
    if x0_old.shape[0] != p or x0_old.shape[2:] != x0_theta.shape[2:]:
        raise ValueError(
            f"`x0_theta` [P, K, *] has shape {tuple(x0_theta.shape)} but `x0_old` [P, G, *] has shape "
            f"{tuple(x0_old.shape)}: P and the trailing prediction dims must match."
        )
    if g < 2:
        raise ValueError(f"`x0_old` has shape {tuple(x0_old.shape)}: a group needs at least 2 candidates (G >= 2).")
    if x0_old[0, 0].numel() == 0:
        raise ValueError(f"Predictions of shape {tuple(x0_old.shape[2:])} are empty.")
    if anchor_index.shape != (p, k):
        raise ValueError(
            f"`anchor_index` must have shape [P, K] = {(p, k)} (from `x0_theta` of shape {tuple(x0_theta.shape)}), "
            f"got {tuple(anchor_index.shape)}."
        )
    if anchor_index.dtype.is_floating_point or anchor_index.dtype.is_complex or anchor_index.dtype == torch.bool:
        raise ValueError(f"`anchor_index` must be an integer tensor, got {anchor_index.dtype}.")
    if advantages.shape != (p, g):
        raise ValueError(
            f"`advantages` must have shape [P, G] = {(p, g)} (from `x0_old` of shape {tuple(x0_old.shape)}), "
            f"got {tuple(advantages.shape)}."
        )
    if ((anchor_index < 0) | (anchor_index >= g)).any():
        raise ValueError(f"`anchor_index` values must be in [0, G) = [0, {g}).")

    if isinstance(temperature, torch.Tensor):
        if temperature.shape not in ((), (p,)):
            raise ValueError(f"`temperature` must be a scalar or [P] = [{p}], got shape {tuple(temperature.shape)}.")
        temperature = _upcast(temperature.detach()).to(x0_old.device).reshape(-1, 1, 1)  # [P or 1, 1, 1]
    x0_old = x0_old.detach()
    rows = torch.arange(p, device=x0_old.device).unsqueeze(1)  # [P, 1]
    x0_anchor_old = x0_old[rows, anchor_index.to(x0_old.device, torch.long)]  # [P, K, *]

    d = _pairwise_distances(x0_theta, x0_old, reduction)  # [P, K, G]
    d_old = _pairwise_distances(x0_anchor_old, x0_old, reduction)  # [P, K, G]
    log_pi = torch.log_softmax(-d / temperature, dim=-1)  # [P, K, G]
    log_pi_old = torch.log_softmax(-d_old / temperature, dim=-1)  # [P, K, G]
    log_ratio = log_pi - log_pi_old  # [P, K, G]
    ratio = _ratio(log_ratio)  # [P, K, G]

    adv = _upcast(advantages.detach()).unsqueeze(1)  # [P, 1, G]
    objective, clip_active = _clipped_surrogate(ratio, adv, epsilon, clip, delta)  # [P, K, G], [P, K, G]
    loss = -objective.mean()  # []
    return loss, _stats(ratio, log_ratio, clip_active, d)


# ---------------------------------------------------------------------------------------------------- SDE baseline
def sde_transition_log_prob(
    x_next: torch.Tensor, x0_pred: torch.Tensor, sigma_next: float | torch.Tensor
) -> torch.Tensor:
    r"""
    Per-element average log-density of the consistency sampler's re-noise `x_next ~ N((1 - σ')·x̂0, σ'² I)`.

    Args:
        x_next (`torch.Tensor`):
            `[B, *]` the re-noised sample of the next step.
        x0_pred (`torch.Tensor`):
            `[B, *]` the clean prediction it was re-noised from (carries the gradient).
        sigma_next (`float` or `torch.Tensor`):
            `σ' > 0`: a number, a 0-dim tensor or a `[B]` tensor (one per sample).

    Returns:
        `torch.Tensor`: `[B]` float32 (float64 for float64 inputs) mean over the non-batch elements of
        `-(x - μ)² / (2σ'²) - log σ' - ½ log 2π`.
    """
    if x_next.shape != x0_pred.shape or x_next.ndim < 1:
        raise ValueError(
            f"`x_next` and `x0_pred` must have the same shape [B, *], got {tuple(x_next.shape)} and "
            f"{tuple(x0_pred.shape)}."
        )
    b = x_next.shape[0]
    x = _upcast(x_next.detach())  # [B, *]
    x0 = _upcast(x0_pred)  # [B, *]
    sigma = torch.as_tensor(sigma_next, dtype=x.dtype, device=x.device)  # [] or [B]
    if sigma.ndim == 1 and sigma.shape[0] in (1, b):
        sigma = sigma.reshape(-1, *([1] * (x.ndim - 1)))  # [B or 1, 1, ...]
    elif sigma.ndim != 0:
        raise ValueError(
            f"`sigma_next` must be a number, a 0-dim tensor or a [B] = [{b}] tensor, got shape {tuple(sigma.shape)}."
        )
    if (sigma <= 0).any():
        raise ValueError("`sigma_next` must be positive: the last (noise-free) step has no transition density.")
    mean = (1 - sigma) * x0  # [B, *]
    log_prob = -((x - mean) ** 2) / (2 * sigma**2) - torch.log(sigma) - 0.5 * math.log(2 * math.pi)  # [B, *]
    return log_prob.reshape(b, -1).mean(dim=1)  # [B]


def sde_grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    epsilon: float = 1e-4,
    clip: bool = True,
    delta: float | None = None,
) -> tuple[torch.Tensor, LossStats]:
    r"""
    Flow-GRPO / DanceGRPO PPO-clip loss on per-transition log-probabilities:
    `loss = -mean(min(ρ A, clip(ρ, 1 - ε, 1 + ε) A))` with `ρ = exp(log_prob - old_log_prob)`.

    Args:
        log_prob (`torch.Tensor`):
            Current-policy log-probabilities, e.g. `[P, G]` (carries the gradient).
        old_log_prob (`torch.Tensor`):
            Rollout log-probabilities, same shape.
        advantages (`torch.Tensor`):
            Advantages, same shape.
        epsilon (`float`, defaults to `1e-4`):
            PPO clip range `ε`.
        clip (`bool`, defaults to `True`):
            `False` uses the unclipped `ρ A` (ablation only).
        delta (`float` or `None`, defaults to `None`):
            Upper bound of the ratio in the unclipped term (two-sided clip, TRL's `delta`); must exceed `1 + ε`.

    Returns:
        `tuple[torch.Tensor, LossStats]`: the scalar loss (to minimise) and detached statistics (no distance).
    """
    _check_epsilon(epsilon, delta)
    if not (log_prob.shape == old_log_prob.shape == advantages.shape):
        raise ValueError(
            f"`log_prob`, `old_log_prob` and `advantages` must have the same shape, got {tuple(log_prob.shape)}, "
            f"{tuple(old_log_prob.shape)} and {tuple(advantages.shape)}."
        )
    if log_prob.numel() == 0:
        raise ValueError(f"`log_prob` of shape {tuple(log_prob.shape)} is empty.")
    log_ratio = _upcast(log_prob) - _upcast(old_log_prob.detach())  # same shape as log_prob
    ratio = _ratio(log_ratio)  # same shape
    objective, clip_active = _clipped_surrogate(ratio, _upcast(advantages.detach()), epsilon, clip, delta)
    loss = -objective.mean()  # []
    return loss, _stats(ratio, log_ratio, clip_active)


def sde_grpo_anchor_loss(
    x_next: torch.Tensor,
    x0_theta: torch.Tensor,
    x0_old: torch.Tensor,
    advantages: torch.Tensor,
    sigma_next: float,
    epsilon: float = 1e-4,
    clip: bool = True,
    delta: float | None = None,
) -> tuple[torch.Tensor, LossStats]:
    """
    [`sde_grpo_loss`] at `K` anchors of `N` groups: the log-probabilities of the recorded transitions `x_next`
    `[N * K, *]` under the current (`x0_theta` `[N, K, *]`) and the old (`x0_old` `[N * K, *]`) predictions, with the
    anchors' `advantages` `[N, K]`.
    """
    n, k = advantages.shape
    log_prob = sde_transition_log_prob(x_next, x0_theta.flatten(0, 1), sigma_next).view(n, k)  # [N, K]
    old_log_prob = sde_transition_log_prob(x_next, x0_old, sigma_next).view(n, k)  # [N, K]
    return sde_grpo_loss(log_prob, old_log_prob, advantages, epsilon=epsilon, clip=clip, delta=delta)


def x0_penalty(x0_theta: torch.Tensor, x0_ref: torch.Tensor) -> torch.Tensor:
    """
    `mean((x̂0_θ - x̂0_ref)²)` in float32: the KL between the current and the reference Gaussian re-noise policies up
    to a constant factor (the `beta` penalty). Shapes must match.
    """
    return (x0_theta.float() - x0_ref.float()).pow(2).mean()


# ---------------------------------------------------------------------------------------------------- registry
def default_temperature(x0_preds: torch.Tensor, args: Any) -> torch.Tensor:
    """`τ` `[N, T]` of `ARCoPOConfig.temperature` ([`group_temperature`]; `None`: each group's median distance)."""
    return group_temperature(x0_preds, args.temperature, args.distance_reduction)


@dataclass(frozen=True)
class LossStrategy:
    r"""
    A policy loss and what training with it needs, found by name in the registry ([`register_loss`]):
    `ARCoPOConfig(loss_type=name)` selects it, and the config, the rollout, the update and the planner read it here.

    Args:
        name (`str`): the `loss_type` that selects it.
        loss (`Callable`): `loss(anchors, x0_theta, x0_old, args) -> (loss, LossStats)`, the objective at one
            denoising step: `anchors` ([`~trl_arcopo.rollout_group.AnchorBatch`]: the groups, the step, the anchors
            and their advantages), `x0_theta` `[N, K, C, Fc, H, W]` (the policy at the anchors, with gradient),
            `x0_old` `[N, G, C, Fc, H, W]` (every candidate's old prediction), `args` (the run's `ARCoPOConfig`).
        exploration (`str`, defaults to `"neighbors"`): how a group's candidates differ
            ([`~trl_arcopo.rollout.sample_group`]): `"neighbors"`, neighbouring initial noises of the pivot chunk;
            `"sde"`, one initial noise and each candidate its own re-noise of the consistency sampler.
        trains_last_step (`bool`, defaults to `True`): whether the last denoising step can be trained (a loss of the
            transition to the next state cannot: none follows it).
        compares_candidates (`bool`, defaults to `False`): whether the loss compares each anchor's prediction with
            every candidate's of its group (the planner then counts `G` candidates' differences per anchor).
        temperature (`Callable`, defaults to [`default_temperature`]): `temperature(x0_preds, args) -> [N, T]`,
            `τ` of each group and step from the old predictions `[N, G, T, *]`, set once per group before its
            updates (`RolloutGroup.temperature`).
    """

    name: str
    loss: Callable[[AnchorBatch, torch.Tensor, torch.Tensor, Any], tuple[torch.Tensor, LossStats]]
    exploration: str = "neighbors"
    trains_last_step: bool = True
    compares_candidates: bool = False
    temperature: Callable[[torch.Tensor, Any], torch.Tensor] = default_temperature

    def trainable_steps(self, num_steps: int) -> int:
        """How many of a schedule's `num_steps` denoising steps the loss can train (the first ones)."""
        return num_steps - (0 if self.trains_last_step else 1)

    def check(self, sampler: str | None = None, num_steps: int | None = None) -> None:
        """
        Refuse a sampler (`None`: not known yet) or a schedule of `num_steps` steps this loss cannot train with:
        `"sde"` exploration re-noises through the consistency sampler, and some step must be trainable.
        """
        if self.exploration == "sde" and sampler not in (None, "consistency"):
            raise ValueError(
                f"`loss_type={self.name!r}` explores through the consistency sampler's re-noise, but the sampler is "
                f"{sampler!r}: set `sampler='consistency'`."
            )
        if num_steps is not None and self.trainable_steps(num_steps) < 1:
            raise ValueError(
                f"`loss_type={self.name!r}` cannot train the last denoising step, and the schedule has {num_steps}: "
                "use at least 2 `denoising_sigmas`."
            )


#: The registered loss strategies by name ([`register_loss`]).
LOSS_STRATEGIES: dict[str, LossStrategy] = {}


def register_loss(strategy: LossStrategy) -> LossStrategy:
    """Register `strategy` under its name, which `ARCoPOConfig.loss_type` then accepts. Returns it."""
    if strategy.name in LOSS_STRATEGIES:
        raise ValueError(f"A loss named {strategy.name!r} is already registered; give yours another name.")
    LOSS_STRATEGIES[strategy.name] = strategy
    return strategy


def get_loss_strategy(name: str) -> LossStrategy:
    """The registered strategy `name`, or a `ValueError` naming the registered ones and how to add one."""
    if name not in LOSS_STRATEGIES:
        raise ValueError(
            f"`loss_type={name!r}` is not a registered loss: use one of {tuple(LOSS_STRATEGIES)}, or register yours "
            "with `trl_arcopo.loss.register_loss`."
        )
    return LOSS_STRATEGIES[name]


def _arcopo_step_loss(anchors: AnchorBatch, x0_theta: torch.Tensor, x0_old: torch.Tensor, args: Any):
    group, j = anchors.group, anchors.step
    return arcopo_loss(
        x0_theta, x0_old, anchors.anchor_index, group.advantages, epsilon=args.epsilon,
        temperature=group.temperature[:, j], reduction=args.distance_reduction, clip=args.ratio_clip, delta=args.delta,
    )  # fmt: skip


def _sde_grpo_step_loss(anchors: AnchorBatch, x0_theta: torch.Tensor, x0_old: torch.Tensor, args: Any):
    group, j = anchors.group, anchors.step
    x_next = group.states[:, :, j + 1].flatten(0, 1)[anchors.rows]  # [N * K, C, Fc, H, W]
    return sde_grpo_anchor_loss(
        x_next, x0_theta, x0_old.flatten(0, 1)[anchors.rows], anchors.advantages, group.sigmas[j + 1].item(),
        epsilon=args.epsilon, clip=args.ratio_clip, delta=args.delta,
    )  # fmt: skip


register_loss(LossStrategy("arcopo", _arcopo_step_loss, exploration="neighbors", compares_candidates=True))
register_loss(LossStrategy("sde_grpo", _sde_grpo_step_loss, exploration="sde", trains_last_step=False))
