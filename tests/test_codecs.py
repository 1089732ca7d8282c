import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from torchslim.artifact.codecs import (
    decode_indices,
    decode_positions,
    decode_tensor,
    encode_indices,
    encode_positions,
    encode_tensor,
    entropy_bits,
    read_varints,
    stream_bounds,
    varints,
)
from torchslim.errors import ArtifactError


@given(st.lists(st.integers(0, 2**32), max_size=50))
def test_varints_round_trip(values):
    buf = varints(np.array(values, dtype=np.int64))
    assert read_varints(buf, len(values)) == (values, len(buf))


def test_varint_widths_and_truncation():
    assert varints(np.array([0, 127, 128, 300])) == bytes([0, 127, 0x80, 1, 0xAC, 2])
    with pytest.raises(ArtifactError, match="runs past"):
        read_varints(bytes([0x80]), 1)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 40), st.floats(0.0, 1.0), st.integers(0, 10_000), st.booleans())
def test_positions_round_trip(rows, cols, density, seed, rowcol):
    mask = np.random.default_rng(seed).random((rows, cols)) < density
    if rowcol and not 0 < mask.sum() < mask.size:
        rowcol = False  # the row model needs a density strictly inside (0, 1)
    buf = encode_positions(mask, alpha=4.0, rowcol=rowcol)
    assert np.array_equal(decode_positions(buf, rows, cols, int(mask.sum()), 4.0, rowcol), mask)


def test_row_aware_model_wins_when_rows_differ():
    rng = np.random.default_rng(0)
    mask = rng.random((200, 300)) < np.where(np.arange(200) % 2 == 0, 0.01, 0.3)[:, None]  # 1 % / 30 % rows
    col, rowcol = encode_positions(mask, rowcol=False), encode_positions(mask, rowcol=True)
    assert len(rowcol) < 0.9 * len(col)
    coded = encode_tensor(torch.from_numpy(mask * 0.5).float())
    assert coded.entry["positions"] == "rowcol"


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=1, max_size=300))
def test_indices_round_trip(symbols):
    idx = np.array(symbols)
    counts = np.bincount(idx)
    counts = counts[counts > 0]
    dense = np.searchsorted(np.flatnonzero(np.bincount(idx)), idx)  # drop unused symbols
    assert np.array_equal(decode_indices(encode_indices(dense, counts), counts), dense)


def test_entropy_bits_against_hand_values():
    assert entropy_bits(np.array([5, 5])) == pytest.approx(10.0)
    assert entropy_bits(np.array([1, 3])) == pytest.approx(-(math.log2(0.25) + 3 * math.log2(0.75)))
    assert entropy_bits(np.array([7, 0])) == 0.0


