"""Shared fixtures: every test runs on the CPU (the f64 reference behind the same ops) and on CUDA
where a GPU is present. Without one the CUDA cases show as skipped; with RECAP_REQUIRE_GPU=1 they
fail instead."""
import os

import pytest
import torch

REQUIRE_GPU = os.environ.get("RECAP_REQUIRE_GPU") == "1"


def need_cuda():
    if not torch.cuda.is_available():
        if REQUIRE_GPU:
            pytest.fail("RECAP_REQUIRE_GPU=1 but torch.cuda.is_available() is False")
        pytest.skip("no CUDA device")
    import recap_kernels

    if not recap_kernels.KERNELS_COMPILED:
        if REQUIRE_GPU:
            pytest.fail("RECAP_REQUIRE_GPU=1 but recap_kernels was built without CUDA kernels")
        pytest.skip("recap_kernels built without CUDA kernels")


@pytest.fixture(params=["cpu", "cuda"])
def device(request):
    if request.param == "cuda":
        need_cuda()
    return torch.device(request.param)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
