"""The checks every public function makes on its arguments before any work: a malformed call raises
``RecapError`` (a ``ValueError``) or ``RecapTypeError`` (a ``TypeError`` too) whose message names the
argument and what was expected. Nothing here reads device memory: integer tensors on a GPU are
narrowed with saturation (a value out of range stays out of range, and the op reports it) rather
than range-checked on the host.

Also the safety net at the extension's boundary: a panic inside the extension (a bug: none is
expected) surfaces as ``RecapError`` naming the call instead of pyo3's ``PanicException`` (a
``BaseException`` that ``except Exception`` misses)."""
import functools
import math
import numbers
import torch
from torch import Tensor

from ._native import RecapError

__all__ = ["RecapTypeError", "fail", "tensor", "floats", "host_ints", "device_ints", "integer", "number",
           "options", "same_device", "guarded", "guard_module"]

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
_DEVICES = ("cpu", "cuda")
_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


class RecapTypeError(RecapError, TypeError):
    """A malformed call: an argument of the wrong type (also a ``TypeError``)."""


def fail(name: str, msg: str, type_error: bool = False):
    raise (RecapTypeError if type_error else RecapError)(f"invalid argument `{name}`: {msg}")


def tensor(name: str, x) -> Tensor:
    """``x`` as a tensor on a device the ops run on (the CPU or a CUDA device)."""
    if not isinstance(x, Tensor):
        fail(name, f"expected a torch.Tensor, got {type(x).__name__}", True)
    if x.device.type not in _DEVICES:
        fail(name, f"expected a tensor on the CPU or a CUDA device, got one on {x.device} (meta and other "
                   f"fake devices hold no data to compute on)")
    return x


def floats(name: str, x) -> Tensor:
    """A floating-point tensor as float32 (other float dtypes are cast)."""
    x = tensor(name, x)
    if not x.is_floating_point():
        fail(name, f"expected a floating-point tensor, got {x.dtype}", True)
    return x if x.dtype == torch.float32 else x.float()


def _python_ints(name: str, values, lo: int, hi: int) -> Tensor:
    out = []
    for v in values:
        if isinstance(v, Tensor) and v.dim() == 0 and v.device.type == "cpu" and v.dtype in _INT_DTYPES:
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            fail(name, f"expected integers, got {v!r} ({type(v).__name__})", True)
        v = int(v)
        if not lo <= v <= hi:
            fail(name, f"expected integers in [{lo}, {hi}], got {v}")
        out.append(v)
    return torch.tensor(out, dtype=torch.int64)


def host_ints(name: str, x, lo: int = INT32_MIN, hi: int = INT32_MAX, dtype=torch.int32) -> Tensor:
    """A small host array of integers (a list, a tuple or a CPU integer tensor) as a CPU tensor of
    ``dtype``, every value checked to lie in ``[lo, hi]`` in the caller's own dtype first (no silent
    wrap or truncation: floats and bools are refused)."""
    if isinstance(x, Tensor):
        tensor(name, x)
        if x.device.type != "cpu":
            fail(name, f"expected a CPU tensor or a list (it is read on the host before any launch; reading it "
                       f"from {x.device} would synchronize), got a tensor on {x.device}")
        if x.dtype not in _INT_DTYPES:
            fail(name, f"expected integers, got a {x.dtype} tensor", True)
        v = x.reshape(-1).to(torch.int64)
        if torch.compiler.is_compiling():
            # no data-dependent check in a traced graph: saturate, so a value out of range stays out
            # of range and the op reports it
            return v.clamp(lo, hi).to(dtype)
        if v.numel() and (int(v.min()) < lo or int(v.max()) > hi):
            fail(name, f"expected integers in [{lo}, {hi}], got values from {int(v.min())} to {int(v.max())}")
        return v.to(dtype)
    if isinstance(x, (str, bytes)) or not hasattr(x, "__iter__"):
        fail(name, f"expected a list or a CPU tensor of integers, got {type(x).__name__}", True)
    if hasattr(x, "tolist"):  # numpy arrays
        x = x.tolist()
    return _python_ints(name, list(x), lo, hi).to(dtype)


