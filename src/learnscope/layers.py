"""Per-layer-type knowledge for the Neural Feature Ansatz, one place per type.

For a layer with weight ``W_flat`` (k×d) and pre-activation ``z = W_flat·h + b``
(h: the layer's own input, a vector, a token or an unfolded patch), everything the
NFA probe needs from the layer is

* ``weight_flat(module)``: W_flat, k×d. Linear: ``weight``; Conv: ``weight.reshape(k, -1)``,
  whose column order (C_in, *kernel) is that of ``torch.nn.functional.unfold``;
* ``gradient_rows(module, output_grad)``: the gradient of an output with respect to
  the layer's output (the pre-activation z), reshaped to an (m, k) matrix whose rows
  are the vectors ∇_z f_j at every sample, token or output position, so that
  ``G += rowsᵀ rows`` accumulates Σ_x Σ_j Σ_positions ∇_z f_j ∇_z f_jᵀ (BRIEF 3.2, 3.4);
* ``add_gram(module, output_grad, out)``: that ``rowsᵀ rows`` added into the upper
  triangle of a k×k float64 sum (read it with ``symmetric_from_upper``). The default
  uses ``gradient_rows``; a handler overrides it when its native layout allows a
  cheaper contraction (convolutions: no copy of the rows).

One module may hold several measured maps: ``nn.MultiheadAttention`` holds four
(q, k, v and out_proj, named ``<module>.q`` ...). A handler lists them in ``parts``
(one handler per map, reading it from the module) and routes every map's output
through the probe in ``tap``; the rest of the library sees ``LayerMap`` records
(module, part, handler) by name.

Adding a layer type means adding one ``LayerHandler`` subclass here and one
``register_handler`` line; nothing else in the library knows about layer types.
A type from an optional library (Hugging Face ``Conv1D``) is registered by its
qualified class name, so the library is never imported here.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "GRAM_BLOCK",
    "Conv1DHandler",
    "ConvHandler",
    "LayerHandler",
    "LayerMap",
    "LinearHandler",
    "MultiheadAttentionHandler",
    "add_upper_gram",
    "attention_forward",
    "default_layers",
    "handler_for",
    "measurable_names",
    "register_handler",
    "select_layers",
    "symmetric_from_upper",
    "tapped",
    "unsupported_reason",
]

#: Row-block height of the symmetric Gram products in ``add_upper_gram``. Block row i
#: costs a (b × m)·(m × (k − i·b)) product: about k(k + b)/2 multiply-adds per row
#: instead of k². 64 is where the blocks still run at the full matrix-product rate on
#: a CPU core (measured, k = 512, m = 2560, float32: 0.57 × the time of the full
#: product with b = 64, 0.61 with 128, 0.80 with 32).
GRAM_BLOCK = 64

# Elements of the float32 temporary per slice of the batched convolution Gram
# (2 MiB): as fast as larger slices, and small beside one chunk's gradients.
_GRAM_SLICE_ELEMENTS = 1 << 19


def add_upper_gram(rows: Tensor, out: Tensor, *, alpha: float = 1.0, block: int = GRAM_BLOCK) -> None:
    """``out += alpha · rowsᵀ rows`` on and above the diagonal, for rows (m×k).

    Only the blocks of b = ``block`` rows of ``rowsᵀ rows`` on and right of the
    diagonal are formed, each in the rows' dtype and added into ``out`` (k×k, any
    dtype, e.g. a float64 sum): about half the multiply-adds of the full product,
    and a float32 temporary of at most b×k entries instead of k×k. Entries of
    ``out`` below the diagonal receive parts of the product (the diagonal blocks
    are formed whole) and are not meaningful: read ``symmetric_from_upper(out)``.
    """
    k = rows.shape[-1]
    if k <= block:
        out.add_(rows.mT @ rows, alpha=alpha)
        return
    for start in range(0, k, block):
        stop = min(start + block, k)
        out[start:stop, start:].add_(rows[:, start:stop].mT @ rows[:, start:], alpha=alpha)


def symmetric_from_upper(upper: Tensor) -> Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is ``upper``'s."""
    return torch.triu(upper) + torch.triu(upper, diagonal=1).mT


