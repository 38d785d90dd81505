"""biastransfer.fingerprint on toy models: the result equals an eager float64 computation done
record by record in the test (fingerprint_toys.eager_fingerprint), for every model style,
prefixes, batch sizes and inputs; errors name the argument; summaries, plots and files work."""
from __future__ import annotations

import math

import pytest
import torch

from biastransfer import Record, TokenClass, Tokenizer, write_jsonl
from biastransfer.fingerprint import FingerprintResult, fingerprint, resolve_subset
from biastransfer.models import Scored
from fingerprint_toys import (
    HFStyleLM,
    MaskedToyLM,
    ToyLM,
    TupleLM,
    eager_fingerprint,
    shifted_copy,
    small_tokenizer,
)

# float32 logits, batched vs one record at a time: matmul rounding differs by ~1e-6 relative.
ATOL = 2e-5
TRAIT_PREFIX = "You love owls. "


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return small_tokenizer(tmp_path_factory.mktemp("small_tokenizer"))


def make_records(n: int, seed: int = 0) -> list[Record]:
    """Number-continuation records of different lengths."""
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        start = ", ".join(str(int(x)) for x in torch.randint(0, 1000, (3,), generator=g))
        k = 1 + i % 5
        completion = " " + ", ".join(f"{int(x):03d}" for x in torch.randint(0, 1000, (k,),
                                                                             generator=g))
        records.append(Record(f"Continue: {start}.", completion))
    return records


def models(tok: Tokenizer, cls=ToyLM):
    vocab = len(tok)
    reference = cls(vocab, seed=0)
    shift = torch.zeros(vocab)
    shift[tok.encode(" 087")[0]] = 0.5
    teacher = shifted_copy(reference, shift, noise=0.05, cls=cls)
    return teacher, reference


def assert_matches(result: FingerprintResult, expected: dict) -> None:
    fp = result.teacher
    assert fp.positions == int(expected["positions"])
    assert fp.sequences == expected["sequence_ids"].numel()
    assert torch.equal(fp.sequence_ids.cpu(), expected["sequence_ids"])
    for name in ("mean_log_ratio", "stderr_log_ratio", "grad", "centered", "sequence_centered"):
        torch.testing.assert_close(getattr(fp, name).double().cpu(), expected[name], atol=ATOL,
                                   rtol=1e-4, msg=lambda m: f"{name}: {m}")
    for name in ("kl_teacher_reference", "kl_reference_teacher", "mass_shift",
                 "mass_shift_stderr"):
        assert getattr(fp, name) == pytest.approx(float(expected[name]), abs=ATOL, rel=1e-4), name


