"""One-shot sparsity for transformers, without retraining: magnitude, Wanda and SparseGPT,
unstructured or N:M (2:4).

All three remove a fraction of each Linear layer's weights inside the model's repeated blocks;
they differ in which weights go and in what happens to the rest:

* **magnitude**: the smallest ``|W|`` of the whole layer go (unstructured), or the smallest of
  each group of M consecutive inputs (N:M). Needs no data.
* **Wanda** (Sun et al., ICLR 2024): a weight's importance is ``|W_ij| · ‖X_j‖``, its magnitude
  times the norm of its input over the calibration tokens, compared within each output row
  (unstructured) or each group of M inputs (N:M). Large-model activations have a few
  features far larger than the rest; the weights that read them matter more than their size
  says. The remaining weights are left as they are.
* **SparseGPT** (Frantar & Alistarh, ICML 2023): the layer's columns are taken in order, as in
  GPTQ; within each block of columns the weights with the smallest ``w² / [H⁻¹]_jj²`` (the
  output error their removal costs) go, and each pruned column's error is spread over the
  columns not yet visited through the Cholesky factor of ``H⁻¹`` (``H = Σ x xᵀ``), so the
  remaining weights compensate. For N:M the choice is made per group of M columns when the
  group is reached, from the already-updated weights.

Calibration runs block by block (:mod:`~torchslim.transforms.layerwise`), so each block sees
the outputs of its already-sparse predecessors. The layers keep their type and dense storage
in memory; the zeros are stored as coded positions in the `.tslim` (format section 3).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from torchslim.core.data import Data
from torchslim.core.linears import in_features, replace_weight_, weight_matrix
from torchslim.errors import ConfigError
from torchslim.train.fit import Progress
from torchslim.transforms.gptq import cholesky_inverse_factor, damping_note, relative_output_error
from torchslim.transforms.layerwise import calibration_inputs, chosen_layers, each_layer

METHODS = ("magnitude", "wanda", "sparsegpt")
_PATTERN = re.compile(r"^([1-9][0-9]*):([1-9][0-9]*)$")


@dataclass(frozen=True)
class SparsifyConfig:
    """How to sparsify.

    Attributes:
        method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
        sparsity: the fraction of each layer's weights set to zero (unstructured only).
        pattern: ``None`` for unstructured, or ``"N:M"`` (e.g. ``"2:4"``): N of every M
            consecutive inputs of each output row are zero (sparsity N/M); every layer's input
            features must be a multiple of M.
        calib_batches: calibration batches (Wanda, SparseGPT; magnitude uses them only to
            report each layer's output error).
        damp: SparseGPT's damping of ``H``'s diagonal, as a fraction of its mean.
        block: SparseGPT's columns per lazy update (rounded to whole groups of M).
        layers: names or ``re:`` patterns of the Linear layers to sparsify, relative to the
            model; ``None``: every Linear inside the repeated blocks.
    """

    method: str = "sparsegpt"
    sparsity: float = 0.5
    pattern: str | None = None
    calib_batches: int = 16
    damp: float = 0.01
    block: int = 128
    layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r}: use one of {', '.join(METHODS)}")
        if self.pattern is not None:
            m = _PATTERN.match(str(self.pattern))
            if m is None or int(m.group(1)) >= int(m.group(2)):
                raise ConfigError(f"pattern={self.pattern!r}: use 'N:M' with N < M, e.g. '2:4', or None")
            object.__setattr__(self, "sparsity", int(m.group(1)) / int(m.group(2)))
        elif (
            isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 < self.sparsity < 1
        ):
            raise ConfigError(f"sparsity={self.sparsity!r}: use a fraction between 0 and 1, e.g. 0.5")
        for key in ("calib_batches", "block"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{key}={v!r}: use a whole number >= 1")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp <= 1:
            raise ConfigError(f"damp={self.damp!r}: use a fraction in (0, 1] of H's mean diagonal, e.g. 0.01")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` of an N:M pattern, else None."""
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)

    def describe(self) -> str:
        return f"{self.method} {self.pattern or f'{self.sparsity:.0%} unstructured'}"


@dataclass
class SparsifyLayer:
    """What one layer lost: its share of zero weights and its relative output error
    ``‖(W - Ŵ) X‖² / ‖W X‖²`` over the calibration tokens (None without data)."""

    name: str
    sparsity: float
    output_error: float | None
    tokens: int
    note: str | None = None


@dataclass
class SparsifyResult:
    layers: list[SparsifyLayer]
    config: SparsifyConfig

    def to_dict(self) -> dict:
        return {"config": asdict(self.config), "layers": [asdict(r) for r in self.layers]}

    def summary(self) -> str:
        zeros = sum(r.sparsity for r in self.layers) / max(len(self.layers), 1)
        errors = [r.output_error for r in self.layers if r.output_error is not None]
        error = f"; mean relative output error {sum(errors) / len(errors):.3g}" if errors else ""
        return f"{len(self.layers)} Linear layers made sparse by {self.config.describe()}: {zeros:.1%} zeros{error}"


# ---------------------------------------------------------------- masks


