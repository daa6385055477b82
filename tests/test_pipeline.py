import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from trl_arcopo import RolloutNoise, SelfForcingPipeline
from trl_arcopo.models import FramePackingAutoencoder
from trl_arcopo.sampling import get_schedule
from trl_arcopo.testing_utils import tiny_pipeline, tiny_transformer


PROMPT = "a red fox jumps over a blue car"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_output_types(pipe):
    pt = pipe(PROMPT, generator=_gen(), output_type="pt").frames
    assert pt.shape == (1, 9, 3, 16, 16) and pt.min() >= 0 and pt.max() <= 1
    np_frames = pipe(PROMPT, generator=_gen(), output_type="np").frames
    assert np_frames.shape == (1, 9, 16, 16, 3)
    assert np.allclose(np_frames, pt.permute(0, 1, 3, 4, 2).numpy(), atol=1e-6)
    latent = pipe(PROMPT, generator=_gen(), output_type="latent").frames
    assert latent.shape == (1, 3, 9, 16, 16)
    pil = pipe(PROMPT, generator=_gen(), output_type="pil").frames
    assert len(pil) == 1 and len(pil[0]) == 9 and pil[0][0].size == (16, 16)


def test_same_generator_same_video_and_batching(pipe):
    a = pipe(PROMPT, generator=_gen(3), output_type="latent").frames
    b = pipe(PROMPT, generator=_gen(3), output_type="latent").frames
    c = pipe(PROMPT, generator=_gen(4), output_type="latent").frames
    assert torch.equal(a, b) and not torch.allclose(a, c)
    two = pipe([PROMPT, PROMPT], generator=[_gen(3), _gen(4)], output_type="latent").frames
    assert (two[0] - a[0]).abs().max() <= 1e-5 and (two[1] - c[0]).abs().max() <= 1e-5


def test_changing_chunk_noise_keeps_earlier_chunks_bit_identical(pipe):
    """Acceptance: chunk k's initial noise only affects chunks >= k."""
    embeds, _ = pipe.encode_prompt(PROMPT)
    shape = pipe.latent_shape(1, 16, 16, 9, 3)
    noise = RolloutNoise.sample(shape, 3, 4, generator=_gen(0))
    timesteps, sigmas = pipe.get_schedule()
    for k in (1, 2):
        other = noise.with_chunk_initial(k, torch.randn(1, 3, 3, 16, 16, generator=_gen(9)))
        a = pipe.generate_latents(embeds, noise, pipe.prepare_cache(1, 9, 16, 16), timesteps, sigmas)
        b = pipe.generate_latents(embeds, other, pipe.prepare_cache(1, 9, 16, 16), timesteps, sigmas)
        assert torch.equal(a[:, :, : 3 * k], b[:, :, : 3 * k])
        assert not torch.allclose(a[:, :, 3 * k :], b[:, :, 3 * k :])


def test_latents_are_the_initial_noise(pipe):
    shape = pipe.latent_shape(1, 16, 16, 9, 3)
    latents = torch.randn(shape, generator=_gen(5))
    a = pipe(PROMPT, latents=latents, generator=_gen(1), output_type="latent").frames
    noise = RolloutNoise.sample(shape, 3, 4, generator=_gen(1), latents=latents)
    embeds, _ = pipe.encode_prompt(PROMPT)
    b = pipe.generate_latents(embeds, noise, pipe.prepare_cache(1, 9, 16, 16), *pipe.get_schedule())
    assert torch.equal(a, b)


def test_ode_sampler_and_guidance(pipe):
    a = pipe(PROMPT, generator=_gen(1), output_type="latent", sampler="ode").frames
    shape = pipe.latent_shape(1, 16, 16, 9, 3)
    b = pipe(
        PROMPT, latents=torch.randn(shape, generator=_gen(1)), generator=_gen(7), output_type="latent", sampler="ode"
    ).frames
    assert torch.equal(a, b)  # the ODE sampler draws nothing after the initial noise
    cfg = pipe(PROMPT, generator=_gen(1), output_type="latent", guidance_scale=4.0, negative_prompt="night").frames
    plain = pipe(PROMPT, generator=_gen(1), output_type="latent").frames
    assert cfg.shape == plain.shape and not torch.allclose(cfg, plain)


