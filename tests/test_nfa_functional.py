"""Specification of the framework-free NFA core (learnscope.functional.nfa, learnscope.layers).

The references here are written independently of the library: AGOP straight from
its definition with ``torch.func.jacrev`` (each layer's own input as the free
variable, per token or per unfolded patch), and the metrics from explicitly formed
d×d matrices.
"""

from __future__ import annotations

import copy
import math
import statistics
import warnings

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.func import jacrev, vmap

from learnscope import layers as layers_module
from learnscope.functional.nfa import (
    PreactivationGramAccumulator,
    _haar_transpose_times,
    _nfa_correlations,
    agop,
    eval_mode,
    feature_matrices,
    haar_orthogonal,
    nfa_metrics,
    nfa_metrics_and_spectrum,
    preactivation_grams,
    range_spectrum,
    readout_from_grams,
    readout_from_outputs,
)
from learnscope.layers import (
    ConvHandler,
    LinearHandler,
    add_upper_gram,
    default_layers,
    select_layers,
    symmetric_from_upper,
)

DTYPE = torch.float64


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    estimate, reference = estimate.detach(), reference.detach()
    return float(torch.linalg.matrix_norm(estimate - reference) / torch.linalg.matrix_norm(reference))


def reference_agop(tail, free_inputs, *context):
    """(1/n) Σ_x Σ_outputs Σ_positions ∂f/∂h_p ∂f/∂h_pᵀ by jacrev, h the layer's own input.

    ``tail(h, *context)`` maps one sample's free variable (positions × d, or d)
    to that sample's outputs.
    """
    jacobian = vmap(jacrev(tail, argnums=0))(free_inputs, *context)
    n, d = free_inputs.shape[0], free_inputs.shape[-1]
    positions = free_inputs[0].numel() // d
    jacobian = jacobian.reshape(n, -1, positions, d)
    return torch.einsum("nopd,nope->de", jacobian, jacobian) / n


def run(modules, h):
    """Apply modules in order, out-of-place (the reference must not rely on the hook trick)."""
    for module in modules:
        h = torch.relu(h) if isinstance(module, nn.ReLU) else module(h)
    return h


def extract_patches(h, conv):
    """Unfolded input patches of a Conv{1,2,3}d: (n, L, C·∏kernel), and the output grid."""
    spatial = len(conv.kernel_size)
    padding = []
    for p in reversed(conv.padding):
        padding += [p, p]
    h = F.pad(h, padding)
    for axis in range(spatial):
        span = conv.dilation[axis] * (conv.kernel_size[axis] - 1) + 1
        h = h.unfold(2 + axis, span, conv.stride[axis])[..., :: conv.dilation[axis]]
    grid = tuple(h.shape[2 : 2 + spatial])
    order = [0, *range(2, 2 + spatial), 1, *range(2 + spatial, 2 + 2 * spatial)]
    patches = h.permute(order).reshape(h.shape[0], math.prod(grid), -1)
    return patches, grid


def conv_from_patches(patches, conv, grid):
    """z_p = W_flat P_p + b for one sample's patches (L, d) → (k, *grid)."""
    weight_flat = conv.weight.reshape(conv.out_channels, -1)
    z = patches @ weight_flat.mT + conv.bias
    return z.mT.reshape(conv.out_channels, *grid)


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = torch.tensor(data.data[:256] / 16.0, dtype=DTYPE)
    return x


def digits_mlp():
    torch.manual_seed(0)
    return (
        nn.Sequential(nn.Linear(64, 48), nn.ReLU(inplace=True), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 10))
        .to(DTYPE)
        .eval()
    )


# --------------------------------------------------------------------------- #
# AGOP = W_flatᵀ G W_flat against jacrev references
# --------------------------------------------------------------------------- #


def test_mlp_agop_matches_jacrev_reference_on_digits(digits):
    model = digits_mlp()
    grams = preactivation_grams(model, digits, None)
    assert list(grams) == ["0", "2", "4"]
    for index in (0, 2, 4):
        layer_input = run(model[:index], digits)
        expected = reference_agop(lambda h, index=index: run(model[index:], h), layer_input)
        measured = agop(model[index].weight, grams[str(index)])
        assert relative_error(measured, expected) < 1e-6, index
        assert relative_error(measured, expected) < 1e-12  # float64: round-off only


def test_readout_gram_is_identity_for_raw_outputs(digits):
    grams = preactivation_grams(digits_mlp(), digits, ["4"])
    assert torch.allclose(grams["4"], torch.eye(10, dtype=DTYPE), atol=1e-14)


def test_cnn_patch_agop_matches_jacrev_reference_with_stride_two(digits):
    torch.manual_seed(1)
    model = (
        nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(4, 6, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 4 * 4, 10),
        )
        .to(DTYPE)
        .eval()
    )
    images = digits[:96].reshape(-1, 1, 8, 8)
    grams = preactivation_grams(model, images, None)
    assert list(grams) == ["0", "2", "5"]
    for index in (0, 2):
        conv = model[index]
        patches, grid = extract_patches(run(model[:index], images), conv)
        # the patch extraction itself reproduces the convolution
        rebuilt = vmap(lambda p, conv=conv, grid=grid: conv_from_patches(p, conv, grid))(patches)
        assert torch.allclose(rebuilt, conv(run(model[:index], images)), atol=1e-12)

        def tail(p, conv=conv, grid=grid, index=index):
            return run(model[index + 1 :], conv_from_patches(p, conv, grid).unsqueeze(0)).squeeze(0)

        expected = reference_agop(tail, patches)
        measured = agop(conv.weight.reshape(conv.out_channels, -1), grams[str(index)])
        assert relative_error(measured, expected) < 1e-6, index
    flat = run(model[:5], images)
    expected = reference_agop(lambda h: model[5](h), flat)
    assert relative_error(agop(model[5].weight, grams["5"]), expected) < 1e-6


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv1d(3, 5, 3, stride=1, padding=2, dilation=2),
        nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(0, 1, 1)),
    ],
    ids=["conv1d-dilated", "conv3d-strided"],
)
def test_conv1d_and_conv3d_patch_agop_matches_reference(conv):
    torch.manual_seed(2)
    conv = conv.to(DTYPE)
    spatial = (9,) if isinstance(conv, nn.Conv1d) else (4, 5, 3)
    x = torch.randn(12, conv.in_channels, *spatial, dtype=DTYPE)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten()).eval()
    readout = nn.Linear(model(x).shape[1], 4).to(DTYPE)
    model.append(readout)
    grams = preactivation_grams(model, x, ["0"])
    patches, grid = extract_patches(x, conv)
    expected = reference_agop(
        lambda p: run(model[1:], conv_from_patches(p, conv, grid).unsqueeze(0)).squeeze(0), patches
    )
    measured = agop(conv.weight.reshape(conv.out_channels, -1), grams["0"])
    assert relative_error(measured, expected) < 1e-6


