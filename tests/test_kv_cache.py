import pytest
import torch

from trl_arcopo import KVCache
from trl_arcopo.testing_utils import tiny_transformer


def _filled_cache(batch=2, frames=6, committed=3):
    model = tiny_transformer(in_channels=4, num_layers=3, heads=2, head_dim=12)
    cache = KVCache.from_transformer(model, batch, frames, 8, 8)
    tpf = cache.tokens_per_frame
    for layer in range(cache.num_layers):
        k = torch.randn(batch, committed * tpf, 2, 12)
        cache.write(layer, 0, k, k + 1)
    cache.advance(committed * tpf)
    return cache


def test_sized_from_config_and_video():
    model = tiny_transformer(in_channels=4, num_layers=3, heads=2, head_dim=12)
    cache = KVCache.from_transformer(model, batch_size=2, num_frames=6, latent_height=8, latent_width=12)
    assert cache.num_layers == 3
    assert cache.tokens_per_frame == 4 * 6
    assert cache.keys[0].shape == (2, 6 * 24, 2, 12)
    assert cache.capacity_frames == 6 and cache.num_frames == 0
    assert cache.nbytes == 2 * 3 * 2 * 6 * 24 * 2 * 12 * 4
    with pytest.raises(ValueError, match="divisible by the patch size"):
        KVCache.from_transformer(model, 1, 6, 7, 8)


def test_fork_select_clone_detach():
    cache = _filled_cache()
    end = cache.end
    forked = cache.fork(3)
    assert forked.batch_size == 6 and forked.end == end
    for layer in range(cache.num_layers):
        assert torch.equal(forked.keys[layer][:, :end], cache.keys[layer][:, :end].repeat_interleave(3, 0))
        assert forked.keys[layer][:, end:].abs().sum() == 0
    sel = forked.select([5, 0])
    assert torch.equal(sel.values[1][0], forked.values[1][5]) and torch.equal(sel.values[1][1], forked.values[1][0])
    clone = cache.clone()
    clone.keys[0].zero_()
    assert cache.keys[0].abs().sum() > 0  # clone is independent
    assert cache.detach().keys[0].data_ptr() == cache.keys[0].data_ptr()  # detach shares storage


def test_commit_order_and_batch_errors():
    cache = _filled_cache()
    tpf = cache.tokens_per_frame
    with pytest.raises(ValueError, match="commit chunks in order"):
        cache.write(0, 0, torch.zeros(2, tpf, 2, 12), torch.zeros(2, tpf, 2, 12))
    with pytest.raises(ValueError, match="fork the cache"):
        cache.write(0, cache.end, torch.zeros(3, tpf, 2, 12), torch.zeros(3, tpf, 2, 12))
    with pytest.raises(ValueError, match="fork"):
        cache.check_chunk(cache.end, 3 * tpf, batch_size=5)
    with pytest.raises(ValueError, match="too short"):
        cache.check_chunk(cache.end, 6 * tpf, batch_size=2)


def test_window_slices():
    cache = _filled_cache(frames=12, committed=9)
    tpf = cache.tokens_per_frame
    assert cache.context_slices(9 * tpf, 3 * tpf) == [slice(0, 9 * tpf)]
    cache.local_attn_frames, cache.sink_frames = 7, 2
    # chunk 9..11 with a 7-frame window: sink frames 0..1, recent frames 7..8, itself 9..11
    assert cache.context_slices(9 * tpf, 3 * tpf) == [slice(0, 2 * tpf), slice(7 * tpf, 9 * tpf)]
    k, _ = cache.read(0, 9 * tpf, 3 * tpf)
    assert k.shape[1] == 4 * tpf
    with pytest.raises(ValueError, match="larger than"):
        KVCache(cache.keys, cache.values, tpf, local_attn_frames=2, sink_frames=2)