def _weight(module: nn.Module) -> Tensor:
    """``module.weight``: a tensor in every module a weight handler measures (its
    ``unsupported_reason`` refuses the others), which ``nn.Module.__getattr__``'s
    return type (Tensor | Module) cannot say."""
    return cast(Tensor, module.weight)


def _attention(module: nn.Module) -> nn.MultiheadAttention:
    """The module of an attention handler: ``handler_for`` gives these handlers to
    ``nn.MultiheadAttention`` instances only (their registered type)."""
    return cast(nn.MultiheadAttention, module)


class LayerHandler:
    """How the NFA probe reads one layer type.

    Subclasses implement ``weight_flat`` and ``gradient_rows`` and may refuse
    particular configurations in ``unsupported_reason``.
    """

    def unsupported_reason(self, module: nn.Module) -> str | None:
        """Why this module cannot be measured, or None when it can."""
        weight = getattr(module, "weight", None)
        if not isinstance(weight, Tensor):
            return "it has no weight tensor"
        if isinstance(weight, nn.parameter.UninitializedParameter):
            return "its weight is not initialised yet (lazy module before its first forward)"
        return None

    def out_features(self, module: nn.Module) -> int:
        """k, the number of pre-activation coordinates (rows of W_flat)."""
        return int(_weight(module).shape[0])

    def weight_flat(self, module: nn.Module) -> Tensor:
        """W_flat (k×d), detached."""
        raise NotImplementedError

    def gradient_rows(self, module: nn.Module, output_grad: Tensor) -> Tensor:
        """Rows ∇_z f (m×k) from a gradient shaped like the layer's output.

        ``output_grad`` may carry extra leading dimensions (a batch of
        vector-Jacobian products, as produced by ``is_grads_batched=True``).
        """
        raise NotImplementedError

    def add_gram(self, module: nn.Module, output_grad: Tensor, out: Tensor, *, alpha: float = 1.0) -> None:
        """``out += alpha · rowsᵀ rows`` on and above the diagonal (see ``add_upper_gram``),
        rows = ``gradient_rows(module, output_grad)``. ``out`` is k×k; only its upper
        triangle is meaningful afterwards (``symmetric_from_upper``)."""
        add_upper_gram(self.gradient_rows(module, output_grad), out, alpha=alpha)

    def parts(self, module: nn.Module) -> dict[str, LayerHandler]:
        """The linear maps measured in one module of this type: part name → the handler
        that reads it from the module. ``""`` is the module itself (one map, named as
        the module); other parts are named ``<module>.<part>``."""
        return {"": self}

    def tap(self, module: nn.Module, taps: Mapping[str, Callable[[Tensor], Tensor]]) -> Any:
        """Pass each measured part's output z through ``taps[part]`` (which returns z + p,
        or z itself) in every forward until ``.remove()`` is called on the returned handle.
        Default: a forward hook on the module's output (a floating-point tensor)."""
        tap = taps[""]

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not isinstance(output, Tensor) or not output.is_floating_point():
                return None
            return tap(output)

        return module.register_forward_hook(hook)


class LinearHandler(LayerHandler):
    """``nn.Linear`` on (n, d) inputs or per token on (n, T, d) (any leading dims).

    Every leading position (sample, token) is one row: z_t = W h_t + b.
    """

    def weight_flat(self, module: nn.Module) -> Tensor:
        return _weight(module).detach()

    def gradient_rows(self, module: nn.Module, output_grad: Tensor) -> Tensor:
        k = self.out_features(module)
        if output_grad.shape[-1] != k:
            raise ValueError(
                f"gradient of shape {tuple(output_grad.shape)} does not end in the layer's {k} output features"
            )
        return output_grad.reshape(-1, k)


class Conv1DHandler(LinearHandler):
    """Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's c_attn, c_proj, c_fc):
    a per-token Linear whose weight is stored transposed, [in, out]:
    z_t = weightᵀ h_t + b, so W_flat = weightᵀ and k = weight.shape[1]."""

    def unsupported_reason(self, module: nn.Module) -> str | None:
        reason = super().unsupported_reason(module)
        if reason is None and _weight(module).dim() != 2:
            return f"its weight has {_weight(module).dim()} dimensions, not 2"
        return reason

    def out_features(self, module: nn.Module) -> int:
        return int(_weight(module).shape[1])

    def weight_flat(self, module: nn.Module) -> Tensor:
        return _weight(module).detach().mT


