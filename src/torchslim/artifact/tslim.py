"""``save`` and ``load`` of `.tslim` files (spec: docs/format.md).

Nothing here unpickles or imports code named in a file: the container is parsed by
safetensors, the manifest by ``json``, and the model is rebuilt by a builder the caller
passes (or a zoo builder named in the manifest and looked up in a literal dict).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import os
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from torchslim.artifact.codecs import CodedEntry, decode_tensor, encode_tensor
from torchslim.artifact.structure import ModuleEntry, describe, parse_modules, resize_
from torchslim.core.attention import attention_precision, set_attention_precision_
from torchslim.core.device import Device, parameters_on_meta, place
from torchslim.core.files import output_path, write_atomic
from torchslim.core.lowrank import check_ranks, lowrank_layers, lowrank_layers_in_, parse_lowrank
from torchslim.core.qlayers import (
    folded_batchnorm,
    folded_names,
    int4_padding_is_zero,
    parse_folds,
    unfuse_transformer_layers_,
)
from torchslim.core.qrnn import QuantEntry, quantized_layers
from torchslim.core.task import call_model, logits_of
from torchslim.core.ties import tie_, tied_names
from torchslim.errors import ArtifactError, ConfigError, ShapeMismatchError

FORMAT, VERSION = "tslim", 6
READS = (1, 2, 3, 4, 5, 6)
"""Versions this reader reads: 1 has no ``modules`` key (no structural pruning), 2 requires it,
3 adds ``quant`` and ``folded`` (quantized layers, BatchNorms folded into convolutions), 4
stores the manifest zlib-compressed (metadata key ``tslim.zlib``) instead of as plain JSON, 5
codes int8 tensors with a one-byte-per-entry codebook (``codebook8``), 6 stores a tied tensor
once and lists its other names under ``tied``."""
UNTIED_VERSION = 5
"""The version a file without tied tensors is written as, so that readers before 6 read it."""
MANIFEST_KEY, PLAIN_KEY = "tslim.zlib", "tslim"
MAX_MANIFEST = 64 * 2**20
"""Bytes a compressed manifest may inflate to; bounds what a hostile file makes the reader allocate."""
MAX_ZOO_ARG = 65536
"""Zoo builder arguments (sizes, class counts) a file may name; bounds what loading allocates."""
_REQUIRED = ("format", "version", "coded", "model", "plan", "metrics", "fingerprint")
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def encode(
    model: nn.Module | Mapping[str, torch.Tensor],
    *,
    plan: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    zoo: Mapping[str, Any] | None = None,
) -> bytes:
    """The bytes of a `.tslim` file for ``model`` (a module or a state_dict)."""
    state = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    modules = describe(model) if isinstance(model, nn.Module) else None
    tied = tied_names(state)  # a tied tensor is stored once, under its first name
    stored, entries, memory = {}, {}, set()
    for name, t in state.items():
        if name in tied:
            continue
        t = t.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in memory:  # overlaps a stored tensor: a copy of its own
            t = t.clone()
        memory.add(t.untyped_storage().data_ptr())
        coded = encode_tensor(t)
        if coded is not None and len(coded.blob) + len(_compact(coded.entry)) < t.numel() * t.element_size():
            blob = bytearray(coded.blob)
            stored[name] = torch.frombuffer(blob, dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8)
            entries[name] = coded.entry
        else:
            stored[name] = t
    manifest = {
        "format": FORMAT,
        "version": VERSION if tied else UNTIED_VERSION,
        "coded": entries,
        "model": dict(zoo) if zoo else None,
        "plan": dict(plan or {}),
        "metrics": dict(metrics or {}),
        "fingerprint": fingerprint(stored),
    }
    manifest["modules"] = modules or {}
    manifest["quant"] = quantized_layers(model) if isinstance(model, nn.Module) else {}
    manifest["folded"] = folded_names(model) if isinstance(model, nn.Module) else {}
    if tied:
        manifest["tied"] = tied
    attention = attention_precision(model) if isinstance(model, nn.Module) else None
    if attention is not None:
        manifest["attention"] = attention
    lowrank = lowrank_layers(model) if isinstance(model, nn.Module) else {}
    if lowrank:  # optional: files without low-rank layers are unchanged
        manifest["lowrank"] = lowrank
    return st_save(stored, metadata=pack_manifest(manifest))


def _compact(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def pack_manifest(manifest: Mapping[str, Any]) -> dict[str, str]:
    """The safetensors metadata that holds ``manifest``: its compact JSON, zlib-compressed and
    base64-encoded (a manifest is mostly names and repeated keys; small models' files would
    otherwise spend a tenth of their bytes on it)."""
    raw = zlib.compress(_compact(manifest).encode(), 9)
    return {MANIFEST_KEY: base64.b64encode(raw).decode("ascii")}


def unpack_manifest(meta: Mapping[str, str], path: str | os.PathLike = "file") -> tuple[str, bool]:
    """The manifest's JSON text from the metadata, and whether it came compressed."""
    if MANIFEST_KEY not in meta:
        return meta[PLAIN_KEY], False
    try:
        packed = base64.b64decode(meta[MANIFEST_KEY], validate=True)
        inflater = zlib.decompressobj()
        text = inflater.decompress(packed, MAX_MANIFEST)
        if inflater.unconsumed_tail or not inflater.eof:
            raise ArtifactError(f"{path}: the manifest inflates beyond {MAX_MANIFEST} bytes or is truncated")
        return text.decode("utf-8"), True
    except (binascii.Error, zlib.error, UnicodeDecodeError, TypeError) as exc:
        raise ArtifactError(f"{path}: the compressed tslim manifest is damaged ({exc!r})") from None


