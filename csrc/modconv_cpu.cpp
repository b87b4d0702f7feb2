// Modulated convolution, CPU (SPEC §3): forward and hand-written backward.
//
// Forward:  u = x ⊙ (g·s) (one pass, channels_last) → oneDNN convolution with the shared weight (up=2, k=3: the
//           stride-2 transposed conv as four phase convolutions, interleaved into t; large up=1 3×3 convs: Winograd
//           F(2×2, 3×3), csrc/winograd_cpu.cpp, with the scaling folded into its input transform: no u) → one fused
//           pass: [up=2: separable 4-tap FIR of t] + demodulation + strength·noise + bias + leaky-ReLU·gain + clamp
//           [+ FIR-up-sampled skip], reading the conv output once. 1×1 convs with ≤ 8 outputs (toRGB) skip u and
//           oneDNN: one pass with the style scaling folded into the operand.
// Backward: one fused pass: epilogue gradient [up=2: + the FIR's adjoint] → grad of the conv output, plus the
//           reductions Σ g_a·z (demodulation), Σ g_a (bias), Σ_c g_a (noise) → oneDNN (or Winograd) input
//           gradient (and oneDNN's weight gradient only when asked) → one pass, in place: d_x = g_u ⊙ (g·s) and
//           Σ_p g_u·x (style gradient) → the demodulation terms of the style and weight gradients (small loops).
// Large tensors come from a small caching pool (see Pool): first-touch page faults are a visible cost on CPU.
//
// Determinism: every reduction is a fixed-order sum over fixed chunks (bands of rows, chunks of pixels), chunking
// independent of the thread count; no atomics. The oneDNN convolutions are not ours and not covered by that.
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <unordered_map>

#include <sys/mman.h>
#include <vector>

#include "ops.h"
#include "weight_cache_cpu.h"
#include "winograd_cpu.h"

// The row kernels' channel loops hold selects (leaky-ReLU slope, clamp); under GCC's default -ftrapping-math an FP
// comparison feeding a select blocks if-conversion and the loops stay scalar and branchy (≈ 4× slower measured).
// The kernels never rely on FP exceptions, so this region is compiled without trapping math (the conversions
// below too: they must be inlined into the kernels, which needs matching options).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

