"""
The generators the field trains, as tiny variants of their converted configs (`trl_arcopo.convert.pipeline_settings`,
with windows scaled to tiny videos): LongLive (rolling cache with a sink), Causal-Forcing++ frame-wise (1 frame per
chunk, 2 steps after a 4-step first chunk) and Krea realtime (recomputed cache). Each trains, resumes bit for bit, and
its saved adapter reproduces the trained videos in a fresh pipeline.
"""

import pytest
import torch
from helpers import StopAt, tiny_trainer

from trl_arcopo import RolloutNoise, forked_rollout, neighbor_noise
from trl_arcopo.convert import pipeline_settings
from trl_arcopo.kv_cache import RecomputeKVCache, RollingKVCache
from trl_arcopo.testing_utils import tiny_pipeline


#: format -> (variant, the tiny overrides: chunk frames, video frames, window)
VARIANTS = {
    "longlive": (
        None,
        dict(default_num_frames_per_chunk=2, default_num_frames=10, local_attn_frames=5, sink_frames=1),
    ),
    "causal-forcing": ("framewise-2step", dict(default_num_frames=6)),
    "krea": (None, dict(default_num_frames_per_chunk=2, default_num_frames=8, local_attn_frames=5, sink_frames=1)),
}


def variant_pipeline(format: str):
    variant, overrides = VARIANTS[format]
    pipe = tiny_pipeline()
    pipe.register_to_config(**{**pipeline_settings(format, variant), **overrides})
    return pipe


def _adapter(trainer):
    return {k: v.clone() for k, v in trainer.adapter_state_dict().items()}


def _run(tmp_path, format, **kwargs):
    defaults = dict(max_steps=4, denoising_sigmas=None, num_iterations=2)
    return tiny_trainer(tmp_path, pipe=variant_pipeline(format), **{**defaults, **kwargs})


def test_the_variants_have_their_reference_settings():
    longlive, causal, krea = (variant_pipeline(f) for f in VARIANTS)
    assert isinstance(longlive.prepare_cache(1, 8, 16, 16), RollingKVCache)
    assert isinstance(krea.prepare_cache(1, 8, 16, 16), RecomputeKVCache)
    timesteps, _ = causal.get_schedule()
    first, _ = causal.get_first_chunk_schedule()
    assert len(timesteps) == 2 and len(first) == 4 and causal.config.default_num_frames_per_chunk == 1
    assert torch.allclose(krea.get_schedule()[0], torch.tensor([1000.0, 937.0, 833.0, 625.0]), atol=0.01)


@torch.no_grad()
def test_the_first_chunk_has_its_own_schedule():
    """Causal-Forcing++: chunk 0 denoised in 4 steps, every later chunk in 2; a fork at chunk 0 records 4 steps."""
    pipe = variant_pipeline("causal-forcing")
    embeds, _ = pipe.encode_prompt(["a red fox jumps"])
    timesteps, sigmas = pipe.get_schedule()
    first = pipe.get_first_chunk_schedule()
    initial = torch.randn(1, 3, 6, 16, 16, generator=torch.Generator().manual_seed(2))
    noise = RolloutNoise.sample((1, 3, 6, 16, 16), 1, 4, generator=torch.Generator().manual_seed(0), latents=initial)
    video = pipe(prompt_embeds=embeds, latents=initial, num_frames=6, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).frames  # fmt: skip
    # by hand: chunk 0 with the first schedule and its 3 re-noises, later chunks with 2 steps and the first re-noise
    cache = pipe.prepare_cache(1, 5, 16, 16)
    chunks = []
    for c in range(6):
        t, s = first if c == 0 else (timesteps, sigmas)
        out = pipe.denoise_chunk(noise.chunk_initial(c), embeds, cache, c, t, s, noise.renoise[:, c, : len(t) - 1])
        if c < 5:
            pipe.commit_chunk(out.x0, embeds, cache, c)
        chunks.append(out.x0)
    assert torch.equal(video, torch.cat(chunks, dim=2))
    # without the first chunk's schedule the video differs
    pipe.register_to_config(default_first_chunk_sigmas=None)
    other = pipe(prompt_embeds=embeds, latents=initial, num_frames=6, output_type="latent",
                 generator=torch.Generator().manual_seed(0)).frames  # fmt: skip
    assert not torch.allclose(other, video)
    pipe.register_to_config(default_first_chunk_sigmas=list(pipe.config.default_sigmas))

    pipe = variant_pipeline("causal-forcing")
    for pivot, steps in ((0, 4), (3, 2)):
        branch = neighbor_noise(noise.chunk_initial(pivot), 2, 0.5, generator=torch.Generator().manual_seed(1))
        group = forked_rollout(
            pipe, embeds, noise, pivot, branch, timesteps, sigmas, 16, 16, first_chunk_schedule=first
        )
        assert group.states.shape[1] == steps
        independent = pipe.generate_latents(
            embeds.repeat_interleave(2, 0), noise.repeat_interleave(2).with_chunk_initial(pivot, branch),
            pipe.prepare_cache(2, 5, 16, 16), timesteps, sigmas, first_chunk_schedule=first,
        )  # fmt: skip
        assert (group.latents - independent).abs().max() <= 1e-5


@pytest.mark.parametrize("format", list(VARIANTS))
def test_each_variant_trains_resumes_and_reloads(tmp_path, format):
    straight = _run(tmp_path / "straight", format)
    before = _adapter(straight)
    straight.train()
    after = _adapter(straight)
    assert any(not torch.equal(before[k], after[k]) for k in before), "4 steps left the LoRA where it started"

    # interrupted right after the checkpoint at step 2, then resumed: the same adapter, bit for bit
    first = _run(tmp_path / "resumed", format, save_strategy="steps", save_steps=2)
    first.add_callback(StopAt(2))
    first.train()
    resumed = _run(tmp_path / "resumed", format)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-2"))
    got = _adapter(resumed)
    assert all(torch.equal(after[k], got[k]) for k in after)

    # the saved adapter, loaded into a fresh pipeline, makes the trained pipeline's videos
    straight.save_model()
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    expected = straight.pipeline("a red fox jumps", generator=generator(), output_type="pt").frames
    fresh = variant_pipeline(format)
    fresh.load_lora_weights(str(tmp_path / "straight"))
    assert torch.equal(fresh("a red fox jumps", generator=generator(), output_type="pt").frames, expected)
    base = variant_pipeline(format)("a red fox jumps", generator=generator(), output_type="pt").frames
    assert not torch.equal(base, expected)
