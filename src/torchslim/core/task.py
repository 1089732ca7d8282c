"""What a model is for: how a batch feeds it, its training loss, its quality metric, and how two
models' outputs are compared (fidelity).

A batch is whatever the user's loader yields:

* a tensor (inputs only: enough for calibration and fidelity, not for training);
* an ``(inputs, target)`` pair, where ``inputs`` may itself be a tuple of positional tensors;
* a dict of keyword tensors as Hugging Face models take, the target under ``labels``
  (``label_key``), which is not passed to the model.

A task is a plain object with the attributes and methods of :class:`Task`; the four built-in
ones are frozen dataclasses, and a user task needs no base class. Sums rather than means come
back from ``score`` and ``compare`` so that metrics over batches of different sizes (or tokens
under padding masks) are exact over the whole loader.

The soft-target term (Hinton et al. 2015) is here rather than in ``train`` because a task
decides what its logits are: per sample for classification, per unpadded token for language
modelling.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.errors import ConfigError, DataError


@dataclass(frozen=True)
class Metric:
    """A named quality measure: ``unit`` ``"%"`` means a fraction shown as a percentage."""

    name: str
    unit: str = ""
    higher_is_better: bool = True

    def show(self, value: float) -> str:
        """``value`` for people: ``91.23 %``, ``12.4 ppl``."""
        if self.unit == "%":
            return f"{100 * value:.2f} %"
        return f"{value:.4g} {self.unit}".rstrip()

    def drop(self, before: float, after: float) -> float:
        """How much worse ``after`` is than ``before`` (positive: a loss of quality)."""
        return before - after if self.higher_is_better else after - before

    @property
    def scale(self) -> float:
        """Multiplier from the value to its shown number: 100 for a percentage, else 1."""
        return 100.0 if self.unit == "%" else 1.0

    @property
    def drop_word(self) -> str:
        """What losing quality does to the value: a ``drop`` of accuracy, a ``rise`` of perplexity."""
        return "drop" if self.higher_is_better else "rise"

    @property
    def drop_unit(self) -> str:
        """What a drop is counted in: ``points`` of a percentage, else the metric's unit (or name)."""
        return "points" if self.unit == "%" else (self.unit or self.name)

    def show_drop(self, value: float) -> str:
        """A drop for people: ``0.52 points``, ``0.31 ppl``."""
        if self.unit == "%":
            return f"{100 * value:.2f} points"
        return f"{value:.4g} {self.drop_unit}"


@runtime_checkable
class Task(Protocol):
    """What a model is for (see the module docstring). ``score`` and ``compare`` return
    ``(sum, count)``; ``finish`` turns the summed score into the metric."""

    name: str
    metric: Metric
    fidelity: Metric

    def split(self, batch: Any) -> tuple[Any, Any]: ...
    def loss(self, output: Any, batch: Any) -> torch.Tensor: ...
    def teacher_loss(
        self, output: Any, teacher_output: Any, batch: Any, temperature: float, alpha: float
    ) -> torch.Tensor: ...
    def score(self, output: Any, batch: Any) -> tuple[float, float]: ...
    def finish(self, total: float, count: float) -> float: ...
    def compare(self, output: Any, reference: Any, batch: Any) -> tuple[float, float]: ...
    def check(self, batch: Any, output: Any) -> None: ...


