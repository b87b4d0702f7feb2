// Row kernels of the CPU modulated convolution (csrc/modconv_cpu.cpp), written once and compiled once per
// instruction set: modconv_cpu.cpp includes this file several times, each time inside its own namespace and with
// LSAP_TARGET set to a GCC/Clang `target` attribute ("" for the baseline build). Plain pointer code, no ATen:
// the compiler vectorises the channel loops (`omp simd`) for the chosen ISA, and the driver picks the widest one
// the CPU has at run time. No include guard on purpose.
//
// Layout: channels_last rows, element (x, c) of a row at x * C + c. Types: T = stored activations (float, double,
// BFloat16), Z = convolution operand/result (T, or float for BFloat16 activations when oneDNN has no bf16), A =
// accumulation (float, or double for double). The FIR taps are [1, 3, 3, 1] / 4 per axis (the 4x4 kernel
// [1,3,3,1]⊗[1,3,3,1]/64 times up² = 4); the filter is symmetric, so correlation = convolution and the adjoint
// of "tap j reads v[x + j - pad]" is "tap j reads g[x + j - (3 - pad)]".

#ifndef LSAP_TARGET
#error "define LSAP_TARGET before including modconv_cpu_kernels.h"
#endif

// u[p, c] = x[p, c] · s[c] over n pixels.
template <typename T, typename U, typename A>
LSAP_TARGET void scale_rows(const T* __restrict x, const A* __restrict s, U* __restrict u, int64_t n, int64_t C) {
  for (int64_t p = 0; p < n; ++p) {
    const T* xp = x + p * C;
    U* up = u + p * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) up[c] = st<U>(ld<A>(xp[c]) * s[c]);
  }
}

// acc[c] += Σ_p g[p, c] · x[p, c] (when acc), pixels in order, then dx[p, c] = g[p, c] · s[c] (when dx).
// dx may alias g (in place): each pixel's reduction reads g before dx overwrites it.
template <typename G, typename T, typename A>
LSAP_TARGET void scale_bwd_rows(const G* g, const T* __restrict x, const A* __restrict s, T* dx,
                                A* __restrict acc, int64_t n, int64_t C) {
  for (int64_t p = 0; p < n; ++p) {
    const G* gp = g + p * C;
    const T* xp = x + p * C;
    if (acc) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) acc[c] += ld<A>(gp[c]) * ld<A>(xp[c]);
    }
    if (dx) {
      T* dp = dx + p * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dp[c] = st<T>(ld<A>(gp[c]) * s[c]);
    }
  }
}

// Vertical 4-tap FIR: v[i] = ¼(r0[i] + r3[i]) + ¾(r1[i] + r2[i]) over n values (missing rows point at zeros).
template <typename I, typename O, typename A>
LSAP_TARGET void fir_vertical(const I* __restrict r0, const I* __restrict r1, const I* __restrict r2,
                              const I* __restrict r3, O* __restrict v, int64_t n) {
  const A q = A(0.25), t = A(0.75);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i)
    v[i] = st<O>(q * (ld<A>(r0[i]) + ld<A>(r3[i])) + t * (ld<A>(r1[i]) + ld<A>(r2[i])));
}

// Horizontal 4-tap FIR with stride: z[x, c] = Σ_j f_j v[stride·x + j − pad, c] for x < wo, taps outside
// [0, wv) read zero (stride 1: the up-path blur and its adjoint; stride 2: the skip up-sampling's adjoint).
template <typename A>
LSAP_TARGET void fir_horizontal(const A* __restrict v, int64_t wv, int64_t C, int64_t wo, int64_t stride,
                                int64_t pad, const A* __restrict zero, A* __restrict z) {
  const A q = A(0.25), t = A(0.75);
  for (int64_t x = 0; x < wo; ++x) {
    const A* p[4];
    for (int j = 0; j < 4; ++j) {
      const int64_t i = stride * x + j - pad;
      p[j] = (i >= 0 && i < wv) ? v + i * C : zero;
    }
    const A *p0 = p[0], *p1 = p[1], *p2 = p[2], *p3 = p[3];
    A* zx = z + x * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) zx[c] = q * (p0[c] + p3[c]) + t * (p1[c] + p2[c]);
  }
}