namespace {

// ---- scalar conversions, inlined into every ISA build of the row kernels ------------------------------------
template <typename A, typename T>
inline A ld(T v) {
  return static_cast<A>(v);
}
template <>
inline float ld<float, c10::BFloat16>(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
template <typename T, typename A>
inline T st(A v) {
  return static_cast<T>(v);
}
template <>
inline c10::BFloat16 st<c10::BFloat16, float>(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t r = f != f ? 0x7fc0u : (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  c10::BFloat16 o;
  o.x = static_cast<uint16_t>(r);
  return o;
}

namespace isa_generic {
#define LSAP_TARGET
#include "modconv_cpu_kernels.h"
#undef LSAP_TARGET
}  // namespace isa_generic

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LSAP_HAVE_AVX2_BUILD 1
namespace isa_avx2 {
#define LSAP_TARGET __attribute__((target("avx2,fma,f16c")))
#include "modconv_cpu_kernels.h"
#undef LSAP_TARGET
}  // namespace isa_avx2

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
// ISA(kernel<...>(args)): the AVX2+FMA build where the CPU has it, else the baseline build.
#define ISA(...) (cpu_has_avx2() ? isa_avx2::__VA_ARGS__ : isa_generic::__VA_ARGS__)
#else
#define ISA(...) isa_generic::__VA_ARGS__
#endif
}  // namespace

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

namespace {

constexpr int64_t kBand = 16;       // output rows per work item of the forward epilogue and the up=1 backward
constexpr int64_t kBandUpBwd = 32;  // rows per work item of the fused epilogue + FIR-adjoint backward
constexpr int64_t kChunk = 1024;    // pixels per partial sum of the style-gradient reduction

at::Tensor to_cl(const at::Tensor& t) { return t.contiguous(at::MemoryFormat::ChannelsLast); }

bool is_canon_cl(const at::Tensor& t) {
  return t.dim() == 4 && t.strides() == at::IntArrayRef(c10::get_channels_last_strides_2d(t.sizes()));
}

// channels_last with the canonical strides (size-1 dims included), as an output's fake tensor has them.
at::Tensor canon_cl(const at::Tensor& t) {
  if (is_canon_cl(t)) return t;
  auto out = at::empty(t.sizes(), t.options().memory_format(at::MemoryFormat::ChannelsLast));
  out.copy_(t);
  return out;
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The dtype the convolution runs in: the activations' dtype, except BFloat16 without oneDNN bf16 (then float32).
at::ScalarType conv_type(at::ScalarType t, bool conv_bf16) {
  return t == at::kBFloat16 && !conv_bf16 ? at::kFloat : t;
}

// A caching allocator for the large tensors this op allocates (outputs, the conv input u, the conv output's
// gradient, the up path's t). On small CPU machines the first touch of a fresh large tensor's pages (a page fault
// and the kernel zeroing each page) costs about as much as the pass that writes it, and torch's CPU allocator
// returns every large block to the OS when it is freed; an inversion allocates the same sizes every step, so
// blocks freed here are kept for reuse (exact size), up to LSAP_MODCONV_WORKSPACE_MB in all (default 2048; 0
// disables; beyond it freed blocks go back to the OS). Fresh blocks are 2 MiB-aligned and advised for huge pages.
// Every buffer is fully overwritten before it is read. Bypassed while torch fills uninitialised memory (tests
// poison outputs so that unwritten elements show).
class Pool final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(n);
      if (it != free_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        cached_ -= n;
      }
    }
    if (p == nullptr) p = fresh(n);
    return {p, new Block{p, n}, &Pool::give_back, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [n, blocks] : free_)
      for (void* p : blocks) std::free(p);
    free_.clear();
    cached_ = 0;
  }
  static size_t capacity() {
    const char* env = std::getenv("LSAP_MODCONV_WORKSPACE_MB");
    return (env ? static_cast<size_t>(std::max(0L, std::atol(env))) : size_t(2048)) << 20;
  }
  static bool enabled() {
    const auto& ctx = at::globalContext();
    return capacity() > 0 && !(ctx.deterministicAlgorithms() && ctx.deterministicFillUninitializedMemory());
  }

 private:
  struct Block {
    void* p;
    size_t n;
  };
  static void* fresh(size_t n) {
    constexpr size_t kHuge = size_t(2) << 20;
    void* p = nullptr;
    if (posix_memalign(&p, n >= kHuge ? kHuge : 64, std::max<size_t>(n, 1)) != 0) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
    if (n >= kHuge) madvise(p, n - n % kHuge, MADV_HUGEPAGE);  // a hint; ignored where THP is off
#endif
    return p;
  }
  static void give_back(void* ctx);
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // never destroyed: tensors may be freed after static destruction
  return *p;
}

void Pool::give_back(void* ctx) {
  auto* b = static_cast<Block*>(ctx);
  Pool& self = pool();
  {
    std::lock_guard<std::mutex> lock(self.mutex_);
    if (self.cached_ + b->n <= capacity()) {
      self.free_[b->n].push_back(b->p);
      self.cached_ += b->n;
      delete b;
      return;
    }
  }
  std::free(b->p);
  delete b;
}

constexpr size_t kPoolMin = size_t(1) << 20;  // tensors below 1 MiB come from torch's allocator

// channels_last tensor of the given dtype, large ones from the pool.
at::Tensor empty_cl(at::IntArrayRef sizes, const at::Tensor& like, at::ScalarType dtype) {
  size_t n = c10::elementSize(dtype);
  for (auto s : sizes) n *= static_cast<size_t>(s);
  if (n < kPoolMin || !Pool::enabled() || !like.device().is_cpu())
    return at::empty(sizes, like.options().dtype(dtype).memory_format(at::MemoryFormat::ChannelsLast));
  return at::Tensor(at::detail::empty_generic(sizes, &pool(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                              at::MemoryFormat::ChannelsLast));
}

template <typename X>
struct Tag {
  using type = X;
};

// Calls fn(Tag<T>{}, Tag<Z>{}) for the supported (activation, convolution) dtype pairs.
template <typename Fn>
void dispatch_tz(at::ScalarType t, at::ScalarType z, const char* name, Fn&& fn) {
  if (t == at::kFloat && z == at::kFloat) return fn(Tag<float>{}, Tag<float>{});
  if (t == at::kDouble && z == at::kDouble) return fn(Tag<double>{}, Tag<double>{});
  if (t == at::kBFloat16 && z == at::kFloat) return fn(Tag<c10::BFloat16>{}, Tag<float>{});
  if (t == at::kBFloat16 && z == at::kBFloat16) return fn(Tag<c10::BFloat16>{}, Tag<c10::BFloat16>{});
  TORCH_CHECK(false, name, ": unsupported dtypes (activations ", t, ", convolution ", z,
              "); expected float32, float64 or bfloat16");
}

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

void check_cpu4(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 4, name, " must be a 4-D CPU tensor, got ", t.sizes(), " on ",
              t.device());
}

// FIR geometry of the up=2 path: conv_transpose stride 2 gives ht = 2h + k − 2 rows; the blur pads (pad0, pad1)
// with pad0 = ⌊(4 − k)/2⌋ + 1 and returns 2h rows: z[y] = Σ_j f_j t[y + j − pad0].
int64_t up_pad0(int64_t k) {
  const int64_t p = 3 - k;
  return (p + 1 >= 0 ? (p + 1) / 2 : -((-(p + 1) + 1) / 2)) + 1;
}

struct Epi {  // the epilogue's per-call constants
  int64_t batch, C, ho, wo;  // output size
  int64_t up, k, ht, wt, pad0;  // up=2: conv output (ht, wt) and the blur's leading pad
  bool lrelu;
  double gain, clamp;  // clamp = +inf when absent
  const at::Tensor* noise;  // [Bn, 1, ho, wo] contiguous or null
  double strength;
};

Epi make_epi(const at::Tensor& conv_out, int64_t up, int64_t k, bool lrelu, double gain, std::optional<double> clamp,
             const std::optional<at::Tensor>& noise, double strength) {
  Epi e{};
  e.batch = conv_out.size(0);
  e.C = conv_out.size(1);
  e.up = up;
  e.k = k;
  if (up == 2) {
    e.ht = conv_out.size(2);
    e.wt = conv_out.size(3);
    e.ho = e.ht - k + 2;
    e.wo = e.wt - k + 2;
    e.pad0 = up_pad0(k);
  } else {
    e.ho = e.ht = conv_out.size(2);
    e.wo = e.wt = conv_out.size(3);
    e.pad0 = 0;
  }
  e.lrelu = lrelu;
  e.gain = gain;
  e.clamp = clamp.has_value() ? *clamp : std::numeric_limits<double>::infinity();
  e.noise = noise.has_value() ? &*noise : nullptr;
  e.strength = strength;
  return e;
}

// Per-channel vectors of the epilogue in the accumulation dtype: d [B, C] (ones without demodulation), bias [C].
template <typename A>
std::vector<A> acc_vector(const std::optional<at::Tensor>& t, int64_t n, A fill) {
  std::vector<A> v(n, fill);
  if (t.has_value() && t->defined()) {
    auto c = t->to(std::is_same_v<A, double> ? at::kDouble : at::kFloat).contiguous();
    std::memcpy(v.data(), c.template data_ptr<A>(), n * sizeof(A));
  }
  return v;
}

// strength·noise of output row y of sample b, into sn (null when there is no noise).
template <typename T, typename A>
const A* noise_row(const Epi& e, int64_t b, int64_t y, A* sn) {
  if (!e.noise) return nullptr;
  const int64_t nb = e.noise->size(0) == 1 ? 0 : b;
  const T* src = e.noise->template data_ptr<T>() + (nb * e.ho + y) * e.wo;
  const A s = static_cast<A>(e.strength);
  for (int64_t x = 0; x < e.wo; ++x) sn[x] = s * ld<A>(src[x]);
  return sn;
}

// z row y (up=2) from the transposed-conv output t of sample b: vertical then horizontal 4-tap FIR.
template <typename Z, typename A>
void blur_row(const Epi& e, const Z* t_b, int64_t y, const Z* zero_t, const A* zero_a, A* vbuf, A* zrow) {
  const Z* r[4];
  for (int j = 0; j < 4; ++j) {
    const int64_t i = y + j - e.pad0;
    r[j] = (i >= 0 && i < e.ht) ? t_b + i * e.wt * e.C : zero_t;
  }
  ISA(fir_vertical<Z, A, A>(r[0], r[1], r[2], r[3], vbuf, e.wt * e.C));
  ISA(fir_horizontal<A>(vbuf, e.wt, e.C, e.wo, 1, e.pad0, zero_a, zrow));
}

// Up-sampled skip row y ([wo, C]) of sample b from skip [B, ho/2, wo/2, C].
template <typename T, typename A>
void skip_row(const T* sk_b, int64_t hs, int64_t ws, int64_t C, int64_t y, const T* zero_t, const A* zero_a,
              A* vbuf, A* out) {
  const int64_t m = y / 2;
  const int64_t ia = (y % 2 == 0) ? m - 1 : m, ib = ia + 1;  // rows ia (¼ or ¾) and ib (¾ or ¼)
  const T* ra = (ia >= 0 && ia < hs) ? sk_b + ia * ws * C : zero_t;
  const T* rb = (ib >= 0 && ib < hs) ? sk_b + ib * ws * C : zero_t;
  // even y: ¼ row m−1 + ¾ row m; odd y: ¾ row m + ¼ row m+1 — as a 4-tap call with two zero rows
  if (y % 2 == 0)
    ISA(fir_vertical<T, A, A>(ra, zero_t, rb, zero_t, vbuf, ws * C));  // ¼·ra + ¾·rb
  else
    ISA(fir_vertical<T, A, A>(zero_t, ra, zero_t, rb, vbuf, ws * C));  // ¾·ra + ¼·rb
  ISA(fir_up_horizontal<A>(vbuf, ws, C, zero_a, out));
}

// ---- the epilogue forward pass ------------------------------------------------------------------------------
template <typename T, typename Z>
at::Tensor epilogue_forward(const at::Tensor& conv_out, const Epi& e, const std::vector<acc_of<T>>& d,
                            const std::vector<acc_of<T>>& bias, const at::Tensor& skip, const at::Tensor& out) {
  using A = acc_of<T>;
  const int64_t C = e.C, bands = (e.ho + kBand - 1) / kBand;
  const Z* t = conv_out.data_ptr<Z>();
  T* o = out.data_ptr<T>();
  const bool has_skip = skip.defined();
  const int64_t hs = has_skip ? skip.size(2) : 0, ws = has_skip ? skip.size(3) : 0;
  const T* sk = has_skip ? skip.data_ptr<T>() : nullptr;
  at::parallel_for(0, e.batch * bands, 1, [&](int64_t begin, int64_t end) {
    const int64_t width = std::max(e.wt, e.wo) * C;
    std::vector<Z> zero_z(width, st<Z>(A(0)));
    std::vector<T> zero_t(has_skip ? ws * C : 0, st<T>(A(0)));
    std::vector<A> zero_a(width, A(0)), vbuf(width), zrow(e.up == 2 ? e.wo * C : 0), sn(e.wo),
        skrow(has_skip ? e.wo * C : 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / bands, y0 = (item % bands) * kBand, y1 = std::min(e.ho, y0 + kBand);
      const A* dv = d.data() + b * C;
      for (int64_t y = y0; y < y1; ++y) {
        const A* snp = noise_row<T, A>(e, b, y, sn.data());
        const A* skp = nullptr;
        if (has_skip) {
          skip_row<T, A>(sk + b * hs * ws * C, hs, ws, C, y, zero_t.data(), zero_a.data(), vbuf.data(),
                         skrow.data());
          skp = skrow.data();
        }
        T* orow = o + (b * e.ho + y) * e.wo * C;
        const A gain = static_cast<A>(e.gain), clamp = static_cast<A>(e.clamp);
        if (e.up == 2) {
          blur_row<Z, A>(e, t + b * e.ht * e.wt * C, y, zero_z.data(), zero_a.data(), vbuf.data(), zrow.data());
          if (e.lrelu)
            ISA(epilogue_fwd_row<true, A, T, A>(zrow.data(), e.wo, C, dv, bias.data(), snp, skp, gain, clamp, orow));
          else
            ISA(epilogue_fwd_row<false, A, T, A>(zrow.data(), e.wo, C, dv, bias.data(), snp, skp, gain, clamp, orow));
        } else {
          const Z* zr = t + (b * e.ho + y) * e.wo * C;
          if (e.lrelu)
            ISA(epilogue_fwd_row<true, Z, T, A>(zr, e.wo, C, dv, bias.data(), snp, skp, gain, clamp, orow));
          else
            ISA(epilogue_fwd_row<false, Z, T, A>(zr, e.wo, C, dv, bias.data(), snp, skp, gain, clamp, orow));
        }
      }
    }
  });
  return out;
}

// ---- the epilogue backward pass -----------------------------------------------------------------------------
// Writes g_conv (the gradient of the conv output: z for up=1, the transposed-conv output t for up=2) when
// defined, the per-band partial sums gd_part/gb_part [B, bands, C] and S [B, ho, wo] = Σ_c g_a.
template <bool Lrelu, typename T, typename Z>
void epilogue_backward(const at::Tensor& grad, const at::Tensor& conv_out, const Epi& e,
                       const std::vector<acc_of<T>>& d, const std::vector<acc_of<T>>& bias, const at::Tensor& g_conv,
                       acc_of<T>* gd_part, acc_of<T>* gb_part, acc_of<T>* S, int64_t band) {
  using A = acc_of<T>;
  const int64_t C = e.C;
  const int64_t rows = e.up == 2 ? std::max(e.ht, e.ho) : e.ho;
  const int64_t bands = (rows + band - 1) / band;
  const T* g = grad.data_ptr<T>();
  const Z* t = conv_out.data_ptr<Z>();
  Z* gc = g_conv.defined() ? g_conv.data_ptr<Z>() : nullptr;
  const A gain = static_cast<A>(e.gain), clamp = static_cast<A>(e.clamp);
  at::parallel_for(0, e.batch * bands, 1, [&](int64_t begin, int64_t end) {
    const int64_t width = std::max(e.wt, e.wo) * C;
    std::vector<Z> zero_z(width, st<Z>(A(0)));
    std::vector<A> zero_a(width, A(0)), sn(e.wo), scratch_gd(C), scratch_gb(C), scratch_S(e.wo);
    std::vector<A> vbuf, zrow, gzrow, ring;
    if (e.up == 2) {
      vbuf.resize(width);
      zrow.resize(e.wo * C);
      gzrow.resize(e.wo * C);
      ring.resize(4 * e.wt * C);
    }
    std::vector<Z> gz_tmp(gc ? 0 : e.wo * C);  // up=1 without g_conv: gz goes nowhere
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / bands, k = item % bands;
      A* gd = gd_part + (b * bands + k) * C;
      A* gb = gb_part + (b * bands + k) * C;
      std::fill(gd, gd + C, A(0));
      std::fill(gb, gb + C, A(0));
      const A* dv = d.data() + b * C;
      const T* g_b = g + b * e.ho * e.wo * C;
      const int64_t own_lo = k * band, own_hi = std::min(e.ho, (k + 1) * band);
      if (e.up == 1) {
        for (int64_t y = own_lo; y < own_hi; ++y) {
          const A* snp = noise_row<T, A>(e, b, y, sn.data());
          const int64_t off = (b * e.ho + y) * e.wo * C;
          Z* out = gc ? gc + off : gz_tmp.data();
          ISA(epilogue_bwd_row<Lrelu, T, Z, Z, A>(g + off, t + off, e.wo, C, dv, bias.data(), snp, gain, clamp,
                                                   out, gd, gb, S + (b * e.ho + y) * e.wo));
        }
        continue;
      }
      // up=2: z rows are recomputed from t, their gradient goes through the horizontal FIR adjoint into a ring of
      // the last 4 rows, and each t row's gradient is the vertical adjoint of 4 ring rows.
      const Z* t_b = t + b * e.ht * e.wt * C;
      const int64_t pad_adj = 3 - e.pad0;  // g_t[r] = Σ_j f_j h[r + j − pad_adj]
      const int64_t r_lo = k * band, r_hi = std::min(e.ht, (k + 1) * band);
      const int64_t y_lo = std::max<int64_t>(0, std::min(own_lo, r_lo - pad_adj));
      const int64_t y_hi = std::max(own_hi, std::min(e.ho, r_hi + e.pad0));
      int64_t next_y = y_lo;
      auto process = [&](int64_t y) {
        blur_row<Z, A>(e, t_b, y, zero_z.data(), zero_a.data(), vbuf.data(), zrow.data());
        const A* snp = noise_row<T, A>(e, b, y, sn.data());
        const bool own = y >= own_lo && y < own_hi;
        ISA(epilogue_bwd_row<Lrelu, T, A, A, A>(g_b + y * e.wo * C, zrow.data(), e.wo, C, dv, bias.data(), snp,
                                                 gain, clamp, gzrow.data(), own ? gd : scratch_gd.data(),
                                                 own ? gb : scratch_gb.data(),
                                                 own ? S + (b * e.ho + y) * e.wo : scratch_S.data()));
        if (gc)
          ISA(fir_horizontal<A>(gzrow.data(), e.wo, C, e.wt, 1, pad_adj, zero_a.data(),
                                ring.data() + (y % 4) * e.wt * C));
      };
      for (int64_t r = r_lo; r < r_hi; ++r) {
        const int64_t need = std::min(e.ho - 1, r + e.pad0);
        while (next_y <= need) process(next_y++);
        if (!gc) continue;
        const A* rows[4];
        for (int j = 0; j < 4; ++j) {
          const int64_t y = r + j - pad_adj;
          rows[j] = (y >= 0 && y < e.ho) ? ring.data() + (y % 4) * e.wt * C : zero_a.data();
        }
        ISA(fir_vertical<A, Z, A>(rows[0], rows[1], rows[2], rows[3], gc + (b * e.ht + r) * e.wt * C, e.wt * C));
      }
      while (next_y < y_hi) process(next_y++);
    }
  });
}

