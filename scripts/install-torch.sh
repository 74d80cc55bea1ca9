#!/usr/bin/env bash
# Installs PyTorch (it runs on the CPU without a GPU), pytest, numpy and maturin into a cached
# virtual environment for the Python package's tests, and prints the line `PYTHON=<path>` on stdout.
#
#   scripts/install-torch.sh               # install (or reuse) and print PYTHON=...
#   eval "export $(scripts/install-torch.sh)"
#
# The venv lives in $RECAP_TORCH_VENV (default: $XDG_CACHE_HOME/recap-kernels/torch-venv, i.e.
# ~/.cache/recap-kernels/torch-venv). PyPI's torch wheel for Linux pulls its CUDA libraries (about
# 5 GB): a cold install takes minutes, a warm one is a check of the stamp.
set -euo pipefail

venv="${RECAP_TORCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/recap-kernels/torch-venv}"
pins=(
  "torch==2.15.*"
  "pytest==9.*"
  "numpy==2.*"
  "maturin>=1.7,<2"
)
stamp="$venv/.recap-pins"

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${pins[*]}" ] || ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "install-torch: installing ${pins[*]} into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}" >&2
  echo "${pins[*]}" > "$stamp"
fi
echo "install-torch: $("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)')" >&2
echo "PYTHON=$venv/bin/python"
