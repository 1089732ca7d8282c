"""A client's model update, compressed: top-k sparsification with error feedback, int8 or
k-means values, and the `.tslim` entropy coding of positions and values.

A client sends the change of its model over one round (``delta``), and only the largest part
of it: per tensor, the ``density`` fraction of the entries of ``delta + residual`` with the
largest magnitude, where the residual is what earlier rounds left out (error feedback, as in
Seide et al. 2014 and Lin et al. 2018's Deep Gradient Compression: what is not sent now is
sent later, not lost). The kept values are rounded to int8 with one symmetric scale per
tensor, or to a k-means codebook of ``2**bits`` values, and what the rounding takes away joins
the residual too. Each tensor is then coded by
:func:`torchslim.artifact.codecs.encode_tensor`: the positions of the kept entries with the
format's adaptive column model, the values as a codebook with an ANS-coded index stream
(docs/format.md, section 3).

The payload is :data:`MAGIC`, the manifest's byte length as a LEB128 varint, the manifest
(compact JSON, zlib-compressed: a format version and, per tensor, its name, its coded entry of
docs/format.md section 2 and, for int8 values, the scale), then the tensors' blobs in manifest
order. :func:`decode_update` is the server's reader: it checks the payload against the global
model's names and shapes before decoding anything, and refuses it with an
:class:`~torchslim.errors.UpdateRejectedError` that names what was wrong.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from torchslim.artifact.codecs import CodedEntry, decode_tensor, encode_tensor, read_varints, varints
from torchslim.errors import ArtifactError, ConfigError, TrainingError, UpdateRejectedError
from torchslim.transforms.share import kmeans_codebook

MAGIC = b"TSU1"
"""The first bytes of every update payload."""
VERSION = 1
MAX_MANIFEST = 1 << 20
"""Largest inflated manifest a reader accepts, in bytes."""
VALUES = ("int8", "kmeans")


@dataclass(frozen=True)
class UpdateCodecConfig:
    """How a client compresses its update.

    Attributes:
        density: fraction of each tensor's entries sent, those of largest magnitude (top-k);
            at least one entry per tensor.
        values: ``"int8"`` (one symmetric scale per tensor) or ``"kmeans"`` (a codebook of
            ``2**bits`` values per tensor).
        bits: codebook bits for ``"kmeans"``, 1 to 8.
        error_feedback: keep what was not sent (sparsification and rounding) and add it to
            the next round's update.
        kmeans_iters: Lloyd iterations of the k-means.

    Example:
        >>> UpdateCodecConfig(density=0.05, values="kmeans", bits=4).values
        'kmeans'
    """

    density: float = 0.05
    values: str = "int8"
    bits: int = 4
    error_feedback: bool = True
    kmeans_iters: int = 25

    def __post_init__(self) -> None:
        if not isinstance(self.density, (int, float)) or not 0 < self.density <= 1:
            raise ConfigError(f"density={self.density!r}: use a fraction in (0, 1], such as 0.05 (5 % of each tensor)")
        if self.values not in VALUES:
            raise ConfigError(f"values={self.values!r}: use one of {list(VALUES)}")
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ConfigError(f"bits={self.bits!r}: use a whole number of codebook bits from 1 to 8")
        if not isinstance(self.kmeans_iters, int) or self.kmeans_iters < 1:
            raise ConfigError(f"kmeans_iters={self.kmeans_iters!r}: use at least 1")


def update_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The entries of a state dict an update carries: the non-empty floating-point ones."""
    return [k for k, v in state.items() if v.is_floating_point() and v.numel() > 0]


