// Style normalisation and SNCD on packed styles, CPU (SPEC §4).
//
// One work item per (sample, layer) segment, reduced by one thread in a fixed lane order: the same bits for any
// thread count, and the lane loop vectorises. Accumulation in float32 (float64 for float64 styles).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "ops.h"

namespace {

constexpr int kLanes = 16;

template <typename acc_t>
inline acc_t combine_lanes(acc_t* v) {
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) v[j] += v[j + w];
  return v[0];
}

// Σ x² and, with mu, Σ x·mu over one segment of n values.
template <bool WithMu, typename scalar_t, typename acc_t>
inline void segment_sums(const scalar_t* x, const acc_t* mu, int64_t n, acc_t& sq, acc_t& dot) {
  acc_t a[kLanes] = {}, d[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const acc_t v = static_cast<acc_t>(x[i + j]);
      a[j] += v * v;
      if constexpr (WithMu) d[j] += v * mu[i + j];
    }
  for (int j = 0; i < n; ++i, ++j) {
    const acc_t v = static_cast<acc_t>(x[i]);
    a[j] += v * v;
    if constexpr (WithMu) d[j] += v * mu[i];
  }
  sq = combine_lanes(a);
  if constexpr (WithMu) dot = combine_lanes(d);
}

// Σ g·x over one segment.
template <typename scalar_t, typename acc_t>
inline acc_t segment_dot(const scalar_t* g, const scalar_t* x, int64_t n) {
  acc_t d[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) d[j] += static_cast<acc_t>(g[i + j]) * static_cast<acc_t>(x[i + j]);
  for (int j = 0; i < n; ++i, ++j) d[j] += static_cast<acc_t>(g[i]) * static_cast<acc_t>(x[i]);
  return combine_lanes(d);
}

void check_common(const at::Tensor& styles, const at::Tensor& offsets) {
  TORCH_CHECK(styles.device().is_cpu() && styles.dim() == 2, "styles must be a 2-D CPU tensor, got ",
              styles.sizes(), " on ", styles.device());
  TORCH_CHECK(offsets.device().is_cpu() && offsets.dim() == 1 && offsets.scalar_type() == at::kLong &&
                  offsets.size(0) >= 2,
              "offsets must be a 1-D int64 CPU tensor of L+1 >= 2 entries");
}

void check_acc(const char* name, const at::Tensor& t, const at::Tensor& styles) {
  const auto acc = styles.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == acc, name, " must be a CPU tensor of dtype ", acc,
              " (the accumulation dtype of ", styles.scalar_type(), " styles), got ", t.scalar_type(), " on ",
              t.device());
}

// Runs fn(b, l, begin, end) for every (sample, layer) segment, in parallel over segments.
template <typename Fn>
void for_each_segment(int64_t batch, const at::Tensor& offsets, Fn fn) {
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t layers = offsets.size(0) - 1;
  const int64_t per_item = std::max<int64_t>(1, off[layers] / layers);
  const int64_t grain = std::max<int64_t>(1, 16384 / per_item);
  at::parallel_for(0, batch * layers, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / layers, l = item % layers;
      fn(b, l, off[l], off[l + 1]);
    }
  });
}

at::Tensor acc_empty(const at::Tensor& styles, int64_t batch, int64_t layers) {
  return at::empty({batch, layers}, styles.options().dtype(at::toOpMathType(styles.scalar_type())));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> style_normalize_fwd_cpu(const at::Tensor& styles_in, const at::Tensor& offsets,
                                                           double eps) {
  check_common(styles_in, offsets);
  const auto styles = styles_in.contiguous();
  const int64_t batch = styles.size(0), width = styles.size(1), layers = offsets.size(0) - 1;
  auto out = at::empty_like(styles);
  auto norm = acc_empty(styles, batch, layers);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, styles.scalar_type(), "style_normalize_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s = styles.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    acc_t* nrm = norm.data_ptr<acc_t>();
    const acc_t e = static_cast<acc_t>(eps);
    for_each_segment(batch, offsets, [&](int64_t b, int64_t l, int64_t lo, int64_t hi) {
      const scalar_t* x = s + b * width + lo;
      acc_t sq, unused;
      segment_sums<false>(x, static_cast<const acc_t*>(nullptr), hi - lo, sq, unused);
      const acc_t n = std::sqrt(sq);
      nrm[b * layers + l] = n;
      const acc_t inv = acc_t(1) / (n < e ? e : n);  // NaN norms stay NaN
      scalar_t* y = o + b * width + lo;
      for (int64_t i = 0; i < hi - lo; ++i) y[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) * inv);
    });
  });
  return {out, norm};
}

