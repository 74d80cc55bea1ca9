#!/usr/bin/env bash
# compute-sanitizer over the GPU test suite, on a machine with a GPU, after ../shared/gpu/bundle:
#
#   run(command="bash scripts/sanitize.sh", carry=[".gpu"])
#
# Runs memcheck, racecheck, initcheck and synccheck over each bundled test executable with
# RECAP_REQUIRE_GPU=1 (TOOLS="memcheck" to run fewer; FILTER=name to pass a test filter). The large
# cases are slow under the sanitizer: RECAP_SANITIZE=1 lets tests pick smaller shapes where they do.
# Logs go to $OUT (or /tmp); the summary says "clean" or the tool's error count per executable.
set -uo pipefail
out=${OUT:-/tmp}
san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
[ -n "$san" ] || { echo "compute-sanitizer not found"; exit 2; }
for d in /usr/local/cuda/lib64 $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
  for f in "$d"/libcublas.so* "$d"/nvidia/*/lib/libcublas.so* "$d"/nvidia/cu*/lib/libcublas.so*; do
    [ -e "$f" ] && { export LD_LIBRARY_PATH="$(dirname "$f")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; break 2; }
  done
done
export RECAP_REQUIRE_GPU=1 RECAP_SANITIZE=1
# ONLY="gpu_vs_cpu logits" limits the run to the executables whose names start so; PARALLEL=1 runs
# the tools side by side (each over the executables in turn); SANITIZE_BUDGET (seconds) stops every
# tool when it is spent (the executable then running is cut short and reported "timed out").
one_tool() {
  local tool=$1 t name log status summary r=0
  for t in .gpu/tests/*; do
    [ -x "$t" ] || continue
    name=$(basename "$t")
    if [ -n "${ONLY:-}" ]; then
      local keep=0 p
      for p in $ONLY; do case "$name" in "$p"-*|"$p") keep=1 ;; esac; done
      [ $keep = 1 ] || continue
    fi
    log="$out/sanitize-$tool-${name%%-*}.log"
    local left=$((deadline - $(date +%s)))
    if [ $left -le 5 ]; then r=1; echo "$tool $name: not run (budget spent)"; continue; fi
    timeout "$left" "$san" --tool "$tool" --error-exitcode 99 --target-processes all "$t" --include-ignored ${FILTER:-} >"$log" 2>&1
    status=$?
    summary=$(grep -E "ERROR SUMMARY|LEAK SUMMARY" "$log" | tail -1)
    if [ $status -eq 0 ]; then echo "$tool $name: clean ${summary}"
    elif [ $status -eq 124 ]; then r=1; echo "$tool $name: timed out (budget) ${summary}"
    else r=1; echo "$tool $name: exit $status ${summary}"; grep -m3 -E "^=+ +(Invalid|Race|Uninitialized|Barrier|ERROR)" "$log"; fi
  done
  return $r
}
deadline=$(( $(date +%s) + ${SANITIZE_BUDGET:-86400} ))
rc=0
if [ "${PARALLEL:-0}" = 1 ]; then
  pids=()
  for tool in ${TOOLS:-memcheck racecheck initcheck synccheck}; do one_tool "$tool" >"$out/sanitize-$tool.txt" 2>&1 & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || rc=1; done
  cat "$out"/sanitize-*.txt
else
  for tool in ${TOOLS:-memcheck racecheck initcheck synccheck}; do one_tool "$tool" || rc=1; done
fi
exit $rc