def device_ints(name: str, x: Tensor, dtype=torch.int32) -> Tensor:
    """A per-token integer tensor (labels, ids) on its own device as ``dtype``: integer dtypes only;
    a wider dtype is narrowed with saturation, so a value out of ``dtype``'s range stays out of any
    valid range and the op reports it (no host read, no silent wrap)."""
    x = tensor(name, x)
    if x.dtype not in _INT_DTYPES:
        fail(name, f"expected an integer tensor, got {x.dtype}", True)
    if x.dtype == torch.int64 and dtype == torch.int32:
        x = x.clamp(INT32_MIN, INT32_MAX)
    return x.to(dtype)


def integer(name: str, v, lo: int, hi: int) -> int:
    """A Python integer (or a 0-dim CPU integer tensor) in ``[lo, hi]``."""
    if isinstance(v, Tensor):
        if v.dim() != 0 or v.device.type != "cpu" or v.dtype not in _INT_DTYPES:
            fail(name, f"expected an integer, got a tensor {tuple(v.shape)} {v.dtype} on {v.device}", True)
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        fail(name, f"expected an integer, got {v!r} ({type(v).__name__})", True)
    if not lo <= int(v) <= hi:
        fail(name, f"expected an integer in [{lo}, {hi}], got {v}")
    return int(v)


def boolean(name: str, v) -> bool:
    """A flag: a Python or NumPy bool."""
    if not isinstance(v, bool) and type(v).__name__ != "bool_":
        fail(name, f"expected True or False, got {v!r} ({type(v).__name__})", True)
    return bool(v)


def number(name: str, v) -> float:
    """A real number: a Python number or a 0-dim CPU tensor (a GPU scalar would have to be read
    back, which synchronizes)."""
    if isinstance(v, Tensor):
        if v.dim() != 0 or v.device.type != "cpu" or v.is_complex():
            fail(name, f"expected a number (or a 0-dim CPU tensor), got a tensor {tuple(v.shape)} on {v.device}",
                 True)
        return float(v)
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        fail(name, f"expected a number, got {v!r} ({type(v).__name__})", True)
    return float(v)


def options(opts: dict) -> dict:
    """The loss options (``GrpoConfig`` fields) as JSON-able values: 0-dim CPU tensors and numpy
    scalars become numbers; any other tensor is refused naming the option."""
    def plain(k, v):
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, Tensor):
            return plain(k, number(k, v))
        if hasattr(v, "item") and hasattr(v, "dtype") and getattr(v, "ndim", 1) == 0:  # numpy scalars
            return v.item()
        if isinstance(v, numbers.Real):
            if isinstance(v, numbers.Integral):
                return int(v)
            if not math.isfinite(float(v)):
                fail(k, f"expected a finite number, got {v}")
            return float(v)
        if isinstance(v, (list, tuple)):
            return [plain(k, x) for x in v]
        if isinstance(v, dict):
            return {str(a): plain(f"{k}.{a}", x) for a, x in v.items()}
        fail(k, f"expected a number, a string, a bool or a list of them, got {type(v).__name__}", True)

    return {k: plain(k, v) for k, v in opts.items()}


def same_device(first: Tensor, **tensors) -> None:
    """Every tensor on the device of the first one (the op runs there)."""
    for name, x in tensors.items():
        if x is not None and x.device != first.device:
            fail(name, f"expected a tensor on {first.device} like the others, got one on {x.device}")


def guarded(name: str, f):
    """``f`` with a panic inside the extension turned into ``RecapError`` naming ``name``."""
    @functools.wraps(f)
    def call(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except BaseException as e:  # noqa: B036 (pyo3's PanicException is a BaseException)
            if type(e).__name__ != "PanicException":
                raise
            raise RecapError(f"internal error in {name}: {e} (a panic was caught at the extension's boundary; "
                             f"please report it)") from None
    return call


def guard_module(module) -> None:
    """Every function of the extension ``module`` wrapped by ``guarded`` (in place, once); the
    scheduler class's calls are guarded where ``weights.py`` makes them."""
    if getattr(module, "_recap_guarded", False):
        return
    for name in dir(module):
        f = getattr(module, name)
        if type(f).__name__ == "builtin_function_or_method":
            setattr(module, name, guarded(name, f))
    module._recap_guarded = True
