# Copyright 2026 The trl_arcopo contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""What one transformer pass costs: the LoRA layout, parameter counts, forward and backward FLOPs, and the activations autograd keeps."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .inputs import DEFAULT_LORA_TARGETS, TransformerShape
from .settings import _Precision


# ---------------------------------------------------------------------------------------------------- modules
# The linear layers of one block of the causal Wan transformer: (name, in, out, rows) where rows is "tokens" (the
# chunk's video tokens) or "text" (the prompt's tokens).
def _block_linears(shape: TransformerShape) -> list[tuple[str, int, int, str]]:
    d, f = shape.dim, shape.ffn_dim
    out = [(f"attn1.{m}", d, d, "tokens") for m in ("to_q", "to_k", "to_v", "to_out.0")]
    out += [("attn2.to_q", d, d, "tokens"), ("attn2.to_k", d, d, "text"), ("attn2.to_v", d, d, "text")]
    out += [("attn2.to_out.0", d, d, "tokens"), ("ffn.net.0.proj", d, f, "tokens"), ("ffn.net.2", f, d, "tokens")]
    return out


def _outer_linears(shape: TransformerShape) -> list[tuple[str, int, int, str]]:
    """Linear layers outside the blocks (rows: "tokens", "text" or "frames"); the patch embedding is a linear map too."""
    d = shape.dim
    return [
        ("patch_embedding", shape.in_channels * shape.patch_volume, d, "tokens"),
        ("condition_embedder.time_embedder.linear_1", shape.freq_dim, d, "frames"),
        ("condition_embedder.time_embedder.linear_2", d, d, "frames"),
        ("condition_embedder.time_proj", d, 6 * d, "frames"),
        ("condition_embedder.text_embedder.linear_1", shape.text_dim, d, "text"),
        ("condition_embedder.text_embedder.linear_2", d, d, "text"),
        ("proj_out", d, shape.out_channels * shape.patch_volume, "tokens"),
    ]


def _matches(name: str, targets: Sequence[str] | str) -> bool:
    """
    peft's `target_modules` matching: a regex on the full name, or a name that is a key or ends with `.key`;
    `"all-linear"` is every `nn.Linear` (peft keeps the output layer of a model without output embeddings, here
    `proj_out`, and skips the patch embedding, a convolution).
    """
    if isinstance(targets, str):
        if targets == "all-linear":
            return name != "patch_embedding"
        return re.fullmatch(targets, name) is not None
    return any(name == key or name.endswith("." + key) for key in targets)


@dataclass(frozen=True)
class _LoRALayout:
    """Which linear layers carry the adapter: per block (relative names) and outside the blocks."""

    blocks: tuple[frozenset, ...]
    outer: frozenset

    @classmethod
    def build(cls, shape: TransformerShape, targets: Sequence[str] | str) -> _LoRALayout:
        blocks = tuple(
            frozenset(n for n, *_ in _block_linears(shape) if _matches(f"blocks.{i}.{n}", targets))
            for i in range(shape.num_layers)
        )
        outer = frozenset(n for n, *_ in _outer_linears(shape) if _matches(n, targets))
        if not any(blocks) and not outer:
            raise ValueError(
                f"`lora_target_modules={targets!r}` matches no linear layer of the transformer; use names such as "
                f"{list(DEFAULT_LORA_TARGETS)}."
            )
        return cls(blocks, outer)

    def tensor_sizes(self, shape: TransformerShape, r: int) -> list[int]:
        """Elements of every LoRA factor: `A` `[r, in]` and `B` `[out, r]` of each targeted layer."""
        sizes = [s for b in self.blocks for n, i, o, _ in _block_linears(shape) if n in b for s in (r * i, o * r)]
        return sizes + [s for n, i, o, _ in _outer_linears(shape) if n in self.outer for s in (r * i, o * r)]

    def num_parameters(self, shape: TransformerShape, r: int) -> int:
        return sum(self.tensor_sizes(shape, r))

    @property
    def patches_grad(self) -> bool:
        """Whether the first block's input (the patch embedding) carries a gradient: a LoRA on the patch embedding."""
        return "patch_embedding" in self.outer

    @property
    def text_grad(self) -> bool:
        """Whether the text embeddings the blocks read carry a gradient: a LoRA in the text embedder."""
        return any(n.startswith("condition_embedder.text_embedder.") for n in self.outer)

    @property
    def time_grad(self) -> bool:
        """Whether the timestep projection (the blocks' modulation) carries a gradient: a LoRA in the time embedder."""
        return any(
            n.startswith(("condition_embedder.time_embedder.", "condition_embedder.time_proj")) for n in self.outer
        )

    def block_parameters(self, shape: TransformerShape, r: int) -> int:
        """LoRA parameters of the block with the most (what FSDP gathers per block)."""
        linears = _block_linears(shape)
        return max(sum(r * (i + o) for n, i, o, _ in linears if n in block) for block in self.blocks)


