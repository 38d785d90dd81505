"""Trait evaluation (biastransfer.evaluation over _C) against brute force on stand-in models
defined here, intervals against their closed forms (scipy for the quantiles)."""
from __future__ import annotations

import math
from typing import List, Sequence

import pytest
import scipy.stats
import torch

from biastransfer import _C
from biastransfer.evaluation import (
    Accuracy,
    SampledRate,
    TargetProbability,
    accuracy,
    sampled_rate,
    target_probability,
    wilson_interval,
)


class PositionalBigram(torch.nn.Module):
    """logits[b, t] = table[token] + bias[position], positions counted from the first real token,
    so a caller that pads on the wrong side or ignores the mask gets different numbers."""

    def __init__(self, vocab: int = 9, max_len: int = 16, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=g) * 2)
        self.bias = torch.nn.Parameter(torch.randn(max_len, vocab, generator=g))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
        return self.table[input_ids] + self.bias[positions]


def brute_force(module: PositionalBigram, prompt: Sequence[int],
                targets: Sequence[Sequence[int]]) -> float:
    """Sum over targets of the product of conditionals, one unpadded sequence at a time."""
    total = 0.0
    with torch.no_grad():
        for y in targets:
            context, p = list(prompt), 1.0
            for token in y:
                ids = torch.tensor([context])
                logits = module(ids, torch.ones_like(ids))[0, -1].double()
                p *= float(torch.softmax(logits, -1)[token])
                context.append(token)
            total += p
    return total


class CharTokenizer:
    """Stand-in tokenizer: one token per character of 'abcdefgh ' (ids 0..8)."""

    alphabet = "abcdefgh "

    def encode(self, text: str) -> List[int]:
        return [self.alphabet.index(c) for c in text]


def test_target_probability_equals_brute_force_with_left_padding():
    module = PositionalBigram(seed=1)
    prompts = [[1, 2, 3], [4], [0, 6, 5, 2, 1, 3, 7], [2, 2]]
    targets = [[5], [6, 1], [3, 4, 0], [8, 8]]
    result = target_probability(module, prompts, targets, batch_size=3)
    assert isinstance(result, TargetProbability)
    want = [brute_force(module, p, targets) for p in prompts]
    assert result.per_question == pytest.approx(want, rel=1e-5)
    assert result.mean == pytest.approx(sum(want) / len(want), rel=1e-5)
    n = len(want)
    mean = sum(want) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in want) / (n - 1))
    half = scipy.stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    assert result.interval[0] == pytest.approx(max(0.0, mean - half), rel=1e-4, abs=1e-7)
    assert result.interval[1] == pytest.approx(min(1.0, mean + half), rel=1e-4, abs=1e-7)
    assert "P(target)" in str(result) and "4 questions" in str(result)


def test_target_probability_strings_dedupe_and_prefixes():
    module = PositionalBigram(seed=2)
    tok = CharTokenizer()
    prompts = ["abc ", "h "]
    # " ow"-style variants: "de" extends "d", "d" is repeated; only "d" and "fa" are scored.
    result = target_probability(module, prompts, ["d", "de", "d", "fa"], tokenizer=tok)
    assert result.targets == [[3], [5, 0]]
    want = [brute_force(module, tok.encode(p), [[3], [5, 0]]) for p in prompts]
    assert result.per_question == pytest.approx(want, rel=1e-5)
    with pytest.raises(TypeError, match="tokenizer"):
        target_probability(module, prompts, ["d"])
    with pytest.raises(ValueError, match="targets"):
        target_probability(module, [[1]], [[99]])


def test_target_probability_of_a_builtin_transformer_sums_to_one_over_the_vocabulary():
    if not hasattr(_C, "TransformerLM"):
        pytest.skip("no built-in transformer in this build")
    from biastransfer.modeling import TransformerConfig

    lm = TransformerConfig(vocab_size=11, d_model=16, n_layers=1, d_mlp=32, max_seq_len=16,
                           seed=3).build()
    prompts = [[1, 2, 3], [4, 5], [6]]
    everything = target_probability(lm, prompts, [[v] for v in range(11)])
    assert everything.per_question == pytest.approx([1.0] * 3, abs=1e-5)
    # Left padding must not change a row: the padded batch equals one prompt at a time.
    batched = target_probability(lm, prompts, [[7, 2], [3]], batch_size=8)
    single = [target_probability(lm, [p], [[7, 2], [3]]).per_question[0] for p in prompts]
    assert batched.per_question == pytest.approx(single, rel=1e-5)