// d_skip = adjoint of the ×2 FIR up-sampling of G: rows 2i−1..2i+2 and columns 2j−1..2j+2 with taps [1,3,3,1]/4.
template <typename T>
at::Tensor skip_backward(const at::Tensor& grad, int64_t hs, int64_t ws) {
  using A = acc_of<T>;
  const int64_t batch = grad.size(0), C = grad.size(1), ho = grad.size(2), wo = grad.size(3);
  auto out = empty_cl({batch, C, hs, ws}, grad, grad.scalar_type());
  const T* g = grad.data_ptr<T>();
  T* o = out.data_ptr<T>();
  at::parallel_for(0, batch * hs, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> zero_t(wo * C, st<T>(A(0)));
    std::vector<A> zero_a(wo * C, A(0)), v(wo * C), row(ws * C);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / hs, i = item % hs;
      const T* r[4];
      for (int j = 0; j < 4; ++j) {
        const int64_t y = 2 * i - 1 + j;
        r[j] = (y >= 0 && y < ho) ? g + (b * ho + y) * wo * C : zero_t.data();
      }
      ISA(fir_vertical<T, A, A>(r[0], r[1], r[2], r[3], v.data(), wo * C));
      ISA(fir_horizontal<A>(v.data(), wo, C, ws, 2, 1, zero_a.data(), row.data()));
      T* orow = o + (b * hs + i) * ws * C;
      for (int64_t n = 0; n < ws * C; ++n) orow[n] = st<T>(row[n]);
    }
  });
  return out;
}

