#!/usr/bin/env python3
"""Static statistics of every kernel, from the compiler rather than a GPU: registers, spills and
stack (ptxas -v) and the static SASS instruction count (cuobjdump -sass), per architecture, and the
checks CI makes on them.

    python3 scripts/kernel-stats.py            # print the table (kernels/*.cu, sm_80 and sm_90)
    python3 scripts/kernel-stats.py --check    # ... and fail when a check below does not hold
    python3 scripts/kernel-stats.py --json F   # ... and write the table to F (atomically)

Needs $NVCC (scripts/install-nvcc.sh) and cuobjdump + nvdisasm, installed here from PyPI into a
cached venv (pinned 13.2, $XDG_CACHE_HOME/recap-kernels/cuobjdump-13.2) unless $CUOBJDUMP names one.

The checks (the fused loss's plain kernels are the common case; the issue that set them is in the
docs/reliability.md, "Kernel statistics"):
  * no spill (stores or loads) in recap_grpo_loss_k{1,2,4,8}_{f32,u8} on any architecture;
  * the static SASS count of recap_grpo_loss_k4_u8 on sm_90 at most SASS_LIMIT.
"""
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHS = ["80", "90"]
PLAIN_NO_SPILL = [f"recap_grpo_loss_k{k}_{m}" for k in (1, 2, 4, 8) for m in ("f32", "u8")]
COUNTED = "recap_grpo_loss_k4_u8"
SASS_LIMIT = 1480
PINS = ["nvidia-cuda-cuobjdump==13.2.*", "nvidia-cuda-nvdisasm==13.2.*"]

root = Path(__file__).resolve().parent.parent


def cuobjdump() -> tuple[str, dict]:
    """The cuobjdump to run and its environment (nvdisasm beside it on PATH)."""
    if os.environ.get("CUOBJDUMP"):
        exe = os.environ["CUOBJDUMP"]
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        venv = cache / "recap-kernels" / "cuobjdump-13.2"
        stamp = venv / ".recap-pins"
        found = list(venv.glob("lib/python3*/site-packages/nvidia/cu13/bin/cuobjdump"))
        if not found or not stamp.exists() or stamp.read_text() != " ".join(PINS):
            print(f"kernel-stats: installing {' '.join(PINS)} into {venv}", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                            "--disable-pip-version-check", "--no-cache-dir", *PINS], check=True)
            stamp.write_text(" ".join(PINS))
            found = list(venv.glob("lib/python3*/site-packages/nvidia/cu13/bin/cuobjdump"))
        if not found:
            sys.exit(f"kernel-stats: cuobjdump not found in {venv}")
        exe = str(found[0])
    env = dict(os.environ)
    env["PATH"] = str(Path(exe).parent) + os.pathsep + env.get("PATH", "")
    return exe, env


def compile_stats(nvcc: str, cu: Path, arch: str, out: Path) -> dict:
    """Registers, spills and stack of each kernel of `cu` for `arch` (ptxas -v)."""
    r = subprocess.run([nvcc, "--cubin", "-O3", "-std=c++17", f"-I{root / 'kernels'}",
                        f"-arch=sm_{arch}", "-Xptxas", "-v", str(cu), "-o", str(out)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"kernel-stats: nvcc failed on {cu.name} (sm_{arch}):\n{r.stderr}")
    stats, current = {}, None
    for line in r.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = m.group(1)
            stats[current] = {"registers": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            s = stats[current]
            s["stack"], s["spill_stores"], s["spill_loads"] = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            stats[current]["registers"] = int(m.group(1))
    return stats


def sass_counts(exe: str, env: dict, cubin: Path) -> dict:
    """Static SASS instructions per kernel of a cubin."""
    r = subprocess.run([exe, "-sass", str(cubin)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"kernel-stats: cuobjdump failed on {cubin.name}:\n{r.stderr}")
    counts, fn = {}, None
    for line in r.stdout.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            fn = m.group(1)
            counts[fn] = 0
        elif fn and re.match(r"\s+/\*[0-9a-f]+\*/\s+\S", line):
            counts[fn] += 1
    return counts


def main() -> int:
    args = sys.argv[1:]
    check = "--check" in args
    json_out = args[args.index("--json") + 1] if "--json" in args else None
    nvcc = os.environ.get("NVCC")
    if not nvcc:
        line = subprocess.run(["bash", str(root / "scripts" / "install-nvcc.sh")],
                              capture_output=True, text=True, check=True).stdout.strip()
        nvcc = line.split("=", 1)[1]
    exe, env = cuobjdump()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cu in sorted((root / "kernels").glob("*.cu")):
            for arch in ARCHS:
                cubin = Path(tmp) / f"{cu.stem}.sm_{arch}.cubin"
                stats = compile_stats(nvcc, cu, arch, cubin)
                counts = sass_counts(exe, env, cubin)
                for name, s in stats.items():
                    rows.append({"file": cu.name, "arch": f"sm_{arch}", "kernel": name,
                                 **s, "sass": counts.get(name, 0)})
    print(f"{'kernel':42} {'arch':6} {'regs':>4} {'spill st':>8} {'spill ld':>8} {'stack':>5} {'SASS':>6}")
    for r in rows:
        print(f"{r['kernel']:42} {r['arch']:6} {r['registers']:4} {r['spill_stores']:8} "
              f"{r['spill_loads']:8} {r['stack']:5} {r['sass']:6}")
    failures = []
    for r in rows:
        if r["kernel"] in PLAIN_NO_SPILL and (r["spill_stores"] or r["spill_loads"]):
            failures.append(f"{r['kernel']} ({r['arch']}) spills {r['spill_stores']} B / "
                            f"{r['spill_loads']} B")
    counted = [r for r in rows if r["kernel"] == COUNTED and r["arch"] == "sm_90"]
    if not counted:
        failures.append(f"{COUNTED} (sm_90) not found")
    else:
        n = counted[0]["sass"]
        print(f"kernel-stats: {COUNTED} (sm_90): {n} SASS instructions (limit {SASS_LIMIT})")
        if n > SASS_LIMIT:
            failures.append(f"{COUNTED} (sm_90): {n} SASS instructions > the limit {SASS_LIMIT}")
    if json_out:
        path = Path(json_out)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"rows": rows, "sass_limit": SASS_LIMIT}, f, indent=1)
        os.replace(tmp, path)
    for f in failures:
        print(f"kernel-stats: FAIL {f}", file=sys.stderr)
    if check and failures:
        return 1
    print(f"kernel-stats: {len(rows)} kernel builds; "
          f"{'checks hold' if not failures else str(len(failures)) + ' check(s) fail'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
