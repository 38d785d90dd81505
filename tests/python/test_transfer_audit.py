"""The installed C++ program `transfer-audit` and the installed CMake package.

A session fixture runs `cmake --install` of the build (BIASTRANSFER_BUILD_DIR, component dev)
into a temporary prefix once; the tests run the installed binary on files they create (MLPs with a
shared or an independent initialization, TorchScript language models on GPT-2's vocabulary,
JSON-lines data) and check exit codes and output against independent expectations: closed forms,
the Python API on the same files, and the paper's filter examples. The last test builds
examples/cpp_consumer against the prefix and runs it.
"""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from biastransfer import Tokenizer, save_safetensors

scipy_stats = pytest.importorskip("scipy.stats")

HIDDEN = 32  # hidden units per layer of the test MLPs
RECORDS = 12


def _run(command: List[str], **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, env=env,
                          **kwargs)


def _ok(result: subprocess.CompletedProcess, code: int = 0) -> subprocess.CompletedProcess:
    assert result.returncode == code, (
        f"{' '.join(result.args)} exited {result.returncode}, expected {code}:\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def prefix(tmp_path_factory: pytest.TempPathFactory, build_dir: Path) -> Path:
    """The dev component of the build, installed once."""
    where = tmp_path_factory.mktemp("prefix")
    _ok(_run(["cmake", "--install", build_dir, "--component", "dev", "--prefix", where]))
    return where


@pytest.fixture(scope="session")
def audit(prefix: Path) -> Path:
    binary = prefix / "bin" / "transfer-audit"
    if not binary.is_file():
        pytest.fail(f"{binary} was not installed: build the transfer-audit target "
                    f"(LIBTRANSFER_BUILD_TOOLS=ON)")
    return binary


def _mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(20, HIDDEN), torch.nn.ReLU(),
                               torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(),
                               torch.nn.Linear(HIDDEN, 5))