// Q[o, i] = Σ_k W[o, i, k]² in the accumulation dtype A, [Cout·Cin]; kept per weight (csrc/weight_cache_cpu.h).
template <typename A, typename W>
at::Tensor weight_sq(const at::Tensor& weight) {
  return derived_from_weight(weight, kSquareSums, [&] {
    const int64_t cout = weight.size(0), cin = weight.size(1), kk = weight.size(2) * weight.size(3);
    auto q = at::empty({cout * cin}, weight.options().dtype(c10::CppTypeToScalarType<A>::value));
    A* qp = q.template data_ptr<A>();
    const W* w = weight.data_ptr<W>();
    at::parallel_for(0, cout, 8, [&](int64_t begin, int64_t end) {
      ISA(sumsq_groups<W, A>(w + begin * cin * kk, (end - begin) * cin, kk, qp + begin * cin));
    });
    return q;
  });
}

// d[b, o] = (g² Σ_i s[b, i]² Q[o, i] + eps)^(-1/2)
template <typename T>
at::Tensor demod_impl(const at::Tensor& weight, const at::Tensor& styles, double weight_gain, double eps) {
  using A = acc_of<T>;
  const int64_t batch = styles.size(0), cout = weight.size(0), cin = weight.size(1);
  const auto q_t = weight_sq<A, T>(weight);
  const A* q = q_t.template data_ptr<A>();
  auto d = at::empty({batch, cout}, styles.options().dtype(acc_type(styles.scalar_type())));
  A* dp = d.data_ptr<A>();
  const T* s = styles.data_ptr<T>();
  std::vector<A> s2(batch * cin);
  for (int64_t i = 0; i < batch * cin; ++i) s2[i] = ld<A>(s[i]) * ld<A>(s[i]);
  const A g2 = static_cast<A>(weight_gain * weight_gain), ep = static_cast<A>(eps);
  at::parallel_for(0, batch * cout, 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / cout, o = item % cout;
      const A acc = ISA(dot_lanes<A>(s2.data() + b * cin, q + o * cin, cin));
      dp[item] = A(1) / std::sqrt(g2 * acc + ep);
    }
  });
  return d;
}

template <typename T>
at::Tensor scale_impl(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& u) {
  using A = acc_of<T>;
  const auto out_type = u.scalar_type();
  const int64_t batch = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  const T* xp = x.data_ptr<T>();
  const A* sp = scale.data_ptr<A>();
  const int64_t chunks = (hw + kChunk - 1) / kChunk;
  auto run = [&](auto* up) {
    using U = std::remove_pointer_t<decltype(up)>;
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / chunks, p0 = (item % chunks) * kChunk, n = std::min(kChunk, hw - p0);
        const int64_t off = (b * hw + p0) * C;
        ISA(scale_rows<T, U, A>(xp + off, sp + b * C, up + off, n, C));
      }
    });
  };
  if (out_type == x.scalar_type())
    run(u.data_ptr<T>());
  else {
    TORCH_CHECK(out_type == at::kFloat, "modconv scale: output dtype must be the input's or float32");
    run(u.data_ptr<float>());
  }
  return u;
}

// d_x = g_u ⊙ scale (when need_dx) and r[b, c] = Σ_p g_u·x (when need_r), in chunks of kChunk pixels.
// in_place: d_x overwrites g_u (a temporary the caller owns; same dtype and canonical layout).
template <typename T, typename G>
std::tuple<at::Tensor, at::Tensor> scale_bwd_impl(const at::Tensor& gu, const at::Tensor& x, const at::Tensor& scale,
                                                  bool need_dx, bool need_r, bool in_place = false) {
  using A = acc_of<T>;
  const int64_t batch = x.size(0), C = x.size(1), hw = x.size(2) * x.size(3);
  const int64_t chunks = (hw + kChunk - 1) / kChunk;
  at::Tensor dx = !need_dx ? at::Tensor() : in_place ? gu : empty_cl(x.sizes(), x, x.scalar_type());
  std::vector<A> part(need_r ? batch * chunks * C : 0);
  const G* g = gu.data_ptr<G>();
  const T* xp = x.data_ptr<T>();
  const A* sp = scale.data_ptr<A>();
  T* dxp = need_dx ? dx.data_ptr<T>() : nullptr;
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, p0 = (item % chunks) * kChunk, n = std::min(kChunk, hw - p0);
      const int64_t off = (b * hw + p0) * C;
      A* acc = need_r ? part.data() + item * C : nullptr;
      if (acc) std::fill(acc, acc + C, A(0));
      ISA(scale_bwd_rows<G, T, A>(g + off, xp + off, sp + b * C, dxp ? dxp + off : nullptr, acc, n, C));
    }
  });
  at::Tensor r;
  if (need_r) {
    r = at::zeros({batch, C}, x.options().dtype(acc_type(x.scalar_type())));
    A* rp = r.data_ptr<A>();
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t k = 0; k < chunks; ++k)
        for (int64_t c = 0; c < C; ++c) rp[b * C + c] += part[(b * chunks + k) * C + c];
  }
  return {dx, r};
}

double strength_value(const std::optional<at::Tensor>& s) {
  if (!s.has_value() || !s->defined()) return 1.0;
  TORCH_CHECK(s->numel() == 1, "noise_strength must have one element, got ", s->sizes());
  return s->to(at::kDouble).item<double>();
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& styles, int64_t up) {
  check_cpu4("x", x);
  check_cpu4("weight", weight);
  TORCH_CHECK(styles.device().is_cpu() && styles.dim() == 2 && styles.size(0) == x.size(0) &&
                  styles.size(1) == x.size(1),
              "styles must be a CPU tensor [", x.size(0), ", ", x.size(1), "], got ", styles.sizes());
  TORCH_CHECK(weight.size(1) == x.size(1) && weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              "weight must be [Cout, ", x.size(1), ", k, k] with odd k, got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && styles.scalar_type() == x.scalar_type(),
              "x, weight and styles must share one dtype");
  TORCH_CHECK(up == 1 || up == 2, "up must be 1 or 2, got ", up);
}

void check_noise(const std::optional<at::Tensor>& noise, int64_t batch, at::ScalarType dtype, int64_t ho, int64_t wo) {
  if (!noise.has_value()) return;
  const auto& n = *noise;
  TORCH_CHECK(n.device().is_cpu() && n.dim() == 4 && (n.size(0) == 1 || n.size(0) == batch) && n.size(1) == 1 &&
                  n.size(2) == ho && n.size(3) == wo && n.scalar_type() == dtype,
              "noise must be [B or 1, 1, ", ho, ", ", wo, "] with the dtype of x, got ", n.sizes());
}

