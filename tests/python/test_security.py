"""Security properties (docs/security.md): no loader unpickles a user's file, and forged files
that claim huge sizes ("memory bombs") are refused quickly without allocating what they claim.

The memory bombs run in a child interpreter whose address space is capped (RLIMIT_AS), so a bomb
that did allocate fails with MemoryError there instead of exhausting this machine; the child
reports, per bomb, the error, the time taken and the growth of its peak resident memory.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "python" / "biastransfer"

# A refused bomb costs at most this much time and peak memory (the IDX reader may reserve, but
# never touch, 64 MiB; the rest is parsing a few MB of header).
BOMB_SECONDS = 5.0
BOMB_PEAK_MB = 160.0


# ------------------------------------------------------------------------------------------------
# No unpickling, by inspection of the sources


def _python_sources() -> List[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


UNSAFE_PYTHON = [
    (re.compile(r"^\s*(import|from)\s+(c?pickle|dill|joblib|shelve|marshal)\b"), "a pickle module"),
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"\b(np|numpy)\.load\([^)]*allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
    (re.compile(r"\byaml\.load\("), "yaml.load"),
]


def test_the_python_package_never_unpickles():
    found = []
    for path in _python_sources():
        text = path.read_text(encoding="utf-8")
        for number, line in enumerate(text.splitlines(), 1):
            for pattern, what in UNSAFE_PYTHON:
                if pattern.search(line):
                    found.append(f"{path.relative_to(REPO)}:{number}: {what}: {line.strip()}")
        # torch.load unpickles unless weights_only=True (torch >= 1.13).
        for match in re.finditer(r"torch\.load\(", text):
            call = text[match.start(): text.find(")", match.start()) + 1]
            if "weights_only=True" not in call:
                number = text.count("\n", 0, match.start()) + 1
                found.append(f"{path.relative_to(REPO)}:{number}: torch.load without "
                             f"weights_only=True")
    assert not found, "\n".join(found)


def test_the_cpp_code_never_unpickles():
    # TorchScript archives are the one documented exception: torch::jit::load runs a restricted
    # C++ unpickler (tensors and TorchScript classes only), and loading a module is trusting it.
    allowed = {Path("cpp/src/models/torchscript.cpp")}
    pattern = re.compile(r"\b(torch::load|pickle_load|torch::pickle_load|jit::load|"
                         r"torch::serialize::InputArchive)\b")
    found = []
    for folder in ("cpp", "bindings"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix not in (".cpp", ".h", ".hpp", ".cc"):
                continue
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if pattern.search(line) and not line.lstrip().startswith("//"):
                    relative = path.relative_to(REPO)
                    if relative not in allowed:
                        found.append(f"{relative}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


# ------------------------------------------------------------------------------------------------
# No unpickling, by experiment: a pickle whose loading would create a marker file


class _Payload:
    """Unpickling this calls open(marker, "w"): the marker's existence proves an unpickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _loaders(tmp_path: Path) -> Dict[str, Callable[[Path], Any]]:
    from biastransfer import (FingerprintResult, SafetensorsFile, Tokenizer, Trainer,
                              TrainerConfig, detect, load_model, load_safetensors,
                              load_torchscript, read_idx, read_jsonl, weight_test)

    module = torch.nn.Sequential(torch.nn.Linear(3, 2))
    data = (torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64))
    merges = tmp_path / "merges.txt"
    merges.write_text("#version: 0.2\n")
    return {
        "load_safetensors": load_safetensors,
        "SafetensorsFile": SafetensorsFile,
        "load_model": load_model,
        "load_torchscript": load_torchscript,
        "detect": lambda p: detect(p, module),
        "weight_test": lambda p: weight_test(module, p),
        "FingerprintResult.load": FingerprintResult.load,
        "Trainer.resume": lambda p: Trainer(TrainerConfig(steps=1, progress=False)).resume(
            module, data, path=p),
        "read_idx": read_idx,
        "read_jsonl": read_jsonl,
        "Tokenizer.from_files": lambda p: Tokenizer.from_files(p, merges),
        "Tokenizer.from_tokenizer_json": Tokenizer.from_tokenizer_json,
    }


@pytest.mark.parametrize("style", ["torch.save", "pickle"])
def test_pickle_payloads_are_refused_and_never_run(tmp_path, style):
    import pickle

    marker = tmp_path / "unpickled.marker"
    for suffix in (".pt", ".safetensors", ".bin"):
        path = tmp_path / f"payload{suffix}"
        if style == "torch.save":
            torch.save({"w": torch.ones(2), "x": _Payload(marker)}, path)
        else:
            path.write_bytes(pickle.dumps({"x": _Payload(marker)}))
        for name, load in _loaders(tmp_path).items():
            with pytest.raises((ValueError, OSError)) as error:
                load(path)
            assert not marker.exists(), f"{name} unpickled {path.name}"
            # The message names the file (or, for a directory-less resolver, its name).
            assert path.name in str(error.value), f"{name}: {error.value}"


