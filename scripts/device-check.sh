#!/usr/bin/env bash
# The device check, in one call: run on a machine with a GPU from the project root, after
# `../shared/gpu/bundle` built the release test and bench executables into .gpu/ (and, for the
# PyTorch package's tests, `maturin build --release -m bindings/python/Cargo.toml -o .gpu` put its
# wheel there, with the kernels: the pinned nvcc is found by build.rs):
#
#   run(command="bash scripts/device-check.sh", carry=[".gpu"])
#
# The bundle is about 75 MiB with the library, over the 64 MiB a device call carries: pack it
# (`mkdir -p .gpz && tar cJf .gpz/gpu.tar.xz .gpu`, about 5 MiB; keep .gpz out of git) and run
# `tar xJf .gpz/gpu.tar.xz && bash scripts/device-check.sh` with carry=[".gpz", ".whl"].
#
# Runs the WHOLE GPU test suite (the ignored GPU-only tests included) with RECAP_REQUIRE_GPU=1 (a GPU test that cannot run fails), the
# PyTorch package's tests, `recap bench` on the GPU, then (PEERS=1) the PyTorch / Liger-Kernel peers
# on the same shapes and the merged markdown table. Liger-Kernel travels as a wheel in .whl/ (carry
# it too): `pip download --no-deps -d .whl liger-kernel`. Full logs go to $OUT (or /tmp).
# SANITIZE=1 runs scripts/sanitize.sh (SANITIZE_BUDGET seconds, ONLY=...) beside the tests and waits
# for it before the bench. The device tool brings back at most 8 files: the logs come back as one
# device-check.tgz beside bench.json, peers.json and table.md.
set -uo pipefail
final=${OUT:-/tmp}
out=$(mktemp -d)
# cuBLAS (fused-linear path) is loaded at run time: put the toolkit's or PyTorch's copy on the path
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
  for f in "$d"/libcublas.so* "$d"/nvidia/*/lib/libcublas.so* "$d"/nvidia/cu*/lib/libcublas.so*; do
    [ -e "$f" ] && { export LD_LIBRARY_PATH="$(dirname "$f")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; echo "cuBLAS: $f"; break 2; }
  done
done
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
SECONDS=0
if [ "${SANITIZE:-0}" = 1 ]; then
  OUT=$out PARALLEL=1 bash scripts/sanitize.sh >"$out/sanitize.txt" 2>&1 &
  sanitize_pid=$!
fi
# --include-ignored: the GPU-only tests, compiled as ignored on the build machine without a GPU
timeout "${TESTS_TIMEOUT:-300}" env RECAP_REQUIRE_GPU=1 bash .gpu/run-tests.sh --include-ignored >"$out/tests.log" 2>&1
rc=$?
grep -E "^(===|test result|FAILED|failures:)|panicked|fused loss:" "$out/tests.log" | head -80
tail -n 2 "$out/tests.log"
echo "tests: ${SECONDS}s"
# the PyTorch package's tests on CPU and CUDA (RECAP_REQUIRE_GPU=1: a CUDA case that cannot run
# fails), when its wheel was bundled: installed without dependencies beside the machine's PyTorch
if ls .gpu/recap_kernels-*.whl >/dev/null 2>&1 && python3 -c "import torch, pytest" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/recap_kernels-*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  (cd /tmp && RECAP_REQUIRE_GPU=1 timeout "${PYTEST_TIMEOUT:-180}" python3 -m pytest "$OLDPWD/bindings/python/tests" -q \
    -p no:cacheprovider) >"$out/pytest.log" 2>&1 || rc=1
  grep -E "^FAILED|passed|failed" "$out/pytest.log" | tail -n 20; echo "pytest done at ${SECONDS}s"
fi
if [ -n "${sanitize_pid:-}" ]; then
  wait "$sanitize_pid" || rc=1
  cat "$out/sanitize.txt"; echo "sanitizer done at ${SECONDS}s"
fi
# the benchmark: `recap bench` (BENCH_ARGS, e.g. "--quick" or "--filter T=262144"), JSON to $out
timeout "${BENCH_TIMEOUT:-240}" .gpu/bin/recap bench --device cuda --json "$out/bench.json" ${BENCH_ARGS:-} >"$out/bench.txt" 2>"$out/bench.log" || { rc=1; tail -5 "$out/bench.log"; }
cut -c1-150 "$out/bench.txt" | grep -v " forward\| backward" | head -60
echo "bench done at ${SECONDS}s"
# the peers on the same GPU and shapes, then one table (PEERS=1; PEERS_ARGS e.g. "--quick")
if [ "${PEERS:-0}" = 1 ] && [ -s "$out/bench.json" ]; then
  timeout "${PEERS_TIMEOUT:-240}" python3 benches/peers/grpo_peers.py --recap "$out/bench.json" \
    --json "$out/peers.json" ${PEERS_ARGS:-} >"$out/peers.log" 2>&1 || { rc=1; tail -5 "$out/peers.log"; }
  [ -s "$out/peers.json" ] && python3 benches/peers/merge.py "$out/bench.json" "$out/peers.json" >"$out/table.md"
  grep -E "MISMATCH|failed|not importable" "$out/peers.log" | head -20
  echo "peers done at ${SECONDS}s"
fi
# PROFILE=1: Nsight Compute's basic sections for the kernels of the first call of each bench case
# in PROFILE_CASES ('|'-separated --filter strings)
if [ "${PROFILE:-0}" = 1 ] && command -v ncu >/dev/null; then
  IFS='|' read -ra cases <<<"${PROFILE_CASES:-T=262144 K=3|T=16777216 K=3}"
  for c in "${cases[@]}"; do
    log="$out/ncu-${c// /_}.log"
    timeout "${PROFILE_TIMEOUT:-120}" ncu --kernel-name regex:recap_ --launch-count "${PROFILE_LAUNCHES:-6}" \
      .gpu/bin/recap bench --device cuda --filter "$c" >"$log" 2>&1
    echo "--- ncu: $c"
    grep -E "^  recap_[a-z0-9_]+|^    (Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Registers Per Thread|Achieved Occupancy)" "$log" | head -60
  done
  echo "profile done at ${SECONDS}s"
fi
for f in bench.json peers.json table.md; do [ -s "$out/$f" ] && cp "$out/$f" "$final/"; done
tar czf "$final/device-check.tgz" -C "$out" . && echo "logs: device-check.tgz"
exit $rc