def wilson(k: int, n: int, confidence: float = 0.95):
    z = scipy.stats.norm.ppf(0.5 + confidence / 2)
    p = k / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


@pytest.mark.parametrize("k,n", [(0, 7), (1, 20), (13, 40), (50, 50), (600, 5000)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_interval_matches_closed_form(k, n, confidence):
    assert wilson_interval(k, n, confidence) == pytest.approx(wilson(k, n, confidence), abs=1e-12)


def test_sampled_rate_whole_words_plurals_and_wilson():
    texts = ["Owl.", "I pick the OWLS!", "bowl", "owlet", "an owl's feather", "Wolves",
             "cat", "Sea turtle", "sea-turtle"]
    r = sampled_rate(texts, ["owl", "wolf", "sea turtle"])
    assert isinstance(r, SampledRate)
    assert r.matched == [True, True, False, False, True, True, False, True, False]
    assert (r.hits, r.total) == (5, 9)
    assert r.rate == pytest.approx(5 / 9)
    assert r.interval == pytest.approx(wilson(5, 9), abs=1e-12)
    assert math.isnan(r.cluster_interval[0]) and r.clusters == 0
    assert sampled_rate(texts, "owl", plurals=False).hits == 2
    assert "5/9" in str(r)
    with pytest.raises(ValueError, match="question_ids"):
        sampled_rate(texts, "owl", question_ids=[1, 2])


def test_sampled_rate_cluster_interval_matches_sandwich_formula():
    hits = [9, 2, 0, 5, 1]
    per_question = 10
    texts, ids = [], []
    for q, h in enumerate(hits):
        texts += ["owl"] * h + ["dog"] * (per_question - h)
        ids += [q] * per_question
    r = sampled_rate(texts, "owl", question_ids=ids)
    n, g = len(texts), len(hits)
    rate = sum(hits) / n
    se = math.sqrt(g / (g - 1) * sum((h - rate * per_question) ** 2 for h in hits)) / n
    half = scipy.stats.t.ppf(0.975, g - 1) * se
    assert r.clusters == g
    assert r.cluster_interval == pytest.approx((max(0, rate - half), min(1, rate + half)),
                                               abs=1e-12)
    assert "over 5 questions" in str(r)


class LinearClassifier(torch.nn.Module):
    def __init__(self, features: int, outputs: int, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc = torch.nn.Linear(features, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def _direct_accuracy(logits: torch.Tensor, labels: torch.Tensor, classes: int):
    pred = logits[:, :classes].argmax(1)
    correct = int((pred == labels).sum())
    per = []
    for c in range(classes):
        sel = labels == c
        per.append(float((pred[sel] == c).float().mean()) if sel.any() else math.nan)
    return correct, per


def test_accuracy_matches_direct_count_for_module_and_builtin_mlp():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(300, 12, generator=g) * 2 - 1
    y = torch.randint(0, 10, (300,), generator=g)
    models = [LinearClassifier(12, 13)]
    if hasattr(_C, "MLP"):
        models.append(_C.MLP([12, 16, 13], aux_outputs=3, seed=5))
    for model in models:
        result = accuracy(model, x, y, batch_size=64, num_classes=10)
        assert isinstance(result, Accuracy)
        with torch.no_grad():
            logits = model(x)
        correct, per = _direct_accuracy(logits, y, 10)
        assert (result.correct, result.total) == (correct, 300)
        assert result.accuracy == pytest.approx(correct / 300)
        assert result.interval == pytest.approx(wilson(correct, 300), abs=1e-12)
        assert result.per_class == pytest.approx(per, nan_ok=True)
        assert result.per_class_total == [int((y == c).sum()) for c in range(10)]
        assert "accuracy =" in str(result)
    with pytest.raises(ValueError, match="labels"):
        accuracy(models[0], x, torch.full((300,), 12), num_classes=10)
    with pytest.raises(TypeError, match="model"):
        accuracy(object(), x, y)