def _top_k(target: torch.Tensor, density: float) -> torch.Tensor:
    """``target`` with all but its ``ceil(density * numel)`` largest-magnitude entries zeroed."""
    flat = target.flatten()
    k = max(1, math.ceil(density * flat.numel()))
    if k >= flat.numel():
        return target.clone()
    keep = flat.abs().topk(k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view_as(target)


def _int8(sparse: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The int8 grid of a tensor, ``q = round(v / scale)`` with ``scale = max|v| / 127`` (a
    float32 value, so that JSON carries it exactly)."""
    scale = float(np.float32(float(sparse.abs().max()) / 127.0))
    scale = scale if scale > 0 else 1.0  # all zeros, or too small for float32: every value rounds to 0
    return torch.round(sparse / scale).clamp_(-127, 127).to(torch.int8), scale


def dequantize(q: torch.Tensor, scale: float) -> torch.Tensor:
    """The float32 values an int8 tensor and its scale stand for (client and server alike)."""
    return q.to(torch.float32) * scale


def _kmeans(sparse: torch.Tensor, bits: int, iters: int) -> torch.Tensor:
    """The tensor with its non-zero values replaced by the nearest of ``2**bits`` centroids."""
    codebook, index = kmeans_codebook(sparse, bits, iters)
    table = torch.cat([codebook, codebook.new_zeros(1)])  # (k + 1,): index k is a zero
    return table[index]  # sparse's shape


def encode_update(
    delta: Mapping[str, torch.Tensor],
    config: UpdateCodecConfig,
    residual: Mapping[str, torch.Tensor] | None = None,
) -> tuple[bytes, dict[str, torch.Tensor]]:
    """Compress one round's update; return the payload and the residual for the next round.

    The residual is ``delta + residual - sent`` per tensor (zeros without error feedback),
    where ``sent`` is exactly what :func:`decode_update` gives the server.

    Example:
        >>> delta = {"w": torch.randn(64, 32)}
        >>> payload, left = encode_update(delta, UpdateCodecConfig(density=0.1))
        >>> sent = decode_update(payload, {"w": (64, 32)}, max_bytes=1 << 20)["w"]
        >>> torch.allclose(sent + left["w"], delta["w"])
        True
    """
    items, blobs, left = [], [], {}
    for name, d in delta.items():
        target = d.detach().to(torch.float32)
        if residual is not None:
            if tuple(residual[name].shape) != tuple(target.shape):
                raise ConfigError(
                    f"residual of {name!r} has shape {list(residual[name].shape)}, not {list(target.shape)}"
                )
            target = target + residual[name]
        if not torch.isfinite(target).all():
            raise TrainingError(f"the update of {name!r} holds NaN or Inf: local training diverged; lower its lr")
        sparse = _top_k(target, config.density)
        item: dict[str, object] = {"name": name}
        if config.values == "int8":
            q, scale = _int8(sparse)
            item["scale"] = scale
            sent, coded = dequantize(q, scale), encode_tensor(q)
        else:
            sent = _kmeans(sparse, config.bits, config.kmeans_iters)
            coded = encode_tensor(sent)
        if coded is None:
            raise ConfigError(f"tensor {name!r} of shape {list(target.shape)} cannot be coded")
        items.append(item | coded.entry)
        blobs.append(coded.blob)
        left[name] = target - sent if config.error_feedback else torch.zeros_like(target)
    text = json.dumps({"version": VERSION, "tensors": items}, separators=(",", ":"), sort_keys=True)
    manifest = zlib.compress(text.encode("ascii"), 9)
    return MAGIC + varints(np.array([len(manifest)])) + manifest + b"".join(blobs), left


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed in an update manifest")


def _manifest(payload: bytes) -> tuple[list[dict], int]:
    """The manifest's tensor items and the offset of the first blob."""
    if payload[: len(MAGIC)] != MAGIC:
        raise UpdateRejectedError("undecodable: the payload does not start with a torchslim update's magic bytes")
    try:
        (length,), offset = read_varints(payload, 1, len(MAGIC))
    except ArtifactError as exc:
        raise UpdateRejectedError(f"undecodable: {exc}") from None
    if length > len(payload) - offset:
        raise UpdateRejectedError(f"undecodable: a {length}-byte manifest does not fit a {len(payload)}-byte payload")
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(payload[offset : offset + length], MAX_MANIFEST)
        doc = json.loads(raw, parse_constant=_no_constant)
    except (zlib.error, ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise UpdateRejectedError(f"undecodable: the manifest is not compressed JSON ({exc})") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise UpdateRejectedError(f"undecodable: the manifest is truncated or inflates past {MAX_MANIFEST} bytes")
    items = doc.get("tensors") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or type(doc.get("version")) is not int or doc["version"] != VERSION:
        raise UpdateRejectedError(f"undecodable: not a version-{VERSION} update manifest")
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in items):
        raise UpdateRejectedError("undecodable: the manifest's 'tensors' must be a list of named entries")
    return items, offset + length


def check_names(names: Sequence[str], expected: Mapping[str, object]) -> None:
    """Refuse an update whose tensor names are not exactly the global model's, each once."""
    if len(set(names)) != len(names):
        raise UpdateRejectedError(f"wrong tensors: a name appears twice in {sorted(names)}")
    missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
    if missing or extra:
        raise UpdateRejectedError(f"wrong tensors: missing {missing}, not in the model {extra}")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Refuse a tensor that holds NaN or Inf."""
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise UpdateRejectedError(f"tensor {name!r} holds {bad} NaN or Inf values")


def check_shape(name: str, shape: Sequence[int], expected: Sequence[int]) -> None:
    """Refuse a tensor whose shape is not the global model's."""
    if tuple(shape) != tuple(expected):
        raise UpdateRejectedError(f"tensor {name!r} has shape {list(shape)}; the model's is {list(expected)}")


def decode_update(payload: bytes, expected: Mapping[str, Sequence[int]], max_bytes: int) -> dict[str, torch.Tensor]:
    """The float32 update a payload carries, checked against the global model.

    ``expected`` maps each name the update must carry to the model's shape of it. Refuses,
    with an :class:`~torchslim.errors.UpdateRejectedError` that says why: a payload over
    ``max_bytes`` (before reading it), bytes that do not decode, other tensor names, another
    shape, another dtype than int8 or float32, a missing or non-finite int8 scale, and NaN or
    Inf values.
    """
    if len(payload) > max_bytes:
        raise UpdateRejectedError(f"oversized: a payload of {len(payload)} bytes is over the limit of {max_bytes}")
    items, offset = _manifest(payload)
    check_names([i["name"] for i in items], expected)
    out = {}
    for item in items:
        name = item["name"]
        try:
            entry = CodedEntry.parse(item, name)
        except ArtifactError as exc:
            raise UpdateRejectedError(f"undecodable: {exc}") from None
        check_shape(name, entry.shape, expected[name])
        if entry.dtype not in ("int8", "float32"):
            raise UpdateRejectedError(f"tensor {name!r}: dtype {entry.dtype} is not an update's (int8 or float32)")
        end = offset + sum(entry.sections)
        if end > len(payload):
            raise UpdateRejectedError(f"undecodable: tensor {name!r} runs past the end of the payload")
        try:
            t = decode_tensor(payload[offset:end], entry, name)
        except ArtifactError as exc:
            raise UpdateRejectedError(f"undecodable: {exc}") from None
        offset = end
        if entry.dtype == "int8":
            scale = item.get("scale")
            if type(scale) not in (int, float) or not math.isfinite(scale) or scale <= 0:
                raise UpdateRejectedError(f"tensor {name!r}: int8 values need a positive finite scale, got {scale!r}")
            t = dequantize(t, float(scale))
        check_finite(name, t)
        out[name] = t
    if offset != len(payload):
        raise UpdateRejectedError(f"undecodable: {len(payload) - offset} bytes after the last tensor")
    return out
