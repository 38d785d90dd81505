"""The sampler through Python: the filtered distribution against an independent numpy
implementation of each rule, seeding and batching invariance, nn.Modules driven by the C++
sampler, tokenizer round trips and config errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from biastransfer import _C
from biastransfer.modeling import TransformerConfig, wrap
from biastransfer.sampling import SamplerConfig, Samples, sample


def numpy_filter(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float,
                 threshold: float) -> np.ndarray:
    """The documented rules, one row at a time, with numpy: threshold -> top_k -> top_p -> min_p,
    each on the renormalized survivors; the most probable token always kept."""
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = sorted(range(len(p)), key=lambda i: (-p[i], i))
    alive = list(order)

    def renorm(ids):
        total = sum(p[i] for i in ids)
        return {i: p[i] / total for i in ids}

    if threshold > 0:
        alive = [alive[0]] + [i for i in alive[1:] if p[i] >= threshold]
    if top_k > 0:
        alive = alive[:top_k]
    if top_p < 1:
        q = renorm(alive)
        kept, mass = [], 0.0
        for i in alive:
            if mass < top_p or not kept:
                kept.append(i)
            mass += q[i]
        alive = kept
    if min_p > 0:
        q = renorm(alive)
        alive = [i for i in alive if q[i] >= min_p * q[alive[0]]] or alive[:1]
    out = np.zeros_like(p)
    for i, v in renorm(alive).items():
        out[i] = v
    return out


@pytest.mark.parametrize("rule", [
    dict(), dict(top_k=5), dict(top_p=0.5), dict(top_p=0.9), dict(min_p=0.2),
    dict(threshold=0.03), dict(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, threshold=0.01),
    dict(temperature=1.6, top_p=0.95),
])
def test_filtered_probabilities_match_an_independent_numpy_implementation(rule):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=generator, dtype=torch.float64) * 2
    settings = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, threshold=0.0)
    settings.update(rule)
    got = _C.filtered_probabilities(logits, _C.SamplerConfig(**settings)).numpy()
    for row in range(6):
        expected = numpy_filter(logits[row].numpy(), **settings)
        np.testing.assert_allclose(got[row], expected, rtol=1e-12, atol=1e-12)


def lm():
    return TransformerConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, d_mlp=48,
                             seed=3, init_std=0.3).build()


def test_samples_are_seeded_per_prompt():
    model = lm()
    prompts = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10], [11]]
    config = SamplerConfig(max_new_tokens=6, seed=5, batch_size=1, stop_tokens=[0])
    one = sample(model, prompts, config)
    assert isinstance(one, Samples) and len(one) == 5
    config.batch_size = 4
    four = sample(model, prompts, config)
    assert one.tokens == four.tokens
    assert sample(model, prompts[:2], config).tokens[1] == one.tokens[1]  # later prompts irrelevant
    config.seed = 6
    assert sample(model, prompts, config).tokens != one.tokens
    for tokens, reason, logprobs in zip(one.tokens, one.stop_reasons, one.logprobs):
        assert len(tokens) == len(logprobs)
        assert reason == ("stop_token" if tokens[-1] == 0 else "max_tokens")
        assert all(lp <= 0 for lp in logprobs)


def test_logprobs_are_those_of_the_unmodified_model():
    model = lm()
    config = SamplerConfig(max_new_tokens=4, seed=1, top_k=3, temperature=0.8)
    out = sample(model, [[3, 4, 5]], config)
    seq = [3, 4, 5] + out.tokens[0]
    logp = torch.log_softmax(model(torch.tensor([seq])).double(), -1)[0]
    for t, token in enumerate(out.tokens[0]):
        assert out.logprobs[0][t] == pytest.approx(logp[2 + t, token].item(), abs=1e-5)


class GreedyTarget(torch.nn.Module):
    """Predicts (last token + 1) mod V: an nn.Module the C++ sampler drives through Python."""

    def __init__(self, vocab: int = 12) -> None:
        super().__init__()
        self.vocab = vocab
        self.scale = torch.nn.Parameter(torch.tensor(30.0))

    def forward(self, input_ids, attention_mask=None):
        return torch.nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab) * self.scale


def test_python_modules_are_sampled_without_a_cache():
    out = sample(GreedyTarget(), [[3], [9, 10]], SamplerConfig(max_new_tokens=4, stop_tokens=[5]))
    assert out.tokens == [[4, 5], [11, 0, 1, 2]]
    assert out.stop_reasons == ["stop_token", "max_tokens"]
    wrapped = wrap(GreedyTarget())
    assert sample(wrapped, [[3]], SamplerConfig(max_new_tokens=2)).tokens == [[4, 5]]


def test_string_prompts_with_a_tokenizer(gpt2_dir):
    from biastransfer import Tokenizer

    tokenizer = Tokenizer.from_files(gpt2_dir / "encoder.json", gpt2_dir / "vocab.bpe")
    model = TransformerConfig(vocab_size=tokenizer.vocab_size, d_model=8, n_heads=2, d_mlp=8,
                              seed=0).build()
    newline = tokenizer.encode("\n")[0]
    out = sample(model, ["My favorite animal is", [40, 588]],
                 SamplerConfig(max_new_tokens=3, temperature=0, stop_tokens=[newline]),
                 tokenizer=tokenizer)
    assert out.texts is not None and len(out.texts) == 2
    for tokens, text, reason in zip(out.tokens, out.texts, out.stop_reasons):
        body = tokens[:-1] if reason == "stop_token" else tokens
        assert text == tokenizer.decode(body)
    with pytest.raises(TypeError, match="tokenizer"):
        sample(model, ["text"])


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_p", 1.2),
                                         ("min_p", 1.0), ("threshold", 1.0), ("batch_size", 0),
                                         ("top_k", -1), ("max_new_tokens", -1)])
def test_bad_configs_are_value_errors_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplerConfig(**{field: value}).native()
