#!/usr/bin/env bash
# The GPU test suite on the emulated CUDA device, on a machine without a GPU: builds emulator/
# (librecap_emulated_cuda.so, loaded as libcuda.so: the CUDA driver API and cuBLAS entry points cudarc calls, with every kernel of
# kernels/*.cu run on the host by the SIMT emulator, tests/emulator/simt.h), puts it first on
# LD_LIBRARY_PATH under the names cudarc loads (libcuda.so, libcublas.so), and runs the whole
# workspace's tests with the GPU-only ones included (RECAP_GPU_TESTS=1, --include-ignored; the C
# ABI's device path from C among them). Emulated results are not GPU results: this checks kernel
# logic, indexing, launch geometry, parameter layouts, buffer sizes and the host-side call
# sequence, never timing (docs/reliability.md).
#
#   bash scripts/emulated-gpu.sh                # the suite; prints cargo's summary lines and a total
#   bash scripts/emulated-gpu.sh --bench FILE   # recap bench --device cuda --quick --json FILE on the
#                                               # emulated device (times mean nothing; each record
#                                               # carries its launches and syncs per call)
#   EMU_TEST_ARGS="--test gpu_vs_cpu" bash scripts/emulated-gpu.sh   # a part of the suite
#
# Needs the kernels compiled (nvcc at build time: scripts/install-nvcc.sh) and a C++20 compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
target="${CARGO_TARGET_DIR:-$root/target}"

if [ -z "${NVCC:-}" ] && nvcc_line=$(scripts/install-nvcc.sh 2>/dev/null); then
  export "${nvcc_line?}"
fi
export RECAP_REQUIRE_NVCC=1   # without compiled kernels there is nothing to emulate

cargo build -q -p recap-emulated-gpu
lib_dir="$target/emulated-gpu"
mkdir -p "$lib_dir"
# links, not copies: the driver and cuBLAS must be one loaded library (one set of allocations)
for name in libcuda.so libcuda.so.1 libcublas.so; do
  ln -sfn "$target/debug/librecap_emulated_cuda.so" "$lib_dir/$name"
done
export LD_LIBRARY_PATH="$lib_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RECAP_GPU_TESTS=1
echo "emulated-gpu: driver $lib_dir/libcuda.so -> librecap_emulated_cuda.so (SMs: ${RECAP_EMU_SMS:-4})"

if [ "${1:-}" = "--bench" ]; then
  out=${2:?usage: scripts/emulated-gpu.sh --bench FILE}
  case "$out" in /*) ;; *) out="$root/$out" ;; esac
  cargo run -q --bin recap -- bench --device cuda --quick --json "$out"
  echo "emulated-gpu: bench records with launches and syncs per call in $out (times are the emulator's, not a GPU's)"
  exit 0
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
SECONDS=0
set +e
# shellcheck disable=SC2086
cargo test --workspace ${EMU_TEST_ARGS:-} -- --include-ignored >"$log" 2>&1
rc=$?
set -e
grep -E "^(     Running|test result:)|^test .* FAILED|panicked at|^emulated CUDA device:" "$log" | head -200 || true
read -r passed failed ignored < <(awk '/^test result:/ { p += $4; f += $6; i += $8 } END { print p + 0, f + 0, i + 0 }' "$log")
echo "emulated-gpu: ${SECONDS}s"
echo "emulated-gpu: $passed passed, $failed failed, $ignored skipped"
if [ "$rc" -ne 0 ]; then
  tail -n 40 "$log"
  exit "$rc"
fi
if [ "$ignored" -ne 0 ]; then
  echo "emulated-gpu: $ignored test(s) ignored: every test must run on the emulated device" >&2
  exit 1
fi