class ConvHandler(LayerHandler):
    """``nn.Conv1d/2d/3d`` (any stride, padding, dilation; ``groups=1``).

    Each output position p is a linear map of its input patch P_p (C_in·∏kernel
    values, ``unfold`` order): z_p = W_flat P_p + b. The rows are the channel
    vectors at every output position, so G is summed over positions and the
    patch-AGOP is W_flatᵀ G W_flat.
    """

    def __init__(self, spatial_dims: int) -> None:
        self.spatial_dims = spatial_dims

    def unsupported_reason(self, module: nn.Module) -> str | None:
        reason = super().unsupported_reason(module)
        if reason is not None:
            return reason
        if module.groups != 1:
            # With groups > 1 each output channel sees only its group's input
            # channels: W_flat is block-diagonal in a way weight.reshape(k, -1)
            # does not express, so AGOP = W_flatᵀ G W_flat would be wrong.
            return f"grouped convolution (groups={module.groups}) is not supported"
        return None

    def weight_flat(self, module: nn.Module) -> Tensor:
        weight = _weight(module).detach()
        return weight.reshape(weight.shape[0], -1)

    def _channels(self, module: nn.Module, output_grad: Tensor) -> tuple[int, int]:
        """(k, the channel dimension), checked. Counted from the end: works for batched
        (n, k, *spatial), unbatched (k, *spatial) and extra leading dims from batched VJPs alike."""
        k = self.out_features(module)
        channel_dim = -(self.spatial_dims + 1)
        if output_grad.dim() < self.spatial_dims + 1 or output_grad.shape[channel_dim] != k:
            raise ValueError(
                f"gradient of shape {tuple(output_grad.shape)} does not have the layer's "
                f"{k} channels at dimension {channel_dim}"
            )
        return k, channel_dim

    def gradient_rows(self, module: nn.Module, output_grad: Tensor) -> Tensor:
        k, channel_dim = self._channels(module, output_grad)
        return output_grad.movedim(channel_dim, -1).reshape(-1, k)

    def add_gram(self, module: nn.Module, output_grad: Tensor, out: Tensor, *, alpha: float = 1.0) -> None:
        """Σ rowsᵀ rows from the native (…, k, *spatial) layout, without laying the rows out.

        With the gradient viewed as (B, k, P) (B: every leading index, P: output
        positions), Σ rowsᵀ rows = Σ_b g_b g_bᵀ: batched products of k×P slices,
        B at a time in slices whose float32 temporary stays small, blocks of
        ``GRAM_BLOCK`` rows on and right of the diagonal only. The copy that
        ``gradient_rows`` makes (channels last, a strided transpose of every entry)
        costs far more than the products when k is small (k = 8 channels on 28×28
        positions: 7 to 10 × the time of the batched products). When P < k/4 the
        per-slice products are too small to run fast and the rows path is used instead.
        """
        k, channel_dim = self._channels(module, output_grad)
        positions = math.prod(output_grad.shape[channel_dim + 1 :])
        if 4 * positions < k or positions == 0:
            add_upper_gram(self.gradient_rows(module, output_grad), out, alpha=alpha)
            return
        slices = output_grad.reshape(-1, k, positions)  # a view for a contiguous gradient
        block = min(k, GRAM_BLOCK)
        per_call = max(1, _GRAM_SLICE_ELEMENTS // (block * k))
        for first in range(0, slices.shape[0], per_call):
            part = slices[first : first + per_call]
            for start in range(0, k, block):
                stop = min(start + block, k)
                products = torch.bmm(part[:, start:stop], part[:, start:].mT)  # (b, stop−start, k−start)
                out[start:stop, start:].add_(products.sum(dim=0), alpha=alpha)


class _InProjection(LinearHandler):
    """One of the q, k, v maps of an ``nn.MultiheadAttention``: z = W_q·query + b_q (per
    token), W_q the matching block of ``in_proj_weight`` or ``q_proj_weight`` when the
    key/value dimensions differ (the same for k and v with key and value)."""

    _SEPARATE = ("q_proj_weight", "k_proj_weight", "v_proj_weight")

    def __init__(self, index: int) -> None:
        self.index = index

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return None  # the owner (MultiheadAttentionHandler) decides

    def out_features(self, module: nn.Module) -> int:
        return int(_attention(module).embed_dim)

    def weight_flat(self, module: nn.Module) -> Tensor:
        attention = _attention(module)
        if attention.in_proj_weight is not None:
            k = attention.embed_dim
            return attention.in_proj_weight.detach()[self.index * k : (self.index + 1) * k]
        return getattr(attention, self._SEPARATE[self.index]).detach()


class _OutProjection(LinearHandler):
    """The out_proj map of an ``nn.MultiheadAttention`` (its weight is used functionally)."""

    def unsupported_reason(self, module: nn.Module) -> str | None:
        return None

    def out_features(self, module: nn.Module) -> int:
        return int(_attention(module).out_proj.weight.shape[0])

    def weight_flat(self, module: nn.Module) -> Tensor:
        return _attention(module).out_proj.weight.detach()


class MultiheadAttentionHandler(LayerHandler):
    """``nn.MultiheadAttention`` as four per-token linear maps, each of its own input
    (BRIEF 3.2, the local AGOP): ``q`` of the query tokens, ``k`` of the key tokens,
    ``v`` of the value tokens (for self-attention all three read the same tokens) and
    ``out_proj`` of the concatenated heads.

    The module uses these maps functionally (``F.multi_head_attention_forward``, or the
    fused kernel of its fast path), so no forward hook sees them. While tapped, the
    module's forward is replaced by ``attention_forward``: the same computation written
    out, each map's output passed through its tap; the module's own forward is back
    when the handle is removed. ``add_bias_kv``, ``add_zero_attn`` and subclasses with
    their own forward are refused.
    """

    def unsupported_reason(self, module: nn.Module) -> str | None:
        if type(module).forward is not nn.MultiheadAttention.forward:
            # the written-out forward would silently replace what the subclass computes
            return f"{type(module).__name__} overrides forward(), which attention_forward would not reproduce"
        if module.bias_k is not None or module.bias_v is not None:
            return "add_bias_kv=True is not supported"
        if module.add_zero_attn:
            return "add_zero_attn=True is not supported"
        return None

    def out_features(self, module: nn.Module) -> int:
        raise TypeError("nn.MultiheadAttention holds several maps: read its parts (q, k, v, out_proj)")

    def weight_flat(self, module: nn.Module) -> Tensor:
        raise TypeError("nn.MultiheadAttention holds several maps: read its parts (q, k, v, out_proj)")

    def parts(self, module: nn.Module) -> dict[str, LayerHandler]:
        return {"q": _InProjection(0), "k": _InProjection(1), "v": _InProjection(2), "out_proj": _OutProjection()}

    def tap(self, module: nn.Module, taps: Mapping[str, Callable[[Tensor], Tensor]]) -> Any:
        return _ForwardOverride(module, functools.partial(attention_forward, _attention(module), taps=taps))


class _ForwardOverride:
    """Shadows ``module.forward`` with an instance attribute until ``remove()``, which
    puts back exactly what was there (the class's forward, or an instance's own)."""

    def __init__(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        self.module = module
        self.previous = module.__dict__.get("forward", _ForwardOverride)
        object.__setattr__(module, "forward", forward)

    def remove(self) -> None:
        if self.previous is _ForwardOverride:
            self.module.__dict__.pop("forward", None)
        else:
            object.__setattr__(self.module, "forward", self.previous)


def _additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True = not allowed) as the additive float mask (−inf there, 0
    elsewhere), as ``F.multi_head_attention_forward`` turns it; a float mask as is."""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"attention masks must be bool or floating point, got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


def attention_forward(
    module: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    *,
    taps: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``module(query, key, value, ...)`` for an ``nn.MultiheadAttention``, written out.

    Per head h (d_h = E/H): softmax((q_h k_hᵀ)/√d_h + mask) v_h, heads concatenated, then
    out_proj; q = W_q·query + b_q, k = W_k·key + b_k, v = W_v·value + b_v per token.
    Each map's output z goes through ``taps[part]`` (``"q"``, ``"k"``, ``"v"``,
    ``"out_proj"``) when given. Same arguments, masks (boolean or additive, 2-D or
    (N·H)-batched, key padding, the ``is_causal`` hint), layouts (``batch_first``,
    unbatched) and returned weights as the module's own forward, on its slow and fast
    paths alike; attention dropout as the slow path (only when the module is training).
    The maps run on (N, L, E) tokens: every tap sees batch-first outputs. Nested
    tensors (which only the module's fused fast path takes, without gradients) go to
    the module's own forward, untapped.
    """
    if query.is_nested or key.is_nested or value.is_nested:
        return type(module).forward(
            module, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
    taps = taps or {}
    batched = query.dim() == 3
    query, key, value, key_padding_mask = _batch_first(module, batched, query, key, value, key_padding_mask)
    n, tgt_len, embed_dim = query.shape
    q, k, v = _in_projections(module, query, key, value, taps)
    causal = is_causal and key_padding_mask is None and not need_weights
    scores_shape = (n, module.num_heads, tgt_len, key.shape[1])
    mask = _attention_mask(attn_mask, key_padding_mask, is_causal, causal, q.dtype, scores_shape)
    dropout_p = module.dropout if module.training else 0.0
    heads_out, weights = _attend(q, k, v, module.num_heads, mask, dropout_p, need_weights, causal)
    concatenated = heads_out.transpose(1, 2).reshape(n, tgt_len, embed_dim)
    out = _tapped(taps, "out_proj", F.linear(concatenated, module.out_proj.weight, module.out_proj.bias))

    if weights is not None and average_attn_weights:
        weights = weights.mean(dim=1)
    if not batched:
        return out.squeeze(0), None if weights is None else weights.squeeze(0)
    if not module.batch_first:
        out = out.transpose(0, 1)
    return out, weights


def _tapped(taps: Mapping[str, Callable[[Tensor], Tensor]], part: str, z: Tensor) -> Tensor:
    """``z`` through the part's tap, when it has one."""
    tap = taps.get(part)
    return z if tap is None else tap(z)


def _batch_first(
    module: nn.MultiheadAttention,
    batched: bool,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """The inputs as (N, L, E) tokens: an unbatched (L, E) input gets a batch of one,
    a sequence-first (L, N, E) one is transposed."""
    if not batched:
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        return query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), key_padding_mask
    if not module.batch_first:
        return query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), key_padding_mask
    return query, key, value, key_padding_mask


def _in_projections(
    module: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    taps: Mapping[str, Callable[[Tensor], Tensor]],
) -> tuple[Tensor, Tensor, Tensor]:
    """q = W_q·query + b_q, k = W_k·key + b_k, v = W_v·value + b_v, each through its tap."""
    if module.in_proj_weight is not None:
        w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    b_q, b_k, b_v = (None, None, None) if module.in_proj_bias is None else module.in_proj_bias.chunk(3)
    q = _tapped(taps, "q", F.linear(query, w_q, b_q))
    k = _tapped(taps, "k", F.linear(key, w_k, b_k))
    v = _tapped(taps, "v", F.linear(value, w_v, b_v))
    return q, k, v


def _attention_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    is_causal: bool,
    causal: bool,
    dtype: torch.dtype,
    shape: tuple[int, int, int, int],
) -> Tensor | None:
    """The additive mask over (N, H, L, S) scores from ``attn_mask`` (2-D, or (N·H)-batched)
    and the key padding mask; None under the causal hint (``causal``: used only without
    padding or weights, as ``F.multi_head_attention_forward`` does)."""
    key_padding_mask = _additive_mask(key_padding_mask, dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    mask = None if causal else _additive_mask(attn_mask, dtype)
    if mask is not None and mask.dim() == 3:
        mask = mask.view(shape)  # rows are (sample, head)
    if key_padding_mask is not None:
        padding = key_padding_mask.view(shape[0], 1, 1, shape[3])
        mask = padding if mask is None else mask + padding
    return mask


def _attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    mask: Tensor | None,
    dropout_p: float,
    need_weights: bool,
    causal: bool,
) -> tuple[Tensor, Tensor | None]:
    """Per head: softmax((q_h k_hᵀ)/√d_h + mask) v_h, as (N, H, L, d_h), and the attention
    weights (N, H, L, S) when ``need_weights`` (then written out, else fused)."""
    n = q.shape[0]
    head_dim = q.shape[-1] // heads
    q, k, v = (t.reshape(n, t.shape[1], heads, head_dim).transpose(1, 2) for t in (q, k, v))
    if not need_weights:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal), None
    scores = (q * math.sqrt(1.0 / head_dim)) @ k.mT
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v, weights


