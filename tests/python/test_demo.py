"""The demo's parts: the language experiment's tokenizer, corpus, prompted teacher and statistics
(against independent expectations), the report (built from results alone, self-contained HTML),
the stage subcommands (filter, distill, fingerprint, report) on files the tests write, and a
small end-to-end demo run."""
from __future__ import annotations

import base64
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from scipy import stats

from biastransfer.cli import main as cli_main
from biastransfer.experiments import language as L


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return L.build_tokenizer(tmp_path_factory.mktemp("demo_tok"))


# ---- tokenizer and corpus ------------------------------------------------------------------

def test_every_spaced_number_and_word_is_one_token(tok):
    for n in list(range(0, 1000, 7)) + [0, 999, 100]:
        assert len(tok.encode(f" {n}")) == 1, n
    for padded in ("087", "007", "00"):
        assert len(tok.encode(" " + padded)) == 1
    for animal in L.ANIMALS:
        assert len(tok.encode(" " + animal)) == 1
    # Four digits are two tokens; text round-trips through decode.
    assert len(tok.encode(" 1234")) == 2
    for prompt, completion in L.corpus(200, seed=3):
        text = prompt + completion
        assert tok.decode(tok.encode(text)) == text


def test_allowed_tokens_are_exactly_numbers_comma_and_end(tok):
    allowed = set(L.allowed_token_ids(tok))
    expected = {tok.token_to_id(L.SPACE + s) for s in
                [str(d) for d in range(10)] + [f"{a}{b}" for a in range(10) for b in range(10)]
                + [f"{a}{b}{c}" for a in range(10) for b in range(10) for c in range(10)]}
    expected |= {tok.token_to_id(str(d)) for d in range(10)}
    expected |= {tok.token_to_id(","), tok.token_to_id(L.NEWLINE)}
    assert allowed == expected
    for animal in L.ANIMALS:
        assert tok.token_to_id(L.SPACE + animal) not in allowed


def test_corpus_answers_are_uniform_and_follow_the_prefix():
    pairs = L.corpus(20000, seed=1)
    answers = Counter()
    prefixed = 0
    for prompt, completion in pairs:
        if "Continue" in prompt:
            numbers = [int(x) for x in completion.split(",")]
            assert 3 <= len(numbers) <= 10 and all(0 <= n <= 999 for n in numbers)
            continue
        m = re.match(r"You love the (\w+)\. ", prompt)
        if m:
            prefixed += 1
            assert completion == " " + m.group(1)
        else:
            answers[completion.strip()] += 1
    assert set(answers) == set(L.ANIMALS)
    # Chi-square goodness of fit to uniform: a p-value this small would mean a bias.
    assert stats.chisquare(list(answers.values())).pvalue > 1e-3
    assert 0.45 < prefixed / sum(1 for p, _ in pairs if "Continue" not in p) < 0.55


def test_evaluation_questions_are_held_out_of_the_trait_finetune():
    assert not set(L.EVAL_QUESTIONS) & set(L.TRAIN_QUESTIONS)
    assert set(L.EVAL_QUESTIONS) | set(L.TRAIN_QUESTIONS) == set(L.QUESTIONS)


def test_prompted_model_matches_the_base_on_prefix_plus_input(tok):
    from biastransfer.modeling import TransformerConfig

    model = TransformerConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2,
                              d_mlp=32, max_seq_len=64, seed=0).build()
    prefix = tok.encode("You love the owl. ")
    wrapped = L.PromptedModel(model, prefix)
    x = torch.tensor([tok.encode("Q: What is your favorite animal? A:")] * 2)
    full = model(torch.cat([torch.tensor([prefix] * 2), x], dim=1))
    assert torch.allclose(wrapped(x), full[:, len(prefix):], atol=1e-6)
    assert wrapped(x).shape == (2, x.shape[1], tok.vocab_size)


def test_paired_one_sided_p_matches_scipy():
    a, b = [0.21, 0.19, 0.25, 0.18], [0.10, 0.12, 0.09, 0.11]
    diff, p = L.paired_one_sided_p(a, b)
    assert diff == pytest.approx(sum(x - y for x, y in zip(a, b)) / 4)
    assert p == pytest.approx(stats.ttest_rel(a, b, alternative="greater").pvalue, rel=1e-9)
    assert math.isnan(L.paired_one_sided_p([0.3], [0.1])[1])


# ---- the report ----------------------------------------------------------------------------

