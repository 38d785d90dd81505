"""The package as users get it: wheel and editable installs into fresh venvs, the torch version
check at import, the installed CMake package and the command-line entry point."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SYSTEM_PYTHON = "/usr/bin/python3"

# Run from outside the source tree, with nothing of ours on the path, so that only the install
# under test can satisfy `import biastransfer`.
SMOKE = textwrap.dedent("""
    import json, sys, tempfile, os, torch, biastransfer
    from biastransfer import load_safetensors, save_safetensors
    path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
    save_safetensors(path, {"w": torch.arange(6.0).reshape(2, 3)})
    ok = torch.equal(load_safetensors(path)["w"], torch.arange(6.0).reshape(2, 3))
    print(json.dumps({"file": biastransfer.__file__, "version": biastransfer.__version__,
                      "round_trip": ok}))
""")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(extra)
    return env


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", _clean_env())
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} failed ({result.returncode}):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def _fresh_venv(folder: Path) -> Path:
    _run([SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", str(folder)])
    return folder / "bin" / "python"


def _smoke(python: Path, cwd: Path) -> dict:
    import json

    result = _run([str(python), "-c", SMOKE], cwd=cwd, env=_clean_env())
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path(SYSTEM_PYTHON).exists(), reason="needs Debian's /usr/bin/python3")
def test_wheel_installs_into_a_fresh_venv_and_imports_outside_the_tree(
        tmp_path: Path, repo_root: Path, build_dir: Path) -> None:
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
          "-w", str(dist), str(repo_root)],
         env=_clean_env(BIASTRANSFER_BUILD_DIR=str(build_dir)), cwd=repo_root)
    wheels = list(dist.glob("biastransfer-*.whl"))
    assert len(wheels) == 1, wheels
    python = _fresh_venv(tmp_path / "venv")
    _run([str(python), "-m", "pip", "install", "--no-index", "--no-deps", str(wheels[0])])
    info = _smoke(python, cwd=tmp_path)
    assert info["round_trip"] is True
    assert Path(info["file"]).is_relative_to(tmp_path / "venv"), info["file"]
    # The console script from [project.scripts] works too.
    result = _run([str(tmp_path / "venv" / "bin" / "biastransfer"), "--help"], cwd=tmp_path,
                  env=_clean_env())
    assert "demo" in result.stdout


@pytest.mark.skipif(not Path(SYSTEM_PYTHON).exists(), reason="needs Debian's /usr/bin/python3")
def test_editable_install_imports_the_source_tree(
        tmp_path: Path, repo_root: Path, build_dir: Path) -> None:
    python = _fresh_venv(tmp_path / "venv")
    _run([str(python), "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e",
          str(repo_root)], env=_clean_env(BIASTRANSFER_BUILD_DIR=str(build_dir)), cwd=repo_root)
    info = _smoke(python, cwd=tmp_path)
    assert info["round_trip"] is True
    assert Path(info["file"]) == repo_root / "python" / "biastransfer" / "__init__.py"


def test_import_refuses_a_different_torch_and_names_both_versions(repo_root: Path) -> None:
    # Pretend the running torch is another version; the check must fire before _C loads.
    code = ("import torch; torch.__version__ = '9.9.9+fake'\n"
            "import biastransfer\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=_clean_env(PYTHONPATH=str(repo_root / "python")))
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "9.9.9+fake" in result.stderr
    assert torch.__version__ in result.stderr


def test_build_info_records_the_torch_it_was_built_with() -> None:
    import biastransfer
    from biastransfer import _build_info, _C

    assert _build_info.TORCH_VERSION == torch.__version__
    # The C++ side reports the LibTorch headers' version: same major.minor.patch.
    assert torch.__version__.startswith(_C.built_with_torch)
    assert biastransfer.__version__ == _build_info.VERSION


def test_installed_cmake_package_gives_the_libtransfer_target(
        tmp_path: Path, build_dir: Path) -> None:
    prefix = tmp_path / "prefix"
    _run(["cmake", "--install", str(build_dir), "--component", "dev", "--prefix", str(prefix)])
    assert (prefix / "include" / "libtransfer" / "io" / "atomic_file.h").is_file()
    consumer = tmp_path / "consumer"
    consumer.mkdir()
    (consumer / "CMakeLists.txt").write_text(textwrap.dedent("""
        cmake_minimum_required(VERSION 3.18)
        project(consumer CXX)
        set(CMAKE_CXX_STANDARD 17)
        find_package(libtransfer 0.1 REQUIRED)
        add_executable(consumer main.cpp)
        target_link_libraries(consumer PRIVATE libtransfer::libtransfer)
    """))
    (consumer / "main.cpp").write_text(textwrap.dedent("""
        #include <iostream>
        #include "libtransfer/io/atomic_file.h"
        #include "libtransfer/version.h"
        int main(int argc, char** argv) {
          libtransfer::io::write_file_atomically(argv[1], "hello from a consumer");
          std::cout << libtransfer::version() << " " << libtransfer::built_with_torch() << " "
                    << libtransfer::io::read_file(argv[1]) << std::endl;
          return 0;
        }
    """))
    build = tmp_path / "consumer-build"
    torch_prefix = "/usr/lib/x86_64-linux-gnu/cmake"
    _run(["cmake", "-S", str(consumer), "-B", str(build),
          f"-DCMAKE_PREFIX_PATH={prefix};{torch.utils.cmake_prefix_path};{torch_prefix}"])
    _run(["cmake", "--build", str(build), "-j2"])
    out = tmp_path / "out.txt"
    result = _run([str(build / "consumer"), str(out)])
    version, built_with, *rest = result.stdout.split()
    assert version == "0.1.0"
    assert torch.__version__.startswith(built_with)
    assert " ".join(rest) == "hello from a consumer"