class TinyBlock(nn.Module):
    """Single-head attention + MLP with residuals, per-token Linear layers, outputs (n, T, c).

    ``free``/``free_input`` replace one layer's input and nothing else (Q/K/V
    share an input; the residual keeps the original): the reference's free variable.
    """

    def __init__(self, width=6, hidden=10, classes=5):
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.proj = nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x, free=None, free_input=None, record=None):
        def apply(name, h):
            if record is not None:
                record[name] = h
            return getattr(self, name)(free_input if name == free else h)

        q, k, v = apply("query", x), apply("key", x), apply("value", x)
        attention = torch.softmax(q @ k.mT / math.sqrt(q.shape[-1]), dim=-1)
        x = x + apply("proj", attention @ v)
        x = x + apply("down", F.gelu(apply("up", x)))
        return apply("head", x)


def test_attention_block_per_token_agop_matches_jacrev_reference():
    torch.manual_seed(3)
    block = TinyBlock().to(DTYPE).eval()
    tokens = torch.randn(24, 7, 6, dtype=DTYPE)
    grams = preactivation_grams(block, tokens, None)
    layer_inputs: dict[str, torch.Tensor] = {}
    block(tokens, record=layer_inputs)
    assert list(grams) == list(layer_inputs) == ["query", "key", "value", "proj", "up", "down", "head"]
    errors = {}
    for name, layer_input in layer_inputs.items():

        def tail(h, x, name=name):
            return block(x.unsqueeze(0), free=name, free_input=h.unsqueeze(0)).squeeze(0)

        expected = reference_agop(tail, layer_input, tokens)
        errors[name] = relative_error(agop(getattr(block, name).weight, grams[name]), expected)
    assert max(errors.values()) < 1e-6, errors


def test_chunked_accumulation_equals_one_batch(digits):
    model = digits_mlp()
    whole = preactivation_grams(model, digits, None)
    accumulator = PreactivationGramAccumulator(model, None)
    for chunk in digits.split(50):  # 50, 50, 50, 50, 50, 6
        accumulator.update(chunk)
    chunked = accumulator.compute()
    assert accumulator.num_samples == len(digits)
    for name in whole:
        assert torch.allclose(chunked[name], whole[name], rtol=1e-12, atol=1e-15)


