import base64
import hashlib
import json
import math
import pickle
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import torchslim.artifact.tslim as tslim
from torchslim.artifact.inspect import inspect_file
from torchslim.artifact.tslim import decode_state, encode, load, read, save, unpack_manifest
from torchslim.core.models import lenet_300_100
from torchslim.errors import ArtifactError, ShapeMismatchError
from torchslim.evaluate.metrics import fp32_safetensors_bytes
from torchslim.transforms.prune import MagnitudePruneConfig, prune_
from torchslim.transforms.share import ShareConfig, share_


def _tiny() -> nn.Module:
    """A fixed model: a sparse Linear with 4 shared values, a dense bias, a BatchNorm with its counter."""
    model = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8))
    i, j = torch.meshgrid(torch.arange(8), torch.arange(16), indexing="ij")
    weight = ((i * 16 + j) % 4 - 1.5) * 0.5 * ((i + j) % 3 == 0)  # values in {-0.75, -0.25, 0.25, 0.75}
    with torch.no_grad():
        model[0].weight.copy_(weight)
        model[0].bias.copy_(torch.linspace(-0.5, 0.5, 8))
    return model.eval()


# The exact bytes of _tiny() as a .tslim file (docs/format.md, version 5; zlib level 9). A change here is a
# format change: bump the version and say so in docs/format.md.
TINY_SHA256 = "1d1e4765a53ffac699ab3046cb0661b9d544643e42b9c3c983c63cbffe1b4845"


def test_tiny_model_has_exact_bytes(tmp_path):
    path = save(_tiny(), tmp_path / "tiny.tslim")
    raw = path.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == TINY_SHA256
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    manifest = json.loads(unpack_manifest(header["__metadata__"])[0])
    assert set(manifest["coded"]) == {"0.weight"} and manifest["coded"]["0.weight"]["k"] == 4
    assert manifest["coded"]["0.weight"]["nnz"] == 43
    assert header["0.bias"]["dtype"] == "F32" and header["1.num_batches_tracked"]["dtype"] == "I64"


@pytest.fixture(scope="module")
def compressed(digits_mlp):
    import copy

    model = copy.deepcopy(digits_mlp)
    prune_(model, MagnitudePruneConfig(sparsity={"fc1": 0.9, "fc2": 0.9}, finetune=None))
    share_(model, ShareConfig(bits={"fc1": 4, "fc2": 4}, finetune=None))
    return model.eval()


def test_load_reproduces_outputs_bit_for_bit_and_saves_are_identical(tmp_path, compressed):
    a = save(compressed, tmp_path / "a.tslim", plan={"fc1": {"sparsity": 0.9}}, metrics={"accuracy": 0.9})
    b = save(compressed, tmp_path / "b.tslim", plan={"fc1": {"sparsity": 0.9}}, metrics={"accuracy": 0.9})
    assert a.read_bytes() == b.read_bytes()
    restored = load(a, model=lenet_300_100(in_features=64))
    x = torch.randn(32, 1, 8, 8)
    assert torch.equal(restored(x), compressed(x))
    assert fp32_safetensors_bytes(compressed) / a.stat().st_size > 10
    manifest, _ = read(a)
    assert manifest.plan == {"fc1": {"sparsity": 0.9}} and manifest.metrics == {"accuracy": 0.9}
    assert set(manifest.coded) == {"fc1.weight", "fc2.weight"}  # fc3 is dense: coding would not pay


def test_zoo_models_load_without_a_builder(tmp_path, compressed):
    path = save(compressed, tmp_path / "z.tslim", zoo={"zoo": "lenet_300_100", "kwargs": {"in_features": 64}})
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(load(path)(x), compressed(x))
    user = save(compressed, tmp_path / "u.tslim")
    with pytest.raises(ArtifactError, match="pass model="):
        load(user)
    assert torch.equal(load(user, model=lambda: lenet_300_100(in_features=64))(x), compressed(x))


