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

Adding a layer type means adding one ``LayerHandler`` subclass here and one
``register_handler`` line; nothing else in the library knows about layer types.
"""

from __future__ import annotations

import math
import warnings
from fnmatch import fnmatchcase
from typing import Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "GRAM_BLOCK",
    "LayerHandler",
    "LinearHandler",
    "ConvHandler",
    "register_handler",
    "handler_for",
    "unsupported_reason",
    "default_layers",
    "select_layers",
    "add_upper_gram",
    "symmetric_from_upper",
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
        return int(module.weight.shape[0])

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


class LinearHandler(LayerHandler):
    """``nn.Linear`` on (n, d) inputs or per token on (n, T, d) (any leading dims).

    Every leading position (sample, token) is one row: z_t = W h_t + b.
    """

    def weight_flat(self, module: nn.Module) -> Tensor:
        return module.weight.detach()

    def gradient_rows(self, module: nn.Module, output_grad: Tensor) -> Tensor:
        k = self.out_features(module)
        if output_grad.shape[-1] != k:
            raise ValueError(
                f"gradient of shape {tuple(output_grad.shape)} does not end in the "
                f"layer's {k} output features"
            )
        return output_grad.reshape(-1, k)


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
        weight = module.weight.detach()
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


_HANDLERS: dict[type[nn.Module], LayerHandler] = {}


def register_handler(module_type: type[nn.Module], handler: LayerHandler) -> None:
    """Teach the NFA probe a layer type (subclasses of it are covered too)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(handler, LayerHandler):
        raise TypeError(f"handler must be a LayerHandler, got {type(handler).__name__}")
    _HANDLERS[module_type] = handler


register_handler(nn.Linear, LinearHandler())
register_handler(nn.Conv1d, ConvHandler(1))
register_handler(nn.Conv2d, ConvHandler(2))
register_handler(nn.Conv3d, ConvHandler(3))


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler of the most specific registered type of ``module``, or None.

    ``nn.ConvTranspose*d`` is not a subclass of ``nn.Conv*d`` and is therefore
    not handled.
    """
    for cls in type(module).__mro__:
        handler = _HANDLERS.get(cls)
        if handler is not None:
            return handler
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """None when the NFA probe can measure ``module``, else the reason it cannot."""
    handler = handler_for(module)
    if handler is None:
        return f"no handler for {type(module).__name__}"
    return handler.unsupported_reason(module)


def default_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every supported Linear and Conv1d/2d/3d, by qualified name, in module order.

    Unsupported instances of these types (grouped convolutions, uninitialised
    lazy layers) are skipped with one warning.
    """
    candidates = ((name, m) for name, m in model.named_modules() if handler_for(m) is not None)
    return supported_only(candidates, stacklevel=3)


def supported_only(layers: Iterable[tuple[str, nn.Module]], *, stacklevel: int = 2) -> dict[str, nn.Module]:
    """The (name, module) pairs a handler can measure; the rest skipped with one warning."""
    selected: dict[str, nn.Module] = {}
    skipped: list[str] = []
    for name, module in layers:
        reason = unsupported_reason(module)
        if reason is None:
            selected[name] = module
        else:
            skipped.append(f"{name or '<root>'} ({type(module).__name__}: {reason})")
    if skipped:
        warnings.warn(
            "learnscope NFA: skipping layers that cannot be measured: " + "; ".join(skipped),
            stacklevel=stacklevel + 1,
        )
    return selected


def select_layers(
    model: nn.Module, patterns: Iterable[str] | None = None
) -> dict[str, nn.Module]:
    """Layers whose qualified module name matches any glob pattern (``fnmatchcase``).

    ``patterns=None`` means ``default_layers(model)``. The result keeps module
    order. A matched module that owns parameters but is not a supported layer
    (BatchNorm, grouped conv, MultiheadAttention's packed projections, ...) is
    skipped with a warning; so is a pattern that selects nothing. Parameter-free
    modules (activations, containers) matched by a broad pattern such as ``"*"``
    are ignored silently: they are not layers.
    """
    if patterns is None:
        return default_layers(model)
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"patterns must be strings, got {pattern!r}")

    selected: dict[str, nn.Module] = {}
    skipped: list[str] = []
    used_patterns: set[str] = set()
    for name, module in model.named_modules():
        matching = [p for p in patterns if fnmatchcase(name, p)]
        if not matching:
            continue
        reason = unsupported_reason(module)
        if reason is None:
            selected[name] = module
            used_patterns.update(matching)
        elif any(True for _ in module.parameters(recurse=False)):
            skipped.append(f"{name or '<root>'} ({type(module).__name__}: {reason})")

    messages = []
    if skipped:
        messages.append("skipping matched modules that cannot be measured: " + "; ".join(skipped))
    unused = [p for p in patterns if p not in used_patterns]
    if unused:
        messages.append(f"patterns that selected no supported layer: {unused}")
    if messages:
        warnings.warn("learnscope NFA: " + ". ".join(messages), stacklevel=2)
    return selected