def split_batch(batch: Any, label_key: str = "labels") -> tuple[Any, Any]:
    """``(inputs, target)`` of one batch; the target is ``None`` for a bare tensor or a dict
    without ``label_key``."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k != label_key}, batch.get(label_key)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        return batch[0], None
    raise DataError(
        f"a batch of type {type(batch).__name__}"
        + (f" with {len(batch)} items" if isinstance(batch, (tuple, list)) else "")
        + " cannot feed a model: yield a tensor, an (inputs, target) pair or a dict of tensors"
    )


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict, ``model(*inputs)`` for a tuple or list, else ``model(inputs)``."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def forward(model: nn.Module, task: Task, batch: Any) -> Any:
    """The model's output on one batch's inputs."""
    return call_model(model, task.split(batch)[0])


def move(batch: Any, device: torch.device | str | None) -> Any:
    """``batch`` with every tensor in it (nested tuples, lists, dicts) on ``device``."""
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        moved = [move(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def check_finite(batch: Any, where: str) -> None:
    """:class:`DataError` when a floating-point tensor in ``batch`` holds NaN or Inf."""
    if isinstance(batch, torch.Tensor):
        if batch.is_floating_point() and not torch.isfinite(batch).all():
            raise DataError(f"{where} holds NaN or Inf; clean the data (or drop those samples) before compressing")
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            check_finite(value, f"{where}[{key!r}]")
    elif isinstance(batch, (tuple, list)):
        for i, value in enumerate(batch):
            check_finite(value, f"{where}[{i}]")


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, a tuple's first item, a dict's
    ``logits`` (or only tensor) value, or an object's ``logits`` attribute."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        tensors = [v for v in output.values() if isinstance(v, torch.Tensor)]
        if len(tensors) == 1:
            return tensors[0]
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    elif isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    raise ConfigError(
        f"cannot find the logits in a model output of type {type(output).__name__}: return a tensor, a tuple "
        "whose first item is the logits, or a dict with a 'logits' key"
    )


def soft_target_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) between temperature-softened distributions, times T**2."""
    if logits.shape != teacher_logits.shape:
        raise ConfigError(
            f"the student's logits have shape {tuple(logits.shape)} but the teacher's {tuple(teacher_logits.shape)}: "
            "teacher and student must predict the same number of classes"
        )
    t = temperature
    log_p = F.log_softmax(logits / t, dim=-1)
    log_q = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * t * t


def as_float32(value: float) -> float:
    """``value`` rounded to float32: a fraction of samples reads as a tensor's ``mean()`` would
    give it, so recorded figures do not depend on how the counts were summed."""
    return torch.tensor(value, dtype=torch.float32).item()


def _need_target(target: Any, task: str, what: str) -> torch.Tensor:
    if not isinstance(target, torch.Tensor):
        raise DataError(
            f"the {task} task needs {what} to train or score, but the batch has "
            f"{'none' if target is None else type(target).__name__}: yield (inputs, target) pairs "
            "or a dict with a 'labels' tensor"
        )
    return target


@dataclass(frozen=True)
class Classification:
    """One class per sample: cross-entropy, accuracy, and top-1 agreement between two models."""

    label_key: str = "labels"
    name: ClassVar[str] = "classification"
    metric: ClassVar[Metric] = Metric("accuracy", "%")
    fidelity: ClassVar[Metric] = Metric("agreement", "%")

    def split(self, batch: Any) -> tuple[Any, Any]:
        return split_batch(batch, self.label_key)

    def loss(self, output: Any, batch: Any) -> torch.Tensor:
        return F.cross_entropy(logits_of(output), self._labels(batch))

    def teacher_loss(self, output: Any, teacher_output: Any, batch: Any, temperature: float, alpha: float):
        s, t = logits_of(output), logits_of(teacher_output)
        soft = soft_target_loss(s, t, temperature)
        target = self.split(batch)[1]
        if target is None:
            return soft
        return (1 - alpha) * F.cross_entropy(s, target) + alpha * soft

    def score(self, output: Any, batch: Any) -> tuple[float, float]:
        labels = self._labels(batch)
        return (logits_of(output).argmax(-1) == labels).sum().item(), labels.numel()

    def finish(self, total: float, count: float) -> float:
        return as_float32(total / count)

    def compare(self, output: Any, reference: Any, batch: Any) -> tuple[float, float]:
        a, b = logits_of(output).argmax(-1), logits_of(reference).argmax(-1)
        return (a == b).sum().item(), a.numel()

    def check(self, batch: Any, output: Any) -> None:
        target = self.split(batch)[1]
        if target is None:
            return
        if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.is_complex():
            raise DataError(
                f"classification labels must be an integer tensor of class indices, got "
                f"{getattr(target, 'dtype', type(target).__name__)}: yield (inputs, int64 labels)"
            )
        classes = logits_of(output).shape[-1]
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= classes):
            raise DataError(
                f"labels run from {int(target.min())} to {int(target.max())} but the model predicts {classes} "
                f"classes (0..{classes - 1}): check the dataset's label encoding or the model's output layer"
            )

    def _labels(self, batch: Any) -> torch.Tensor:
        return _need_target(self.split(batch)[1], self.name, "class labels")


