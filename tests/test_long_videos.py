"""
Long videos in RL: the rewards can score a window of chunks around the pivot (and are told which frames they see), and
with a rolling cache the update's memory does not depend on the video's length.
"""

import pytest
import torch
from helpers import PROMPTS, tiny_trainer

from trl_arcopo.rollout import reward_chunk_range
from trl_arcopo.testing_utils import cpu_peak_bytes, tiny_pipeline


def test_reward_chunk_range():
    assert reward_chunk_range(5, 20) == (0, 20)  # no window: the whole video
    assert reward_chunk_range(5, 20, 2) == (5, 7)  # the pivot and the chunk after it
    assert reward_chunk_range(5, 20, 2, 3) == (2, 7)  # and 3 chunks of context before it
    assert reward_chunk_range(19, 20, 4, 1) == (18, 20)  # clipped to the video
    assert reward_chunk_range(0, 20, 1, 2) == (0, 1)


class Recorder:
    """A reward that keeps what it was given."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, videos, **kwargs):
        self.calls.append((videos.clone(), kwargs))
        return videos[:, :, 0].mean(dim=(1, 2, 3)).tolist()


def _scored(tmp_path, window, context):
    """What a reward is given for the first rollout of a run forked at chunk 1 (the same rollout in every run)."""
    reward = Recorder()
    trainer = tiny_trainer(
        tmp_path, reward_funcs=[reward], pivot_chunk=1, reward_window_chunks=window, reward_context_chunks=context
    )
    trainer.generate_and_score([{"prompt": p} for p in PROMPTS[:2]])
    return reward.calls[-1]


@pytest.mark.parametrize(("window", "context", "expected"), [(1, 1, (0, 6)), (1, 0, (3, 6)), (5, 0, (3, 9))])
def test_the_rewards_score_the_window_and_are_told_which_frames(tmp_path, window, context, expected):
    whole, kwargs = _scored(tmp_path / "whole", None, 0)
    assert kwargs["frame_range"] == (0, 9) and kwargs["pivot_chunk"] == 1 and whole.shape[1] == 9
    videos, kwargs = _scored(tmp_path / "window", window, context)
    assert kwargs["frame_range"] == expected and kwargs["pivot_chunk"] == 1
    assert torch.equal(videos, whole[:, expected[0] : expected[1]])


def test_config_refuses_bad_windows(tmp_path):
    with pytest.raises(ValueError, match="reward_window_chunks=0"):
        tiny_trainer(tmp_path, reward_window_chunks=0)
    with pytest.raises(ValueError, match="needs `reward_window_chunks`"):
        tiny_trainer(tmp_path, reward_context_chunks=1)


def test_pixel_frames_of_latent_frames():
    wan = tiny_pipeline(with_vae=True)  # temporal factor 4: 9 frames -> 3 latent frames
    assert wan.pixel_frame_range(0, 3) == (0, 9)
    assert wan.pixel_frame_range(1, 2) == (1, 5) and wan.pixel_frame_range(2, 3) == (5, 9)
    packed = tiny_pipeline(pack_frames=True)  # 3 frames per latent frame
    assert packed.pixel_frame_range(1, 3) == (3, 9)
    assert tiny_pipeline().pixel_frame_range(2, 5) == (2, 5)


def _update_peak(tmp_path, policy, num_frames, window=3):
    pipe = tiny_pipeline()
    pipe.register_to_config(
        cache_policy=policy, local_attn_frames=window, sink_frames=1 if window else 0, default_num_frames_per_chunk=1
    )
    trainer = tiny_trainer(
        tmp_path / f"{policy}-{num_frames}", pipe=pipe, num_frames=num_frames, pivot_chunk=num_frames - 1,
        num_generations=2, num_anchors=1, denoising_sigmas=[1.0, 0.5], height=8, width=8,
    )  # fmt: skip
    group = trainer.generate_and_score([{"prompt": p} for p in PROMPTS[:2]])
    trainer.model.zero_grad()
    peak, _ = cpu_peak_bytes(trainer.accumulate_gradients, group)
    return peak


def test_the_update_memory_does_not_grow_with_the_video_under_a_rolling_cache(tmp_path):
    """
    The pivot is the last chunk of a 4- and a 16-frame video: the update reads the window, whatever came before; under
    global attention it reads every frame before the pivot.
    """
    short, long = (_update_peak(tmp_path, "rolling", frames) for frames in (4, 16))
    assert long <= 1.05 * short, (short, long)
    global_short, global_long = (_update_peak(tmp_path, "full", frames, window=None) for frames in (4, 16))
    assert global_long > 1.3 * global_short, (global_short, global_long)
