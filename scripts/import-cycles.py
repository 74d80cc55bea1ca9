#!/usr/bin/env python3
"""Import circles between the library's source files (src/**/*.rs): exits 1 and prints each circle.

A file depends on the file that *defines* each `crate::...` path it names (a `use`, a path in code or
a type), outside comments. Paths through a facade's re-exports (`pub use` in lib.rs or a `mod.rs`:
`recap_kernels::cpu::grpo_loss`, `crate::MAX_OBJECTIVES`) are followed to the defining file, and a
facade's own `pub use` lines are not dependencies, so only real mutual dependencies between modules
count (a type declared in one file and implemented in another that uses the first, say).

    python3 scripts/import-cycles.py        # "import-cycles: N files, no circle", or the circles
"""
import re
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PATH = re.compile(r"crate::((?:[A-Za-z_]\w*::)*[A-Za-z_]\w*)(::\{([^}]*)\})?")
REEXPORT = re.compile(r"(?m)^\s*pub(?:\(crate\))? use ([^;]+);")


def code(f: Path) -> str:
    return re.sub(r"//[^\n]*", "", f.read_text())


def module_file(parts):
    """The file of the longest module prefix of `parts` (after `crate::`), and the rest."""
    for n in range(len(parts), 0, -1):
        p = "/".join(parts[:n])
        for c in (SRC / f"{p}.rs", SRC / p / "mod.rs"):
            if c.exists():
                return c, parts[n:]
    return SRC / "lib.rs", parts


def reexports(f: Path):
    """A facade's `pub use` items: name -> the full crate path it names."""
    rel = f.relative_to(SRC)
    base = [] if rel.name == "lib.rs" else list(rel.parent.parts)
    out = {}
    for m in REEXPORT.finditer(code(f)):
        text = " ".join(m.group(1).split())
        g = re.match(r"(.*?)::\{(.*)\}$", text)
        items = [f"{g.group(1)}::{i.strip()}" for i in g.group(2).split(",") if i.strip()] if g else [text]
        for item in items:
            parts = item.split(" as ")[0].strip().split("::")
            if parts[0] == "super":
                continue
            parts = parts[1:] if parts[0] == "crate" else base + parts[1:] if parts[0] == "self" else base + parts
            out[parts[-1]] = parts
    return out


def main() -> int:
    files = sorted(SRC.rglob("*.rs"))
    facades = {f: reexports(f) for f in files if f.name in ("lib.rs", "mod.rs")}

    def resolve(parts, depth=0):
        f, rest = module_file(parts)
        if rest and depth < 16 and rest[0] in facades.get(f, {}):
            return resolve(facades[f][rest[0]] + rest[1:], depth + 1)
        return f

    deps = {}
    for f in files:
        text = code(f)
        if f in facades:
            text = REEXPORT.sub("", text)
        deps[f] = set()
        for m in PATH.finditer(text):
            parts = m.group(1).split("::")
            names = [g.strip().split(" as ")[0] for g in (m.group(3) or "").split(",") if g.strip()]
            for t in ([parts + n.split("::") if n != "self" else parts for n in names] or [parts]):
                d = resolve(t)
                if d != f:
                    deps[f].add(d)

    # Tarjan's strongly connected components
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in deps[v]:
            if w not in deps:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            c = []
            while True:
                w = stack.pop()
                on.discard(w)
                c.append(w)
                if w == v:
                    break
            if len(c) > 1:
                circles.append(sorted(str(x.relative_to(SRC)) for x in c))

    sys.setrecursionlimit(10000)
    for v in files:
        if v not in index:
            visit(v)
    for c in circles:
        print("import-cycles: circle of", len(c), "files:", ", ".join(c))
    if circles:
        return 1
    print(f"import-cycles: {len(files)} files, no circle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
