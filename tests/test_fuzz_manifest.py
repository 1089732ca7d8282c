"""Fuzz the reader past the fingerprint: the manifest and each coded entry, mutated directly.

The fingerprint covers the stored tensors, not the manifest, so a file whose manifest is edited
and re-packed reaches every check the reader makes: the manifest's keys, each coded entry,
module sizes (resizing), quantized layers' grids and the BatchNorm folds. Whatever the edit,
``load`` must either give a model or raise an :class:`ArtifactError` (a ``ShapeMismatchError``
is one); ``decode_tensor`` must return a tensor of the declared shape or raise one.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as st_save
from torch import nn

import torchslim as ts
from torchslim.artifact.codecs import decode_tensor, encode_tensor
from torchslim.artifact.tslim import encode, pack_manifest, read
from torchslim.errors import ArtifactError

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


class Net(nn.Module):
    """Conv + BatchNorm (folded), two Linear layers: every kind of manifest entry appears."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8 * 8 * 8, 32), nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))  # (B, 8, 8, 8)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))  # (B, 10)


@pytest.fixture(scope="module")
def compressed():
    """A file with channels removed, pruned and shared weights, and static int8 layers."""
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(64, 1, 8, 8)
    ts.channel_prune_(model, ts.ChannelPruneConfig(ratio={"fc1": 0.5}, round_to=1, min_channels=1), example=x[:4])
    ts.prune_(model, ts.MagnitudePruneConfig(sparsity={"fc1": 0.8}, finetune=None))
    ts.share_(model, ts.ShareConfig(bits={"fc1": 4}, finetune=None))
    ts.quantize_(model, ts.QuantizeConfig(exclude=("fc1",), bias_correction=False), [x[:32], x[32:]])
    raw = encode(model)
    return raw, model


def _paths(node, prefix=()):
    """Every path into a JSON tree (keys and list indices)."""
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield from _paths(value, (*prefix, key))


def _mutated(manifest: dict, path: tuple, value, delete: bool) -> dict:
    out = copy.deepcopy(manifest)
    if not path:
        return value if not delete else {}
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    if delete and isinstance(parent, dict):
        parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return out


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_an_edited_manifest_loads_or_fails_with_an_artifact_error(compressed, tmp_path_factory, data):
    raw, model = compressed
    manifest, stored = read_bytes(raw, tmp_path_factory)
    paths = [p for p in _paths(manifest) if p[:1] != ("fingerprint",)]
    path = data.draw(st.sampled_from(paths))
    value = data.draw(JSON_VALUES)
    edited = _mutated(manifest, path, value, data.draw(st.booleans()))
    file = tmp_path_factory.mktemp("fuzz") / "m.tslim"
    try:
        file.write_bytes(st_save(stored, metadata=pack_manifest(edited)))
    except (TypeError, ValueError):  # a value JSON cannot hold: no file to read
        return
    try:
        loaded = ts.load(file, model=Net)
    except ArtifactError:
        return
    with torch.no_grad():  # a file that loads gives a model that runs
        assert loaded.eval()(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def read_bytes(raw: bytes, tmp_path_factory):
    """The manifest's JSON as read, and the stored tensors."""
    path = tmp_path_factory.mktemp("orig") / "o.tslim"
    path.write_bytes(raw)
    manifest, stored = read(path)
    return manifest.raw, stored


ENTRY_KEYS = ("shape", "nnz", "k", "sections", "values", "alpha", "positions", "dtype")


@st.composite
def coded_tensors(draw):
    """A small tensor that codes: mostly zeros, a few shared values."""
    rows, cols = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    values = draw(st.lists(st.sampled_from([-0.5, -0.25, 0.125, 0.75]), min_size=rows * cols, max_size=rows * cols))
    keep = draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
    t = torch.tensor([v if k else 0.0 for v, k in zip(values, keep)], dtype=torch.float32).reshape(rows, cols)
    return t


@settings(max_examples=300, deadline=None)
@given(coded_tensors(), st.data())
def test_decode_tensor_with_an_edited_entry_or_blob_decodes_or_fails_with_an_artifact_error(t, data):
    coded = encode_tensor(t)
    if coded is None:  # nothing to code: stored natively
        return
    entry, blob = dict(coded.entry), bytearray(coded.blob)
    assert torch.equal(decode_tensor(bytes(blob), entry, "w"), t)
    for _ in range(data.draw(st.integers(1, 3))):
        what = data.draw(st.sampled_from(["entry", "blob", "cut"]))
        if what == "entry":
            key = data.draw(st.sampled_from(ENTRY_KEYS))
            entry[key] = data.draw(JSON_VALUES | st.integers(-3, 3) | st.lists(st.integers(-2, 200), max_size=3))
        elif what == "blob" and blob:
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        elif blob:
            blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    try:
        out = decode_tensor(bytes(blob), entry, "w")
    except ArtifactError:
        return
    assert list(out.shape) == entry["shape"] and out.numel() == math.prod(entry["shape"])


def test_the_fuzzed_file_is_a_real_compressed_model(compressed):
    raw, model = compressed
    manifest = json.loads(json.dumps(read_bytes_plain(raw)))
    assert manifest["coded"] and manifest["quant"] and manifest["folded"] and manifest["modules"]["fc1"]


def read_bytes_plain(raw: bytes) -> dict:
    import base64
    import zlib

    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8 : 8 + n])["__metadata__"]
    return json.loads(zlib.decompress(base64.b64decode(next(iter(meta.values())))))
