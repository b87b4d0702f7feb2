"""Builds lsap_kernels._C with ninja: the C++ CPU kernels always, the CUDA kernels only where torch has CUDA and
nvcc exists (arch from TORCH_CUDA_ARCH_LIST or the local GPU). A failed build leaves a working pure-PyTorch
package (with a warning at import) unless LSAP_REQUIRE_EXT=1, which CI sets."""
import glob
import os

from setuptools import setup


def extension_build():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("lsap-kernels: torch is not importable at build time; installing without the C++ extension")
        return {}

    class TolerantBuildExtension(BuildExtension):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                if os.environ.get("LSAP_REQUIRE_EXT") == "1":
                    raise
                print(f"lsap-kernels: WARNING: building {ext.name} failed ({exc}); "
                      "the package will run on its reference backend")

    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    sources = sorted(glob.glob("csrc/*_cpu.cpp")) + ["csrc/bindings.cpp"]
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) and os.environ.get("LSAP_NO_CUDA") != "1")
    if with_cuda:
        sources += sorted(glob.glob("csrc/*_cuda.cu")) + sorted(glob.glob("csrc/*_cuda_aten.cpp"))
        ext = CUDAExtension("lsap_kernels._C", sources, define_macros=[("LSAP_WITH_CUDA", "1")],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
                            extra_link_args=["-fopenmp"])
    else:
        print("lsap-kernels: building the CPU extension only (torch without CUDA, no nvcc, or LSAP_NO_CUDA=1)")
        ext = CppExtension("lsap_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": TolerantBuildExtension}}


setup(**extension_build())
