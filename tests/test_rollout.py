import pytest
import torch

from trl_arcopo import RolloutNoise, forked_rollout, neighbor_noise


G = 4


def _setup(pipe, batch=2, seed=0):
    embeds, _ = pipe.encode_prompt(["a red fox jumps", "a blue car in snow"][:batch])
    shape = pipe.latent_shape(batch, 16, 16, 9, 3)
    noise = RolloutNoise.sample(shape, 3, 4, generator=torch.Generator().manual_seed(seed))
    return embeds, noise


@pytest.mark.parametrize("pivot", [0, 1, 2])
def test_forked_group_equals_independent_rollouts(pipe, pivot):
    """Acceptance: prefix once + G forked branches == B * G independent rollouts with the same noises."""
    embeds, noise = _setup(pipe)
    timesteps, sigmas = pipe.get_schedule()
    branch = neighbor_noise(noise.chunk_initial(pivot), G, 0.5, generator=torch.Generator().manual_seed(1))
    group = forked_rollout(pipe, embeds, noise, pivot, branch, timesteps, sigmas, 16, 16)
    assert group.latents.shape == (2 * G, 3, 9, 16, 16)
    assert group.states.shape == (2 * G, 4, 3, 3, 16, 16)

    independent_noise = noise.repeat_interleave(G).with_chunk_initial(pivot, branch)
    with torch.no_grad():
        independent = pipe.generate_latents(
            embeds.repeat_interleave(G, 0), independent_noise, pipe.prepare_cache(2 * G, 9, 16, 16), timesteps, sigmas
        )
    assert (group.latents - independent).abs().max() <= 1e-5
    # the branches of one group share the prefix exactly and differ from the pivot on
    first = group.latents[:G]
    assert torch.equal(first[:, :, : 3 * pivot], first[:1, :, : 3 * pivot].expand(G, -1, -1, -1, -1))
    assert not torch.allclose(first[0, :, 3 * pivot :], first[1, :, 3 * pivot :])
    # the recorded pivot trajectory is the one that produced the pivot chunk
    assert torch.equal(group.x0_preds[:, -1], group.latents[:, :, 3 * pivot : 3 * pivot + 3])
    assert torch.equal(group.states[:, 0], branch)
    assert group.prefix_cache.num_frames == 3 * pivot and group.prefix_cache.batch_size == 2
    # every chunk costs 4 denoising + 1 commit pass (the last chunk is not committed); the prefix is paid once per
    # prompt, not once per branch
    assert group.num_forward_passes == 2 * pivot * 5 + 2 * G * ((3 - pivot) * 5 - 1)
    # the prefix is stored once per prompt; each branch stores the chunks it commits after it (the last excluded)
    chunk_bytes = 2 * 2 * 3 * 64 * 2 * 12 * 4  # K and V, 2 layers, 3 frames x 64 tokens, 2 heads x 12, fp32
    assert group.prefix_cache.nbytes == 2 * pivot * chunk_bytes
    assert group.branch_cache_bytes == 2 * G * (2 - pivot) * chunk_bytes


@pytest.mark.parametrize("pivot", [0, 1, 2])
@pytest.mark.parametrize("exploration", ["neighbors", "sde"])
def test_sub_batched_rollout_equals_one_batch_bit_for_bit(pipe, pivot, exploration):
    """`rollout_batch_size`: the branches in sequential sub-batches from one prefix give the same bits."""
    embeds, noise = _setup(pipe)
    timesteps, sigmas = pipe.get_schedule()
    generator = torch.Generator().manual_seed(1)
    if exploration == "neighbors":
        branch, renoise = neighbor_noise(noise.chunk_initial(pivot), G, 0.5, generator=generator), None
    else:
        branch = noise.chunk_initial(pivot).repeat_interleave(G, 0)
        renoise = torch.randn((2 * G, *noise.chunk_renoise(pivot).shape[1:]), generator=generator)
    whole = forked_rollout(pipe, embeds, noise, pivot, branch, timesteps, sigmas, 16, 16, "consistency", renoise)
    for size in (1, 3, G):
        sub = forked_rollout(
            pipe, embeds, noise, pivot, branch, timesteps, sigmas, 16, 16, "consistency", renoise, size
        )
        for name in ("latents", "states", "x0_preds"):
            assert torch.equal(getattr(sub, name), getattr(whole, name)), (size, name)
        assert sub.num_forward_passes == whole.num_forward_passes
        # the branches' cache holds one sub-batch at a time
        assert sub.branch_cache_bytes * 2 * G == whole.branch_cache_bytes * size


def test_forked_rollout_errors(pipe):
    embeds, noise = _setup(pipe)
    timesteps, sigmas = pipe.get_schedule()
    branch = torch.zeros(2 * G, 3, 3, 16, 16)
    with pytest.raises(ValueError, match="pivot=3"):
        forked_rollout(pipe, embeds, noise, 3, branch, timesteps, sigmas, 16, 16)
    with pytest.raises(ValueError, match="multiple of 2 prompts"):
        forked_rollout(pipe, embeds, noise, 1, branch[:3], timesteps, sigmas, 16, 16)
