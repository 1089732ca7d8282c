"""Weight sharing by per-layer k-means, then trained quantisation (Deep Compression, sec. 3).

Each layer's non-zero weights are clustered into ``2**bits`` centroids (linear initialisation
between the smallest and largest weight, as the paper found best), and every weight is
replaced by its centroid. Fine-tuning then trains the centroids themselves: the layer's
``weight`` becomes a parametrization ``codebook[index]``, so autograd sums the gradients of
all weights sharing a centroid into that centroid, and pruned weights (index pointing at a
constant zero) stay zero. At the end the parametrization is removed, leaving a plain weight
with at most ``2**bits`` distinct non-zero values; ``torchslim.save`` finds the codebook
from those values, so the model carries no side state.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from torchslim.analysis.cost import sparse_layers, weight_names
from torchslim.core.data import Data
from torchslim.core.device import Device, place
from torchslim.core.plan import CompressionPlan, LayerDecision, layer_targets
from torchslim.core.ties import Ties, holders
from torchslim.errors import ConfigError
from torchslim.train.fit import Progress, TrainConfig, fit
from torchslim.transforms.guard import rollback
from torchslim.transforms.prune import frozen_zeros

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShareConfig:
    """Codebook sizes and centroid fine-tuning.

    Attributes:
        bits: bits per index for every weight layer, or a map from module name or ``re:``
            pattern to bits (1..8). Layers no key names keep their weights, reason recorded.
            A map may also name ``nn.Embedding`` tables (a text encoder's word embeddings).
        finetune: trained quantisation of the centroids; ``None`` or no data skips it.
        kmeans_iters: Lloyd iterations of the k-means.
        half_biases: after training, round the biases of the shared layers to values that
            float16 represents exactly (skipping a bias with values beyond float16's range), so
            a file can store them in 2 bytes each instead of 4 (for a bias big enough that its
            coded entry pays for itself, about 60 values or more).

    Example:
        >>> cfg = ShareConfig(bits={"re:conv.*": 8, "re:fc.*": 5})
    """

    bits: int | Mapping[str, int | None] = 5
    finetune: TrainConfig | None = field(default_factory=lambda: TrainConfig(epochs=2, lr=1e-4))
    kmeans_iters: int = 100
    half_biases: bool = False

    def __post_init__(self) -> None:
        values = self.bits.items() if isinstance(self.bits, Mapping) else [("bits", self.bits)]
        for _key, value in values:
            LayerDecision(bits=value)  # validates the range with a clear message (None: skip)
        if self.kmeans_iters < 1:
            raise ConfigError(f"kmeans_iters={self.kmeans_iters}: use at least 1")

    @classmethod
    def from_plan(cls, plan: CompressionPlan, **kwargs: object) -> ShareConfig:
        """The per-layer bits of ``plan``; other fields from ``kwargs``."""
        bits = plan.field_map("bits")
        if not any(v is not None for v in bits.values()):
            raise ConfigError("the plan sets no bits for any layer")
        return cls(bits=bits, **kwargs)  # type: ignore[arg-type]

    def targets(self, model: nn.Module) -> tuple[dict[str, int], dict[str, str]]:
        """Bits per layer, and why each other weight layer is skipped."""
        names = [name for name, _ in shared_layers(model, self.bits)]
        targets, skipped = layer_targets(names, self.bits, "bits")
        return {n: int(v) for n, v in targets.items()}, skipped


def shared_layers(model: nn.Module, bits: int | Mapping[str, int | None]) -> list[tuple[str, nn.Module]]:
    """The layers sharing may treat: every weight layer, and embedding tables when ``bits`` is a
    map (an embedding is shared only when named: a word-embedding table is most of a text
    encoder's file, but sharing it is a choice, not a default)."""
    layers = sparse_layers(model)
    if isinstance(bits, Mapping):
        layers += [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    return layers


@dataclass(frozen=True)
class ShareResult:
    """What ``share_`` did: bits per layer, and the fine-tuning losses."""

    plan: CompressionPlan
    losses: list[float]


HALF_MAX = 65504.0
"""Largest finite float16; a bias beyond it keeps its float32 values."""


class SharedWeight(nn.Module):
    """Parametrization ``weight = [codebook, 0][index]``; index == len(codebook) means pruned."""

    def __init__(self, index: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("index", index)

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        table = torch.cat([codebook, codebook.new_zeros(1)])  # (k + 1,)
        return table.index_select(0, self.index.flatten()).view(self.index.shape)  # the weight's shape


def kmeans_codebook(weight: torch.Tensor, bits: int, iters: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the non-zero entries of ``weight``: returns ``(codebook, index)``.

    ``index`` has ``weight``'s shape; zeros get ``index == len(codebook)``. The codebook is
    sorted and has at most ``2**bits`` entries (fewer when there are fewer distinct values).
    """
    from sklearn.cluster import KMeans

    flat = weight.detach().flatten().double().numpy()
    nonzero = flat != 0
    values = flat[nonzero]
    distinct = np.unique(values)
    k = min(2**bits, distinct.size)
    index = np.full(flat.shape, k, dtype=np.int64)
    if k == 0:
        return torch.zeros(0), torch.from_numpy(index).view_as(weight)
    if k == distinct.size:  # already shared: keep every value exactly
        index[nonzero] = np.searchsorted(distinct, values)
        return torch.from_numpy(distinct).float(), torch.from_numpy(index).view_as(weight)
    init = np.linspace(values.min(), values.max(), k).reshape(-1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # empty-cluster relocation notes are expected
        km = KMeans(k, init=init, n_init=1, max_iter=iters, tol=0.0).fit(values.reshape(-1, 1))
    codebook = np.sort(km.cluster_centers_.ravel()).astype(np.float32)
    edges = (codebook[1:].astype(np.float64) + codebook[:-1]) / 2  # nearest centroid, in float64
    index[nonzero] = np.searchsorted(edges, values, side="left")
    return torch.from_numpy(codebook), torch.from_numpy(index).view_as(weight)


def _untied(layers: dict[str, nn.Module], targets: dict[str, int]) -> dict[str, nn.Module]:
    """The targeted layers, each tied weight once (under the first layer holding it; the
    others share its codebook through the tie)."""
    out, seen = {}, set()
    for name, m in layers.items():
        key = id(getattr(m, "weight", m))  # a recurrent layer's weights are its own
        if name in targets and key not in seen:
            out[name] = m
            seen.add(key)
    return out


def share_(
    model: nn.Module,
    config: ShareConfig,
    data: Data | None = None,
    *,
    teacher: nn.Module | None = None,
    progress: Progress | None = None,
    device: Device = None,
) -> ShareResult:
    """Replace each targeted layer's weights by a k-means codebook, then train the centroids.

    With a ``teacher``, centroid training also matches its softened outputs. ``device``
    (``"auto"``, ``"cpu"``, ``"cuda:N"``) moves the model and teacher there first.

    Example:
        >>> result = share_(model, ShareConfig(bits=5), data=data)  # doctest: +SKIP
    """
    place(model, device)
    if teacher is not None:
        place(teacher, device)
    if isinstance(data, Data):
        data.check(model)
    targets, skipped = config.targets(model)
    ties = Ties(model)
    layers = _untied(dict(shared_layers(model, config.bits)), targets)
    others = [m for n, m in sparse_layers(model) if n not in targets]
    losses: list[float] = []
    with rollback(model):  # a failure leaves the model as it was
        held: list[tuple[nn.Module, str, bool]] = []  # (module, weight, first of its tie) per codebook
        try:
            for name, m in layers.items():
                for attr in weight_names(m):  # one codebook per weight tensor (a recurrent layer has several)
                    codebook, index = kmeans_codebook(getattr(m, attr), targets[name], config.kmeans_iters)
                    shared, original = SharedWeight(index), nn.Parameter(codebook)
                    tied = holders(model, name, m, ties) if attr == "weight" else [m]
                    for i, module in enumerate(tied):  # a tie: one codebook for all
                        parametrize.register_parametrization(module, attr, shared, unsafe=True)
                        getattr(module.parametrizations, attr).original = original
                        held.append((module, attr, i == 0))
            if data is not None and config.finetune is not None:
                with frozen_zeros(others):
                    losses = fit(model, data, config.finetune, progress, teacher)
        finally:  # on an error too: no layer is left parametrized
            for m, attr, first in held:  # the first turns the codebook parameter into the weight; the rest take it
                if parametrize.is_parametrized(m, attr):
                    parametrize.remove_parametrizations(m, attr, leave_parametrized=first)
                    getattr(m, attr).grad = None  # the codebook's gradient would otherwise stay on the new weight
            ties.restore()
    if config.half_biases:
        with torch.no_grad():
            for m in layers.values():
                bias = getattr(m, "bias", None)  # a recurrent layer's `bias` is a flag, its biases bias_*
                if isinstance(bias, torch.Tensor) and bool(bias.abs().max() <= HALF_MAX):
                    m.bias.copy_(m.bias.half().float())
    plan = CompressionPlan()
    for name, bits in targets.items():
        plan = plan.merged(name, bits=bits)
    for name, why in skipped.items():
        plan = plan.merged(name, skip=why)
    return ShareResult(plan, losses)