def test_sequence_chunked_accumulation_equals_one_batch():
    torch.manual_seed(4)
    block = TinyBlock().to(DTYPE).eval()
    tokens = torch.randn(20, 5, 6, dtype=DTYPE)
    whole = preactivation_grams(block, tokens, None, output_chunk=7)
    accumulator = PreactivationGramAccumulator(block, None, output_chunk=4)
    for chunk in tokens.split(8):
        accumulator.update(chunk)
    for name, gram in accumulator.compute().items():
        assert torch.allclose(gram, whole[name], rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- #
# Gram products: blocked, symmetric, convolutions in their native layout
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("k", [1, 5, 64, 65, 100, 130, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blocked_symmetric_gram_equals_naive_float64_product(k, dtype):
    generator = torch.Generator().manual_seed(k)
    chunks = [torch.randn(m, k, generator=generator, dtype=dtype) for m in (37, 1, 0, 90)]
    expected = sum(c.to(DTYPE).mT @ c.to(DTYPE) for c in chunks)
    for block in (layers_module.GRAM_BLOCK, 7, 1):
        upper = torch.zeros(k, k, dtype=DTYPE)
        for c in chunks:
            add_upper_gram(c, upper, alpha=0.5, block=block)
            add_upper_gram(c, upper, alpha=0.5, block=block)
        gram = symmetric_from_upper(upper)
        assert torch.equal(gram, gram.mT)
        tolerance = 1e-12 if dtype == DTYPE else 1e-6
        assert relative_error(gram, expected) < tolerance, block


def test_symmetric_from_upper_ignores_the_lower_triangle():
    upper = torch.arange(16.0, dtype=DTYPE).reshape(4, 4)
    expected = torch.triu(upper) + torch.triu(upper, 1).mT
    assert torch.equal(symmetric_from_upper(upper), expected)
    assert torch.equal(symmetric_from_upper(upper + torch.tril(torch.ones(4, 4), -1)), expected)


def movedim_gram(grad, spatial_dims):
    """Σ rowsᵀ rows from the channels-last rows (the straightforward layout), float64."""
    rows = grad.to(DTYPE).movedim(-(spatial_dims + 1), -1)
    rows = rows.reshape(-1, rows.shape[-1])
    return rows.mT @ rows


@pytest.mark.parametrize(
    "conv, spatial",
    [
        (nn.Conv1d(3, 5, 3, stride=2, padding=1), (11,)),
        (nn.Conv1d(2, 70, 2, dilation=2), (9,)),  # k > block, 4·positions < k: the rows path
        (nn.Conv2d(1, 8, 3, padding=1), (6, 7)),
        (nn.Conv2d(2, 130, 3, stride=2, padding=2), (13, 12)),  # k > block, not a multiple
        (nn.Conv2d(3, 200, 3, stride=3), (9, 9)),  # 9 positions, k = 200: the rows path
        (nn.Conv3d(2, 3, (2, 3, 2), stride=(1, 2, 1), padding=(0, 1, 1)), (4, 5, 3)),
    ],
    ids=["conv1d-strided", "conv1d-k70-rows", "conv2d-k8", "conv2d-k130-strided", "conv2d-k200-rows", "conv3d"],
)
@pytest.mark.parametrize("slice_elements", [1 << 19, 50])  # 50: one sample per batched product
def test_conv_gram_in_native_layout_equals_movedim_gram(conv, spatial, slice_elements, monkeypatch):
    monkeypatch.setattr(layers_module, "_GRAM_SLICE_ELEMENTS", slice_elements)
    torch.manual_seed(9)
    handler = ConvHandler(len(spatial))
    output = conv(torch.randn(6, conv.in_channels, *spatial))
    for grad in (
        torch.randn(3, *output.shape),  # batched VJPs (c, n, k, *grid), float32
        torch.randn(*output.shape, dtype=DTYPE),  # one VJP, float64
        torch.randn(*output.shape[1:], 2, 3).movedim((-2, -1), (0, 1)),  # non-contiguous
    ):
        upper = torch.zeros(conv.out_channels, conv.out_channels, dtype=DTYPE)
        handler.add_gram(conv, grad, upper, alpha=2.0)
        handler.add_gram(conv, grad, upper, alpha=-1.0)
        expected = movedim_gram(grad, len(spatial))
        tolerance = 1e-12 if grad.dtype == DTYPE else 1e-6
        assert relative_error(symmetric_from_upper(upper), expected) < tolerance
        rows = handler.gradient_rows(conv, grad)  # still there for other uses
        assert torch.allclose(rows.to(DTYPE).mT @ rows.to(DTYPE), expected, rtol=1e-12, atol=1e-9)


def test_conv_gram_rejects_a_gradient_without_the_layer_channels():
    conv = nn.Conv2d(1, 4, 3)
    with pytest.raises(ValueError, match="4 channels"):
        ConvHandler(2).add_gram(conv, torch.randn(2, 5, 3, 3), torch.zeros(4, 4, dtype=DTYPE))


def test_linear_gram_of_token_gradients_equals_naive_product():
    layer = nn.Linear(4, 90)
    grad = torch.randn(3, 5, 7, 90, dtype=DTYPE)  # (VJPs, samples, tokens, k)
    upper = torch.zeros(90, 90, dtype=DTYPE)
    LinearHandler().add_gram(layer, grad, upper)
    rows = grad.reshape(-1, 90)
    assert relative_error(symmetric_from_upper(upper), rows.mT @ rows) < 1e-13


def reference_preactivation_gram(model, index, x):
    """(1/n) Σ_x J_xᵀ J_x with J_x = ∂f/∂z (c × k) by jacrev through the network's tail."""
    z = run(model[: index + 1], x)
    jacobian = vmap(jacrev(lambda h: run(model[index + 1 :], h.unsqueeze(0)).squeeze(0)))(z)
    return torch.einsum("ncj,nck->jk", jacobian, jacobian) / len(x)


def test_wide_and_width_one_layers_match_jacrev_gram_over_several_chunks(digits):
    """k = 150 (> the block, not a multiple of it) and k = 1, fed in uneven chunks."""
    torch.manual_seed(10)
    model = (
        nn.Sequential(
            nn.Linear(64, 150),
            nn.Tanh(),
            nn.Linear(150, 1),
            nn.Tanh(),
            nn.Linear(1, 70),
            nn.ReLU(),
            nn.Linear(70, 10),
        )
        .to(DTYPE)
        .eval()
    )
    accumulator = PreactivationGramAccumulator(model, None, output_chunk=4)
    for chunk in digits.split(70):  # 70, 70, 70, 46
        accumulator.update(chunk)
    grams = accumulator.compute()
    for index in (0, 2, 4, 6):
        expected = reference_preactivation_gram(model, index, digits)
        assert torch.equal(grams[str(index)], grams[str(index)].mT)
        assert relative_error(grams[str(index)], expected) < 1e-12, index
    # float32: the products in float32, the sums in float64
    model32 = copy.deepcopy(model).to(torch.float32)
    grams32 = preactivation_grams(model32, digits.to(torch.float32), None)
    for index in (0, 2, 4):
        expected = reference_preactivation_gram(model, index, digits)
        assert relative_error(grams32[str(index)], expected) < 1e-5, index


def test_reduce_over_processes_gives_the_gram_of_all_samples(digits):
    """compute(reduce=) as under DDP: three simulated ranks, one of which saw no samples."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(64, 100), nn.Tanh(), nn.Linear(100, 10)).to(DTYPE).eval()
    whole = preactivation_grams(model, digits, None)
    ranks = [PreactivationGramAccumulator(model, None) for _ in range(3)]
    ranks[0].update(digits[:90])
    ranks[1].update(digits[90:200])
    ranks[1].update(digits[200:])
    shares = []
    for rank in ranks:  # each rank's flat contribution, as the collective would receive it
        rank._reduce(lambda t: shares.append(t.clone()) or t)
    assert len({t.numel() for t in shares}) == 1
    total = sum(shares)
    for rank in ranks:
        grams = rank.compute(reduce=lambda t: total)
        assert rank.num_samples == len(digits)
        for name, gram in whole.items():
            assert torch.allclose(grams[name], gram, rtol=1e-12, atol=1e-15), name


class NotBatchable(torch.autograd.Function):
    """sin(x) whose backward branches on data: no vmap rule, so batched VJPs fail."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.sin()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if not bool(torch.isfinite(grad).all()):
            raise FloatingPointError("non-finite gradient")
        return grad * x.cos()


class SineNet(nn.Module):
    def __init__(self, batchable):
        super().__init__()
        torch.manual_seed(11)
        self.first, self.second, self.head = nn.Linear(64, 30), nn.Linear(30, 80), nn.Linear(80, 10)
        self.activation = torch.sin if batchable else NotBatchable.apply

    def forward(self, x):
        return self.head(self.activation(self.second(self.activation(self.first(x)))))


@pytest.mark.parametrize("output_chunk", [16, 3], ids=["one-batch", "four-batches"])
@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
def test_fallback_to_one_vjp_per_output_gives_the_batched_gram(digits, output_chunk, estimator):
    """With one batch of VJP directions the graph is freed during the batched attempt:
    the fallback must rebuild it; with several, the first batch falls back in place."""
    options = dict(output_chunk=output_chunk, estimator=estimator, num_probes=5)
    batched = PreactivationGramAccumulator(
        SineNet(True).to(DTYPE).eval(), None, generator=torch.Generator().manual_seed(1), **options
    )
    looped = PreactivationGramAccumulator(
        SineNet(False).to(DTYPE).eval(), None, generator=torch.Generator().manual_seed(1), **options
    )
    with pytest.warns(UserWarning, match="falling back"):
        looped.update(digits[:100])
    looped.update(digits[100:])
    for chunk in (digits[:100], digits[100:]):
        batched.update(chunk)
    expected, measured = batched.compute(), looped.compute()
    assert list(measured) == ["first", "second", "head"]
    assert looped.num_samples == len(digits) and looped._calls == batched._calls
    for name in expected:
        assert relative_error(measured[name], expected[name]) < 1e-13, name


# --------------------------------------------------------------------------- #
# Hutchinson
# --------------------------------------------------------------------------- #


def test_hutchinson_with_16_independent_probes_per_sample_is_within_ten_percent():
    torch.manual_seed(5)
    model = (
        nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 100)).to(DTYPE).eval()
    )
    x = torch.randn(2000, 20, dtype=DTYPE)
    exact = preactivation_grams(model, x, None, output_chunk=50)
    estimate = preactivation_grams(
        model,
        x,
        None,
        estimator="hutchinson",
        num_probes=16,
        generator=torch.Generator().manual_seed(0),
    )
    errors = {name: relative_error(estimate[name], exact[name]) for name in exact}
    assert max(errors.values()) <= 0.1, errors

    # The same 16 probes shared by every sample: exact G of f ↦ Vᵀf/√16.
    signs = torch.randint(0, 2, (100, 16), generator=torch.Generator().manual_seed(1))
    shared_probes = (2 * signs - 1).to(DTYPE) / 4.0
    shared = preactivation_grams(model, x, None, output_fn=lambda f: f @ shared_probes)
    shared_errors = {name: relative_error(shared[name], exact[name]) for name in exact}
    for name in exact:
        assert errors[name] < shared_errors[name] / 2, (errors, shared_errors)


def test_hutchinson_on_token_sequences_is_unbiased_in_scale():
    torch.manual_seed(6)
    block = TinyBlock().to(DTYPE).eval()
    tokens = torch.randn(32, 6, 6, dtype=DTYPE)
    exact = preactivation_grams(block, tokens, None)
    estimate = preactivation_grams(
        block,
        tokens,
        None,
        estimator="hutchinson",
        num_probes=256,
        output_chunk=64,
        generator=torch.Generator().manual_seed(0),
    )
    for name in exact:
        assert relative_error(estimate[name], exact[name]) < 0.1, name
        ratio = torch.trace(estimate[name]) / torch.trace(exact[name])
        assert abs(float(ratio) - 1) < 0.05, name


def test_auto_estimator_is_exact_up_to_64_outputs():
    x = torch.randn(4, 3, dtype=DTYPE)
    for classes, expected in ((64, "exact"), (65, "hutchinson")):
        accumulator = PreactivationGramAccumulator(nn.Linear(3, classes).to(DTYPE), None, estimator="auto")
        accumulator.update(x)
        assert accumulator.estimator == expected
        assert accumulator.is_estimate == (expected == "hutchinson")


# --------------------------------------------------------------------------- #
# Outputs and arguments
# --------------------------------------------------------------------------- #


class DictOutput(nn.Module):
    def __init__(self, key):
        super().__init__()
        self.key, self.linear = key, nn.Linear(3, 2)

    def forward(self, x):
        return {self.key: self.linear(x)}


def test_output_tuple_dict_logits_and_output_fn_are_read():
    x = torch.randn(5, 3)
    reference = preactivation_grams(DictOutput("logits"), x, None)["linear"]
    assert torch.allclose(reference, torch.eye(2, dtype=DTYPE))
    grams = preactivation_grams(DictOutput("prediction"), x, None, output_fn=lambda out: 3 * out["prediction"])
    assert torch.allclose(grams["linear"], 9 * torch.eye(2, dtype=DTYPE))


def test_unreadable_output_raises_value_error_naming_output_fn():
    with pytest.raises(ValueError, match="output_fn"):
        preactivation_grams(DictOutput("prediction"), torch.randn(5, 3), None)


def test_invalid_arguments_name_the_argument():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="estimator"):
        preactivation_grams(model, torch.randn(2, 3), None, estimator="fast")
    with pytest.raises(ValueError, match="num_probes"):
        preactivation_grams(model, torch.randn(2, 3), None, num_probes=0)