def _lowest(score: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """A boolean mask of the ``k`` lowest scores along ``dim`` (True: pruned)."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k > 0:
        mask.scatter_(dim, torch.topk(score, k, dim=dim, largest=False).indices, True)
    return mask


def _nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune the ``n`` lowest of each ``m`` consecutive columns of every row."""
    rows, cols = score.shape
    return _lowest(score.reshape(rows, cols // m, m), n, 2).reshape(rows, cols)


def prune_mask(score: torch.Tensor, config: SparsifyConfig, per_row: bool) -> torch.Tensor:
    """The mask (True: pruned) of the lowest scores: N:M groups, else the given fraction of
    each row (``per_row``) or of the whole matrix."""
    if config.nm is not None:
        return _nm_mask(score, *config.nm)
    if per_row:
        return _lowest(score, round(config.sparsity * score.shape[1]), 1)
    flat = _lowest(score.reshape(1, -1), round(config.sparsity * score.numel()), 1)
    return flat.reshape(score.shape)


@torch.no_grad()
def sparsegpt_weight(weight: torch.Tensor, hessian: torch.Tensor, config: SparsifyConfig) -> tuple[torch.Tensor, float]:
    """SparseGPT's sparse ``(out, in)`` weight for ``weight`` given its inputs' ``hessian``, and the damping used."""
    w = weight.detach().double().clone()
    cols = w.shape[1]
    dead = torch.diag(hessian) == 0
    w[:, dead] = 0.0

    def fresh() -> torch.Tensor:
        h = hessian.to(torch.float64, copy=True)
        h.diagonal()[dead] = 1.0
        return h

    upper, used = cholesky_inverse_factor(fresh, config.damp)
    group = config.nm[1] if config.nm else 1
    step = max(group, config.block // group * group)
    for b0 in range(0, cols, step):
        b1 = min(b0 + step, cols)
        w1 = w[:, b0:b1].clone()
        u = upper[b0:b1, b0:b1]
        d = torch.diag(u)
        errors = torch.zeros_like(w1)
        if config.nm:  # each group's mask chosen when the group is reached
            mask = torch.zeros_like(w1, dtype=torch.bool)
        else:
            mask = prune_mask(w1.pow(2) / d.pow(2), config, per_row=False)
        for j in range(b1 - b0):
            if config.nm and j % group == 0:
                part = w1[:, j : j + group].pow(2) / d[j : j + group].pow(2)
                mask[:, j : j + group] = _nm_mask(part, *config.nm)
            col = w1[:, j]
            kept = torch.where(mask[:, j], torch.zeros_like(col), col)
            err = (col - kept) / d[j]
            w1[:, j + 1 :] -= err.unsqueeze(1) * u[j, j + 1 :].unsqueeze(0)
            w1[:, j] = kept
            errors[:, j] = err
        w[:, b0:b1] = w1
        w[:, b1:] -= errors @ upper[b0:b1, b1:]
    return w.to(weight.dtype), used


def sparse_weight(
    weight: torch.Tensor, stats: dict | None, config: SparsifyConfig
) -> tuple[torch.Tensor, float | None]:
    """The layer's sparse ``(out, in)`` weight by ``config.method`` (and SparseGPT's damping)."""
    w = weight.detach().float()
    if config.method == "magnitude":
        return w.masked_fill(prune_mask(w.abs(), config, per_row=False), 0.0), None
    if config.method == "wanda":
        norm = stats["sq_norm"].float().sqrt()
        return w.masked_fill(prune_mask(w.abs() * norm.unsqueeze(0), config, per_row=True), 0.0), None
    return sparsegpt_weight(w, stats["hessian"], config)


# ---------------------------------------------------------------- the model


def sparsify_(
    model: nn.Module,
    config: SparsifyConfig = SparsifyConfig(),
    data: Data | list | None = None,
    *,
    progress: Progress | None = None,
) -> SparsifyResult:
    """Make the Linear layers of ``model``'s repeated blocks (a transformer's layers) sparse,
    one shot, in place (see the module docstring for the methods).

    Args:
        model: a transformer (e.g. a Hugging Face causal language model).
        config: method, sparsity or N:M pattern, calibration.
        data: a :class:`~torchslim.core.data.Data` (its calibration split) or a list of batches
            (token-id tensors or dicts with ``input_ids``); required by Wanda and SparseGPT.
        progress: called as ``progress(blocks done, blocks)``.

    Example:
        >>> result = ts.sparsify_(llm, ts.SparsifyConfig("wanda", pattern="2:4"), data=calib)  # doctest: +SKIP
    """
    if data is None and config.method != "magnitude":
        raise ConfigError(f"{config.method} weighs each weight by its inputs: pass data=<calibration batches>")
    records: list[SparsifyLayer] = []

    def change(block: nn.Module, prefix: str, name: str, layer: nn.Module, s: dict | None) -> None:
        w = weight_matrix(layer).float().cpu()
        sparse, used = sparse_weight(w, s, config)
        note = (
            None
            if used is None
            else damping_note(s["tokens"], in_features(layer), used, config.damp, f"{prefix}.{name}")
        )
        error = relative_output_error(w, sparse, s["hessian"]) if s is not None else None
        replace_weight_(layer, sparse)
        zeros = float((sparse == 0).float().mean())
        records.append(SparsifyLayer(f"{prefix}.{name}", zeros, error, s["tokens"] if s else 0, note))

    batches = None if data is None else calibration_inputs(data, config.calib_batches)
    each_layer(  # a failure leaves the model as it was
        model, batches, _chooser(config), change, progress
    )
    if not records:
        raise ConfigError("no Linear layer matched config.layers inside the model's repeated blocks")
    return SparsifyResult(records, config)


def _chooser(config: SparsifyConfig):
    def choose(block: nn.Module, prefix: str) -> dict[str, nn.Module]:
        layers = chosen_layers(block, prefix, config.layers)
        if config.nm is not None:
            group = config.nm[1]
            for n, m in layers.items():
                if in_features(m) % group:
                    raise ConfigError(
                        f"{config.pattern} sparsity groups {group} consecutive inputs but {prefix}.{n} has "
                        f"{in_features(m)} input features, not a multiple of {group}: leave it out with "
                        "config.layers, or use unstructured sparsity"
                    )
        return layers

    return choose