class _ReadsItsWeights(nn.Module):
    """A model whose constructor needs real parameter values (it cannot be built on meta)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)
        self.register_buffer("peak", torch.tensor(float(self.fc.weight.abs().max())), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) / self.peak


def test_a_builder_that_needs_real_weights_is_built_as_usual(tmp_path):
    model = _ReadsItsWeights()
    with torch.no_grad():
        model.fc.weight.mul_(2)  # what the file holds differs from what the builder makes
    restored = load(save(model, tmp_path / "r.tslim"), model=_ReadsItsWeights)
    assert not any(p.is_meta for p in restored.parameters())
    x = torch.randn(5, 4)
    assert torch.equal(restored(x), model(x))


def test_inspect_accounts_for_every_byte_of_payload(tmp_path, compressed):
    path = save(compressed, tmp_path / "i.tslim")
    rows, _ = inspect_file(path)
    by_name = {r.name: r for r in rows}
    fc1 = by_name["fc1.weight"]
    assert fc1.coded and fc1.kept == int((compressed.fc1.weight != 0).sum()) and fc1.codebook_bits == 4
    assert fc1.bytes == fc1.header_bytes + fc1.position_bytes + fc1.index_bytes
    assert fc1.index_bytes <= 1.05 * fc1.index_h0_bytes + 8
    assert fc1.position_bytes <= 1.05 * fc1.position_h0_bytes + 8
    assert not by_name["fc1.bias"].coded and by_name["fc1.bias"].bytes == 300 * 4
    assert sum(r.bytes for r in rows) < path.stat().st_size


def test_inspect_reports_int8_codebooks_at_a_byte_an_entry(tmp_path):
    gen = torch.Generator().manual_seed(0)
    q = torch.clamp(torch.round(torch.randn(64, 256, generator=gen) * 12), -128, 127).to(torch.int8)
    path = save({"w": q}, tmp_path / "q.tslim")
    (row,), manifest = inspect_file(path)
    assert manifest.coded["w"].values == "codebook8" and row.codebook_bits == math.ceil(
        math.log2(manifest.coded["w"].k)
    )
    assert row.header_bytes <= 3 * manifest.coded["w"].k  # a signed byte per entry and 1-2 byte counts (float32: 5-6)
    assert row.index_bytes <= 1.05 * row.index_h0_bytes + 8 and row.bytes < 0.8 * q.numel()


def test_a_file_may_shrink_the_model_but_never_grow_it(tmp_path, compressed):
    path = save(compressed, tmp_path / "s.tslim")  # fc1 takes 64 inputs
    assert load(path, model=lenet_300_100()).fc1.in_features == 64  # resized down to the file's sizes
    big = save(lenet_300_100(), tmp_path / "big.tslim")
    with pytest.raises(ShapeMismatchError, match=r"'fc1' has in_features=784 in the file but 64 in the model"):
        load(big, model=lenet_300_100(in_features=64))
    with pytest.raises(ShapeMismatchError, match="describes module 'fc1' as 'Linear' but the model has nothing"):
        load(path, model=nn.Sequential(nn.Linear(2, 2)))


def test_truncated_file_is_rejected(tmp_path, compressed):
    raw = save(compressed, tmp_path / "t.tslim").read_bytes()
    for cut in (0, 5, 100, len(raw) // 2, len(raw) - 1):
        (tmp_path / "cut.tslim").write_bytes(raw[:cut])
        with pytest.raises(ArtifactError):
            read(tmp_path / "cut.tslim")


def test_flipped_bit_in_data_fails_the_fingerprint(tmp_path, compressed):
    raw = bytearray(save(compressed, tmp_path / "f.tslim").read_bytes())
    raw[-10] ^= 0x01
    (tmp_path / "f.tslim").write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match="fingerprint mismatch"):
        load(tmp_path / "f.tslim", model=lenet_300_100(in_features=64))


def test_not_safetensors_and_foreign_safetensors(tmp_path):
    (tmp_path / "text.tslim").write_text("hello, this is not a model at all")
    with pytest.raises(ArtifactError, match="not a .tslim file"):
        read(tmp_path / "text.tslim")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.tslim"))
    with pytest.raises(ArtifactError, match="without a tslim manifest"):
        read(tmp_path / "plain.tslim")
    with pytest.raises(ArtifactError, match="cannot read"):
        read(tmp_path / "missing.tslim")


class _Exploit:
    def __reduce__(self):
        return (open, ("PWNED", "w"))


def test_pickle_renamed_to_tslim_is_rejected_and_never_unpickled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.tslim").write_bytes(pickle.dumps({"state": _Exploit()}))
    torch.save({"w": torch.zeros(3)}, tmp_path / "ckpt.tslim")  # a zip checkpoint as torch writes it
    for name in ("model.tslim", "ckpt.tslim"):
        with pytest.raises(ArtifactError, match="not a .tslim file|not a valid safetensors"):
            load(tmp_path / name, model=lenet_300_100())
    assert not (tmp_path / "PWNED").exists()


def _rewrite(tmp_path, model, change, key="tslim.zlib"):
    """A copy of ``model``'s file whose manifest ``change`` edited (the fingerprint still holds)."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    data = encode(model, zoo={"zoo": "lenet_300_100", "kwargs": {"in_features": 64}})
    manifest = json.loads(
        unpack_manifest(json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"])[0]
    )
    change(manifest)
    path = tmp_path / "edited.tslim"
    path.write_bytes(st_save(st_load(data), metadata=_packed(manifest, key)))
    return path


def _packed(manifest, key="tslim.zlib"):
    """Metadata holding ``manifest`` as a writer that allows NaN (unlike torchslim's) would store it."""
    text = json.dumps(manifest)
    return {key: base64.b64encode(zlib.compress(text.encode())).decode() if key == "tslim.zlib" else text}


def test_unknown_version_is_rejected(tmp_path, compressed):
    path = _rewrite(tmp_path, compressed, lambda m: m.update(version=99))
    with pytest.raises(ArtifactError, match="version 99.*upgrade torchslim"):
        read(path)


@pytest.mark.parametrize(
    "metadata, message",
    [
        ({"tslim.zlib": "not base64!"}, "compressed tslim manifest is damaged"),
        ({"tslim.zlib": base64.b64encode(zlib.compress(b"{")[:-3]).decode()}, "truncated|damaged"),
        ({"tslim.zlib": base64.b64encode(zlib.compress(b" " * (tslim.MAX_MANIFEST + 1))).decode()}, "inflates beyond"),
        ({"tslim.zlib": base64.b64encode(zlib.compress(b"\xff\xfe")).decode()}, "damaged"),
    ],
)
def test_damaged_or_oversized_compressed_manifests_are_artifact_errors(tmp_path, metadata, message):
    from safetensors.torch import save as st_save

    path = tmp_path / "bad.tslim"
    path.write_bytes(st_save({"w": torch.zeros(2)}, metadata=metadata))
    with pytest.raises(ArtifactError, match=message):
        read(path)


def test_a_manifest_under_the_key_of_another_version_is_rejected(tmp_path, compressed):
    path = _rewrite(tmp_path, compressed, lambda m: m.update(version=3))  # version 3 stored compressed
    with pytest.raises(ArtifactError, match="version 3 manifest must be stored under 'tslim'"):
        read(path)
    path = _rewrite(tmp_path, compressed, lambda m: None, key="tslim")  # version 5 stored plain
    with pytest.raises(ArtifactError, match="version 5 manifest must be stored under 'tslim.zlib'"):
        read(path)


def _entry(key, value):
    return lambda m: m["coded"]["fc1.weight"].update({key: value})


@pytest.mark.parametrize(
    "change, message",
    [
        (_entry("shape", [2**20, 2**20]), "not a codable shape|has shape"),
        (_entry("shape", [300, -64]), "not a codable shape|shape"),
        (_entry("sections", [-4, 0, 10**6]), "do not fit"),
        (_entry("alpha", float("nan")), "not valid JSON"),
        (_entry("alpha", -1.0), "unsupported value coding"),
        (_entry("nnz", 1e400), "not valid JSON"),
        (lambda m: m.update(version=True), "version"),
        (lambda m: m["coded"].update({"fc1.weight": None}), "mapping"),
        (_entry("positions", "zigzag"), "malformed"),
        (_entry("dtype", "complex64"), "malformed"),
        (lambda m: m["coded"].update({"fc1.weight": [1, 2]}), "mapping|shape"),
        (lambda m: m["coded"].update({"fc3.bias": m["coded"]["fc1.weight"]}), "U8|mapping|shape|decoded"),
    ],
)
def test_hostile_manifests_fail_with_artifact_errors(tmp_path, compressed, change, message):
    path = _rewrite(tmp_path, compressed, change)
    with pytest.raises(ArtifactError, match=message):
        load(path)
    with pytest.raises(ArtifactError):
        m, stored = read(path)
        decode_state(m, stored)
        load(path, model=lenet_300_100(in_features=64))


def test_decoding_without_a_model_is_bounded(tmp_path):
    path = save({"w": torch.zeros(300, 301)}, tmp_path / "zeros.tslim")  # 90,300 zeros in a few bytes
    manifest, stored = read(path)
    with pytest.raises(ArtifactError, match="more than the 1,000"):
        decode_state(manifest, stored, max_elements=1000)
    assert torch.equal(decode_state(manifest, stored)["w"], torch.zeros(300, 301))


@pytest.mark.parametrize(
    "model, message",
    [
        ({"zoo": "os.system", "kwargs": {}}, "unknown model"),
        ({"zoo": ["lenet5"]}, "unknown model"),
        ({"zoo": "lenet5", "kwargs": {"image_size": 4}}, "cannot build"),
        ({"zoo": "lenet_300_100", "kwargs": {"in_features": 10**7}}, "integers from 1"),
    ],
)
def test_manifest_model_names_only_zoo_builders(tmp_path, compressed, model, message):
    path = _rewrite(tmp_path, compressed, lambda m: m.update(model=model))
    with pytest.raises(ArtifactError, match=message):
        load(path)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(load(path, model=lenet_300_100(in_features=64))(x), compressed(x))  # a given model wins


def test_failed_save_keeps_the_earlier_file(tmp_path, compressed, monkeypatch):
    path = save(compressed, tmp_path / "keep.tslim")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(tslim, "encode", boom)
    with pytest.raises(RuntimeError):
        save(compressed, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.tslim"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_files_fail_cleanly_or_decode_the_original(tmp_path_factory, data):
    raw = bytearray(encode(_tiny()))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    path = tmp_path_factory.mktemp("fuzz") / "f.tslim"
    path.write_bytes(bytes(raw))
    try:
        manifest, stored = read(path)
        state = decode_state(manifest, stored)
    except ArtifactError:
        return
    original = _tiny().state_dict()
    assert set(state) == set(original)
    assert all(torch.equal(state[k], original[k]) for k in original)


def _with_modules(raw: bytes, edit) -> bytes:
    """The same file with its manifest's `modules` edited (the fingerprint covers only tensors)."""
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    manifest = json.loads(unpack_manifest(header["__metadata__"])[0])
    edit(manifest["modules"])
    header["__metadata__"] = _packed(manifest)
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body + raw[8 + n :]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["fc1"].update(out_features=True), "out_features=True in the file, which is not a size"),
        (lambda m: m["fc1"].update(out_features=-3), "may only shrink"),
        (lambda m: m["fc1"].update(out_features=10**12), "may only shrink"),
        (lambda m: m["fc1"].update(out_features=[1, 2]), "may only shrink"),
        (lambda m: m["fc1"].update(out_features="300"), "which is not a size"),
        (lambda m: m["fc1"].update(out_features=list(range(9))), "which is not a size"),
        (lambda m: m["fc1"].pop("in_features"), "lacks the size 'in_features'"),
        (lambda m: m["fc1"].update(type="Conv2d"), "as 'Conv2d' but the model has Linear"),
        (lambda m: m.update(fc9={"type": "Linear"}), "'fc9' as 'Linear' but the model has nothing"),
        (lambda m: m.update(fc1="x" * 10_000), "describes module 'fc1'"),
        (
            lambda m: m["fc2"].update(in_features=200),
            "fc2.*after resizing: weight is \\(100, 300\\), expected \\(100, 200\\)",
        ),
    ],
)
def test_hostile_module_sizes_are_refused_and_leave_the_model_intact(tmp_path, edit, message):
    raw = save(lenet_300_100(), tmp_path / "m.tslim").read_bytes()
    (tmp_path / "bad.tslim").write_bytes(_with_modules(raw, edit))
    model = lenet_300_100()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ShapeMismatchError, match=message):
        load(tmp_path / "bad.tslim", model=model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and model.fc2.in_features == 300


def test_saving_where_no_file_can_go_names_the_path_and_keeps_the_old_file(tmp_path):
    import os

    from torchslim.errors import ConfigError, OutputError

    model = _tiny()
    kept = save(model, tmp_path / "kept.tslim")
    before = kept.read_bytes()
    (tmp_path / "plain").write_text("a file")
    cases = {
        "": "give a file name",
        tmp_path: "names a folder",
        f"{tmp_path}/new/": "new names a folder",
        tmp_path / "plain" / "m.tslim": "plain is a file, not a folder",
    }
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        cases[ro / "m.tslim"] = "choose a writable folder"
    for path, message in cases.items():
        with pytest.raises(OutputError, match=message):
            save(model, path)
    assert kept.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["kept.tslim", "plain"] + (
        ["ro"] if os.geteuid() != 0 else []
    )
    for bad, message in ((lambda: 5, "returned int"), ("lenet_300_100", "leave model out")):
        with pytest.raises(ConfigError, match=message):
            load(kept, model=bad)


def test_int4_rows_wider_than_the_declared_width_are_refused(tmp_path):
    from safetensors.torch import save as st_save

    import torchslim as ts
    from torchslim.artifact.tslim import pack_manifest

    def build():
        return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))

    torch.manual_seed(0)
    model = build().eval()
    ts.quantize_(model, ts.QuantizeConfig(scheme="weight", bits=4, group_size=32), example=torch.randn(2, 64))
    path = save(model, tmp_path / "int4.tslim")
    manifest, stored = read(path)
    edited = json.loads(json.dumps(manifest.raw))
    edited["modules"]["0"]["in_features"] = 63  # same packed bytes per row, one value fewer declared
    bad = tmp_path / "bad.tslim"
    bad.write_bytes(st_save(stored, metadata=pack_manifest(edited)))
    fresh = build()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ArtifactError, match="past its declared width"):
        load(bad, model=fresh)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in before.items())  # nothing written into it