def test_recorded_trajectory_is_reproduced_by_predict_x0(pipe):
    """The rollout's stored x̂0 and a later recomputation share one code path: equal bit for bit."""
    embeds, _ = pipe.encode_prompt([PROMPT] * 3)
    shape = pipe.latent_shape(3, 16, 16, 9, 3)
    noise = RolloutNoise.sample(shape, 3, 4, generator=_gen(2))
    timesteps, sigmas = pipe.get_schedule()
    cache = pipe.prepare_cache(3, 9, 16, 16)
    pipe.generate_latents(
        embeds, RolloutNoise(noise.initial[:, :, :3], noise.renoise[:, :1], 3), cache, timesteps, sigmas
    )
    out = pipe.denoise_chunk(
        noise.chunk_initial(1), embeds, cache, 3, timesteps, sigmas, noise.chunk_renoise(1), record_trajectory=True
    )
    assert out.states.shape == (3, 4, 3, 3, 16, 16) and torch.equal(out.x0, out.x0_preds[:, -1])
    for j in range(4):
        again = pipe.predict_x0(out.states[:, j], timesteps[j], sigmas[j].item(), embeds, cache, 3)
        assert torch.equal(again, out.x0_preds[:, j])


def test_save_and_load_roundtrip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = SelfForcingPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.vae is None and loaded.config.default_height == 16
    a = pipe(PROMPT, generator=_gen(0), output_type="pt").frames
    b = loaded(PROMPT, generator=_gen(0), output_type="pt").frames
    assert torch.equal(a, b)


def test_vae_pipeline_and_stock_transformer(tmp_path):
    pipe = tiny_pipeline(with_vae=True)
    video = pipe(PROMPT, num_frames=9, num_frames_per_chunk=1, generator=_gen(0), output_type="pt").frames
    assert video.shape == (1, 9, 3, 32, 32)
    stock = tiny_transformer(in_channels=16, causal=False)
    pipe_stock = SelfForcingPipeline(pipe.tokenizer, pipe.text_encoder, stock, pipe.scheduler, pipe.vae, 32, 32, 9, 16)
    pipe_stock.set_progress_bar_config(disable=True)
    again = pipe_stock(PROMPT, num_frames=9, num_frames_per_chunk=1, generator=_gen(0), output_type="pt").frames
    assert torch.equal(video, again)
    pipe.save_pretrained(tmp_path)
    assert SelfForcingPipeline.from_pretrained(tmp_path).vae is not None


def test_frame_packing_is_exact_with_the_documented_layout(tmp_path):
    packer = FramePackingAutoencoder(in_channels=2, scale_factor_temporal=3, scale_factor_spatial=2)
    video = torch.randn(2, 2, 6, 4, 6)  # [B, C, F, H, W]
    z = packer.encode(video)
    assert z.shape == (2, 2 * 3 * 4, 2, 2, 3) and packer.config.z_dim == 24
    for c, tau, i, j, f, y, x in np.ndindex(2, 3, 2, 2, 2, 2, 3):  # channel (c·t + τ)·s² + i·s + j
        assert torch.equal(
            z[:, (c * 3 + tau) * 4 + i * 2 + j, f, y, x], video[:, c, f * 3 + tau, y * 2 + i, x * 2 + j]
        )
    assert torch.equal(packer.decode(z, return_dict=False)[0], video) and torch.equal(packer.decode(z).sample, video)
    packer.save_pretrained(tmp_path)
    reloaded = FramePackingAutoencoder.from_pretrained(tmp_path)
    keys = ("in_channels", "scale_factor_temporal", "scale_factor_spatial", "z_dim", "latents_mean", "latents_std")
    assert all(reloaded.config[k] == packer.config[k] for k in keys)
    assert torch.equal(reloaded.encode(video), z)
    with pytest.raises(ValueError, match="`num_frames=5` must be a positive multiple .* `scale_factor_temporal=3`"):
        packer.encode(video[:, :, :5])
    with pytest.raises(ValueError, match="Expected 2 channels"):
        packer.encode(torch.zeros(1, 3, 3, 4, 4))
    with pytest.raises(ValueError, match="Expected 24 latent channels"):
        packer.decode(torch.zeros(1, 9, 1, 2, 2))
    with pytest.raises(ValueError, match="`z_dim=16` must be"):
        FramePackingAutoencoder(3, 3, z_dim=16)
    with pytest.raises(ValueError, match="`latents_mean` must be 0"):
        FramePackingAutoencoder(1, 1, latents_mean=[0.5])