// up=2 with k=3 as four ordinary convolutions, one per output phase (the same 9 taps, no zero-insertion waste):
// t[2m+a, 2n+b] = Σ over the taps of parity (a, b); even phases use taps {2, 0} over u padded by one, odd ones tap 1.
// oneDNN runs some transposed-conv shapes on a slow path (256→128 at 128² measured 0.6× the phase form).
// LSAP_MODCONV_UPCONV=transposed keeps ATen's transposed convolution (for comparisons).
// The stride-1 3×3 convolution (forward and input gradient) by Winograd F(2×2, 3×3) (csrc/winograd_cpu.cpp) where
// it measured faster than oneDNN (bench/bench_cpu_winograd.py): float32 convolutions with at least 128 × 128
// channel pairs over at least 1024 pixels (fewer: the per-call weight transform and the weight streaming of each
// chunk of tiles outweigh the saved multiplies). LSAP_MODCONV_CONV=onednn keeps oneDNN everywhere, =winograd takes
// Winograd for every float32 3×3 up=1 shape.
bool use_winograd(int64_t k, int64_t up, at::ScalarType zt, int64_t batch, int64_t cin, int64_t cout, int64_t h,
                  int64_t w) {
  if (k != 3 || up != 1 || zt != at::kFloat) return false;
  const char* env = std::getenv("LSAP_MODCONV_CONV");
  const std::string mode = env ? env : "";
  TORCH_CHECK(mode.empty() || mode == "onednn" || mode == "winograd",
              "LSAP_MODCONV_CONV must be unset, 'onednn' or 'winograd', got '", mode, "'");
  if (!mode.empty()) return mode == "winograd";
  return cin * cout >= 128 * 128 && batch * h * w >= 1024;
}

bool use_phases(int64_t k) {
  if (k != 3) return false;
  const char* env = std::getenv("LSAP_MODCONV_UPCONV");
  return env == nullptr || std::strcmp(env, "transposed") != 0;
}

at::Tensor conv_up_phases(const at::Tensor& u, const at::Tensor& w) {
  RECORD_FUNCTION("modconv::conv_up_phases", std::vector<c10::IValue>());
  const int64_t batch = u.size(0), h = u.size(2), wd = u.size(3), cout = w.size(0);
  // taps in order 2, 1, 0: even parity = every other (2, 0), odd = the middle; kept per weight, in oneDNN's layout
  auto taps = [&](int a, int b) {
    return derived_from_weight(w, kPhaseTaps + 2 * a + b, [&] {
      return w.flip({2, 3})
          .slice(2, a, a == 0 ? 3 : 2, a == 0 ? 2 : 1)
          .slice(3, b, b == 0 ? 3 : 2, b == 0 ? 2 : 1)
          .contiguous(at::MemoryFormat::ChannelsLast);
    });
  };
  auto t = empty_cl({batch, cout, 2 * h + 1, 2 * wd + 1}, u, u.scalar_type());
  for (int a = 0; a < 2; ++a)
    for (int b = 0; b < 2; ++b) {
      const auto phase = at::convolution(u, taps(a, b), {}, {1, 1}, {a == 0 ? 1 : 0, b == 0 ? 1 : 0}, {1, 1}, false,
                                         {0, 0}, 1);
      t.slice(2, a, std::nullopt, 2).slice(3, b, std::nullopt, 2).copy_(phase);
    }
  return t;
}

// u = x ⊙ scale (the convolution's input), a pooled temporary.
at::Tensor scale_to_new(const at::Tensor& x, const at::Tensor& scale, at::ScalarType out_type) {
  RECORD_FUNCTION("modconv::scale", std::vector<c10::IValue>());
  at::Tensor u = empty_cl(x.sizes(), x, out_type);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "modconv_scale",
                                 [&] { scale_impl<scalar_t>(x, scale, u); });
  return u;
}

// The 1×1, few-output convolution (toRGB) runs in our own pass, the style scaling folded into the operand: no u,
// and no oneDNN call with N = 3 (memory-bound either way; this reads x once).
bool pointwise_path(int64_t k, int64_t up, int64_t cout) { return k == 1 && up == 1 && cout <= 8; }

template <typename T, typename Z>
at::Tensor pointwise_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  using A = acc_of<T>;
  const int64_t batch = x.size(0), cin = x.size(1), hw = x.size(2) * x.size(3), cout = weight.size(0);
  auto z = empty_cl({batch, cout, x.size(2), x.size(3)}, x, c10::CppTypeToScalarType<Z>::value);
  const auto w = weight.to(acc_type(x.scalar_type())).reshape({cout, cin}).contiguous();
  std::vector<A> ws(batch * cout * cin);  // the weight rows times g·s[b, i]: the operand scaling of sample b
  const A* wp = w.data_ptr<A>();
  const A* sp = scale.data_ptr<A>();
  for (int64_t b = 0; b < batch; ++b)
    for (int64_t o = 0; o < cout; ++o)
      for (int64_t i = 0; i < cin; ++i) ws[(b * cout + o) * cin + i] = wp[o * cin + i] * sp[b * cin + i];
  const T* xp = x.data_ptr<T>();
  Z* zp = z.template data_ptr<Z>();
  const int64_t chunks = (hw + kChunk - 1) / kChunk;
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, p0 = (item % chunks) * kChunk, n = std::min(kChunk, hw - p0);
      ISA(pointwise_fwd_rows<T, Z, A>(xp + (b * hw + p0) * cin, ws.data() + b * cout * cin, n, cin, cout,
                                      zp + (b * hw + p0) * cout));
    }
  });
  return z;
}

// (d_x, r[b, i] = Σ_p g_u·x) of the pointwise path; g_u = W^T g_z is never stored.
template <typename T, typename G>
std::tuple<at::Tensor, at::Tensor> pointwise_backward(const at::Tensor& gz, const at::Tensor& x,
                                                      const at::Tensor& weight, const at::Tensor& scale,
                                                      bool need_dx, bool need_r) {
  using A = acc_of<T>;
  const int64_t batch = x.size(0), cin = x.size(1), hw = x.size(2) * x.size(3), cout = weight.size(0);
  const int64_t chunks = (hw + kChunk - 1) / kChunk;
  at::Tensor dx = need_dx ? empty_cl(x.sizes(), x, x.scalar_type()) : at::Tensor();
  const auto w = weight.to(acc_type(x.scalar_type())).reshape({cout, cin}).contiguous();
  std::vector<A> part(need_r ? batch * chunks * cin : 0);
  const G* gp = gz.data_ptr<G>();
  const T* xp = x.data_ptr<T>();
  const A* wp = w.data_ptr<A>();
  const A* sp = scale.data_ptr<A>();
  T* dxp = need_dx ? dx.data_ptr<T>() : nullptr;
  at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> gu(cin);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks, p0 = (item % chunks) * kChunk, n = std::min(kChunk, hw - p0);
      A* acc = need_r ? part.data() + item * cin : nullptr;
      if (acc) std::fill(acc, acc + cin, A(0));
      ISA(pointwise_bwd_rows<G, T, A>(gp + (b * hw + p0) * cout, xp + (b * hw + p0) * cin, wp, sp + b * cin, n, cin,
                                      cout, dxp ? dxp + (b * hw + p0) * cin : nullptr, acc, gu.data()));
    }
  });
  at::Tensor r;
  if (need_r) {
    r = at::zeros({batch, cin}, x.options().dtype(acc_type(x.scalar_type())));
    A* rp = r.data_ptr<A>();
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t k = 0; k < chunks; ++k)
        for (int64_t c = 0; c < cin; ++c) rp[b * cin + c] += part[(b * chunks + k) * cin + c];
  }
  return {dx, r};
}

// The weight for oneDNN with channels_last activations: it would copy it into that layout at every call.
at::Tensor onednn_weight(const at::Tensor& w) {
  return derived_from_weight(w, kChannelsLast, [&] { return w.contiguous(at::MemoryFormat::ChannelsLast); });
}

