#!/usr/bin/env bash
# Builds the PyTorch package as one abi3 wheel (CPython >= 3.9) that installs without Rust or nvcc:
# the kernels compiled by the pinned CUDA 13.0 compiler (scripts/install-nvcc.sh) for sm_80, sm_90
# and sm_100, plus compute_100 PTX that the driver compiles for newer GPUs; tagged with the
# manylinux policy maturin certifies on this machine (its auditwheel check of the extension's
# symbols). Prints the wheel's path on stdout.
#
#   scripts/build-wheel.sh [OUT_DIR]      # default target/wheels
#   pip install "$(scripts/build-wheel.sh)"
#
# RECAP_CUDA_ARCHS overrides the architectures (as for any build). The extension loads the CUDA
# driver at run time (libcuda, as PyTorch does), so the wheel carries no CUDA library.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/wheels}"

nvcc_line=$(scripts/install-nvcc.sh)
export "${nvcc_line?}"   # NVCC=<path>
export NVCC RECAP_REQUIRE_NVCC=1
export RECAP_CUDA_ARCHS="${RECAP_CUDA_ARCHS:-80,90,100}"
python_line=$(scripts/install-torch.sh)   # a Python with maturin
export "${python_line?}"   # PYTHON=<path>

mkdir -p "$out"
out=$(cd "$out" && pwd)   # the printed path is absolute: callers install it from anywhere
# built beside the destination, then renamed into it: no partial wheel is ever in $out
tmp=$(mktemp -d "$out/.build-wheel.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "build-wheel: kernels for $RECAP_CUDA_ARCHS with $NVCC" >&2
"$PYTHON" -m maturin build --release --manifest-path bindings/python/Cargo.toml --out "$tmp" >&2
wheels=("$tmp"/recap_kernels-*.whl)
if [ "${#wheels[@]}" != 1 ] || [ ! -f "${wheels[0]}" ]; then
  echo "build-wheel: expected one wheel from maturin, got: ${wheels[*]}" >&2
  exit 1
fi
wheel="$out/$(basename "${wheels[0]}")"
mv -f "${wheels[0]}" "$wheel"
echo "build-wheel: $wheel" >&2
echo "$wheel"
