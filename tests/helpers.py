"""Shared test helpers."""
import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out − ref|| / ||ref|| in float64 (SPEC §5)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values in output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# SPEC §5 tolerances by input dtype.
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def device_for(backend: str) -> str:
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def at_thread_counts(fn, counts=(1, 2)) -> list:
    """``fn()`` run once per torch thread count in ``counts`` (the count restored after): results to compare bits."""
    old = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(old)