@dataclass(frozen=True)
class Regression:
    """Real-valued targets: mean squared error as loss and metric, and as the distance between
    two models' outputs."""

    label_key: str = "labels"
    name: ClassVar[str] = "regression"
    metric: ClassVar[Metric] = Metric("mse", "", higher_is_better=False)
    fidelity: ClassVar[Metric] = Metric("output mse", "", higher_is_better=False)

    def split(self, batch: Any) -> tuple[Any, Any]:
        return split_batch(batch, self.label_key)

    def loss(self, output: Any, batch: Any) -> torch.Tensor:
        return F.mse_loss(self._prediction(output, batch), self._target(batch))

    def teacher_loss(self, output: Any, teacher_output: Any, batch: Any, temperature: float, alpha: float):
        pred = logits_of(output)
        soft = F.mse_loss(pred, logits_of(teacher_output).detach())
        target = self.split(batch)[1]
        return soft if target is None else (1 - alpha) * self.loss(output, batch) + alpha * soft

    def score(self, output: Any, batch: Any) -> tuple[float, float]:
        pred, target = self._prediction(output, batch), self._target(batch)
        return F.mse_loss(pred, target, reduction="sum").item(), target.numel()

    def finish(self, total: float, count: float) -> float:
        return total / count

    def compare(self, output: Any, reference: Any, batch: Any) -> tuple[float, float]:
        a, b = logits_of(output).float(), logits_of(reference).float()
        return F.mse_loss(a, b, reduction="sum").item(), a.numel()

    def check(self, batch: Any, output: Any) -> None:
        target = self.split(batch)[1]
        if target is not None:
            self._prediction(output, batch)

    def _target(self, batch: Any) -> torch.Tensor:
        return _need_target(self.split(batch)[1], self.name, "targets").float()

    def _prediction(self, output: Any, batch: Any) -> torch.Tensor:
        pred, target = logits_of(output), self.split(batch)[1]
        if isinstance(target, torch.Tensor) and pred.shape != target.shape:
            if pred.numel() != target.numel():
                raise DataError(
                    f"the model predicts shape {tuple(pred.shape)} but the targets have shape {tuple(target.shape)}"
                )
            pred = pred.reshape(target.shape)
        return pred


def token_mask(batch: Any, like: torch.Tensor) -> torch.Tensor:
    """The batch's ``attention_mask`` as booleans shaped like ``like``'s first two dims, or all true."""
    inputs = batch if isinstance(batch, Mapping) else None
    mask = inputs.get("attention_mask") if inputs is not None else None
    if isinstance(mask, torch.Tensor) and mask.shape == like.shape[:2]:
        return mask.bool()
    return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)