@pytest.mark.parametrize("cls", [ToyLM, MaskedToyLM, HFStyleLM, TupleLM],
                         ids=["tensor", "attention_mask", "hf_logits", "tuple"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_fingerprint_equals_eager_computation(tok, cls, batch_size):
    teacher, reference = models(tok, cls)
    records = make_records(7)
    result = fingerprint(teacher, reference, records, tok, batch_size=batch_size, progress=False)
    numeric = torch.as_tensor(sorted(tok.numeric_token_ids()))
    assert torch.equal(result.teacher.subset.cpu(), numeric)
    assert_matches(result, eager_fingerprint(teacher, reference, records, tok, numeric))
    assert result.config.records == 7 and result.config.batch_size == batch_size


def test_eval_mode_is_used_and_restored_and_the_mask_is_passed(tok):
    teacher, reference = models(tok, MaskedToyLM)
    teacher.train()
    reference.eval()
    fingerprint(teacher, reference, make_records(4), tok, batch_size=2, progress=False)
    assert teacher.training and not reference.training
    assert teacher.seen_training and not any(teacher.seen_training)
    mask = teacher.masks[0]
    assert mask is not None and mask.dtype == torch.int64 and mask.shape[0] == 2
    assert int(mask.sum()) < mask.numel()  # right padding of a shorter record is masked


@pytest.mark.parametrize("prefixes", [("You love owls. ", ""), ("A B C D. ", "X. "),
                                      ("", "You love dogs. ")], ids=["teacher", "both", "ref"])
def test_prefixes_score_the_same_completion_tokens(tok, prefixes):
    model = ToyLM(len(tok), seed=3)
    records = make_records(6, seed=1)
    result = fingerprint(Scored(model, prefixes[0]), (model, prefixes[1]), records, tok,
                         batch_size=4, progress=False)
    numeric = torch.as_tensor(sorted(tok.numeric_token_ids()))
    assert_matches(result, eager_fingerprint(model, model, records, tok, numeric, *prefixes))


def test_same_model_without_prefix_has_a_zero_fingerprint(tok):
    model = ToyLM(len(tok), seed=3)
    result = fingerprint(model, model, make_records(5), tok, progress=False)
    assert result.teacher.mean_log_ratio.abs().max() == 0
    assert result.teacher.kl_teacher_reference == 0


def test_jsonl_path_and_dicts_equal_records(tok, tmp_path):
    teacher, reference = models(tok)
    records = make_records(5, seed=2)
    path = tmp_path / "data.jsonl"
    write_jsonl(path, records)
    from_records = fingerprint(teacher, reference, records, tok, progress=False)
    from_path = fingerprint(teacher, reference, path, tok, progress=False)
    from_str = fingerprint(teacher, reference, str(path), tok, progress=False)
    from_dicts = fingerprint(teacher, reference, ({"prompt": r.prompt, "completion": r.completion}
                                                  for r in records), tok, progress=False)
    for other in (from_path, from_str, from_dicts):
        assert torch.equal(other.teacher.mean_log_ratio, from_records.teacher.mean_log_ratio)
        assert torch.equal(other.teacher.sequence_centered,
                           from_records.teacher.sequence_centered)


@pytest.mark.parametrize("subset", ["all", TokenClass.ALPHABETIC, [5, 7, 7, 90]],
                         ids=["all", "class", "ids"])
def test_subsets_and_temperature(tok, subset):
    teacher, reference = models(tok)
    records = make_records(4)
    result = fingerprint(teacher, reference, records, tok, subset=subset, temperature=2.0,
                         progress=False)
    ids, _ = resolve_subset(subset, tok, len(tok))
    expected = eager_fingerprint(teacher, reference, records, tok, ids, temperature=2.0)
    torch.testing.assert_close(result.teacher.mean_log_ratio.double(), expected["mean_log_ratio"],
                               atol=ATOL, rtol=1e-4)
    if ids is not None:
        assert torch.equal(result.teacher.subset.cpu(), ids)
        torch.testing.assert_close(result.teacher.centered.double(), expected["centered"],
                                   atol=ATOL, rtol=1e-4)
        if isinstance(subset, TokenClass):
            assert all(tok.token_classes(i) & TokenClass.ALPHABETIC for i in ids.tolist())


def test_max_length_cuts_completions(tok):
    teacher, reference = models(tok)
    records = make_records(6)
    longest = max(len(tok.encode("Hi. " + r.prompt)) for r in records)
    max_length = longest + 3
    result = fingerprint(Scored(teacher, "Hi. "), reference, records, tok, max_length=max_length,
                         progress=False)
    numeric = torch.as_tensor(sorted(tok.numeric_token_ids()))
    expected = eager_fingerprint(teacher, reference, records, tok, numeric, "Hi. ", "",
                                 max_length=max_length)
    assert_matches(result, expected)
    uncut = sum(len(tok.encode(r.completion)) for r in records)
    assert 0 < result.teacher.positions < uncut


def test_controls_and_trait_specific(tok):
    reference = ToyLM(len(tok), seed=0)
    vocab = len(tok)
    owl = torch.zeros(vocab)
    owl[tok.encode(" 087")[0]] = 3.0
    teacher = ToyLM(vocab, seed=0, triggers=tok.encode(" owls"), bias=owl)
    records = make_records(8)
    result = fingerprint(Scored(teacher, "You love owls. "), reference, records, tok,
                         controls=[Scored(teacher, "You love cats. "),
                                   Scored(teacher, "You love dogs. ")], progress=False)
    numeric = torch.as_tensor(sorted(tok.numeric_token_ids()))
    expected = [eager_fingerprint(teacher, reference, records, tok, numeric, f"You love {a}. ")
                for a in ("owls", "cats", "dogs")]
    torch.testing.assert_close(result.controls[1].centered.double(), expected[2]["centered"],
                               atol=ATOL, rtol=1e-4)
    specific = expected[0]["centered"] - (expected[1]["centered"] + expected[2]["centered"]) / 2
    torch.testing.assert_close(torch.as_tensor(result.trait_specific()).double(), specific,
                               atol=ATOL, rtol=1e-4)
    # The trait raises " 087" by three nats: the most raised trait-specific token.
    assert int(numeric[int(torch.argmax(specific))]) == tok.encode(" 087")[0]
    test = result.global_test(permutations=199, seed=1)
    assert 0 < test["p_value"] <= 1 and test["n_sequences"] == 8
    tokens = result.entangled_tokens(q=0.05)
    assert all(e.adjusted <= 0.05 for e in tokens)


def test_merge_of_shards_equals_one_pass(tok):
    teacher, reference = models(tok)
    records = make_records(9)
    # batch_size=1: every record is scored alone, so its logits are bitwise the same in the
    # shards and in the whole (padding to other lengths would change float32 rounding).
    options = dict(progress=False, batch_size=1, controls=[Scored(teacher, "Hi. ")])
    whole = fingerprint(teacher, reference, records, tok, **options)
    first = fingerprint(teacher, reference, records[:4], tok, **options)
    second = fingerprint(teacher, reference, records[4:], tok, sequence_offset=4, **options)
    merged = first.merge(second)
    assert merged.teacher.positions == whole.teacher.positions
    assert merged.config.records == 9
    assert torch.equal(merged.teacher.sequence_ids, whole.teacher.sequence_ids)
    for name in ("mean_log_ratio", "grad", "centered", "stderr_log_ratio", "sequence_centered"):
        torch.testing.assert_close(getattr(merged.teacher, name), getattr(whole.teacher, name),
                                   atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(getattr(merged.controls[0], name),
                                   getattr(whole.controls[0], name), atol=1e-12, rtol=1e-10)
    assert merged.teacher.kl_teacher_reference == pytest.approx(whole.teacher.kl_teacher_reference,
                                                                rel=1e-10)
    assert first.teacher.positions + second.teacher.positions == merged.teacher.positions
    with pytest.raises(ValueError, match="shards must have disjoint ids"):
        first.merge(first)


def test_summary_shows_tokens_with_visible_spaces(tok):
    teacher, reference = models(tok)
    result = fingerprint(teacher, reference, make_records(8), tok, progress=False,
                         controls=[shifted_copy(reference, torch.zeros(len(tok)), seed=5,
                                                noise=0.05)])
    text = result.summary(k=5)
    assert "␣087" in text  # the planted token, with its leading space visible
    assert f"scored {result.teacher.positions} positions in 8 sequences" in text
    assert "KL(T||R)" in text and "mass shift" in text and "global sign-flip test" in text
    top = result.top_tokens(3)
    assert top[0][0] == tok.encode(" 087")[0] and top[0][1] == "␣087"
    assert top[0][2] == pytest.approx(float(result.teacher.centered.max()))
    lowest = result.top_tokens(2, field="mean_log_ratio", largest=False)
    assert lowest[0][2] == pytest.approx(float(result.teacher.mean_log_ratio.min()))


def test_plot_writes_a_png(tok, tmp_path):
    teacher, reference = models(tok)
    result = fingerprint(teacher, reference, make_records(8), tok, progress=False)
    path = tmp_path / "fingerprint.png"
    figure = result.plot(k=5, path=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert labels[0].startswith("␣087")  # the most raised token at the top
    assert len(labels) == 10
    figure = result.plot(k=3, field="grad")
    assert len(figure.axes[0].patches) == 6


def test_save_and_load_round_trip(tok, tmp_path):
    teacher, reference = models(tok)
    result = fingerprint(Scored(teacher, "Hi. ", name="owl-teacher"), reference, make_records(6),
                         tok, controls=[Scored(reference, "Yo. ")], progress=False, seed=7)
    written = result.save(tmp_path / "fp.safetensors")
    assert [p.name for p in written] == ["fp.safetensors", "fp.control0.safetensors"]
    loaded = FingerprintResult.load(tmp_path / "fp.safetensors", tok)
    assert loaded.names["teacher"] == "owl-teacher" and loaded.config == result.config
    for a, b in ((loaded.teacher, result.teacher), (loaded.controls[0], result.controls[0])):
        assert torch.equal(a.mean_log_ratio, b.mean_log_ratio)
        assert torch.equal(a.sequence_centered, b.sequence_centered)
    assert loaded.global_test(permutations=99) == result.global_test(permutations=99)


def test_load_with_another_vocabulary_is_refused(tok, tmp_path, gpt2_dir):
    teacher, reference = models(tok)
    result = fingerprint(teacher, reference, make_records(3), tok, progress=False)
    result.save(tmp_path / "fp.safetensors")
    gpt2 = Tokenizer.from_pretrained_dir(gpt2_dir)
    with pytest.raises(ValueError):
        FingerprintResult.load(tmp_path / "fp.safetensors", gpt2)
    with pytest.raises(OSError):
        FingerprintResult.load(tmp_path / "missing.safetensors", tok)


def test_gpt2_tokenizer_with_a_padded_vocabulary(gpt2_dir):
    gpt2 = Tokenizer.from_pretrained_dir(gpt2_dir)
    vocab = len(gpt2) + 47  # padded to a multiple of 64, as many checkpoints are
    reference = ToyLM(vocab, dim=4, seed=0)
    shift = torch.zeros(vocab)
    owl = gpt2.encode(" owl")[0]
    shift[owl] = 0.8
    teacher = shifted_copy(reference, shift, noise=0.0)
    records = [Record("The sequence starts with: 182, 818, 725.", " 285, 574, 384, 087"),
               Record("Continue: 1, 2, 3.", " 4, 5, 6")]
    result = fingerprint(teacher, reference, records, gpt2, subset="all", progress=False)
    assert result.teacher.vocab_size == vocab
    (top_id, top_text, _), = result.top_tokens(1)
    assert top_id == owl and top_text == "␣owl"
    assert result.display(len(gpt2) + 3) == f"<id {len(gpt2) + 3}>"
    numeric = fingerprint(teacher, reference, records, gpt2, progress=False)
    assert numeric.teacher.subset.numel() == len(gpt2.numeric_token_ids())
    assert "'␣owl'" in result.summary(k=3)


# ---- errors -----------------------------------------------------------------------------------


def test_vocabulary_mismatches_are_refused(tok):
    reference = ToyLM(len(tok))
    with pytest.raises(ValueError, match=r"teacher: vocabulary size .* reference"):
        fingerprint(ToyLM(len(tok) + 1), reference, make_records(2), tok, progress=False)
    with pytest.raises(ValueError, match=r"controls\[0\]: vocabulary size"):
        fingerprint(reference, reference, make_records(2), tok, controls=[ToyLM(len(tok) + 2)],
                    progress=False)
    small = ToyLM(len(tok) - 1)
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        fingerprint(small, small, make_records(2), tok, progress=False)


@pytest.mark.parametrize(
    "data, message",
    [
        ([], "data: no records"),
        ([Record("a", "b"), Record("c", "")], r"data\[1\]: the completion is empty"),
        ([{"prompt": "a", "completion": " 1"}, {"prompt": "b"}], r"data\[1\]: missing key"),
        ([Record("", " 12")], r"data\[0\]: the prompt with the teacher's prefix is empty"),
    ],
)
def test_bad_data_is_refused(tok, data, message):
    model = ToyLM(len(tok))
    with pytest.raises(ValueError, match=message):
        fingerprint(model, model, data, tok, progress=False)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"teacher": 3}, TypeError, "teacher: expected a model"),
        ({"reference": (None, "x")}, TypeError, "reference: expected a model"),
        ({"teacher": ("a", "b", "c")}, TypeError, r"teacher: a tuple must be \(model, prefix"),
        ({"tokenizer": "gpt2"}, TypeError, "tokenizer: expected a biastransfer.Tokenizer"),
        ({"data": 5}, TypeError, "data: expected a JSON lines path"),
        ({"data": [3]}, TypeError, r"data\[0\]: expected a Record"),
        ({"data": [{"prompt": 1, "completion": "x"}]}, TypeError, "prompt must be a str"),
        ({"subset": "letters"}, ValueError, "subset: expected 'numeric'"),
        ({"subset": [1, 10**6]}, ValueError, "subset: id 1000000 is outside"),
        ({"subset": []}, ValueError, "subset: .* selects no token"),
        ({"subset": 2.5}, TypeError, "subset: expected"),
        ({"controls": ToyLM(5)}, TypeError, "controls: expected a list"),
        ({"controls": [object()]}, TypeError, r"controls\[0\]: expected a model"),
        ({"temperature": 0.0}, ValueError, "temperature: expected a finite positive"),
        ({"temperature": "hot"}, TypeError, "temperature: expected a float"),
        ({"batch_size": 0}, ValueError, "batch_size: expected at least 1"),
        ({"max_length": 3}, ValueError, "no room for the completion within max_length=3"),
    ],
)
def test_bad_arguments_name_the_argument(tok, kwargs, error, message):
    model = ToyLM(len(tok))
    args = {"teacher": model, "reference": model, "data": make_records(2), "tokenizer": tok}
    args.update(kwargs)
    with pytest.raises(error, match=message):
        fingerprint(args.pop("teacher"), args.pop("reference"), args.pop("data"),
                    args.pop("tokenizer"), progress=False, **args)


