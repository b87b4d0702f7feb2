// Style normalisation and SNCD on packed styles, CUDA: the ATen wrappers (SPEC §4). Checks the arguments, makes
// them contiguous, allocates the outputs and launches the kernels of style_cuda.cu (one launch per call) on the
// current stream of the styles' device. Same contract as style_cpu.cpp.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream, without CUDAContext.h's cuBLAS/cuSPARSE headers

#include <type_traits>

#include "ops.h"
#include "style_cuda.cuh"

namespace {

namespace sc = lsap::style_cuda;

// ATen scalar type -> the CUDA type the kernels take (same size and bits).
template <typename T>
struct CudaScalar {
  using type = T;
};
template <>
struct CudaScalar<at::Half> {
  using type = __half;
};
template <>
struct CudaScalar<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename scalar_t>
struct KernelTypes {
  using cuda_t = typename CudaScalar<scalar_t>::type;
  using acc_t = at::opmath_type<scalar_t>;
  static_assert(sizeof(cuda_t) == sizeof(scalar_t), "CUDA and ATen scalar types must have the same size");
  static_assert(std::is_same<acc_t, sc::acc_type<cuda_t>>::value, "kernel and ATen accumulation types differ");
};

template <typename scalar_t>
const typename CudaScalar<scalar_t>::type* cuda_ptr(const at::Tensor& t) {
  return reinterpret_cast<const typename CudaScalar<scalar_t>::type*>(t.const_data_ptr<scalar_t>());
}

template <typename scalar_t>
typename CudaScalar<scalar_t>::type* cuda_mutable_ptr(at::Tensor& t) {
  return reinterpret_cast<typename CudaScalar<scalar_t>::type*>(t.mutable_data_ptr<scalar_t>());
}

at::ScalarType acc_dtype(const at::Tensor& styles) {
  return styles.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_styles(const char* fn, const at::Tensor& styles) {
  TORCH_CHECK(styles.is_cuda(), fn, ": styles must be a CUDA tensor, got one on ", styles.device());
  TORCH_CHECK(styles.dim() == 2, fn, ": styles must be 2-D [B, C_total], got shape ", styles.sizes());
  const auto dt = styles.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, fn,
              ": styles must be float16, bfloat16, float32 or float64, got ", dt);
}

void check_offsets(const char* fn, const at::Tensor& offsets, const at::Tensor& styles) {
  TORCH_CHECK(offsets.device() == styles.device(), fn, ": offsets must be on the styles' device ", styles.device(),
              ", got ", offsets.device());
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong && offsets.size(0) >= 2, fn,
              ": offsets must be a 1-D int64 tensor of L+1 >= 2 entries, got ", offsets.scalar_type(), " of shape ",
              offsets.sizes());
}

