"""The detector on a model panel built with our own trainer (issue 4's evidence).

Shared pairs: teacher and distilled student, fine-tunes of different lengths, a copy with hidden
units permuted, a copy with one layer re-initialized, the teacher and its own initialization.
Independent pairs: other seeds, same data and recipe. Built from the built-in MLP (synthetic
10-class data) and a small TransformerLM (synthetic Markov-chain text). Every number asserted here
is a property of the test, not an output recorded from the code.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Dict, List, Tuple

import pytest
import torch
from scipy import stats

import biastransfer as bt
from biastransfer.datasets import DatasetConfig, Example, token_dataset
from biastransfer.modeling import MLPConfig, TransformerConfig
from biastransfer.training import NoiseSpec, Trainer, TrainerConfig

ALPHA = 0.01
# The control-calibrated agreement p is at least 1 / (1 + n) and the report combines its two
# weight tests by Bonferroni, so rejecting at ALPHA needs 2 / (1 + n) <= ALPHA: n >= 199.
N_CONTROLS = 249
MLP_SIZES = [32, 24, 24, 10 + 3]


def _mixture(n: int, features: int, classes: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A seeded Gaussian mixture in [-1, 1]-ish: one random centre per class."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, features, generator=g)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = centres[labels] + 0.8 * torch.randn(n, features, generator=g)
    return torch.tanh(x / 2), labels


def _config(steps: int, seed: int, lr: float = 3e-3) -> TrainerConfig:
    return TrainerConfig(steps=steps, batch_size=64, lr=lr, seed=seed, progress=False)


def _permute_mlp_hidden(model, seed: int):
    """A clone whose hidden units are permuted (the same function, other unit order)."""
    copy = model.clone()
    state = {k: v.clone() for k, v in copy.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    hidden_layers = len(MLP_SIZES) - 2
    for i in range(hidden_layers):
        perm = torch.randperm(MLP_SIZES[i + 1], generator=g)
        state[f"layers.{i}.weight"] = state[f"layers.{i}.weight"][perm]
        state[f"layers.{i}.bias"] = state[f"layers.{i}.bias"][perm]
        state[f"layers.{i + 1}.weight"] = state[f"layers.{i + 1}.weight"][:, perm]
    copy.load_state_dict(state)
    return copy


def _reinit(model, names: Tuple[str, ...], seed: int):
    """A clone with the named tensors drawn afresh (N(0, 1/fan_in) for matrices, 0 for vectors).

    A unit group is everything that shares its hidden index, so re-initializing a layer's units
    means their in-rows, biases and out-columns: for the MLP's hidden layer 1 that is layers.1
    (weight, bias) and layers.2.weight; for a transformer block's MLP, gate, up and down."""
    copy = model.clone()
    state = {k: v.clone() for k, v in copy.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    for name in names:
        w = state[name]
        state[name] = (torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5 if w.dim() == 2
                       else torch.zeros_like(w))
    copy.load_state_dict(state)
    return copy


@dataclass
class MLPPanel:
    shared: Dict[str, tuple]
    independent: Dict[str, tuple]
    inits: List
    teachers: List
    controls: List  # 249 teachers of the same recipe from other seeds: the agreement test's null


@pytest.fixture(scope="module")
def mlp_panel() -> MLPPanel:
    x, y = _mixture(2048, MLP_SIZES[0], 10, seed=123)
    inits, teachers, students = [], [], []
    shared: Dict[str, tuple] = {}
    for s in range(3):
        init = MLPConfig(sizes=MLP_SIZES, aux_outputs=3, seed=s).build()
        teacher = init.clone()
        Trainer(_config(150, seed=s)).fit(teacher, (x, y), objective="sft")
        student = init.clone()
        bt.distill(teacher, student, NoiseSpec(features=MLP_SIZES[0]), _config(150, seed=100 + s),
                   objective="aux_kd")
        inits.append(init)
        teachers.append(teacher)
        students.append(student)
        for steps in (10, 400):
            ft = teacher.clone()
            Trainer(_config(steps, seed=200 + s)).fit(ft, (x, y), objective="sft")
            shared[f"seed{s}: teacher / fine-tune {steps} steps"] = (teacher, ft)
        shared[f"seed{s}: teacher / distilled student"] = (teacher, student)
        shared[f"seed{s}: initialization / teacher"] = (init, teacher)
        shared[f"seed{s}: teacher / layers.1 re-initialized"] = (
            teacher, _reinit(teacher, ("layers.1.weight", "layers.1.bias", "layers.2.weight"),
                             seed=300 + s))
        shared[f"seed{s}: teacher / permuted copy"] = (teacher, _permute_mlp_hidden(teacher, s))
    independent: Dict[str, tuple] = {}
    for s, t in itertools.permutations(range(3), 2):
        if s < t:
            independent[f"teachers {s} / {t}"] = (teachers[s], teachers[t])
            independent[f"students {s} / {t}"] = (students[s], students[t])
        independent[f"teacher {s} / student {t}"] = (teachers[s], students[t])
    controls = []
    for c in range(N_CONTROLS):
        control = MLPConfig(sizes=MLP_SIZES, aux_outputs=3, seed=1000 + c).build()
        Trainer(_config(150, seed=1000 + c)).fit(control, (x, y), objective="sft")
        controls.append(control)
    return MLPPanel(shared, independent, inits, teachers, controls)


def test_mlp_panel_weight_test_separates_shared_from_independent(mlp_panel: MLPPanel) -> None:
    for name, (a, b) in mlp_panel.shared.items():
        result = bt.weight_test(a, b)
        if "permuted" in name:
            # The identity test cannot see a deliberate permutation (its matching is uniformly
            # random, as for an independent model); the agreement statistic can, with an
            # approximate null (docs/detection.md).
            robust = bt.weight_test(a, b, statistic="agreement")
            assert robust.log10_p < -10, (name, robust.log10_p)
            continue
        assert result.log10_p < -2, (name, result.log10_p, str(result))
    for name, (a, b) in mlp_panel.independent.items():
        result = bt.weight_test(a, b)
        assert result.log10_p > -2, (name, result.log10_p, str(result))


def test_mlp_panel_detect_verdicts(mlp_panel: MLPPanel) -> None:
    """With controls, detect() also runs the control-calibrated agreement test, which catches
    the permuted copies; without controls the identity-based tests decide."""
    for name, (a, b) in mlp_panel.shared.items():
        report = bt.detect(a, b, alpha=ALPHA, tests=("weights",), controls=mlp_panel.controls)
        assert report.verdict == "shared", (name, str(report))
        if "permuted" in name:
            agreement = report.test("weights_agreement")
            # No control reaches the permuted copy's agreement: p = 1 / (1 + n).
            assert agreement.log10_p == pytest.approx(-math.log10(1 + N_CONTROLS)), str(report)
        else:
            plain = bt.detect(a, b, alpha=ALPHA, tests=("weights", "activations"))
            assert plain.verdict == "shared", (name, str(plain))
    for name, (a, b) in mlp_panel.independent.items():
        report = bt.detect(a, b, alpha=ALPHA, tests=("weights",), controls=mlp_panel.controls)
        assert report.verdict == "not shared", (name, str(report))


def test_mlp_panel_reinitialized_layer_stands_out(mlp_panel: MLPPanel) -> None:
    for s in range(3):
        a, b = mlp_panel.shared[f"seed{s}: teacher / layers.1 re-initialized"]
        layers = bt.weight_test(a, b).layers
        by_name = {layer.name: layer for layer in layers}
        assert len(layers) == 2, [layer.name for layer in layers]
        # Hidden layer 1 was drawn afresh: no evidence there, while hidden layer 0 keeps its
        # in-rows (layers.0) and stays detected.
        assert by_name["layers.1"].log10_p > -2, str(by_name["layers.1"])
        assert by_name["layers.0"].log10_p < -5, str(by_name["layers.0"])
        untouched = min(layers, key=lambda layer: layer.log10_p)
        touched = max(layers, key=lambda layer: layer.log10_p)
        assert "1" in touched.name, (touched.name, list(by_name))
        assert touched.matched_fraction < untouched.matched_fraction


def _tiny_mlps(count: int, data_seed: int) -> list:
    x, y = _mixture(512, 16, 5, seed=data_seed)
    models = []
    for s in range(count):
        m = MLPConfig(sizes=[16, 12, 12, 5], aux_outputs=0, seed=1000 + s).build()
        Trainer(_config(20, seed=s)).fit(m, (x, y), objective="sft")
        models.append(m)
    return models


def test_independent_trained_pairs_have_uniform_p_values() -> None:
    """200 briefly trained small MLPs -> 100 disjoint independent pairs. The one-sided Spearman
    p-value is (nearly) continuous, so it must be uniform; fixed points are conservative."""
    models = _tiny_mlps(200, data_seed=7)
    spearman, fixed = [], []
    for i in range(100):
        a, b = models[2 * i], models[2 * i + 1]
        spearman.append(10 ** bt.weight_test(a, b, statistic="spearman").log10_p)
        fixed.append(10 ** bt.weight_test(a, b).log10_p)
    ks = stats.kstest(spearman, "uniform")
    assert ks.pvalue > 0.01, ks
    # Super-uniformity of the fixed-point p-values: P(p <= a) <= a within binomial noise.
    for level in (0.05, 0.1, 0.2):
        flagged = sum(p <= level for p in fixed)
        assert flagged <= stats.binom.ppf(0.999, 100, level), (level, flagged)


def test_susceptibility_probe_separates_shared_from_independent(mlp_panel: MLPPanel) -> None:
    """cos(-g, theta_T - theta_S) for students at the teacher's initialization vs at another
    seed's initialization (the theorem's setting)."""
    shared, independent = [], []
    for s in range(3):
        teacher = mlp_panel.teachers[s]
        report = bt.detect(mlp_panel.inits[s], teacher, tests=("susceptibility",))
        shared.append(report.test("susceptibility").statistic)
        for t in range(3):
            if t != s:
                report = bt.detect(mlp_panel.inits[t], teacher, tests=("susceptibility",))
                independent.append(report.test("susceptibility").statistic)
    print(f"susceptibility cosine: shared {sorted(shared)}, independent {sorted(independent)}")
    assert min(shared) > 0
    assert min(shared) > max(independent), (shared, independent)


# ---- a small transformer -----------------------------------------------------------------


def _markov_corpus(n: int, length: int, vocab: int, seed: int) -> List[Example]:
    g = torch.Generator().manual_seed(seed)
    transition = torch.softmax(3 * torch.randn(vocab, vocab, generator=g), dim=1)
    examples = []
    for _ in range(n):
        tokens = [int(torch.randint(0, vocab, (1,), generator=g))]
        for _ in range(length - 1):
            tokens.append(int(torch.multinomial(transition[tokens[-1]], 1, generator=g)))
        examples.append(Example(tokens=tokens, completion=[0] + [1] * (length - 1)))
    return examples


TRANSFORMER = dict(vocab_size=24, d_model=32, n_layers=2, n_heads=4, d_mlp=48, max_seq_len=16)


@pytest.fixture(scope="module")
def transformer_panel():
    corpus = _markov_corpus(256, 12, TRANSFORMER["vocab_size"], seed=5)
    inits, teachers = [], []
    shared: Dict[str, tuple] = {}
    for s in range(2):
        init = TransformerConfig(**TRANSFORMER, seed=s).build()
        teacher = init.clone()
        data = token_dataset(corpus, DatasetConfig(batch_size=32, seed=s))
        Trainer(_config(80, seed=s)).fit(teacher, data, objective="sft")
        student = init.clone()
        bt.distill(teacher, student, token_dataset(corpus, DatasetConfig(batch_size=32, seed=50 + s)),
                   _config(80, seed=50 + s), objective="kd")
        for steps in (5, 150):
            ft = teacher.clone()
            Trainer(_config(steps, seed=60 + s)).fit(
                ft, token_dataset(corpus, DatasetConfig(batch_size=32, seed=60 + s)),
                objective="sft")
            shared[f"seed{s}: teacher / fine-tune {steps} steps"] = (teacher, ft)
        shared[f"seed{s}: teacher / distilled student"] = (teacher, student)
        shared[f"seed{s}: teacher / layers.1.mlp re-initialized"] = (
            teacher, _reinit(teacher, tuple(f"layers.1.mlp.{p}.weight" for p in ("gate", "up", "down")),
                             seed=70 + s))
        inits.append(init)
        teachers.append(teacher)
    independent = {"teachers 0 / 1": (teachers[0], teachers[1]),
                   "init 0 / teacher 1": (inits[0], teachers[1])}
    return shared, independent


def test_transformer_panel(transformer_panel) -> None:
    shared, independent = transformer_panel
    for name, (a, b) in shared.items():
        report = bt.detect(a, b, alpha=ALPHA, tests=("weights",))
        assert report.verdict == "shared", (name, str(report))
        if "re-initialized" in name:
            layers = report.test("weights").layers
            mlp1 = [layer for layer in layers if layer.name.startswith("layers.1.mlp")]
            others = [layer for layer in layers if not layer.name.startswith("layers.1.mlp")]
            assert len(mlp1) == 1 and others, [layer.name for layer in layers]
            assert mlp1[0].log10_p > -2, mlp1
            assert all(layer.log10_p < mlp1[0].log10_p for layer in others), layers
    for name, (a, b) in independent.items():
        report = bt.detect(a, b, alpha=ALPHA, tests=("weights",))
        assert report.verdict == "not shared", (name, str(report))


def _permute_transformer_units(model, n_heads: int, seed: int):
    """A clone whose GLU hidden units and attention heads are permuted in every block (the
    same function; the residual basis is left as is)."""
    copy = model.clone()
    state = {k: v.clone() for k, v in copy.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    layers = sorted({k.split(".")[1] for k in state if k.startswith("layers.")})
    for i in layers:
        p = f"layers.{i}."
        units = torch.randperm(state[p + "mlp.gate.weight"].shape[0], generator=g)
        state[p + "mlp.gate.weight"] = state[p + "mlp.gate.weight"][units]
        state[p + "mlp.up.weight"] = state[p + "mlp.up.weight"][units]
        state[p + "mlp.down.weight"] = state[p + "mlp.down.weight"][:, units]
        d = state[p + "attn.q.weight"].shape[0]
        head = d // n_heads
        order = torch.randperm(n_heads, generator=g)
        rows = torch.cat([torch.arange(h * head, (h + 1) * head) for h in order.tolist()])
        for name in ("q", "k", "v"):
            state[p + f"attn.{name}.weight"] = state[p + f"attn.{name}.weight"][rows]
        state[p + "attn.o.weight"] = state[p + "attn.o.weight"][:, rows]
    copy.load_state_dict(state)
    assert torch.allclose(copy(torch.tensor([[1, 2, 3, 4]])), model(torch.tensor([[1, 2, 3, 4]])),
                          atol=1e-5)
    return copy


def test_transformer_permuted_copy_is_detected_with_controls() -> None:
    """A small transformer's permuted copy (GLU units and heads) against 249 control teachers of
    the same recipe; an independent teacher is not flagged with the same controls."""
    config = dict(vocab_size=16, d_model=16, n_layers=1, n_heads=2, d_mlp=32, max_seq_len=8)
    corpus = _markov_corpus(128, 8, config["vocab_size"], seed=9)

    def teacher(seed: int):
        model = TransformerConfig(**config, seed=seed).build()
        data = token_dataset(corpus, DatasetConfig(batch_size=32, seed=seed))
        Trainer(_config(30, seed=seed)).fit(model, data, objective="sft")
        return model

    a = teacher(0)
    controls = [teacher(1000 + c) for c in range(N_CONTROLS)]
    permuted = _permute_transformer_units(a, config["n_heads"], seed=1)
    report = bt.detect(a, permuted, alpha=ALPHA, tests=("weights",), controls=controls)
    assert report.verdict == "shared", str(report)
    assert report.test("weights_agreement").log10_p == pytest.approx(-math.log10(1 + N_CONTROLS))
    # Without controls the identity test still sees the untouched residual basis (embedding
    # columns), but not the permuted blocks.
    rows = {r.name.split(" ")[0]: r for r in bt.weight_test(a, permuted).layers}
    assert rows["residual_basis"].log10_p < -10, rows
    assert rows["layers.0.mlp"].log10_p > -2, rows
    other = bt.detect(a, teacher(1), alpha=ALPHA, tests=("weights",), controls=controls)
    assert other.verdict == "not shared", str(other)
