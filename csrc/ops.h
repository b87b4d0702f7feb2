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

// ---- modulated convolution (SPEC §3), CPU: csrc/modconv_cpu.cpp ----
// Tensors of 4 dims are read in any layout and written channels_last. The convolution runs in the activations'
// dtype, or float32 for bfloat16 activations when conv_bf16 is false (no oneDNN bf16 on this CPU). d [B, Cout]
// and the reductions are in float32 (float64 for float64 inputs). up=2: conv_out is the transposed conv's output.
std::tuple<at::Tensor, at::Tensor, at::Tensor> modconv_fwd_cpu(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& styles, const std::optional<at::Tensor>& noise,
    const std::optional<at::Tensor>& noise_strength, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& skip, double weight_gain, bool demodulate, int64_t up, bool lrelu, double gain,
    std::optional<double> clamp, double eps, bool conv_bf16);  // -> (out, conv_out, d)
std::vector<at::Tensor> modconv_bwd_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                        const at::Tensor& styles, const std::optional<at::Tensor>& noise,
                                        const std::optional<at::Tensor>& noise_strength,
                                        const std::optional<at::Tensor>& bias, const at::Tensor& conv_out,
                                        const at::Tensor& d, double weight_gain, bool demodulate, int64_t up,
                                        bool lrelu, double gain, std::optional<double> clamp, double eps,
                                        bool conv_bf16, std::vector<bool> mask);
// stage kernels of the two above (bound for tests)
at::Tensor modconv_scale_cpu(const at::Tensor& x, const at::Tensor& scale, bool to_float);
std::tuple<at::Tensor, at::Tensor> modconv_scale_bwd_cpu(const at::Tensor& grad_u, const at::Tensor& x,
                                                         const at::Tensor& scale, bool need_dx, bool need_r);
at::Tensor modconv_demod_cpu(const at::Tensor& weight, const at::Tensor& styles, double weight_gain, double eps);
at::Tensor modconv_epilogue_fwd_cpu(const at::Tensor& conv_out, const std::optional<at::Tensor>& d,
                                    const std::optional<at::Tensor>& noise,
                                    const std::optional<at::Tensor>& noise_strength,
                                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& skip,
                                    int64_t up, int64_t k, bool lrelu, double gain, std::optional<double> clamp,
                                    at::ScalarType out_type);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> modconv_epilogue_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& conv_out, const std::optional<at::Tensor>& d,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& noise_strength,
    const std::optional<at::Tensor>& bias, int64_t up, int64_t k, bool lrelu, double gain,
    std::optional<double> clamp, bool need_g_conv);  // -> (g_conv, gd, S, d_bias)
at::Tensor modconv_skip_bwd_cpu(const at::Tensor& grad);
// frees the blocks the op keeps for reuse (its caching pool, LSAP_MODCONV_WORKSPACE_MB, default 2048)
void modconv_workspace_clear_cpu();
