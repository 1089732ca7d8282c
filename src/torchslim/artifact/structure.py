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

from typing import Any, Mapping

import torch
from torch import nn

from torchslim.errors import ShapeMismatchError

SIZE_ATTRS: dict[type, tuple[str, ...]] = {
    nn.Conv1d: ("in_channels", "out_channels", "groups"),
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.Conv3d: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm1d: ("num_features",), nn.BatchNorm2d: ("num_features",), nn.BatchNorm3d: ("num_features",),
    nn.GroupNorm: ("num_channels",),
    nn.LayerNorm: ("normalized_shape",),
    nn.PReLU: ("num_parameters",),
    nn.Embedding: ("num_embeddings", "embedding_dim"),
    nn.LSTM: ("input_size", "hidden_size"), nn.GRU: ("input_size", "hidden_size"),
    nn.MultiheadAttention: ("embed_dim", "kdim", "vdim", "num_heads", "head_dim"),
}  # fmt: skip
"""Per module type, the attributes that say how big it is (and that structured pruning changes)."""


def size_attrs(m: nn.Module) -> tuple[str, ...]:
    """The size attributes of ``m``'s type or of the nearest known type it derives from."""
    for cls in type(m).__mro__:
        if cls in SIZE_ATTRS:
            return SIZE_ATTRS[cls]
    return ()


def describe(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: {"type": class name, attribute: value, ...}}`` for every module of a known type."""
    out = {}
    for name, m in model.named_modules():
        attrs = size_attrs(m)
        if attrs and name:
            entry: dict[str, Any] = {"type": type(m).__name__}
            for a in attrs:
                v = getattr(m, a)
                entry[a] = list(v) if isinstance(v, tuple) else v
            out[name] = entry
    return out


def resize_(model: nn.Module, modules: Any, shapes: Mapping[str, tuple[int, ...]], path: Any) -> None:
    """Shrink ``model``'s modules to the sizes ``modules`` records and its tensors to ``shapes``."""
    if modules is None:
        return
    if not isinstance(modules, dict):
        raise ShapeMismatchError(f"{path}: the manifest's 'modules' must be an object")
    owned = dict(model.named_modules())
    for name, entry in modules.items():
        m = owned.get(name)
        if m is None or not isinstance(entry, dict) or entry.get("type") != type(m).__name__:
            found = type(m).__name__ if m is not None else "nothing"
            raise ShapeMismatchError(
                f"{path}: the file describes module {name!r} as {entry.get('type') if isinstance(entry, dict) else entry!r} "
                f"but the model has {found} there; pass the builder of the model that was saved"
            )
        changed = _set_sizes(m, name, entry, path)
        if changed:
            _reallocate(m, name, shapes, path)
    for name, m in owned.items():  # bare parameters of other modules (a per-channel gain) follow their group
        if not size_attrs(m):
            _reallocate(m, name, shapes, path)


def _set_sizes(m: nn.Module, name: str, entry: dict, path: Any) -> bool:
    changed = False
    for attr in size_attrs(m):
        if attr not in entry:
            raise ShapeMismatchError(f"{path}: module {name!r} lacks the size {attr!r} in the manifest")
        have, want = getattr(m, attr), entry[attr]
        want = tuple(want) if isinstance(want, list) else want
        if not _fits(want, have):
            raise ShapeMismatchError(
                f"{path}: module {name!r} has {attr}={want!r} in the file but {have!r} in the model; a file may "
                "only shrink the model it is loaded into: pass the builder of the model that was saved"
            )
        if want != have:
            setattr(m, attr, want)
            changed = True
    return changed


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
        fresh = torch.zeros(shape, dtype=p.dtype)
        if isinstance(p, nn.Parameter):
            setattr(m, pname, nn.Parameter(fresh, requires_grad=p.requires_grad))
        else:
            setattr(m, pname, fresh)
    if isinstance(m, nn.RNNBase):
        m.flatten_parameters()
