import pytest
import torch

from trl_arcopo.kv_cache import KVCache
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


def read(cache, layer, start, num_tokens):
    """The context `[B, S, heads, head_dim]` a chunk of `num_tokens` at `start` attends to (`attended`, minus itself)."""
    chunk = cache.keys[layer].new_zeros((cache.batch_size, num_tokens, *cache.keys[layer].shape[2:]))
    keys, values = cache.attended(layer, start, chunk, chunk)
    return keys[:, :-num_tokens], values[:, :-num_tokens]


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


def test_fork_reads_the_shared_prefix_without_copying_it():
    cache = _filled_cache()
    end, tpf = cache.end, cache.tokens_per_frame
    forked = cache.fork(3)
    assert forked.batch_size == 6 and forked.end == end and forked.prefix is cache and forked.offset == end
    # the branches own only the frames after the prefix; the prefix's storage is not copied
    assert forked.keys[0].shape[1] == (6 - 3) * tpf and forked.nbytes == 3 * cache.nbytes // 2
    assert forked.capacity_frames == cache.capacity_frames == 6
    # what a chunk attends to equals a full copy of the prefix per branch (the old fork), row b * 3 + i -> b
    expected = cache.keys[1][:, :end].repeat_interleave(3, 0)
    k, v = read(forked, 1, end, 3 * tpf)
    assert torch.equal(k, expected) and torch.equal(v, cache.values[1][:, :end].repeat_interleave(3, 0))
    assert torch.equal(forked.materialize().keys[1][:, :end], expected)
    # a branch commits into its own storage; the prefix and the other branches are untouched
    before = cache.keys[0].clone()
    for layer in range(forked.num_layers):
        k = torch.randn(6, tpf, 2, 12)
        forked.write(layer, end, k, k)
    forked.advance(tpf)
    assert torch.equal(cache.keys[0], before) and cache.end == end
    full = forked.materialize()  # the prefix copied in front of the branch's own frames, committed and free
    assert full.prefix is None and full.end == end + tpf and full.keys[0].shape[1] == 6 * tpf
    assert torch.equal(full.keys[0][:, end : end + tpf], forked.keys[0][:, :tpf])
    k, _ = read(forked, 0, end + tpf, tpf)
    assert k.shape == (6, end + tpf, 2, 12) and torch.equal(k[:, :end], before[:, :end].repeat_interleave(3, 0))
    # forks of forks read through both prefixes; a fork can stop at the prefix (the update's anchors)
    nested = forked.fork(2)
    assert nested.batch_size == 12
    assert torch.equal(
        read(nested, 2, nested.end, tpf)[0], read(forked, 2, forked.end, tpf)[0].repeat_interleave(2, 0)
    )
    anchors = cache.fork(4, num_frames=3)
    assert anchors.nbytes == 0 and read(anchors, 0, end, tpf)[0].shape == (8, end, 2, 12)
    with pytest.raises(ValueError, match="too short"):
        anchors.check_chunk(end, 3 * tpf, batch_size=8, commit=True)
    with pytest.raises(ValueError, match="inside the shared prefix"):
        forked.check_chunk(0, 3 * tpf, batch_size=6)


def test_narrow_gives_views_of_the_rows():
    cache = _filled_cache()
    narrow = cache.narrow(1, 1)
    assert narrow.batch_size == 1 and narrow.keys[0].data_ptr() == cache.keys[0][1].data_ptr()  # a view
    rows = cache.fork(3).narrow(3, 3)  # a fork is materialized first: the second prompt's branches
    assert torch.equal(rows.keys[1][:, : cache.end], cache.keys[1][1:2, : cache.end].expand(3, -1, -1, -1))


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
        cache.check_chunk(cache.end, 6 * tpf, batch_size=2, commit=True)
    cache.check_chunk(cache.end, 6 * tpf, batch_size=2)  # a chunk that is not committed needs no slot


def test_a_fork_reads_a_local_window_like_a_full_copy():
    cache = _filled_cache(frames=12, committed=6)
    cache.local_attn_frames, cache.sink_frames = 5, 1
    tpf = cache.tokens_per_frame
    forked = cache.fork(2)
    for layer in range(forked.num_layers):
        k = torch.randn(4, 3 * tpf, 2, 12)
        forked.write(layer, 6 * tpf, k, k)
    forked.advance(3 * tpf)
    full = forked.materialize()
    for start in (6 * tpf, 9 * tpf):  # the window reaches into the prefix, then only the sink frame does
        assert forked.context_slices(start, 3 * tpf) == full.context_slices(start, 3 * tpf)
        assert torch.equal(read(forked, 1, start, 3 * tpf)[0], read(full, 1, start, 3 * tpf)[0])


def test_window_slices():
    cache = _filled_cache(frames=12, committed=9)
    tpf = cache.tokens_per_frame
    assert cache.context_slices(9 * tpf, 3 * tpf) == [slice(0, 9 * tpf)]
    cache.local_attn_frames, cache.sink_frames = 7, 2
    # chunk 9..11 with a 7-frame window: sink frames 0..1, recent frames 7..8, itself 9..11
    assert cache.context_slices(9 * tpf, 3 * tpf) == [slice(0, 2 * tpf), slice(7 * tpf, 9 * tpf)]
    k, _ = read(cache, 0, 9 * tpf, 3 * tpf)
    assert k.shape[1] == 4 * tpf
    with pytest.raises(ValueError, match="larger than"):
        KVCache(cache.keys, cache.values, tpf, local_attn_frames=2, sink_frames=2)
