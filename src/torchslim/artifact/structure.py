"""Module sizes in the manifest, and resizing a freshly built model to them on load.

Structured pruning changes a module's size attributes (``out_channels``, ``hidden_size``, ...)
together with its tensors. ``describe`` records those attributes for every module of a known
type; ``resize_`` sets them on the caller's freshly built model and reallocates the module's
own parameters and buffers to the file's shapes, so ``load_state_dict`` can fill them.

Resizing only ever shrinks: every attribute must be at most the fresh model's value and every
tensor at most as large as the fresh one, so a file cannot make the reader allocate more than
the caller's own model holds.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from torchslim.analysis.blocks import HEAD_ATTRS, is_attention
from torchslim.core.qlayers import FLOAT_TYPES, QuantizedLayer
from torchslim.core.qrnn import RNN_TYPES, QuantizedRNN
from torchslim.errors import ShapeMismatchError

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

SIZE_ATTRS: dict[type, tuple[str, ...]] = {
    nn.Conv1d: ("in_channels", "out_channels", "groups"),
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.Conv3d: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm1d: ("num_features",),
    nn.BatchNorm2d: ("num_features",),
    nn.BatchNorm3d: ("num_features",),
    nn.GroupNorm: ("num_channels",),
    nn.LayerNorm: ("normalized_shape",),
    nn.PReLU: ("num_parameters",),
    nn.Embedding: ("num_embeddings", "embedding_dim"),
    nn.LSTM: ("input_size", "hidden_size"),
    nn.GRU: ("input_size", "hidden_size"),
    nn.MultiheadAttention: ("embed_dim", "kdim", "vdim", "num_heads", "head_dim"),
}
"""Per module type, the attributes that say how big it is (and that structured pruning changes).
Also sized: a Hugging Face self-attention module by its head attributes (``HEAD_ATTRS``) and a
``ModuleList`` by its ``length`` (dropping layers shortens it)."""


def size_attrs(m: nn.Module) -> tuple[str, ...]:
    """The size attributes of ``m``'s type or of the nearest known type it derives from.

    A quantized layer has the sizes of the float layer it replaces.
    """
    if isinstance(m, QuantizedLayer):
        return SIZE_ATTRS[FLOAT_TYPES[m.float_type]]
    if isinstance(m, QuantizedRNN):
        return SIZE_ATTRS[RNN_TYPES[m.float_type]]
    if isinstance(m, nn.ModuleList):
        return ("length",)
    if is_attention(m):
        return HEAD_ATTRS
    for cls in type(m).__mro__:
        if cls in SIZE_ATTRS:
            return SIZE_ATTRS[cls]
    return ()


def type_name(m: nn.Module) -> str:
    """The class name the manifest records: a quantized layer is recorded as its float type."""
    return m.float_type if isinstance(m, (QuantizedLayer, QuantizedRNN)) else type(m).__name__


def describe(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: {"type": class name, attribute: value, ...}}`` for every module of a known type."""
    out = {}
    for name, m in model.named_modules():
        attrs = size_attrs(m)
        if attrs and name:
            entry: dict[str, Any] = {"type": type_name(m)}
            for a in attrs:
                v = _get(m, a)
                entry[a] = list(v) if isinstance(v, tuple) else v
            out[name] = entry
    return out


@dataclass(frozen=True)
class ModuleEntry:
    """One entry of the manifest's ``modules`` map, read back and checked: the reader of what
    :func:`describe` writes. Sizes are integers, ``None`` or short tuples of integers.

    Example:
        >>> ModuleEntry.parse({"type": "Linear", "in_features": 4, "out_features": 2}, "fc").sizes["out_features"]
        2
    """

    type: str
    sizes: dict[str, Any]

    @classmethod
    def parse(cls, entry: Any, name: str, path: Any = "file") -> ModuleEntry:
        if not isinstance(entry, dict) or not isinstance(entry.get("type"), str):
            said = entry.get("type") if isinstance(entry, dict) else entry
            raise ShapeMismatchError(
                f"{path}: the file describes module {name[:80]!r} as {str(said)[:60]!r}, not as a module type "
                "with its sizes; pass the builder of the model that was saved"
            )
        sizes = {attr: _size(value, name, attr, path) for attr, value in entry.items() if attr != "type"}
        return cls(entry["type"], sizes)


def _size(value: Any, name: str, attr: str, path: Any) -> int | tuple[int, ...] | None:
    """A size as the manifest gives it: an integer, null, or a list of up to 8 integers (a shape)."""
    if isinstance(value, list) and len(value) <= 8 and all(type(v) is int for v in value):
        return tuple(value)
    if value is None or type(value) is int:
        return value
    raise ShapeMismatchError(
        f"{path}: module {name[:80]!r} has {attr[:40]}={str(value)[:40]} in the file, which is not a size (an integer, "
        "null or a list of up to 8 integers); pass the builder of the model that was saved"
    )


def parse_modules(modules: Any, path: Any = "file") -> dict[str, ModuleEntry]:
    """The manifest's ``modules`` map, every entry parsed."""
    if not isinstance(modules, dict):
        raise ShapeMismatchError(f"{path}: the manifest's 'modules' must be an object")
    return {name: ModuleEntry.parse(entry, name, path) for name, entry in modules.items()}


