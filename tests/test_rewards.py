"""`trl_arcopo.rewards` on its own: calling, validating and combining reward functions, with closed-form values."""

import math

import pytest
import torch

from trl_arcopo.rewards import call_reward_funcs, check_reward_funcs, combine_rewards, score_group


ROWS = [{"prompt": "a", "colour": "red"}, {"prompt": "b", "colour": "blue"}]
VIDEOS = torch.zeros(4, 2, 3, 4, 4)  # 2 rows x G = 2


def test_every_function_is_called_once_with_repeated_columns():
    calls = []

    def f(prompts, videos, colour, step):
        calls.append((prompts, colour, step, videos.shape[0]))
        return [1.0, None, 3.0, 4.0]

    values, nonfinite = call_reward_funcs([f], ROWS, VIDEOS, 2, step=7)
    assert calls == [(["a", "a", "b", "b"], ["red", "red", "blue", "blue"], 7, 4)]
    assert values.dtype == torch.float64 and nonfinite is None
    assert values[:, 0].tolist()[0] == 1.0 and math.isnan(values[1, 0])


def test_combination_is_a_weighted_sum_and_no_opinion_gets_the_group_mean():
    per_func = torch.tensor(
        [[1.0, 2.0], [3.0, math.nan], [math.nan, math.nan], [5.0, 1.0]], dtype=torch.float64
    )  # [N * G = 4, 2]
    combined = combine_rewards(per_func, torch.tensor([1.0, 10.0]), num_generations=2)
    # group 0: 1 + 20, 3 (nan left out); group 1: no opinion -> the group's mean (5 + 10), 5 + 10
    assert combined.tolist() == [[21.0, 3.0], [15.0, 15.0]] and combined.dtype == torch.float64


def test_float64_sums_do_not_overflow_where_float32_would():
    per_func = torch.tensor([[3e38, 3e38], [1e38, 1e38]], dtype=torch.float64)
    assert torch.isfinite(combine_rewards(per_func, torch.ones(2), 2)).all()
    assert not torch.isfinite(per_func.float().sum(dim=1)).all()


def test_non_finite_values_and_overflows_are_named_not_raised():
    def bad(prompts, videos, **kwargs):
        return [0.0, math.inf, 1.0, 2.0]

    def huge(prompts, videos, **kwargs):
        return [1.7e308] * 4

    assert (
        "`bad` returned inf for video 1 of prompt 'a'" in score_group([bad], torch.ones(1), ROWS, VIDEOS, 2).nonfinite
    )
    overflow = score_group([huge, huge], torch.ones(2), ROWS, VIDEOS, 2).nonfinite
    assert overflow.startswith("the weighted sum of the rewards overflowed") and "huge=1.7e+308" in overflow
    # a rollout that is not finite: no function is asked, every opinion is NaN
    assert score_group([bad], torch.ones(1), ROWS, None, 2).per_func.isnan().all()


def test_bad_functions_and_weights_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="non-empty list of callables"):
        check_reward_funcs([])
    with pytest.raises(ValueError, match="`reward_weights` has 1 values but there are 2 reward functions"):
        check_reward_funcs([len, len], [1.0])
    funcs, weights = check_reward_funcs(len)
    assert funcs == [len] and weights.tolist() == [1.0]
    with pytest.raises(ValueError, match="returned 3 values for 4 videos"):
        call_reward_funcs([lambda prompts, videos, **kw: [0.0] * 3], ROWS, VIDEOS, 2)