# --------------------------------------------------------------------------- #
# Non-interference
# --------------------------------------------------------------------------- #


def snapshot(model):
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "training": [m.training for m in model.modules()],
        "rng": torch.get_rng_state(),
        "hooks": [len(m._forward_hooks) for m in model.modules()],
    }


def assert_same(before, after):
    for key in ("params", "grads", "buffers"):
        assert all(torch.equal(a, b) for a, b in zip(before[key], after[key])), key
    assert before["training"] == after["training"]
    assert torch.equal(before["rng"], after["rng"])
    assert before["hooks"] == after["hooks"]


@pytest.fixture
def bn_model(digits):
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Linear(64, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(32, 10),
    ).to(DTYPE)
    model(digits)  # populate the running statistics
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model.eval()
    model[2].train()  # mixed flags must come back exactly as they were
    return model


@pytest.mark.parametrize("estimator", ["exact", "hutchinson"])
def test_call_changes_no_parameter_buffer_grad_flag_rng_or_hook(bn_model, digits, estimator):
    before = snapshot(bn_model)
    preactivation_grams(bn_model, digits[:64], None, estimator=estimator, num_probes=4)
    assert_same(before, snapshot(bn_model))


def test_hooks_are_removed_when_the_output_cannot_be_read(bn_model, digits):
    before = snapshot(bn_model)
    with pytest.raises(ValueError, match="output_fn"):
        preactivation_grams(bn_model, digits[:8], None, output_fn=lambda out: "not a tensor")
    assert_same(before, snapshot(bn_model))


def test_eval_mode_restores_every_modules_own_flag(bn_model):
    flags = [m.training for m in bn_model.modules()]
    bn_model[1].train()
    flags = [m.training for m in bn_model.modules()]
    with eval_mode(bn_model):
        assert not any(m.training for m in bn_model.modules())
    assert [m.training for m in bn_model.modules()] == flags


def test_works_under_inference_mode_and_no_grad(bn_model, digits):
    expected = preactivation_grams(bn_model, digits[:32], None)
    with torch.inference_mode():
        inference_input = digits[:32].clone()
        measured = preactivation_grams(bn_model, inference_input, None)
    with torch.no_grad():
        measured_no_grad = preactivation_grams(bn_model, digits[:32], None)
    for name in expected:
        assert torch.equal(measured[name], expected[name])
        assert torch.equal(measured_no_grad[name], expected[name])