def resize_(
    model: nn.Module, modules: Mapping[str, ModuleEntry] | None, shapes: Mapping[str, tuple[int, ...]], path: Any
) -> None:
    """Shrink ``model``'s modules to the sizes ``modules`` records and its tensors to ``shapes``.

    Either every module is resized consistently or, on any error, the model is left as it was.
    """
    if modules is None:
        return
    backup = copy.deepcopy(model.__dict__) if _differs(model, modules, shapes) else None
    try:
        _resize(model, modules, shapes, path)
    except BaseException:
        if backup is not None:
            model.__dict__.update(backup)
        raise


def _differs(model: nn.Module, modules: Mapping[str, ModuleEntry], shapes: Mapping[str, tuple[int, ...]]) -> bool:
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return modules != parse_modules(describe(model)) or any(own.get(k) != tuple(v) for k, v in shapes.items())


def _resize(
    model: nn.Module, modules: Mapping[str, ModuleEntry], shapes: Mapping[str, tuple[int, ...]], path: Any
) -> None:
    lists = sorted((n for n, e in modules.items() if e.type == "ModuleList"), key=lambda n: n.count("."))
    for name in lists:  # shorten layer lists first: what else is named lives in the kept layers
        m = dict(model.named_modules()).get(name)
        if isinstance(m, nn.ModuleList):
            before = len(m)
            _set_sizes(m, name, modules[name], path)
            _layer_count(model, before, len(m))
    owned = dict(model.named_modules())
    changed: list[tuple[str, nn.Module]] = []
    for name, entry in modules.items():
        m = owned.get(name)
        if m is None or entry.type != type_name(m):
            found = type_name(m) if m is not None else "nothing"
            raise ShapeMismatchError(
                f"{path}: the file describes module {name[:80]!r} as {entry.type[:60]!r} "
                f"but the model has {found} there; pass the builder of the model that was saved"
            )
        if _set_sizes(m, name, entry, path):
            _reallocate(m, name, shapes, path)
            changed.append((name, m))
    for name, m in changed:  # after every module is resized: an attention's width is its query's
        _check_consistent(m, name, path)
    for name, m in owned.items():  # bare parameters of other modules (a per-channel gain) follow their group
        if not size_attrs(m):
            _reallocate(m, name, shapes, path)


def _get(m: nn.Module, attr: str) -> Any:
    return len(m) if isinstance(m, nn.ModuleList) and attr == "length" else getattr(m, attr)


def _set_sizes(m: nn.Module, name: str, entry: ModuleEntry, path: Any) -> bool:
    changed = False
    for attr in size_attrs(m):
        if attr not in entry.sizes:
            raise ShapeMismatchError(f"{path}: module {name!r} lacks the size {attr!r} in the manifest")
        have, want = _get(m, attr), entry.sizes[attr]
        if not (_fits(want, have) or (attr == "length" and want == 0)):
            raise ShapeMismatchError(
                f"{path}: module {name!r} has {attr}={str(want)[:40]} in the file but {have!r} in the model; a file "
                "may only shrink the model it is loaded into: pass the builder of the model that was saved"
            )
        if want != have and isinstance(m, nn.ModuleList):
            del m[want:]  # the kept layers were renumbered from 0 when the others were dropped
        elif want != have:
            setattr(m, attr, want)
            changed = True
    return changed


def _layer_count(model: nn.Module, before: int, after: int) -> None:
    """A Hugging Face config that counted the layers of a shortened list counts the kept ones."""
    config = getattr(model, "config", None)
    if after < before and getattr(config, "num_hidden_layers", None) == before:
        config.num_hidden_layers = after


def _fits(want: Any, have: Any) -> bool:
    if isinstance(have, tuple):
        return isinstance(want, tuple) and len(want) == len(have) and all(_fits(w, h) for w, h in zip(want, have))
    if have is None:
        return want is None
    return type(want) is int and 1 <= want <= have


def _reallocate(m: nn.Module, name: str, shapes: Mapping[str, tuple[int, ...]], path: Any) -> None:
    """Give ``m``'s own tensors the file's (smaller) shapes; their values come from the file."""
    for pname, p in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
        key = f"{name}.{pname}" if name else pname
        shape = shapes.get(key)
        if shape is None or tuple(shape) == tuple(p.shape):
            continue
        if len(shape) != p.dim() or any(a > b for a, b in zip(shape, p.shape)):
            raise ShapeMismatchError(
                f"{path}: {key} has shape {tuple(shape)} in the file, which does not shrink {tuple(p.shape)}"
            )
        fresh = torch.zeros(shape, dtype=p.dtype, device=p.device)
        if isinstance(p, nn.Parameter):
            setattr(m, pname, nn.Parameter(fresh, requires_grad=p.requires_grad))
        else:
            setattr(m, pname, fresh)
    if isinstance(m, nn.RNNBase):
        m.flatten_parameters()


