// The one Python binding of lsap_kernels._C.
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lsap-kernels C++/CUDA kernels";
  m.def("style_normalize_fwd_cpu", &style_normalize_fwd_cpu);
  m.def("style_normalize_bwd_cpu", &style_normalize_bwd_cpu);
  m.def("sncd_fwd_cpu", &sncd_fwd_cpu);
  m.def("sncd_bwd_cpu", &sncd_bwd_cpu);
  m.def("modconv_fwd_cpu", &modconv_fwd_cpu);
  m.def("modconv_bwd_cpu", &modconv_bwd_cpu);
  m.def("modconv_scale_cpu", &modconv_scale_cpu);
  m.def("modconv_scale_bwd_cpu", &modconv_scale_bwd_cpu);
  m.def("modconv_demod_cpu", &modconv_demod_cpu);
  m.def("modconv_epilogue_fwd_cpu", &modconv_epilogue_fwd_cpu);
  m.def("modconv_epilogue_bwd_cpu", &modconv_epilogue_bwd_cpu);
  m.def("modconv_skip_bwd_cpu", &modconv_skip_bwd_cpu);
  m.def("modconv_workspace_clear_cpu", &modconv_workspace_clear_cpu);
#ifdef LSAP_WITH_CUDA
  m.attr("WITH_CUDA") = true;
  m.def("style_normalize_fwd_cuda", &style_normalize_fwd_cuda);
  m.def("style_normalize_bwd_cuda", &style_normalize_bwd_cuda);
  m.def("sncd_fwd_cuda", &sncd_fwd_cuda);
  m.def("sncd_bwd_cuda", &sncd_bwd_cuda);
#else
  m.attr("WITH_CUDA") = false;
#endif
}
