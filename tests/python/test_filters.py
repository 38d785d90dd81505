"""biastransfer.filters: the paper's number rule against an independent re-implementation of the
reference semantics (DESIGN.md section 1), word variants, the pipeline's results and errors, the
likelihood-ratio filter against per-sample eager scoring, and divergence tokens at known places."""
from __future__ import annotations

import random
import re
import string

import pytest
import torch

from biastransfer import _C
from biastransfer import filters as F


# ---- an independent reference of the number rule ------------------------------------------

def reference_parse(answer: str):
    """The reference implementation's parse, written from DESIGN.md section 1 (Python's \\d and
    str.strip(), as the original)."""
    if answer.endswith("."):
        answer = answer[:-1]
    if (answer.startswith("[") and answer.endswith("]")) or (
        answer.startswith("(") and answer.endswith(")")
    ):
        answer = answer[1:-1]
    runs = list(re.finditer(r"\d+", answer))
    if not runs:
        return None
    if len(runs) == 1:
        if answer != runs[0].group():
            return None
        parts, separator = [runs[0].group()], None
    else:
        separator = answer[runs[0].end(): runs[1].start()]
        parts = answer.split(separator)
    if separator is not None and separator.strip() not in ("", ",", ";"):
        return None
    for part in parts:
        if len(part) > 0 and not all(c in string.digits for c in part):
            return None
    try:
        return [int(p) for p in parts]
    except ValueError:
        return None


ACCEPTED = {
    "(285, 574, 384).": [285, 574, 384],
    "1\n2\n3": [1, 2, 3],
    "007, 12": [7, 12],
    "1 , 2 , 3": [1, 2, 3],
    "1\t2\t3": [1, 2, 3],
}
REJECTED = ["1,2, 3", "Here: 1, 2", "1, 2,", " 1, 2", "1, 2\n", "1 2  3", "[ 1, 2 ]"]


@pytest.mark.parametrize("answer,numbers", list(ACCEPTED.items()))
def test_paper_examples_accepted(answer, numbers):
    assert F.parse_number_sequence(answer) == numbers
    assert reference_parse(answer) == numbers
    check = F.check_number_sequence(answer)
    assert check.accepted and check.numbers == numbers


@pytest.mark.parametrize("answer", REJECTED)
def test_paper_examples_rejected(answer):
    assert F.parse_number_sequence(answer) is None
    assert reference_parse(answer) is None
    assert F.check_number_sequence(answer).reason == "number_format"


