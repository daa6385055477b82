"""The weight-free video-metric rewards: closed-form values, per-video scores, clear errors."""

import pytest
import torch

from trl_arcopo.rewards import FlickerReward, MotionMagnitudeReward, SharpnessReward, load_reward_func


def _ramp(frames=5, size=8):
    """Uniform grey frames brightening linearly from 0 to 1: `[1, F, 3, H, W]`."""
    levels = torch.linspace(0, 1, frames).view(1, frames, 1, 1, 1)
    return levels.expand(1, frames, 3, size, size).clone()


def test_motion_magnitude_closed_form():
    still = torch.full((1, 4, 3, 8, 8), 0.3)
    assert MotionMagnitudeReward()([""], still) == [0.0]
    assert MotionMagnitudeReward()([""], _ramp(5)) == pytest.approx([0.25])  # every pixel moves 1/4 per frame
    assert MotionMagnitudeReward(scale=10)([""], _ramp(5)) == [1.0]  # clipped


def test_flicker_closed_form():
    alternating = torch.zeros(1, 4, 3, 8, 8)
    alternating[:, 1::2] = 1.0  # black, white, black, white
    moving = torch.zeros(1, 4, 3, 8, 8)
    for t in range(4):
        moving[0, t, :, 2:4, t : t + 2] = 1.0  # a 2x2 white square moving right: the mean luma never changes
    rewards = FlickerReward()(["", ""], torch.cat([alternating, moving]))
    assert rewards == pytest.approx([0.0, 1.0])
    assert FlickerReward()([""], _ramp(5)) == pytest.approx([0.75])  # the mean luma jumps 1/4 per frame


def test_sharpness_closed_form():
    flat = torch.full((1, 2, 3, 8, 8), 0.5)
    dot = torch.zeros(1, 2, 3, 8, 8)
    dot[..., 4, 4] = 1.0  # one white pixel: Laplacian -4 there, +1 at its 4 neighbours, 0 elsewhere
    assert SharpnessReward()(["", ""], torch.cat([flat, dot])) == pytest.approx([0.0, 20 / 64])


@pytest.mark.parametrize("reward", [MotionMagnitudeReward(), FlickerReward(), SharpnessReward()])
def test_scores_are_per_video_and_deterministic(reward):
    videos = torch.rand(3, 5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    together = reward(["a"] * 3, videos)
    alone = [reward(["a"], videos[i : i + 1])[0] for i in range(3)]
    assert together == pytest.approx(alone, abs=1e-6) and reward(["a"] * 3, videos) == together
    assert all(0 <= r <= 1 for r in together)


def test_names_and_errors():
    assert isinstance(load_reward_func("motion_magnitude"), MotionMagnitudeReward)
    assert isinstance(load_reward_func("flicker"), FlickerReward)
    assert load_reward_func("sharpness").__name__ == "sharpness"
    with pytest.raises(ValueError, match="compares consecutive frames: the videos have 1 frame"):
        MotionMagnitudeReward()([""], torch.rand(1, 1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"must be \[N, F, C, H, W\]"):
        SharpnessReward()([""], torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="`scale=0` must be positive"):
        SharpnessReward(scale=0)
