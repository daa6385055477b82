"""
Prompt switches during a video: LongLive's re-cache equals encoding the window from scratch under the new prompt,
Krea's recomputed context follows the prompt, and the interpolation blends the two prompts as Krea does.
"""

import pytest
import torch

from trl_arcopo import RolloutNoise
from trl_arcopo.generator import PromptSchedule
from trl_arcopo.testing_utils import tiny_pipeline


SIZE, TPF = 16, 64  # 16x16 pixels: 64 tokens per frame


@pytest.fixture(scope="module")
def switch_pipe():
    return tiny_pipeline()


def _configure(pipe, policy, window, sink):
    pipe.register_to_config(cache_policy=policy, local_attn_frames=window, sink_frames=sink)
    return pipe


def _committed_under_a(pipe, frames: int, chunk: int, seed: int):
    """A cache holding `frames` random clean frames committed under prompt A; the prompts A and B, the clean frames."""
    a, _ = pipe.encode_prompt(["a red fox jumps"])
    b, _ = pipe.encode_prompt(["a blue car in snow"])
    clean = torch.randn(1, 3, frames, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    cache = pipe.prepare_cache(1, frames + chunk, SIZE, SIZE)
    for start in range(0, frames, chunk):
        pipe.commit_chunk(clean[:, :, start : start + chunk], a, cache, start)
    return cache, a, b, clean


def _mask(blocks: list[int]) -> torch.Tensor:
    """Block-causal over frames with these block ids, `[N, N]` in tokens."""
    block = torch.tensor(blocks).repeat_interleave(TPF)
    return block[:, None] >= block[None, :]


@pytest.mark.parametrize("policy", ["full", "rolling"])
@torch.no_grad()
def test_a_recache_equals_encoding_the_window_from_scratch_under_the_new_prompt(switch_pipe, policy):
    """
    Chunks of 2 frames, a window of 6 with 2 sink frames: after 8 frames under prompt A, the switch to B re-encodes
    frames 0-1 (sink) and 6-7 (recent); the next chunk equals one masked forward over frames 0, 1, 6, 7 (clean) and
    the noisy chunk 8-9 under B, at their own positions, within 1e-5.
    """
    pipe = _configure(switch_pipe, policy, 6, 2)
    cache, _, b, clean = _committed_under_a(pipe, 8, 2, seed=0)
    x_t = torch.randn(1, 3, 2, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    t = torch.tensor(750.0)
    stale = pipe.velocity(x_t, t, b, cache, 8)
    pipe.recache(cache, clean, b, 2)
    switched = pipe.velocity(x_t, t, b, cache, 8)

    frames = [0, 1, 6, 7]
    sequence = torch.cat([clean[:, :, frames], x_t], dim=2)
    timestep = torch.tensor([[0.0, 0.0, 0.0, 0.0, 750.0, 750.0]])
    full = pipe.transformer(
        sequence, timestep, b, attention_mask=_mask([0, 0, 1, 1, 2, 2]), frame_indices=torch.tensor(frames + [8, 9]),
        return_dict=False,
    )[0][:, :, 4:]  # fmt: skip
    assert (switched - full).abs().max() <= 1e-5
    assert not torch.allclose(stale, switched, atol=1e-4)  # the keys made under A are not the re-cached ones
    # the cache goes on: the next commit and chunk read the re-encoded frames
    pipe.commit_chunk(x_t, b, cache, 8)
    assert cache.num_frames == 10


@torch.no_grad()
def test_full_and_rolling_caches_switch_to_the_same_video(switch_pipe):
    embeds, _ = switch_pipe.encode_prompt(["a red fox jumps"])
    other, _ = switch_pipe.encode_prompt(["a blue car in snow"])
    noise = RolloutNoise.sample((1, 3, 16, SIZE, SIZE), 2, 4, generator=torch.Generator().manual_seed(2))
    timesteps, sigmas = switch_pipe.get_schedule()
    videos = {}
    for policy in ("full", "rolling"):
        pipe = _configure(switch_pipe, policy, 6, 2)
        schedule = PromptSchedule({4: other})
        videos[policy] = pipe.generate_latents(
            embeds, noise, pipe.prepare_cache(1, 14, SIZE, SIZE), timesteps, sigmas, prompt_schedule=schedule
        )
    assert torch.equal(videos["full"], videos["rolling"])
    # the switch changes the chunks from 4 on, and only them
    pipe = _configure(switch_pipe, "full", 6, 2)
    plain = pipe.generate_latents(embeds, noise, pipe.prepare_cache(1, 14, SIZE, SIZE), timesteps, sigmas)
    assert torch.equal(plain[:, :, :8], videos["full"][:, :, :8])
    assert not torch.allclose(plain[:, :, 8:], videos["full"][:, :, 8:], atol=1e-4)
    # without the re-cache, the chunk after the switch reads keys made under the old prompt: another video
    kept = pipe.generate_latents(
        embeds, noise, pipe.prepare_cache(1, 14, SIZE, SIZE), timesteps, sigmas,
        prompt_schedule=PromptSchedule({4: other}, recache=False),
    )  # fmt: skip
    assert not torch.allclose(kept[:, :, 8:], videos["full"][:, :, 8:], atol=1e-4)


@torch.no_grad()
def test_the_pipeline_switches_prompts(switch_pipe):
    pipe = _configure(switch_pipe, "rolling", 6, 2)
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    switched = pipe(
        "a red fox jumps", num_frames=12, num_frames_per_chunk=2, output_type="latent", generator=generator(),
        prompt_switches={3: "a blue car in snow"},
    ).frames  # fmt: skip
    embeds, _ = pipe.encode_prompt(["a red fox jumps"])
    other, _ = pipe.encode_prompt(["a blue car in snow"])
    timesteps, sigmas = pipe.get_schedule()
    noise = RolloutNoise.sample((1, 3, 12, SIZE, SIZE), 2, 4, generator=generator())
    expected = pipe.generate_latents(
        embeds, noise, pipe.prepare_cache(1, 10, SIZE, SIZE), timesteps, sigmas,
        prompt_schedule=PromptSchedule({3: other}),
    )  # fmt: skip
    assert torch.equal(switched, expected)
    with pytest.raises(ValueError, match="one prompt per prompt"):
        pipe("a red fox", num_frames=12, num_frames_per_chunk=2, prompt_switches={3: ["a", "b"]})


def test_interpolation_blends_the_prompts_over_chunks():
    old, new, newer = torch.zeros(1, 2, 4), torch.ones(1, 2, 4), torch.full((1, 2, 4), 3.0)
    schedule = PromptSchedule({2: new, 8: newer}, recache=False, interpolation_chunks=3)
    weights = [schedule.embeds_at(c, old)[0, 0, 0].item() for c in range(11)]
    # Krea: lerp(old, new, linspace(0, 1, 3)) over chunks 2, 3, 4, then the new prompt
    assert weights == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, 3.0]
    assert PromptSchedule({2: new}).embeds_at(2, old).eq(1).all()
    with pytest.raises(ValueError, match="at least 1"):
        PromptSchedule({0: new})


@torch.no_grad()
def test_a_recompute_cache_rebuilds_its_context_under_the_new_prompt(switch_pipe):
    """Krea: at a switch the context (frame 0 and the 2 latest) is re-encoded under the new prompt, at 0..2."""
    pipe = _configure(switch_pipe, "recompute", 6, 1)
    cache, _, b, clean = _committed_under_a(pipe, 9, 3, seed=4)
    pipe.recache(cache, clean, b, 3)
    x_t = torch.randn(1, 3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    switched = pipe.velocity(x_t, torch.tensor(500.0), b, cache, 9)
    sequence = torch.cat([clean[:, :, [0, 7, 8]], x_t], dim=2)
    timestep = torch.tensor([[0.0, 0.0, 0.0, 500.0, 500.0, 500.0]])
    full = pipe.transformer(sequence, timestep, b, attention_mask=_mask([0, 0, 0, 1, 1, 1]), return_dict=False)[0]
    assert (switched - full[:, :, 3:]).abs().max() <= 1e-5
