// Style normalisation and SNCD on packed styles, CUDA (SPEC §4). Contract in style_cuda.cuh; the math and edge
// cases are those of style_cpu.cpp.
//
// Design: warp-level segmented reductions. A block is 8 warps; each warp owns one (sample b, layer l) segment at a
// time (grid-stride over the B·L segments, item = b·L + l so neighbouring warps read neighbouring memory). Its
// 32 lanes stride the segment in chunks of V = 16 / sizeof(T) elements (16-byte loads and stores when every
// pointer of the segment is 16-byte aligned, 4 chunks in flight per lane, 2 for half/bf16 styles next to float
// anchors; scalar accesses otherwise), and reduce with __shfl_xor_sync. No shared memory, no atomics,
// one launch per op for all layers.
//
// Determinism: the partition of a reduction does not depend on alignment or grid size. Chunk k of a segment
// belongs to lane k % 32; a lane keeps one partial per position j < V of the chunk and adds its chunks in
// increasing k (explicit FMAs), combines its V partials by a fixed tree, and the warp combines the lanes by an
// xor butterfly (which leaves the same bits in every lane). The vector and scalar paths perform the same
// operations in the same order, so the results depend on the input values only.
//
// FMAs, square roots and divisions go through the _rn intrinsics (IEEE round-to-nearest even, never approximated,
// whatever the flags); the clamp is `norm < eps ? eps : norm`, so a NaN norm (NaN input) stays NaN instead of
// being replaced by eps, and the backward takes the clamped branch only where norm < eps.
#include "style_cuda.cuh"

