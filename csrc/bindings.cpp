// The one Python binding of lsap_kernels._C.
//
// Every bound function runs behind raising_here(): a C++ exception is caught in this translation unit and set as
// the Python error with the CPython API, so nothing depends on pybind11's cross-module exception translation
// (translators of torch and other extensions, reached through pybind11 internals shared by every module that has
// the same ABI id, whatever compiler built it). Why: on an H100 host (torch 2.11, Python 3.12, this module built by
// another g++ than torch's) a failing TORCH_CHECK crashed the process with SIGSEGV on its way to Python, where the
// CPU CI machine raises RuntimeError. Types and messages follow torch's mapping (c10::Error -> RuntimeError, the
// message without the C++ backtrace).
#include <exception>
#include <new>
#include <utility>

#include "ops.h"
#include "weight_cache_cpu.h"

namespace py = pybind11;

namespace {

// Sets the Python error for the exception in flight; call only inside a catch block, with the GIL held.
void set_python_error() {
  try {
    throw;
  } catch (const c10::IndexError& e) {
    PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
  } catch (const c10::ValueError& e) {
    PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
  } catch (const c10::TypeError& e) {
    PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
  } catch (const c10::NotImplementedError& e) {
    PyErr_SetString(PyExc_NotImplementedError, e.what_without_backtrace());
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  } catch (...) {
    PyErr_SetString(PyExc_RuntimeError, "lsap_kernels._C: unknown C++ exception");
  }
}

// fn wrapped so that its exceptions leave as a set Python error: pybind11's dispatcher (compiled into this module)
// catches error_already_set by itself and restores the error, without consulting any translator.
template <typename R, typename... Args>
auto raising_here(R (*fn)(Args...)) {
  return [fn](Args... args) -> R {
    try {
      return fn(std::forward<Args>(args)...);
    } catch (const py::error_already_set&) {
      throw;
    } catch (...) {
      set_python_error();
    }
    throw py::error_already_set();
  };
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lsap-kernels C++/CUDA kernels";
  m.def("style_normalize_fwd_cpu", raising_here(&style_normalize_fwd_cpu));
  m.def("style_normalize_bwd_cpu", raising_here(&style_normalize_bwd_cpu));
  m.def("sncd_fwd_cpu", raising_here(&sncd_fwd_cpu));
  m.def("sncd_bwd_cpu", raising_here(&sncd_bwd_cpu));
  m.def("modconv_fwd_cpu", raising_here(&modconv_fwd_cpu));
  m.def("modconv_bwd_cpu", raising_here(&modconv_bwd_cpu));
  m.def("modconv_scale_cpu", raising_here(&modconv_scale_cpu));
  m.def("modconv_scale_bwd_cpu", raising_here(&modconv_scale_bwd_cpu));
  m.def("modconv_demod_cpu", raising_here(&modconv_demod_cpu));
  m.def("modconv_epilogue_fwd_cpu", raising_here(&modconv_epilogue_fwd_cpu));
  m.def("modconv_epilogue_bwd_cpu", raising_here(&modconv_epilogue_bwd_cpu));
  m.def("modconv_skip_bwd_cpu", raising_here(&modconv_skip_bwd_cpu));
  m.def("modconv_workspace_clear_cpu", raising_here(&modconv_workspace_clear_cpu));
  m.def("modconv_weight_cache_size_cpu", raising_here(&weight_cache_size));
  m.def("modconv_weight_cache_limit_mb_cpu", raising_here(&weight_cache_limit_mb));
#ifdef LSAP_WITH_CUDA
  m.attr("WITH_CUDA") = true;
  m.def("style_normalize_fwd_cuda", raising_here(&style_normalize_fwd_cuda));
  m.def("style_normalize_bwd_cuda", raising_here(&style_normalize_bwd_cuda));
  m.def("sncd_fwd_cuda", raising_here(&sncd_fwd_cuda));
  m.def("sncd_bwd_cuda", raising_here(&sncd_bwd_cuda));
#else
  m.attr("WITH_CUDA") = false;
#endif
}