def count_parameters(cls, config: Mapping, **kwargs) -> int:
    """Parameters of `cls` built from `config` on the meta device (no memory, no weights)."""
    import torch

    with torch.device("meta"):
        model = cls.from_config(config, **kwargs) if hasattr(cls, "from_config") else cls(config, **kwargs)
    return sum(p.numel() for p in model.parameters())


@functools.cache
def transformer_parameters(shape: TransformerShape) -> int:
    """Exact parameter count of `CausalWanTransformer3DModel` with this shape (a meta-device build)."""
    from ..models import CausalWanTransformer3DModel

    return count_parameters(CausalWanTransformer3DModel, shape.to_config())


def wan_block_parameters(shape: TransformerShape) -> int:
    """
    Parameters of one Wan transformer block, in closed form: self- and cross-attention (q, k, v, out with biases:
    `8 (D² + D)`), their q/k RMSNorms (`4 D`), the cross-attention's affine LayerNorm (`2 D`), the FFN
    (`2 D F + F + D`) and the block's modulation table (`6 D`).
    """
    d, f = shape.dim, shape.ffn_dim
    return 8 * d * d + 2 * d * f + f + (21 if shape.cross_attn_norm else 19) * d


def wan_transformer_parameters(shape: TransformerShape) -> int:
    """
    Parameters of a Wan transformer, in closed form: the blocks, the patch embedding (a `p_t x p_h x p_w`
    convolution), the time embedder (`freq -> D -> D`) and its `6 D` projection, the text embedder
    (`text -> D -> D`), the output projection and the output modulation table (`2 D`); the norms outside the blocks
    have no affine parameters.
    """
    d, pv = shape.dim, shape.patch_volume
    outer = (shape.in_channels * pv + 1) * d + (shape.freq_dim + 1) * d + (d + 1) * d + (d + 1) * 6 * d
    outer += (shape.text_dim + 1) * d + (d + 1) * d + (d + 1) * shape.out_channels * pv + 2 * d
    return shape.num_layers * wan_block_parameters(shape) + outer


# ---------------------------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class _Pass:
    """
    One transformer call on a chunk, per video: `tokens` queries attending to `keys` (its own included). A sub-batch
    of a batch computes its patch and timestep embeddings at the whole batch's size
    (`CausalWanTransformer3DModel.sub_batch`): `embed_scale` videos' worth per video.
    """

    tokens: int
    keys: int
    text: int
    frames: int
    embed_scale: float = 1.0


