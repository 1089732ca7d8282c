"""Linear layers as the one-shot algorithms see them: ``nn.Linear`` and GPT-2's ``Conv1D``.

Hugging Face's GPT-2 (and GPT, and a few models derived from them) computes its projections
with ``transformers.pytorch_utils.Conv1D``: a Linear layer whose weight is stored transposed,
``(in, out)``. The algorithms that change a layer from its inputs (GPTQ, AWQ, Wanda,
SparseGPT, low-rank factors) work on the ``(out, in)`` matrix; these helpers give it to them
and write it back in the layer's own orientation, so a GPT-2 keeps its module types.
"""

from __future__ import annotations

import torch
from torch import nn


def is_conv1d(m: nn.Module) -> bool:
    """``m`` is a GPT-2 style ``Conv1D`` (``y = x W + b`` with ``W`` of shape ``(nx, nf)``),
    recognised by its class name and attributes (transformers need not be imported)."""
    weight = getattr(m, "weight", None)
    return (
        type(m).__name__ == "Conv1D"
        and isinstance(getattr(m, "nf", None), int)
        and isinstance(getattr(m, "nx", None), int)
        and isinstance(weight, torch.Tensor)
        and tuple(weight.shape) == (m.nx, m.nf)
    )


def is_linear(m: nn.Module) -> bool:
    """``m`` is an ``nn.Linear`` or a GPT-2 ``Conv1D``."""
    return isinstance(m, nn.Linear) or is_conv1d(m)


def in_features(m: nn.Module) -> int:
    return m.nx if is_conv1d(m) else m.in_features


def weight_matrix(m: nn.Module) -> torch.Tensor:
    """The layer's weight as ``(out, in)`` (a view: a ``Conv1D``'s is transposed)."""
    w = m.weight.detach()
    return w.T if is_conv1d(m) else w


@torch.no_grad()
def replace_weight_(m: nn.Module, w: torch.Tensor) -> None:
    """Give the layer a new ``weight`` Parameter holding the ``(out, in)`` matrix ``w``, in the
    layer's own orientation, dtype and device (the old Parameter is left untouched)."""
    old = m.weight
    new = (w.T if is_conv1d(m) else w).to(device=old.device, dtype=old.dtype).contiguous()
    m.weight = nn.Parameter(new, requires_grad=old.requires_grad)
