"""Pooling, post-processing, chunking, bucketing, micro-batch assembly: plain functions, no Ray, no model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpte_ray.model.batching import flatten, gather_packed, gather_padded, padding_efficiency, plan_micro_batches
from gpte_ray.model.chunking import chunk_windows
from gpte_ray.model.pooling import last_token_index, pool, unpack
from gpte_ray.model.quantize import calibrate_int8, quantize_binary, quantize_int8, truncate_dim

H = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]], [[2.0, 2.0], [4.0, 6.0], [6.0, 4.0]]])


def test_mean_pooling_ignores_padding():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    out = pool(H, mask, "mean")
    assert torch.allclose(out, torch.tensor([[2.0, 1.0], [4.0, 4.0]]))


def test_padding_never_leaks_even_nan():
    h = H.clone()
    h[0, 2] = float("nan")
    out = pool(h, torch.tensor([[1, 1, 0], [1, 1, 1]]), "mean")
    assert torch.isfinite(out).all()


def test_cls_and_last_token_under_both_padding_sides():
    right = torch.tensor([[1, 1, 0], [1, 1, 1]])
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert last_token_index(right).tolist() == [1, 2]
    assert last_token_index(left).tolist() == [2, 2]
    assert torch.equal(pool(H, right, "last-token")[0], H[0, 1])
    assert torch.equal(pool(H, left, "cls")[0], H[0, 1])  # first real token under left padding
    assert torch.equal(pool(H, right, "cls")[0], H[0, 0])


def test_weighted_mean_is_position_weighted():
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    out = pool(H, mask, "weighted-mean")
    # row 0: weights 1,2 on tokens 0,1; row 1 (left padded): weights 1,2 on tokens 1,2
    assert torch.allclose(out[0], (1 * H[0, 0] + 2 * H[0, 1]) / 3)
    assert torch.allclose(out[1], (1 * H[1, 1] + 2 * H[1, 2]) / 3)


def test_mean_without_prompt_tokens():
    out = pool(H, torch.tensor([[1, 1, 1], [1, 1, 1]]), "mean", prompt_lengths=torch.tensor([1, 2]))
    assert torch.allclose(out, torch.tensor([[6.0, 5.5], [6.0, 4.0]]))


def test_matryoshka_truncates_then_renormalises():
    v = np.array([[3.0, 4.0, 12.0]])
    out = truncate_dim(v, 2, normalize=True)
    assert np.allclose(out, [[0.6, 0.8]])
    assert np.allclose(truncate_dim(v, 2, normalize=False), [[3.0, 4.0]])


def test_int8_codes_by_hand_and_identical_across_workers():
    low, high = np.array([-1.0, 0.0]), np.array([1.0, 2.0])
    v = np.array([[-1.0, 2.0], [0.0, 1.0], [5.0, -3.0]])
    codes = quantize_int8(v, low, high)
    assert codes.tolist() == [[-128, 127], [0, 0], [127, -128]]
    # two "workers" quantising the same texts in different batches agree exactly
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8))
    lo, hi = calibrate_int8(x)
    a = quantize_int8(x, np.array(lo), np.array(hi))
    b = np.concatenate([quantize_int8(x[i : i + 7], np.array(lo), np.array(hi)) for i in range(0, 50, 7)])
    assert np.array_equal(a, b)


def test_binary_packs_sign_bits():
    v = np.array([[0.5, -1, 2, 0, 0.1, -0.1, 3, 4, -5, 1, 1, 1, 1, 1, 1, -1]])
    assert quantize_binary(v).tolist() == [[0b10101011, 0b01111110]]


@given(n=st.integers(0, 5000), size=st.integers(8, 512), overlap=st.integers(0, 64))
def test_chunks_cover_every_token(n, size, overlap):
    windows = chunk_windows(n, size, overlap)
    covered = np.zeros(n, dtype=bool)
    for s, e in windows:
        assert 0 <= s < e <= n or (n == 0 and (s, e) == (0, 0))
        assert e - s <= size
        covered[s:e] = True
    assert covered.all()
    assert windows[-1][1] == n


@settings(max_examples=200)
@given(
    lengths=st.lists(st.integers(1, 600), min_size=0, max_size=300),
    budget=st.integers(1, 20000),
    max_rows=st.integers(1, 300),
    min_fill=st.floats(0, 1),
)
def test_bucketing_keeps_every_row_once(lengths, budget, max_rows, min_fill):
    batches = plan_micro_batches(np.array(lengths), budget, max_rows, min_fill)
    seen = np.concatenate(batches) if batches else np.array([], dtype=int)
    assert sorted(seen.tolist()) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= max_rows
        longest = max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * longest <= budget
        assert len(b) == 1 or min(lengths[i] for i in b) >= min_fill * longest


def test_bucketing_beats_arrival_order_padding():
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(3.5, 1.0, 4000).astype(int), 3, 512)
    real, computed = padding_efficiency(lengths, plan_micro_batches(lengths, 8192, 256))
    naive = [np.arange(i, min(i + 32, len(lengths))) for i in range(0, len(lengths), 32)]
    nreal, ncomputed = padding_efficiency(lengths, naive)
    assert real / computed > 0.95 > nreal / ncomputed


@pytest.mark.parametrize("n,size,overlap,expected", [(10, 4, 1, [(0, 4), (3, 7), (6, 10)]), (3, 4, 1, [(0, 3)])])
def test_chunk_windows_examples(n, size, overlap, expected):
    assert chunk_windows(n, size, overlap) == expected


def _ragged(seed: int, n: int, longest: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 30000, size=int(k)).tolist() for k in rng.integers(1, longest, size=n)]


@pytest.mark.parametrize("left", [False, True])
def test_gather_padded_matches_row_by_row_padding(left):
    rows_ids = _ragged(0, 40, 50)
    values, offsets = flatten(rows_ids)
    pick = np.array([7, 3, 3, 0, 39, 12])  # any subset, any order, repeats allowed
    ids, mask = gather_padded(values, offsets, pick, pad_id=-1, left=left)
    longest = max(len(rows_ids[r]) for r in pick)
    assert ids.shape == mask.shape == (len(pick), longest)
    for i, r in enumerate(pick):
        row, pad = rows_ids[r], [-1] * (longest - len(rows_ids[r]))
        assert ids[i].tolist() == (pad + row if left else row + pad)
        assert mask[i].tolist() == ([0] * len(pad) + [1] * len(row) if left else [1] * len(row) + [0] * len(pad))


def test_gather_packed_positions_restart_per_row():
    rows_ids = _ragged(1, 25, 30)
    values, offsets = flatten(rows_ids)
    pick = np.array([4, 0, 24, 9])
    ids, positions, cu = gather_packed(values, offsets, pick)
    assert ids.tolist() == [t for r in pick for t in rows_ids[r]]
    assert positions.tolist() == [p for r in pick for p in range(len(rows_ids[r]))]
    assert cu.tolist() == np.cumsum([0] + [len(rows_ids[r]) for r in pick]).tolist()


@pytest.mark.parametrize("mode", ["mean", "cls", "last-token", "weighted-mean"])
def test_unpacked_states_pool_like_padded_ones(mode):
    torch.manual_seed(0)
    lengths = torch.tensor([5, 1, 3])
    padded = torch.randn(3, 5, 8)
    mask = (torch.arange(5)[None, :] < lengths[:, None]).long()
    flat = torch.cat([padded[i, : int(n)] for i, n in enumerate(lengths)])  # (9, 8) packed
    positions = torch.cat([torch.arange(int(n)) for n in lengths])
    states, got_mask = unpack(flat, positions, lengths, 5)
    assert torch.equal(got_mask, mask)
    assert torch.allclose(pool(states, got_mask, mode), pool(padded, mask, mode))
    plens = torch.tensor([2, 0, 1])
    if mode == "mean":
        assert torch.allclose(pool(states, got_mask, mode, plens), pool(padded, mask, mode, plens))


def test_encoded_merge_restores_text_order():
    from gpte_ray.model.tokenize import Chunk, Encoded

    def enc(chunks):
        return Encoded.from_chunks(chunks)

    a = enc([Chunk(0, 0, [1, 2], 0, 5, 0, False), Chunk(1, 0, [3], 0, 2, 0, False)])  # texts 0, 3
    b = enc([Chunk(0, 0, [4, 5, 6], 0, 9, 0, False), Chunk(0, 1, [7], 7, 12, 0, False),
             Chunk(1, 0, [8, 9], 0, 4, 1, True)])  # texts 1, 2
    m = Encoded.merge([(a, np.array([0, 3])), (b, np.array([1, 2]))])
    assert m.doc_index.tolist() == [0, 1, 1, 2, 3] and m.chunk.tolist() == [0, 0, 1, 0, 0]
    rows = [m.values[s:e].tolist() for s, e in zip(m.offsets[:-1], m.offsets[1:])]
    assert rows == [[1, 2], [4, 5, 6], [7], [8, 9], [3]]
    assert m.char_start.tolist() == [0, 0, 7, 0, 0] and m.prompt_len.tolist() == [0, 0, 0, 1, 0]
    assert m.truncated.tolist() == [False, False, False, True, False]
