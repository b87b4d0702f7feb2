// ATen entry points of every kernel, bound to Python in bindings.cpp.
#pragma once
#include <torch/extension.h>

#include <tuple>

// ---- style normalisation and SNCD (SPEC §4) on packed styles [B, C_total], offsets int64 [L+1] ----
// Norms, cosines and gradients accumulate in float32 (float64 for float64 styles); anchors come in that dtype.
// norm[b, l] = ||s_bl|| (unclamped): the backward takes the clamped branch when norm < eps.
std::tuple<at::Tensor, at::Tensor> style_normalize_fwd_cpu(const at::Tensor& styles, const at::Tensor& offsets,
                                                           double eps);
at::Tensor style_normalize_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& styles, const at::Tensor& norm,
                                   const at::Tensor& offsets, double eps);
std::tuple<at::Tensor, at::Tensor> sncd_fwd_cpu(const at::Tensor& styles, const at::Tensor& anchors,
                                                const at::Tensor& offsets, double eps);
at::Tensor sncd_bwd_cpu(const at::Tensor& grad_cos, const at::Tensor& styles, const at::Tensor& anchors,
                        const at::Tensor& cos, const at::Tensor& norm, const at::Tensor& offsets, double eps);

#ifdef LSAP_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> style_normalize_fwd_cuda(const at::Tensor& styles, const at::Tensor& offsets,
                                                            double eps);
at::Tensor style_normalize_bwd_cuda(const at::Tensor& grad_out, const at::Tensor& styles, const at::Tensor& norm,
                                    const at::Tensor& offsets, double eps);
std::tuple<at::Tensor, at::Tensor> sncd_fwd_cuda(const at::Tensor& styles, const at::Tensor& anchors,
                                                 const at::Tensor& offsets, double eps);
at::Tensor sncd_bwd_cuda(const at::Tensor& grad_cos, const at::Tensor& styles, const at::Tensor& anchors,
                         const at::Tensor& cos, const at::Tensor& norm, const at::Tensor& offsets, double eps);
#endif
