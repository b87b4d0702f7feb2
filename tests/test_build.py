"""Build checks that need no GPU and no CUDA build of torch.

* Every csrc/*.cu compiles with plain nvcc for sm_90 and sm_80. The .cu files hold pure CUDA (kernels and
  host launchers on raw pointers, CUDA's own headers only); the ATen glue lives in csrc/*_cuda_aten.cpp.
* Those *_cuda_aten.cpp wrappers, and bindings.cpp, pass `g++ -fsyntax-only -DLSAP_WITH_CUDA` against the installed
  torch headers (a CPU wheel ships the c10/cuda headers but not the generated c10/cuda/impl/cuda_cmake_macros.h,
  hence -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE) and the CUDA toolkit headers.

Skipped only when nvcc (or, for the syntax check, a C++ compiler or the toolkit headers) cannot be found.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ARCHS = ["sm_90", "sm_80"]


def _cuda_homes() -> list[Path]:
    homes = [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    return homes + [Path("/usr/local/cuda")]


def find_nvcc() -> str | None:
    candidates = [shutil.which("nvcc")] + [str(home / "bin" / "nvcc") for home in _cuda_homes()]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def find_cuda_include(nvcc: str | None) -> Path | None:
    """The toolkit's include directory (the one with cuda_runtime.h)."""
    candidates = [home / "include" for home in _cuda_homes()]
    if nvcc:  # nvcc may be a wrapper script elsewhere (e.g. /usr/local/bin): try its real and its own location
        candidates += [Path(nvcc).resolve().parent.parent / "include", Path(nvcc).parent.parent / "include"]
    return next((c for c in candidates if (c / "cuda_runtime.h").is_file()), None)


NVCC = find_nvcc()
CU_SOURCES = sorted(CSRC.glob("*.cu"))
CUDA_CPP_SOURCES = sorted(CSRC.glob("*_cuda_aten.cpp")) + [CSRC / "bindings.cpp"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)


def _assert_ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, (f"command failed (rc={res.returncode}):\n{' '.join(res.args)}\n"
                                 f"{res.stderr}{res.stdout}")


def _nvcc_command(source: Path, arch: str, out_dir: Path) -> list[str]:
    cc = arch.removeprefix("sm_")
    return [NVCC, "-std=c++17", "-O3", "-lineinfo", "-DLSAP_WITH_CUDA=1", f"-gencode=arch=compute_{cc},code={arch}",
            "-I", str(CSRC), "-c", str(source), "-o", str(out_dir / f"{source.stem}_{arch}.o")]


def _syntax_check_flags() -> list[str] | str:
    """g++ flags for the syntax check, or why it cannot run here."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        return "no C++ compiler"
    cuda_include = find_cuda_include(NVCC)
    if cuda_include is None:
        return "CUDA toolkit headers (cuda_runtime.h) not found"
    from torch.utils.cpp_extension import include_paths

    torch_includes = [Path(p) for p in include_paths()]
    if not any((p / "c10" / "cuda" / "CUDAStream.h").is_file() for p in torch_includes):
        return "this torch ships no c10/cuda headers"
    isystem = [*torch_includes, Path(sysconfig.get_paths()["include"]), cuda_include]
    return [cxx, "-fsyntax-only", "-std=c++17", "-Wall", "-Wextra",
            *[arg for p in isystem for arg in ("-isystem", str(p))], "-I", str(CSRC),
            "-DLSAP_WITH_CUDA=1", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DTORCH_EXTENSION_NAME=_C",
            "-DTORCH_API_INCLUDE_EXTENSION_H"]


@pytest.fixture(scope="module")
def compile_jobs(request, tmp_path_factory):
    """Starts every compile this module's selected tests need at once (they take 10-40 s each), so they run in
    parallel; maps a test's node id to the future of its CompletedProcess."""
    out_dir = tmp_path_factory.mktemp("build")
    flags = _syntax_check_flags()
    commands = {}
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is None or item.module.__name__ != __name__ or "source" not in params:
            continue
        if item.originalname == "test_cuda_sources_compile" and NVCC is not None:
            commands[item.nodeid] = _nvcc_command(params["source"], params["arch"], out_dir)
        elif item.originalname == "test_cuda_wrappers_syntax" and not isinstance(flags, str):
            commands[item.nodeid] = [*flags, str(params["source"])]
    with ThreadPoolExecutor(max_workers=max(1, min(len(commands), os.cpu_count() or 1))) as pool:
        yield {nodeid: pool.submit(_run, cmd) for nodeid, cmd in commands.items()}


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda/bin)")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_cuda_sources_compile(source, arch, compile_jobs, request):
    _assert_ok(compile_jobs[request.node.nodeid].result())


@pytest.mark.parametrize("source", CUDA_CPP_SOURCES, ids=lambda p: p.name)
def test_cuda_wrappers_syntax(source, compile_jobs, request):
    flags = _syntax_check_flags()
    if isinstance(flags, str):
        pytest.skip(flags)
    _assert_ok(compile_jobs[request.node.nodeid].result())