at::Tensor onednn_weight_transposed(const at::Tensor& w) {
  return derived_from_weight(w, kTransposedChannelsLast,
                             [&] { return w.transpose(0, 1).contiguous(at::MemoryFormat::ChannelsLast); });
}

at::Tensor conv_forward(const at::Tensor& u, const at::Tensor& w, int64_t up) {
  const int64_t k = w.size(2);
  if (up == 1) return at::convolution(u, onednn_weight(w), {}, {1, 1}, {k / 2, k / 2}, {1, 1}, false, {0, 0}, 1);
  if (use_phases(k)) return conv_up_phases(u, w);
  return at::convolution(u, onednn_weight_transposed(w), {}, {2, 2}, {0, 0}, {1, 1}, true, {0, 0}, 1);
}

}  // namespace

// ---- stage kernels (bound for tests; the composite below uses the same code) --------------------------------

at::Tensor modconv_scale_cpu(const at::Tensor& x_in, const at::Tensor& scale_in, bool to_float) {
  RECORD_FUNCTION("modconv::scale", std::vector<c10::IValue>());
  check_cpu4("x", x_in);
  const auto x = to_cl(x_in);
  const auto scale = scale_in.to(acc_type(x.scalar_type())).contiguous();
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == x.size(0) && scale.size(1) == x.size(1),
              "scale must be [B, C] = [", x.size(0), ", ", x.size(1), "], got ", scale.sizes());
  const auto out_type = to_float ? at::kFloat : x.scalar_type();
  at::Tensor u;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "modconv_scale_cpu",
                                 [&] { scale_impl<scalar_t>(x, scale, u = empty_cl(x.sizes(), x, out_type)); });
  return u;
}

std::tuple<at::Tensor, at::Tensor> modconv_scale_bwd_cpu(const at::Tensor& gu_in, const at::Tensor& x_in,
                                                         const at::Tensor& scale_in, bool need_dx, bool need_r) {
  RECORD_FUNCTION("modconv::scale_bwd", std::vector<c10::IValue>());
  check_cpu4("grad", gu_in);
  check_cpu4("x", x_in);
  TORCH_CHECK(gu_in.sizes() == x_in.sizes(), "grad must have the shape of x");
  const auto x = to_cl(x_in);
  const auto gu = to_cl(gu_in);
  const auto scale = scale_in.to(acc_type(x.scalar_type())).contiguous();
  std::tuple<at::Tensor, at::Tensor> res;
  dispatch_tz(x.scalar_type(), gu.scalar_type(), "modconv_scale_bwd_cpu", [&](auto tt, auto gt) {
    res = scale_bwd_impl<typename decltype(tt)::type, typename decltype(gt)::type>(gu, x, scale, need_dx, need_r);
  });
  return res;
}

at::Tensor modconv_demod_cpu(const at::Tensor& weight_in, const at::Tensor& styles_in, double weight_gain,
                             double eps) {
  RECORD_FUNCTION("modconv::demod", std::vector<c10::IValue>());
  const auto weight = weight_in.contiguous();
  const auto styles = styles_in.contiguous();
  TORCH_CHECK(weight.scalar_type() == styles.scalar_type(), "weight and styles must share one dtype");
  at::Tensor d;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, styles.scalar_type(), "modconv_demod_cpu",
                                 [&] { d = demod_impl<scalar_t>(weight, styles, weight_gain, eps); });
  return d;
}

at::Tensor modconv_epilogue_fwd_cpu(const at::Tensor& conv_out_in, const std::optional<at::Tensor>& d_in,
                                    const std::optional<at::Tensor>& noise_in,
                                    const std::optional<at::Tensor>& noise_strength,
                                    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& skip_in,
                                    int64_t up, int64_t k, bool lrelu, double gain, std::optional<double> clamp,
                                    at::ScalarType out_type) {
  RECORD_FUNCTION("modconv::epilogue_fwd", std::vector<c10::IValue>());
  check_cpu4("conv_out", conv_out_in);
  const auto conv_out = to_cl(conv_out_in);
  std::optional<at::Tensor> noise;
  if (noise_in.has_value()) noise = noise_in->contiguous();
  const auto e = make_epi(conv_out, up, k, lrelu, gain, clamp, noise, strength_value(noise_strength));
  check_noise(noise, e.batch, out_type, e.ho, e.wo);
  at::Tensor skip;
  if (skip_in.has_value()) {
    skip = to_cl(*skip_in);
    TORCH_CHECK(skip.dim() == 4 && skip.size(0) == e.batch && skip.size(1) == e.C && 2 * skip.size(2) == e.ho &&
                    2 * skip.size(3) == e.wo && skip.scalar_type() == out_type,
                "skip must be [", e.batch, ", ", e.C, ", ", e.ho / 2, ", ", e.wo / 2, "] of the output dtype");
  }
  auto out = empty_cl({e.batch, e.C, e.ho, e.wo}, conv_out, out_type);
  dispatch_tz(out_type, conv_out.scalar_type(), "modconv_epilogue_fwd_cpu", [&](auto tt, auto zt_) {
    using T = typename decltype(tt)::type;
    using Z = typename decltype(zt_)::type;
    using A = acc_of<T>;
    const auto d = acc_vector<A>(d_in, e.batch * e.C, A(1));
    const auto bv = acc_vector<A>(bias, e.C, A(0));
    epilogue_forward<T, Z>(conv_out, e, d, bv, skip, out);
  });
  return out;
}

// Returns (g_conv, gd [B, C], S [B, ho, wo], d_bias [C]) in (conv dtype, acc, acc, acc).
namespace {
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> epilogue_bwd_impl(
    const at::Tensor& grad_in, const at::Tensor& conv_out_in, const std::optional<at::Tensor>& d_in,
    const std::optional<at::Tensor>& noise_in, const std::optional<at::Tensor>& noise_strength,
    const std::optional<at::Tensor>& bias, int64_t up, int64_t k, bool lrelu, double gain,
    std::optional<double> clamp, bool need_g_conv) {
  RECORD_FUNCTION("modconv::epilogue_bwd", std::vector<c10::IValue>());
  check_cpu4("grad", grad_in);
  check_cpu4("conv_out", conv_out_in);
  const auto conv_out = to_cl(conv_out_in);
  const auto grad = to_cl(grad_in);
  std::optional<at::Tensor> noise;
  if (noise_in.has_value()) noise = noise_in->contiguous();
  const auto e = make_epi(conv_out, up, k, lrelu, gain, clamp, noise, strength_value(noise_strength));
  check_noise(noise, e.batch, grad.scalar_type(), e.ho, e.wo);
  TORCH_CHECK(grad.size(0) == e.batch && grad.size(1) == e.C && grad.size(2) == e.ho && grad.size(3) == e.wo,
              "grad must be [", e.batch, ", ", e.C, ", ", e.ho, ", ", e.wo, "], got ", grad.sizes());
  const auto acc = acc_type(grad.scalar_type());
  const int64_t band = up == 2 ? kBandUpBwd : kBand;
  const int64_t rows = up == 2 ? std::max(e.ht, e.ho) : e.ho;
  const int64_t bands = (rows + band - 1) / band;
  at::Tensor g_conv;
  if (need_g_conv)
    g_conv = empty_cl(conv_out.sizes(), conv_out, conv_out.scalar_type());
  auto S = at::empty({e.batch, e.ho, e.wo}, grad.options().dtype(acc));
  auto gd = at::zeros({e.batch, e.C}, grad.options().dtype(acc));
  auto gbias = at::zeros({e.C}, grad.options().dtype(acc));
  dispatch_tz(grad.scalar_type(), conv_out.scalar_type(), "modconv_epilogue_bwd_cpu", [&](auto tt, auto zt_) {
    using T = typename decltype(tt)::type;
    using Z = typename decltype(zt_)::type;
    using A = acc_of<T>;
    const auto d = acc_vector<A>(d_in, e.batch * e.C, A(1));
    const auto bv = acc_vector<A>(bias, e.C, A(0));
    std::vector<A> gd_part(e.batch * bands * e.C), gb_part(e.batch * bands * e.C);
    if (lrelu)
      epilogue_backward<true, T, Z>(grad, conv_out, e, d, bv, g_conv, gd_part.data(), gb_part.data(),
                                    S.data_ptr<A>(), band);
    else
      epilogue_backward<false, T, Z>(grad, conv_out, e, d, bv, g_conv, gd_part.data(), gb_part.data(),
                                     S.data_ptr<A>(), band);
    A* gdp = gd.data_ptr<A>();
    A* gbp = gbias.data_ptr<A>();
    for (int64_t b = 0; b < e.batch; ++b)
      for (int64_t kk = 0; kk < bands; ++kk)
        for (int64_t c = 0; c < e.C; ++c) {
          gdp[b * e.C + c] += gd_part[(b * bands + kk) * e.C + c];
          gbp[c] += gb_part[(b * bands + kk) * e.C + c];
        }
  });
  return {g_conv, gd, S, gbias};
}
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> modconv_epilogue_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& conv_out, const std::optional<at::Tensor>& d,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& noise_strength,
    const std::optional<at::Tensor>& bias, int64_t up, int64_t k, bool lrelu, double gain,
    std::optional<double> clamp, bool need_g_conv) {
  return epilogue_bwd_impl(grad, conv_out, d, noise, noise_strength, bias, up, k, lrelu, gain, clamp, need_g_conv);
}

