"""Which channels must be removed together: coupling groups on Torch-Pruning's DependencyGraph.

Torch-Pruning traces the model with autograd and knows how residual adds, concatenations,
splits, depthwise convolutions, BatchNorm, flatten-then-Linear and attention tie channels of
different layers together. torchslim asks it for every group once, turns each into a plain
:class:`CouplingGroup` (names, sizes, why it is skipped) and keeps the graph only to slice the
model later. Building the graph never changes the model.

torchslim registers its own slicing function for LSTM and GRU layers
(:mod:`torchslim.analysis.recurrent`): every gate's rows and the recurrent columns together, in
every layer and direction.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from torchslim.analysis.recurrent import opaque_recurrent, recurrent_pruner
from torchslim.core.plan import match_layer
from torchslim.core.ties import Ties
from torchslim.errors import ConfigError, TorchslimError


@dataclass(frozen=True)
class Member:
    """One layer touched when a group loses channels: its out side (rows) or in side (columns)."""

    module: str
    kind: str
    side: str  # "out" | "in"

    def __str__(self) -> str:
        return f"{self.module}[{self.side}]"


@dataclass(frozen=True)
class Slice:
    """One coupled tensor slice of a group: ``module``'s channels ``idxs`` on ``side``.

    ``root_idxs[i]`` is the group channel that ``idxs[i]`` belongs to (concatenations offset
    them, flatten-then-Linear repeats them).
    """

    module: nn.Module = field(repr=False)
    name: str
    side: str
    idxs: tuple[int, ...] = field(repr=False)
    root_idxs: tuple[int, ...] = field(repr=False)
    index: int  # position in the Torch-Pruning group


@dataclass
class CouplingGroup:
    """Channels of several layers that stand or fall together, rooted at one layer's outputs."""

    root: str
    channels: int
    members: list[Member]
    skip: str | None = None
    multiple: int = 1  # the channel count must stay a multiple of this (attention heads)
    halves: int = 1  # channels in equal parts that lose as many each (a bidirectional layer's directions)
    slices: list[Slice] = field(default_factory=list, repr=False)
    handle: Any = field(default=None, repr=False, compare=False)  # the Torch-Pruning group

    def lowest(self, scores: torch.Tensor, count: int) -> list[int]:
        """The ``count`` channels with the lowest ``scores``, as many from each of the halves."""
        part = self.channels // self.halves
        per = scores.reshape(self.halves, part).argsort(1)[:, : count // self.halves]
        return sorted(int(i) for i in (per + torch.arange(self.halves)[:, None] * part).flatten())

    def __str__(self) -> str:
        state = f"skipped: {self.skip}" if self.skip else f"{self.channels} channels"
        return f"{self.root}: {state}; " + ", ".join(map(str, self.members))


@dataclass
class Coupling:
    """Every coupling group of a model, and the traced graph that slices it."""

    groups: list[CouplingGroup]
    graph: Any = field(repr=False)
    names: dict[nn.Module, str] = field(repr=False)

    def __str__(self) -> str:
        return "\n".join(str(g) for g in self.groups)

    def prunable(self) -> list[CouplingGroup]:
        return [g for g in self.groups if g.skip is None]


def analyse(
    model: nn.Module,
    example: torch.Tensor | tuple,
    exclude: Iterable[str] = (),
    min_channels: int = 1,
    probe: bool = True,
) -> Coupling:
    """Trace ``model`` on ``example`` and list its coupling groups; the model is not changed.

    Args:
        model: the model (its current shapes are analysed).
        example: one input batch (or a tuple of inputs) for tracing.
        exclude: module names or ``re:`` patterns whose channels must stay; every group that
            touches one of their out sides is recorded as skipped.
        min_channels: groups with no more channels than this are recorded as skipped.
        probe: remove two channels of each group on a copy, run it, and skip the groups that
            break it (channels that pass through a layer nothing can slice, a ``chunk`` or
            ``split`` whose sizes are fixed at run time).

    Example:
        >>> print(analyse(ts.models.resnet_mini(), torch.zeros(1, 1, 28, 28)))  # doctest: +SKIP
    """
    import torch_pruning as tp

    names = {m: n for n, m in model.named_modules()}
    unsupported = _unsupported(model)
    recurrent = recurrent_pruner()
    rnn_types = {type(m) for m in model.modules() if isinstance(m, (nn.LSTM, nn.GRU))} | {nn.LSTM, nn.GRU}
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), opaque_recurrent(model):
            graph = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=example if isinstance(example, tuple) else (example,),
                customized_pruners={t: recurrent for t in rnn_types},
                ignored_layers=[m for m, _ in unsupported],
                verbose=False,
            )
    except TorchslimError:
        raise
    except Exception as exc:  # tracing runs user code: any failure there is the model's
        raise ConfigError(
            f"cannot trace {type(model).__name__} for structured pruning ({type(exc).__name__}: {exc}); "
            "check that the example input fits the model's forward and that forward uses tensors only"
        ) from exc
    finally:
        model.train(was_training)
    outputs = _output_modules(graph)
    groups = []
    roots = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.LSTM, nn.GRU)
    for tg in graph.get_all_groups(root_module_types=roots):
        groups.append(_describe(tg, graph, names, outputs))
    exclude, tied = list(exclude), _tied_modules(model)
    for g in groups:
        g.skip = g.skip or _skip_reason(g, exclude, min_channels, unsupported, names) or _tie_reason(g, tied)
    if probe:
        _probe(model, example, groups, unsupported, graph)
    return Coupling(groups, graph, names)