def _sparse_shared(shape, density=0.08, k=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    codebook = torch.linspace(-1, 1, k)
    w = codebook[torch.randint(0, k, shape, generator=g)]
    return w * (torch.rand(shape, generator=g) < density)


def test_shared_tensor_round_trips_exactly_and_streams_meet_their_bounds():
    w = _sparse_shared((300, 784))
    coded = encode_tensor(w)
    assert coded.entry["values"] == "codebook" and coded.entry["k"] == 32
    assert torch.equal(decode_tensor(coded.blob, coded.entry, "w"), w)
    head, pos, idx = coded.entry["sections"]
    bounds = stream_bounds(w, rowcol=coded.entry["positions"] == "rowcol")
    fixed = 8  # the ANS coder's final state, per stream
    assert pos <= 1.05 * bounds["positions_h0"] / 8 + fixed
    assert idx <= 1.05 * bounds["indices_h0"] / 8 + fixed
    assert pos >= bounds["positions_model"] / 8 - 1  # a lossless code cannot beat its model's bound


def test_raw_values_dense_tensors_and_other_dtypes_round_trip():
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(100, 40, generator=g) * (torch.rand(100, 40, generator=g) < 0.1)
    coded = encode_tensor(raw)
    assert coded.entry["values"] == "raw"
    assert torch.equal(decode_tensor(coded.blob, coded.entry, "raw"), raw)
    halves = torch.randn(400, generator=g).half().float()
    coded = encode_tensor(halves)
    assert coded.entry["values"] == "raw16" and coded.entry["sections"][0] == 2 * 400
    assert torch.equal(decode_tensor(coded.blob, coded.entry, "halves"), halves)
    dense = torch.tensor([0.5, -0.25, 0.5]).to(torch.float16)
    coded = encode_tensor(dense)
    assert coded.entry["sections"][1] == 0  # no zeros: no position stream
    assert torch.equal(decode_tensor(coded.blob, coded.entry, "h"), dense)
    assert encode_tensor(torch.arange(5)) is None
    zeros = torch.zeros(3, 4)
    assert torch.equal(decode_tensor(encode_tensor(zeros).blob, encode_tensor(zeros).entry, "z"), zeros)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"sections": [1, 2, 3]}, "do not fit"),
        ({"nnz": 10**9}, "do not fit"),
        ({"values": "lzma"}, "unsupported"),
        ({"shape": "x"}, "shape"),
        ({"shape": [20, 30.0]}, "integer"),
        ({"nnz": True}, "integer"),
        ({"sections": [10**400 // 10**399, 0]}, "three"),
        ({"positions": "rowcol", "nnz": 0}, "nnz|sections"),
        ({"k": 300}, "do not fit"),
        ({"nnz": 5}, "non-zeros|nnz"),
        ({"alpha": 10**400}, "unsupported value coding"),
    ],
)
def test_inconsistent_entries_are_rejected(change, message):
    w = _sparse_shared((20, 30), density=0.2, k=4)
    coded = encode_tensor(w)
    with pytest.raises(ArtifactError, match=message):
        decode_tensor(coded.blob, {**coded.entry, **change}, "w")


def test_int8_weights_code_below_a_byte_and_hostile_int8_codebooks_are_refused():
    gen = torch.Generator().manual_seed(0)
    q = torch.clamp(torch.round(torch.randn(64, 256, generator=gen) * 12), -128, 127).to(torch.int8)  # bell-shaped
    coded = encode_tensor(q)
    assert coded.entry["dtype"] == "int8" and coded.entry["values"] == "codebook8"
    assert len(coded.blob) < 0.8 * q.numel()  # about 5.6 bits a value
    back = decode_tensor(coded.blob, coded.entry, "w")
    assert back.dtype == torch.int8 and torch.equal(back, q)
    half = encode_tensor(torch.full((4, 4), 0.5))
    with pytest.raises(ArtifactError, match="integers in \\[-128, 127\\]"):
        decode_tensor(half.blob, half.entry | {"dtype": "int8"}, "w")
    with pytest.raises(ArtifactError, match="'codebook8' values cannot decode to float32"):
        decode_tensor(coded.blob, coded.entry | {"dtype": "float32"}, "w")


def test_int8_codebooks_cost_a_byte_an_entry_and_version_4_float_codebooks_still_decode():
    entries = torch.cat([torch.arange(-100, 0), torch.arange(1, 101)])  # 200 non-zero values
    q = entries.to(torch.int8).repeat(3).reshape(6, 100)
    coded = encode_tensor(q)
    k = coded.entry["k"]
    head = coded.entry["sections"][0]
    assert k == 200 and head == k + len(varints(np.full(k, 3)))  # one signed byte per entry, then the counts
    # a version 4 writer stored the same codebook as float32: readers still decode it
    old_head = entries.numpy().astype("<f4").tobytes() + coded.blob[k:head]
    old_entry = coded.entry | {"values": "codebook", "sections": [len(old_head), *coded.entry["sections"][1:]]}
    back = decode_tensor(old_head + coded.blob[head:], old_entry, "w")
    assert back.dtype == torch.int8 and torch.equal(back, q)
    unsorted = coded.blob[1::-1] + coded.blob[2:]  # first two codebook entries swapped
    with pytest.raises(ArtifactError, match="not strictly ascending"):
        decode_tensor(unsorted, coded.entry, "w")