def test_train_mode_batchnorm_is_warned_about(bn_model, digits):
    bn_model[1].train()
    with pytest.warns(UserWarning, match="eval_mode"):
        preactivation_grams(bn_model, digits[:8], None)


# --------------------------------------------------------------------------- #
# Layer selection
# --------------------------------------------------------------------------- #


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, groups=2), nn.ConvTranspose2d(4, 2, 3)
        )
        self.sequence = nn.Conv1d(2, 3, 3)
        self.volume = nn.Conv3d(1, 2, 2)
        self.attn = nn.MultiheadAttention(4, 1, batch_first=True)
        self.classifier = nn.Linear(4, 3)


def test_default_layers_are_ungrouped_linear_and_convs_in_module_order():
    with pytest.warns(UserWarning, match="groups=2"):
        layers = default_layers(Mixed())
    assert list(layers) == [
        "features.0",
        "sequence",
        "volume",
        "attn.q",
        "attn.k",
        "attn.v",
        "attn.out_proj",
        "classifier",
    ]


def test_select_layers_skips_unsupported_matches_with_a_warning():
    model = Mixed()
    with pytest.warns(UserWarning) as record:
        layers = select_layers(model, ["features.*", "classifier", "nothing.here"])
    message = " ".join(str(w.message) for w in record)
    assert list(layers) == ["features.0", "classifier"]
    for expected in ("features.1 (BatchNorm2d", "features.2", "features.3 (ConvTranspose2d", "nothing.here"):
        assert expected in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(select_layers(model, ["classifier"])) == ["classifier"]


def test_layer_never_called_is_left_out_with_a_warning():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.spare = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(x)

    model = Unused().eval()
    with pytest.warns(UserWarning, match="spare.*not called"):
        grams = preactivation_grams(model, torch.randn(3, 5, 4), None)
    assert list(grams) == ["head"]


# --------------------------------------------------------------------------- #
# Metrics against explicit d×d references
# --------------------------------------------------------------------------- #


def reference_power(matrix, alpha):
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    # zero in exact arithmetic below 1e-10·λ_max (test matrices are well conditioned)
    eigenvalues = torch.where(eigenvalues > 1e-10 * eigenvalues.abs().max(), eigenvalues.clamp_min(0) ** alpha, 0.0)
    return eigenvectors @ torch.diag(eigenvalues) @ eigenvectors.mT


def reference_pearson(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def reference_cosine(a, b):
    return float((a * b).sum() / (a.norm() * b.norm()))


def reference_sphericity(eigenvalues):
    return float(eigenvalues.sum() ** 2 / (len(eigenvalues) * (eigenvalues**2).sum()))


def reference_metrics(weight, gram, alphas, initial_weight, rotations):
    nfm = weight.mT @ weight
    rank = int(torch.linalg.matrix_rank(weight, rtol=1e-10))
    projector = weight @ torch.linalg.pinv(weight, rtol=1e-10)
    compressed = projector @ gram @ projector
    expected = {}
    for alpha in alphas:
        suffix = f"a{alpha:g}"
        agop_power = reference_power(weight.mT @ gram @ weight, alpha)
        expected[f"pearson_{suffix}"] = reference_pearson(nfm, agop_power)
        expected[f"cosine_{suffix}"] = reference_cosine(nfm, agop_power)
        nulls = [
            reference_pearson(nfm, reference_power(weight.mT @ q @ gram @ q.mT @ weight, alpha)) for q in rotations
        ]
        expected[f"null_{suffix}"] = sum(nulls) / len(nulls)
        expected[f"null_se_{suffix}"] = statistics.stdev(nulls) / len(nulls) ** 0.5
        expected["null_draws"] = len(nulls)
        expected[f"excess_{suffix}"] = expected[f"pearson_{suffix}"] - expected[f"null_{suffix}"]
        if alpha != 1:
            expected[f"align_{suffix}"] = reference_cosine(
                compressed, reference_power(weight @ weight.mT, 1 / alpha - 1)
            )
    expected["sphericity"] = reference_sphericity(torch.linalg.eigvalsh(gram))
    expected["sphericity_range"] = reference_sphericity(torch.linalg.eigvalsh(compressed)[-rank:])
    expected["stable_rank"] = float(
        torch.linalg.matrix_norm(weight) ** 2 / torch.linalg.matrix_norm(weight, ord=2) ** 2
    )
    delta = weight - initial_weight
    expected["weight_change"] = float(torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(weight))
    expected["cnfa_pearson_a1"] = reference_pearson(delta.mT @ delta, delta.mT @ gram @ delta)
    return expected, compressed, rank


def random_gram(k, generator):
    factor = torch.randn(k, k + 2, generator=generator, dtype=DTYPE)
    return factor @ factor.mT / k


@pytest.mark.parametrize(
    "shape, rank", [((5, 12), None), ((12, 5), None), ((8, 10), 3)], ids=["k<d", "k>d", "low-rank"]
)
def test_metrics_match_explicit_dxd_reference(shape, rank):
    generator = torch.Generator().manual_seed(8)
    k, d = shape
    # Offsets give the matrices a non-zero mean entry, so Pearson ≠ cosine.
    if rank is None:
        weight = torch.randn(k, d, generator=generator, dtype=DTYPE) + 0.6
    else:
        weight = (torch.randn(k, rank, generator=generator, dtype=DTYPE) + 0.6) @ (
            torch.randn(rank, d, generator=generator, dtype=DTYPE) + 0.6
        )
    initial = weight + 0.5 * torch.randn(k, d, generator=generator, dtype=DTYPE)
    gram = random_gram(k, generator)
    alphas = (1.0, 0.5, 0.25)

    metrics = nfa_metrics(
        weight,
        gram,
        alphas=alphas,
        initial_weight=initial,
        null_draws=3,
        generator=torch.Generator().manual_seed(9),
    )
    rotation_source = torch.Generator().manual_seed(9)
    rotations = [haar_orthogonal(k, generator=rotation_source) for _ in range(3)]
    expected, compressed, true_rank = reference_metrics(weight, gram, alphas, initial, rotations)

    assert set(metrics) == set(expected)
    if rank is None:  # the reference can tell a centring bug apart
        assert abs(metrics["pearson_a1"] - metrics["cosine_a1"]) > 0.01
    for key, value in expected.items():
        # The null's draws run in float32 (nfa._NULL_DTYPE); every other metric is float64.
        tolerance = 2e-5 if key.startswith(("null_", "excess_")) else 1e-8
        assert metrics[key] == pytest.approx(value, abs=tolerance), key
    spectrum = range_spectrum(weight, gram)
    assert len(spectrum) == true_rank == (rank or min(k, d))
    assert torch.allclose(spectrum, torch.linalg.eigvalsh(compressed).flip(0)[:true_rank], atol=1e-10)


@pytest.mark.parametrize("shape", [(300, 400), (400, 300), (256, 600)], ids=["k<d", "k>d", "cutoff inside"])
def test_float32_weights_take_the_gram_route_and_match_lapack_svd(shape, monkeypatch):
    """Large float32 weights get their thin SVD from eigh of the smaller Gram matrix (3×
    faster); the metrics, the rank and the range spectrum equal those from LAPACK's SVD.
    The singular values fall log-spaced from 1 to 10⁻⁶, so the rank cutoff (max(k, d)·ε₃₂)
    lies inside the spectrum and small singular values are exercised."""
    import learnscope.functional.nfa as nfa_module

    generator = torch.Generator().manual_seed(21)
    k, d = shape
    r = min(k, d)
    left = torch.linalg.qr(torch.randn(k, r, generator=generator, dtype=DTYPE))[0]
    right = torch.linalg.qr(torch.randn(d, r, generator=generator, dtype=DTYPE))[0]
    weight = ((left * torch.logspace(0, -6, r, dtype=DTYPE)) @ right.mT + 0.01).float()
    initial = (weight.double() + 1e-3 * torch.randn(k, d, generator=generator, dtype=DTYPE)).float()
    gram = random_gram(k, generator)
    svd_calls = []
    lapack_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **kw: svd_calls.append(1) or lapack_svd(*a, **kw))

    def run():
        return nfa_metrics_and_spectrum(
            weight, gram, initial_weight=initial, null_draws=2, generator=torch.Generator().manual_seed(22)
        )

    metrics, spectrum = run()
    assert svd_calls == []  # W went through the Gram route (W − W₀ needs no SVD)
    monkeypatch.setattr(nfa_module, "_GRAM_ROUTE_MARGIN", math.inf)
    expected, expected_spectrum = run()
    assert len(svd_calls) == 1
    singular = torch.linalg.svdvals(weight.double())
    rank = int((singular > max(k, d) * torch.finfo(torch.float32).eps * singular[0]).sum())
    assert 0 < rank < r and len(spectrum) == len(expected_spectrum) == rank
    assert torch.allclose(spectrum, expected_spectrum, rtol=0, atol=1e-9 * float(expected_spectrum[0]))
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        # The null's draws run in float32 (nfa._NULL_DTYPE); every other metric is float64.
        tolerance = {"abs": 2e-5} if key.startswith(("null_", "excess_")) else {"rel": 1e-9}
        assert metrics[key] == pytest.approx(value, **tolerance), key
    delta = weight.double() - initial.double()  # the centred NFA, from the d×d matrices themselves
    cnfa = reference_pearson(delta.mT @ delta, delta.mT @ gram @ delta)
    assert metrics["cnfa_pearson_a1"] == pytest.approx(cnfa, rel=1e-9)


