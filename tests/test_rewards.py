"""`trl_arcopo.rewards` on its own: calling, validating and combining reward functions, with closed-form values."""

import math
import threading

import pytest
import torch

from trl_arcopo.rewards import RewardScorer, check_reward_funcs, score_group
from trl_arcopo.rewards.base import call_reward_funcs, combine_rewards


ROWS = [{"prompt": "a", "colour": "red"}, {"prompt": "b", "colour": "blue"}]
VIDEOS = torch.zeros(4, 2, 3, 4, 4)  # 2 rows x G = 2


def test_every_function_is_called_once_with_repeated_columns():
    calls = []

    def f(prompts, videos, colour, step):
        calls.append((prompts, colour, step, videos.shape[0]))
        return [1.0, None, 3.0, 4.0]

    values, nonfinite, _ = call_reward_funcs([f], ROWS, VIDEOS, 2, step=7)
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


def test_normalize_then_sum_standardises_each_reward_within_its_group():
    # group 0: reward a in [0, 10], reward b in [0, 0.1]; group 1: a constant (no signal), b varies
    per_func = torch.tensor([[0.0, 0.1], [10.0, 0.0], [5.0, 1.0], [5.0, 3.0]], dtype=torch.float64)
    weights = torch.tensor([1.0, 2.0])
    got = combine_rewards(per_func, weights, num_generations=2, aggregation="normalize_then_sum")
    s = math.sqrt(2) / 2 * 10  # sample std of (0, 10) is 7.071...; of (0.1, 0) 0.0707...
    z = lambda d, std: d / (std + 1e-4)  # noqa: E731
    expected = [
        [z(-5.0, s) + 2 * z(0.05, s / 100), z(5.0, s) + 2 * z(-0.05, s / 100)],
        [0.0 + 2 * z(-1.0, math.sqrt(2)), 0.0 + 2 * z(1.0, math.sqrt(2))],
    ]
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    # the plain weighted sum would let reward a decide group 0 alone; standardised, both rewards count the same
    assert combine_rewards(per_func, weights, 2)[0].argmax() == 1 and got[0].argmax() == 0
    with pytest.raises(ValueError, match="`aggregation='mean'` is not one of"):
        combine_rewards(per_func, weights, 2, aggregation="mean")


def test_score_group_logs_the_weighted_sum_and_per_function_timings():
    def a(prompts, videos, **kwargs):
        return [0.0, 10.0, 5.0, 5.0]

    def b(prompts, videos, **kwargs):
        return [0.1, 0.0, 1.0, 3.0]

    rewards = score_group([a, b], torch.ones(2), ROWS, VIDEOS, 2, aggregation="normalize_then_sum")
    metrics = rewards.metrics(["a", "b"])
    assert metrics["reward"] == pytest.approx((0.1 + 10.0 + 6.0 + 8.0) / 4)  # not the standardised values
    assert set(metrics) >= {"timing/rewards/a", "timing/rewards/b", "timing/reward_seconds"}
    assert rewards.combined[1].tolist() == pytest.approx([-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)])


def test_async_scorer_runs_the_functions_concurrently_with_the_same_values():
    barrier = threading.Barrier(2, timeout=5)
    threads = []

    def make(offset, wait):
        def f(prompts, videos, **kwargs):
            threads.append(threading.current_thread().name)
            if wait:
                barrier.wait()  # returns only when both functions run at once (else BrokenBarrierError after 5 s)
            return [offset + videos[i].sum().item() + i for i in range(len(prompts))]

        f.__name__ = f"f{offset}"
        return f

    scorer = RewardScorer([make(0, True), make(10, True)], [1.0, 0.5], async_rewards=True)
    pending = scorer.start(ROWS, VIDEOS, 2)
    got = pending()
    scorer.close()
    assert all(name.startswith("reward") for name in threads)
    expected = RewardScorer([make(0, False), make(10, False)], [1.0, 0.5]).start(ROWS, VIDEOS, 2)()
    assert torch.equal(got.per_func, expected.per_func) and torch.equal(got.combined, expected.combined)
    assert len(got.seconds_per_func) == 2


def test_scorer_moves_reward_models_but_not_quantized_ones():
    class ModelReward:
        def __init__(self):
            self.model = torch.nn.Linear(2, 2)
            self.embedder = type("Embedder", (), {})()
            self.embedder.model = torch.nn.Linear(2, 2)  # one level down, like `FrameEmbedder`

        def __call__(self, prompts, videos, **kwargs):
            return [0.0] * len(prompts)

    class QuantizedReward(ModelReward):
        def __init__(self):
            super().__init__()
            self.model.weight.__class__ = type("Int8Params", (torch.nn.Parameter,), {})  # what bitsandbytes loads

    plain, quantized, placed = ModelReward(), QuantizedReward(), ModelReward()
    placed.model.to("meta")  # put elsewhere by the user (e.g. a second GPU)
    RewardScorer([plain, quantized, placed, redness_like]).to("meta")
    assert plain.model.weight.is_meta and plain.embedder.model.weight.is_meta
    assert not quantized.model.weight.is_meta  # left where it was loaded
    assert quantized.embedder.model.weight.is_meta
    RewardScorer([placed]).to("cpu")  # a module not on the CPU is not brought back (nor copied out of "meta")
    assert placed.model.weight.is_meta and placed.embedder.model.weight.is_meta


def redness_like(prompts, videos, **kwargs):
    return [0.0] * len(prompts)


def test_scorer_reports_the_failure_counts_of_remote_rewards():
    class Remote:
        __name__ = "judge"
        failures = 0

        def __call__(self, prompts, videos, **kwargs):
            self.failures += 1  # one video had no opinion
            return [None] + [1.0] * (len(prompts) - 1)

    remote = Remote()
    scorer = RewardScorer([remote, redness_like])
    assert scorer.failure_metrics() == {"rewards/judge/failures": 0.0}  # functions without a counter add nothing
    scorer.start(ROWS, VIDEOS, 2)()
    assert scorer.failure_metrics() == {"rewards/judge/failures": 1.0}