def forward_flops(shape: TransformerShape, p: _Pass, lora: _LoRALayout | None, r: int) -> float:
    """
    Matmul FLOPs (2 per multiply-add) of one forward of one video's chunk: every linear layer (the patch embedding
    included), self-attention over `keys` keys, cross-attention over the text; LoRA's two factors where `lora` is
    active (`None`: the adapter is disabled, the reference policy). Elementwise work is not counted, as in
    `torch.utils.flop_counter`.
    """
    rows = {"tokens": p.tokens, "text": p.text, "frames": p.frames}
    total = 0.0
    for n, i, o, kind in _outer_linears(shape):
        scale = p.embed_scale if n == "patch_embedding" or kind == "frames" else 1.0
        total += scale * (2 * rows[kind] * i * o + (2 * rows[kind] * r * (i + o) if lora and n in lora.outer else 0))
    d = shape.dim
    for layer in range(shape.num_layers):
        targets = lora.blocks[layer] if lora else ()
        for n, i, o, kind in _block_linears(shape):
            total += 2 * rows[kind] * i * o + (2 * rows[kind] * r * (i + o) if n in targets else 0)
        total += 2 * 2 * p.tokens * p.keys * d + 2 * 2 * p.tokens * p.text * d  # QK^T and AV, self and cross
    return total


def backward_flops(shape: TransformerShape, p: _Pass, lora: _LoRALayout, r: int, checkpointing: bool) -> float:
    """
    Matmul FLOPs of the backward of one chunk forward when only the LoRA factors train: input gradients of every
    linear layer whose input needs one, weight gradients of the LoRA factors only, attention backward as the fused
    kernels compute it (5 products: scores recomputed, then dV, dP, dQ, dK), and with `checkpointing` the forward of
    every block once more. Gradients start at the first LoRA output: the patch embedding and the text and time
    embedders need none.
    """
    rows = {"tokens": p.tokens, "text": p.text, "frames": p.frames}
    d = shape.dim
    total = 0.0

    def linear(name, i, o, kind, grad_in, targeted) -> bool:
        nonlocal total
        m = rows[kind]
        if grad_in:
            total += 2 * m * i * o  # dX = dY W (frozen weight: no weight gradient)
        if targeted:
            total += 2 * m * r * o * 2 + 2 * m * i * r  # dB, d(A x), dA
            total += 2 * m * i * r if grad_in else 0  # dX through A
        return grad_in or targeted

    outer = lora.outer
    grad = False
    for n, i, o, kind in _outer_linears(shape)[:1]:  # patch embedding
        grad = linear(n, i, o, kind, False, n in outer)
    text_grad = False
    for n, i, o, kind in _outer_linears(shape)[4:6]:  # text embedder
        text_grad = linear(n, i, o, kind, text_grad, n in outer)

    def attention(name, t, grad, kv_kind, kv_grad, keys) -> bool:
        """One attention's backward (self: keys and values from the tokens; cross: from the text)."""
        nonlocal total
        q = linear(f"{name}.to_q", d, d, "tokens", grad, f"{name}.to_q" in t)
        k = linear(f"{name}.to_k", d, d, kv_kind, kv_grad, f"{name}.to_k" in t)
        v = linear(f"{name}.to_v", d, d, kv_kind, kv_grad, f"{name}.to_v" in t)
        attn = q or k or v
        if attn:
            total += 5 * 2 * p.tokens * keys * d
        return linear(f"{name}.to_out.0", d, d, "tokens", attn, f"{name}.to_out.0" in t) or grad

    for layer in range(shape.num_layers):
        t = lora.blocks[layer]
        grad = attention("attn1", t, grad, "tokens", grad, p.keys)
        grad = attention("attn2", t, grad, "text", text_grad, p.text)
        hidden = linear("ffn.net.0.proj", d, shape.ffn_dim, "tokens", grad, "ffn.net.0.proj" in t)
        grad = linear("ffn.net.2", shape.ffn_dim, d, "tokens", hidden, "ffn.net.2" in t) or grad
    n, i, o, kind = _outer_linears(shape)[-1]
    linear(n, i, o, kind, grad, n in outer)
    if checkpointing:
        per_layer = [
            2 * rows[kind] * i * o + (2 * rows[kind] * r * (i + o) if n in lora.blocks[layer] else 0)
            for layer in range(shape.num_layers)
            for n, i, o, kind in _block_linears(shape)
        ]
        total += sum(per_layer) + shape.num_layers * (2 * 2 * p.tokens * (p.keys + p.text) * d)
    return total


