"""recap-kernels for PyTorch: the fused GRPO loss family, log-probabilities and entropy from logits
(with the gradient written back over the logits), the chunked fused-linear loss, group advantages
and RECAP's objective weights, as ``torch.library`` custom ops (``torch.ops.recap.*``) on CPU
tensors (the f64 reference) and CUDA tensors (the kernels, on the current stream).

    import recap_kernels as rk
    logp, entropy = rk.logprobs_from_logits(logits, labels, temperature=1.0)
    loss, metrics = rk.grpo_loss(logp, old_logp, advantages, response_mask, ref_logp=ref_logp, kl_coef=0.01)
    loss.backward()

Drop-ins: ``recap_kernels.verl`` (verl's policy-loss signature and registry), ``recap_kernels.trl``
(TRL's GRPO loss); data parallelism: ``recap_kernels.distributed.global_normalizers``.
"""
import warnings

import torch

from . import _native
from ._args import RecapTypeError, guard_module

guard_module(_native)  # a panic inside the extension surfaces as RecapError naming the call

from . import ops  # noqa: E402  (after the guard: the ops call the guarded functions)
from ._native import CUDA_ARCHS, KERNELS_COMPILED, RecapError  # noqa: E402
from .functional import *  # noqa: E402,F401,F403  (the ops; their names are functional.__all__)
from . import functional  # noqa: E402
from .weights import RecapWeights
from . import distributed, tensor_parallel, trl, verl  # noqa: E402  (the drop-ins; they import verl / TRL only when asked)

__version__ = _native.__version__

__all__ = ["__version__", "KERNELS_COMPILED", "CUDA_ARCHS", "RecapTypeError", "RecapWeights", "ops", "distributed",
           "tensor_parallel", "trl", "verl"] + functional.__all__

if not KERNELS_COMPILED and torch.cuda.is_available():
    warnings.warn("recap_kernels was built without CUDA kernels (no nvcc at build time): CUDA tensors will raise "
                  "RecapError. Run scripts/install-nvcc.sh, then reinstall (pip install ./bindings/python).",
                  RuntimeWarning, stacklevel=2)