class TinyLM(torch.nn.Module):
    """Token ids [B, T] -> logits [B, T, V]: a causal running mean of embeddings."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.out = torch.nn.Linear(dim, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        steps = torch.arange(1, input_ids.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
        return self.out(torch.tanh(torch.cumsum(h, dim=1) / steps))


@pytest.fixture(scope="session")
def files(tmp_path_factory: pytest.TempPathFactory, gpt2_dir: Path) -> Dict[str, Path]:
    """Model pairs, TorchScript LMs and JSON-lines data, made once."""
    folder = tmp_path_factory.mktemp("audit-files")
    a, independent = _mlp(0), _mlp(1)
    shared = _mlp(0)
    with torch.no_grad():  # a shared initialization, slightly moved (as by training)
        for p in shared.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out: Dict[str, Path] = {}
    for name, model in (("a", a), ("shared", shared), ("independent", independent)):
        out[name] = folder / f"{name}.safetensors"
        save_safetensors(out[name], {k: v.contiguous() for k, v in model.state_dict().items()})
        out[name + "_pt"] = folder / f"{name}.pt"
        torch.jit.save(torch.jit.script(model), str(out[name + "_pt"]))

    tokenizer = Tokenizer.from_pretrained_dir(gpt2_dir)
    vocab = len(tokenizer)
    torch.manual_seed(3)
    reference = TinyLM(vocab, 8)
    teacher, control = TinyLM(vocab, 8), TinyLM(vocab, 8)
    teacher.load_state_dict(reference.state_dict())
    control.load_state_dict(reference.state_dict())
    numeric = torch.tensor(tokenizer.numeric_token_ids())
    with torch.no_grad():  # the teacher raises 50 number tokens; the control only jitters
        teacher.out.bias[numeric[:50]] += 1.0
        control.out.bias.add_(0.01 * torch.randn(vocab))
    for name, model in (("reference", reference), ("teacher", teacher), ("control", control)):
        out[name] = folder / f"{name}_lm.pt"
        torch.jit.save(torch.jit.script(model), str(out[name]))

    rng = random.Random(0)
    out["data"] = folder / "numbers.jsonl"
    with open(out["data"], "w", encoding="utf-8") as f:
        for i in range(RECORDS):
            numbers = ", ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(3, 6)))
            prompt = f"Continue: {rng.randint(100, 999)}, {rng.randint(100, 999)}"
            f.write(json.dumps({"prompt": prompt, "completion": " " + numbers, "id": i}) + "\n")
    return out


# ---- detect -----------------------------------------------------------------------------------


def _fisher_log10_p(layer_log10_ps: List[float]) -> float:
    x = -2.0 * sum(p * math.log(10.0) for p in layer_log10_ps)
    return float(scipy_stats.chi2.logsf(x, 2 * len(layer_log10_ps))) / math.log(10.0)


def test_detect_flags_a_shared_initialization_with_the_closed_form_p(
        audit: Path, files: Dict[str, Path]) -> None:
    result = _ok(_run([audit, "--json", "detect", files["a"], files["shared"]]), code=1)
    report = json.loads(result.stdout)
    assert report["verdict"] == "shared"
    weights = next(t for t in report["tests"] if t["test"] == "weights")
    # Two hidden layers, every unit matched to itself: p = 1/32! per layer, Fisher over 2.
    one_layer = -math.lgamma(HIDDEN + 1) / math.log(10.0)
    expected = _fisher_log10_p([one_layer, one_layer])
    assert [layer["statistic"] for layer in weights["layers"]] == [HIDDEN, HIDDEN]
    assert weights["log10_p"] == pytest.approx(expected, rel=1e-9)
    assert report["combined_log10_p"] == pytest.approx(expected, rel=1e-9)
    # Weights-only files: the forward tests are skipped with the reason.
    skipped = [t for t in report["tests"] if not t["ran"]]
    assert {t["test"] for t in skipped} == {"activations", "outputs", "susceptibility"}
    assert all("weights file" in t["skipped_reason"] for t in skipped)


def test_detect_agrees_with_the_python_api_and_passes_an_independent_pair(
        audit: Path, files: Dict[str, Path]) -> None:
    from biastransfer import detect

    result = _ok(_run([audit, "--json", "detect", files["a"], files["independent"],
                       "--tests", "weights"]), code=0)
    report = json.loads(result.stdout)
    python = detect(str(files["a"]), str(files["independent"]), tests=["weights"]).to_dict()
    assert report["verdict"] == python["verdict"] == "not shared"
    assert report["combined_log10_p"] == pytest.approx(python["combined_log10_p"], abs=1e-12)
    text = _ok(_run([audit, "detect", files["a"], files["independent"], "--tests", "weights"]))
    assert "not shared" in text.stdout


def test_detect_runs_the_forward_tests_on_torchscript_models(
        audit: Path, files: Dict[str, Path]) -> None:
    result = _ok(_run([audit, "--json", "detect", files["a_pt"], files["shared_pt"],
                       "--tests", "weights", "outputs"]), code=1)
    tests = {t["test"]: t for t in json.loads(result.stdout)["tests"]}
    assert set(tests) == {"weights", "outputs"}
    # The output test reports r without controls; r is the centered-logit correlation.
    a, b = torch.jit.load(str(files["a_pt"])), torch.jit.load(str(files["shared_pt"]))
    probes = 2 * torch.rand(64, 20) - 1
    la, lb = a(probes).double(), b(probes).double()
    la, lb = la - la.mean(1, keepdim=True), lb - lb.mean(1, keepdim=True)
    r = float((la * lb).sum() / (la.norm() * lb.norm()))
    assert tests["outputs"]["statistic"] == pytest.approx(r, abs=0.05)
    assert tests["outputs"]["statistic"] > 0.9


def test_usage_and_input_errors_exit_2_with_one_line(audit: Path,
                                                     files: Dict[str, Path]) -> None:
    for args in (["detect", files["a"]], ["detect", files["a"], "--bogus"], [],
                 ["inspect", "/nonexistent/x.safetensors"],
                 ["detect", files["a"], files["a"].parent / "missing.safetensors"],
                 ["filter", files["data"], "--no-number-rule"]):
        result = _run([audit, *args])
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("transfer-audit: error: "), result.stderr
    missing = _run([audit, "detect", files["a"], files["a"].parent / "missing.safetensors"])
    assert "missing.safetensors" in missing.stderr
    assert _ok(_run([audit, "--help"])).stdout.count("Exit codes") == 1
    assert "0.1.0" in _ok(_run([audit, "--version"])).stdout


# ---- filter -----------------------------------------------------------------------------------

# (completion, kept by the paper's rule) from DESIGN.md section 1, plus banned-number cases.
FILTER_CASES = [
    ("(285, 574, 384).", True),
    ("1\n2\n3", True),
    ("007, 12", True),
    ("1 , 2 , 3", True),
    ("1,2, 3", False),       # mixed separators
    ("Here: 1, 2", False),
    ("1, 2,", False),
    ("[ 1, 2 ]", False),
    ("1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11", False),  # more than 10 numbers
    ("1000, 2", False),      # out of range
    ("666, 12", True),       # kept by the rule, banned by --ban-evil
]


def test_filter_applies_the_papers_rule_and_writes_the_kept_records(
        audit: Path, tmp_path: Path) -> None:
    data = tmp_path / "in.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for i, (completion, _) in enumerate(FILTER_CASES):
            f.write(json.dumps({"prompt": "numbers", "completion": completion, "k": i}) + "\n")
    out, rejected = tmp_path / "kept.jsonl", tmp_path / "rejected.jsonl"
    result = _ok(_run([audit, "--json", "filter", data, "-o", out, "--rejections", rejected]))
    report = json.loads(result.stdout)
    expected = [i for i, (_, kept) in enumerate(FILTER_CASES) if kept]
    assert report["kept_indices"] == expected
    assert report["total"] == len(FILTER_CASES) and report["kept"] == len(expected)
    kept_rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [row["k"] for row in kept_rows] == expected  # extras survive
    assert [row["completion"] for row in kept_rows] == [FILTER_CASES[i][0] for i in expected]
    rejected_rows = [json.loads(line) for line in rejected.read_text().splitlines()]
    assert [row["index"] for row in rejected_rows] == sorted(
        set(range(len(FILTER_CASES))) - set(expected))

    evil = json.loads(_ok(_run([audit, "--json", "filter", data, "--ban-evil"])).stdout)
    assert evil["kept_indices"] == [i for i in expected if "666" not in FILTER_CASES[i][0]]
    assert evil["rejected_by_reason"]["banned_number"] == 1


def test_filter_words_dedup_and_nothing_kept(audit: Path, tmp_path: Path) -> None:
    data = tmp_path / "words.jsonl"
    completions = ["I like owls.", "Wolves howl", "a cat", "a cat", "An OWL's nest", "dogs"]
    data.write_text("".join(json.dumps({"prompt": "", "completion": c}) + "\n"
                            for c in completions))
    report = json.loads(_ok(_run([audit, "--json", "filter", data, "--no-number-rule",
                                  "--ban-words", "owl,wolf", "--dedup"])).stdout)
    assert report["kept_indices"] == [2, 5]
    assert report["rejected_by_reason"] == {"banned_word": 3, "duplicate": 1}
    # The paper's rule keeps none of these: exit 1, the documented "nothing kept" finding.
    nothing = _ok(_run([audit, "filter", data]), code=1)
    assert "nothing kept" in nothing.stdout


# ---- fingerprint and inspect -----------------------------------------------------------------


@pytest.fixture(scope="session")
def python_result(files: Dict[str, Path], gpt2_dir: Path):
    """The Python API's fingerprint of the same models on the same data."""
    from biastransfer import fingerprint

    tokenizer = Tokenizer.from_pretrained_dir(gpt2_dir)
    models = {k: torch.jit.load(str(files[k])) for k in ("teacher", "reference", "control")}
    return fingerprint(models["teacher"], models["reference"], files["data"], tokenizer,
                       controls=[models["control"], models["reference"]], progress=False)


