"""setuptools drives CMake: the one build of libtransfer and biastransfer._C lives in CMake.

`pip install --no-build-isolation .` and `pip install --no-build-isolation -e .` both run
CMakeBuild below, which configures and builds the CMake project, then installs its `python`
component (the extension, libtransfer.so and _build_info.py) next to the Python sources.

Environment:
  BIASTRANSFER_BUILD_DIR  CMake build folder to use (default: build/py<major><minor>); pointing
                          it at an existing build reuses its objects.
  BIASTRANSFER_JOBS       parallel build jobs (default: all cores).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _interpreter_facts(python: str) -> str | None:
    """Python and torch versions of an interpreter, or None if it cannot import torch."""
    code = "import sys, torch; print(sys.version_info[:2], torch.__version__)"
    try:
        result = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def _same_torch_as_cached(build_dir: Path) -> bool:
    """True when an existing build was configured with an interpreter of the same Python and torch
    (e.g. another venv over the same system torch): its objects can be reused as they are."""
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return False
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith("Python3_EXECUTABLE:"):
            cached = line.split("=", 1)[1]
            return cached == sys.executable or (
                _interpreter_facts(cached) is not None
                and _interpreter_facts(cached) == _interpreter_facts(sys.executable))
    return False


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        default_dir = ROOT / "build" / f"py{sys.version_info.major}{sys.version_info.minor}"
        build_dir = Path(os.environ.get("BIASTRANSFER_BUILD_DIR", default_dir)).resolve()
        jobs = os.environ.get("BIASTRANSFER_JOBS", str(os.cpu_count() or 1))
        configure = ["cmake", "-S", str(ROOT), "-B", str(build_dir)]
        if not _same_torch_as_cached(build_dir):
            configure.append(f"-DPython3_EXECUTABLE={sys.executable}")
        self._run(configure)
        self._run(["cmake", "--build", str(build_dir), "--target", "_C", "-j", jobs])
        target_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        target_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as prefix:
            self._run(["cmake", "--install", str(build_dir), "--component", "python",
                       "--prefix", prefix])
            installed = list((Path(prefix) / "biastransfer").iterdir())
            # Wheels cannot hold symlinks: keep one real file under each library's soname
            # (the name the extension asks for) instead of the versioned file and its link.
            link_targets = {item.resolve() for item in installed if item.is_symlink()}
            for item in installed:
                if not item.is_symlink() and item.resolve() in link_targets:
                    continue
                destination = target_dir / item.name
                if destination.is_symlink() or destination.exists():
                    destination.unlink()
                shutil.copy2(item, destination)

    def _run(self, command: list[str]) -> None:
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True)


setup(ext_modules=[CMakeExtension("biastransfer._C")], cmdclass={"build_ext": CMakeBuild})