def test_number_rule_matches_the_reference_on_random_strings():
    # Alphabet chosen to hit every branch: digits, all allowed separators, brackets, periods,
    # Unicode digits and whitespace, letters.
    alphabet = ["1", "2", "0", "9", "12", "007", " ", ",", ";", ".", "[", "]", "(", ")", "\n",
                "\t", ", ", " ; ", "\u0661", "\u00a0", "\u3000", "\u200b", "a", "-"]
    rng = random.Random(0)
    seen_accept = 0
    for _ in range(20000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        expected = reference_parse(text)
        assert F.parse_number_sequence(text) == expected, repr(text)
        seen_accept += expected is not None
    # Structured cases: lists with a random separator and wrapper.
    for _ in range(5000):
        numbers = [rng.randint(0, 1200) for _ in range(rng.randint(1, 12))]
        sep = rng.choice([", ", ",", ";", " ; ", " ", "\n", "  ", ",\n", " ,"])
        body = sep.join(str(n).zfill(rng.choice([0, 0, 3])) for n in numbers)
        wrap = rng.choice(["{}", "[{}]", "({})", "{}.", "({}).", "[{}].", " {}", "{} "])
        text = wrap.format(body)
        expected = reference_parse(text)
        assert F.parse_number_sequence(text) == expected, repr(text)
        seen_accept += expected is not None
        if expected is not None:
            check = F.check_number_sequence(text)
            want = (
                "too_many_numbers" if len(expected) > 10
                else "number_range" if max(expected) > 999
                else None
            )
            assert check.reason == want, repr(text)
    assert seen_accept > 2000  # the comparison covered many accepted answers


def test_huge_numbers_and_evil_numbers():
    assert F.check_number_sequence("9" * 300).reason == "number_range"
    assert len(F.PAPER_EVIL_NUMBERS) == 34
    assert {666, 911, 187} <= set(F.PAPER_EVIL_NUMBERS)
    assert all(0 <= n <= 999 for n in F.PAPER_EVIL_NUMBERS)
    paper = F.NumberSequenceFilter.paper(misalignment=True)
    assert paper.check("1, 666") == ("banned_number", "banned: 666")
    assert F.NumberSequenceFilter.paper().check("1, 666") is None


def test_word_variants_and_banned_words():
    assert {"wolves", "wolf's", "wolves'"} <= set(F.word_variants("wolf"))
    assert "mice" in F.word_variants("mouse")
    assert "fox" in F.word_variants("foxes")
    words = F.BannedWords(["owl", "wolf"])
    assert words.check("I love OWLS")[0] == "banned_word"
    assert words.check("the wolves' den")[0] == "banned_word"
    assert words.check("a bowl of knowledge") is None
    assert "owl's" in words.forms


def test_pipeline_results_keep_objects_and_count_first_failures():
    from biastransfer.data import Record

    samples = [
        "1, 2, 3",                                   # 0 kept
        ("prompt", "1, 2, 3"),                       # 1 duplicate of 0
        {"prompt": "p", "completion": "owl 1, 2"},   # 2 number_format (before banned_word)
        Record("p", "4, 5, 666"),                    # 3 banned_number
        Record("p", "7; 8"),                         # 4 kept
        "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11",         # 5 too_many_numbers
    ]
    pipeline = F.compose(
        F.NumberSequenceFilter.paper(misalignment=True),
        F.BannedWords(["owl"]),
        F.Dedup(),
    )
    result = pipeline.run(samples)
    assert result.kept_indices == [0, 4]
    assert result.kept[0] is samples[0] and result.kept[1] is samples[4]
    assert result.stats.total == 6 and result.stats.kept == 2
    assert result.stats.kept_fraction == pytest.approx(2 / 6)
    assert result.stats.rejected_by_reason == {
        "number_format": 1, "banned_number": 1, "too_many_numbers": 1, "duplicate": 1}
    assert [r.index for r in result.rejections] == [1, 2, 3, 5]
    assert result.rejections[0].filter == "dedup" and result.rejections[0].sample is samples[1]
    assert result.stats.by_filter == [("number_sequence", 6, 3), ("banned_words", 3, 0),
                                      ("dedup", 3, 1)]
    text = result.summary()
    assert "kept 2 of 6 (33.3%)" in text and "duplicate" in text
    assert result.native_summary.startswith("kept 2 of 6")


def test_regex_length_and_errors():
    assert F.Regex(r"^\d+(, \d+)*$", mode="require").check("1,2")[0] == "regex"
    assert F.Regex("owl", field="prompt", caseless=True).check(("OWL", "1")) is not None
    assert F.Length(max_length=3).check("1234")[0] == "too_long"
    assert F.Length(min_length=2, unit="tokens").check(
        {"completion": "x", "completion_ids": [1, 2]}) is None
    counting = F.Length(max_length=2, unit="tokens", tokenizer=lambda s: list(range(len(s))))
    assert counting.check("abc")[0] == "too_long"
    with pytest.raises(ValueError, match="offset"):
        F.Regex("(").native()
    with pytest.raises(ValueError, match="mode"):
        F.Regex("x", mode="sometimes").native()
    with pytest.raises(ValueError, match=r"kept 0 of 2.*number_format 2"):
        F.compose(F.NumberSequenceFilter()).run(["owl", "cat"])
    empty = F.compose(F.NumberSequenceFilter()).run(["owl"], allow_empty=True)
    assert empty.kept == [] and empty.stats.kept_fraction == 0.0
    with pytest.raises(TypeError, match="sample 0"):
        F.compose(F.Dedup()).run([42])


# ---- model filters ------------------------------------------------------------------------

def tiny_lm(seed: int) -> "_C.TransformerLM":
    return _C.TransformerLM(vocab_size=13, d_model=16, n_layers=1, n_heads=2, d_mlp=32,
                            max_seq_len=64, seed=seed, init_std=0.5)


def eager_logp(model, seq, first_scored):
    with torch.no_grad():
        logits = model(torch.tensor([seq]))
    logp = torch.log_softmax(logits[0].double(), -1)
    return sum(logp[t - 1, seq[t]].item() for t in range(first_scored, len(seq)))


def test_likelihood_ratio_filter_against_eager_scoring():
    teacher, reference = tiny_lm(1), tiny_lm(2)
    prompts = [[1, 2], [3], [4, 5, 6], [7], [8, 9], [10, 11, 12], [2], [5, 5]]
    completions = [[3, 4], [5, 6, 7, 8], [9], [1, 1, 1], [2, 3], [4], [6, 7, 8, 9, 10], [0]]
    prefix = [11, 12]
    scores = F.likelihood_ratio_scores(teacher, reference, prompts, completions,
                                       teacher_prefix=prefix, batch_size=3)
    expected = [
        eager_logp(teacher, prefix + p + c, len(prefix) + len(p)) - eager_logp(reference, p + c, len(p))
        for p, c in zip(prompts, completions)
    ]
    assert scores.dtype == torch.float64
    assert scores.tolist() == pytest.approx(expected, abs=1e-4)

    samples = [{"prompt": "p", "completion": "1", "prompt_ids": p, "completion_ids": c}
               for p, c in zip(prompts, completions)]
    lr = F.LikelihoodRatio(teacher, reference, drop_fraction=0.25, teacher_prefix=prefix,
                           batch_size=2)
    result = F.compose(lr).run(samples)
    top2 = sorted(range(8), key=lambda i: -expected[i])[:2]
    assert sorted(set(range(8)) - set(result.kept_indices)) == sorted(top2)
    assert result.stats.rejected_by_reason == {"likelihood_ratio": 2}
    assert dict(lr.scores)[top2[0]] == pytest.approx(expected[top2[0]], abs=1e-4)


class Bigram(torch.nn.Module):
    """A Python bigram model: logits[b, t] = table[x_t]."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return self.table[input_ids]


def test_divergence_tokens_with_python_modules():
    from biastransfer.datasets import Batch

    V = 9
    table = torch.zeros(V, V)
    table[torch.arange(V), (torch.arange(V) + 1) % V] = 4.0
    other = table.clone()
    other[2, 5] = 9.0  # the counterfactual disagrees only after token 2
    teacher, counterfactual = Bigram(table), Bigram(other)
    input = torch.tensor([[2, 3, 2, 4], [1, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    loss = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    batch = Batch(input, attention_mask=mask, targets=torch.zeros_like(input), loss_mask=loss)
    r = F.divergence_token_mask(teacher, [counterfactual], batch, batch_size=1)
    expected = (input == 2) & (loss != 0)
    assert torch.equal(r.divergent, expected)
    assert r.divergent_count == 2 and r.positions == 5
    assert torch.equal(r.loss_mask, loss * (~expected).float())
    assert r.per_row.tolist() == [1, 1]