def _shapes(out: Any) -> list:
    """The shapes of every tensor in a model output (a tensor, or nested tuples/lists/dicts)."""
    if isinstance(out, torch.Tensor):
        return [tuple(out.shape)]
    if isinstance(out, dict):
        return [s for k in sorted(out, key=str) for s in _shapes(out[k])]
    if isinstance(out, (tuple, list)):
        return [s for o in out for s in _shapes(o)]
    return []


def run(model: nn.Module, example: Any) -> Any:
    """``model(example)`` without gradients; a tuple example is spread over the arguments."""
    with torch.no_grad():
        return model(*example) if isinstance(example, tuple) else model(example)


def _probe(model: nn.Module, example: Any, groups: list[CouplingGroup], unsupported: list, graph: Any) -> None:
    """Skip the groups whose channels cannot really be removed, found by pruning a copy.

    A group is skipped when removing a few of its channels makes the copy fail to run (a
    layer nothing can slice, a split with fixed sizes), changes the model's output shapes (an
    output layer behind a functional op), or removes more channels than asked (channels tied
    to each other, e.g. the two halves of a chunk multiplied together).
    """
    odd = ", ".join(n for _, n in unsupported)
    was_training = model.training
    reference = _shapes(run(model.eval(), example))
    model.train(was_training)
    for g in groups:
        drop = g.multiple * math.ceil(2 / g.multiple)  # two channels, or the smallest multiple of the heads
        if g.skip is not None or g.channels <= drop:
            continue
        clone = copy.deepcopy(model).eval()
        twin = next(t for t in analyse(clone, example, probe=False).groups if t.root == g.root)
        root = dict(clone.named_modules())[g.root]
        try:
            twin.handle.prune(g.lowest(torch.arange(g.channels, dtype=torch.float), drop))
            shapes = _shapes(run(clone, example))
        except (RuntimeError, ValueError, IndexError, AssertionError) as exc:
            if odd:
                g.skip = f"removing its channels breaks the forward pass; they may pass through {odd}, which hold parameters torchslim cannot slice"
            else:
                g.skip = f"removing its channels breaks the forward pass (a split or reshape with fixed sizes?): {str(exc)[:120]}"
            continue
        if shapes != reference:
            g.skip = "removing its channels changes the model's output shape (it feeds the output)"
        elif graph.get_pruner_of_module(root).get_out_channels(root) != g.channels - drop:
            g.skip = "its channels are tied to each other (e.g. the halves of a chunk combined element-wise)"