def save(
    model: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    plan: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    zoo: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` to ``path`` as a `.tslim` file, atomically.

    Zeros become coded positions, layers with at most 256 distinct non-zero values become
    codebook + entropy-coded indices, everything else is stored natively. The file appears
    only when complete; a failure leaves any earlier file at ``path`` untouched.

    Example:
        >>> ts.save(model, "lenet.tslim")  # doctest: +SKIP
    """
    output_path(path)  # a path that cannot take a file is refused before the model is encoded
    data = encode(model, plan=plan, metrics=metrics, zoo=zoo)
    return write_atomic(path, data)


@torch.no_grad()
def check_reproduces(model: nn.Module, restored: nn.Module, inputs: Iterable[Any], path: str | os.PathLike) -> None:
    """The model loaded from ``path`` must give exactly ``model``'s outputs on every input batch;
    otherwise an :class:`ArtifactError` (a file that does not reproduce its model is a bug).
    An input is a tensor, a tuple of positional inputs or a dict of keyword inputs."""
    model.eval()
    restored.eval()
    for i, x in enumerate(inputs):
        if not _same_output(call_model(model, x), call_model(restored, x)):
            raise ArtifactError(
                f"{path} does not reproduce the compressed model's outputs exactly (input batch {i}); "
                "please report it with the file"
            )


def _same_output(a: Any, b: Any) -> bool:
    """Exact equality of two model outputs: tensors, or tuples / dicts / objects holding them."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same_output(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_output(x, y) for x, y in zip(a, b))
    return torch.equal(logits_of(a), logits_of(b))


def fingerprint(stored: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over each stored tensor's name, dtype and bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(stored):
        t = stored[name].contiguous()
        if t.dtype not in _ST_DTYPES:
            raise ArtifactError(f"tensor {name!r} has dtype {t.dtype}, which the .tslim format does not store")
        digest.update(name.encode() + b"\0" + _ST_DTYPES[t.dtype].encode() + b"\0")
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + digest.hexdigest()


@dataclass
class Manifest:
    """A `.tslim` file's manifest (docs/format.md, section 2), parsed once: every entry is typed
    and checked by the reader that sits beside its writer -- coded tensors in ``codecs``, module
    sizes in ``structure``, quantized layers in ``core.qrnn``, folds in ``core.qlayers``, low-rank
    layers in ``core.lowrank``. What needs the model (do those modules exist, do the sizes only
    shrink) is checked on load.
    """

    format: str
    version: int
    coded: dict[str, CodedEntry]
    model: dict[str, Any] | None  # the zoo builder, checked against the zoo on load
    plan: dict[str, Any]
    metrics: dict[str, Any]
    fingerprint: str
    modules: dict[str, ModuleEntry] | None  # None: a version 1 file (no structural pruning)
    quant: dict[str, QuantEntry] = field(default_factory=dict)
    folded: dict[str, str] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)  # alias -> the stored name it is tied to
    attention: str | None = None  # the precision of a transformers model's attention, when not its own
    lowrank: dict[str, int] = field(default_factory=dict)  # factorised Linear layer -> its rank
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # the JSON as read

    @classmethod
    def parse(cls, manifest: Any, compressed: bool, path: Any = "file") -> Manifest:
        """The manifest's JSON checked key by key; a fault is an :class:`ArtifactError`."""
        missing = [k for k in _REQUIRED if not isinstance(manifest, dict) or k not in manifest]
        if missing:
            raise ArtifactError(f"{path}: the manifest lacks {missing}")
        version = manifest["version"]
        if manifest["format"] != FORMAT or type(version) is not int or version not in READS:
            raise ArtifactError(
                f"{path}: format {manifest['format']!r} version {version!r}; this torchslim reads "
                f"{FORMAT!r} versions {list(READS)}: upgrade torchslim"
            )
        if compressed != (version >= 4):
            raise ArtifactError(
                f"{path}: a version {version} manifest must be stored under {MANIFEST_KEY if version >= 4 else PLAIN_KEY!r}"
            )
        if version >= 2 and not isinstance(manifest.get("modules"), dict):
            raise ArtifactError(f"{path}: a version {version} manifest needs a 'modules' object")
        if version >= 3 and not (isinstance(manifest.get("quant"), dict) and isinstance(manifest.get("folded"), dict)):
            raise ArtifactError(f"{path}: a version {version} manifest needs 'quant' and 'folded' objects")
        coded, quant = manifest["coded"], manifest.get("quant", {})
        objects = {"coded": coded, "plan": manifest["plan"], "metrics": manifest["metrics"], "quant": quant}
        wrong = [k for k, v in objects.items() if not isinstance(v, dict)]
        if wrong or not isinstance(manifest["fingerprint"], str) or not isinstance(manifest["model"], dict | None):
            raise ArtifactError(f"{path}: the manifest's {wrong or ['fingerprint', 'model']} have the wrong JSON types")
        return cls(
            format=FORMAT,
            version=version,
            coded={name: CodedEntry.parse(entry, name) for name, entry in coded.items()},
            model=manifest["model"],
            plan=manifest["plan"],
            metrics=manifest["metrics"],
            fingerprint=manifest["fingerprint"],
            modules=None if manifest.get("modules") is None else parse_modules(manifest["modules"], path),
            quant={name: QuantEntry.parse(spec, name, path) for name, spec in quant.items()},
            folded=parse_folds(manifest.get("folded", {}), path),
            tied=_parse_ties(manifest.get("tied"), version, path),
            attention=_parse_attention(manifest.get("attention"), path),
            lowrank=parse_lowrank(manifest.get("lowrank"), path),
            raw=manifest,
        )


def _parse_attention(attention: Any, path: Any) -> str | None:
    """The optional ``attention`` key: the precision the model's attention runs in."""
    if attention is not None and attention != "bfloat16":
        raise ArtifactError(f"{path}: 'attention' must be \"bfloat16\" when present, not {attention!r}")
    return attention


def _parse_ties(tied: Any, version: int, path: Any) -> dict[str, str]:
    """Version 6's ``tied`` object: alias -> stored name, no alias itself a target."""
    if version < 6:
        return {}
    if not isinstance(tied, dict) or not tied:
        raise ArtifactError(f"{path}: a version 6 manifest needs a non-empty 'tied' object (alias -> stored name)")
    if not all(isinstance(a, str) and isinstance(c, str) and a != c for a, c in tied.items()):
        raise ArtifactError(f"{path}: 'tied' maps tensor names to other tensor names (strings)")
    if set(tied) & set(tied.values()):
        raise ArtifactError(f"{path}: 'tied' chains aliases; each alias must name a stored tensor")
    return dict(tied)


def read(path: str | os.PathLike) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """Parse a `.tslim` file and check its container, its manifest and the fingerprint.

    Returns ``(manifest, stored tensors)``. Decodes nothing: :func:`decode_state` decodes.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) < 8:
        raise ArtifactError(f"{path}: {len(raw)} bytes is too short for a .tslim (safetensors) file")
    header_len = int.from_bytes(raw[:8], "little")
    if header_len > len(raw) - 8:
        raise ArtifactError(
            f"{path}: not a .tslim file (the first 8 bytes announce a {header_len}-byte header but the file "
            f"has {len(raw)} bytes): truncated, or not safetensors at all (a pickle or zip checkpoint?)"
        )
    try:
        stored = st_load(raw)
        header = json.loads(raw[8 : 8 + header_len])
    except (SafetensorError, ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
        raise ArtifactError(f"{path}: not a valid safetensors container: {exc!r}") from None
    manifest = _manifest(path, header)
    if not set(manifest.coded) <= set(stored):
        raise ArtifactError(f"{path}: the manifest lists coded tensors that the container lacks")
    if not set(manifest.tied.values()) <= set(stored) or set(manifest.tied) & set(stored):
        raise ArtifactError(f"{path}: 'tied' must map names the container lacks to names it holds")
    if fingerprint(stored) != manifest.fingerprint:
        raise ArtifactError(f"{path}: content fingerprint mismatch; the file is corrupted (bit flip or edit)")
    return manifest, stored


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in a manifest")


def _manifest(path: Path, header: Any) -> Manifest:
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not {MANIFEST_KEY, PLAIN_KEY} & set(meta):
        raise ArtifactError(f"{path}: a safetensors file without a tslim manifest; save it with torchslim.save")
    text, compressed = unpack_manifest(meta, path)
    try:
        manifest = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise ArtifactError(f"{path}: the tslim manifest is not valid JSON ({exc!r})") from None
    return Manifest.parse(manifest, compressed, path)


def decode_state(
    manifest: Manifest, stored: Mapping[str, torch.Tensor], max_elements: int | None = 2**26
) -> dict[str, torch.Tensor]:
    """Decode every tensor of a verified file into a state_dict.

    ``max_elements`` caps the total size of the coded tensors decoded, so that a small hostile
    file cannot make the reader allocate without bound; ``load`` lifts it once the shapes have
    been checked against the caller's model.
    """
    coded = manifest.coded
    total = sum(entry.numel for entry in coded.values())
    if max_elements is not None and total > max_elements:
        raise ArtifactError(
            f"the file's coded tensors hold {total:,} elements, more than the {max_elements:,} this reader "
            "decodes without a model; use load(path, model=...) for a model of that size"
        )
    state = {}
    for name, t in stored.items():
        if name not in coded:
            state[name] = t
        elif t.dtype == torch.uint8 and t.dim() == 1:
            state[name] = decode_tensor(t.numpy().tobytes(), coded[name], name)
        else:
            raise ArtifactError(f"tensor {name!r}: a coded tensor must be stored as a 1-D U8 blob")
    for alias, canonical in manifest.tied.items():  # one tensor under every name it is tied to
        state[alias] = state[canonical]
    return state


def load(
    path: str | os.PathLike, model: nn.Module | Callable[[], nn.Module] | None = None, *, device: Device = None
) -> nn.Module:
    """Rebuild a runnable model from a `.tslim` file.

    Args:
        path: the file.
        model: a freshly built model of the right architecture, or a builder returning one.
            When omitted, the zoo model named in the file is built. A builder is run with its
            parameters on the meta device, so only what the file holds takes memory (an int4
            LLM never exists in fp32); prefer it to a built model for large models.
        device: where the restored model goes (``"auto"``, ``"cpu"``, ``"cuda:N"``); the file
            itself is device-independent. ``None``: where ``model`` was (CPU when built here).

    Example:
        >>> restored = ts.load("lenet.tslim", model=ts.models.lenet_300_100())  # doctest: +SKIP
    """
    manifest, stored = read(path)
    module = _target(manifest, model, path)
    shapes = _shapes(manifest, stored)
    swaps = bool(manifest.folded or manifest.quant or manifest.lowrank)
    children = [(m, dict(m._modules)) for m in module.modules()] if swaps and isinstance(model, nn.Module) else []
    try:
        _into(module, manifest, stored, shapes, path)
    except BaseException:
        for m, kept in children:  # the caller's own model is left as it was
            m._modules.clear()
            m._modules.update(kept)
        raise
    return place(module, device).eval()


def _into(module: nn.Module, manifest: Manifest, stored: Mapping[str, torch.Tensor], shapes: dict, path: Any) -> None:
    """Fold, factorise, quantize and resize ``module`` as the file says, check every shape, then fill it."""
    _refold(module, manifest.folded, path)
    lowrank_layers_in_(module, manifest.lowrank, path)  # before quantizing: a factor may be quantized
    _requantize(module, manifest.quant, path)
    resize_(module, manifest.modules, shapes, path)  # structurally pruned files shrink the model
    check_ranks(module, manifest.lowrank, path)
    current = module.state_dict()
    expected = {k: tuple(v.shape) for k, v in current.items()}
    extra, missing = sorted(set(shapes) - set(expected)), sorted(set(expected) - set(shapes))
    if extra or missing:
        raise ShapeMismatchError(
            f"{path}: the model does not match the file: tensors only in the file {extra[:5]}, "
            f"only in the model {missing[:5]}; pass the builder of the model that was saved"
        )
    for name, shape in shapes.items():
        if shape != expected[name]:
            raise ShapeMismatchError(
                f"{path}: {name} has shape {shape} in the file but {expected[name]} in the "
                "model; pass the builder of the model that was saved"
            )
    state = decode_state(manifest, stored, None)  # only now: the model bounds what is decoded
    for name, entry in manifest.quant.items():  # before anything is written into the model
        layer = module.get_submodule(name)
        if entry.bits == 4 and not int4_padding_is_zero(state[f"{name}.weight"], layer.weight_shape()[1]):
            raise ArtifactError(
                f"{path}: {name}'s packed int4 rows hold values past its declared width; the file is inconsistent"
            )
        smooth = state.get(f"{name}.input_smooth")
        if smooth is not None and not (torch.isfinite(smooth).all() and (smooth > 0).all()):
            raise ArtifactError(f"{path}: {name}.input_smooth must be positive and finite; the file is inconsistent")
    empty = any(p.is_meta for p in module.parameters())  # built on meta: take the decoded tensors themselves
    if empty:
        state = {k: t.to(current[k].dtype) for k, t in state.items()}
    module.load_state_dict(state, assign=empty)
    unfilled = [n for n, t in itertools.chain(module.named_parameters(), module.named_buffers()) if t.is_meta]
    if unfilled:
        raise ShapeMismatchError(
            f"{path}: the file does not fill {unfilled[:5]}; pass the builder of the model that was saved"
        )
    tie_(module, manifest.tied)  # a builder that does not tie them itself gets the file's ties
    if manifest.attention is not None:
        try:
            set_attention_precision_(module, manifest.attention)
        except ConfigError as exc:
            raise ShapeMismatchError(f"{path}: {exc}; pass the builder of the model that was saved") from None


def _refold(module: nn.Module, folded: Mapping[str, str], path: Any) -> None:
    """Replace each BatchNorm the file says was folded by an Identity; its convolution gets a bias."""
    owned = dict(module.named_modules())
    for bn_name, conv_name in folded.items():
        bn, conv = owned.get(bn_name), owned.get(conv_name)
        if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or type(conv) not in (nn.Conv1d, nn.Conv2d):
            raise ShapeMismatchError(
                f"{path}: the file folded a BatchNorm at {bn_name[:80]!r} into {str(conv_name)[:80]!r} but the model "
                f"has {type(bn).__name__} and {type(conv).__name__} there; pass the builder of the model that was saved"
            )
    for bn_name, conv_name in folded.items():
        conv = owned[conv_name]
        if conv.bias is None:
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
        module.set_submodule(bn_name, folded_batchnorm(type(owned[bn_name]).__name__, conv_name))


def _requantize(module: nn.Module, quant: Mapping[str, QuantEntry], path: Any) -> None:
    """Replace each layer the file stores quantized by an empty quantized layer of its shapes."""
    owned = dict(module.named_modules())
    fresh = {name: entry.empty_like(owned.get(name), name, path) for name, entry in quant.items()}
    for name, q in fresh.items():
        module.set_submodule(name, q)
    unfuse_transformer_layers_(module, fresh)


def _shapes(manifest: Manifest, stored: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """The decoded shape of every stored tensor and of its tied aliases, from the container and
    the manifest."""
    coded = manifest.coded
    shapes = {n: coded[n].shape if n in coded else tuple(t.shape) for n, t in stored.items()}
    return shapes | {alias: shapes[canonical] for alias, canonical in manifest.tied.items()}


def _target(manifest: Manifest, model: nn.Module | Callable[[], nn.Module] | None, path: Any) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if model is not None:
        if not callable(model) or isinstance(model, (str, bytes)):
            raise ConfigError(
                f"load(model={model!r}): pass a fresh model or a function that builds one (e.g. model=build); "
                "for a zoo model leave model out and the file's own builder is used"
            )
        built = _build(model)
        if not isinstance(built, nn.Module):
            raise ConfigError(
                f"load(model=...): the builder returned {type(built).__name__}, not a torch.nn.Module; "
                "pass a function that returns a fresh model of the saved architecture"
            )
        return built
    zoo = manifest.model
    if not zoo:
        raise ArtifactError(f"{path}: the file holds a user model; pass model=<a fresh instance or builder>")
    from torchslim.core.models import ZOO, build_model

    name, kwargs = (zoo.get("zoo"), zoo.get("kwargs", {})) if isinstance(zoo, dict) else (None, None)
    if not isinstance(name, str) or name not in ZOO or not isinstance(kwargs, dict):
        raise ArtifactError(f"{path}: manifest names an unknown model {zoo!r}; pass model=<a builder>")
    if not all(type(v) is int and 1 <= v <= MAX_ZOO_ARG for v in kwargs.values()):
        raise ArtifactError(f"{path}: zoo arguments {kwargs} must be integers from 1 to {MAX_ZOO_ARG}")
    try:
        return _build(lambda: build_model(name, **kwargs))
    except (ConfigError, RuntimeError, ValueError) as exc:
        raise ArtifactError(f"{path}: cannot build the model the manifest names: {exc}") from None


def _build(builder: Callable[[], Any]) -> Any:
    """``builder()`` with its parameters on the meta device (the file fills them: the float model
    never takes memory), or built as usual where the builder needs real parameter values."""
    try:
        with parameters_on_meta():
            return builder()
    except Exception:  # noqa: BLE001 -- it needs real values (say .item() on a weight): build it as usual
        return builder()