def _expected(m: nn.Module) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """The tensor shapes a module's size attributes imply, and the rules they break."""
    shapes: dict[str, tuple[int, ...]] = {}
    broken: list[str] = []
    if isinstance(m, QuantizedLayer):
        return _expected_quantized(m)
    if isinstance(m, QuantizedRNN):
        rows = m.weight_shapes()["weight_hh_l0"][0]
        shapes = dict(m.weight_shapes()) | {f"{n}_scale": (rows,) for n in m.weight_shapes()}
        return shapes | {n: (rows,) for n in m.bias_names()}, []
    if isinstance(m, _CONV):
        if m.in_channels % m.groups or m.out_channels % m.groups:
            broken.append(f"in_channels and out_channels must be multiples of groups={m.groups}")
        shapes = {"weight": (m.out_channels, m.in_channels // m.groups, *m.kernel_size), "bias": (m.out_channels,)}
    elif isinstance(m, nn.Linear):
        shapes = {"weight": (m.out_features, m.in_features), "bias": (m.out_features,)}
    elif isinstance(m, _BN):
        shapes = {k: (m.num_features,) for k in ("weight", "bias", "running_mean", "running_var")}
    elif isinstance(m, nn.GroupNorm):
        if m.num_channels % m.num_groups:
            broken.append(f"num_channels must be a multiple of num_groups={m.num_groups}")
        shapes = {"weight": (m.num_channels,), "bias": (m.num_channels,)}
    elif isinstance(m, nn.LayerNorm):
        shapes = {"weight": tuple(m.normalized_shape), "bias": tuple(m.normalized_shape)}
    elif isinstance(m, nn.PReLU):
        shapes = {"weight": (m.num_parameters,)}
    elif isinstance(m, nn.Embedding):
        if m.padding_idx is not None and not -m.num_embeddings <= m.padding_idx < m.num_embeddings:
            broken.append(f"padding_idx={m.padding_idx} is outside num_embeddings={m.num_embeddings}")
        shapes = {"weight": (m.num_embeddings, m.embedding_dim)}
    elif isinstance(m, (nn.LSTM, nn.GRU)):
        shapes = _expected_rnn(m)
    elif isinstance(m, nn.MultiheadAttention):
        return _expected_attention(m)
    elif is_attention(m):
        width = m.num_attention_heads * m.attention_head_size
        if not m.all_head_size == width == m.query.out_features:
            broken.append(
                f"all_head_size={m.all_head_size} must equal num_attention_heads={m.num_attention_heads} x "
                f"attention_head_size={m.attention_head_size} and the query's width {m.query.out_features}"
            )
    return shapes, broken


def _expected_rnn(m: nn.LSTM | nn.GRU) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    rows, dirs = (4 if isinstance(m, nn.LSTM) else 3) * m.hidden_size, 2 if m.bidirectional else 1
    for layer in range(m.num_layers):
        for sfx in ("", "_reverse")[:dirs]:
            width = m.input_size if layer == 0 else m.hidden_size * dirs
            shapes |= {f"weight_ih_l{layer}{sfx}": (rows, width), f"weight_hh_l{layer}{sfx}": (rows, m.hidden_size)}
            shapes |= {f"bias_ih_l{layer}{sfx}": (rows,), f"bias_hh_l{layer}{sfx}": (rows,)}
    return shapes


def _expected_attention(m: nn.MultiheadAttention) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    e = m.embed_dim
    broken = (
        []
        if m.head_dim * m.num_heads == e
        else [f"embed_dim={e} must equal head_dim={m.head_dim} x num_heads={m.num_heads}"]
    )
    shapes = {
        "in_proj_weight": (3 * e, e),
        "in_proj_bias": (3 * e,),
        "q_proj_weight": (e, e),
        "k_proj_weight": (e, m.kdim),
        "v_proj_weight": (e, m.vdim),
        "bias_k": (1, 1, e),
        "bias_v": (1, 1, e),
    }
    return shapes, broken


def _expected_quantized(m: QuantizedLayer) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    broken: list[str] = []
    shape = m.weight_shape()
    out = shape[0]
    if m.float_type != "Linear" and (m.in_channels % m.groups or m.out_channels % m.groups):
        broken.append(f"in_channels and out_channels must be multiples of groups={m.groups}")
    if m.bits == 4:
        shapes = {"weight": (out, (shape[1] + 1) // 2), "weight_scale": (out, -(-shape[1] // m.group_size))}
    else:
        shapes = {"weight": shape, "weight_scale": (out if m.per_channel else 1,)}
    return shapes | {"bias": (out,)}, broken


def _check_consistent(m: nn.Module, name: str, path: Any) -> None:
    """A resized module's attributes must agree with each other and with its tensors."""
    shapes, broken = _expected(m)
    own = dict(m.named_parameters(recurse=False)) | dict(m.named_buffers(recurse=False))
    wrong = [
        f"{k} is {tuple(own[k].shape)}, expected {v}"
        for k, v in shapes.items()
        if k in own and own[k] is not None and tuple(own[k].shape) != v
    ]
    if broken or wrong:
        raise ShapeMismatchError(f"{path}: module {name!r} after resizing: {'; '.join(broken + wrong)[:300]}")
