"""Attention products in bfloat16: the part of a quantized transformer that int8 does not reach.

Once a transformer's Linear layers run as int8 GEMMs, the attention itself -- the query-key
scores and the weighted sum of the values, two batched matmuls per layer with a softmax
between -- is what is left in float32, and on short sequences with small heads (MiniLM: 128
tokens, 32 dimensions a head) it takes about as long as all the int8 Linear layers together.
Here the queries, keys and values are rounded to bfloat16 (8 bits of mantissa, float32's
range), oneDNN's bfloat16 batched GEMMs multiply them (accumulating in float32) and ATen's
softmax runs on the bfloat16 scores: on a CPU with bfloat16 dot products (AVX512-BF16, AMX)
about twice as fast as PyTorch's fused float32 attention kernel at those sizes.

Works on Hugging Face models built on ``transformers``' attention interface (BERT, RoBERTa,
Llama, ...): the precision is the model's attention implementation, a registered function;
the mask comes from the same builder as PyTorch's own SDPA path, so padding is handled alike.
``transformers`` is imported only when a precision is set.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.errors import ConfigError

PRECISIONS = ("float32", "bfloat16")
_NAME = "torchslim_bfloat16"  # the implementation's name in transformers' registries
_FLOAT = "sdpa"  # what float32 restores when the model's own is not known: PyTorch's fused attention
_OWN = "_torchslim_float_attention"  # the implementation a model had before bfloat16 was set


def _bfloat16_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``transformers``' attention-function signature: (batch, heads, tokens, head size) in,
    (batch, tokens, heads, head size) out, in the query's dtype."""
    groups = query.shape[1] // key.shape[1]  # grouped-query attention: each key/value head serves `groups` heads
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    causal = causal and attention_mask is None and query.shape[2] > 1
    q, k, v = (t.to(torch.bfloat16).contiguous() for t in (query * scale, key, value))
    if q.is_cuda:  # the fused kernel is the fast one there
        mask = (
            attention_mask
            if attention_mask is None or attention_mask.dtype == torch.bool
            else attention_mask.to(q.dtype)
        )
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout if module.training else 0.0, scale=1.0, is_causal=causal
        )
    else:  # on CPUs oneDNN's bfloat16 batched GEMM beats the fused kernel at these sizes
        if causal:
            attention_mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril(
                k.shape[2] - q.shape[2]
            )
        bias = attention_mask
        if attention_mask is not None:  # added to the scores; one (batch, 1, query, key) mask serves every head
            if attention_mask.dtype == torch.bool:  # true: attend; -inf would make a padded row NaN
                bias = torch.zeros(attention_mask.shape, dtype=q.dtype, device=q.device)
                bias = bias.masked_fill(~attention_mask, torch.finfo(q.dtype).min)
            bias = bias.to(q.dtype)
        if dropout and module.training:
            out = F.dropout(_weights(q, k, bias), dropout) @ v
        elif torch.compiler.is_compiling() and not torch.compiler.is_exporting():
            out = torch.ops.torchslim.bfloat16_attention(q, k, v, bias)
        else:
            out = _weights(q, k, bias) @ v
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _weights(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Softmax of the (pre-scaled) query-key scores plus ``bias`` (the additive mask)."""
    scores = q @ k.transpose(-1, -2)
    if bias is not None:
        scores = scores.add_(bias)
    return scores.softmax(-1)


@torch.library.custom_op("torchslim::bfloat16_attention", mutates_args=())
def _opaque(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The products as one operator of their own: inductor calls ATen's vectorized softmax and
    oneDNN's batched GEMMs instead of generating a slower softmax loop around them."""
    return _weights(q, k, bias) @ v


@_opaque.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(_NAME, _bfloat16_attention)
    AttentionMaskInterface.register(_NAME, sdpa_mask)


def _configured(model: nn.Module) -> list[nn.Module]:
    """The outermost Hugging Face models in ``model`` (each sets its own sub-models)."""
    found: dict[str, nn.Module] = {}
    for name, m in model.named_modules():  # parents come before their children
        if hasattr(m, "set_attn_implementation") and hasattr(getattr(m, "config", None), "_attn_implementation"):
            if not any(name == o or name.startswith(f"{o}.") or not o for o in found):
                found[name] = m
    return list(found.values())


def set_attention_precision_(model: nn.Module, precision: str) -> nn.Module:
    """Compute the attention of every Hugging Face model inside ``model`` in ``precision``
    (``"bfloat16"``, or ``"float32"`` for PyTorch's own fused attention); in place.

    Raises a :class:`~torchslim.errors.ConfigError` for a model with no Hugging Face
    attention to set, or one whose attention does not go through ``transformers``' interface.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"attention={precision!r}: choose one of {list(PRECISIONS)}")
    models = _configured(model)
    if not models:
        raise ConfigError(
            f"attention={precision!r} sets the attention of Hugging Face transformers models; "
            f"{type(model).__name__} holds none: leave attention out"
        )
    _register()
    for m in models:
        own = m.config._attn_implementation
        try:
            if precision == "bfloat16":
                m.set_attn_implementation(_NAME)
                if own != _NAME:
                    setattr(m, _OWN, own)
            else:
                m.set_attn_implementation(getattr(m, _OWN, _FLOAT) if own == _NAME else own)
        except (ValueError, ImportError) as exc:
            raise ConfigError(
                f"attention={precision!r}: {type(m).__name__} cannot change its attention implementation ({exc}); "
                "leave attention out for this model"
            ) from None
    return model


def attention_precision(model: nn.Module) -> str | None:
    """``"bfloat16"`` when :func:`set_attention_precision_` set it on ``model``, else ``None``."""
    for m in _configured(model):
        if m.config._attn_implementation == _NAME:
            return "bfloat16"
    return None


def bfloat16_dot_products() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX); without it bfloat16
    attention is emulated and slower than float32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
