import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter on CPU tensors; this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: run bench/gpu_check.sh on the device machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poisoned():
    """Uninitialised outputs come out NaN inside the block, so an element a kernel did not write shows."""
    import torch.utils.deterministic as det

    old_det, old_fill = torch.are_deterministic_algorithms_enabled(), det.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    det.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        det.fill_uninitialized_memory = old_fill