// Horizontal ×2 up-sampling by zero insertion + FIR (upfirdn2d up=2, pad (2,1)) of one row of ws pixels:
// out[2m] = ¼ v[m−1] + ¾ v[m], out[2m+1] = ¾ v[m] + ¼ v[m+1] (zero outside), 2·ws pixels.
template <typename A>
LSAP_TARGET void fir_up_horizontal(const A* __restrict v, int64_t ws, int64_t C, const A* __restrict zero,
                                   A* __restrict out) {
  const A q = A(0.25), t = A(0.75);
  for (int64_t m = 0; m < ws; ++m) {
    const A* a = m > 0 ? v + (m - 1) * C : zero;
    const A* b = v + m * C;
    const A* e = m + 1 < ws ? v + (m + 1) * C : zero;
    A* o0 = out + 2 * m * C;
    A* o1 = o0 + C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      o0[c] = q * a[c] + t * b[c];
      o1[c] = t * b[c] + q * e[c];
    }
  }
}

// clamp(gain·act(a)), written without conditionally evaluated arithmetic or comparisons: under GCC's default
// -ftrapping-math those block if-conversion, and the loop would not vectorise.
template <bool Lrelu, typename A>
LSAP_TARGET inline A epilogue_value(A a, A gain, A clamp) {
  const A slope = Lrelu ? (a > A(0) ? A(1) : A(0.2)) : A(1);
  A r = gain * slope * a;
  r = r < -clamp ? -clamp : r;
  r = r > clamp ? clamp : r;
  return r;
}

// Epilogue forward of one row of w pixels: a = z·d + sn[x] + bias; out = clamp(gain·act(a)) (+ skip).
// d and bias are per-channel vectors (ones / zeros when absent), sn the per-pixel strength·noise (or null),
// skip the up-sampled skip row [w, C] (or null); clamp = +inf when absent.
template <bool Lrelu, typename Z, typename O, typename A>
LSAP_TARGET void epilogue_fwd_row(const Z* __restrict z, int64_t w, int64_t C, const A* __restrict d,
                                  const A* __restrict bias, const A* __restrict sn, const A* __restrict skip,
                                  A gain, A clamp, O* __restrict out) {
  for (int64_t x = 0; x < w; ++x) {
    const A n = sn ? sn[x] : A(0);
    const Z* zx = z + x * C;
    O* ox = out + x * C;
    const A* kx = skip ? skip + x * C : nullptr;
    if (kx) {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) ox[c] = st<O>(epilogue_value<Lrelu>(ld<A>(zx[c]) * d[c] + n + bias[c], gain, clamp) + kx[c]);
    } else {
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) ox[c] = st<O>(epilogue_value<Lrelu>(ld<A>(zx[c]) * d[c] + n + bias[c], gain, clamp));
    }
  }
}

// Epilogue backward of one row: recompute a, then g_a = G·gain·act'(a)·[−clamp ≤ gain·act(a) ≤ clamp];
// gz = g_a·d; gd[c] += g_a·z; gb[c] += g_a; S[x] = Σ_c g_a (per pixel, for the noise gradients).
template <bool Lrelu, typename G, typename Z, typename GZ, typename A>
LSAP_TARGET void epilogue_bwd_row(const G* __restrict g, const Z* __restrict z, int64_t w, int64_t C,
                                  const A* __restrict d, const A* __restrict bias, const A* __restrict sn,
                                  A gain, A clamp, GZ* __restrict gz, A* __restrict gd, A* __restrict gb,
                                  A* __restrict S) {
  for (int64_t x = 0; x < w; ++x) {
    const A n = sn ? sn[x] : A(0);
    const G* gx = g + x * C;
    const Z* zx = z + x * C;
    GZ* ox = gz + x * C;
    A sum = A(0);
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < C; ++c) {
      const A zc = ld<A>(zx[c]);
      const A a = zc * d[c] + n + bias[c];
      const A pos = Lrelu ? (a > A(0) ? A(1) : A(0.2)) : A(1);
      const A pre = gain * pos * a;
      const A keep = ((pre >= -clamp) & (pre <= clamp)) ? A(1) : A(0);  // `&`: no conditional compare
      const A ga = ld<A>(gx[c]) * gain * pos * keep;
      ox[c] = st<GZ>(ga * d[c]);
      gd[c] += ga * zc;
      gb[c] += ga;
      sum += ga;
    }
    S[x] = sum;
  }
}

