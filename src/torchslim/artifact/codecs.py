"""Entropy coding of sparse, weight-shared tensors (docs/format.md, section 3).

The arithmetic is constriction's ANS coder; what is written here is only the modelling the
format defines: a row-by-row mask with per-column adaptive Bernoulli probabilities, and
one categorical model over codebook indices whose counts are stored as varints. Everything
a stream needs to decode is in the blob or the manifest entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import cast

import constriction
import numpy as np
import torch

from torchslim.errors import ArtifactError

ALPHA = 4.0
"""Prior strength of the position model: the layer density counts as this many rows."""
MAX_CODEBOOK = 256
MAX_NUMEL = 2**31
"""Largest coded tensor the format allows (docs/format.md, section 3)."""
_CODABLE = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int8: "int8",
    torch.uint8: "uint8",
}
"""Dtypes a tensor may be coded from: floats, int8 (quantized weights: at most 256 values) and
uint8 (packed int4 weights), coded as the int8 tensor with the same bits."""
_BYTES = ("int8", "uint8")  # the dtypes coded as a codebook of signed bytes
_DTYPES = {v: k for k, v in _CODABLE.items()}


def _bernoulli():
    return constriction.stream.model.Bernoulli(perfect=False)


def _words(coder) -> bytes:
    return coder.get_compressed().astype("<u4").tobytes()


def _coder(buf: bytes):
    if len(buf) % 4:
        raise ArtifactError(f"coded stream of {len(buf)} bytes is not a whole number of 32-bit words")
    try:
        return constriction.stream.stack.AnsCoder(np.frombuffer(buf, dtype="<u4").astype(np.uint32))
    except ValueError as exc:
        raise ArtifactError(f"coded stream is corrupted: {exc}") from None


def _decode(coder, model, arg) -> np.ndarray:
    try:
        return coder.decode(model, arg)
    except (ValueError, RuntimeError) as exc:
        raise ArtifactError(f"coded stream is corrupted: {exc}") from None


def varints(values: np.ndarray) -> bytes:
    """Unsigned LEB128: 7 bits per byte, high bit set on every byte but the last."""
    out = bytearray()
    for v in values.tolist():
        while v >= 0x80:
            out.append((v & 0x7F) | 0x80)
            v >>= 7
        out.append(v)
    return bytes(out)


def read_varints(buf: bytes, count: int, offset: int = 0) -> tuple[list[int], int]:
    """Read ``count`` LEB128 varints from ``buf`` at ``offset``; return them and the new offset."""
    values = []
    for _ in range(count):
        value, shift = 0, 0
        while True:
            if offset >= len(buf) or shift > 35:
                raise ArtifactError(f"varint at byte {offset} of a blob runs past its end")
            byte = buf[offset]
            offset += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        values.append(value)
    return values, offset


P_MIN = 2.0**-12
"""Probabilities of the row-aware position model are clipped to [P_MIN, 1 - P_MIN]."""


def _column_probs(above: np.ndarray, row: np.ndarray | float, density: float, alpha: float) -> np.ndarray:
    """(ones above in the column + alpha * density) / (rows above + alpha), float64."""
    return (above.astype(np.float64) + alpha * density) / (row + alpha)


def _row_rate(count: np.ndarray | int, cols: int, density: float) -> np.ndarray | float:
    return (np.float64(count) + 0.5 * density) / (cols + 0.5)


def _position_probs(mask: np.ndarray, alpha: float, rowcol: bool) -> np.ndarray:
    """The probability of a 1 at each cell under the model of docs/format.md section 3.2."""
    rows, cols = mask.shape
    density = float(mask.sum()) / mask.size
    above = np.cumsum(mask, axis=0, dtype=np.int64) - mask  # (R, C) ones in earlier rows
    p = _column_probs(above, np.arange(rows, dtype=np.float64)[:, None], density, alpha)
    if rowcol:
        rate = _row_rate(mask.sum(axis=1, dtype=np.int64), cols, density)[:, None]  # (R, 1)
        p = np.clip(p * rate / density, P_MIN, 1.0 - P_MIN)
    return p


def encode_positions(mask: np.ndarray, alpha: float = ALPHA, rowcol: bool = False) -> bytes:
    """Code a boolean (R, C) mask row by row (section 3.2); ``rowcol`` prefixes row counts."""
    coder = constriction.stream.stack.AnsCoder()
    probs = _position_probs(mask, alpha, rowcol)
    coder.encode_reverse(mask.astype(np.int32).ravel(), _bernoulli(), probs.ravel())
    head = varints(mask.sum(axis=1, dtype=np.int64)) if rowcol else b""
    return head + _words(coder)


def decode_positions(buf: bytes, rows: int, cols: int, nnz: int, alpha: float, rowcol: bool = False) -> np.ndarray:
    """Inverse of :func:`encode_positions`; ``nnz`` gives the density the model starts from."""
    density = nnz / (rows * cols)
    offset = 0
    if rowcol:
        if not 0 < nnz < rows * cols:
            raise ArtifactError(f"the row-aware position model needs 0 < nnz < {rows * cols}, got nnz={nnz}")
        counts, offset = read_varints(buf, rows)
        if sum(counts) != nnz or max(counts, default=0) > cols:
            raise ArtifactError(f"row counts of a position stream sum to {sum(counts)}, not nnz={nnz}")
    coder = _coder(buf[offset:])
    above = np.zeros(cols, dtype=np.int64)
    mask = np.empty((rows, cols), dtype=bool)
    model = _bernoulli()
    for r in range(rows):
        probs = _column_probs(above, np.float64(r), density, alpha)
        if rowcol:
            probs = np.clip(probs * _row_rate(counts[r], cols, density) / density, P_MIN, 1.0 - P_MIN)
        mask[r] = _decode(coder, model, probs) != 0
        above += mask[r]
    return mask


def _categorical(counts: np.ndarray):
    probs = counts.astype(np.float64) / float(counts.sum())
    return constriction.stream.model.Categorical(probs, perfect=False)


def encode_indices(indices: np.ndarray, counts: np.ndarray) -> bytes:
    """Code cluster indices with one categorical model over their counts (section 3.3).

    A one-entry codebook needs no stream: every index is 0.
    """
    if counts.size == 1:
        return b""
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(indices.astype(np.int32), _categorical(counts))
    return _words(coder)


def decode_indices(buf: bytes, counts: np.ndarray) -> np.ndarray:
    """Inverse of :func:`encode_indices`."""
    if counts.size == 1:
        if buf:
            raise ArtifactError("a one-entry codebook must have an empty index stream")
        return np.zeros(int(counts[0]), dtype=np.int64)
    return _decode(_coder(buf), _categorical(counts), int(counts.sum()))


def entropy_bits(counts: np.ndarray) -> float:
    """Order-0 empirical Shannon bound of a stream with these symbol counts, in bits."""
    counts = counts[counts > 0].astype(np.float64)
    n = counts.sum()
    return float(-(counts * np.log2(counts / n)).sum()) if n else 0.0


@dataclass(frozen=True)
class Coded:
    """One coded tensor: its blob and its manifest entry."""

    blob: bytes
    entry: dict


def _rows(shape: list[int] | torch.Size) -> int:
    """Rows of the (R, C) view: the first dimension of a matrix or higher; 1 for rank 0 and 1."""
    return int(shape[0]) if len(shape) >= 2 else 1


def _matrix(t: torch.Tensor) -> np.ndarray:
    return t.detach().reshape(_rows(t.shape), -1).float().numpy()  # (R, C)


def _value_codings(values: np.ndarray, integers: bool) -> dict[str, tuple[bytes, bytes, int]]:
    """Every applicable coding of the non-zero values: name -> (value section, index stream, k).

    Integer (int8) tensors use the codebook only (their dense form is already one byte a value),
    with one signed byte per codebook entry (``codebook8``).
    """
    out = {} if integers else {"raw": (values.astype("<f4").tobytes(), b"", 0)}
    half = values.astype("<f2")
    if not integers and np.array_equal(half.astype(np.float32), values, equal_nan=True):
        out["raw16"] = (half.tobytes(), b"", 0)
    codebook, index = np.unique(values, return_inverse=True)
    if codebook.size <= MAX_CODEBOOK:
        counts = np.bincount(index, minlength=codebook.size)
        stream = encode_indices(index, counts) if values.size else b""
        entries = codebook.astype("i1" if integers else "<f4").tobytes()
        out["codebook8" if integers else "codebook"] = (entries + varints(counts), stream, int(codebook.size))
    return out


def encode_tensor(t: torch.Tensor, alpha: float = ALPHA) -> Coded | None:
    """Code a float or int8 tensor as values + positions + indices; ``None`` if not codable.

    Each choice the format leaves open (position model, value coding) is made by trying the
    options and keeping the smallest.
    """
    if t.dtype not in _CODABLE or t.numel() == 0:
        return None
    dtype = _CODABLE[t.dtype]
    if t.dtype == torch.uint8:
        t = t.view(torch.int8)  # the same bits: 0..127 as they are, 128..255 as -128..-1
    w = _matrix(t)
    mask = w != 0
    values = w[mask]  # row-major non-zeros
    positions, rowcol = b"", False
    if 0 < values.size < w.size:
        candidates = [encode_positions(mask, alpha, False), encode_positions(mask, alpha, True)]
        rowcol = len(candidates[1]) < len(candidates[0])
        positions = candidates[rowcol]
    elif values.size == 0:
        positions = encode_positions(mask, alpha, False)
    codings = _value_codings(values, integers=dtype in _BYTES)
    kind = min(codings, key=lambda name: (len(codings[name][0]) + len(codings[name][1]), name))
    head, stream, k = codings[kind]
    entry = {
        "dtype": dtype,
        "shape": list(t.shape),
        "nnz": int(values.size),
        "values": kind,
        "k": k,
        "alpha": alpha,
        "positions": "rowcol" if rowcol else "col",
        "sections": [len(head), len(positions), len(stream)],
    }
    return Coded(head + positions + stream, entry)


def _strict_int(value: object, what: str, name: str) -> int:
    if type(value) is not int:  # JSON true, 1.0, "1" and 1e400 are not counts
        raise ArtifactError(f"tensor {name!r}: manifest field {what} must be an integer, got {value!r}")
    return value


_WIDTH = {"codebook": None, "codebook8": None, "raw": 4, "raw16": 2}
"""Bytes a value takes in the value section: ``None`` for a codebook (entries, then counts)."""


@dataclass(frozen=True)
class CodedEntry:
    """A coded tensor's manifest entry (docs/format.md, section 3), read back and checked: the
    reader of what :func:`encode_tensor` writes. ``parse`` makes every check that needs no blob.

    Example:
        >>> coded = encode_tensor(torch.zeros(4, 4))
        >>> CodedEntry.parse(coded.entry, "w").nnz
        0
    """

    dtype: str
    shape: tuple[int, ...]
    nnz: int
    values: str  # "raw", "raw16", "codebook" or "codebook8"
    k: int
    alpha: float
    positions: str  # "col" or "rowcol"
    sections: tuple[int, int, int]  # byte lengths: values, positions, indices

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @classmethod
    def parse(cls, entry: object, name: str) -> CodedEntry:
        """The entry checked field by field; a fault is an :class:`ArtifactError` naming the tensor."""
        shape = _entry_shape(entry, name)  # also checks that the entry is a mapping
        entry = cast(dict, entry)
        nnz, k = _strict_int(entry.get("nnz"), "nnz", name), _strict_int(entry.get("k"), "k", name)
        sections = entry.get("sections")
        if not isinstance(sections, list) or len(sections) != 3:
            raise ArtifactError(f"tensor {name!r}: 'sections' must be a list of three byte lengths")
        head_len, pos_len, idx_len = (_strict_int(x, "sections", name) for x in sections)
        kind, alpha, model, dtype = entry.get("values"), entry.get("alpha"), entry.get("positions"), entry.get("dtype")
        if not isinstance(dtype, str) or dtype not in _DTYPES or model not in ("col", "rowcol"):
            raise ArtifactError(f"tensor {name!r}: malformed manifest entry (dtype {dtype!r}, positions {model!r})")
        numel = math.prod(shape)
        if min(head_len, pos_len, idx_len) < 0 or not 0 <= nnz <= numel:
            raise ArtifactError(f"tensor {name!r}: sections {sections} with nnz={nnz} do not fit {numel} elements")
        width = _WIDTH.get(kind, 0) if isinstance(kind, str) else 0
        if width == 0 or type(alpha) not in (int, float) or not 0 < alpha < 1e300:  # a huge JSON integer has no float
            raise ArtifactError(f"tensor {name!r}: unsupported value coding {kind!r} (alpha={alpha!r})")
        if (width and (k != 0 or idx_len or head_len != width * nnz)) or (
            not width and not 0 < k <= min(nnz, MAX_CODEBOOK) and nnz
        ):
            raise ArtifactError(f"tensor {name!r}: {kind} values with k={k} do not fit {head_len} bytes for nnz={nnz}")
        if (nnz in (0, numel) and model == "rowcol") or (nnz == numel and pos_len):
            raise ArtifactError(f"tensor {name!r}: a position section that nnz={nnz} of {numel} rules out")
        old_int8 = dtype == "int8" and kind == "codebook"  # version 4 writers' int8 codebooks
        if (kind == "codebook8") != (dtype in _BYTES) and not old_int8 and (kind != "codebook" or dtype == "uint8"):
            raise ArtifactError(
                f"tensor {name!r}: {kind!r} values cannot decode to {dtype}; an int8 tensor uses a codebook, "
                "a uint8 tensor a codebook8"
            )
        return cls(dtype, tuple(shape), nnz, kind, k, float(alpha), model, (head_len, pos_len, idx_len))


def _entry_shape(entry: object, name: str) -> list[int]:
    """The decoded shape a coded entry declares, checked to be a list of sizes within bounds."""
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if not isinstance(shape, list):
        raise ArtifactError(f"tensor {name!r}: a coded entry must be a mapping with a 'shape' list")
    dims = [_strict_int(d, "shape", name) for d in shape]
    if min(dims, default=1) < 0 or not 0 < math.prod(dims) <= MAX_NUMEL:
        raise ArtifactError(f"tensor {name!r}: shape {dims} is not a codable shape (1 to {MAX_NUMEL} elements)")
    return dims


def decode_tensor(blob: bytes, entry: CodedEntry | dict, name: str) -> torch.Tensor:
    """Rebuild the tensor ``name`` from its blob and manifest entry (parsed, or parsed here first)."""
    e = entry if isinstance(entry, CodedEntry) else CodedEntry.parse(entry, name)
    head_len, pos_len, idx_len = e.sections
    if head_len + pos_len + idx_len != len(blob):
        raise ArtifactError(f"tensor {name!r}: sections {list(e.sections)} do not fit a {len(blob)}-byte blob")
    head, pos, idx = blob[:head_len], blob[head_len : head_len + pos_len], blob[head_len + pos_len :]
    rows = _rows(e.shape)
    cols = e.numel // rows
    whole = e.nnz == e.numel  # dense: the values are the tensor, no mask
    mask = None if whole else decode_positions(pos, rows, cols, e.nnz, e.alpha, e.positions == "rowcol")
    if mask is not None and int(mask.sum()) != e.nnz:
        raise ArtifactError(
            f"tensor {name!r}: position stream holds {int(mask.sum())} non-zeros, manifest says {e.nnz}"
        )
    small = e.dtype in _BYTES  # decoded as bytes: a quarter of float32's memory
    values = _decode_values(head, idx, e.values, e.k, e.nnz, name, small) if e.nnz else np.zeros(0, np.float32)
    if whole:
        out = values.reshape(rows, cols)
    else:
        out = np.zeros((rows, cols), dtype=np.int8 if small else np.float32)
        out[mask] = values
    t = torch.from_numpy(out).reshape(e.shape)
    if e.dtype == "uint8":  # coded as the int8 tensor with the same bits
        return t.view(torch.uint8)
    return t.to(_DTYPES[e.dtype])


def _decode_values(head: bytes, idx: bytes, kind: str, k: int, nnz: int, name: str, small: bool = False) -> np.ndarray:
    """The non-zero values in order: float32, or int8 when ``small`` (an int8 / uint8 tensor,
    whose values must then be integers in [-128, 127])."""
    if kind in ("raw", "raw16"):
        raw = np.frombuffer(head, dtype="<f4" if kind == "raw" else "<f2").astype(np.float32)
        return _as_bytes(raw, name) if small else raw
    width = 1 if kind == "codebook8" else 4
    if len(head) < width * k:
        raise ArtifactError(f"tensor {name!r}: value section too short for a {k}-entry codebook")
    codebook = np.frombuffer(head[: width * k], dtype="i1" if width == 1 else "<f4").astype(np.float32)
    if (np.diff(codebook) <= 0).any():
        raise ArtifactError(f"tensor {name!r}: codebook entries are not strictly ascending")
    counts, end = read_varints(head, k, width * k)
    counts = np.asarray(counts, dtype=np.int64)
    if end != len(head) or int(counts.sum()) != nnz or (counts < 1).any():
        raise ArtifactError(f"tensor {name!r}: codebook counts do not match nnz={nnz}")
    return (_as_bytes(codebook, name) if small else codebook)[decode_indices(idx, counts)]


def _as_bytes(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` as int8, or an :class:`ArtifactError` when one is not an integer in [-128, 127]."""
    if not np.isin(values, np.arange(-128, 128)).all():
        raise ArtifactError(f"tensor {name!r}: an int8 or uint8 tensor's values must be integers in [-128, 127]")
    return values.astype(np.int8)


def stream_bounds(t: torch.Tensor, alpha: float = ALPHA, rowcol: bool = False) -> dict[str, float]:
    """Shannon bounds, in bits, of the streams a tensor codes to.

    ``positions_h0``: order-0 entropy of the mask (``numel * H(density)``);
    ``positions_model``: ideal code length of the ANS words under the format's position model
    plus the stored row counts when ``rowcol`` selects the row-aware variant;
    ``indices_h0``: order-0 entropy of the codebook indices.
    """
    w = _matrix(t)
    mask = w != 0
    nnz = int(mask.sum())
    out = {"positions_h0": 0.0, "positions_model": 0.0, "indices_h0": 0.0}
    if 0 < nnz < w.size:
        out["positions_h0"] = entropy_bits(np.array([nnz, w.size - nnz]))
        p = _position_probs(mask, alpha, rowcol)
        out["positions_model"] = float(-np.log2(np.where(mask, p, 1.0 - p)).sum())
        if rowcol:  # the row counts are stored, not modelled
            out["positions_model"] += 8 * len(varints(mask.sum(axis=1, dtype=np.int64)))
    _, index = np.unique(w[mask], return_inverse=True)
    out["indices_h0"] = entropy_bits(np.bincount(index)) if nnz else 0.0
    return out
