// Winograd F(2×2, 3×3) convolution on CPU (interface and contract: winograd_cpu.h).
//
// Why: the stride-1 3×3 convolutions are most of an inversion step's time on CPU, and oneDNN runs them at the rate
// of a direct convolution. F(2×2, 3×3) computes each 2×2 output tile from a 4×4 input tile with 16 multiplies per
// channel pair where the direct form needs 36 (2.25× fewer): V = Bᵀ d B per input tile, M[ξ] = V[ξ] · U[ξ] as 16
// GEMMs over the channels (U = G g Gᵀ, the transformed weights, once per call), Y = Aᵀ M A. Rounding: about
// 1e-6 relative in float32 (SPEC §5 allows 1e-5; measured in tests/test_modconv_cpu.py).
//
// Work items are chunks of tiles (taken in (b, ty, tx) order); one thread runs a chunk's three stages back to back
// on its own buffers (V and M of a chunk are a few MB: they stay in L2/L3, and are kept for the next call). Each
// output element is computed by the same sequence of operations whatever the chunk size or thread count: no
// reductions across work items. Measured against oneDNN: bench/bench_cpu_winograd.py.
#include "winograd_cpu.h"

#include "weight_cache_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace {

constexpr int kMr = 6;          // GEMM rows (tiles) per register block: 6 × 16 accumulators = 12 ymm registers
constexpr int64_t kKc = 256;    // GEMM depth (channels) per block: a 256 × 16 weight panel is 16 KB (L1)
constexpr int64_t kVFloats = 65536;  // target size of one V[ξ] of a chunk (256 KB: its kKc-wide stripe stays in L2)

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

namespace wino_generic {
#define LSAP_TARGET
#include "winograd_cpu_kernels.h"
#undef LSAP_TARGET
}  // namespace wino_generic

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
namespace wino_avx2 {
#define LSAP_TARGET __attribute__((target("avx2,fma")))
#define LSAP_WINO_AVX2
#include "winograd_cpu_kernels.h"
#undef LSAP_WINO_AVX2
#undef LSAP_TARGET
}  // namespace wino_avx2

bool has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#define WISA(...) (has_avx2() ? wino_avx2::__VA_ARGS__ : wino_generic::__VA_ARGS__)
#else
#define WISA(...) wino_generic::__VA_ARGS__
#endif

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// U[ξ][nb][k][j] = (G g Gᵀ)[ξ] for the filter g from input channel k to output channel n = 16·nb + j (zero for
// n ≥ N), G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]. adjoint: g = weight[k, n] flipped.
at::Tensor transform_weight_uncached(const at::Tensor& weight, bool adjoint, int64_t K, int64_t N, int64_t Np) {
  const auto w = weight.to(at::kFloat).contiguous();
  const float* wp = w.data_ptr<float>();
  const int64_t nblocks = Np / 16;
  auto out = at::empty({16 * Np * K}, w.options());
  float* U = out.data_ptr<float>();
  at::parallel_for(0, nblocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t j = 0; j < 16; ++j) {
          const int64_t n = nb * 16 + j;
          float g[9] = {};
          if (n < N)
            for (int q = 0; q < 9; ++q) g[q] = adjoint ? wp[(k * N + n) * 9 + 8 - q] : wp[(n * K + k) * 9 + q];
          float h[12];  // G g: 4 × 3
          for (int c = 0; c < 3; ++c) {
            h[c] = g[c];
            h[3 + c] = 0.5f * (g[c] + g[3 + c] + g[6 + c]);
            h[6 + c] = 0.5f * (g[c] - g[3 + c] + g[6 + c]);
            h[9 + c] = g[6 + c];
          }
          for (int i = 0; i < 4; ++i) {  // (G g) Gᵀ
            const float* hi = h + 3 * i;
            const float u[4] = {hi[0], 0.5f * (hi[0] + hi[1] + hi[2]), 0.5f * (hi[0] - hi[1] + hi[2]), hi[2]};
            for (int e = 0; e < 4; ++e) U[(((4 * i + e) * nblocks + nb) * K + k) * 16 + j] = u[e];
          }
        }
  });
  return out;
}

