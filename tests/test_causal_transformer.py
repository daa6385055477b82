import pytest
import torch
from diffusers import WanTransformer3DModel
from peft import LoraConfig

from trl_arcopo import CausalWanTransformer3DModel, SelfForcingPipeline
from trl_arcopo.kv_cache import KVCache
from trl_arcopo.models import block_causal_mask
from trl_arcopo.sampling import x0_from_velocity
from trl_arcopo.shapes import CausalWanX0Transformer3DModel, teacher_forcing_mask
from trl_arcopo.testing_utils import tiny_pipeline, tiny_transformer


FRAMES, CHUNK, H, W = 12, 3, 8, 8  # 4 chunks; 16 tokens per frame with patch 2
TPF = (H // 2) * (W // 2)


@pytest.fixture(scope="module")
def model():
    return tiny_transformer(in_channels=4)


def _inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, FRAMES, H, W, generator=g)
    text = torch.randn(batch, 5, 32, generator=g)
    return x, text


@torch.no_grad()
def test_matches_stock_wan_without_mask(model):
    stock = tiny_transformer(in_channels=4, causal=False)
    x, text = _inputs()
    t = torch.tensor([700.0, 250.0])
    expected = stock(x, t, text).sample
    got = model(x, t, text).sample
    assert (got - expected).abs().max() <= 1e-5


@torch.no_grad()
def test_per_frame_timesteps_equal_scalar_when_constant(model):
    x, text = _inputs()
    scalar = model(x, torch.tensor([400.0, 400.0]), text).sample
    per_frame = model(x, torch.full((2, FRAMES), 400.0), text).sample
    assert torch.equal(scalar, per_frame)
    # and a per-frame timestep only changes the frames it applies to, under a block-causal mask
    t = torch.full((2, FRAMES), 400.0)
    t[:, -CHUNK:] = 900.0
    mask = block_causal_mask(FRAMES, CHUNK, TPF)
    a = model(x, torch.full((2, FRAMES), 400.0), text, attention_mask=mask).sample
    b = model(x, t, text, attention_mask=mask).sample
    assert torch.equal(a[:, :, :-CHUNK], b[:, :, :-CHUNK])
    assert not torch.allclose(a[:, :, -CHUNK:], b[:, :, -CHUNK:])