namespace lsap {
namespace style_cuda {
namespace {

constexpr int kWarp = 32;
// Chunks in flight per lane in the vector loops: 4 (64 bytes of styles), 2 where a chunk of the second operand is
// twice as wide (float anchors next to half/bf16 styles) to stay clear of register spills.
template <bool kUsesB, typename TA, typename TB>
constexpr int kUnroll = (kUsesB && sizeof(TB) > sizeof(TA)) ? 2 : 4;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // beyond 8M segments the warps loop

// ---- scalar helpers ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }
__device__ __forceinline__ float sqrt_rn(float x) { return __fsqrt_rn(x); }
__device__ __forceinline__ double sqrt_rn(double x) { return __dsqrt_rn(x); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
struct FromAcc;
template <>
struct FromAcc<float> {
  __device__ static float cast(float v) { return v; }
};
template <>
struct FromAcc<double> {
  __device__ static double cast(double v) { return v; }
};
template <>
struct FromAcc<__half> {
  __device__ static __half cast(float v) { return __float2half_rn(v); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  __device__ static __nv_bfloat16 cast(float v) { return __float2bfloat16_rn(v); }
};
// acc_type<T> -> T, round to nearest even (NaN stays NaN).
template <typename T>
__device__ __forceinline__ T from_acc(acc_type<T> v) {
  return FromAcc<T>::cast(v);
}

// ---- 16-byte packs ------------------------------------------------------------------------------------------------
// N elements of T, 16-byte aligned: one 16-byte access, or two for a chunk of float/double anchors next to half
// styles (V = 8 floats = 32 bytes).
template <typename T, int N>
struct alignas(16) Pack {
  T v[N];
};

template <typename T>
constexpr int kChunk = 16 / static_cast<int>(sizeof(T));  // elements per 16 bytes: float 4, double 2, half/bf16 8

// Element <-> 32-bit word bit casts, little-endian (a word holds two halves, low element first; a double
// spans two words, low word first).
__device__ __forceinline__ void put_words(float x, uint32_t* w) { w[0] = __float_as_uint(x); }
__device__ __forceinline__ void put_words(double x, uint32_t* w) {
  w[0] = static_cast<uint32_t>(__double2loint(x));
  w[1] = static_cast<uint32_t>(__double2hiint(x));
}
__device__ __forceinline__ float get_word(const uint32_t* w, float) { return __uint_as_float(w[0]); }
__device__ __forceinline__ double get_word(const uint32_t* w, double) {
  return __hiloint2double(static_cast<int>(w[1]), static_cast<int>(w[0]));
}
__device__ __forceinline__ uint32_t bits16(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
__device__ __forceinline__ void from_bits16(unsigned short b, __half& x) { x = __ushort_as_half(b); }
__device__ __forceinline__ void from_bits16(unsigned short b, __nv_bfloat16& x) { x = __ushort_as_bfloat16(b); }

// Pack <-> 32-bit words.
template <typename T, int N>
__device__ __forceinline__ void pack_to_words(const Pack<T, N>& p, uint32_t* w) {
  if constexpr (sizeof(T) == 2) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) w[i] = bits16(p.v[2 * i]) | (bits16(p.v[2 * i + 1]) << 16);
  } else {
    constexpr int kPer = static_cast<int>(sizeof(T) / 4);
#pragma unroll
    for (int i = 0; i < N; ++i) put_words(p.v[i], w + kPer * i);
  }
}

template <typename T, int N>
__device__ __forceinline__ void words_to_pack(const uint32_t* w, Pack<T, N>& p) {
  if constexpr (sizeof(T) == 2) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      from_bits16(static_cast<unsigned short>(w[i] & 0xffffu), p.v[2 * i]);
      from_bits16(static_cast<unsigned short>(w[i] >> 16), p.v[2 * i + 1]);
    }
  } else {
    constexpr int kPer = static_cast<int>(sizeof(T) / 4);
#pragma unroll
    for (int i = 0; i < N; ++i) p.v[i] = get_word(w + kPer * i, T());
  }
}

// Packs move as whole uint4 values through __ldg / __stwb (one ld.global.nc.v4 / st.global.v4 each, inline PTX
// the optimiser cannot split: a plain uint4 or member-wise Pack copy comes out as 2-, 4- and 8-byte accesses).
// The kernels' inputs are read-only for the launch and never alias its outputs.
template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  constexpr int kQuads = static_cast<int>(sizeof(Pack<T, N>) / sizeof(uint4));
  uint32_t w[4 * kQuads];
  const uint4* src = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int q = 0; q < kQuads; ++q) {
    const uint4 u = __ldg(src + q);
    w[4 * q] = u.x, w[4 * q + 1] = u.y, w[4 * q + 2] = u.z, w[4 * q + 3] = u.w;
  }
  Pack<T, N> v;
  words_to_pack(w, v);
  return v;
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  constexpr int kQuads = static_cast<int>(sizeof(Pack<T, N>) / sizeof(uint4));
  uint32_t w[4 * kQuads];
  pack_to_words(v, w);
  uint4* dst = reinterpret_cast<uint4*>(p);
#pragma unroll
  for (int q = 0; q < kQuads; ++q) __stwb(dst + q, make_uint4(w[4 * q], w[4 * q + 1], w[4 * q + 2], w[4 * q + 3]));
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---- warp reductions ----------------------------------------------------------------------------------------------
// Butterfly over the 32 lanes: v_i + v_{i^m} == v_{i^m} + v_i bit for bit, so every lane ends with the same sum.
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int m = kWarp / 2; m > 0; m >>= 1) v += __shfl_xor_sync(kFullMask, v, m);
  return v;
}

// Fixed tree over a lane's V per-position partials.
template <int V, typename acc_t>
__device__ __forceinline__ acc_t combine(acc_t (&p)[V]) {
#pragma unroll
  for (int w = V / 2; w > 0; w /= 2) {
#pragma unroll
    for (int j = 0; j < w; ++j) p[j] += p[j + w];
  }
  return p[0];
}

enum class Reduce { kSq, kSqDot, kDot };