// U, 16 MB at 512 × 512 channels: kept per weight (csrc/weight_cache_cpu.h), built once for an inversion's frozen
// weights instead of at every call.
at::Tensor transform_weight(const at::Tensor& weight, bool adjoint, int64_t K, int64_t N, int64_t Np) {
  return derived_from_weight(weight, adjoint ? kWinogradAdjoint : kWinogradForward,
                             [&] { return transform_weight_uncached(weight, adjoint, K, N, Np); });
}

template <typename I>
void run_chunks(const at::Tensor& x, const float* scale, const float* U, int64_t N, int64_t Np,
                const at::Tensor& out) {
  const int64_t B = x.size(0), K = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t th = (H + 1) / 2, tw = (W + 1) / 2, ntiles = B * th * tw;
  // chunk size: V[ξ] about kVFloats, and at least one chunk per thread (results do not depend on it)
  int64_t rows = round_up(std::clamp<int64_t>(kVFloats / K, kMr, 512), kMr);
  rows = std::min(rows, round_up((ntiles + at::get_num_threads() - 1) / at::get_num_threads(), kMr));
  const int64_t chunks = (ntiles + rows - 1) / rows;
  const I* xp = x.data_ptr<I>();
  float* op = out.data_ptr<float>();
  // chunks are handed out one at a time (a shared counter): a thread that falls behind — another process on the
  // core — does not hold the others up at the end. Which thread runs a chunk does not change its results.
  std::atomic<int64_t> next_chunk{0};
  at::parallel_for(0, std::min<int64_t>(chunks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    thread_local std::vector<float> ws;  // V, M and a scratch row: kept for the next call
    const int64_t vplane = rows * K + 16, mplane = rows * Np + 16;  // 64 bytes off any 4 KB multiple
    const size_t need = static_cast<size_t>(16 * (vplane + mplane) + Np);
    if (ws.size() < need) ws.resize(need);
    float* V = ws.data();
    float* M = V + 16 * vplane;
    float* scratch = M + 16 * mplane;
    const std::vector<I> zero(K, I(0));
    for (int64_t chunk = next_chunk++; chunk < chunks; chunk = next_chunk++) {
      const int64_t t0 = chunk * rows, n = std::min(rows, ntiles - t0), r = round_up(n, kMr);
      WISA(input_transform<I>(xp, scale, zero.data(), H, W, K, th, tw, t0, n, r, vplane, V));
      for (int xi = 0; xi < 16; ++xi)
        WISA(gemm_point(V + xi * vplane, U + xi * Np * K, M + xi * mplane, r, K, Np));
      WISA(output_transform(M, mplane, Np, N, H, W, th, tw, t0, n, op, scratch));
    }
  });
}

}  // namespace

void winograd_conv3x3_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& weight, bool adjoint,
                          const at::Tensor& out) {
  RECORD_FUNCTION("modconv::winograd_conv", std::vector<c10::IValue>());
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x must be a channels_last float32 or bfloat16 CPU tensor [B, K, H, W], got ", x.sizes(), " ",
              x.scalar_type());
  const int64_t B = x.size(0), K = x.size(1), H = x.size(2), W = x.size(3);
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3 && weight.size(adjoint ? 0 : 1) == K,
              "weight must be [", adjoint ? "K, N" : "N, K", ", 3, 3] with K = ", K, ", got ", weight.sizes());
  const int64_t N = weight.size(adjoint ? 1 : 0), Np = round_up(N, 16);
  TORCH_CHECK(out.device().is_cpu() && out.scalar_type() == at::kFloat && out.dim() == 4 && out.size(0) == B &&
                  out.size(1) == N && out.size(2) == H && out.size(3) == W &&
                  out.is_contiguous(at::MemoryFormat::ChannelsLast),
              "out must be a channels_last float32 CPU tensor [", B, ", ", N, ", ", H, ", ", W, "], got ",
              out.sizes(), " ", out.scalar_type());
  at::Tensor s;
  if (scale.defined()) {
    s = scale.to(at::kFloat).contiguous();
    TORCH_CHECK(s.dim() == 2 && s.size(0) == B && s.size(1) == K, "scale must be [", B, ", ", K, "], got ",
                s.sizes());
  }
  if (x.numel() == 0 || out.numel() == 0) return;
  const auto U = transform_weight(weight, adjoint, K, N, Np);
  const float* sp = s.defined() ? s.data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kFloat)
    run_chunks<float>(x, sp, U.data_ptr<float>(), N, Np, out);
  else
    run_chunks<c10::BFloat16>(x, sp, U.data_ptr<float>(), N, Np, out);
}
