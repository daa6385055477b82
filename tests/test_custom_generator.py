"""
A generator that is not Self-Forcing, written in this file as `docs/adding_a_generator.md` shows it (the page includes
the sections between the `--8<--` markers): a transformer with learned frame positions and no Wan code, and a pipeline
of five methods on top of `StreamingGeneratorMixin`. The trainer takes it as it takes `SelfForcingPipeline`.
"""

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from diffusers import ConfigMixin, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.loaders import PeftAdapterMixin
from helpers import redness, tiny_args
from peft import LoraConfig

from trl_arcopo import ARCoPOTrainer, RolloutNoise, StreamingGeneratorMixin
from trl_arcopo.kv_cache import CacheLayout, make_cache
from trl_arcopo.lora_files import load_lora_adapter_weights


# --8<-- [start:model]
class TinyCausalTransformer(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Patches of a chunk attend to themselves and to the committed frames of a cache; positions are learned."""

    @register_to_config
    def __init__(self, in_channels=3, patch=2, dim=32, num_heads=2, num_layers=2, text_dim=32, max_frames=64):
        super().__init__()
        self.patch_in = torch.nn.Linear(in_channels * patch * patch, dim)
        self.frame_embedding = torch.nn.Embedding(max_frames, dim)
        self.time_in = torch.nn.Linear(1, dim)
        self.text_in = torch.nn.Linear(text_dim, dim)
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict({name: torch.nn.Linear(dim, dim) for name in ("to_q", "to_k", "to_v", "to_out")})
            for _ in range(num_layers)
        )
        self.proj_out = torch.nn.Linear(dim, in_channels * patch * patch)

    def cache_layout(self, latent_height, latent_width, dtype=None, device=None) -> CacheLayout:
        """What a cache of this model's keys and values holds (the one Wan-free method a cache needs)."""
        c = self.config
        param = next(self.parameters())
        return CacheLayout(
            num_layers=c.num_layers, num_heads=c.num_heads, head_dim=c.dim // c.num_heads,
            tokens_per_frame=(latent_height // c.patch) * (latent_width // c.patch),
            dtype=dtype or param.dtype, device=device or param.device,
        )  # fmt: skip

    def forward(self, x, timestep, text, kv_cache=None, frame_offset=0, update_cache=False):
        # x: [B, C, F, H, W]; timestep: [B] in [0, 1000]; text: [B, S, text_dim]
        b, c, f, h, w = x.shape
        p, heads = self.config.patch, self.config.num_heads
        tokens = x.reshape(b, c, f, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6).flatten(4).flatten(1, 3)
        frames = torch.arange(frame_offset, frame_offset + f, device=x.device).repeat_interleave(tokens.shape[1] // f)
        hidden = self.patch_in(tokens) + self.frame_embedding(frames)  # [B, N, dim], N = F * (H / p) * (W / p)
        hidden = hidden + self.time_in(timestep[:, None, None] / 1000) + self.text_in(text.mean(1))[:, None]
        start = frame_offset * (h // p) * (w // p)
        if kv_cache is not None:
            kv_cache.check_chunk(start, hidden.shape[1], b, commit=update_cache)
        for i, layer in enumerate(self.layers):
            q, k, v = (layer[name](hidden).unflatten(-1, (heads, -1)) for name in ("to_q", "to_k", "to_v"))
            if kv_cache is not None:  # the committed frames' keys and values, then the chunk's own
                k, v = kv_cache.attended(i, start, k, v, commit=update_cache)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            hidden = hidden + layer["to_out"](out.transpose(1, 2).flatten(2))
        if update_cache:
            kv_cache.advance(hidden.shape[1])
        out = self.proj_out(hidden).unflatten(1, (f, h // p, w // p)).unflatten(-1, (c, p, p))
        return out.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, c, f, h, w)  # the velocity, [B, C, F, H, W]


# --8<-- [end:model]


# --8<-- [start:pipeline]
class TinyStreamingPipeline(DiffusionPipeline, StreamingGeneratorMixin):
    """Pixel-space videos in [-1, 1], a toy text embedding, any cache policy."""

    def __init__(
        self, transformer, scheduler, default_height=16, default_width=16, default_num_frames=6,
        default_num_frames_per_chunk=2, default_sampler="consistency", default_sigmas=None, cache_policy="full",
        local_attn_frames=None, sink_frames=0,
    ):  # fmt: skip
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self.text_encoder = self.vae = None  # the frozen modules the trainer looks for: none here
        self.register_to_config(
            default_height=default_height, default_width=default_width, default_num_frames=default_num_frames,
            default_num_frames_per_chunk=default_num_frames_per_chunk, default_sampler=default_sampler,
            default_sigmas=default_sigmas, cache_policy=cache_policy, local_attn_frames=local_attn_frames,
            sink_frames=sink_frames,
        )  # fmt: skip

    def encode_prompt(self, prompt, max_sequence_length=None, device=None, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else prompt
        dim = self.transformer.config.text_dim
        codes = [torch.tensor([ord(ch) for ch in p[:8].ljust(8)], dtype=torch.float32) for p in prompts]
        embeds = torch.stack([torch.cos(code[:, None] * torch.arange(1, dim + 1) / 97) for code in codes])
        return embeds.to(device or self._execution_device), None  # [B, 8, text_dim]

    def latent_shape(self, batch_size, height, width, num_frames, num_frames_per_chunk):
        if num_frames % num_frames_per_chunk:
            raise ValueError(
                f"`num_frames={num_frames}` is not a multiple of {num_frames_per_chunk} frames per chunk."
            )
        return (batch_size, self.transformer.config.in_channels, num_frames, height, width)

    def prepare_cache(self, batch_size, num_latent_frames, latent_height, latent_width):
        layout = self.transformer.cache_layout(latent_height, latent_width, device=self._execution_device)
        c = self.config
        return make_cache(c.cache_policy, layout, batch_size, num_latent_frames, c.local_attn_frames, c.sink_frames)

    def velocity(self, x, timestep, prompt_embeds, kv_cache, frame_offset, negative_prompt_embeds=None,
                 guidance_scale=1.0, update_cache=False, attention_kwargs=None, transformer=None):  # fmt: skip
        cache, position = kv_cache.attention_cache(frame_offset)  # a recompute cache gives a relative position
        t = torch.as_tensor(timestep, dtype=torch.float32, device=x.device).expand(x.shape[0])
        model = transformer or self.transformer
        return model(x, t, prompt_embeds, kv_cache=cache, frame_offset=position, update_cache=update_cache)

    def decode_latents(self, latents, output_type="pt", batch_size=None):
        return ((latents.clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4)  # [B, F, C, H, W] in [0, 1]


# --8<-- [end:pipeline]


def tiny_streaming_pipeline(**config) -> TinyStreamingPipeline:
    torch.manual_seed(0)
    pipe = TinyStreamingPipeline(TinyCausalTransformer(), FlowMatchEulerDiscreteScheduler(shift=5.0), **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out"])


def _lora(transformer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in transformer.named_parameters() if "lora_" in n}


@pytest.mark.parametrize(("policy", "window", "sink"), [("full", None, 0), ("rolling", 4, 1), ("recompute", 4, 1)])
def test_a_generator_written_in_one_file_trains(tmp_path, policy, window, sink):
    """2 steps move the LoRA; the saved adapter loads into a fresh pipeline and gives the trained videos."""
    pipe = tiny_streaming_pipeline(cache_policy=policy, local_attn_frames=window, sink_frames=sink)
    trainer = ARCoPOTrainer(
        pipeline=pipe,
        reward_funcs=[redness],
        args=tiny_args(tmp_path, denoising_sigmas=None),
        train_dataset=Dataset.from_dict({"prompt": ["a red fox", "a blue car"]}),
        peft_config=LORA,
    )
    before = _lora(pipe.transformer)
    trainer.train()
    after = _lora(pipe.transformer)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    trainer.save_model(str(tmp_path / "adapter"))

    fresh = tiny_streaming_pipeline(cache_policy=policy, local_attn_frames=window, sink_frames=sink)
    fresh.transformer.add_adapter(LORA, adapter_name=trainer.adapter_name)
    load_lora_adapter_weights(fresh.transformer, tmp_path / "adapter", adapter_name=trainer.adapter_name)
    base = tiny_streaming_pipeline(cache_policy=policy, local_attn_frames=window, sink_frames=sink)
    embeds, _ = pipe.encode_prompt(["a red fox"])
    videos = []
    for p in (pipe, fresh, base):
        p.transformer.eval()
        timesteps, sigmas = p.get_schedule()
        noise = RolloutNoise.sample((1, 3, 6, 16, 16), 2, len(timesteps), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            videos.append(p.generate_latents(embeds, noise, p.prepare_cache(1, 4, 16, 16), timesteps, sigmas))
    assert torch.equal(videos[0], videos[1])
    assert not torch.allclose(videos[0], videos[2])


def test_the_trainer_names_what_a_generator_lacks(tmp_path):
    class Incomplete(DiffusionPipeline):
        def __init__(self, transformer):
            super().__init__()
            self.register_modules(transformer=transformer)

    with pytest.raises(TypeError) as error:
        ARCoPOTrainer(Incomplete(TinyCausalTransformer()), [redness], tiny_args(tmp_path))
    message = str(error.value)
    for name in ("encode_prompt", "prepare_cache", "denoise_chunk", "text_encoder", "decode_latents"):
        assert f"`{name}`" in message
    assert "docs/adding_a_generator.md" in message and "`transformer`" not in message
