"""
The memory knobs change nothing that is computed: branch sub-batches (bit for bit), anchor sub-batches (the same
gradient up to the order of the float additions), cached prompt embeddings with the text encoder offloaded, and the
VAE decoding in slices.
"""

import torch
from helpers import PROMPTS, tiny_trainer

from trl_arcopo.prompt_cache import PromptEmbeddingCache
from trl_arcopo.testing_utils import tiny_pipeline


def _adapter(trainer):
    return {k: v.clone() for k, v in trainer.adapter_state_dict().items()}


def test_rollout_sub_batches_train_the_same_adapter_bit_for_bit(tmp_path):
    kwargs = dict(max_steps=2, num_generations=4)
    whole = tiny_trainer(tmp_path / "whole", **kwargs)
    whole.train()
    sub = tiny_trainer(tmp_path / "sub", rollout_batch_size=3, **kwargs)  # 2 prompts x 4 branches: 3 + 1 each
    sub.train()
    expected, got = _adapter(whole), _adapter(sub)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert not all(torch.equal(v, torch.zeros_like(v)) for k, v in got.items() if "lora_B" in k)  # it trained


def test_anchor_sub_batches_give_the_same_gradient(tmp_path):
    """Each sub-batch is its own forward and backward; the sum of their weighted gradients is the whole batch's."""
    grads = {}
    for size in (None, 1, 3):
        trainer = tiny_trainer(tmp_path / str(size), num_generations=4, num_anchors=4, anchor_batch_size=size)
        group = trainer.generate_and_score([{"prompt": p} for p in PROMPTS[:2]])
        trainer.model.zero_grad()
        loss = trainer.accumulate_gradients(group)
        grads[size] = loss, {n: p.grad.clone() for n, p in trainer._adapter_parameters().items()}
    loss, expected = grads[None]
    assert any(g.abs().sum() > 0 for g in expected.values())
    for size in (1, 3):
        sub_loss, got = grads[size]
        torch.testing.assert_close(sub_loss, loss, rtol=1e-6, atol=1e-9)
        for name in expected:  # the float additions are reordered: equal within float32 rounding of the sum
            scale = expected[name].abs().max().item()
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5 * scale)


def test_prompt_embeddings_are_encoded_once_and_equal_the_pipelines(tmp_path):
    pipe = tiny_pipeline()
    cache = PromptEmbeddingCache(pipe, device="cpu", offload=True)
    first = cache(PROMPTS[:3])
    again = cache([PROMPTS[2], PROMPTS[0], PROMPTS[3]])
    assert cache.num_encoded == len(cache) == 4  # each prompt encoded once
    expected, _ = pipe.encode_prompt(PROMPTS)
    assert torch.equal(first, expected[:3]) and torch.equal(again, expected[[2, 0, 3]])
    assert next(pipe.text_encoder.parameters()).device.type == "cpu"
    # in training: the same run with the text encoder offloaded, each prompt encoded once
    runs = {}
    for offload in (False, True):
        trainer = tiny_trainer(tmp_path / str(offload), max_steps=3, offload_text_encoder=offload)
        trainer.train()
        runs[offload] = trainer
    expected, got = _adapter(runs[False]), _adapter(runs[True])
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert runs[True].prompt_embeddings.num_encoded == len(PROMPTS)  # 3 steps x 2 prompts: the 4 prompts, once


def test_precomputed_embeddings_train_without_a_text_encoder(tmp_path):
    """Embeddings computed once elsewhere: the same run as with the text encoder, on a pipeline that has none."""
    from trl_arcopo import SelfForcingPipeline

    full = tiny_pipeline()
    embeds, _ = full.encode_prompt(PROMPTS)
    bare = SelfForcingPipeline(None, None, tiny_pipeline().transformer, full.scheduler, None, 16, 16, 9,
                               full.config.default_max_sequence_length)  # fmt: skip
    runs = {}
    for name, pipe in (("encoder", full), ("precomputed", bare)):
        trainer = tiny_trainer(tmp_path / name, pipe=pipe)
        if name == "precomputed":
            trainer.prompt_embeddings.add(PROMPTS, embeds)
        trainer.train()
        runs[name] = _adapter(trainer)
    assert all(torch.equal(runs["encoder"][k], runs["precomputed"][k]) for k in runs["encoder"])
    assert runs["precomputed"] and bare.text_encoder is None


def test_decoding_in_slices_equals_one_call():
    pipe = tiny_pipeline(with_vae=True)
    latents = torch.randn(3, 16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    whole = pipe.decode_latents(latents, output_type="pt")
    assert whole.shape[0] == 3
    for size in (1, 2):
        torch.testing.assert_close(pipe.decode_latents(latents, output_type="pt", batch_size=size), whole)