@pytest.mark.parametrize("shape", [(6, 9), (300, 400)], ids=["LAPACK SVD", "Gram route"])
@pytest.mark.parametrize("argument", ["weight_flat", "gram", "initial_weight"])
def test_non_finite_inputs_raise_naming_the_argument(shape, argument):
    """Both SVD routes reject a NaN the same way, before any linear algebra (LAPACK's SVD
    would raise its own error, eigh would return NaN metrics)."""
    k, d = shape
    inputs = {"weight_flat": torch.randn(k, d), "gram": torch.eye(k, dtype=DTYPE), "initial_weight": torch.randn(k, d)}
    inputs[argument][0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{argument} contains non-finite values"):
        nfa_metrics(inputs["weight_flat"], inputs["gram"], initial_weight=inputs["initial_weight"])
    if argument != "initial_weight":
        with pytest.raises(ValueError, match=f"{argument} contains non-finite values"):
            range_spectrum(inputs["weight_flat"], inputs["gram"])


def test_default_metric_keys_are_exactly_the_brief_list():
    generator = torch.Generator().manual_seed(10)
    weight = torch.randn(6, 9, generator=generator, dtype=DTYPE)
    metrics = nfa_metrics(weight, random_gram(6, generator), initial_weight=torch.zeros(6, 9))
    assert set(metrics) == {
        "pearson_a1",
        "cosine_a1",
        "pearson_a0.5",
        "cosine_a0.5",
        "null_a1",
        "null_a0.5",
        "null_se_a1",
        "null_se_a0.5",
        "null_draws",
        "excess_a1",
        "excess_a0.5",
        "sphericity",
        "sphericity_range",
        "align_a0.5",
        "stable_rank",
        "weight_change",
        "cnfa_pearson_a1",
    }
    without_null = nfa_metrics(weight, random_gram(6, generator), null_draws=0)
    assert not any(key.startswith(("null", "excess")) for key in without_null)
    assert "weight_change" not in without_null and "cnfa_pearson_a1" not in without_null


def test_readout_omits_alpha_one_keys():
    generator = torch.Generator().manual_seed(11)
    weight = torch.randn(10, 16, generator=generator, dtype=DTYPE)
    identity = torch.eye(10, dtype=DTYPE)
    # the reason: with G = I the α = 1 correlation is identically 1
    assert nfa_metrics(weight, identity)["pearson_a1"] == pytest.approx(1.0, abs=1e-12)
    metrics = nfa_metrics(weight, identity, readout=True, initial_weight=torch.zeros(10, 16))
    assert not {"pearson_a1", "cosine_a1", "null_a1", "null_se_a1", "excess_a1", "cnfa_pearson_a1"} & set(metrics)
    assert {"pearson_a0.5", "cosine_a0.5", "null_a0.5", "excess_a0.5", "align_a0.5"} <= set(metrics)


def test_sphericity_is_one_for_isotropic_and_one_over_k_for_rank_one():
    k = 7
    weight = torch.randn(k, 11, dtype=DTYPE)
    assert nfa_metrics(weight, 3.0 * torch.eye(k, dtype=DTYPE))["sphericity"] == pytest.approx(1.0, abs=1e-12)
    direction = torch.randn(k, 1, dtype=DTYPE)
    rank_one = nfa_metrics(weight, direction @ direction.mT, null_draws=0)
    assert rank_one["sphericity"] == pytest.approx(1 / k, abs=1e-12)
    assert rank_one["sphericity_range"] == pytest.approx(1 / k, abs=1e-12)


def test_isotropic_gram_gives_pearson_one_and_aligned_grams_beat_the_null():
    generator = torch.Generator().manual_seed(12)
    weight = torch.randn(6, 10, generator=generator, dtype=DTYPE)

    isotropic = nfa_metrics(weight, 2.5 * torch.eye(6, dtype=DTYPE))
    assert isotropic["pearson_a1"] == pytest.approx(1.0, abs=1e-12)
    assert isotropic["cosine_a1"] == pytest.approx(1.0, abs=1e-12)

    # α = ½ aligned: G = WWᵀ ⇒ AGOP^½ = WᵀW.
    aligned_half = nfa_metrics(weight, weight @ weight.mT, null_draws=8)
    assert aligned_half["pearson_a0.5"] == pytest.approx(1.0, abs=1e-10)
    assert aligned_half["align_a0.5"] == pytest.approx(1.0, abs=1e-12)
    assert aligned_half["null_a0.5"] < aligned_half["pearson_a0.5"] - 0.05

    # α = 1 aligned with k > d: G = I on range(W), large and anisotropic off it.
    tall = torch.randn(12, 4, generator=generator, dtype=DTYPE)
    basis = torch.linalg.svd(tall, full_matrices=True)[0]
    on_range, off_range = basis[:, :4], basis[:, 4:]
    spread = torch.diag(torch.linspace(1.0, 20.0, 8, dtype=DTYPE))
    gram = on_range @ on_range.mT + off_range @ spread @ off_range.mT
    aligned_one = nfa_metrics(tall, gram, null_draws=8)
    assert aligned_one["pearson_a1"] == pytest.approx(1.0, abs=1e-10)
    assert aligned_one["sphericity_range"] == pytest.approx(1.0, abs=1e-12)
    assert aligned_one["null_a1"] < aligned_one["pearson_a1"] - 0.05
    assert aligned_one["excess_a1"] > 0.05


def test_haar_orthogonal_is_orthogonal_and_reproducible():
    q = haar_orthogonal(9, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(q @ q.mT, torch.eye(9, dtype=DTYPE), atol=1e-12)
    assert torch.equal(q, haar_orthogonal(9, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize(
    "shape, rank, readout",
    [
        ((5, 12), None, False),
        ((40, 9), None, False),
        ((30, 50), 4, False),
        ((10, 30), None, True),
        ((1, 7), None, False),
    ],
    ids=["k<d", "k>d", "low-rank", "readout", "k=1"],
)
@pytest.mark.parametrize("dtype", [torch.float32, DTYPE])
def test_metrics_and_spectrum_from_one_svd_equal_the_separate_calls(shape, rank, readout, dtype):
    generator = torch.Generator().manual_seed(13)
    k, d = shape
    weight = torch.randn(k, d, generator=generator, dtype=DTYPE) + 0.3
    if rank is not None:
        weight = torch.randn(k, rank, generator=generator, dtype=DTYPE) @ weight[:rank]
    weight = weight.to(dtype)
    gram = random_gram(k, generator)
    options = dict(alphas=(1.0, 0.5, 2.0), initial_weight=0.8 * weight + 0.1, null_draws=3, readout=readout)
    separate_source, shared_source = torch.Generator().manual_seed(14), torch.Generator().manual_seed(14)
    separate = nfa_metrics(weight, gram, generator=separate_source, **options)
    shared, spectrum = nfa_metrics_and_spectrum(weight, gram, generator=shared_source, **options)
    assert torch.equal(separate_source.get_state(), shared_source.get_state())  # the same null draws
    assert shared.keys() == separate.keys()
    for key, value in separate.items():
        assert shared[key] == pytest.approx(value, rel=1e-12, abs=1e-300) or (
            math.isnan(value) and math.isnan(shared[key])
        ), key
    assert torch.equal(spectrum, range_spectrum(weight, gram))


@pytest.mark.parametrize("k, r", [(1, 1), (6, 0), (6, 3), (40, 40), (70, 25)])
def test_null_rotation_without_forming_q_is_haar_orthogonal_transposed(k, r):
    frame = torch.linalg.qr(torch.randn(k, max(r, 1), dtype=DTYPE))[0][:, :r]
    source, reference_source = torch.Generator().manual_seed(15), torch.Generator().manual_seed(15)
    for _ in range(3):  # successive draws stay in step with haar_orthogonal's
        rotated = _haar_transpose_times(frame, source)
        expected = haar_orthogonal(k, generator=reference_source).mT @ frame
        assert rotated.shape == (k, r)
        assert torch.allclose(rotated, expected, rtol=0, atol=1e-13)
    assert torch.equal(source.get_state(), reference_source.get_state())


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.25])
def test_correlations_without_forming_agop_power_equal_the_formed_matrices(alpha):
    """In range(W), NFM = V S² Vᵀ and AGOP^α = V M^α Vᵀ: Pearson and cosine from the r×r
    matrices formed explicitly (M^α by eigh) agree with the eigen-form sums to 1e-12."""
    generator = torch.Generator().manual_seed(16)
    d, r = 30, 12
    frame = torch.randn(d, r, generator=generator, dtype=DTYPE)
    frame[:, 0] = 1.0  # range(W) contains 𝟙, with the largest singular value: mean entries ≠ 0
    v = torch.linalg.qr(frame)[0]
    s = torch.rand(r, generator=generator, dtype=DTYPE) + 0.2
    s[0] = 2.0
    compressed = random_gram(r, generator) + 0.3
    m = s[:, None] * compressed * s[None, :]
    eigenvalues, eigenvectors = torch.linalg.eigh(m)
    nfm = v @ torch.diag(s**2) @ v.mT
    agop_power = v @ (eigenvectors * eigenvalues**alpha) @ eigenvectors.mT @ v.mT
    cosine, pearson = _nfa_correlations(s, v, compressed, alpha, d)
    assert cosine == pytest.approx(reference_cosine(nfm, agop_power), rel=1e-12)
    assert pearson == pytest.approx(reference_pearson(nfm, agop_power), rel=1e-12)
    assert abs(pearson - cosine) > 0.01


def test_metrics_leave_the_global_rng_alone():
    weight, gram = torch.randn(4, 5, dtype=DTYPE), torch.eye(4, dtype=DTYPE) + 0.1
    state = torch.get_rng_state()
    first = nfa_metrics(weight, gram)
    assert torch.equal(state, torch.get_rng_state())
    assert nfa_metrics(weight, gram) == first  # default null draws are reproducible


def test_float32_training_layer_end_to_end_metrics_are_finite(digits):
    model = digits_mlp().float()
    grams = preactivation_grams(model, digits.float(), None)
    assert all(g.dtype == torch.float64 for g in grams.values())
    metrics = nfa_metrics(model[2].weight, grams["2"], initial_weight=model[2].weight.detach() * 0.9)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert 1 / 32 <= metrics["sphericity"] <= 1


# --------------------------------------------------------------------------- #
# The d×d matrices and the readout layer
# --------------------------------------------------------------------------- #


def test_feature_matrices_are_the_nfm_and_the_agop_powers():
    generator = torch.Generator().manual_seed(20)
    weight = torch.randn(5, 8, generator=generator)  # float32, as a layer's weight
    gram = random_gram(5, generator)
    matrices = feature_matrices(weight, gram, alphas=[1.0, 0.5, 1.0])  # a repeated α is drawn once
    assert list(matrices) == ["nfm", "agop_a1", "agop_a0.5"]
    w = weight.double()
    reference_agop = w.mT @ gram @ w
    assert torch.allclose(matrices["nfm"], w.mT @ w, rtol=1e-12, atol=0)
    assert torch.allclose(matrices["agop_a1"], reference_agop, rtol=1e-12, atol=0)
    # AGOP^½ squared is AGOP (rank 5 of 8: the zero eigenvalues stay zero)
    root = matrices["agop_a0.5"]
    assert torch.allclose(root, root.mT, atol=1e-12)
    assert relative_error(root @ root, reference_agop) < 1e-10
    with pytest.raises(ValueError, match="alphas must be a non-empty list of positive finite floats"):
        feature_matrices(weight, gram, alphas=[])


def test_readout_from_grams_is_the_last_layer_whose_gram_is_a_multiple_of_the_identity():
    generator = torch.Generator().manual_seed(21)
    grams = {"a": 2.0 * torch.eye(4, dtype=DTYPE), "b": random_gram(4, generator), "c": 0.3 * torch.eye(3, dtype=DTYPE)}
    assert readout_from_grams(grams) == "c"
    assert readout_from_grams({"a": grams["a"], "b": grams["b"]}) == "a"
    perturbed = 0.3 * torch.eye(3, dtype=DTYPE)
    perturbed[0, 1] = perturbed[1, 0] = 1e-5  # ‖off-diagonal‖/‖G‖ ≈ 2.7e-5
    assert readout_from_grams({"c": perturbed}) is None
    assert readout_from_grams({"c": perturbed}, tolerance=1e-4) == "c"
    assert readout_from_grams({"one": torch.ones(1, 1, dtype=DTYPE), "zero": torch.zeros(3, 3, dtype=DTYPE)}) is None


def test_readout_from_outputs_finds_the_layer_whose_output_is_the_prediction():
    hidden, logits = torch.randn(4, 6), torch.randn(4, 3)
    assert readout_from_outputs({"h": hidden, "out": logits}, logits) == "out"
    assert readout_from_outputs({"h": hidden, "out": logits}, logits.view(4, 1, 3)) == "out"  # a view of it all
    assert readout_from_outputs({"h": hidden, "out": logits}, logits[:2]) is None  # a part is not the prediction
    assert readout_from_outputs({"h": hidden, "out": logits}, logits / 2) is None  # a new tensor
    assert readout_from_outputs({"h": hidden, "skipped": None}, hidden) == "h"


def test_eval_mode_yields_the_model(bn_model):
    with eval_mode(bn_model) as model:
        assert model is bn_model


def test_nfa_metrics_and_spectrum_takes_nfa_metrics_keywords_and_defaults():
    generator = torch.Generator().manual_seed(22)
    weight, gram = torch.randn(5, 7, generator=generator, dtype=DTYPE), random_gram(5, generator)
    metrics, _ = nfa_metrics_and_spectrum(weight, gram)
    assert metrics == nfa_metrics(weight, gram)  # the same defaults (two alphas, four null draws)
    with pytest.raises(TypeError, match="null_drws"):
        nfa_metrics_and_spectrum(weight, gram, null_drws=2)
    with pytest.raises(ValueError, match="each of alphas must be a positive finite float"):
        nfa_metrics(weight, gram, alphas=[1.0, 0.0])


def test_heatmap_panels_colour_each_entry_by_its_sign_and_its_panels_scale():
    from learnscope.render import heatmap_panels

    matrix = torch.tensor([[2.0, -2.0], [0.0, 1.0]])
    image = heatmap_panels([matrix, 3 * torch.eye(4)], min_panel_pixels=4, gap=1)
    assert image.shape == (3, 4, 2 * 2 + 1 + 4)  # the 2×2 matrix enlarged twice, one grey column
    assert image[:, 0, 0].tolist() == [1.0, 0.0, 0.0]  # the largest positive entry: red
    assert image[:, 1, 3].tolist() == [0.0, 0.0, 1.0]  # the largest negative entry: blue
    assert image[:, 2, 1].tolist() == [1.0, 1.0, 1.0]  # zero: white
    assert image[:, 3, 3].tolist() == [1.0, 0.5, 0.5]  # half the panel's scale: light red
    assert (image[:, :, 4] == 0.5).all()
    assert image[:, 0, 5].tolist() == [1.0, 0.0, 0.0] and image[:, 0, 6].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("first", ["learnscope._probe", "learnscope.functional.nfa"])
def test_the_nfa_core_imports_in_either_order_without_lightning(first):
    # functional.nfa uses learnscope._probe, which imports learnscope.functional: no cycle may break
    import subprocess
    import sys

    code = (
        f"import importlib, sys; importlib.import_module({first!r}); "
        "from learnscope.functional.nfa import eval_mode; from learnscope.functional import nfa_metrics; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