// Over one segment of n elements, by the calling warp (lane = its lane id); every lane gets the results:
//   kSq: sq = Σ a²    kSqDot: sq = Σ a², dot = Σ a·b    kDot: dot = Σ a·b
// b has n elements of TB (T or the accumulation type); it is not read for kSq.
template <Reduce kMode, typename TA, typename TB>
__device__ __forceinline__ void seg_reduce(const TA* __restrict__ a, const TB* __restrict__ b, int64_t n, int lane,
                                           acc_type<TA>& sq, acc_type<TA>& dot) {
  using acc_t = acc_type<TA>;
  constexpr int V = kChunk<TA>;
  constexpr bool kWantSq = kMode != Reduce::kDot;
  constexpr bool kWantDot = kMode != Reduce::kSq;
  acc_t ps[V], pd[V];
#pragma unroll
  for (int j = 0; j < V; ++j) ps[j] = pd[j] = acc_t(0);
  // One element at position j of its chunk.
  auto add = [&](acc_t x, acc_t y, int j) {
    if constexpr (kWantSq) ps[j] = fma_rn(x, x, ps[j]);
    if constexpr (kWantDot) pd[j] = fma_rn(x, y, pd[j]);
  };
  auto add_scalar_chunk = [&](int64_t k, int m) {  // chunk k, its first m elements
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < m) {
        const int64_t i = k * V + j;
        if constexpr (kWantDot) {
          add(to_acc(__ldg(a + i)), to_acc(__ldg(b + i)), j);
        } else {
          add(to_acc(__ldg(a + i)), acc_t(0), j);
        }
      }
    }
  };

  const int64_t nfull = n / V;                       // full chunks
  const int rem = static_cast<int>(n - nfull * V);  // elements of the partial chunk nfull
  const bool vec = aligned16(a) && (!kWantDot || aligned16(b));
  if (vec) {
    constexpr int U = kUnroll<kWantDot, TA, TB>;
    int64_t k = lane;
    for (; k + (U - 1) * kWarp < nfull; k += U * kWarp) {
      Pack<TA, V> va[U];
      Pack<TB, V> vb[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        va[u] = load_pack<V>(a + (k + u * kWarp) * V);
        if constexpr (kWantDot) vb[u] = load_pack<V>(b + (k + u * kWarp) * V);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          if constexpr (kWantDot) {
            add(to_acc(va[u].v[j]), to_acc(vb[u].v[j]), j);
          } else {
            add(to_acc(va[u].v[j]), acc_t(0), j);
          }
        }
      }
    }
    for (; k < nfull; k += kWarp) {
      const Pack<TA, V> va = load_pack<V>(a + k * V);
      if constexpr (kWantDot) {
        const Pack<TB, V> vb = load_pack<V>(b + k * V);
#pragma unroll
        for (int j = 0; j < V; ++j) add(to_acc(va.v[j]), to_acc(vb.v[j]), j);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) add(to_acc(va.v[j]), acc_t(0), j);
      }
    }
    if (rem != 0 && k == nfull) add_scalar_chunk(k, rem);  // the lane owning the partial chunk
  } else {
    for (int64_t k = lane; k * V < n; k += kWarp) add_scalar_chunk(k, k < nfull ? V : rem);
  }
  if constexpr (kWantSq) sq = warp_sum(combine<V>(ps));
  if constexpr (kWantDot) dot = warp_sum(combine<V>(pd));
}

// out[i] = op(a[i], b[i]) over one segment of n elements, by the calling warp. a (TA == T) and b (TB) are read
// only when kUseA / kUseB; op receives 0 for an unused operand. 16-byte packs while every used pointer is aligned,
// then coalesced scalars for the rest (or for everything).
template <bool kUseA, bool kUseB, typename T, typename TB, typename Op>
__device__ __forceinline__ void seg_map(const T* __restrict__ a, const TB* __restrict__ b, T* __restrict__ out,
                                        int64_t n, int lane, const Op& op) {
  using acc_t = acc_type<T>;
  constexpr int V = kChunk<T>;
  auto apply = [&](const Pack<T, V>& va, const Pack<TB, V>& vb) {
    Pack<T, V> o;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      acc_t x = acc_t(0), y = acc_t(0);
      if constexpr (kUseA) x = to_acc(va.v[j]);
      if constexpr (kUseB) y = to_acc(vb.v[j]);
      o.v[j] = from_acc<T>(op(x, y));
    }
    return o;
  };

  int64_t scalar_from = 0;
  if (aligned16(out) && (!kUseA || aligned16(a)) && (!kUseB || aligned16(b))) {
    constexpr int U = kUnroll<kUseB, T, TB>;
    const int64_t nfull = n / V;
    int64_t k = lane;
    for (; k + (U - 1) * kWarp < nfull; k += U * kWarp) {
      Pack<T, V> va[U];
      Pack<TB, V> vb[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if constexpr (kUseA) va[u] = load_pack<V>(a + (k + u * kWarp) * V);
        if constexpr (kUseB) vb[u] = load_pack<V>(b + (k + u * kWarp) * V);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) store_pack<V>(out + (k + u * kWarp) * V, apply(va[u], vb[u]));
    }
    for (; k < nfull; k += kWarp) {
      Pack<T, V> va;
      Pack<TB, V> vb;
      if constexpr (kUseA) va = load_pack<V>(a + k * V);
      if constexpr (kUseB) vb = load_pack<V>(b + k * V);
      store_pack<V>(out + k * V, apply(va, vb));
    }
    scalar_from = nfull * V;
  }
  for (int64_t i = scalar_from + lane; i < n; i += kWarp) {
    acc_t x = acc_t(0), y = acc_t(0);
    if constexpr (kUseA) x = to_acc(__ldg(a + i));
    if constexpr (kUseB) y = to_acc(__ldg(b + i));
    out[i] = from_acc<T>(op(x, y));
  }
}

