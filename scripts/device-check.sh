#!/usr/bin/env bash
# The device check, in one call: run on a machine with a GPU from the project root, after
# `../shared/gpu/bundle` built the release test and bench executables into .gpu/ (and, for the
# PyTorch tests, `cp target/release/librecap_kernels.so .gpu/`):
#
#   run(command="bash scripts/device-check.sh", carry=[".gpu"])
#
# Runs the WHOLE GPU test suite with RECAP_REQUIRE_GPU=1 (a GPU test that cannot run fails), then
# `recap bench` on the GPU. Full logs go to $OUT (or /tmp); a short summary is printed last.
set -uo pipefail
out=${OUT:-/tmp}
# cuBLAS (fused-linear path) is loaded at run time: put the toolkit's or PyTorch's copy on the path
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
  for f in "$d"/libcublas.so* "$d"/nvidia/*/lib/libcublas.so* "$d"/nvidia/cu*/lib/libcublas.so*; do
    [ -e "$f" ] && { export LD_LIBRARY_PATH="$(dirname "$f")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; echo "cuBLAS: $f"; break 2; }
  done
done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
RECAP_REQUIRE_GPU=1 bash .gpu/run-tests.sh >"$out/tests.log" 2>&1
rc=$?
grep -E "^(===|test result|FAILED|failures:)|panicked|fused loss:" "$out/tests.log" | head -80
tail -n 2 "$out/tests.log"
# the benchmark: `recap bench` (BENCH_ARGS, e.g. "--quick" or "--filter T=262144"), JSON to $out
.gpu/bin/recap bench --device cuda --json "$out/bench.json" ${BENCH_ARGS:-} 2>"$out/bench.log" || { rc=1; tail -5 "$out/bench.log"; }
# the PyTorch package's tests, when the library was bundled too (after ../shared/gpu/bundle:
# cargo build --release --lib && cp target/release/librecap_kernels.so .gpu/)
if [ -e .gpu/librecap_kernels.so ] && python3 -c "import torch, pytest" 2>/dev/null; then
  RECAP_KERNELS_LIB=.gpu/librecap_kernels.so python3 -m pytest python/tests -q >"$out/pytest.log" 2>&1 || rc=1
  tail -n 3 "$out/pytest.log"
fi
# PROFILE=1: Nsight Compute's basic sections for the kernels of one large fused-loss case
if [ "${PROFILE:-0}" = 1 ] && command -v ncu >/dev/null; then
  timeout 240 ncu --kernel-name regex:recap_grpo --launch-count 4 \
    .gpu/bin/recap bench --device cuda --quick --filter "${PROFILE_CASE:-T=262144 K=3}" >"$out/ncu.log" 2>&1
  grep -E "recap_[a-z0-9_]+|Duration|Memory Throughput|DRAM Throughput|Registers Per|Achieved Occupancy|Theoretical Occupancy" "$out/ncu.log" | head -60
fi
exit $rc