@dataclass(frozen=True)
class Embedding:
    """Sentence or image embeddings compared with a reference: the metric is the mean cosine
    similarity to the targets (a batch's target, else ``reference``'s output on the inputs,
    typically the uncompressed model), fidelity the overlap of each sample's ``k`` nearest
    neighbours within the batch. A (B, T, D) output is mean-pooled over the attention mask.

    ``reference``'s embeddings are kept by the inputs' content (up to ``REFERENCE_CACHE``
    batches), so scoring many candidates on the same batches runs it once per batch: it must
    not change while the task is in use (the uncompressed model does not)."""

    reference: nn.Module | None = field(default=None, compare=False, repr=False)
    k: int = 5
    label_key: str = "labels"
    _seen: dict = field(default_factory=dict, init=False, compare=False, repr=False)
    REFERENCE_CACHE: ClassVar[int] = 4096
    name: ClassVar[str] = "embedding"
    metric: ClassVar[Metric] = Metric("cosine", "")
    fidelity: ClassVar[Metric] = Metric("neighbour overlap", "%")

    def split(self, batch: Any) -> tuple[Any, Any]:
        return split_batch(batch, self.label_key)

    def embed(self, output: Any, batch: Any) -> torch.Tensor:
        """(B, D) embeddings: the output, or its masked mean over tokens when it is (B, T, D)."""
        out = output if isinstance(output, torch.Tensor) else _embedding_tensor(output)
        if out.dim() == 3:  # (B, T, D) -> (B, D)
            mask = token_mask(self.split(batch)[0], out).unsqueeze(-1).to(out.dtype)
            out = (out * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return out

    def loss(self, output: Any, batch: Any) -> torch.Tensor:
        return (1 - F.cosine_similarity(self.embed(output, batch), self._target(batch), dim=-1)).mean()

    def teacher_loss(self, output: Any, teacher_output: Any, batch: Any, temperature: float, alpha: float):
        e, t = self.embed(output, batch), self.embed(teacher_output, batch).detach()
        return (1 - F.cosine_similarity(e, t, dim=-1)).mean()

    def score(self, output: Any, batch: Any) -> tuple[float, float]:
        e = self.embed(output, batch)
        return F.cosine_similarity(e.float(), self._target(batch).float(), dim=-1).sum().item(), e.shape[0]

    def finish(self, total: float, count: float) -> float:
        return total / count

    def compare(self, output: Any, reference: Any, batch: Any) -> tuple[float, float]:
        a, b = self.embed(output, batch).float(), self.embed(reference, batch).float()
        n = a.shape[0]
        k = min(self.k, n - 1)
        if k < 1:
            return float(n), float(n)
        na, nb = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        eye = torch.eye(n, dtype=torch.bool, device=a.device)
        top_a = (na @ na.T).masked_fill(eye, -2).topk(k, dim=-1).indices  # (B, k)
        top_b = (nb @ nb.T).masked_fill(eye, -2).topk(k, dim=-1).indices
        shared = (top_a.unsqueeze(-1) == top_b.unsqueeze(-2)).any(-1).sum().item()
        return shared / k, float(n)

    def check(self, batch: Any, output: Any) -> None:
        self.embed(output, batch)

    def _target(self, batch: Any) -> torch.Tensor:
        inputs, target = self.split(batch)
        if isinstance(target, torch.Tensor):
            return target
        if self.reference is None:
            raise DataError(
                "the embedding task scores against target embeddings: yield (inputs, target_embedding) "
                "batches, or build the task with reference=<the uncompressed model>"
            )
        key = _content_key(inputs)
        if key is not None and key in self._seen:
            return self._seen[key]
        with torch.no_grad():
            out = self.embed(call_model(self.reference, inputs), inputs)
        if key is not None and len(self._seen) < self.REFERENCE_CACHE:
            self._seen[key] = out
        return out


def _content_key(inputs: Any) -> tuple | None:
    """A digest of every tensor in ``inputs`` (shapes, dtypes, bytes); None for anything else."""
    if isinstance(inputs, torch.Tensor):
        tensors = [inputs]
    elif isinstance(inputs, (Mapping, tuple, list)):
        tensors = list(inputs.values() if isinstance(inputs, Mapping) else inputs)
    else:
        return None
    if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
        return None
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(f"{tuple(t.shape)}{t.dtype}{t.device}".encode())
        digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return (digest.hexdigest(),)


def _embedding_tensor(output: Any) -> torch.Tensor:
    # the token states (mean-pooled by the caller) before a pooler: a BERT pooler is trained for
    # next-sentence prediction, and sentence encoders mean-pool the last hidden state
    for key in ("sentence_embedding", "last_hidden_state", "pooler_output"):
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    return logits_of(output)


@dataclass(frozen=True)
class LanguageModel:
    """Next-token prediction: the batch is a tensor of token ids or a dict with ``input_ids``
    (and ``attention_mask``, ``labels`` where -100 marks ignored tokens). The loss is the
    shifted cross-entropy over unmasked tokens, the metric perplexity, fidelity the share of
    tokens where both models predict the same next token."""

    label_key: str = "labels"
    name: ClassVar[str] = "lm"
    metric: ClassVar[Metric] = Metric("perplexity", "ppl", higher_is_better=False)
    fidelity: ClassVar[Metric] = Metric("token agreement", "%")

    def split(self, batch: Any) -> tuple[Any, Any]:
        return split_batch(batch, self.label_key)

    def tokens(self, output: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Shifted ``(logits, labels)`` of the predicted tokens: (N, V) and (N,), padding dropped."""
        logits = logits_of(output)  # (B, T, V)
        inputs, labels = self.split(batch)
        ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
        if labels is None:
            labels = ids
        if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or logits.dim() != 3:
            raise DataError(
                "the lm task needs (B, T) token ids and (B, T, V) logits: yield input_ids (and labels) of shape (B, T)"
            )
        keep = token_mask(inputs, logits)[:, 1:] & (labels[:, 1:] != -100)  # (B, T-1)
        return logits[:, :-1][keep], labels[:, 1:][keep]

    def loss(self, output: Any, batch: Any) -> torch.Tensor:
        logits, labels = self.tokens(output, batch)
        return F.cross_entropy(logits, labels)

    def teacher_loss(self, output: Any, teacher_output: Any, batch: Any, temperature: float, alpha: float):
        s, labels = self.tokens(output, batch)
        t, _ = self.tokens(teacher_output, batch)
        return (1 - alpha) * F.cross_entropy(s, labels) + alpha * soft_target_loss(s, t, temperature)

    def score(self, output: Any, batch: Any) -> tuple[float, float]:
        logits, labels = self.tokens(output, batch)
        return F.cross_entropy(logits.float(), labels, reduction="sum").item(), labels.numel()

    def finish(self, total: float, count: float) -> float:
        return math.exp(total / count)

    def compare(self, output: Any, reference: Any, batch: Any) -> tuple[float, float]:
        a, _ = self.tokens(output, batch)
        b, _ = self.tokens(reference, batch)
        return (a.argmax(-1) == b.argmax(-1)).sum().item(), a.shape[0]

    def check_model(self, model: nn.Module, batch: Any, output: Any) -> None:
        """Refuse a model that sees later tokens (a bidirectional encoder such as BERT): the
        last token of ``batch`` is changed and no earlier position's logits may move."""
        inputs, _ = self.split(batch)
        ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
            return
        logits = logits_of(output)
        changed = ids.clone()
        changed[:, -1] = (changed[:, -1] + 1) % logits.shape[-1]
        moved = logits_of(
            call_model(model, {**inputs, "input_ids": changed} if isinstance(inputs, Mapping) else changed)
        )
        before, after = logits[:, :-1].float(), moved[:, :-1].float()
        if (before - after).abs().max() > 1e-5 * (1 + before.abs().max()):  # a causal model: rounding only
            raise DataError(
                f"the lm task predicts each token from the ones before it, but {type(model).__name__} lets earlier "
                "positions see later tokens (a bidirectional encoder): load the model as a causal language model "
                "(AutoModelForCausalLM), or use the embedding or classification task"
            )

    def check(self, batch: Any, output: Any) -> None:
        logits, labels = self.tokens(output, batch)
        vocab = logits_of(output).shape[-1]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= vocab):
            raise DataError(
                f"token ids run from {int(labels.min())} to {int(labels.max())} but the model's vocabulary has "
                f"{vocab} entries: tokenise with the model's own tokenizer"
            )


TASKS: dict[str, type] = {
    "classification": Classification,
    "regression": Regression,
    "embedding": Embedding,
    "lm": LanguageModel,
}
"""The built-in tasks by the names recipes use."""


def task_named(name: str) -> Task:
    """The built-in task called ``name`` (see :data:`TASKS`)."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)} (or pass your own Task object)")
    return TASKS[name]()