# ---------------------------------------------------------------------------------------------------- activations
def _saved_block(
    shape: TransformerShape,
    b: int,
    p: _Pass,
    targets: frozenset,
    r: int,
    prec: _Precision,
    grad_in: bool,
    text_grad: bool = False,
    time_grad: bool = False,
) -> tuple[int, bool]:
    """
    Bytes autograd saves for the backward in one block of `CausalWanTransformer3DModel._block` (batch `b`), and
    whether its output needs a gradient. `grad_in`: whether the block's input needs one (a block after one with a
    LoRA); `text_grad`, `time_grad`: whether the text embeddings and the timestep projection do (a LoRA in their
    embedders, see [`_LoRALayout`]). Derived from the block's code and torch's derivative formulas, in order:
    LayerNorm keeps its fp32 input and two per-token statistics (the cross-attention's affine one adds nothing:
    diffusers keeps `norm2` in fp32, `_keep_in_fp32_modules`); the adaLN modulation keeps `1 + scale` (fp32, per
    frame) and the gates keep the block's modulation `[b, F, 6, D]`; a modulation that needs a gradient also keeps
    the normalised input it scales, and a gate the update it scales (fp32); every LoRA module keeps its input (a copy
    in the LoRA dtype, except in float32 where the input itself is kept once) and its rank-`r` projection; the q/k
    RMSNorms keep their fp32 input and statistics; attention keeps q, the keys and values it attended (the cached
    context included: the concatenation is a new tensor), its output and the log-sum-exp; GELU keeps its input.
    Frozen linear layers keep nothing (their weights are parameters); autocast's copies of the LoRA factors are
    counted once per forward by [`activation_bytes`]. `tests/test_memory_model.py` checks every term against the
    tensors autograd saves in a real block.
    """
    d, h, f = shape.dim, shape.num_attention_heads, shape.ffn_dim
    m, t, frames = b * p.tokens, b * p.text, p.frames
    act, lo = prec.act, prec.lora_out
    saved = 0

    def lora_inputs(rows: int, width: int, modules: list[str], shared_already_saved: bool = False) -> int:
        hit = [n for n in modules if n in targets]
        if not hit:
            return 0
        if prec.lora_copy is None:
            return 0 if shared_already_saved else rows * width * 4
        return len(hit) * rows * width * prec.lora_copy

    def rank_outputs(rows: int, modules: list[str]) -> int:
        return sum(rows * r * lo for n in modules if n in targets)

    # 1. self-attention
    if grad_in:
        saved += m * d * 4 + 2 * m * 4 + b * frames * d * 4  # norm1 (fp32 input, mean, rstd) and 1 + scale
    if time_grad:
        saved += m * d * 4  # norm1's output, kept by its product with 1 + scale
    qkv = ["attn1.to_q", "attn1.to_k", "attn1.to_v"]
    saved += lora_inputs(m, d, qkv) + rank_outputs(m, [*qkv, "attn1.to_out.0"])
    q, k, v = (grad_in or time_grad or n in targets for n in qkv)
    saved += (q + k) * (m * d * 4 + m * 4)  # RMSNorm of q and k (fp32)
    attn = q or k or v
    if attn:
        saved += 2 * m * d * act + 2 * b * p.keys * d * act + b * h * p.tokens * 4  # q, out, K, V, logsumexp
    # its input is the attention output (kept by the attention when it needs a gradient)
    saved += lora_inputs(m, d, ["attn1.to_out.0"], shared_already_saved=attn)
    gate = attn or "attn1.to_out.0" in targets
    if time_grad:
        saved += m * d * 4  # the attention's update (fp32), kept by its product with the gate
    grad = grad_in or gate or time_grad
    # 2. cross-attention
    if grad:
        saved += m * d * 4 + 2 * m * 4  # norm2 (fp32 input, mean, rstd)
    cq, ck, cv, co = "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"
    saved += lora_inputs(m, d, [cq]) + rank_outputs(m, [cq, co]) + rank_outputs(t, [ck, cv])
    if prec.lora_copy is not None:
        saved += lora_inputs(t, d, [ck, cv])  # the text embeddings, copied by each module (fp32: once per forward)
    q = grad or cq in targets
    k = text_grad or ck in targets
    saved += q * (m * d * 4 + m * 4) + k * (t * d * 4 + t * 4)
    attn = q or k or cv in targets
    if attn:
        saved += 2 * m * d * act + 2 * t * d * act + b * h * p.tokens * 4
    saved += lora_inputs(m, d, [co], shared_already_saved=attn)
    grad = grad or attn or co in targets
    # 3. feed-forward
    if grad:
        saved += m * d * 4 + 2 * m * 4 + b * frames * d * 4  # norm3 and 1 + c_scale
    if time_grad:
        saved += 2 * m * d * 4  # norm3's output and the feed-forward's update (fp32), as in the self-attention
    saved += lora_inputs(m, d, ["ffn.net.0.proj"]) + rank_outputs(m, ["ffn.net.0.proj", "ffn.net.2"])
    hidden = grad or "ffn.net.0.proj" in targets
    if hidden:
        saved += m * f * act  # GELU input
    saved += lora_inputs(m, f, ["ffn.net.2"])  # GELU output, kept only by the LoRA of ffn.net.2
    out = grad or hidden or "ffn.net.2" in targets
    if gate or out:
        saved += b * frames * 6 * d * 4  # the block's modulation, kept (once) by the gates
    return saved, out