def _describe(tg: Any, graph: Any, names: dict, outputs: set) -> CouplingGroup:
    members, slices, skip, multiple, halves = [], [], None, 1, 1
    for k, item in enumerate(tg):
        module, handler = item.dep.target.module, item.dep.handler
        if module not in names:
            continue  # a functional op (add, cat, relu) or a bare nn.Parameter: sliced with the group
        side = "out" if graph.is_out_channel_pruning_fn(handler) else "in"
        slices.append(Slice(module, names[module], side, tuple(item.idxs), tuple(item.root_idxs), k))
        member = Member(names[module], type(module).__name__, side)
        if member not in members:
            members.append(member)
        if side == "out" and module in outputs:
            skip = f"{member.module} produces the model's output; its width is the output size"
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and 1 < module.groups != module.out_channels:
            skip = f"{member.module} is a grouped convolution (groups={module.groups}); torchslim does not slice those"
        if isinstance(module, nn.MultiheadAttention):
            multiple = math.lcm(multiple, module.num_heads)
        if side == "out" and isinstance(module, nn.RNNBase) and module.proj_size:
            skip = (
                f"{member.module}: the hidden units of a projected {type(module).__name__} are not sliced (its "
                "input features are; its weights are still pruned, shared and quantized)"
            )
        if side == "out" and isinstance(module, nn.RNNBase) and module.bidirectional:
            halves, multiple = 2, math.lcm(multiple, 2)  # forward units, then backward ones
    root = tg[0].dep.target.module
    channels = graph.get_out_channels(root)
    return CouplingGroup(names.get(root, "?"), int(channels), members, skip, multiple, halves, slices, handle=tg)


def _output_modules(graph: Any) -> set:
    """Modules whose output nobody in the model consumes: their width is the model's output."""
    return {m for m, node in graph.module2node.items() if isinstance(m, nn.Module) and not node.outputs}


_SUPPORTED = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Linear,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.PReLU,
    nn.Embedding,
    nn.LSTM,
    nn.GRU,
    nn.MultiheadAttention,
)


def _unsupported(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Modules that hold their own parameters but that no slicing function knows."""
    out = []
    for name, m in model.named_modules():
        own = [p for _, p in m.named_parameters(recurse=False)]
        if own and not isinstance(m, _SUPPORTED):
            out.append((m, name))
    return out


def _tied_modules(model: nn.Module) -> dict[str, str]:
    """Module name -> a sentence naming the tie, for every module holding a tied parameter."""
    out = {}
    for names, _ in Ties(model).groups:
        for name in names:
            module = name.rpartition(".")[0]
            other = next(n for n in names if n != name)
            out.setdefault(module, f"{name} is tied to {other}")
    return out


def _tie_reason(g: CouplingGroup, tied: dict[str, str]) -> str | None:
    """Why a group touching a tied parameter keeps its channels: cutting one name of a tie
    would leave two tensors of different shapes where the model has one."""
    hit = next((tied[m.module] for m in g.members if m.module in tied), None)
    return None if hit is None else f"{hit}; removing its channels would break the tie"


def _skip_reason(g: CouplingGroup, exclude: list[str], min_channels: int, unsupported: list, names: dict) -> str | None:
    hit = [m.module for m in g.members if m.side == "out" and match_layer(exclude, m.module)]
    if hit:
        return f"excluded by the configuration ({hit[0]})"
    odd = [n for _, n in unsupported if any(m.module.startswith(n + ".") or m.module == n for m in g.members)]
    if odd:
        return f"{odd[0]} holds parameters of a layer type torchslim cannot slice"
    if g.channels <= min_channels:
        return f"already at the floor of {min_channels} channels"
    return None