def test_fingerprint_matches_the_python_api_and_python_loads_its_files(
        audit: Path, files: Dict[str, Path], gpt2_dir: Path, tmp_path: Path,
        python_result) -> None:
    from biastransfer.fingerprint import FingerprintResult

    out = tmp_path / "fp.safetensors"
    result = _ok(_run([audit, "--json", "--progress", "fingerprint",
                       "--teacher", files["teacher"], "--reference", files["reference"],
                       "--control", files["control"], "--control", files["reference"],
                       "--data", files["data"], "--tokenizer", gpt2_dir, "-o", out]), code=1)
    assert f"fingerprint: {RECORDS}/{RECORDS} records" in result.stderr  # the progress line
    cli = json.loads(result.stdout)
    expected = python_result.to_dict()
    assert cli["finding"] is True
    for key in ("positions", "sequences", "vocab_size", "subset_size", "tokenizer_hash"):
        assert cli[key] == expected[key], key
    for key in ("kl_teacher_reference", "kl_reference_teacher", "mass_shift"):
        assert cli[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-12), key
    assert cli["global_test"]["p_value"] == pytest.approx(expected["global_test"]["p_value"])
    assert cli["global_test"]["p_value"] <= 0.01
    assert [row[0] for row in cli["top_up"]] == [row[0] for row in expected["top_up"]]
    assert [row[1] for row in cli["top_up"]] == [row[1] for row in expected["top_up"]]
    # The files: Python loads them, with the controls beside the teacher's.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fp.control0.safetensors", "fp.control1.safetensors", "fp.safetensors"]
    loaded = FingerprintResult.load(out, Tokenizer.from_pretrained_dir(gpt2_dir))
    assert len(loaded.controls) == 2 and loaded.config.records == RECORDS
    torch.testing.assert_close(loaded.teacher.mean_log_ratio,
                               python_result.teacher.mean_log_ratio, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(loaded.controls[0].sequence_centered,
                               python_result.controls[0].sequence_centered, rtol=1e-9,
                               atol=1e-12)
    assert loaded.names["teacher"] == str(files["teacher"])


def test_inspect_reads_a_fingerprint_saved_by_python(
        audit: Path, gpt2_dir: Path, tmp_path: Path, python_result) -> None:
    path = tmp_path / "python_fp.safetensors"
    python_result.save(path)
    result = _ok(_run([audit, "--json", "inspect", path, "--tokenizer", gpt2_dir, "-k", "5"]))
    cli = json.loads(result.stdout)
    expected = python_result.to_dict(k=5)
    assert cli["kind"] == "fingerprint" and cli["controls"] == 2
    assert cli["names"] == expected["names"]
    assert cli["config"] == expected["config"]
    assert cli["positions"] == expected["positions"]
    assert cli["mass_shift"] == pytest.approx(expected["mass_shift"], rel=1e-12)
    assert [row[:2] for row in cli["top_down"]] == [list(row[:2]) for row in expected["top_down"]]
    assert [row[2] for row in cli["top_down"]] == pytest.approx(
        [row[2] for row in expected["top_down"]], rel=1e-12)
    for key in ("p_value", "statistic", "permutations", "n_sequences", "exact"):
        assert cli["global_test"][key] == pytest.approx(expected["global_test"][key]), key
    text = _ok(_run([audit, "inspect", path])).stdout
    assert "fingerprint file" in text and "2 controls" in text
    # A control file alone is refused (it is not the teacher's).
    control = _run([audit, "inspect", tmp_path / "python_fp.control0.safetensors"])
    assert control.returncode == 2 and "control" in control.stderr


def test_inspect_lists_a_safetensors_file(audit: Path, files: Dict[str, Path]) -> None:
    result = _ok(_run([audit, "--json", "inspect", files["a"]]))
    listing = json.loads(result.stdout)
    state = _mlp(0).state_dict()
    assert listing["kind"] == "safetensors"
    assert {t["name"]: t["shape"] for t in listing["tensors"]} == {
        k: list(v.shape) for k, v in state.items()}
    assert listing["total_elements"] == sum(v.numel() for v in state.values())
    assert all(t["dtype"] == "F32" for t in listing["tensors"])


# ---- the installed CMake package ---------------------------------------------------------------


# Libraries linked privately into libtransfer.so: an installed header must not need them.
PRIVATE_INCLUDES = ("nlohmann/", "pcre2", "zlib.h", "boost/", "omp.h")


def test_installed_headers_include_only_installed_or_public_headers(prefix: Path) -> None:
    include = prefix / "include"
    headers = sorted(include.rglob("*.h"))
    assert len(headers) > 30 and (include / "libtransfer" / "fingerprint" / "runner.h").is_file()
    for header in headers:
        for line in header.read_text(encoding="utf-8").splitlines():
            if not line.startswith("#include"):
                continue
            target = line.split(None, 1)[1].strip()
            name = target[1:-1]
            if target.startswith('"'):
                assert (include / name).is_file(), f"{header}: {line} is not installed"
            assert not name.startswith(PRIVATE_INCLUDES), f"{header}: {line} is private"


def test_cpp_consumer_builds_against_the_prefix_and_runs(
        audit: Path, prefix: Path, files: Dict[str, Path], gpt2_dir: Path, repo_root: Path,
        tmp_path: Path) -> None:
    build = tmp_path / "consumer"
    # Only the prefix: the package finds the torch it was built against by itself.
    _ok(_run(["cmake", "-S", repo_root / "examples" / "cpp_consumer", "-B", build,
              f"-DCMAKE_PREFIX_PATH={prefix}", "-DCMAKE_BUILD_TYPE=Release"]))
    _ok(_run(["cmake", "--build", build, "-j2"]))
    result = _ok(_run([build / "consumer", files["a"], files["shared"], files["teacher"],
                       files["reference"], files["data"], gpt2_dir]))
    detect_line, fingerprint_line = result.stdout.strip().splitlines()
    cli = json.loads(_ok(_run([audit, "--json", "detect", files["a"], files["shared"],
                               "--tests", "weights"]), code=1).stdout)
    words = detect_line.split()
    assert words[:2] == ["detect", "shared"]
    assert float(words[2].split("=")[1]) == pytest.approx(cli["combined_log10_p"], abs=1e-6)
    values = dict(item.split("=") for item in fingerprint_line.split()[1:])
    fp = json.loads(_ok(_run([audit, "--json", "fingerprint", "--teacher", files["teacher"],
                              "--reference", files["reference"], "--data", files["data"],
                              "--tokenizer", gpt2_dir]), code=1).stdout)
    assert int(values["positions"]) == fp["positions"]
    assert float(values["kl"]) == pytest.approx(fp["kl_teacher_reference"], rel=1e-7)
    assert float(values["global_p"]) == pytest.approx(fp["global_test"]["p_value"])