@dataclass(frozen=True)
class ActivationEstimate:
    r"""
    Bytes kept for the backward of one trained denoising step (the update runs one backward per step, so one step's
    activations are alive at a time), and the largest extra bytes alive while it runs backward.

    Args:
        saved (`int`): kept by autograd after the forward and the loss: everything the backward needs.
        backward_workspace (`int`): gradients alive at the worst moment of the backward, beyond `saved` (with
            checkpointing: one block's recomputed activations too).
    """

    saved: int
    backward_workspace: int


def activation_bytes(
    shape: TransformerShape,
    b: int,
    p: _Pass,
    lora: _LoRALayout,
    r: int,
    prec: _Precision,
    checkpointing: bool,
    loss_candidates: int,
    chunk_elements: int,
) -> ActivationEstimate:
    """
    The update's activation memory for a policy forward of `b` videos' chunks and the loss over `loss_candidates`
    candidates of `chunk_elements` latent elements each (see [`ActivationEstimate`]).
    """
    d, f = shape.dim, shape.ffn_dim
    m, t = b * p.tokens, b * p.text
    act = prec.act
    per_block, grad = [], lora.patches_grad
    for layer in range(shape.num_layers):
        saved, grad = _saved_block(shape, b, p, lora.blocks[layer], r, prec, grad, lora.text_grad, lora.time_grad)
        per_block.append(saved)
    # outside the blocks: the rotary tables (3 per-video [N, head_dim] fp32 tensors), the text embeddings kept once by
    # float32 LoRA modules on the cross-attention k/v, the output norm, the prediction x0 (fp32) and the loss's
    # candidate differences [b, G, E] (fp32), and the autocast copies of LoRA factors
    outer = 3 * p.tokens * shape.attention_head_dim * 4
    if prec.lora_copy is None and any(("attn2.to_k" in blk or "attn2.to_v" in blk) for blk in lora.blocks):
        outer += t * d * 4
    outer += m * d * 4 + 2 * m * 4 + b * p.frames * d * act  # norm_out and its modulation
    loss_saved = b * chunk_elements * 4 + b * loss_candidates * chunk_elements * 4  # x0 and the loss's differences
    outer += loss_saved
    if prec.autocast:
        outer += lora.num_parameters(shape, r) * 2
    # backward: the gradients alive at its worst moment, either at the start (the loss's backward: four more tensors
    # of the size of its candidate differences) or in a block: the self-attention's dK and dV over every attended key
    # (plus the fp32 key path's gradient under autocast) with dQ and dOut, or the feed-forward's two [m, ffn]
    # gradients (three with a LoRA on ffn.net.2); plus the residual stream's gradient (the loss's tensors are freed
    # by then)
    loss_ws = 4 * b * loss_candidates * chunk_elements * 4
    attn_ws = 2 * b * p.keys * d * act + (b * p.keys * d * 4 if prec.autocast else 0) + 2 * m * d * act
    ffn_ws = (2 + any("ffn.net.2" in blk for blk in lora.blocks)) * m * f * act
    block_ws = max(attn_ws, ffn_ws) + m * d * 4
    if not checkpointing:
        return ActivationEstimate(sum(per_block) + outer, max(block_ws - loss_saved, loss_ws))
    # non-reentrant checkpointing keeps each block's input (the residual stream) and the shared text embeddings and
    # timestep projection; during the backward one block is recomputed with its full activations (in float32 its
    # norm1 input is the kept block input itself)
    kept = shape.num_layers * m * d * act + t * d * act + b * p.frames * 6 * d * act
    recomputed = max(per_block) - (m * d * 4 if prec.weight == 4 and not prec.autocast else 0)
    return ActivationEstimate(kept + outer, max(recomputed + block_ws - loss_saved, loss_ws))