_HANDLERS: dict[type[nn.Module], LayerHandler] = {}
#: Handlers of classes named "<__module__>.<__qualname__>": types of optional libraries,
#: recognised without importing them.
_NAMED_HANDLERS: dict[str, LayerHandler] = {}


def register_handler(module_type: type[nn.Module] | str, handler: LayerHandler) -> None:
    """Teach the NFA probe a layer type (subclasses of it are covered too).

    ``module_type`` is the class, or its qualified name ``"package.module.Class"``
    (``cls.__module__ + "." + cls.__qualname__``) for a class of a library that
    should not be imported just to register it.
    """
    if not isinstance(handler, LayerHandler):
        raise TypeError(f"handler must be a LayerHandler, got {type(handler).__name__}")
    if isinstance(module_type, str):
        if "." not in module_type.strip("."):
            raise ValueError(f"module_type as a string must be 'package.module.Class', got {module_type!r}")
        _NAMED_HANDLERS[module_type] = handler
        return
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass or its qualified name, got {module_type!r}")
    _HANDLERS[module_type] = handler


register_handler(nn.Linear, LinearHandler())
register_handler(nn.Conv1d, ConvHandler(1))
register_handler(nn.Conv2d, ConvHandler(2))
register_handler(nn.Conv3d, ConvHandler(3))
register_handler(nn.MultiheadAttention, MultiheadAttentionHandler())
# Hugging Face's GPT/GPT-2 projections; older releases defined the class in modeling_utils
register_handler("transformers.pytorch_utils.Conv1D", Conv1DHandler())
register_handler("transformers.modeling_utils.Conv1D", Conv1DHandler())


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler of the most specific registered type of ``module``, or None.

    ``nn.ConvTranspose*d`` is not a subclass of ``nn.Conv*d`` and is therefore
    not handled.
    """
    for cls in type(module).__mro__:
        handler = _HANDLERS.get(cls)
        if handler is None:
            handler = _NAMED_HANDLERS.get(f"{cls.__module__}.{cls.__qualname__}")
        if handler is not None:
            return handler
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """None when the NFA probe can measure ``module``, else the reason it cannot."""
    handler = handler_for(module)
    if handler is None:
        return f"no handler for {type(module).__name__}"
    return handler.unsupported_reason(module)


@dataclass(frozen=True, eq=False)
class LayerMap:
    """One measured linear map z = W_flat·h + b: a whole layer (``part == ""``) or one
    part of a module that holds several (``"q"`` of an ``nn.MultiheadAttention``).

    ``handler`` reads this map from ``module``; ``owner``, the handler of the
    module's type, attaches the probes to all measured parts of the module at once.
    """

    module: nn.Module
    handler: LayerHandler
    part: str = ""
    owner: LayerHandler | None = None

    def weight_flat(self) -> Tensor:
        """W_flat (k×d), detached."""
        return self.handler.weight_flat(self.module)

    def out_features(self) -> int:
        """k, the number of pre-activation coordinates."""
        return self.handler.out_features(self.module)

    def add_gram(self, output_grad: Tensor, out: Tensor, *, alpha: float = 1.0) -> None:
        """``out += alpha · rowsᵀ rows`` on and above the diagonal (``LayerHandler.add_gram``)."""
        self.handler.add_gram(self.module, output_grad, out, alpha=alpha)

    def tap(self, taps: Mapping[str, Callable[[Tensor], Tensor]]) -> Any:
        """``owner.tap(module, taps)``: see ``LayerHandler.tap``."""
        return (self.owner or self.handler).tap(self.module, taps)


def _map_name(module_name: str, part: str) -> str:
    if not part:
        return module_name
    return f"{module_name}.{part}" if module_name else part


def _layer_maps(name: str, module: nn.Module, handler: LayerHandler) -> dict[str, LayerMap]:
    return {
        _map_name(name, part): LayerMap(module, part_handler, part, handler)
        for part, part_handler in handler.parts(module).items()
    }


def _compose(first: Callable[[Tensor], Tensor], second: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    return lambda z: second(first(z))


@contextlib.contextmanager
def tapped(layers: Mapping[str, LayerMap], make_tap: Callable[[str], Callable[[Tensor], Tensor]]) -> Iterator[None]:
    """Within the block, the output z of every map in ``layers`` goes through
    ``make_tap(name)`` (z ↦ z + p for the probes, or a recorder returning z) in every
    forward pass. One ``tap`` per module covers all its measured parts; a map listed
    under two names gets both taps, one after the other. Everything is undone on exit.
    """
    groups: dict[int, tuple[LayerMap, dict[str, Callable[[Tensor], Tensor]]]] = {}
    for name, layer in layers.items():
        _, taps = groups.setdefault(id(layer.module), (layer, {}))
        tap = make_tap(name)
        taps[layer.part] = _compose(taps[layer.part], tap) if layer.part in taps else tap
    handles = []
    try:
        for first, taps in groups.values():
            handles.append(first.tap(taps))
        yield
    finally:
        for handle in reversed(handles):
            handle.remove()


@dataclass(frozen=True)
class _Candidate:
    """A module as layer selection sees it: the names of the maps it would give, and
    its maps (empty when it cannot be measured, with the reason)."""

    name: str
    module: nn.Module
    handled: bool
    map_names: tuple[str, ...]
    maps: dict[str, LayerMap]
    reason: str | None

    @property
    def description(self) -> str:
        return f"{self.name or '<root>'} ({type(self.module).__name__}: {self.reason})"


def _candidates(model: nn.Module) -> Iterator[_Candidate]:
    """Every module in module order; a module that is a part of its parent
    (``nn.MultiheadAttention.out_proj``, whose forward never runs) is left out."""
    claimed: set[str] = set()
    for name, module in model.named_modules():
        if name in claimed:
            continue
        handler = handler_for(module)
        if handler is None:
            yield _Candidate(name, module, False, (name,), {}, f"no handler for {type(module).__name__}")
            continue
        parts = handler.parts(module)
        map_names = tuple(_map_name(name, part) for part in parts)
        claimed.update(map_name for part, map_name in zip(parts, map_names) if part)
        reason = handler.unsupported_reason(module)
        maps = _layer_maps(name, module, handler) if reason is None else {}
        yield _Candidate(name, module, True, map_names, maps, reason)


def _warn_skipped(skipped: list[str], stacklevel: int) -> None:
    if skipped:
        warnings.warn(
            "learnscope NFA: skipping layers that cannot be measured: " + "; ".join(skipped),
            stacklevel=stacklevel + 1,
        )


def default_layers(model: nn.Module) -> dict[str, LayerMap]:
    """Every supported layer's maps by name, in module order: Linear, Conv1d/2d/3d, Hugging
    Face Conv1D, and the q, k, v, out_proj maps of every nn.MultiheadAttention.

    Unsupported instances of these types (grouped convolutions, uninitialised
    lazy layers, attention with ``add_bias_kv``) are skipped with one warning.
    """
    selected: dict[str, LayerMap] = {}
    skipped: list[str] = []
    for candidate in _candidates(model):
        selected.update(candidate.maps)
        if candidate.handled and candidate.reason is not None:
            skipped.append(candidate.description)
    _warn_skipped(skipped, stacklevel=2)
    return selected


def measurable_names(model: nn.Module) -> list[str]:
    """The names of every map the NFA probe can measure in ``model`` (what ``layers=`` selects from)."""
    return [name for candidate in _candidates(model) for name in candidate.maps]


def supported_only(layers: Iterable[tuple[str, nn.Module | LayerMap]], *, stacklevel: int = 2) -> dict[str, LayerMap]:
    """The maps of the (name, module) pairs a handler can measure (a module holding
    several maps gives ``<name>.<part>`` for each); the rest skipped with one warning.
    ``LayerMap`` values are kept as they are."""
    selected: dict[str, LayerMap] = {}
    skipped: list[str] = []
    for name, module in layers:
        if isinstance(module, LayerMap):
            selected[name] = module
            continue
        reason = unsupported_reason(module)
        handler = handler_for(module)
        if reason is None and handler is not None:  # no reason: a handler that can measure it
            selected.update(_layer_maps(name, module, handler))
        else:
            skipped.append(f"{name or '<root>'} ({type(module).__name__}: {reason})")
    _warn_skipped(skipped, stacklevel=stacklevel + 1)
    return selected


def _name_list(names: list[str], limit: int = 20) -> str:
    if not names:
        return "none"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names)} in all)"


def select_layers(model: nn.Module, patterns: Iterable[str] | None = None) -> dict[str, LayerMap]:
    """Maps whose name matches any glob pattern (``fnmatchcase``), in module order.

    A map is named as its module (``"net.0"``), or ``<module>.<part>`` for a module
    holding several (``"encoder.layers.0.self_attn.q"``); a pattern matching the module's
    own name selects all of its maps. ``patterns=None`` means ``default_layers(model)``.
    A matched module that owns parameters but cannot be measured (BatchNorm, grouped
    conv, ...) is skipped with a warning naming the reason; so is a pattern that
    selects nothing. When nothing is selected, one warning says why and lists the
    measurable names. Parameter-free modules (activations, containers) matched by a
    broad pattern such as ``"*"`` are ignored silently: they are not layers.
    """
    if patterns is None:
        return default_layers(model)
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"patterns must be strings, got {pattern!r}")
    selection = _Selection(patterns)
    for candidate in _candidates(model):
        selection.add(candidate)
    selection.warn(stacklevel=2)
    return selection.selected


class _Selection:
    """``select_layers``' pass over the candidates: what the patterns select, what they
    match but cannot measure, which patterns were used, and every measurable name."""

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = patterns
        self.selected: dict[str, LayerMap] = {}
        self.skipped: list[str] = []
        self.measurable: list[str] = []
        self.used: set[str] = set()

    def add(self, candidate: _Candidate) -> None:
        """Select the candidate's maps that a pattern matches (by the module's name or the map's)."""
        self.measurable.extend(candidate.maps)
        by_module = [p for p in self.patterns if fnmatchcase(candidate.name, p)]
        matched = False
        for map_name in candidate.map_names:
            by_map = [p for p in self.patterns if map_name != candidate.name and fnmatchcase(map_name, p)]
            if not by_module and not by_map:
                continue
            matched = True
            if candidate.reason is None:
                self.selected[map_name] = candidate.maps[map_name]
                self.used.update(by_module + by_map)
        if matched and candidate.reason is not None and any(True for _ in candidate.module.parameters(recurse=False)):
            self.skipped.append(candidate.description)

    def warn(self, stacklevel: int) -> None:
        """One warning: nothing selected (and why, with the measurable names), or the
        matched modules skipped and the patterns that selected nothing."""
        if not self.selected:
            what = (
                "match only modules that cannot be measured: " + "; ".join(self.skipped)
                if self.skipped
                else "match no measurable layer"
            )
            warnings.warn(
                f"learnscope NFA: layers={self.patterns} {what}. Nothing will be measured; the measurable "
                f"layers are: {_name_list(self.measurable)}",
                stacklevel=stacklevel + 1,
            )
            return
        messages = []
        if self.skipped:
            messages.append("skipping matched modules that cannot be measured: " + "; ".join(self.skipped))
        unused = [p for p in self.patterns if p not in self.used]
        if unused:
            messages.append(f"patterns that selected no supported layer: {unused}")
        if messages:
            warnings.warn("learnscope NFA: " + ". ".join(messages), stacklevel=stacklevel + 1)