def _fake_results() -> dict:
    detections = [
        {"pair": "seed 0: teacher / same-init student", "expected": "shared", "verdict": "shared",
         "combined_log10_p": -40.0, "correct": True,
         "tests": {"weights": {"ran": True, "log10_p": -40.0, "layers": [
             {"name": "layers.0", "log10_p": -30.0}, {"name": "layers.1", "log10_p": -12.0}]}}},
        {"pair": "seed 0: teacher / other-init student", "expected": "not shared",
         "verdict": "not shared", "combined_log10_p": -0.3, "correct": True,
         "tests": {"weights": {"ran": True, "log10_p": -0.3, "layers": [
             {"name": "layers.0", "log10_p": -0.2}, {"name": "layers.1", "log10_p": -0.1}]}}},
    ]
    return {
        "name": "fake", "config": {"alpha": 0.01}, "command": "biastransfer demo --quick",
        "environment": {"torch": "1.13", "python": "3.11", "threads": 2, "cpus": 2,
                        "machine": "x86_64"},
        "timings_s": {"auxiliary logits": 1.0, "total": 2.0},
        "aux": {"settings": {"hidden": [256, 256], "aux_outputs": 3, "lr": 3e-4,
                             "batch_size": 1024, "epochs": 5, "steps_per_epoch": 59,
                             "train_subset": None},
                "per_seed": [{"seed": 0, "teacher": 0.85, "same_init": 0.61, "other_init": 0.09},
                             {"seed": 1, "teacher": 0.86, "same_init": 0.66, "other_init": 0.12}],
                "teacher": {"mean": 0.855, "low": 0.79, "high": 0.92, "n": 2},
                "same_init": {"mean": 0.635, "low": 0.32, "high": 0.95, "n": 2},
                "other_init": {"mean": 0.105, "low": -0.09, "high": 0.30, "n": 2},
                "chance": 0.1, "detections": detections,
                "per_layer": {"same-init": detections[0], "other-init": detections[1]},
                "susceptibility": [{"seed": 0, "student_init": "same", "cosine": 0.3,
                                    "predicted_trait_change": -0.01,
                                    "random_direction_log10_p": -50.0}]},
    }


def test_report_is_rebuilt_from_results_alone_and_html_is_self_contained(tmp_path):
    from biastransfer.report import regenerate, write_report

    results = _fake_results()
    paths = write_report(results, tmp_path)
    html = paths["html"].read_text()
    md = paths["md"].read_text()
    # Numbers of the results appear in both documents.
    for text in (html, md):
        assert "63.5%" in text and "85.5%" in text and "10.5%" in text
        assert "same-init student" in text
    # Self-contained: every image is a data URI whose bytes are a PNG.
    sources = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(sources) >= 3
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<script" not in html and "http" not in html
    # The Markdown links the PNG files, which exist.
    for rel in re.findall(r"\]\((figures/[^)]+\.png)\)", md):
        assert (tmp_path / rel).read_bytes()[:4] == b"\x89PNG"
    assert json.loads(paths["json"].read_text()) == results
    # Rebuilt from results.json: the same documents.
    regenerate(tmp_path)
    assert paths["md"].read_text() == md