void modconv_workspace_clear_cpu() {
  pool().clear();
  weight_cache_clear();
}

at::Tensor modconv_skip_bwd_cpu(const at::Tensor& grad_in) {
  RECORD_FUNCTION("modconv::skip_bwd", std::vector<c10::IValue>());
  check_cpu4("grad", grad_in);
  const auto grad = to_cl(grad_in);
  TORCH_CHECK(grad.size(2) % 2 == 0 && grad.size(3) % 2 == 0, "grad must have an even size, got ", grad.sizes());
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, grad.scalar_type(), "modconv_skip_bwd_cpu",
                                 [&] { out = skip_backward<scalar_t>(grad, grad.size(2) / 2, grad.size(3) / 2); });
  return out;
}

// ---- the whole op -------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> modconv_fwd_cpu(
    const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& styles,
    const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& noise_strength,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& skip, double weight_gain,
    bool demodulate, int64_t up, bool lrelu, double gain, std::optional<double> clamp, double eps, bool conv_bf16) {
  check_inputs(x_in, weight, styles, up);
  const auto x = to_cl(x_in);
  const auto dt = x.scalar_type();
  const auto zt = conv_type(dt, conv_bf16);
  const auto acc = acc_type(dt);
  const auto scale = styles.to(acc) * weight_gain;  // u = x ⊙ (g·s): the weight gain rides on the styles
  at::Tensor conv_out;
  if (pointwise_path(weight.size(2), up, weight.size(0))) {
    RECORD_FUNCTION("modconv::pointwise", std::vector<c10::IValue>());
    dispatch_tz(dt, zt, "modconv_fwd_cpu", [&](auto tt, auto zt_) {
      conv_out = pointwise_forward<typename decltype(tt)::type, typename decltype(zt_)::type>(x, weight, scale);
    });
  } else if (use_winograd(weight.size(2), up, zt, x.size(0), x.size(1), weight.size(0), x.size(2), x.size(3))) {
    conv_out = empty_cl({x.size(0), weight.size(0), x.size(2), x.size(3)}, x, zt);
    winograd_conv3x3_cpu(x, scale, weight, false, conv_out);  // the style scaling rides on the input transform
  } else {
    at::Tensor u = scale_to_new(x, scale, zt);
    conv_out = canon_cl(conv_forward(u, weight.to(zt), up));
  }
  at::Tensor d = demodulate ? modconv_demod_cpu(weight, styles, weight_gain, eps)
                            : at::ones({x.size(0), weight.size(0)}, x.options().dtype(acc));
  auto out = modconv_epilogue_fwd_cpu(conv_out, demodulate ? std::optional<at::Tensor>(d) : std::nullopt, noise,
                                      noise_strength, bias, skip, up, weight.size(2), lrelu, gain, clamp, dt);
  return {out, conv_out, d};
}

// The style gradient d_s = g·r − g²·s·Σ_o e·Q (e = gd·d³: the demodulation path) into res[2], and the weight
// gradient's demodulation term added to the conv's weight gradient gw into res[1] (when asked).
void style_demod_backward(std::vector<at::Tensor>& res, const at::Tensor& r, const at::Tensor& gd, const at::Tensor& d,
                          const at::Tensor& gw, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& styles, double weight_gain, bool demodulate, bool need_s, bool need_w) {
  const auto dt = x.scalar_type();
  const auto acc = acc_type(dt);
  const int64_t batch = x.size(0), cin = x.size(1), cout = weight.size(0), k = weight.size(2);
  RECORD_FUNCTION("modconv::demod_bwd", std::vector<c10::IValue>());
  // demodulation terms: e[b, o] = gd·d³; d_s[b, i] −= g²·s·Σ_o e·Q[o, i]; d_W[o, i, :] −= g²·W·Σ_b e·s²
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, dt, "modconv_bwd_demod", [&] {
    using A = acc_of<scalar_t>;
    const A g = static_cast<A>(weight_gain), g2 = g * g;
    std::vector<A> e;
    if (demodulate && (need_s || need_w)) {
      e.resize(batch * cout);
      const A* gdp = gd.data_ptr<A>();
      const A* dp = d.data_ptr<A>();
      for (int64_t i = 0; i < batch * cout; ++i) e[i] = gdp[i] * dp[i] * dp[i] * dp[i];
    }
    const scalar_t* sp = styles.data_ptr<scalar_t>();
    if (need_s) {
      auto ds = at::empty({batch, cin}, styles.options().dtype(acc));
      A* dsp = ds.data_ptr<A>();
      const A* rp = r.data_ptr<A>();
      const auto q_t = demodulate ? weight_sq<A, scalar_t>(weight) : at::Tensor();
      const A* q = demodulate ? q_t.template data_ptr<A>() : nullptr;
      constexpr int64_t kBlock = 64;  // channels per work item; the sum over o runs in order for each
      const int64_t blocks = (cin + kBlock - 1) / kBlock;
      at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<A> t(kBlock);
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / blocks, i0 = (item % blocks) * kBlock, n = std::min(kBlock, cin - i0);
          std::fill(t.begin(), t.end(), A(0));
          if (demodulate)
            for (int64_t o = 0; o < cout; ++o) ISA(axpy<A>(e[b * cout + o], q + o * cin + i0, t.data(), n));
          for (int64_t i = i0; i < i0 + n; ++i)
            dsp[b * cin + i] = g * rp[b * cin + i] - g2 * ld<A>(sp[b * cin + i]) * t[i - i0];
        }
      });
      res[2] = ds.to(dt);
    }
    if (need_w) {
      auto dw = gw.to(acc).contiguous();
      if (demodulate) {
        A* dwp = dw.data_ptr<A>();
        const scalar_t* wp = weight.data_ptr<scalar_t>();
        const int64_t kk = k * k;
        at::parallel_for(0, cout * cin, 64, [&](int64_t begin, int64_t end) {
          for (int64_t item = begin; item < end; ++item) {
            const int64_t o = item / cin, i = item % cin;
            A t = A(0);
            for (int64_t b = 0; b < batch; ++b) {
              const A sv = ld<A>(sp[b * cin + i]);
              t += e[b * cout + o] * sv * sv;
            }
            for (int64_t j = 0; j < kk; ++j) dwp[item * kk + j] -= g2 * ld<A>(wp[item * kk + j]) * t;
          }
        });
      }
      res[1] = dw.to(dt);
    }
  });
}

