"""Channel importance: one plain callable per criterion, scoring every channel of a coupling group.

A criterion sees a :class:`~torchslim.analysis.coupling.CouplingGroup` and the statistics
gathered beforehand (:class:`Stats`) and returns one score per channel (higher = keep), or
``None`` when it cannot score that group (the caller records the skip and why).

Scores of one group add up evidence from every coupled layer: each member's per-channel
numbers are divided by their mean (so a wide layer does not drown a narrow one) and
averaged per channel. Torch-Pruning's ``root_idxs`` map a member's channels (e.g. a slice of a
concatenation, or the ``H * W`` columns of a Linear after flatten) back to the group's.

Criteria: ``l1``/``l2`` weight magnitude (Li et al. 2017); ``taylor``, the squared first-order
change of the loss when a channel goes, sum(w * dL/dw) per channel and batch (Molchanov et al.
2019); ``bn_scale``, |gamma| of the group's BatchNorms (network slimming, Liu et al. 2017);
``activation``, the mean ReLU output, and ``apoz``, one minus the average percentage of zeros
(Hu et al. 2016), both from a calibration pass; ``random`` as the control.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from torchslim.analysis.coupling import Coupling, CouplingGroup
from torchslim.analysis.recurrent import gates, suffixes

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class Stats:
    """Numbers gathered from data before scoring (empty for data-free criteria)."""

    taylor: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # (root, item) -> (channels,)
    activation: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> mean ReLU output per channel
    apoz: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> fraction of ReLU zeros per channel
    seed: int = 0


Criterion = Callable[[CouplingGroup, Stats], "torch.Tensor | None"]


def _rows(
    module: nn.Module, side: str, idxs: tuple[int, ...], weights: Callable[[nn.Module], dict]
) -> torch.Tensor | None:
    """One row per channel of ``module``'s weights on ``side``: (len(idxs), fan)."""
    w = weights(module)
    ix = torch.as_tensor(idxs, dtype=torch.long)
    if isinstance(module, (nn.Linear, *_CONV)):
        if side == "out":
            return w["weight"][ix].flatten(1)  # (K, fan_in * kernel)
        if isinstance(module, _CONV) and module.groups > 1:
            return None
        return w["weight"][:, ix].transpose(0, 1).flatten(1)  # (K, fan_out * kernel)
    if isinstance(module, (nn.LSTM, nn.GRU)):
        if side == "in":
            first = [w[f"weight_ih_l0{sfx}"] for sfx in suffixes(module)]  # each direction reads the input
            return torch.cat([m[:, ix].transpose(0, 1) for m in first], 1)  # (K, D * G * H)
        h, last = module.hidden_size, module.num_layers - 1  # the group's units: the last layer's
        parts = []
        for d, sfx in enumerate(suffixes(module)):  # output feature i:
            j = ix[ix // h == d] % h  # unit i % H of direction i // H
            ih, hh = w[f"weight_ih_l{last}{sfx}"], w[f"weight_hh_l{last}{sfx}"]
            rows = [m[j + g * h] for m in (ih, hh) for g in range(gates(module))]
            parts.append(torch.cat([*rows, hh[:, j].transpose(0, 1)], 1))  # (K_d, G * (I + 2H))
        out = torch.cat(parts)
        return out[torch.argsort(torch.argsort(ix // h, stable=True))]  # back in the order of idxs
    return None


def _params(module: nn.Module) -> dict:
    return {n: p.detach() for n, p in module.named_parameters(recurse=False)}


def _grads(module: nn.Module) -> dict:
    return {
        n: (p.detach() * p.grad) if p.grad is not None else torch.zeros_like(p)
        for n, p in module.named_parameters(recurse=False)
    }


def _combine(group: CouplingGroup, parts: Iterable[tuple[torch.Tensor, tuple[int, ...]]]) -> torch.Tensor | None:
    """Normalise each member's per-channel scores by their mean and average them per group channel."""
    total, count = torch.zeros(group.channels), torch.zeros(group.channels)
    for score, root_idxs in parts:
        score = score.detach().float().cpu()
        mean = score.mean()
        score = score / mean if mean > 0 else torch.ones_like(score)
        ix = torch.as_tensor(root_idxs, dtype=torch.long)
        total.index_add_(0, ix, score)
        count.index_add_(0, ix, torch.ones_like(score))
    if not (count > 0).any():
        return None
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros(()))


def magnitude(p: int) -> Criterion:
    """The ``p``-norm of every weight row (out side) and column (in side) of a channel."""

    def score(group: CouplingGroup, stats: Stats) -> torch.Tensor | None:
        parts = []
        for sl in group.slices:
            rows = _rows(sl.module, sl.side, sl.idxs, _params)
            if rows is not None:
                parts.append((rows.abs().pow(p).mean(1).pow(1 / p), sl.root_idxs))
        return _combine(group, parts)

    score.__name__ = f"l{p}"
    return score


def taylor(group: CouplingGroup, stats: Stats) -> torch.Tensor | None:
    """Squared first-order loss change per channel, gathered by :func:`gather_stats`."""
    parts = [
        (stats.taylor[(group.root, sl.index)], sl.root_idxs)
        for sl in group.slices
        if (group.root, sl.index) in stats.taylor
    ]
    return _combine(group, parts)


def bn_scale(group: CouplingGroup, stats: Stats) -> torch.Tensor | None:
    """|gamma| of every BatchNorm in the group; ``None`` for a group without one."""
    parts = [
        (sl.module.weight.detach()[torch.as_tensor(sl.idxs)].abs(), sl.root_idxs)
        for sl in group.slices
        if isinstance(sl.module, _BN) and sl.module.affine
    ]
    return _combine(group, parts)


def _activation_parts(group: CouplingGroup, table: dict[str, torch.Tensor]) -> list:
    outs = [sl for sl in group.slices if sl.side == "out" and sl.name in table]
    bns = [sl for sl in outs if isinstance(sl.module, _BN)]
    return [(table[sl.name][torch.as_tensor(sl.idxs)], sl.root_idxs) for sl in bns or outs]


def activation(group: CouplingGroup, stats: Stats) -> torch.Tensor | None:
    """Mean ReLU output per channel (BatchNorm outputs when the group has them)."""
    return _combine(group, _activation_parts(group, stats.activation))


def apoz(group: CouplingGroup, stats: Stats) -> torch.Tensor | None:
    """One minus the average percentage of zeros after ReLU, per channel."""
    parts = [(1.0 - s, r) for s, r in _activation_parts(group, stats.apoz)]
    return _combine(group, parts)


def random(group: CouplingGroup, stats: Stats) -> torch.Tensor | None:
    """Uniform random scores (seeded by the stats seed and the group's root name)."""
    gen = torch.Generator().manual_seed(stats.seed * 1_000_003 + sum(map(ord, group.root)))
    return torch.rand(group.channels, generator=gen)


CRITERIA: dict[str, Criterion] = {
    "l1": magnitude(1),
    "l2": magnitude(2),
    "taylor": taylor,
    "bn_scale": bn_scale,
    "activation": activation,
    "apoz": apoz,
    "random": random,
}
NEEDS_DATA = {"taylor", "activation", "apoz"}


def gather_stats(
    model: nn.Module,
    coupling: Coupling,
    criterion: str,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    seed: int = 0,
) -> Stats:
    """Run ``batches`` through ``model`` to collect what ``criterion`` needs (nothing for data-free ones)."""
    stats = Stats(seed=seed)
    if criterion == "taylor":
        _gather_taylor(model, coupling, batches, stats)
    elif criterion in ("activation", "apoz"):
        _gather_activations(model, batches, stats)
    return stats


def _gather_taylor(model: nn.Module, coupling: Coupling, batches: list, stats: Stats) -> None:
    was_training = model.training
    saved = {p: p.grad for p in model.parameters()}  # the caller's gradients are put back afterwards
    model.eval()
    try:
        for x, y in batches:
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                F.cross_entropy(model(x), y).backward()
            for g in coupling.prunable():
                for sl in g.slices:
                    rows = _rows(sl.module, sl.side, sl.idxs, _grads)
                    if rows is not None:
                        key = (g.root, sl.index)
                        stats.taylor[key] = stats.taylor.get(key, 0) + rows.sum(1).pow(2)
    finally:
        for p, g in saved.items():
            p.grad = g
        model.train(was_training)


def _gather_activations(model: nn.Module, batches: list, stats: Stats) -> None:
    sums: dict[str, list] = {}

    def hook(name: str, module: nn.Module):
        def record(_m, _inp, out):
            out = out[0] if isinstance(out, tuple) else out
            dim = out.dim() - 1 if isinstance(module, (nn.Linear, nn.RNNBase)) else 1
            act = torch.relu(out.detach()).movedim(dim, 0).flatten(1)  # (C, everything else)
            s = sums.setdefault(name, [0.0, 0.0, 0])
            s[0], s[1], s[2] = s[0] + act.sum(1), s[1] + (act == 0).sum(1).float(), s[2] + act.shape[1]

        return record

    handles = [
        m.register_forward_hook(hook(n, m))
        for n, m in model.named_modules()
        if isinstance(m, (*_CONV, *_BN, nn.Linear, nn.RNNBase))
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, _ in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    for name, (total, zeros, n) in sums.items():
        stats.activation[name], stats.apoz[name] = total / n, zeros / n