// ---- elementwise ops (same formulas as style_cpu.cpp) -------------------------------------------------------------
template <typename acc_t>
struct ScaleOp {  // ŝ = s · (1 / max(||s||, eps))
  acc_t inv;
  __device__ acc_t operator()(acc_t s, acc_t) const { return s * inv; }
};

template <typename acc_t>
struct DivOp {  // clamped normalize backward: g / eps
  acc_t eps;
  __device__ acc_t operator()(acc_t g, acc_t) const { return div_rn(g, eps); }
};

template <typename acc_t>
struct ProjectOp {  // (g − proj·s) / ||s||, proj = (g·s) / ||s||²
  acc_t proj, inv;
  __device__ acc_t operator()(acc_t g, acc_t s) const { return (g - proj * s) * inv; }
};

template <typename acc_t>
struct AnchorDivOp {  // clamped sncd backward: g_cos · μ / eps
  acc_t g, eps;
  __device__ acc_t operator()(acc_t, acc_t mu) const { return div_rn(g * mu, eps); }
};

template <typename acc_t>
struct CosGradOp {  // g_cos/||s|| · (μ − c/||s|| · s)
  acc_t g_inv, c_inv;
  __device__ acc_t operator()(acc_t s, acc_t mu) const { return g_inv * (mu - c_inv * s); }
};

// ---- segments -----------------------------------------------------------------------------------------------------
struct Segment {
  int64_t row;  // b · width + offsets[l]: start of the segment in the styles
  int64_t lo;   // offsets[l]: start in the anchors
  int64_t n;    // channels of layer l
};

__device__ __forceinline__ Segment segment_of(int64_t item, const int64_t* __restrict__ offsets, int64_t layers,
                                              int64_t width) {
  const int64_t b = item / layers, l = item - b * layers;
  const int64_t lo = offsets[l];
  return {b * width + lo, lo, offsets[l + 1] - lo};
}

// Segment items of the calling warp: first, then every item_stride().
__device__ __forceinline__ int64_t first_item() {
  return static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + static_cast<int64_t>(threadIdx.x / kWarp);
}
__device__ __forceinline__ int64_t item_stride() { return static_cast<int64_t>(gridDim.x) * kWarpsPerBlock; }
__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x % kWarp); }

// ---- kernels ------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void normalize_fwd_kernel(const T* __restrict__ styles, T* __restrict__ hat,
                                     acc_type<T>* __restrict__ norm, const int64_t* __restrict__ offsets,
                                     int64_t items, int64_t layers, int64_t width, acc_type<T> eps) {
  using acc_t = acc_type<T>;
  const int lane = lane_id();
  for (int64_t item = first_item(); item < items; item += item_stride()) {
    const Segment sg = segment_of(item, offsets, layers, width);
    acc_t sq = acc_t(0), unused = acc_t(0);
    seg_reduce<Reduce::kSq>(styles + sg.row, static_cast<const acc_t*>(nullptr), sg.n, lane, sq, unused);
    const acc_t nr = sqrt_rn(sq);
    if (lane == 0) norm[item] = nr;
    const acc_t inv = div_rn(acc_t(1), nr < eps ? eps : nr);  // NaN norms stay NaN
    seg_map<true, false>(styles + sg.row, static_cast<const acc_t*>(nullptr), hat + sg.row, sg.n, lane,
                         ScaleOp<acc_t>{inv});
  }
}

