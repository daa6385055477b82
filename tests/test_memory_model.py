"""The planner's memory model of one transformer block (`planning.costs._saved_block`) against the bytes autograd saves in a real block with a LoRA, exactly."""

from contextlib import nullcontext
from dataclasses import dataclass

import pytest
import torch
from peft import LoraConfig

from trl_arcopo.kv_cache import KVCache
from trl_arcopo.models import CausalWanTransformer3DModel
from trl_arcopo.planning.costs import _LoRALayout, _Pass, _saved_block
from trl_arcopo.planning.inputs import DEFAULT_LORA_TARGETS, TransformerShape
from trl_arcopo.planning.settings import _Precision
from trl_arcopo.policy import add_policy_adapter, prepare_for_training
from trl_arcopo.testing_utils import tiny_transformer


# The measured pass: 2 videos, a chunk of 3 latent frames of 8x8 (16 tokens each with 2x2 patches), 16 prompt tokens;
# a LoRA of rank 4.
BATCH, FRAMES, LATENT, TEXT, RANK = 2, 3, 8, 16, 4
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # benchmarks/plan_vs_measured.py's adapter


@dataclass(frozen=True)
class Setting:
    targets: tuple[str, ...] | str = DEFAULT_LORA_TARGETS
    dtype: torch.dtype = torch.float32  # the transformer's weights (`from_pretrained(torch_dtype=...)`)
    autocast: bool = False  # the forward under bf16 autocast (the GPU setting, here on CPU)
    cached_frames: int = 0  # committed frames in the KV cache before the chunk (its keys are attended)


SETTINGS = {
    "fp32-default": Setting(),
    "fp32-attention": Setting(ATTENTION),
    "fp32-all-linear": Setting("all-linear"),  # LoRAs in the text and time embedders too: both carry a gradient
    "fp32-output-projections": Setting(("to_out.0",)),  # the first block's attention itself needs no gradient
    "fp32-ffn-output": Setting(("ffn.net.2",)),
    "fp32-default-cached-chunk": Setting(cached_frames=3),
    "bf16-weights-default": Setting(dtype=torch.bfloat16),
    "bf16-autocast-default": Setting(dtype=torch.bfloat16, autocast=True),
    "bf16-autocast-attention-cached-chunk": Setting(ATTENTION, torch.bfloat16, autocast=True, cached_frames=3),
}


class _RecordSavedTensors:
    """
    Mixin for a `CausalWanTransformer3DModel` (first in the bases, so that it wraps the model's own `_block`): each
    `_block` call appends to `self.saved_per_block` the bytes autograd saved for the backward during it and whether
    its output needs a gradient. A storage counts once (views of one tensor share it); not counted: parameters
    (frozen weights and LoRA factors), the inputs every block shares (text embeddings, timestep projection, rotary
    tables: the planner counts them once, outside the blocks) and autocast's copies of the LoRA factors (likewise).
    The block's own input is counted when the block keeps it, as the planner does.
    """

    saved_per_block: list[tuple[int, bool]]

    def _block(self, layer, block, hidden_states, encoder_hidden_states, timestep_proj, rotary_emb, *args):
        params = {id(p) for p in self.parameters()}
        shared = (*self.parameters(), encoder_hidden_states, timestep_proj, *rotary_emb)
        excluded = {t.untyped_storage().data_ptr() for t in shared}
        saved = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in excluded and not _is_parameter_copy(t, params):
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = super()._block(layer, block, hidden_states, encoder_hidden_states, timestep_proj, rotary_emb, *args)
        if torch.is_grad_enabled():
            self.saved_per_block.append((sum(saved.values()), out.requires_grad))
        return out


def _is_parameter_copy(t: torch.Tensor, params: set[int]) -> bool:
    """Whether `t` is (a view of) autocast's cast of a parameter: its base's grad_fn is a copy of a leaf parameter."""
    fn = (t._base if t._base is not None else t).grad_fn
    if type(fn).__name__ != "ToCopyBackward0":
        return False
    leaf = fn.next_functions[0][0]
    return id(getattr(leaf, "variable", None)) in params


class MeasuredTransformer(_RecordSavedTensors, CausalWanTransformer3DModel):
    pass


class ClampedBlocks(CausalWanTransformer3DModel):
    """A block that clamps its output (an overflow guard): its backward keeps the unclamped output, one more tensor."""

    def _block(self, *args):
        return super()._block(*args).clamp(-1e4, 1e4)


class MeasuredClampedBlocks(_RecordSavedTensors, ClampedBlocks):
    pass