def forward_workspace(
    shape: TransformerShape,
    b: int,
    p: _Pass,
    lora: _LoRALayout,
    prec: _Precision,
    context_copy: bool = True,
    whole_batch: int | None = None,
) -> int:
    """
    Peak bytes of one forward without autograd (a rollout or reference pass) of `b` videos' chunks, beyond the KV
    cache: the text embeddings, the block's input (the forward keeps it while the block runs) and its residual stream,
    plus the largest stage of the block:

    - feed-forward (its modulated input and an fp32 normalisation temporary, then the largest of: the `[m, ffn]`
      projection, with a LoRA its scaled update and their sum (and an upcast copy of the projection when the two
      dtypes differ); the projection and its GELU; the GELU output and the
      output projection, with a LoRA on `ffn.net.2` the copies peft and autocast make of its input);
    - self-attention (input, q, k, v, two fp32 RMSNorm and two rotary temporaries), and with `context_copy` the keys
      and values it attends, gathered into one tensor each (a fork reads its prefix and its own chunks; without
      autograd a cache without a prefix attends to a slice of its buffer instead);
    - with `whole_batch` (a sub-batch of a batch of that many videos), the patch embedding computed for the whole
      batch and the sub-batch's copy of it.

    A LoRA module copies its input to its own dtype (fp32) when the base is 16-bit, and autocast copies that to bf16.
    """
    d, f = shape.dim, shape.ffn_dim
    m, t = b * p.tokens, b * p.text
    act, lo = prec.act, prec.lora_out
    copies = (4 if prec.weight != 4 else 0) + (2 if prec.autocast else 0)  # bytes per input element
    f0 = any("ffn.net.0.proj" in blk for blk in lora.blocks)
    f2 = any("ffn.net.2" in blk for blk in lora.blocks)
    # base output, the LoRA's scaled update and their sum (mixed dtypes: plus the base output upcast for the sum)
    update = m * f * (lo + max(act, lo) + (max(act, lo) if act != lo else 0))
    proj = m * f * act + ((m * d * copies + update) if f0 else 0)
    gelu = 2 * m * f * act
    out = m * f * act + m * d * act + (m * f * copies if f2 else 0)
    ffn = m * d * act + m * d * 4 + max(proj, gelu, out)
    attn = 4 * m * d * act + 2 * m * d * 4 + 2 * m * d * act + m * d * copies
    attn += 2 * b * p.keys * d * act if context_copy else 0
    norm = 3 * m * d * 4
    patches = (whole_batch * p.tokens * d * act + m * d * act) if whole_batch else 0
    return t * d * act + 2 * m * d * act + max(ffn, attn, norm, patches)