template <typename T>
__global__ void normalize_bwd_kernel(const T* __restrict__ grad_hat, const T* __restrict__ styles,
                                     const acc_type<T>* __restrict__ norm, T* __restrict__ grad_styles,
                                     const int64_t* __restrict__ offsets, int64_t items, int64_t layers,
                                     int64_t width, acc_type<T> eps) {
  using acc_t = acc_type<T>;
  const int lane = lane_id();
  for (int64_t item = first_item(); item < items; item += item_stride()) {
    const Segment sg = segment_of(item, offsets, layers, width);
    const acc_t nr = norm[item];
    if (nr < eps) {  // ŝ = s / eps: a plain scaling (warp-uniform branch; NaN norms take the other one)
      seg_map<true, false>(grad_hat + sg.row, static_cast<const T*>(nullptr), grad_styles + sg.row, sg.n, lane,
                           DivOp<acc_t>{eps});
      continue;
    }
    const acc_t inv = div_rn(acc_t(1), nr);
    acc_t unused = acc_t(0), dot = acc_t(0);
    seg_reduce<Reduce::kDot>(grad_hat + sg.row, styles + sg.row, sg.n, lane, unused, dot);
    const acc_t proj = dot * inv * inv;  // (g·ŝ)/||s||
    seg_map<true, true>(grad_hat + sg.row, styles + sg.row, grad_styles + sg.row, sg.n, lane,
                        ProjectOp<acc_t>{proj, inv});
  }
}

template <typename T>
__global__ void sncd_fwd_kernel(const T* __restrict__ styles, const acc_type<T>* __restrict__ anchors,
                                acc_type<T>* __restrict__ cos, acc_type<T>* __restrict__ norm,
                                const int64_t* __restrict__ offsets, int64_t items, int64_t layers, int64_t width,
                                acc_type<T> eps) {
  using acc_t = acc_type<T>;
  const int lane = lane_id();
  for (int64_t item = first_item(); item < items; item += item_stride()) {
    const Segment sg = segment_of(item, offsets, layers, width);
    acc_t sq = acc_t(0), dot = acc_t(0);
    seg_reduce<Reduce::kSqDot>(styles + sg.row, anchors + sg.lo, sg.n, lane, sq, dot);
    if (lane == 0) {
      const acc_t nr = sqrt_rn(sq);
      norm[item] = nr;
      cos[item] = div_rn(dot, nr < eps ? eps : nr);  // NaN norms stay NaN
    }
  }
}

template <typename T>
__global__ void sncd_bwd_kernel(const acc_type<T>* __restrict__ grad_cos, const T* __restrict__ styles,
                                const acc_type<T>* __restrict__ anchors, const acc_type<T>* __restrict__ cos,
                                const acc_type<T>* __restrict__ norm, T* __restrict__ grad_styles,
                                const int64_t* __restrict__ offsets, int64_t items, int64_t layers, int64_t width,
                                acc_type<T> eps) {
  using acc_t = acc_type<T>;
  const int lane = lane_id();
  for (int64_t item = first_item(); item < items; item += item_stride()) {
    const Segment sg = segment_of(item, offsets, layers, width);
    const acc_t nr = norm[item], g = grad_cos[item];
    if (nr < eps) {  // c = s·μ / eps (warp-uniform branch; NaN norms take the other one)
      seg_map<false, true>(static_cast<const T*>(nullptr), anchors + sg.lo, grad_styles + sg.row, sg.n, lane,
                           AnchorDivOp<acc_t>{g, eps});
      continue;
    }
    const acc_t inv = div_rn(acc_t(1), nr);  // ∂c/∂s = (μ − c·ŝ)/||s||
    seg_map<true, true>(styles + sg.row, anchors + sg.lo, grad_styles + sg.row, sg.n, lane,
                        CosGradOp<acc_t>{g * inv, cos[item] * inv});
  }
}

// ---- launch helpers -----------------------------------------------------------------------------------------------
// Segments to run (batch · layers), or -1 for invalid sizes.
inline int64_t segment_count(int64_t batch, int64_t width, int64_t layers) {
  if (batch < 0 || width < 0 || layers < 1) return -1;
  return batch * layers;
}