// A tensor in the accumulation dtype on the styles' device, of the given shape.
void check_acc(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& styles,
               at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == styles.device(), fn, ": ", name, " must be on the styles' device ", styles.device(),
              ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == acc_dtype(styles), fn, ": ", name, " must have dtype ", acc_dtype(styles),
              " (the accumulation dtype of ", styles.scalar_type(), " styles), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, fn, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

void check_like_styles(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& styles) {
  TORCH_CHECK(t.device() == styles.device() && t.scalar_type() == styles.scalar_type() &&
                  t.sizes() == styles.sizes(),
              fn, ": ", name, " must match the styles (", styles.scalar_type(), " ", styles.sizes(), " on ",
              styles.device(), "), got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

void check_launch(const char* fn, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, fn, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor acc_empty(const at::Tensor& styles, int64_t batch, int64_t layers) {
  return at::empty({batch, layers}, styles.options().dtype(acc_dtype(styles)));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> style_normalize_fwd_cuda(const at::Tensor& styles_in, const at::Tensor& offsets_in,
                                                            double eps) {
  constexpr const char* fn = "style_normalize_fwd_cuda";
  check_styles(fn, styles_in);
  check_offsets(fn, offsets_in, styles_in);
  const c10::cuda::CUDAGuard guard(styles_in.device());
  const auto styles = styles_in.contiguous();
  const auto offsets = offsets_in.contiguous();
  const int64_t batch = styles.size(0), width = styles.size(1), layers = offsets.size(0) - 1;
  auto out = at::empty(styles.sizes(), styles.options());
  auto norm = acc_empty(styles, batch, layers);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(styles.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, styles.scalar_type(), fn, [&] {
    using acc_t = typename KernelTypes<scalar_t>::acc_t;
    check_launch(fn, sc::normalize_fwd(cuda_ptr<scalar_t>(styles), cuda_mutable_ptr<scalar_t>(out),
                                       norm.mutable_data_ptr<acc_t>(), offsets.const_data_ptr<int64_t>(), batch,
                                       width, layers, eps, stream));
  });
  return {out, norm};
}

at::Tensor style_normalize_bwd_cuda(const at::Tensor& grad_in, const at::Tensor& styles_in, const at::Tensor& norm_in,
                                    const at::Tensor& offsets_in, double eps) {
  constexpr const char* fn = "style_normalize_bwd_cuda";
  check_styles(fn, styles_in);
  check_offsets(fn, offsets_in, styles_in);
  check_like_styles(fn, "grad_out", grad_in, styles_in);
  const int64_t batch = styles_in.size(0), width = styles_in.size(1), layers = offsets_in.size(0) - 1;
  check_acc(fn, "norm", norm_in, styles_in, {batch, layers});
  const c10::cuda::CUDAGuard guard(styles_in.device());
  const auto styles = styles_in.contiguous();
  const auto grad = grad_in.contiguous();
  const auto norm = norm_in.contiguous();
  const auto offsets = offsets_in.contiguous();
  auto grad_styles = at::empty(styles.sizes(), styles.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(styles.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, styles.scalar_type(), fn, [&] {
    using acc_t = typename KernelTypes<scalar_t>::acc_t;
    check_launch(fn, sc::normalize_bwd(cuda_ptr<scalar_t>(grad), cuda_ptr<scalar_t>(styles),
                                       norm.const_data_ptr<acc_t>(), cuda_mutable_ptr<scalar_t>(grad_styles),
                                       offsets.const_data_ptr<int64_t>(), batch, width, layers, eps, stream));
  });
  return grad_styles;
}

std::tuple<at::Tensor, at::Tensor> sncd_fwd_cuda(const at::Tensor& styles_in, const at::Tensor& anchors_in,
                                                 const at::Tensor& offsets_in, double eps) {
  constexpr const char* fn = "sncd_fwd_cuda";
  check_styles(fn, styles_in);
  check_offsets(fn, offsets_in, styles_in);
  const int64_t batch = styles_in.size(0), width = styles_in.size(1), layers = offsets_in.size(0) - 1;
  check_acc(fn, "anchors", anchors_in, styles_in, {width});
  const c10::cuda::CUDAGuard guard(styles_in.device());
  const auto styles = styles_in.contiguous();
  const auto anchors = anchors_in.contiguous();
  const auto offsets = offsets_in.contiguous();
  auto cos = acc_empty(styles, batch, layers);
  auto norm = acc_empty(styles, batch, layers);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(styles.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, styles.scalar_type(), fn, [&] {
    using acc_t = typename KernelTypes<scalar_t>::acc_t;
    check_launch(fn, sc::sncd_fwd(cuda_ptr<scalar_t>(styles), anchors.const_data_ptr<acc_t>(),
                                  cos.mutable_data_ptr<acc_t>(), norm.mutable_data_ptr<acc_t>(),
                                  offsets.const_data_ptr<int64_t>(), batch, width, layers, eps, stream));
  });
  return {cos, norm};
}

at::Tensor sncd_bwd_cuda(const at::Tensor& grad_cos_in, const at::Tensor& styles_in, const at::Tensor& anchors_in,
                         const at::Tensor& cos_in, const at::Tensor& norm_in, const at::Tensor& offsets_in,
                         double eps) {
  constexpr const char* fn = "sncd_bwd_cuda";
  check_styles(fn, styles_in);
  check_offsets(fn, offsets_in, styles_in);
  const int64_t batch = styles_in.size(0), width = styles_in.size(1), layers = offsets_in.size(0) - 1;
  check_acc(fn, "anchors", anchors_in, styles_in, {width});
  check_acc(fn, "grad_cos", grad_cos_in, styles_in, {batch, layers});
  check_acc(fn, "cos", cos_in, styles_in, {batch, layers});
  check_acc(fn, "norm", norm_in, styles_in, {batch, layers});
  const c10::cuda::CUDAGuard guard(styles_in.device());
  const auto styles = styles_in.contiguous();
  const auto anchors = anchors_in.contiguous();
  const auto grad_cos = grad_cos_in.contiguous();
  const auto cos = cos_in.contiguous();
  const auto norm = norm_in.contiguous();
  const auto offsets = offsets_in.contiguous();
  auto grad_styles = at::empty(styles.sizes(), styles.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream(styles.device().index()).stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, styles.scalar_type(), fn, [&] {
    using acc_t = typename KernelTypes<scalar_t>::acc_t;
    check_launch(fn, sc::sncd_bwd(grad_cos.const_data_ptr<acc_t>(), cuda_ptr<scalar_t>(styles),
                                  anchors.const_data_ptr<acc_t>(), cos.const_data_ptr<acc_t>(),
                                  norm.const_data_ptr<acc_t>(), cuda_mutable_ptr<scalar_t>(grad_styles),
                                  offsets.const_data_ptr<int64_t>(), batch, width, layers, eps, stream));
  });
  return grad_styles;
}
