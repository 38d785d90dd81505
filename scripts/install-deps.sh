#!/usr/bin/env bash
# Installs the Debian packages the project needs, only those that are missing, without prompts.
set -euo pipefail
packages=(
  build-essential cmake pkg-config git ccache nodejs npm
  libtorch-dev python3-torch pybind11-dev python3-pybind11 libeigen3-dev libfmt-dev catch2
  nlohmann-json3-dev libpcre2-dev libboost-math-dev libcli11-dev zlib1g-dev
  python3-numpy python3-scipy python3-pytest python3-matplotlib python3-tqdm python3-venv
  python3-pip python3-setuptools python3-wheel dataset-fashion-mnist libopenblas0-pthread
  clang-14 libclang-rt-14-dev
)
missing=()
for package in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$package")
done
# node and npm may come from elsewhere (nvm, NodeSource); accept working binaries.
if command -v node >/dev/null && command -v npm >/dev/null; then
  keep=()
  for package in "${missing[@]}"; do
    [[ "$package" == nodejs || "$package" == npm ]] || keep+=("$package")
  done
  missing=("${keep[@]+"${keep[@]}"}")
fi
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "deps: all Debian packages present"
  exit 0
fi
echo "deps: installing ${missing[*]}"
sudo=""
if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
