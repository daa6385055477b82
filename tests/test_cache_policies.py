"""
The three cache policies (`full`, `rolling`, `recompute`): each equals its reference computation, forks equal
independent rollouts under each, saved caches load back, and the rolling cache's memory does not grow with the video.
"""

import pytest
import torch

from trl_arcopo import RolloutNoise, forked_rollout, neighbor_noise
from trl_arcopo.kv_cache import KVCache, RecomputeKVCache, RollingKVCache, cache_from_state, make_cache
from trl_arcopo.models.causal_wan import block_causal_mask
from trl_arcopo.testing_utils import cpu_peak_bytes, tiny_pipeline


SIZE = 16  # pixel space: 16x16 frames, 64 tokens per frame


@pytest.fixture(scope="module")
def policy_pipe():
    """A tiny pipeline whose cache policy each test sets with `_configure` (the weights never change)."""
    return tiny_pipeline()


def _configure(pipe, policy, local=None, sink=0):
    pipe.register_to_config(cache_policy=policy, local_attn_frames=local, sink_frames=sink)
    return pipe


def _noise(pipe, frames, chunk, batch=1, seed=0):
    shape = pipe.latent_shape(batch, SIZE, SIZE, frames, chunk)
    return RolloutNoise.sample(shape, chunk, 4, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _generate(pipe, embeds, noise):
    timesteps, sigmas = pipe.get_schedule()
    frames = noise.initial.shape[2] - noise.num_frames_per_chunk
    cache = pipe.prepare_cache(noise.batch_size, frames, SIZE, SIZE)
    return pipe.generate_latents(embeds, noise, cache, timesteps, sigmas), cache


@pytest.mark.parametrize(("chunk", "window", "sink"), [(1, 4, 1), (2, 6, 1), (3, 6, 0)])
def test_rolling_cache_equals_the_masked_full_cache_bit_for_bit(policy_pipe, chunk, window, sink):
    """A video 4x longer than the window: the ring (which wraps inside a chunk for (2, 6, 1)) reads the same keys."""
    frames = 4 * window
    embeds, _ = policy_pipe.encode_prompt(["a red fox jumps"])
    noise = _noise(policy_pipe, frames, chunk)
    masked, full_cache = _generate(_configure(policy_pipe, "full", window, sink), embeds, noise)
    rolled, rolling_cache = _generate(_configure(policy_pipe, "rolling", window, sink), embeds, noise)
    assert type(full_cache) is KVCache and type(rolling_cache) is RollingKVCache
    assert torch.equal(rolled, masked)
    # the ring holds the window only; the full cache holds every committed frame
    assert rolling_cache.keys[0].shape[1] == window * 64
    assert full_cache.keys[0].shape[1] == (frames - chunk) * 64
    assert rolling_cache.num_frames == full_cache.num_frames == frames - chunk
    # the window matters: global attention gives another video
    glob, _ = _generate(_configure(policy_pipe, "full"), embeds, noise)
    assert not torch.allclose(glob, masked, atol=1e-4)


def test_a_rolling_cache_refuses_frames_that_left_its_window(policy_pipe):
    cache = make_cache(
        "rolling", policy_pipe.transformer.cache_layout(SIZE, SIZE), 1, 12, local_attn_frames=4, sink_frames=1
    )
    tpf = cache.tokens_per_frame
    for layer in range(cache.num_layers):
        cache.write(layer, 0, torch.randn(1, 6 * tpf, 2, 12), torch.randn(1, 6 * tpf, 2, 12))
    cache.advance(6 * tpf)
    with pytest.raises(ValueError, match="left the rolling window"):
        cache._gather(0, [slice(0, 6 * tpf)])  # frames 1 and 2 were overwritten by frames 4 and 5
    with pytest.raises(ValueError, match="hold the sink frames plus at least one chunk"):
        cache.check_chunk(6 * tpf, 4 * tpf, 1)
    with pytest.raises(ValueError, match="needs `local_attn_frames`"):
        make_cache("rolling", policy_pipe.transformer.cache_layout(SIZE, SIZE), 1, 12)


@torch.no_grad()
def test_recompute_equals_a_block_causal_forward_over_the_context(policy_pipe):
    """
    Krea's recompute: the chunk after 9 committed frames attends to frame 0 (the sink) and the 2 most recent frames,
    whose keys are rebuilt at positions 0..2; that equals one forward over those 3 clean frames and the noisy chunk
    with a block-causal mask (the context one block, the chunk the next), within 1e-5.
    """
    pipe = _configure(policy_pipe, "recompute", 6, 1)
    embeds, _ = pipe.encode_prompt(["a red fox jumps"])
    clean = torch.randn(1, 3, 12, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    cache = pipe.prepare_cache(1, 12, SIZE, SIZE)
    assert isinstance(cache, RecomputeKVCache)
    for c in range(3):
        pipe.commit_chunk(clean[:, :, 3 * c : 3 * c + 3], embeds, cache, 3 * c)
    assert cache.frame_indices == [0, 7, 8] and cache.num_frames == 9
    assert torch.equal(cache.latents, clean[:, :, [0, 7, 8]])

    x_t = torch.randn(1, 3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    t = torch.tensor(750.0)
    streamed = pipe.velocity(x_t, t, embeds, cache, 9, None, 1.0, False, None)

    context = torch.cat([clean[:, :, [0, 7, 8]], x_t], dim=2)  # positions 0..5
    timestep = torch.tensor([[0.0, 0.0, 0.0, 750.0, 750.0, 750.0]])
    full = pipe.transformer(context, timestep, embeds, attention_mask=block_causal_mask(6, 3, 64), return_dict=False)[
        0
    ][:, :, 3:]
    assert (streamed - full).abs().max() <= 1e-5
    # the context is what the window says: the full cache with the same window reads frames 0, 7, 8 at their
    # absolute positions, which is another computation
    masked = _configure(policy_pipe, "full", 6, 1)
    full_cache = masked.prepare_cache(1, 12, SIZE, SIZE)
    for c in range(3):
        masked.commit_chunk(clean[:, :, 3 * c : 3 * c + 3], embeds, full_cache, 3 * c)
    absolute = masked.velocity(x_t, t, embeds, full_cache, 9, None, 1.0, False, None)
    assert not torch.allclose(absolute, streamed, atol=1e-4)
    # the cache serves only the chunk right after its committed frames
    with pytest.raises(ValueError, match="right after its committed frames"):
        cache.attention_cache(6)


@pytest.mark.parametrize(("policy", "window", "sink"), [("full", None, 0), ("rolling", 3, 1), ("recompute", 3, 1)])
@pytest.mark.parametrize("pivot", [0, 3, 7])
def test_a_fork_equals_independent_rollouts_under_every_policy(policy_pipe, policy, window, sink, pivot):
    pipe = _configure(policy_pipe, policy, window, sink)
    embeds, _ = pipe.encode_prompt(["a red fox jumps", "a blue car in snow"])
    noise = _noise(pipe, 8, 1, batch=2)
    timesteps, sigmas = pipe.get_schedule()
    branch = neighbor_noise(noise.chunk_initial(pivot), 3, 0.5, generator=torch.Generator().manual_seed(1))
    group = forked_rollout(pipe, embeds, noise, pivot, branch, timesteps, sigmas, SIZE, SIZE)
    independent, _ = _generate(
        pipe, embeds.repeat_interleave(3, 0), noise.repeat_interleave(3).with_chunk_initial(pivot, branch)
    )
    assert (group.latents - independent).abs().max() <= 1e-5
    assert not torch.allclose(group.latents[0, :, pivot:], group.latents[1, :, pivot:])
    assert group.prefix_cache.num_frames == pivot and group.prefix_cache.policy == policy


@pytest.mark.parametrize(("policy", "window", "sink"), [("full", 3, 1), ("rolling", 3, 1), ("recompute", 3, 1)])
def test_a_cache_state_loads_back_and_serves_the_same_chunk(policy_pipe, policy, window, sink):
    pipe = _configure(policy_pipe, policy, window, sink)
    embeds, _ = pipe.encode_prompt(["a red fox jumps"])
    clean = torch.randn(1, 3, 6, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    cache = pipe.prepare_cache(1, 6, SIZE, SIZE)
    for f in range(5):
        pipe.commit_chunk(clean[:, :, f : f + 1], embeds, cache, f)
    branches = cache.fork(2)  # a fork is materialized into the state
    metadata, tensors = branches.state()
    loaded = cache_from_state(metadata, {name: t.clone() for name, t in tensors.items()})
    assert type(loaded) is type(cache) and loaded.num_frames == 5 and loaded.batch_size == 2
    x_t = torch.randn(2, 3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = pipe.velocity(
            x_t, torch.tensor(500.0), embeds.expand(2, -1, -1), branches, 5, None, 1.0, False, None
        )
        got = pipe.velocity(x_t, torch.tensor(500.0), embeds.expand(2, -1, -1), loaded, 5, None, 1.0, False, None)
    assert torch.equal(got, expected)


def _working_bytes(pipe, embeds, frames):
    """The allocator's peak while generating, less the returned latents (the video, which the caller keeps)."""
    noise = _noise(pipe, frames, 1)
    peak, (latents, _) = cpu_peak_bytes(_generate, pipe, embeds, noise)
    return peak - latents.numel() * latents.element_size(), peak


def test_rolling_memory_does_not_grow_with_the_video(policy_pipe):
    """2x and 4x the frames: the rolling cache's working memory stays within 5 % of 1x; the full cache's grows."""
    embeds, _ = policy_pipe.encode_prompt(["a red fox jumps"])
    rolling = _configure(policy_pipe, "rolling", 3, 1)
    one, two, four = (_working_bytes(rolling, embeds, frames)[0] for frames in (6, 12, 24))
    assert two <= 1.05 * one and four <= 1.05 * one, (one, two, four)
    full = _configure(policy_pipe, "full", 3, 1)
    full_one, full_four = (_working_bytes(full, embeds, frames)[0] for frames in (6, 24))
    assert full_four > 2 * full_one, (full_one, full_four)