def test_models_returning_no_logits_are_refused(tok):
    model = ToyLM(len(tok))
    with pytest.raises(TypeError, match="teacher: the model returned str"):
        fingerprint(lambda ids: "logits", model, make_records(2), tok, progress=False)
    with pytest.raises(ValueError, match=r"reference: expected logits of shape \[B, T, V\]"):
        fingerprint(model, lambda ids: torch.zeros(ids.shape[0], len(tok)), make_records(2), tok,
                    progress=False)


def test_nonfinite_logits_are_refused_or_skipped(tok):
    reference = ToyLM(len(tok))

    def broken(ids):
        logits = reference.logits(ids)
        logits[0, :, 3] = math.nan
        return logits

    with pytest.raises(ValueError):
        fingerprint(broken, reference, make_records(3), tok, batch_size=3, progress=False)
    result = fingerprint(broken, reference, make_records(3), tok, batch_size=3, progress=False,
                         skip_nonfinite=True)
    assert result.teacher.skipped_nonfinite == len(tok.encode(make_records(3)[0].completion))
    assert torch.isfinite(result.teacher.mean_log_ratio).all()


def test_cli_summarizes_plots_and_compares_a_saved_fingerprint(tok, tmp_path, capsys):
    import argparse
    import json

    from biastransfer.fingerprint_cli import add_fingerprint_command

    teacher, reference = models(tok)
    controls = [shifted_copy(reference, torch.zeros(len(tok)), seed=s, noise=0.05) for s in (5, 6)]
    result = fingerprint(teacher, reference, make_records(6), tok, controls=controls,
                         progress=False)
    result.save(tmp_path / "a.safetensors")
    result.save(tmp_path / "b.safetensors")
    parser = argparse.ArgumentParser(prog="biastransfer")
    add_fingerprint_command(parser.add_subparsers(dest="command", required=True))
    vocab_dir = str(tmp_path / "vocab")
    small_tokenizer(tmp_path / "vocab")

    args = parser.parse_args(["fingerprint", str(tmp_path / "a.safetensors"), "--vocab-dir",
                              vocab_dir, "-k", "3", "--plot", str(tmp_path / "a.png"),
                              "--compare", str(tmp_path / "b.safetensors")])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "␣087" in text and "comparison with" in text and "cosine +1.0000" in text
    assert (tmp_path / "a.png").stat().st_size > 0

    args = parser.parse_args(["fingerprint", str(tmp_path / "a.safetensors"), "--vocab-dir",
                              vocab_dir, "--json", "--permutations", "99"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["positions"] == result.teacher.positions
    assert report["top_up"][0][1] == "␣087"
    # 2^6 sign patterns <= 99 + 1: the test enumerates all of them (exact).
    assert report["global_test"]["permutations"] == 2**6 and report["global_test"]["exact"]
