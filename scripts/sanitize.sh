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
rc=0
for tool in ${TOOLS:-memcheck racecheck initcheck synccheck}; do
  for t in .gpu/tests/*; do
    [ -x "$t" ] || continue
    name=$(basename "$t")
    log="$out/sanitize-$tool-$name.log"
    "$san" --tool "$tool" --error-exitcode 99 --target-processes all "$t" ${FILTER:-} >"$log" 2>&1
    status=$?
    summary=$(grep -E "ERROR SUMMARY|LEAK SUMMARY" "$log" | tail -1)
    if [ $status -eq 0 ]; then echo "$tool $name: clean ${summary}"; else rc=1; echo "$tool $name: exit $status ${summary}"; fi
  done
done
exit $rc