# ------------------------------------------------------------------------------------------------
# Memory bombs: each writes a small forged file; the child loads it


def _safetensors_bytes(header: Dict[str, Any], data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _entry(dtype: str, shape: List[int], begin: int, end: int) -> Dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _idx_bytes(type_code: int, dims: List[int]) -> bytes:
    return bytes([0, 0, type_code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)


def _fingerprint_bomb(path: Path) -> None:
    """A valid-looking fingerprint file whose metadata claims a vocabulary of 2^40 tokens."""
    from biastransfer import _C, SafetensorsFile, load_safetensors, save_safetensors

    _C.FingerprintAccumulator(4).save(str(path))
    meta = dict(SafetensorsFile(path).metadata)
    meta["vocab_size"] = str(1 << 40)
    save_safetensors(path, load_safetensors(path), metadata=meta)


def _model_bomb(path: Path) -> None:
    """A model file whose config claims a 100000 x 100000 MLP but holds 3 small tensors."""
    from biastransfer import MLPConfig, SafetensorsFile, load_safetensors, save_safetensors

    MLPConfig(sizes=[2, 3], aux_outputs=0).build().save(str(path))
    meta = dict(SafetensorsFile(path).metadata)
    config = json.loads(meta["libtransfer.config"])
    config["sizes"] = [100_000, 100_000, 10]
    meta["libtransfer.config"] = json.dumps(config)
    save_safetensors(path, load_safetensors(path), metadata=meta)


BOMBS: Dict[str, Any] = {
    # safetensors
    "safetensors_header_length_2^63": ("safetensors", lambda p: p.write_bytes(
        struct.pack("<Q", 1 << 63) + b"{}")),
    "safetensors_terabyte_tensor_in_a_tiny_file": ("safetensors", lambda p: p.write_bytes(
        _safetensors_bytes({"w": _entry("F32", [1 << 20, 1 << 20], 0, 1 << 42)}))),
    "safetensors_shape_overflowing_int64": ("safetensors", lambda p: p.write_bytes(
        _safetensors_bytes({"w": _entry("F64", [1 << 62, 1 << 62, 4], 0, 8)}, b"\0" * 8))),
    "safetensors_million_dimension_shape": ("safetensors", lambda p: p.write_bytes(
        _safetensors_bytes({"w": _entry("U8", [1] * 1_000_000, 0, 1)}, b"\0"))),
    "safetensors_300k_tensors": ("safetensors", lambda p: p.write_bytes(_safetensors_bytes(
        {f"t{i}": _entry("U8", [0], 0, 0) for i in range(300_000)}))),
    "safetensors_deep_nesting": ("safetensors", lambda p: p.write_bytes(
        struct.pack("<Q", 200_001) + b"[" * 100_000 + b"]" * 100_000 + b" ")),
    # IDX: dimensions at and above the data cap (16 GiB), raw and gzipped, with no data
    "idx_16GiB_claimed_no_data": ("idx", lambda p: p.write_bytes(_idx_bytes(0x08, [16, 1 << 30]))),
    "idx_dims_product_overflow": ("idx", lambda p: p.write_bytes(
        _idx_bytes(0x0D, [0xFFFFFFFF] * 8))),
    "idx_gz_16GiB_claimed_no_data": ("idx.gz", lambda p: p.write_bytes(
        gzip.compress(_idx_bytes(0x08, [16, 1 << 30])))),
    # tokenizer: an id far beyond the vocabulary (a dense table would need 2^31 entries)
    "vocab_json_id_2^31": ("vocab", lambda p: p.write_text(
        json.dumps({"a": 0, "b": (1 << 31) - 1}))),
    "tokenizer_json_deep_nesting": ("tokenizer.json", lambda p: p.write_text(
        "[" * 100_000 + "]" * 100_000)),
    # JSON lines: a deeply nested line
    "jsonl_deep_nesting": ("jsonl", lambda p: p.write_text(
        '{"prompt": "a", "completion": "b", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")),
    # JSON lines: 200,000 sibling objects in a line that turns out invalid at its very end (a
    # parser callback made this quadratic: about a minute), and an object of 5,000 keys
    "jsonl_200k_sibling_objects": ("jsonl", lambda p: p.write_text(
        '{"prompt": "a", "completion": "b", "x": [' + ",".join(["{}"] * 200_000) + "]\n")),
    "jsonl_5000_keys": ("jsonl", lambda p: p.write_text(json.dumps(
        {"prompt": "a", "completion": "b", **{f"k{i}": 0 for i in range(5000)}}) + "\n")),
    # fingerprint and model files whose metadata claim huge sizes
    "fingerprint_vocab_2^40": ("fingerprint", _fingerprint_bomb),
    "model_config_10^10_weights": ("model", _model_bomb),
}

BOMB_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from pathlib import Path
    import biastransfer
    from biastransfer import (FingerprintResult, Tokenizer, load_model, load_safetensors,
                              read_idx, read_jsonl)

    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
        return 0

    merges = Path({folder!r}) / "merges.txt"
    merges.write_text("#version: 0.2\\n")
    loaders = {{
        "safetensors": load_safetensors, "idx": read_idx, "idx.gz": read_idx,
        "vocab": lambda p: Tokenizer.from_files(p, merges),
        "tokenizer.json": Tokenizer.from_tokenizer_json, "jsonl": read_jsonl,
        "fingerprint": FingerprintResult.load, "model": load_model,
    }}
    # Cap the address space 2 GiB above what the interpreter already maps.
    cap = vm_bytes() + (2 << 30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    for name, kind, path in {bombs!r}:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        try:
            loaders[kind](path)
            outcome = {{"raised": False}}
        except BaseException as e:
            outcome = {{"raised": True, "type": type(e).__name__,
                        "types": [c.__name__ for c in type(e).__mro__], "message": str(e)[:500]}}
        outcome["seconds"] = time.perf_counter() - start
        outcome["peak_growth_mb"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        print(json.dumps({{"name": name, **outcome}}), flush=True)
    """
)


@pytest.fixture(scope="module")
def bomb_outcomes(tmp_path_factory) -> Dict[str, dict]:
    folder = tmp_path_factory.mktemp("bombs")
    bombs = []
    for name, (kind, make) in BOMBS.items():
        suffix = {"safetensors": ".safetensors", "idx": ".idx", "idx.gz": ".idx.gz",
                  "vocab": ".json", "tokenizer.json": ".json", "jsonl": ".jsonl",
                  "fingerprint": ".safetensors", "model": ".safetensors"}[kind]
        path = folder / f"{name}{suffix}"
        make(path)
        bombs.append((name, kind, str(path)))
    script = BOMB_CHILD.format(folder=str(folder), bombs=bombs)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env=os.environ.copy())
    outcomes = {}
    for line in run.stdout.splitlines():
        event = json.loads(line)
        outcomes[event["name"]] = event
    for name in BOMBS:
        outcomes.setdefault(name, {"crashed": True, "why": f"child exit {run.returncode}: "
                                                           f"{run.stderr[-2000:]}"})
    return outcomes


@pytest.mark.parametrize("name", list(BOMBS))
def test_memory_bomb_is_refused_quickly_without_allocating(bomb_outcomes, name):
    outcome = bomb_outcomes[name]
    assert not outcome.get("crashed"), outcome.get("why")
    assert outcome["raised"], f"{name}: the forged file was accepted"
    assert "MemoryError" not in outcome["types"], f"{name}: it tried to allocate: {outcome}"
    assert "ValueError" in outcome["types"], f"{name}: {outcome['type']}: {outcome['message']}"
    assert name in outcome["message"], f"{name}: the message does not name the file: {outcome}"
    assert outcome["seconds"] < BOMB_SECONDS, outcome
    assert outcome["peak_growth_mb"] < BOMB_PEAK_MB, outcome


def test_fingerprint_control_names_must_be_plain_file_names(tmp_path):
    """A teacher file's metadata names its controls; a name that walks out of the folder (or is
    not a file name at all) is refused instead of followed."""
    from biastransfer import _C, load_safetensors, save_safetensors
    from biastransfer.fingerprint import FingerprintResult

    acc = _C.FingerprintAccumulator(8)
    logits = torch.randn(4, 8, dtype=torch.float64)
    acc.update(logits, logits.flip(-1), sequence_ids=torch.arange(4))
    good = tmp_path / "fp.safetensors"
    FingerprintResult.from_accumulators(acc, [acc]).save(good)
    tensors = load_safetensors(good)
    from biastransfer.safetensors import SafetensorsFile

    with SafetensorsFile(good) as handle:
        metadata = dict(handle.metadata)
    for name in ("..", "../fp.control0.safetensors", "", "sub/x.safetensors"):
        bad = tmp_path / "bad.safetensors"
        save_safetensors(bad, tensors, {**metadata, "control_files": json.dumps([name])})
        with pytest.raises(ValueError, match="plain file name"):
            FingerprintResult.load(bad)
    assert len(FingerprintResult.load(good).controls) == 1


def test_fingerprint_on_a_missing_cuda_device_is_a_value_error(tmp_path):
    from biastransfer import fingerprint
    from biastransfer.experiments.language import build_tokenizer

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    tok = build_tokenizer(tmp_path)

    def model(ids):
        return torch.zeros(ids.shape[0], ids.shape[1], tok.vocab_size)

    for device in ("cuda", "cuda:3", "nonsense"):
        with pytest.raises(ValueError, match="device"):
            fingerprint(model, model, [{"prompt": "Q:", "completion": " 12"}], tok, device=device,
                        progress=False)
