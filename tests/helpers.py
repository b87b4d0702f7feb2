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
