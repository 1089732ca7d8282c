"""Tied tensors: one parameter (or buffer) reachable under several names, as a language model's
input embedding and output projection are.

A tie is a fact of the model, found here once: :func:`tied_names` maps each alias to the name
it is tied to (its canonical name, the first in ``state_dict`` order). A verb that replaces a
parameter (weight sharing swaps in a new one) keeps the tie with :class:`Ties`, which records
the groups before and points every name of a group at the group's new tensor after. A file
stores a tied tensor once and lists its aliases; loading ties them again.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def _key(t: torch.Tensor) -> tuple:
    """What makes two state entries one tensor: the same memory, viewed the same way."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)


def tied_names(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """``alias -> canonical`` for the entries of ``state`` that are the same tensor (same
    memory, offset, shape, strides and dtype); the canonical name is the first in order.
    Entries that merely overlap (one a slice of another) are not ties."""
    first: dict[tuple, str] = {}
    aliases = {}
    for name, t in state.items():
        if t.numel() == 0:
            continue
        canonical = first.setdefault(_key(t), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding the parameter or buffer ``name`` and its attribute name."""
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def tie_(model: nn.Module, ties: Mapping[str, str]) -> None:
    """Point each alias at its canonical tensor (parameter or buffer), so they are one again."""
    for alias, canonical in ties.items():
        src_module, src_attr = owner(model, canonical)
        dst_module, dst_attr = owner(model, alias)
        if src_attr in src_module._parameters:
            dst_module._buffers.pop(dst_attr, None)
            setattr(dst_module, dst_attr, src_module._parameters[src_attr])
        else:
            dst_module._parameters.pop(dst_attr, None)
            dst_module._buffers[dst_attr] = src_module._buffers[src_attr]


class Ties:
    """The model's tied parameters, recorded before a verb replaces some of them.

    :meth:`restore` afterwards gives each group the one new parameter a member received (the
    others still hold the old one) and points every member at it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        found: dict[int, tuple[list[str], nn.Parameter]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            found.setdefault(id(p), ([], p))[0].append(name)
        self.groups = [(names, p) for names, p in found.values() if len(names) > 1]

    def members(self, name: str) -> list[str]:
        """The other names tied to parameter ``name`` (empty when it is not tied)."""
        for names, _ in self.groups:
            if name in names:
                return [n for n in names if n != name]
        return []

    def restore(self) -> None:
        """Re-tie every group to the parameter that replaced its old one (if a member's was)."""
        for names, old in self.groups:
            held = [owner(self.model, n) for n in names]
            now = [m._parameters.get(a) if a in m._parameters else None for m, a in held]
            new = next((p for p in now if isinstance(p, nn.Parameter) and p is not old), None)
            if new is None:
                continue
            for (module, attr), p in zip(held, now):
                if p is not None and p is not new:
                    setattr(module, attr, new)


def holders(model: nn.Module, name: str, layer: nn.Module, ties: Ties) -> list[nn.Module]:
    """``layer`` (named ``name``) and every other module whose ``weight`` is tied to its weight."""
    out = [layer]
    for other in ties.members(f"{name}.weight"):
        module, attr = owner(model, other)
        if attr == "weight" and module is not layer:
            out.append(module)
    return out