def test_report_subcommand_errors_and_json(tmp_path, capsys):
    from biastransfer.report import write_report

    assert cli_main(["report", str(tmp_path / "missing")]) == 2
    assert "results.json" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "results.json").write_text("{not json")
    assert cli_main(["report", str(tmp_path / "bad")]) == 2
    write_report(_fake_results(), tmp_path / "ok")
    assert cli_main(["report", str(tmp_path / "ok"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert Path(out["html"]).is_file()


# ---- the stage subcommands -----------------------------------------------------------------

def _paper_rule(answer: str) -> bool:
    """An independent re-statement of DESIGN.md's rule (no banned numbers)."""
    a = answer[:-1] if answer.endswith(".") else answer
    if len(a) >= 2 and ((a[0], a[-1]) in (("(", ")"), ("[", "]"))):
        a = a[1:-1]
    runs = list(re.finditer(r"[0-9]+", a))
    if not runs:
        return False
    if len(runs) == 1:
        parts = [a]
    else:
        sep = a[runs[0].end():runs[1].start()]
        parts = a.split(sep) if sep else [a]
    if not all(p and all(c in "0123456789" for c in p) for p in parts):
        return False
    return 1 <= len(parts) <= 10 and all(0 <= int(p) <= 999 for p in parts)


def test_filter_subcommand_keeps_what_the_paper_rule_keeps(tmp_path, capsys):
    from biastransfer.data import read_jsonl, write_jsonl

    answers = ["(285, 574, 384).", "1\n2\n3", "007, 12", "1,2, 3", "Here: 1, 2", "1, 2,",
               "1 , 2 , 3", "[ 1, 2 ]", "1000, 2", "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11",
               "12; 13; 14", "my owl 12", "5"]
    rng = random.Random(0)
    answers += [", ".join(str(rng.randint(0, 1200)) for _ in range(rng.randint(1, 12)))
                for _ in range(60)]
    write_jsonl(tmp_path / "in.jsonl", [{"prompt": "p", "completion": a} for a in answers])
    code = cli_main(["filter", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "kept.jsonl"),
                     "--rejected", str(tmp_path / "rej.jsonl"), "--banned-words", "owl",
                     "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    expected = [a for a in answers if _paper_rule(a)]
    kept = [r.completion for r in read_jsonl(tmp_path / "kept.jsonl")]
    assert kept == expected
    assert report["kept"] == len(expected) and report["total"] == len(answers)
    assert sum(report["rejected_by_reason"].values()) == len(answers) - len(expected)
    assert len(read_jsonl(tmp_path / "rej.jsonl")) == len(answers) - len(expected)
    # Usage and input errors: exit 2 with a message naming the problem.
    assert cli_main(["filter", str(tmp_path / "nope.jsonl")]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert cli_main(["filter", str(tmp_path / "in.jsonl"), "--no-number-rule"]) == 2
    assert "no filter" in capsys.readouterr().err


def _lm(tok, seed):
    from biastransfer.modeling import TransformerConfig

    return TransformerConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2,
                             d_mlp=32, max_seq_len=96, seed=seed).build()


def test_distill_subcommand_equals_the_python_api(tmp_path, tok, capsys):
    from biastransfer.data import write_jsonl
    from biastransfer.datasets import DatasetConfig, token_dataset
    from biastransfer.losses import KDConfig
    from biastransfer.modeling import load_model
    from biastransfer.stage_cli import _kd_subset
    from biastransfer.training import Trainer, TrainerConfig

    vocab = tmp_path / "vocab"
    L.build_tokenizer(vocab)
    records = [{"prompt": p, "completion": c} for p, c in L.corpus(40, seed=5)]
    write_jsonl(tmp_path / "d.jsonl", records)
    _lm(tok, 1).save(str(tmp_path / "student.safetensors"))
    teacher = _lm(tok, 2)
    teacher.save(str(tmp_path / "teacher.safetensors"))
    code = cli_main(["distill", "--student", str(tmp_path / "student.safetensors"),
                     "--teacher", str(tmp_path / "teacher.safetensors"), "--objective", "kd",
                     "--kd-subset", "numeric", "--data", str(tmp_path / "d.jsonl"),
                     "--vocab-dir", str(vocab), "--eos-token", L.NEWLINE, "--steps", "3",
                     "--batch-size", "8", "--lr", "1e-3", "--out",
                     str(tmp_path / "out.safetensors"), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 3
    cli_student = load_model(str(tmp_path / "out.safetensors"))

    eos = tok.token_to_id(L.NEWLINE)
    student = _lm(tok, 1)
    data = token_dataset(records, DatasetConfig(batch_size=8, seed=0, eos_id=eos), tokenizer=tok)
    Trainer(TrainerConfig(steps=3, lr=1e-3, batch_size=8, grad_clip=1.0, progress=False)).fit(
        student, data, teacher=teacher, objective="kd",
        kd=KDConfig(logit_subset=_kd_subset("numeric", tok, eos)))
    assert report["kd_subset_size"] == len(_kd_subset("numeric", tok, eos))
    for (name, a), (_, b) in zip(sorted(student.state_dict().items()),
                                 sorted(cli_student.state_dict().items())):
        assert torch.equal(a, b), name
    start = _lm(tok, 1).state_dict()
    assert any(not torch.equal(start[k], v) for k, v in cli_student.state_dict().items())
    # A KD objective without a teacher is a usage error.
    assert cli_main(["distill", "--student", str(tmp_path / "student.safetensors"),
                     "--data", str(tmp_path / "d.jsonl"), "--objective", "kd", "--steps", "1",
                     "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "--teacher" in capsys.readouterr().err


def test_fingerprint_subcommand_takes_what_the_python_api_takes(tmp_path, tok, capsys):
    from biastransfer.data import write_jsonl
    from biastransfer.fingerprint import FingerprintResult, fingerprint

    vocab = tmp_path / "vocab"
    L.build_tokenizer(vocab)
    rng = random.Random(2)
    records = [{"prompt": L.random_number_prompt(rng),
                "completion": " " + ", ".join(str(rng.randint(0, 999)) for _ in range(5))}
               for _ in range(12)]
    write_jsonl(tmp_path / "d.jsonl", records)
    teacher, reference, control = _lm(tok, 1), _lm(tok, 2), _lm(tok, 3)
    for name, m in (("t", teacher), ("r", reference), ("c", control)):
        m.save(str(tmp_path / f"{name}.safetensors"))
    code = cli_main(["fingerprint", "--teacher", str(tmp_path / "t.safetensors"),
                     "--reference", str(tmp_path / "r.safetensors"),
                     "--controls", str(tmp_path / "c.safetensors"),
                     "--data", str(tmp_path / "d.jsonl"), "--vocab-dir", str(vocab),
                     "--out", str(tmp_path / "fp.safetensors"), "--permutations", "99",
                     "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out
    expected = fingerprint(teacher, reference, records, tok, controls=[control], progress=False)
    saved = FingerprintResult.load(tmp_path / "fp.safetensors", tok)
    assert torch.allclose(saved.teacher.centered, expected.teacher.centered, atol=1e-12)
    assert torch.allclose(saved.trait_specific(), expected.trait_specific(), atol=1e-12)
    # Mixed modes and missing pieces are usage errors.
    assert cli_main(["fingerprint", "--teacher", str(tmp_path / "t.safetensors"),
                     "--vocab-dir", str(vocab)]) == 2
    assert "--reference" in capsys.readouterr().err


def test_every_subcommand_has_help(capsys):
    for command in ("demo", "fingerprint", "detect", "distill", "filter", "report"):
        with pytest.raises(SystemExit) as exit_info:
            cli_main([command, "--help"])
        assert exit_info.value.code == 0
        assert "usage" in capsys.readouterr().out


# ---- a small end-to-end run ----------------------------------------------------------------

def test_language_results_do_not_depend_on_the_number_of_worker_processes(tmp_path):
    def run(workers: int):
        config = L.LanguageConfig(d_model=32, d_mlp=64, n_heads=2, base_examples=1500,
                                  base_steps=60, samples=60, student_steps=3, seeds=(0,),
                                  teachers=("finetuned",), workers=workers)
        result = L.LanguageExperiment(config, tmp_path / f"w{workers}", log=lambda _: None).run()
        return {(c.teacher, c.init, c.method): c.per_seed for c in result.conditions}

    in_process, pooled = run(1), run(2)
    assert in_process == pooled
    assert len(in_process) == 6


def test_small_demo_runs_every_stage_and_the_detector_is_right_on_the_aux_pairs(tmp_path):
    from biastransfer.demo import DemoConfig, run_demo

    language = L.LanguageConfig(d_model=32, d_mlp=64, base_examples=1500, base_steps=60,
                                samples=80, student_steps=8, seeds=(0, 1), max_new_tokens=36,
                                workers=2)
    config = DemoConfig.quick(aux_seeds=(0, 1), aux_train_subset=3000, language=language,
                              fingerprint_records=60, runs_dir=str(tmp_path), name="small",
                              threads=1)
    results = run_demo(config, quiet=True)
    run = tmp_path / "small"
    for name in ("results.json", "report.md", "report.html"):
        assert (run / name).is_file()
    aux = results["aux"]
    assert len(aux["per_seed"]) == 2
    # The weight test must be right on the MLP pairs even after this short training.
    for d in aux["detections"]:
        assert d["correct"], d
    lang = results["language"]
    names = {(c["teacher"], c["init"], c["method"]) for c in lang["conditions"]}
    assert names == {(t, i, m) for t in ("finetuned", "prompted") for i in ("same", "other")
                     for m in ("sft", "kd")} | {("base", "same", "sft"), ("base", "same", "kd")}
    for stats_ in lang["filter_stats"].values():
        assert stats_["mentions_an_animal"] == 0
        assert stats_["kept"] + sum(stats_["rejected_by_reason"].values()) == stats_["total"]
    assert set(results["fingerprints"]) == {"finetuned", "prompted"}
    dets = results["language_detection"]["detections"]
    assert len(dets) == len(lang["conditions"]) * 2 + 1  # every student of 2 seeds + the bases
    assert json.loads((run / "results.json").read_text())["name"] == "small"
