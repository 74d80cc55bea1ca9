"""The shipped type stub of the native extension is the one scripts/gen-stubs.py generates from the
installed extension (so it names every entry point with its current arguments), it parses, and the
package is marked typed (py.typed)."""
import ast
import importlib.util
import os

import recap_kernels
import recap_kernels._native as native

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "..", "..", "..", "scripts", "gen-stubs.py")
PKG = os.path.dirname(recap_kernels.__file__)


def generator():
    spec = importlib.util.spec_from_file_location("gen_stubs", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_native_stub_is_current():
    shipped = open(os.path.join(PKG, "_native.pyi")).read()
    assert shipped == generator().stub(native), \
        "recap_kernels/_native.pyi is stale: run `python scripts/gen-stubs.py` and reinstall"


def test_the_stub_parses_and_names_every_entry_point():
    tree = ast.parse(open(os.path.join(PKG, "_native.pyi")).read())
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    defined |= {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign)}
    public = {n for n in dir(native) if not n.startswith("_")}
    assert public <= defined, public - defined
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "kl")
    assert [a.arg for a in fn.args.args] == ["logp", "ref_logp", "mask", "estimator", "kl", "grad"]


def test_the_package_is_typed():
    assert os.path.exists(os.path.join(PKG, "py.typed"))
