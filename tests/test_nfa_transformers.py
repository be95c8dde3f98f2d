"""The NFA on transformer layers: Hugging Face Conv1D (GPT-2), nn.MultiheadAttention's
q/k/v/out_proj maps, per-token Linear layers (BERT, a ViT-style packed qkv), and the
callback on GPT-2, nn.TransformerEncoder and Lightning's demo Transformer.

Every G is checked against an independent ``torch.func.jacrev`` AGOP of the map's
own input (BRIEF 3.2, the local AGOP): a separate copy of that input is substituted
into that one map only, and the model output of each sample is differentiated with
respect to it, all tokens at once; AGOP = (1/n) Σ_x Σ_outputs Σ_tokens ∇_h f ∇_h fᵀ.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.demos import Transformer as DemoTransformer
from torch import nn
from torch.func import jacrev
from torch.utils.data import DataLoader, Dataset, TensorDataset

from learnscope import ProbeError
from learnscope.callbacks.nfa import NeuralFeatureAnsatz, default_input_fn
from learnscope.functional.nfa import agop, preactivation_grams
from learnscope.layers import attention_forward, default_layers, select_layers
from models import MemoryLogger, assert_bitwise_equal, state_of, trainer

transformers = pytest.importorskip("transformers")

DTYPE = torch.float64


def relative_error(measured: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(measured - expected) / torch.linalg.matrix_norm(expected))


def local_agop(samples: int, layer_input: Callable[[int], torch.Tensor], output_with: Callable) -> torch.Tensor:
    """(1/n) Σ_x JᵀJ, J the Jacobian of sample x's output with respect to the map's input h
    (all of the sample's tokens; the rows of J run over outputs and token positions).

    ``layer_input(i)``: the map's input on sample i (…, d); ``output_with(i, h)``: sample i's
    model output with h substituted into that one map only.
    """
    total = None
    for i in range(samples):
        h = layer_input(i).detach()
        jacobian = jacrev(lambda free, i=i: output_with(i, free))(h).detach()
        rows = jacobian.reshape(-1, h.shape[-1])
        total = rows.mT @ rows if total is None else total + rows.mT @ rows
    return total / samples


def recorded_input(model_call: Callable[[], Any], module: nn.Module) -> torch.Tensor:
    record: dict[str, torch.Tensor] = {}

    # (not under no_grad: an eval-mode TransformerEncoderLayer would take its fused fast path)
    def hook(module, args, output):
        record.setdefault("h", args[0].detach())

    handle = module.register_forward_hook(hook)
    try:
        model_call()
    finally:
        handle.remove()
    return record["h"]


def substituted(module: nn.Module, free: torch.Tensor):
    """A hook making ``module`` (a Linear-like map) compute its output from ``free``."""
    return module.register_forward_hook(lambda m, args, out: type(m).forward(m, free))


def module_agop_errors(
    model_call: Callable[[int], Any], output_of: Callable[[Any], torch.Tensor], samples: int, grams, layers
) -> dict[str, float]:
    """Relative error of agop(W_flat, G) against the jacrev local AGOP, for whole-module maps."""
    errors = {}
    for name, layer in layers.items():
        module = layer.module

        def output_with(i, free, module=module):
            handle = substituted(module, free)
            try:
                return output_of(model_call(i))
            finally:
                handle.remove()

        expected = local_agop(
            samples, lambda i, module=module: recorded_input(lambda: model_call(i), module), output_with
        )
        errors[name] = relative_error(agop(layer.weight_flat().to(DTYPE), grams[name]), expected)
    return errors


# --------------------------------------------------------------------------- #
# Hugging Face GPT-2: Conv1D, weight stored [in, out]
# --------------------------------------------------------------------------- #


def tiny_gpt2(vocab: int = 24, width: int = 16) -> nn.Module:
    config = transformers.GPT2Config(n_layer=2, n_embd=width, n_head=2, vocab_size=vocab, n_positions=16)
    config.bos_token_id = config.eos_token_id = 0
    return transformers.GPT2LMHeadModel(config)


def test_gpt2_conv1d_layers_are_measured_and_exact_against_jacrev():
    torch.manual_seed(0)
    model = tiny_gpt2().to(DTYPE).eval()
    ids = torch.randint(0, 24, (3, 5))
    layers = default_layers(model)
    blocks = [
        f"transformer.h.{b}.{m}" for b in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert list(layers) == blocks + ["lm_head"]
    assert layers["transformer.h.0.attn.c_attn"].weight_flat().shape == (48, 16)  # k = weight.shape[1]
    grams = preactivation_grams(model, {"input_ids": ids}, layers, output_fn=lambda out: out.logits, estimator="exact")
    errors = module_agop_errors(lambda i: model(input_ids=ids[i : i + 1]), lambda out: out.logits, 3, grams, layers)
    assert max(errors.values()) < 1e-6, errors


# --------------------------------------------------------------------------- #
# nn.MultiheadAttention: the explicit forward, then q/k/v/out_proj exactness
# --------------------------------------------------------------------------- #


def _masks(batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    causal = nn.Transformer.generate_square_subsequent_mask(length, dtype=torch.float32)
    padding = torch.zeros(batch, length, dtype=torch.bool)
    padding[0, -2:] = True
    return causal, padding


@pytest.mark.parametrize(
    "options",
    [{}, {"need_weights": False}, {"key_padding_mask": True}, {"key_padding_mask": True, "need_weights": False}],
    ids=["weights", "no-weights", "padding", "padding-no-weights"],
)
def test_explicit_attention_matches_the_fast_path(monkeypatch, options):
    calls = []
    native = torch._native_multi_head_attention
    monkeypatch.setattr(torch, "_native_multi_head_attention", lambda *a, **k: calls.append(1) or native(*a, **k))
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(4, 7, 16)
    kwargs = dict(options)
    if kwargs.pop("key_padding_mask", False):
        kwargs["key_padding_mask"] = _masks(4, 7)[1]
    with torch.no_grad():
        expected = mha(x, x, x, **kwargs)
        measured = attention_forward(mha, x, x, x, **kwargs)
    assert calls == [1]  # the module took its fused fast path
    assert (measured[0] - expected[0]).abs().max() <= 1e-6
    if expected[1] is None:
        assert measured[1] is None
    else:
        assert measured[1].shape == expected[1].shape and (measured[1] - expected[1]).abs().max() <= 1e-6


SLOW_CASES = {
    "seq-first causal": (dict(batch_first=False), dict(attn_mask="causal", is_causal=True, need_weights=False)),
    "bool mask padding per-head weights": (
        dict(batch_first=True),
        dict(attn_mask="bool", key_padding_mask=True, average_attn_weights=False),
    ),
    "3-D mask": (dict(batch_first=True), dict(attn_mask="3d")),
    "cross-attention kdim vdim": (dict(batch_first=True, kdim=5, vdim=3), dict(key_padding_mask=True)),
    "no bias, unbatched": (dict(batch_first=True, bias=False), dict(unbatched=True, attn_mask="causal")),
    "odd heads": (dict(num_heads=1, batch_first=True), dict(need_weights=False, key_padding_mask=True)),
}


@pytest.mark.parametrize("case", list(SLOW_CASES))
def test_explicit_attention_matches_the_slow_path(case):
    module_options, call_options = (dict(d) for d in SLOW_CASES[case])
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(8, module_options.pop("num_heads", 2), **module_options).eval()
    n, length, source = 3, 5, 5
    query = torch.randn(n, length, 8, requires_grad=True)  # requires grad: the slow path
    key = torch.randn(n, source, mha.kdim) if mha.kdim != 8 else query
    value = torch.randn(n, source, mha.vdim) if mha.vdim != 8 else query
    causal, padding = _masks(n, length)
    if call_options.pop("unbatched", False):
        query, key, value = query[0], key[0], value[0]
    elif not mha.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    mask = call_options.pop("attn_mask", None)
    if mask is not None:
        call_options["attn_mask"] = {
            "causal": causal,
            "bool": causal < 0,
            "3d": torch.randn(n * mha.num_heads, length, source),
        }[mask]
    if call_options.pop("key_padding_mask", False):
        call_options["key_padding_mask"] = padding
    expected = mha(query, key, value, **call_options)
    measured = attention_forward(mha, query, key, value, **call_options)
    assert measured[0].shape == expected[0].shape
    assert (measured[0] - expected[0]).abs().max() <= 1e-6
    if expected[1] is None:
        assert measured[1] is None
    else:
        assert measured[1].shape == expected[1].shape and (measured[1] - expected[1]).abs().max() <= 1e-6


class EncoderClassifier(nn.Module):
    """One TransformerEncoderLayer and a per-token head; inputs and outputs (n, T, ·) always."""

    def __init__(self, batch_first: bool, width: int = 8, classes: int = 3):
        super().__init__()
        self.batch_first = batch_first
        self.encoder = nn.TransformerEncoderLayer(width, 2, 16, dropout=0.1, batch_first=batch_first)
        self.head = nn.Linear(width, classes)

    def forward(self, x, mask=None, padding=None, causal=False):
        x = x if self.batch_first else x.transpose(0, 1)
        x = self.encoder(x, src_mask=mask, src_key_padding_mask=padding, is_causal=causal)
        x = x if self.batch_first else x.transpose(0, 1)
        return self.head(x)


def _reference_attention_agop(model: EncoderClassifier, part: str, call: Callable[[int], torch.Tensor], samples: int):
    """The local AGOP of one attention map, computed with torch's own
    F.multi_head_attention_forward: ``query``/``key``/``value`` replaced by the free copy
    for q/k/v (the other two maps keep the shared input), the concatenated heads
    (out_proj with the identity) for out_proj."""
    mha = model.encoder.self_attn
    E = mha.embed_dim

    def torch_attention(query, key, value, kwargs, out_weight=None, out_bias=None):
        if mha.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out, _ = F.multi_head_attention_forward(
            query,
            key,
            value,
            E,
            mha.num_heads,
            mha.in_proj_weight,
            mha.in_proj_bias,
            None,
            None,
            False,
            0.0,
            mha.out_proj.weight if out_weight is None else out_weight,
            mha.out_proj.bias if out_bias is None else out_bias,
            training=False,
            key_padding_mask=kwargs.get("key_padding_mask"),
            need_weights=kwargs.get("need_weights", True),
            attn_mask=kwargs.get("attn_mask"),
            is_causal=kwargs.get("is_causal", False),
        )
        return out.transpose(0, 1) if mha.batch_first else out

    state: dict[str, Any] = {}

    def hook(module, args, kwargs, output):
        query = args[0]
        if "free" not in state:  # recording: the map's input
            if part == "out_proj":
                identity = torch.eye(E, dtype=query.dtype)
                state["input"] = torch_attention(
                    query, query, query, kwargs, identity, torch.zeros(E, dtype=query.dtype)
                )
            else:
                state["input"] = query
            return None
        free = state["free"]
        if part == "out_proj":
            return F.linear(free, mha.out_proj.weight, mha.out_proj.bias), None
        q, k, v = (free if p == part else query for p in ("q", "k", "v"))
        return torch_attention(q, k, v, kwargs), None

    handle = mha.register_forward_hook(hook, with_kwargs=True)
    try:

        def layer_input(i):
            state.pop("free", None)
            call(i)  # with grad: no fused fast path
            return state["input"].detach()

        def output_with(i, free):
            state["free"] = free
            try:
                return call(i)
            finally:
                state.pop("free")

        return local_agop(samples, layer_input, output_with)
    finally:
        handle.remove()


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "sequence-first"])
@pytest.mark.parametrize("padding", [False, True], ids=["causal", "causal+padding"])
def test_attention_maps_in_an_encoder_layer_are_exact_against_jacrev(batch_first, padding):
    torch.manual_seed(3)
    model = EncoderClassifier(batch_first).to(DTYPE).eval()
    x = torch.randn(3, 5, 8, dtype=DTYPE)
    mask, key_padding = _masks(3, 5)
    mask = mask.to(DTYPE)
    key_padding = key_padding if padding else None

    def call(i):
        return model(x[i : i + 1], mask, None if key_padding is None else key_padding[i : i + 1], causal=True)

    layers = default_layers(model)
    attention = [f"encoder.self_attn.{p}" for p in ("q", "k", "v", "out_proj")]
    assert list(layers) == attention + ["encoder.linear1", "encoder.linear2", "head"]
    grams = preactivation_grams(model, (x, mask, key_padding, True), layers)
    assert "forward" not in model.encoder.self_attn.__dict__  # the module's own forward is back
    errors = {}
    for name in attention:
        expected = _reference_attention_agop(model, name.rsplit(".", 1)[1], call, 3)
        errors[name] = relative_error(agop(layers[name].weight_flat(), grams[name]), expected)
    plain = {name: layers[name] for name in ("encoder.linear1", "encoder.linear2", "head")}
    errors.update(module_agop_errors(call, lambda out: out, 3, grams, plain))
    assert max(errors.values()) < 1e-6, errors


def test_attention_maps_read_their_blocks_of_the_packed_and_separate_weights():
    packed = nn.MultiheadAttention(6, 2)
    maps = default_layers(nn.ModuleDict({"attn": packed}))
    for index, part in enumerate("qkv"):
        assert torch.equal(maps[f"attn.{part}"].weight_flat(), packed.in_proj_weight[6 * index : 6 * (index + 1)])
    assert torch.equal(maps["attn.out_proj"].weight_flat(), packed.out_proj.weight)
    separate = nn.MultiheadAttention(6, 2, kdim=4, vdim=3)
    maps = default_layers(nn.ModuleDict({"attn": separate}))
    assert [maps[f"attn.{p}"].weight_flat().shape for p in "qkv"] == [(6, 6), (6, 4), (6, 3)]
    assert torch.equal(maps["attn.k"].weight_flat(), separate.k_proj_weight)


def test_cross_attention_key_and_value_maps_are_per_source_token():
    torch.manual_seed(4)
    mha = nn.MultiheadAttention(6, 2, batch_first=True).to(DTYPE).eval()

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, target, memory):
            return self.attn(target, memory, memory, need_weights=False)[0]

    model = Cross()
    target, memory = torch.randn(2, 3, 6, dtype=DTYPE), torch.randn(2, 7, 6, dtype=DTYPE)
    grams = preactivation_grams(model, (target, memory), None)
    for index, part in ((1, "k"), (2, "v")):

        def output_with(i, free, part=part):
            # torch's own forward, the free copy as this map's input only (key is not value)
            key = free if part == "k" else memory[i : i + 1]
            value = free if part == "v" else memory[i : i + 1]
            return mha(target[i : i + 1], key, value, need_weights=False)[0]

        expected = local_agop(2, lambda i: memory[i : i + 1], output_with)
        weight = mha.in_proj_weight[6 * index : 6 * (index + 1)].detach()
        assert relative_error(agop(weight, grams[f"attn.{part}"]), expected) < 1e-6


def test_an_instance_forward_of_the_attention_module_is_put_back_after_measuring():
    model = EncoderClassifier(batch_first=True).eval()
    attention = model.encoder.self_attn
    own_forward = attention.forward  # a bound method stored on the instance, as some wrappers do
    attention.forward = own_forward
    preactivation_grams(model, torch.randn(2, 4, 8), None)
    assert attention.__dict__["forward"] is own_forward


def test_attention_with_bias_kv_is_skipped_with_its_reason_and_its_out_proj_is_not_measured_alone():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(4, 2, add_bias_kv=True), "head": nn.Linear(4, 2)})
    with pytest.warns(UserWarning, match=r"attn \(MultiheadAttention: add_bias_kv=True is not supported\)"):
        layers = default_layers(model)
    assert list(layers) == ["head"]

    class Rotated(nn.MultiheadAttention):
        def forward(self, query, key, value, **kwargs):
            return super().forward(query.flip(-1), key, value, **kwargs)

    model = nn.ModuleDict({"attn": Rotated(4, 2), "head": nn.Linear(4, 2)})
    with pytest.warns(UserWarning, match=r"attn \(Rotated: Rotated overrides forward\(\)"):
        assert list(default_layers(model)) == ["head"]


def test_patterns_select_single_attention_maps_or_all_four_by_the_module_name():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), num_layers=2, enable_nested_tensor=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(select_layers(model, ["layers.1.self_attn.q", "*.0.self_attn.out_proj"])) == [
            "layers.0.self_attn.out_proj",
            "layers.1.self_attn.q",
        ]
        assert list(select_layers(model, ["layers.0.self_attn"])) == [
            f"layers.0.self_attn.{p}" for p in ("q", "k", "v", "out_proj")
        ]


# --------------------------------------------------------------------------- #
# Per-token Linear layers: BERT, a ViT-style packed qkv
# --------------------------------------------------------------------------- #


def test_bert_query_key_value_and_dense_are_exact_against_jacrev():
    torch.manual_seed(5)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100
    )
    model = transformers.BertModel(config, add_pooling_layer=False).to(DTYPE).eval()
    ids = torch.randint(0, 100, (3, 6))
    attention_mask = torch.ones(3, 6, dtype=torch.long)
    attention_mask[0, -2:] = 0
    patterns = ["*.query", "*.key", "*.value", "*.dense"]
    layers = select_layers(model, patterns)
    prefix = "encoder.layer.0."
    assert list(layers) == [
        prefix + name
        for name in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    ]

    def output_of(out):
        return out.last_hidden_state

    grams = preactivation_grams(
        model, {"input_ids": ids, "attention_mask": attention_mask}, layers, output_fn=output_of
    )
    errors = module_agop_errors(
        lambda i: model(input_ids=ids[i : i + 1], attention_mask=attention_mask[i : i + 1]), output_of, 3, grams, layers
    )
    assert max(errors.values()) < 1e-6, errors


class PackedQKVBlock(nn.Module):
    """A ViT-style block: one Linear(d, 3d) giving q, k, v for every head, then proj."""

    def __init__(self, width=8, heads=2, classes=3):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        n, T, d = x.shape
        q, k, v = self.qkv(x).reshape(n, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attention = torch.softmax(q @ k.mT / math.sqrt(d // self.heads), dim=-1)
        x = x + self.proj((attention @ v).transpose(1, 2).reshape(n, T, d))
        return self.head(x)


def test_vit_style_packed_qkv_linear_is_exact_against_jacrev():
    torch.manual_seed(6)
    model = PackedQKVBlock().to(DTYPE).eval()
    x = torch.randn(3, 5, 8, dtype=DTYPE)
    layers = default_layers(model)
    grams = preactivation_grams(model, x, layers)
    errors = module_agop_errors(lambda i: model(x[i : i + 1]), lambda out: out, 3, grams, layers)
    assert max(errors.values()) < 1e-6, errors


# --------------------------------------------------------------------------- #
# Layer selection messages
# --------------------------------------------------------------------------- #


def test_patterns_matching_only_unmeasurable_modules_say_so_once_with_the_reason():
    model = tiny_gpt2()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = select_layers(model, ["transformer.ln_f"])
    assert layers == {} and len(caught) == 1
    message = str(caught[0].message)
    assert (
        "match only modules that cannot be measured: transformer.ln_f (LayerNorm: no handler for LayerNorm)" in message
    )
    assert "lm_head" in message  # the measurable names follow
    assert "selected no supported layer" not in message


def test_the_callback_adds_no_second_message_when_patterns_select_nothing():
    module = GPT2Module()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        NeuralFeatureAnsatz(layers=["model.transformer.ln_f"]).setup(None, module, "fit")
    messages = [str(w.message) for w in caught if "layers" in str(w.message) or "measur" in str(w.message)]
    assert len(messages) == 1 and "match only modules that cannot be measured" in messages[0], messages


def test_patterns_matching_nothing_list_the_measurable_names_truncated():
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(30)])
    with pytest.warns(UserWarning, match=r"match no measurable layer.*: 0, 1, 2, .*19, \.\.\. \(30 in all\)"):
        assert select_layers(model, ["decoder.*"]) == {}


def test_gpt2_blocks_by_pattern_measure_the_conv1d_layers():
    model = tiny_gpt2()
    with pytest.warns(
        UserWarning, match="skipping matched modules that cannot be measured: transformer.h.0.ln_1"
    ) as record:
        layers = select_layers(model, ["transformer.h.*"])
    assert len(layers) == 8 and all(name.startswith("transformer.h.") for name in layers)
    assert not any("nothing" in str(w.message).lower() for w in record)


# --------------------------------------------------------------------------- #
# The default input_fn and forward(inputs, target)
# --------------------------------------------------------------------------- #


def test_default_input_fn_passes_as_many_batch_elements_as_forward_requires():
    a, b, c = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)
    assert default_input_fn((a, b, c), ["inputs", "target"]) == (a, b)
    assert default_input_fn((a, b), ["x"]) is a
    assert default_input_fn({"x": a, "target": b, "y": c}, ["x", "target"]) == {"x": a, "target": b}
    with pytest.raises(
        ProbeError, match=r"forward\(inputs, target\).*\['target'\].*input_fn=lambda batch: \(batch\[0\], batch\[1\]\)"
    ):
        default_input_fn(a, ["inputs", "target"])
    with pytest.raises(ProbeError, match=r"tuple of 1 elements.*\['target'\]"):
        default_input_fn((a,), ["inputs", "target"])


# --------------------------------------------------------------------------- #
# The callback
# --------------------------------------------------------------------------- #


class TokenData(Dataset):
    """Random token sequences; as dicts (input_ids, labels) or tuples (inputs, target)."""

    def __init__(self, vocab: int, n: int = 24, length: int = 6, as_dict: bool = True):
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, vocab, (n, length + 1), generator=generator)
        self.as_dict = as_dict

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        inputs, target = self.tokens[i, :-1], self.tokens[i, 1:]
        return {"input_ids": inputs, "labels": target} if self.as_dict else (inputs, target)


class GPT2Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1000)
        config.bos_token_id = config.eos_token_id = 0
        self.model = transformers.GPT2LMHeadModel(config)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"])
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def _fit(module_factory, data, callbacks, steps=4):
    torch.manual_seed(0)
    module = module_factory()
    logger = MemoryLogger()
    run = trainer(callbacks=callbacks, loggers=[logger], max_steps=steps)
    run.fit(module, DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)))
    return module, run, logger


def _nfa(**options):
    defaults = dict(every_n_steps=2, probe_size=8, probe_batch_size=4, num_probes=2, null_draws=1, images=False)
    defaults.update(options)
    return NeuralFeatureAnsatz(**defaults)


def test_callback_on_gpt2_measures_the_conv1d_layers_and_lm_head_and_training_is_unchanged():
    data = TokenData(1000)
    plain, plain_run, _ = _fit(GPT2Module, data, [])
    nfa = _nfa()
    measured, run, logger = _fit(GPT2Module, data, [nfa])
    assert_bitwise_equal(state_of(plain, plain_run.optimizers[0]), state_of(measured, run.optimizers[0]))
    blocks = [
        f"model.transformer.h.{b}.{m}"
        for b in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert list(nfa.last_record.metrics) == blocks + ["model.lm_head"]
    assert nfa.readout == "model.lm_head"
    for name in blocks:
        assert set(logger.series[f"nfa/{name}/pearson_a1"]) == {0, 2, 4}
    # weight_change against W₀ = c_attn.weightᵀ at initialisation
    initial = GPT2Module().model.transformer.h[0].attn.c_attn.weight.detach().mT
    final = measured.model.transformer.h[0].attn.c_attn.weight.detach().mT
    expected = float(torch.linalg.matrix_norm(final - initial) / torch.linalg.matrix_norm(final))
    assert logger.series["nfa/model.transformer.h.0.attn.c_attn/weight_change"][4] == pytest.approx(expected, rel=1e-5)


class EncoderModule(pl.LightningModule):
    def __init__(self, vocab=20, width=16):
        super().__init__()
        torch.manual_seed(0)
        self.embedding = nn.Embedding(vocab, width)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(width, 2, 32, batch_first=True), num_layers=1)
        self.head = nn.Linear(width, vocab)

    def forward(self, x):
        return self.head(self.encoder(self.embedding(x)))

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        return F.cross_entropy(self(inputs).flatten(0, 1), target.flatten())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_on_a_transformer_encoder_logs_the_attention_maps_and_training_is_unchanged():
    data = TokenData(20, as_dict=False)
    plain, plain_run, _ = _fit(EncoderModule, data, [])
    nfa = _nfa()
    measured, run, logger = _fit(EncoderModule, data, [nfa])
    assert_bitwise_equal(state_of(plain, plain_run.optimizers[0]), state_of(measured, run.optimizers[0]))
    attention = [f"encoder.layers.0.self_attn.{p}" for p in ("q", "k", "v", "out_proj")]
    assert list(nfa.last_record.metrics) == attention + ["encoder.layers.0.linear1", "encoder.layers.0.linear2", "head"]
    for name in attention:
        assert set(logger.series[f"nfa/{name}/pearson_a0.5"]) == {0, 2, 4}
    # W₀ of q is the first block of in_proj_weight at initialisation
    initial = EncoderModule().encoder.layers[0].self_attn.in_proj_weight.detach()[:16]
    final = measured.encoder.layers[0].self_attn.in_proj_weight.detach()[:16]
    expected = float(torch.linalg.matrix_norm(final - initial) / torch.linalg.matrix_norm(final))
    assert logger.series["nfa/encoder.layers.0.self_attn.q/weight_change"][4] == pytest.approx(expected, rel=1e-5)
    assert "forward" not in measured.encoder.layers[0].self_attn.__dict__


class DemoTransformerModule(pl.LightningModule):
    """Lightning's demo Transformer (nn.Transformer inside), forward(inputs, target)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = DemoTransformer(vocab_size=30, ninp=16, nhead=2, nhid=32, nlayers=1, dropout=0.1)

    def forward(self, inputs, target):
        return self.model(inputs, target)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        return F.nll_loss(self(inputs, target), target.view(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_on_the_demo_transformer_passes_inputs_and_target_by_default():
    data = TokenData(30, as_dict=False)
    plain, plain_run, _ = _fit(DemoTransformerModule, data, [], steps=2)
    # its output is (n·T, vocab): rows are tokens, so give the per-sample (n, T, vocab) view
    nfa = _nfa(every_n_steps=1, output_fn=lambda out: out.view(-1, 6, 30))
    measured, run, logger = _fit(DemoTransformerModule, data, [nfa], steps=2)
    assert_bitwise_equal(state_of(plain, plain_run.optimizers[0]), state_of(measured, run.optimizers[0]))
    names = list(nfa.last_record.metrics)
    for attention in (
        "transformer.encoder.layers.0.self_attn",
        "transformer.decoder.layers.0.self_attn",
        "transformer.decoder.layers.0.multihead_attn",
    ):
        for part in ("q", "k", "v", "out_proj"):
            assert f"model.{attention}.{part}" in names
            assert set(logger.series[f"nfa/model.{attention}.{part}/pearson_a0.5"]) == {0, 1, 2}
    assert "model.decoder" in names


class _TwoArgumentsTensorBatch(DemoTransformerModule):
    def training_step(self, batch, batch_idx):
        return F.nll_loss(self(batch, batch), batch.view(-1))


def test_a_batch_without_the_second_argument_fails_naming_the_input_fn_to_pass():
    tokens = TensorDataset(torch.randint(0, 30, (8, 6)))
    loader = DataLoader(tokens, batch_size=4, collate_fn=lambda rows: torch.stack([r[0] for r in rows]))
    run = trainer(callbacks=[_nfa()], max_steps=1)
    with pytest.raises(
        ProbeError, match=r"forward\(inputs, target\).*\['target'\].*input_fn=lambda batch: \(batch\[0\], batch\[1\]\)"
    ):
        run.fit(_TwoArgumentsTensorBatch(), loader)
