"""Distillation losses, as ordinary ``nn.Module`` losses usable inside any training loop.

* :class:`SoftTargetLoss` -- Hinton, Vinyals & Dean (2015): the KL divergence between the
  teacher's and the student's softmax at temperature ``T``, scaled by ``T**2`` (so its
  gradients keep their size as ``T`` changes), mixed with the hard-label cross-entropy:
  ``(1 - alpha) * CE(student, labels) + alpha * T**2 * KL(teacher_T || student_T)``.
* :class:`FeatureLoss` -- one intermediate feature of the student pulled towards one of the
  teacher's: a *hint* (FitNets, Romero et al. 2015: mean squared error, through a learned
  linear projection when the widths differ) or *attention transfer* (Zagoruyko & Komodakis
  2017: the distance between the L2-normalised spatial maps ``mean_c(f**2)`` of two conv
  features, which needs no projection at all).
  A *relation* (MiniLMv2, Wang et al. 2021): for token features (B, L, W) such as the queries,
  keys or values of a transformer layer, split the width into ``R`` relation heads and match
  the softmax of each head's scaled token-token dot products (KL, teacher to student); no
  projection, and student and teacher may have different head counts and widths.

Model outputs may be tensors, tuples whose first item is the logits, dicts with a ``logits``
key (or a single tensor value) or objects with a ``logits`` attribute
(:func:`torchslim.core.task.logits_of`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.core.task import logits_of, soft_target_loss
from torchslim.errors import ConfigError

FEATURE_KINDS = ("hint", "attention", "relation")
RELATION_HEADS = (12, 8, 6, 4, 3, 2, 1)
"""Candidate relation-head counts, most first: the first that divides both widths is used."""


def check_temperature(temperature: Any) -> float:
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ConfigError(f"temperature={temperature!r}: a softmax temperature must be a finite number > 0 (e.g. 4)")
    return float(temperature)


def check_alpha(alpha: Any, name: str = "alpha") -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"{name}={alpha!r}: the soft-target weight must be in [0, 1] (the labels get 1 - {name})")
    return float(alpha)


class SoftTargetLoss(nn.Module):
    """Soft targets mixed with hard labels (see the module docstring).

    Example:
        >>> loss_fn = SoftTargetLoss(temperature=4.0, alpha=0.7)
        >>> loss = loss_fn(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]))
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 0.7) -> None:
        super().__init__()
        self.temperature, self.alpha = check_temperature(temperature), check_alpha(alpha)

    def forward(self, student: Any, teacher: Any, target: torch.Tensor | None = None) -> torch.Tensor:
        s, t = logits_of(student), logits_of(teacher)
        soft = soft_target_loss(s, t, self.temperature)
        if target is None:
            return soft
        return (1 - self.alpha) * F.cross_entropy(s, target) + self.alpha * soft

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"


def _channels(shape: tuple[int, ...]) -> int:
    """A feature's width: dim 1 of an (N, C, H, W) map, else the last dim ((B, F) or (B, L, F))."""
    return shape[1] if len(shape) == 4 else shape[-1]


class FeatureLoss(nn.Module):
    """One student feature pulled towards one teacher feature (see the module docstring).

    Args:
        student_shape, teacher_shape: the features' shapes (batch first), e.g. from one probe
            batch; they fix the projection. 4-D features are (N, C, H, W); 2-D and 3-D ones
            have their width last ((B, F), (B, L, F): token sequences).
        kind: ``"hint"`` (MSE, projected when the widths differ), ``"attention"`` (4-D only) or
            ``"relation"`` (3-D token features of the same length).
    """

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...], kind: str = "hint") -> None:
        super().__init__()
        if kind not in FEATURE_KINDS:
            raise ConfigError(f"feature loss kind {kind!r}: choose one of {list(FEATURE_KINDS)}")
        s, t = tuple(student_shape), tuple(teacher_shape)
        self.kind, self.projection = kind, None
        if kind == "attention":
            if len(s) != 4 or len(t) != 4:
                raise ConfigError(
                    f"attention transfer compares conv feature maps (N, C, H, W); got {s} and {t}: use kind='hint'"
                )
            return
        if kind == "relation":
            if len(s) != 3 or len(t) != 3:
                raise ConfigError(f"relations compare token features (B, L, W); got {s} and {t}: use kind='hint'")
            self.relation_heads = next(r for r in RELATION_HEADS if s[-1] % r == 0 and t[-1] % r == 0)
            return
        if len(s) != len(t):
            raise ConfigError(f"hint features of different ranks ({s} vs {t}): pair layers of the same kind")
        cs, ct = _channels(s), _channels(t)
        if cs != ct:  # a learned projection from the student's width to the teacher's
            self.projection = nn.Conv2d(cs, ct, 1, bias=False) if len(s) == 4 else nn.Linear(cs, ct, bias=False)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        teacher = teacher.detach()
        if self.kind == "attention":
            a_s, a_t = (f.float().pow(2).mean(1) for f in (student, teacher))  # (B, H, W)
            if a_s.shape[-2:] != a_t.shape[-2:]:
                a_s = F.adaptive_avg_pool2d(a_s.unsqueeze(1), a_t.shape[-2:]).squeeze(1)
            a_s, a_t = (F.normalize(a.flatten(1), dim=1) for a in (a_s, a_t))
            return (a_s - a_t).pow(2).sum(1).mean()
        if self.kind == "relation":
            log_s, log_t = _relations(student, self.relation_heads), _relations(teacher, self.relation_heads)
            return F.kl_div(log_s, log_t, log_target=True, reduction="sum") / (
                log_s.shape[0] * log_s.shape[1] * log_s.shape[2]
            )
        if self.projection is not None:
            student = self.projection(student)
        if student.dim() == 4 and student.shape[-2:] != teacher.shape[-2:]:
            student = F.adaptive_avg_pool2d(student, teacher.shape[-2:])
        if student.shape != teacher.shape:
            raise ConfigError(
                f"hint features differ in shape after projection: {tuple(student.shape)} vs {tuple(teacher.shape)}"
            )
        return F.mse_loss(student, teacher)

    def extra_repr(self) -> str:
        return f"kind={self.kind}"


def _relations(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Log-softmax of scaled dot products between the tokens of each relation head: (B, R, L, L)."""
    b, n, w = x.shape
    h = x.float().reshape(b, n, heads, w // heads).transpose(1, 2)  # (B, R, L, w / R)
    return F.log_softmax(h @ h.transpose(-1, -2) / math.sqrt(w // heads), dim=-1)