inline unsigned grid_for(int64_t items) {
  const int64_t blocks = (items + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

}  // namespace

template <typename T>
cudaError_t normalize_fwd(const T* styles, T* styles_hat, acc_type<T>* norm, const int64_t* offsets, int64_t batch,
                          int64_t width, int64_t layers, double eps, cudaStream_t stream) {
  const int64_t items = segment_count(batch, width, layers);
  if (items < 0) return cudaErrorInvalidValue;
  if (items == 0) return cudaSuccess;
  normalize_fwd_kernel<T><<<grid_for(items), kThreadsPerBlock, 0, stream>>>(
      styles, styles_hat, norm, offsets, items, layers, width, static_cast<acc_type<T>>(eps));
  return cudaGetLastError();
}

template <typename T>
cudaError_t normalize_bwd(const T* grad_hat, const T* styles, const acc_type<T>* norm, T* grad_styles,
                          const int64_t* offsets, int64_t batch, int64_t width, int64_t layers, double eps,
                          cudaStream_t stream) {
  const int64_t items = segment_count(batch, width, layers);
  if (items < 0) return cudaErrorInvalidValue;
  if (items == 0) return cudaSuccess;
  normalize_bwd_kernel<T><<<grid_for(items), kThreadsPerBlock, 0, stream>>>(
      grad_hat, styles, norm, grad_styles, offsets, items, layers, width, static_cast<acc_type<T>>(eps));
  return cudaGetLastError();
}

template <typename T>
cudaError_t sncd_fwd(const T* styles, const acc_type<T>* anchors, acc_type<T>* cos, acc_type<T>* norm,
                     const int64_t* offsets, int64_t batch, int64_t width, int64_t layers, double eps,
                     cudaStream_t stream) {
  const int64_t items = segment_count(batch, width, layers);
  if (items < 0) return cudaErrorInvalidValue;
  if (items == 0) return cudaSuccess;
  sncd_fwd_kernel<T><<<grid_for(items), kThreadsPerBlock, 0, stream>>>(styles, anchors, cos, norm, offsets, items,
                                                                      layers, width, static_cast<acc_type<T>>(eps));
  return cudaGetLastError();
}

template <typename T>
cudaError_t sncd_bwd(const acc_type<T>* grad_cos, const T* styles, const acc_type<T>* anchors,
                     const acc_type<T>* cos, const acc_type<T>* norm, T* grad_styles, const int64_t* offsets,
                     int64_t batch, int64_t width, int64_t layers, double eps, cudaStream_t stream) {
  const int64_t items = segment_count(batch, width, layers);
  if (items < 0) return cudaErrorInvalidValue;
  if (items == 0) return cudaSuccess;
  sncd_bwd_kernel<T><<<grid_for(items), kThreadsPerBlock, 0, stream>>>(
      grad_cos, styles, anchors, cos, norm, grad_styles, offsets, items, layers, width, static_cast<acc_type<T>>(eps));
  return cudaGetLastError();
}

#define LSAP_STYLE_CUDA_INSTANTIATE(T)                                                                          \
  template cudaError_t normalize_fwd<T>(const T*, T*, acc_type<T>*, const int64_t*, int64_t, int64_t, int64_t, \
                                        double, cudaStream_t);                                                  \
  template cudaError_t normalize_bwd<T>(const T*, const T*, const acc_type<T>*, T*, const int64_t*, int64_t,   \
                                        int64_t, int64_t, double, cudaStream_t);                                \
  template cudaError_t sncd_fwd<T>(const T*, const acc_type<T>*, acc_type<T>*, acc_type<T>*, const int64_t*,   \
                                   int64_t, int64_t, int64_t, double, cudaStream_t);                            \
  template cudaError_t sncd_bwd<T>(const acc_type<T>*, const T*, const acc_type<T>*, const acc_type<T>*,       \
                                   const acc_type<T>*, T*, const int64_t*, int64_t, int64_t, int64_t, double,   \
                                   cudaStream_t);
LSAP_STYLE_CUDA_INSTANTIATE(float)
LSAP_STYLE_CUDA_INSTANTIATE(double)
LSAP_STYLE_CUDA_INSTANTIATE(__half)
LSAP_STYLE_CUDA_INSTANTIATE(__nv_bfloat16)
#undef LSAP_STYLE_CUDA_INSTANTIATE

}  // namespace style_cuda
}  // namespace lsap
