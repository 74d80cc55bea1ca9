#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler (nvcc, NVVM, CRT headers, CCCL, runtime headers) from PyPI
# into a cached virtual environment, and prints the line `NVCC=<path>` on stdout.
#
#   scripts/install-nvcc.sh              # install (or reuse) and print NVCC=...
#   eval "$(scripts/install-nvcc.sh)"    # ... and export it into this shell (export NVCC)
#
# The venv lives in $RECAP_NVCC_VENV (default: $XDG_CACHE_HOME/recap-kernels/cuda-13.0, i.e.
# ~/.cache/recap-kernels/cuda-13.0). Every part is pinned to 13.0: unpinned, pip mixes 13.0 and
# newer parts and ptxas then rejects the PTX the front end wrote.
set -euo pipefail

venv="${RECAP_NVCC_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/recap-kernels/cuda-13.0}"
pins=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-nvvm==13.0.*"
  "nvidia-cuda-crt==13.0.*"
  "nvidia-cuda-cccl==13.0.*"
  "nvidia-cuda-runtime==13.0.*"
)
stamp="$venv/.recap-pins"

find_nvcc() {
  local p
  for p in "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc; do
    [ -x "$p" ] && { echo "$p"; return 0; }
  done
  return 1
}

if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${pins[*]}" ] || ! find_nvcc >/dev/null; then
  echo "install-nvcc: installing ${pins[*]} into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir "${pins[@]}" >&2
  echo "${pins[*]}" > "$stamp"
fi

nvcc=$(find_nvcc) || { echo "install-nvcc: nvcc not found in $venv after install" >&2; exit 1; }
# Check that the pieces fit together: compile and assemble a trivial kernel for sm_90.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf '__global__ void k(float* x) { x[threadIdx.x] *= 2.0f; }\n' > "$tmp/k.cu"
if ! "$nvcc" -arch=sm_90 -cubin -o "$tmp/k.cubin" "$tmp/k.cu" >&2; then
  echo "install-nvcc: $nvcc cannot compile a trivial kernel; remove $venv and retry" >&2
  exit 1
fi
echo "install-nvcc: $("$nvcc" --version | tail -n 2 | head -n 1)" >&2
echo "NVCC=$nvcc"