@torch.no_grad()
def test_streaming_with_cache_equals_block_causal_full_sequence(model):
    """Acceptance: cached streaming == one full forward with the block-causal mask (clean context, 4 chunks)."""
    x, text = _inputs()
    zeros = torch.zeros(2)
    full = model(x, zeros, text, attention_mask=block_causal_mask(FRAMES, CHUNK, TPF)).sample
    cache = KVCache.from_transformer(model, batch_size=2, num_frames=FRAMES, latent_height=H, latent_width=W)
    streamed = []
    for c in range(FRAMES // CHUNK):
        chunk = x[:, :, c * CHUNK : (c + 1) * CHUNK]
        streamed.append(model(chunk, zeros, text, kv_cache=cache, frame_offset=c * CHUNK, update_cache=True).sample)
    assert cache.num_frames == FRAMES
    assert (torch.cat(streamed, dim=2) - full).abs().max() <= 1e-5


@torch.no_grad()
def test_noisy_chunks_with_cache_equal_teacher_forced_sequence(model):
    """Denoising passes on noisy chunks (clean context in the cache) == one teacher-forcing forward [noisy ; clean]."""
    clean, text = _inputs(0)
    noisy, _ = _inputs(1)
    t_noisy = torch.tensor([937.5, 625.0])
    timesteps = torch.cat([t_noisy[:, None].expand(2, FRAMES), torch.zeros(2, FRAMES)], dim=1)  # [B, 2F]
    sequence = torch.cat([noisy, clean], dim=2)
    frame_indices = torch.cat([torch.arange(FRAMES), torch.arange(FRAMES)])
    mask = teacher_forcing_mask(FRAMES, CHUNK, TPF)
    full = model(sequence, timesteps, text, attention_mask=mask, frame_indices=frame_indices).sample

    cache = KVCache.from_transformer(model, batch_size=2, num_frames=FRAMES, latent_height=H, latent_width=W)
    noisy_out = []
    for c in range(FRAMES // CHUNK):
        sl = slice(c * CHUNK, (c + 1) * CHUNK)
        noisy_out.append(model(noisy[:, :, sl], t_noisy, text, kv_cache=cache, frame_offset=c * CHUNK).sample)
        model(clean[:, :, sl], torch.zeros(2), text, kv_cache=cache, frame_offset=c * CHUNK, update_cache=True)
    assert (torch.cat(noisy_out, dim=2) - full[:, :, :FRAMES]).abs().max() <= 1e-5


@torch.no_grad()
def test_local_window_with_sink_equals_masked_full_sequence(model):
    x, text = _inputs()
    window, sink = 6, 3  # a chunk sees the first 3 frames plus the 3 most recent frames (itself)
    cache = KVCache.from_transformer(model, 2, FRAMES, H, W, local_attn_frames=window, sink_frames=sink)
    frame = torch.arange(FRAMES)
    chunk = frame // CHUNK
    visible = (chunk[None, :] == chunk[:, None]) | (
        (chunk[None, :] < chunk[:, None])
        & ((frame[None, :] < sink) | (frame[None, :] >= (chunk[:, None] + 1) * CHUNK - (window - sink)))
    )
    mask = visible.repeat_interleave(TPF, 0).repeat_interleave(TPF, 1)
    full = model(x, torch.zeros(2), text, attention_mask=mask).sample
    streamed = [
        model(
            x[:, :, c * CHUNK : (c + 1) * CHUNK],
            torch.zeros(2),
            text,
            kv_cache=cache,
            frame_offset=c * CHUNK,
            update_cache=True,
        ).sample
        for c in range(FRAMES // CHUNK)
    ]
    assert (torch.cat(streamed, 2) - full).abs().max() <= 1e-5
    # the window really restricts attention: global attention differs on the last chunk
    glob = model(x, torch.zeros(2), text, attention_mask=block_causal_mask(FRAMES, CHUNK, TPF)).sample
    assert not torch.allclose(glob[:, :, -CHUNK:], full[:, :, -CHUNK:], atol=1e-4)


def test_from_wan_shares_weights_and_lora():
    stock = tiny_transformer(in_channels=4, causal=False)
    causal = CausalWanTransformer3DModel.from_wan(stock)
    assert type(causal) is CausalWanTransformer3DModel
    stock_params = dict(stock.named_parameters())
    for name, p in causal.named_parameters():
        assert p is stock_params[name]
    assert CausalWanTransformer3DModel.from_wan(causal) is causal
    stock.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False))
    assert any("lora_A" in n for n, _ in causal.named_parameters())
    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        CausalWanTransformer3DModel.from_wan(torch.nn.Linear(2, 2))


def test_from_pretrained_stock_wan_folder(tmp_path):
    stock = tiny_transformer(in_channels=4, causal=False)
    stock.save_pretrained(tmp_path)
    loaded = CausalWanTransformer3DModel.from_pretrained(tmp_path)
    assert isinstance(loaded, WanTransformer3DModel)
    ref = stock.state_dict()
    got = loaded.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_clear_errors(model):
    x, text = _inputs()
    cache = KVCache.from_transformer(model, 2, 6, H, W)
    with pytest.raises(ValueError, match="too short"):  # committing needs a slot; denoising does not
        model(x, torch.zeros(2), text, kv_cache=cache, update_cache=True)
    with pytest.raises(ValueError, match="commit the chunks before"):
        model(x[:, :, 3:6], torch.zeros(2), text, kv_cache=cache, frame_offset=3)
    with pytest.raises(ValueError, match="not both"):
        model(x, torch.zeros(2), text, kv_cache=cache, attention_mask=block_causal_mask(FRAMES, CHUNK, TPF))
    with pytest.raises(ValueError, match="timestep"):
        model(x, torch.zeros(2, 5), text)


def test_x0_head_gives_velocity_whose_clean_estimate_is_the_head_output(tmp_path):
    torch.manual_seed(0)
    base = tiny_transformer(in_channels=3, patch_size=(1, 2, 2))
    x0_model = CausalWanX0Transformer3DModel.from_config(base.config).eval()
    x0_model.load_state_dict(base.state_dict())
    x_t = torch.randn(2, 3, 3, 8, 8)
    text = torch.randn(2, 4, 32)
    timestep = torch.tensor([[750.0] * 3, [250.0] * 3])  # [B, F]
    with torch.no_grad():
        head = base(x_t, timestep, text, return_dict=False)[0]  # what the shared head outputs: here read as x0
        velocity = x0_model(x_t, timestep, text, return_dict=False)[0]
    sigma = (timestep / 1000)[:, None, :, None, None]
    torch.testing.assert_close(x0_from_velocity(x_t, sigma, velocity), head, atol=1e-5, rtol=1e-5)
    # in a pipeline, saved and reloaded: the class (so the parametrisation) is kept and the videos are identical
    source = tiny_pipeline()
    pipe = SelfForcingPipeline(
        source.tokenizer, source.text_encoder, x0_model, source.scheduler, None, 16, 16, 9,
        source.config.default_max_sequence_length, "ode",
    )  # fmt: skip
    pipe.save_pretrained(tmp_path)
    reloaded = SelfForcingPipeline.from_pretrained(tmp_path)
    assert type(reloaded.transformer) is CausalWanX0Transformer3DModel and reloaded.config.default_sampler == "ode"
    a = pipe("a red fox", generator=torch.Generator().manual_seed(0), output_type="pt").frames
    b = reloaded("a red fox", generator=torch.Generator().manual_seed(0), output_type="pt").frames
    assert torch.equal(a, b)