// q[g] = Σ_k w[g·kk + k]² for `groups` groups of kk values (Σ over a kernel's taps).
template <typename W, typename A>
LSAP_TARGET void sumsq_groups(const W* __restrict w, int64_t groups, int64_t kk, A* __restrict q) {
  for (int64_t g = 0; g < groups; ++g) {
    A s = A(0);
    for (int64_t k = 0; k < kk; ++k) {
      const A v = ld<A>(w[g * kk + k]);
      s += v * v;
    }
    q[g] = s;
  }
}

// Σ_i a[i]·b[i] in 8 fixed lanes combined pairwise: the same bits whatever the caller's threading.
template <typename A>
LSAP_TARGET A dot_lanes(const A* __restrict a, const A* __restrict b, int64_t n) {
  A acc[8] = {A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0)};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
#pragma omp simd
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  for (int j = 0; i < n; ++i, ++j) acc[j] += a[i] * b[i];
  for (int w = 4; w > 0; w /= 2)
    for (int j = 0; j < w; ++j) acc[j] += acc[j + w];
  return acc[0];
}

// y[i] += alpha·x[i] over n values.
template <typename A>
LSAP_TARGET void axpy(A alpha, const A* __restrict x, A* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// 1×1 convolution with few outputs (toRGB), style scaling folded into the operand: z[p, o] = Σ_i x[p, i]·w[o, i]
// with w = the weight row times g·s[b, i] (cout rows of cin), for n pixels; fixed-order dot products.
template <typename T, typename Z, typename A>
LSAP_TARGET void pointwise_fwd_rows(const T* __restrict x, const A* __restrict w, int64_t n, int64_t cin,
                                    int64_t cout, Z* __restrict z) {
  for (int64_t p = 0; p < n; ++p) {
    const T* xp = x + p * cin;
    for (int64_t o = 0; o < cout; ++o) {
      const A* wo = w + o * cin;
      A acc = A(0);
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < cin; ++i) acc += ld<A>(xp[i]) * wo[i];
      z[p * cout + o] = st<Z>(acc);
    }
  }
}

// Its input gradient fused with the style pass: g_u[i] = Σ_o gz[p, o]·W[o, i]; acc[i] += g_u[i]·x[p, i] (when acc);
// dx[p, i] = g_u[i]·scale[i] (when dx). gu is a caller's scratch row of cin values.
template <typename G, typename T, typename A>
LSAP_TARGET void pointwise_bwd_rows(const G* __restrict gz, const T* __restrict x, const A* __restrict w,
                                    const A* __restrict scale, int64_t n, int64_t cin, int64_t cout,
                                    T* __restrict dx, A* __restrict acc, A* __restrict gu) {
  for (int64_t p = 0; p < n; ++p) {
    const G* gp = gz + p * cout;
#pragma omp simd
    for (int64_t i = 0; i < cin; ++i) gu[i] = A(0);
    for (int64_t o = 0; o < cout; ++o) {
      const A go = ld<A>(gp[o]);
      const A* wo = w + o * cin;
#pragma omp simd
      for (int64_t i = 0; i < cin; ++i) gu[i] += go * wo[i];
    }
    const T* xp = x + p * cin;
    if (acc) {
#pragma omp simd
      for (int64_t i = 0; i < cin; ++i) acc[i] += gu[i] * ld<A>(xp[i]);
    }
    if (dx) {
      T* dp = dx + p * cin;
#pragma omp simd
      for (int64_t i = 0; i < cin; ++i) dp[i] = st<T>(gu[i] * scale[i]);
    }
  }
}