at::Tensor style_normalize_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& styles_in, const at::Tensor& norm,
                                   const at::Tensor& offsets, double eps) {
  check_common(styles_in, offsets);
  check_acc("norm", norm, styles_in);
  TORCH_CHECK(grad_in.sizes() == styles_in.sizes() && grad_in.scalar_type() == styles_in.scalar_type(),
              "grad_out must match styles");
  const auto styles = styles_in.contiguous();
  const auto grad = grad_in.contiguous();
  const auto nrm_c = norm.contiguous();
  const int64_t batch = styles.size(0), width = styles.size(1), layers = offsets.size(0) - 1;
  auto grad_styles = at::empty_like(styles);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, styles.scalar_type(), "style_normalize_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s = styles.data_ptr<scalar_t>();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* gs = grad_styles.data_ptr<scalar_t>();
    const acc_t* nrm = nrm_c.data_ptr<acc_t>();
    const acc_t e = static_cast<acc_t>(eps);
    for_each_segment(batch, offsets, [&](int64_t b, int64_t l, int64_t lo, int64_t hi) {
      const int64_t base = b * width + lo, n = hi - lo;
      const acc_t nr = nrm[b * layers + l];
      if (nr < e) {  // ŝ = s / eps: a plain scaling
        for (int64_t i = 0; i < n; ++i) gs[base + i] = static_cast<scalar_t>(static_cast<acc_t>(g[base + i]) / e);
        return;
      }
      const acc_t inv = acc_t(1) / nr;
      const acc_t proj = segment_dot<scalar_t, acc_t>(g + base, s + base, n) * inv * inv;  // (g·ŝ)/||s||
      for (int64_t i = 0; i < n; ++i)
        gs[base + i] = static_cast<scalar_t>(
            (static_cast<acc_t>(g[base + i]) - proj * static_cast<acc_t>(s[base + i])) * inv);
    });
  });
  return grad_styles;
}

std::tuple<at::Tensor, at::Tensor> sncd_fwd_cpu(const at::Tensor& styles_in, const at::Tensor& anchors_in,
                                                const at::Tensor& offsets, double eps) {
  check_common(styles_in, offsets);
  check_acc("anchors", anchors_in, styles_in);
  const auto styles = styles_in.contiguous();
  const auto anchors = anchors_in.contiguous();
  const int64_t batch = styles.size(0), width = styles.size(1), layers = offsets.size(0) - 1;
  TORCH_CHECK(anchors.dim() == 1 && anchors.size(0) == width, "anchors must have shape [", width, "]");
  auto cos = acc_empty(styles, batch, layers);
  auto norm = acc_empty(styles, batch, layers);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, styles.scalar_type(), "sncd_fwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s = styles.data_ptr<scalar_t>();
    const acc_t* mu = anchors.data_ptr<acc_t>();
    acc_t* c = cos.data_ptr<acc_t>();
    acc_t* nrm = norm.data_ptr<acc_t>();
    const acc_t e = static_cast<acc_t>(eps);
    for_each_segment(batch, offsets, [&](int64_t b, int64_t l, int64_t lo, int64_t hi) {
      acc_t sq, dot;
      segment_sums<true>(s + b * width + lo, mu + lo, hi - lo, sq, dot);
      const acc_t n = std::sqrt(sq);
      nrm[b * layers + l] = n;
      c[b * layers + l] = dot / (n < e ? e : n);
    });
  });
  return {cos, norm};
}

at::Tensor sncd_bwd_cpu(const at::Tensor& grad_cos_in, const at::Tensor& styles_in, const at::Tensor& anchors_in,
                        const at::Tensor& cos_in, const at::Tensor& norm_in, const at::Tensor& offsets, double eps) {
  check_common(styles_in, offsets);
  check_acc("anchors", anchors_in, styles_in);
  check_acc("grad_cos", grad_cos_in, styles_in);
  check_acc("cos", cos_in, styles_in);
  check_acc("norm", norm_in, styles_in);
  const auto styles = styles_in.contiguous();
  const auto anchors = anchors_in.contiguous();
  const auto grad_cos = grad_cos_in.contiguous();
  const auto cos = cos_in.contiguous();
  const auto norm = norm_in.contiguous();
  const int64_t batch = styles.size(0), width = styles.size(1), layers = offsets.size(0) - 1;
  auto grad_styles = at::empty_like(styles);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, styles.scalar_type(), "sncd_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* s = styles.data_ptr<scalar_t>();
    const acc_t* mu = anchors.data_ptr<acc_t>();
    const acc_t* gc = grad_cos.data_ptr<acc_t>();
    const acc_t* c = cos.data_ptr<acc_t>();
    const acc_t* nrm = norm.data_ptr<acc_t>();
    scalar_t* gs = grad_styles.data_ptr<scalar_t>();
    const acc_t e = static_cast<acc_t>(eps);
    for_each_segment(batch, offsets, [&](int64_t b, int64_t l, int64_t lo, int64_t hi) {
      const int64_t base = b * width + lo, n = hi - lo, item = b * layers + l;
      const acc_t nr = nrm[item], g = gc[item];
      if (nr < e) {  // c = s·μ / eps
        for (int64_t i = 0; i < n; ++i) gs[base + i] = static_cast<scalar_t>(g * mu[lo + i] / e);
        return;
      }
      const acc_t inv = acc_t(1) / nr, g_inv = g * inv, cs = c[item] * inv;  // ∂c/∂s = (μ − c·ŝ)/||s||
      for (int64_t i = 0; i < n; ++i)
        gs[base + i] = static_cast<scalar_t>(g_inv * (mu[lo + i] - cs * static_cast<acc_t>(s[base + i])));
    });
  });
  return grad_styles;
}