@dataclass(frozen=True)
class BlockBytes:
    measured: int
    predicted: int
    output_grad: bool  # whether the block's output needs a gradient, measured
    predicted_output_grad: bool


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """
    A tiny transformer's folder: every setting loads it with `from_pretrained`, which keeps diffusers'
    `_keep_in_fp32_modules` (norms, modulation) in float32 under a bf16 `torch_dtype`, as a real run does.
    """
    path = tmp_path_factory.mktemp("tiny-transformer")
    tiny_transformer(num_layers=2).save_pretrained(path)
    return path


def peft_targets(model: torch.nn.Module) -> set[str]:
    """The modules peft wrapped with a LoRA."""
    return {name for name, module in model.named_modules() if hasattr(module, "lora_A")}


def planned_targets(layout: _LoRALayout) -> set[str]:
    blocks = {f"blocks.{i}.{name}" for i, block in enumerate(layout.blocks) for name in block}
    return blocks | set(layout.outer)


def block_bytes(cls: type, checkpoint, setting: Setting) -> tuple[list[BlockBytes], _LoRALayout, torch.nn.Module]:
    """
    One training forward of a chunk through `cls` (a `_RecordSavedTensors` model) with `setting`'s LoRA and
    precision: for each block, the bytes autograd saved and the planner's `_saved_block` for the same pass (chained
    over the blocks as `activation_bytes` does), with both answers to whether the block's output needs a gradient.
    """
    torch.manual_seed(0)
    model = cls.from_pretrained(checkpoint, torch_dtype=setting.dtype)
    add_policy_adapter(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=setting.targets), None, "policy")
    prepare_for_training(model)
    model.train()
    channels, dtype = model.config.in_channels, model.patch_embedding.weight.dtype
    timestep = torch.full((BATCH,), 500.0)
    prompt = torch.randn(BATCH, TEXT, model.config.text_dim, dtype=dtype)
    cache = None
    if setting.cached_frames:
        cache = KVCache.empty(model.cache_layout(LATENT, LATENT), BATCH, setting.cached_frames + FRAMES)
        with torch.no_grad():  # commit the context
            chunk = torch.randn(BATCH, channels, setting.cached_frames, LATENT, LATENT, dtype=dtype)
            model(chunk, timestep, prompt, kv_cache=cache, update_cache=True)
    model.saved_per_block = []
    chunk = torch.randn(BATCH, channels, FRAMES, LATENT, LATENT, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16) if setting.autocast else nullcontext():
        model(chunk, timestep, prompt, kv_cache=cache, frame_offset=setting.cached_frames)

    shape = TransformerShape.from_config(model.config)
    layout = _LoRALayout.build(shape, setting.targets)
    prec = _Precision(weight=setting.dtype.itemsize, autocast=setting.autocast)
    tokens = FRAMES * model.tokens_per_frame(LATENT, LATENT)
    attended = (setting.cached_frames + FRAMES) * model.tokens_per_frame(LATENT, LATENT)
    p = _Pass(tokens=tokens, keys=attended, text=TEXT, frames=FRAMES)
    out, grad = [], layout.patches_grad
    for (measured, output_grad), targets in zip(model.saved_per_block, layout.blocks, strict=True):
        predicted, grad = _saved_block(shape, BATCH, p, targets, RANK, prec, grad, layout.text_grad, layout.time_grad)
        out.append(BlockBytes(measured, predicted, output_grad, grad))
    return out, layout, model


@pytest.mark.parametrize("name", list(SETTINGS))
def test_saved_block_equals_what_autograd_saves(checkpoint, name):
    # Exact equality, no margin: one more saved tensor changes the count by its size, e.g. a [tokens, dim] fp32 one
    # by 9 kB (about 5 % of a block with the default LoRA) and even a per-token statistic [tokens, heads] by 768 bytes.
    blocks, layout, model = block_bytes(MeasuredTransformer, checkpoint, SETTINGS[name])
    assert planned_targets(layout) == peft_targets(model)  # the planner's LoRA layout is the one peft built
    assert len(blocks) == model.config.num_layers
    for layer, b in enumerate(blocks):
        assert (b.measured, b.output_grad) == (b.predicted, b.predicted_output_grad), f"block {layer}: {b}"


def test_a_block_that_keeps_one_more_tensor_fails_the_check(checkpoint):
    blocks, _, model = block_bytes(MeasuredClampedBlocks, checkpoint, SETTINGS["fp32-default"])
    one_tensor = BATCH * FRAMES * model.tokens_per_frame(LATENT, LATENT) * model.config.num_attention_heads
    one_tensor *= model.config.attention_head_dim * 4  # the clamp's input: the block's fp32 output [tokens, dim]
    for layer, b in enumerate(blocks):
        assert b.measured != b.predicted, f"block {layer}: the check missed the extra tensor"
        assert b.measured - b.predicted == one_tensor, f"block {layer}: {b}"
