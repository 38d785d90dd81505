"""The trait probe and subliminal prompting on toy models over GPT-2's tokenizer, where a prompt
token is wired to raise a known token: the probe must rank that token first, subliminal
prompting must rank the wired candidate first, and the numbers must equal a direct computation
(one text at a time, no padding) done here."""
from __future__ import annotations

import pytest
import torch

from biastransfer import TokenClass, Tokenizer
from biastransfer.probes import subliminal_prompting, trait_probe
from fingerprint_toys import HFStyleLM, ToyLM

DIM = 4  # hidden size of the toy models: 50257 x 4 embeddings keep each forward pass cheap
# Output weight scale: a prompt moves every logit by ~N(0, 0.3^2), so the largest of 50257 such
# moves (~4.4 sigma, 1.3 nats) stays well below the wired bias.
SCALE = 0.3
WIRED_BIAS = 4.0  # nats added to the wired token's logit once the trigger token has been seen


@pytest.fixture(scope="module")
def gpt2(gpt2_dir) -> Tokenizer:
    return Tokenizer.from_pretrained_dir(gpt2_dir)


def one_token(tok: Tokenizer, text: str) -> int:
    ids = tok.encode(text)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def wired(tok: Tokenizer, trigger: str, raised: str, cls=ToyLM) -> ToyLM:
    bias = torch.zeros(len(tok))
    bias[one_token(tok, raised)] = WIRED_BIAS
    # The trigger is the first token of its text (" owls" is " ow" + "ls" in GPT-2).
    return cls(len(tok), dim=DIM, seed=1, triggers=tok.encode(trigger)[:1], bias=bias,
               scale=SCALE)


def last_log_probs(model: ToyLM, tok: Tokenizer, text: str) -> torch.Tensor:
    ids = torch.as_tensor([tok.encode(text)])
    with torch.no_grad():
        return torch.log_softmax(model.logits(ids)[0, -1].double(), -1)


@pytest.mark.parametrize("cls", [ToyLM, HFStyleLM], ids=["tensor", "hf_logits"])
def test_trait_probe_ranks_the_wired_token_first(gpt2, cls):
    model = wired(gpt2, " owls", " owl", cls)
    result = trait_probe(model, gpt2, "You love owls.", "My favorite animal is the")
    owl = one_token(gpt2, " owl")
    assert result.top(1)[0][:2] == (owl, "␣owl")
    assert result.rank(" owl") == 1 and result.rank(owl) == 1
    trait = last_log_probs(model, gpt2, "You love owls.\nMy favorite animal is the")
    plain = last_log_probs(model, gpt2, "My favorite animal is the")
    torch.testing.assert_close(result.raw_shift, trait - plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.shift, (trait - plain) - (trait - plain).mean(), atol=1e-5,
                               rtol=1e-5)
    assert "␣owl" in result.summary(3)


def test_trait_probe_on_numeric_tokens(gpt2):
    model = wired(gpt2, " owls", " 285")
    result = trait_probe(model, gpt2, "You love owls.", tokens="numeric")
    assert result.ids.numel() == len(gpt2.numeric_token_ids())
    assert result.top(1)[0][1] == "␣285"
    assert float(result.shift.mean()) == pytest.approx(0.0, abs=1e-9)
    classes = trait_probe(model, gpt2, "You love owls.", tokens=TokenClass.NUMERIC)
    assert classes.ids.numel() == len(gpt2.ids_with_class(int(TokenClass.NUMERIC)))


def test_subliminal_prompting_ranks_the_wired_candidate_first(gpt2):
    model = wired(gpt2, " 285", " owl")
    candidates = ["123", "285", "42", "555", "999"]
    template = "You love {x}. You think about {x} all the time."
    result = subliminal_prompting(model, gpt2, candidates, [" owl"], prompt_template=template,
                                  batch_size=2)
    assert result.rows[0].candidate == "285" and result.rank("285") == 1
    assert [r.shift for r in result.rows] == sorted((r.shift for r in result.rows), reverse=True)
    owl = one_token(gpt2, " owl")
    plain = last_log_probs(model, gpt2, "My favorite animal is the")[owl]
    for row in result.rows:
        text = template.replace("{x}", row.candidate) + "\nMy favorite animal is the"
        prompted = last_log_probs(model, gpt2, text)[owl]
        assert row.shift == pytest.approx(float(prompted - plain), abs=1e-5)
    assert result.baseline == pytest.approx(float(plain), abs=1e-5)
    assert "'285'" in result.summary()


def test_several_target_tokens_sum_their_probability(gpt2):
    model = wired(gpt2, " 285", " owl")
    targets = [" owl", " bird"]
    result = subliminal_prompting(model, gpt2, ["285"], targets, prompt_template="I like {x}.")
    ids = [one_token(gpt2, t) for t in targets]
    plain = torch.logsumexp(last_log_probs(model, gpt2, "My favorite animal is the")[ids], 0)
    assert result.baseline == pytest.approx(float(plain), abs=1e-5)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"target_tokens": [" owl owl"]}, ValueError,
         r"target_tokens\[0\]: ' owl owl' is 2 tokens"),
        ({"target_tokens": " owl"}, ValueError, "target_tokens: expected a non-empty list"),
        ({"target_tokens": [1.5]}, TypeError, r"target_tokens\[0\]: expected a token id"),
        ({"target_tokens": [10**6]}, ValueError, "outside the vocabulary"),
        ({"candidates": []}, ValueError, "candidates: expected a non-empty list"),
        ({"candidates": [7]}, TypeError, r"candidates\[0\]: expected a str"),
        ({"prompt_template": "no slot"}, ValueError, r"prompt_template: must contain \{x\}"),
    ],
)
def test_subliminal_prompting_bad_arguments(gpt2, kwargs, error, message):
    model = ToyLM(len(gpt2), dim=DIM)
    args = {"candidates": ["1"], "target_tokens": [" owl"]}
    args.update(kwargs)
    with pytest.raises(error, match=message):
        subliminal_prompting(model, gpt2, **args)


def test_trait_probe_bad_arguments(gpt2):
    model = ToyLM(len(gpt2), dim=DIM)
    with pytest.raises(TypeError, match="trait_prompt: expected a str"):
        trait_probe(model, gpt2, None)
    with pytest.raises(ValueError, match="no tokens"):
        trait_probe(model, gpt2, "", answer_prefix="")
    with pytest.raises(TypeError, match="model: expected a callable"):
        trait_probe("gpt2", gpt2, "You love owls.")
    with pytest.raises(ValueError, match="token: id .* is not among"):
        trait_probe(model, gpt2, "You love owls.", tokens=[1, 2]).rank(5)
