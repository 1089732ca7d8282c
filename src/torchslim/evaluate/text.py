"""Sentence-embedding quality: fidelity to the original model and a retrieval task.

Fidelity compares a compressed encoder's embeddings of an index of texts with the original's:
the mean cosine of each text's two embeddings, and how many of each text's ``k`` nearest
neighbours in the index (by the original's embeddings) the compressed model still ranks among
its own ``k`` nearest. The task is retrieval: query ``i`` (a package's one-line synopsis)
should find document ``i`` (its long description) among all the documents; recall@1 is the
share found first, MRR@10 the mean reciprocal rank, counted 0 beyond rank 10.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.core.task import Embedding, call_model
from torchslim.errors import DataError


@torch.no_grad()
def encode(model: nn.Module | Callable[[Any], Any], batches: Iterable[Any]) -> torch.Tensor:
    """Unit-length (N, D) embeddings of every row of ``batches`` (dicts of ``input_ids`` and
    ``attention_mask``), in order: token states are mean-pooled over the attention mask.
    ``model`` is a module (run in eval mode) or any callable taking one batch (a compiled runner)."""
    if isinstance(model, nn.Module):
        model.eval()
    task, out = Embedding(), []
    for batch in batches:
        raw = call_model(model, batch) if isinstance(model, nn.Module) else model(batch)
        out.append(F.normalize(task.embed(raw, batch).float(), dim=-1).cpu())
    if not out:
        raise DataError("no batches to encode: give at least one batch of tokenized text")
    return torch.cat(out)


def _pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.dim() != 2 or a.shape != b.shape:
        raise DataError(f"embeddings to compare must be two (N, D) tensors of one shape, got {a.shape} and {b.shape}")
    return F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The mean cosine similarity of row ``i`` of ``a`` with row ``i`` of ``b``."""
    a, b = _pair(a, b)
    return float((a * b).sum(-1).mean())


def _neighbours(e: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    rows = []
    for start in range(0, len(e), chunk):
        sim = e[start : start + chunk] @ e.T
        sim[torch.arange(sim.shape[0]), torch.arange(start, start + sim.shape[0])] = -2.0  # not itself
        rows.append(sim.topk(k, dim=-1).indices)
    return torch.cat(rows)


def neighbour_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """The mean share of each row's ``k`` nearest other rows (cosine) that ``a`` and ``b`` agree on."""
    a, b = _pair(a, b)
    if not 1 <= k < len(a):
        raise DataError(f"k={k}: the index has {len(a)} texts; use 1 <= k < {len(a)}")
    na, nb = _neighbours(a, k), _neighbours(b, k)
    shared = (na.unsqueeze(-1) == nb.unsqueeze(-2)).any(-1).sum(-1)
    return float(shared.float().mean() / k)


def retrieval(queries: torch.Tensor, documents: torch.Tensor, k: int = 10) -> dict[str, float]:
    """``recall@1`` and ``mrr@k`` of query ``i`` finding document ``i`` among all documents (cosine)."""
    q, d = _pair(queries, documents)
    sim = q @ d.T
    own = sim.diagonal().unsqueeze(1)
    rank = (sim > own).sum(-1) + 1  # ties count in the query's favour
    reciprocal = torch.where(rank <= k, 1.0 / rank.float(), torch.zeros_like(rank, dtype=torch.float32))
    return {"recall@1": float((rank == 1).float().mean()), f"mrr@{k}": float(reciprocal.mean())}