def test_frame_packed_pipeline_decodes_its_latents_and_saves(tmp_path):
    pipe = tiny_pipeline(pack_frames=True)
    latents = pipe(PROMPT, generator=_gen(0), output_type="latent").frames
    assert latents.shape == (1, 9, 3, 16, 16)  # 9 frames = 3 latent frames of 3 packed frames, one per chunk
    video = pipe(PROMPT, generator=_gen(0), output_type="pt").frames
    expected = (pipe.vae.decode(latents, return_dict=False)[0] / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
    assert video.shape == (1, 9, 3, 16, 16) and (video - expected).abs().max() <= 1e-6
    # the default chunk is the pipeline's (one latent frame); an explicit 1 is the same video
    assert torch.equal(pipe(PROMPT, generator=_gen(0), output_type="pt", num_frames_per_chunk=1).frames, video)
    pipe.save_pretrained(tmp_path)
    loaded = SelfForcingPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vae, FramePackingAutoencoder) and loaded.config.default_num_frames_per_chunk == 1
    assert (loaded(PROMPT, generator=_gen(0), output_type="pt").frames - video).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="`num_frames=10` must be a positive multiple"):
        pipe(PROMPT, num_frames=10)
    with pytest.raises(ValueError, match="use e.g. `num_frames=9`"):
        pipe(PROMPT, num_frames=6, num_frames_per_chunk=3)


def _lora_pipe():
    pipe = tiny_pipeline()
    pipe.transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    )
    return pipe


def test_lora_save_load_and_stock_wan_pipeline(tmp_path):
    pipe = _lora_pipe()
    tr = pipe.transformer
    SelfForcingPipeline.save_lora_weights(
        tmp_path,
        transformer_lora_layers=get_peft_model_state_dict(tr),
        transformer_lora_adapter_metadata=tr.peft_config["default"].to_dict(),
    )
    assert (tmp_path / "pytorch_lora_weights.safetensors").exists()
    expected = pipe(PROMPT, generator=_gen(0), output_type="pt").frames

    fresh = tiny_pipeline()
    base = fresh(PROMPT, generator=_gen(0), output_type="pt").frames
    assert not torch.allclose(base, expected)
    fresh.load_lora_weights(tmp_path)
    assert torch.equal(fresh(PROMPT, generator=_gen(0), output_type="pt").frames, expected)

    # stock diffusers: WanPipeline loads the same file into a plain WanTransformer3DModel
    stock = tiny_transformer(in_channels=3, causal=False)
    wan = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=pipe.scheduler, transformer=stock)
    wan.load_lora_weights(tmp_path)
    x = torch.randn(1, 3, 9, 16, 16, generator=_gen(1))
    text = torch.randn(1, 16, 32, generator=_gen(2))
    t = torch.tensor([500.0])
    with torch.no_grad():
        assert (wan.transformer(x, t, text).sample - tr(x, t, text).sample).abs().max() <= 1e-5


