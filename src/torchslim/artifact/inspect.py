"""Per-layer account of a `.tslim` file, in the manner of Deep Compression's Tables 2-3.

For every coded tensor: weights kept, bits per index (codebook size) and the real bits per
index and per position that the streams spend, its bytes, its compression rate against
fp32, and each stream's real bytes beside its Shannon bounds.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from torchslim.artifact.codecs import stream_bounds
from torchslim.artifact.tslim import Manifest, decode_state, read


@dataclass(frozen=True)
class TensorRow:
    """One stored tensor. Bytes are payload bytes (the container's JSON header is separate)."""

    name: str
    shape: list[int]
    coded: bool
    weights: int
    kept: int
    codebook_bits: int | None
    index_bits: float | None
    position_bits: float | None
    bytes: int
    fp32_bytes: int
    position_bytes: int = 0
    position_h0_bytes: float = 0.0
    position_model_bytes: float = 0.0
    index_bytes: int = 0
    index_h0_bytes: float = 0.0
    header_bytes: int = 0
    values: str = "dense"

    @property
    def rate(self) -> float:
        return self.fp32_bytes / self.bytes if self.bytes else math.inf

    def to_dict(self) -> dict:
        return {**asdict(self), "rate": self.rate}


def inspect_file(path: str | os.PathLike) -> tuple[list[TensorRow], Manifest]:
    """Decode ``path`` and account for every tensor; returns ``(rows, manifest)``."""
    manifest, stored = read(path)
    state = decode_state(manifest, stored)
    rows = []
    for name in sorted(state):
        t, entry = state[name], manifest.coded.get(name)
        fp32 = t.numel() * 4
        if name in manifest.tied:  # the stored tensor under another name: no bytes of its own
            kept = int((t != 0).sum())
            tied = f"tied to {manifest.tied[name]}"
            rows.append(TensorRow(name, list(t.shape), False, t.numel(), kept, None, None, None, 0, 0, values=tied))
            continue
        if entry is None:
            n = int((t != 0).sum())
            rows.append(
                TensorRow(
                    name, list(t.shape), False, t.numel(), n, None, None, None, t.numel() * t.element_size(), fp32
                )
            )
            continue
        head, pos, idx = entry.sections
        nnz, k, shared = entry.nnz, entry.k, entry.values in ("codebook", "codebook8")
        b = stream_bounds(t, entry.alpha, entry.positions == "rowcol")
        rows.append(
            TensorRow(
                name,
                list(t.shape),
                True,
                t.numel(),
                nnz,
                max(1, math.ceil(math.log2(k))) if shared and k else None,
                8 * idx / nnz if nnz and shared else None,
                8 * pos / nnz if nnz else None,
                head + pos + idx,
                fp32,
                pos,
                b["positions_h0"] / 8,
                b["positions_model"] / 8,
                idx,
                b["indices_h0"] / 8 if shared else 0.0,
                head,
                entry.values,
            )
        )
    return rows, manifest
