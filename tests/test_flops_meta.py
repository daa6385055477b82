"""The planner's FLOP closed forms against `torch.utils.flop_counter.FlopCounterMode` on the meta device, at the full
size of the presets' transformers (no memory, no weights): one chunk's forward and backward with a LoRA."""

import pytest
import torch
from peft import LoraConfig
from torch.utils.flop_counter import FlopCounterMode

from trl_arcopo.kv_cache import KVCache
from trl_arcopo.models import CausalWanTransformer3DModel
from trl_arcopo.planning import DEFAULT_LORA_TARGETS, PRESETS
from trl_arcopo.planning.costs import _LoRALayout, _Pass, backward_flops, forward_flops
from trl_arcopo.planning.inputs import TransformerShape
from trl_arcopo.policy import add_policy_adapter


RANK = 8


@pytest.mark.parametrize("name", ["self-forcing-1.3b", "krea-14b"])
def test_chunk_flops_equal_torchs_count_on_the_meta_device(name):
    preset = PRESETS[name]
    config = {k: v for k, v in dict(preset.transformer).items() if not k.startswith("_")}
    video, shape = preset.video, TransformerShape.from_config(config)
    lora_config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(DEFAULT_LORA_TARGETS))
    with torch.device("meta"):
        model = CausalWanTransformer3DModel(**config)
        add_policy_adapter(model, lora_config, None, "default")
        cache = KVCache.from_transformer(model, 1, video.latent_frames, video.latent_height, video.latent_width)
        chunk = torch.empty(1, config["in_channels"], video.num_frames_per_chunk, video.latent_height,
                            video.latent_width)  # fmt: skip
        text = torch.empty(1, video.max_sequence_length, config["text_dim"])
        timestep = torch.empty(1)
    frames, tpf = video.num_frames_per_chunk, cache.tokens_per_frame
    cache.end = 2 * frames * tpf  # the third chunk: it attends to two committed chunks and itself
    with FlopCounterMode(display=False) as forward:
        out = model(chunk, timestep, text, kv_cache=cache, frame_offset=2 * frames, return_dict=False)[0]
    with FlopCounterMode(display=False) as backward:
        out.sum().backward()

    p = _Pass(tokens=frames * tpf, keys=3 * frames * tpf, text=video.max_sequence_length, frames=frames)
    lora = _LoRALayout.build(shape, DEFAULT_LORA_TARGETS)
    assert forward_flops(shape, p, lora, RANK) == forward.get_total_flops()
    # the planner counts the attention backward as the fused kernels run it, which recompute the scores `QK^T` of the
    # self- and the cross-attention: one product more per attention than torch's formula for the backward
    recomputed_scores = shape.num_layers * 2 * p.tokens * (p.keys + p.text) * shape.dim
    assert backward_flops(shape, p, lora, RANK, checkpointing=False) == backward.get_total_flops() + recomputed_scores