// mask: which of (x, weight, styles, noise, noise_strength, bias, skip) need a gradient; the others come back
// as empty tensors.
std::vector<at::Tensor> modconv_bwd_cpu(const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& weight_in,
                                        const at::Tensor& styles_in, const std::optional<at::Tensor>& noise_in,
                                        const std::optional<at::Tensor>& noise_strength,
                                        const std::optional<at::Tensor>& bias, const at::Tensor& conv_out,
                                        const at::Tensor& d, double weight_gain, bool demodulate, int64_t up,
                                        bool lrelu, double gain, std::optional<double> clamp, double eps,
                                        bool conv_bf16, std::vector<bool> mask) {
  TORCH_CHECK(mask.size() == 7, "mask must have 7 entries (x, weight, styles, noise, noise_strength, bias, skip)");
  check_inputs(x_in, weight_in, styles_in, up);
  const auto x = to_cl(x_in);
  const auto weight = weight_in.contiguous();
  const auto styles = styles_in.contiguous();
  const auto dt = x.scalar_type();
  const auto zt = conv_type(dt, conv_bf16);
  const auto acc = acc_type(dt);
  TORCH_CHECK(conv_out.scalar_type() == zt, "conv_out must have dtype ", zt, ", got ", conv_out.scalar_type());
  const int64_t batch = x.size(0), cin = x.size(1), cout = weight.size(0), k = weight.size(2);
  const bool need_x = mask[0], need_w = mask[1], need_s = mask[2];
  const bool need_noise = mask[3] && noise_in.has_value(), need_str = mask[4] && noise_in.has_value();
  const bool need_gu = need_x || need_s, need_gz = need_gu || need_w;
  std::vector<at::Tensor> res(7);
  std::optional<at::Tensor> noise;
  if (noise_in.has_value()) noise = noise_in->contiguous();

  if (mask[6]) res[6] = modconv_skip_bwd_cpu(grad);
  at::Tensor g_conv, gd;
  if (need_gz || need_noise || need_str || mask[5]) {
    auto [gc, gd_, S, gbias] = epilogue_bwd_impl(grad, conv_out,
                                                 demodulate ? std::optional<at::Tensor>(d) : std::nullopt, noise,
                                                 noise_strength, bias, up, k, lrelu, gain, clamp, need_gz);
    g_conv = std::move(gc);
    gd = gd_;
    if (mask[5] && bias.has_value()) res[5] = gbias.to(bias->scalar_type());
    if (need_noise || need_str) {
      const double s = strength_value(noise_strength);
      const auto& n = *noise;
      if (need_noise) {
        auto dn = S * s;  // [B, ho, wo]
        if (n.size(0) == 1 && batch > 1) {  // broadcast noise: sum over the batch in order
          auto acc_n = dn.select(0, 0).clone();
          for (int64_t b = 1; b < batch; ++b) acc_n.add_(dn.select(0, b));
          dn = acc_n.unsqueeze(0);
        }
        res[3] = dn.unsqueeze(1).to(n.scalar_type()).contiguous();
      }
      if (need_str) {
        // Σ_b Σ_p noise[b or 0, p] · S[b, p], sequential and in order (the map is small)
        const auto nf = n.to(acc).expand({batch, 1, n.size(2), n.size(3)}).reshape({batch, -1}).contiguous();
        const auto Sf = S.reshape({batch, -1});
        AT_DISPATCH_FLOATING_TYPES(acc, "modconv_strength_grad", [&] {
          const scalar_t* np_ = nf.data_ptr<scalar_t>();
          const scalar_t* sp = Sf.data_ptr<scalar_t>();
          scalar_t total = 0;
          for (int64_t i = 0; i < nf.numel(); ++i) total += np_[i] * sp[i];
          res[4] = at::full({}, total, noise_strength.has_value() ? noise_strength->options()
                                                                    : x.options().dtype(acc));
        });
      }
    }
  }
  if (need_gz && pointwise_path(k, up, cout) && !need_w) {
    const auto scale = styles.to(acc) * weight_gain;
    at::Tensor r;
    if (need_gu) {
      RECORD_FUNCTION("modconv::pointwise_bwd", std::vector<c10::IValue>());
      dispatch_tz(dt, g_conv.scalar_type(), "modconv_bwd_cpu", [&](auto tt, auto gt) {
        std::tie(res[0], r) = pointwise_backward<typename decltype(tt)::type, typename decltype(gt)::type>(
            g_conv, x, weight, scale, need_x, need_s);
      });
    }
    style_demod_backward(res, r, gd, d, at::Tensor(), x, weight, styles, weight_gain, demodulate, need_s, false);
  } else if (need_gz) {
    const auto w_conv = weight.to(zt);
    const auto scale = styles.to(acc) * weight_gain;
    // the conv's input is only read for the weight gradient: recompute u then; else pass a same-shaped stand-in
    const bool winograd = need_gu && use_winograd(k, up, zt, batch, cout, cin, x.size(2), x.size(3));
    at::Tensor u = need_w ? scale_to_new(x, scale, zt)
                          : (zt == dt || winograd ? x : empty_cl(x.sizes(), x, zt));
    at::Tensor gu, gw;
    if (winograd) {
      gu = empty_cl(x.sizes(), x, zt);
      winograd_conv3x3_cpu(g_conv, at::Tensor(), weight, true, gu);
      if (need_w)
        std::tie(std::ignore, gw, std::ignore) = at::convolution_backward(
            g_conv, u, w_conv, std::nullopt, {1, 1}, {1, 1}, {1, 1}, false, {0, 0}, 1, {false, true, false});
    } else if (up == 1) {
      std::tie(gu, gw, std::ignore) = at::convolution_backward(g_conv, u, onednn_weight(w_conv), std::nullopt,
                                                               {1, 1}, {k / 2, k / 2}, {1, 1}, false, {0, 0}, 1,
                                                               {need_gu, need_w, false});
    } else {
      std::tie(gu, gw, std::ignore) = at::convolution_backward(g_conv, u, onednn_weight_transposed(w_conv),
                                                               std::nullopt, {2, 2}, {0, 0}, {1, 1}, true, {0, 0}, 1,
                                                               {need_gu, need_w, false});
      if (need_w) gw = gw.transpose(0, 1);
    }
    at::Tensor r;
    if (need_gu) {
      // d_x in place into the conv's fresh input gradient when it has the right dtype and layout: one fewer
      // large allocation (first-touch page faults are a visible cost on CPU)
      gu = to_cl(gu);
      const bool in_place = gu.scalar_type() == dt && is_canon_cl(gu) && gu.storage().use_count() == 1;
      RECORD_FUNCTION("modconv::scale_bwd", std::vector<c10::IValue>());
      dispatch_tz(dt, gu.scalar_type(), "modconv_bwd_cpu", [&](auto tt, auto gt) {
        std::tie(res[0], r) = scale_bwd_impl<typename decltype(tt)::type, typename decltype(gt)::type>(
            gu, x, scale, need_x, need_s, in_place);
      });
    }
    style_demod_backward(res, r, gd, d, gw, x, weight, styles, weight_gain, demodulate, need_s, need_w);
  }
  for (auto& t : res)
    if (!t.defined()) t = at::empty({0}, x.options());
  return res;
}
