// Style normalisation and SNCD on packed styles, CUDA kernels and their host launchers (SPEC §4).
//
// Pure CUDA: only CUDA's own headers, so style_cuda.cu compiles with plain nvcc where torch has no CUDA; the
// ATen wrappers live in style_cuda.cpp. Same contract, math and edge cases as csrc/style_cpu.cpp:
//   styles [batch, width] row-major contiguous, offsets int64 [layers + 1] on the device (segment l of a row is
//   columns offsets[l] .. offsets[l+1]); norm, cos, grad_cos [batch, layers] and anchors [width] contiguous in
//   the accumulation type acc_type<T> (float, double for double styles).
//   norm = the unclamped ||s_bl||; forward divides by max(norm, eps), NaN norms staying NaN; backward takes the
//   clamped branch (a plain scaling by 1/eps) only where norm < eps.
//
// Each launcher is ONE kernel launch covering every (sample, layer) segment; it returns cudaGetLastError() after
// the launch (cudaSuccess without a launch when batch * layers == 0, cudaErrorInvalidValue for negative sizes).
// Results are bitwise deterministic: one warp per segment, fixed reduction order, no atomics.
//
// Instantiated for T = float, double, __half, __nv_bfloat16.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace lsap {
namespace style_cuda {

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
// Accumulation type of T: float, or double for double.
template <typename T>
using acc_type = typename AccType<T>::type;

constexpr int kThreadsPerBlock = 256;                  // 8 warps per block
constexpr int kWarpsPerBlock = kThreadsPerBlock / 32;  // one warp per (sample, layer) segment

// styles_hat = styles / max(norm, eps) (in T), norm [batch, layers].
template <typename T>
cudaError_t normalize_fwd(const T* styles, T* styles_hat, acc_type<T>* norm, const int64_t* offsets, int64_t batch,
                          int64_t width, int64_t layers, double eps, cudaStream_t stream);

// grad_styles = (g − (g·ŝ)ŝ)/||s||, or g/eps where norm < eps.
template <typename T>
cudaError_t normalize_bwd(const T* grad_hat, const T* styles, const acc_type<T>* norm, T* grad_styles,
                          const int64_t* offsets, int64_t batch, int64_t width, int64_t layers, double eps,
                          cudaStream_t stream);

// cos = s·μ / max(norm, eps), norm [batch, layers].
template <typename T>
cudaError_t sncd_fwd(const T* styles, const acc_type<T>* anchors, acc_type<T>* cos, acc_type<T>* norm,
                     const int64_t* offsets, int64_t batch, int64_t width, int64_t layers, double eps,
                     cudaStream_t stream);

// grad_styles = g_cos·(μ − c·ŝ)/||s||, or g_cos·μ/eps where norm < eps.
template <typename T>
cudaError_t sncd_bwd(const acc_type<T>* grad_cos, const T* styles, const acc_type<T>* anchors,
                     const acc_type<T>* cos, const acc_type<T>* norm, T* grad_styles, const int64_t* offsets,
                     int64_t batch, int64_t width, int64_t layers, double eps, cudaStream_t stream);

// Defined and explicitly instantiated in style_cuda.cu.
#define LSAP_STYLE_CUDA_EXTERN(T)                                                                                   \
  extern template cudaError_t normalize_fwd<T>(const T*, T*, acc_type<T>*, const int64_t*, int64_t, int64_t,       \
                                               int64_t, double, cudaStream_t);                                      \
  extern template cudaError_t normalize_bwd<T>(const T*, const T*, const acc_type<T>*, T*, const int64_t*, int64_t, \
                                               int64_t, int64_t, double, cudaStream_t);                             \
  extern template cudaError_t sncd_fwd<T>(const T*, const acc_type<T>*, acc_type<T>*, acc_type<T>*,                 \
                                          const int64_t*, int64_t, int64_t, int64_t, double, cudaStream_t);         \
  extern template cudaError_t sncd_bwd<T>(const acc_type<T>*, const T*, const acc_type<T>*, const acc_type<T>*,     \
                                          const acc_type<T>*, T*, const int64_t*, int64_t, int64_t, int64_t,        \
                                          double, cudaStream_t);
LSAP_STYLE_CUDA_EXTERN(float)
LSAP_STYLE_CUDA_EXTERN(double)
LSAP_STYLE_CUDA_EXTERN(__half)
LSAP_STYLE_CUDA_EXTERN(__nv_bfloat16)
#undef LSAP_STYLE_CUDA_EXTERN

}  // namespace style_cuda
}  // namespace lsap