def test_callback_on_chunk_end_switches_the_adapter_for_later_chunks():
    """Adapter off after chunk 0 == chunk 0 streamed with the adapter, then chunks 1.. without it on the same cache."""
    pipe = _lora_pipe()
    seen = []

    def first_chunk_only(pipeline, chunk_index):
        seen.append(chunk_index)
        if chunk_index == 0:
            pipeline.transformer.disable_adapters()

    split = pipe(PROMPT, generator=_gen(0), output_type="latent", callback_on_chunk_end=first_chunk_only).frames
    pipe.transformer.enable_adapters()
    assert seen == [0, 1, 2]

    embeds, _ = pipe.encode_prompt(PROMPT)
    noise = RolloutNoise.sample(pipe.latent_shape(1, 16, 16, 9, 3), 3, 4, generator=_gen(0))
    timesteps, sigmas = pipe.get_schedule()
    cache = pipe.prepare_cache(1, 9, 16, 16)
    with torch.no_grad():
        first = pipe.generate_latents(embeds, noise, cache, timesteps, sigmas, end_chunk=1)
        pipe.transformer.disable_adapters()
        rest = pipe.generate_latents(embeds, noise, cache, timesteps, sigmas, start_chunk=1)
        pipe.transformer.enable_adapters()
    assert torch.equal(split, torch.cat([first, rest], dim=2))
    with_adapter = pipe(PROMPT, generator=_gen(0), output_type="latent").frames
    assert torch.equal(split[:, :, :3], with_adapter[:, :, :3]) and not torch.allclose(split, with_adapter)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_frames=8), "multiple of `num_frames_per_chunk=3`; use e.g. `num_frames=9`"),
        (dict(height=15), "divisible by 2"),
        (dict(output_type="gif"), "output_type"),
        (dict(sampler="euler"), "sampler"),
        (dict(num_frames_per_chunk=0), "num_frames_per_chunk"),
    ],
)
def test_bad_input_errors(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(PROMPT, **kwargs)


def test_bad_input_errors_vae():
    pipe = tiny_pipeline(with_vae=True)
    with pytest.raises(ValueError, match="1 \\+ a multiple of the VAE's temporal factor 4"):
        pipe(PROMPT, num_frames=8, num_frames_per_chunk=1)
    with pytest.raises(ValueError, match="divisible by 16"):
        pipe(PROMPT, height=24)
    with pytest.raises(ValueError, match="use e.g. `num_frames=9`"):
        pipe(PROMPT, num_frames=5, num_frames_per_chunk=3)


def test_cache_too_short_error(pipe):
    embeds, _ = pipe.encode_prompt(PROMPT)
    noise = RolloutNoise.sample(pipe.latent_shape(1, 16, 16, 9, 3), 3, 4, generator=_gen(0))
    with pytest.raises(ValueError, match="too short for the requested video.*num_frames>=6"):
        pipe.generate_latents(embeds, noise, pipe.prepare_cache(1, 3, 16, 16), *pipe.get_schedule())
    # the last chunk is never committed: a cache of the video's frames less one chunk is enough
    assert pipe.generate_latents(embeds, noise, pipe.prepare_cache(1, 6, 16, 16), *pipe.get_schedule()).shape[2] == 9


def test_prompt_xor_embeds(pipe):
    with pytest.raises(ValueError, match="exactly one"):
        pipe()


def test_pipeline_defaults_for_sampler_and_schedule_are_used_and_saved(tmp_path):
    source = tiny_pipeline()
    pipe = SelfForcingPipeline(
        source.tokenizer, source.text_encoder, source.transformer, source.scheduler, None, 16, 16, 9,
        source.config.default_max_sequence_length, default_sampler="ode", default_sigmas=[1.0, 0.5],
    )  # fmt: skip
    timesteps, sigmas = pipe.get_schedule()
    assert len(timesteps) == 2 and sigmas.tolist() == pytest.approx(
        get_schedule(pipe.scheduler, [1.0, 0.5])[1].tolist()
    )
    pipe.save_pretrained(tmp_path)
    reloaded = SelfForcingPipeline.from_pretrained(tmp_path)
    a = reloaded("a red fox", generator=torch.Generator().manual_seed(0), output_type="pt").frames
    b = source(
        "a red fox", generator=torch.Generator().manual_seed(0), output_type="pt", sampler="ode", sigmas=[1.0, 0.5]
    ).frames
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="default_sampler='sde'"):
        SelfForcingPipeline(
            source.tokenizer, source.text_encoder, source.transformer, source.scheduler, default_sampler="sde"
        )


def test_check_inputs_refuses_unusable_arguments_before_any_work():
    pipe = tiny_pipeline()
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    cases = [
        (dict(prompt="a fox", output_type="mp4"), "output_type='mp4'"),
        (dict(prompt=None), "exactly one of `prompt` and `prompt_embeds`"),
        (dict(prompt=3), "`prompt` must be a string or a list of strings, got int"),
        (dict(prompt="a fox", sampler="sde"), "`sampler='sde'` is not a sampler"),
        (dict(prompt="a fox", guidance_scale=0.5), r"`guidance_scale=0.5` must be at least 1"),
        (dict(prompt="a fox", num_videos_per_prompt=0), "`num_videos_per_prompt=0` must be at least 1"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            pipe(**kwargs)
    assert calls == []  # refused before the transformer ran
