// Kernels of the Winograd F(2×2, 3×3) convolution (csrc/winograd_cpu.cpp), compiled once per instruction set:
// winograd_cpu.cpp includes this file inside its own namespace with LSAP_TARGET set to a `target` attribute (""
// for the baseline build) and LSAP_WINO_AVX2 defined for the AVX2+FMA build. No include guard on purpose.
//
// Tiles: tile t = (b, ty, tx) covers output rows 2ty, 2ty+1 and columns 2tx, 2tx+1; its input patch is rows
// 2ty−1 … 2ty+2, columns 2tx−1 … 2tx+2 (zero outside: padding 1). A chunk holds `rows` tiles (a multiple of
// kMr; tiles past the end are zero padding) and, per transform point ξ = 4i + j, a row-major [rows, K] matrix
// V[ξ] (channels contiguous) and a row-major [rows, Np] matrix M[ξ] = V[ξ] · U[ξ]. Every output element is a fixed
// sequence of operations (the GEMM sums over k in order), whatever the chunking and the thread count.
// The 16 matrices of V (and of M) lie `plane` floats apart, a stride padded off multiples of 4 KB: the transforms
// touch all 16 at once, and 16 streams 4 KB apart would share L1 sets (8-way) and evict each other.

#ifndef LSAP_TARGET
#error "define LSAP_TARGET before including winograd_cpu_kernels.h"
#endif

// Input transform V[ξ][r] = scale ⊙ (Bᵀ d B)[ξ] for the chunk's tiles t0 … t0+n−1 (rows n … rows−1: zeros).
// Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]. x: [B, H, W, K]; scale: [B, K] or null;
// zero: K zeros of type I.
template <typename I>
LSAP_TARGET void input_transform(const I* __restrict x, const float* __restrict scale, const I* __restrict zero,
                                 int64_t H, int64_t W, int64_t K, int64_t th, int64_t tw, int64_t t0, int64_t n,
                                 int64_t rows, int64_t plane, float* __restrict V) {
  for (int64_t r = 0; r < rows; ++r) {
    float* v = V + r * K;
    if (r >= n) {
      for (int xi = 0; xi < 16; ++xi) std::memset(v + xi * plane, 0, K * sizeof(float));
      continue;
    }
    const int64_t t = t0 + r, b = t / (th * tw), ty = (t / tw) % th, tx = t % tw;
    const I* p[16];
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int64_t y = 2 * ty - 1 + i, xx = 2 * tx - 1 + j;
        p[4 * i + j] = (y >= 0 && y < H && xx >= 0 && xx < W) ? x + ((b * H + y) * W + xx) * K : zero;
      }
    const float* s = scale ? scale + b * K : nullptr;
#pragma omp simd
    for (int64_t c = 0; c < K; ++c) {
      float d[16];
      for (int q = 0; q < 16; ++q) d[q] = to_float(p[q][c]);
      float e[16];  // Bᵀ d (rows)
      for (int j = 0; j < 4; ++j) {
        e[0 + j] = d[0 + j] - d[8 + j];
        e[4 + j] = d[4 + j] + d[8 + j];
        e[8 + j] = d[8 + j] - d[4 + j];
        e[12 + j] = d[4 + j] - d[12 + j];
      }
      const float sc = s ? s[c] : 1.0f;
      for (int i = 0; i < 4; ++i) {  // (Bᵀ d) B (columns)
        const float* ei = e + 4 * i;
        v[(4 * i + 0) * plane + c] = (ei[0] - ei[2]) * sc;
        v[(4 * i + 1) * plane + c] = (ei[1] + ei[2]) * sc;
        v[(4 * i + 2) * plane + c] = (ei[2] - ei[1]) * sc;
        v[(4 * i + 3) * plane + c] = (ei[1] - ei[3]) * sc;
      }
    }
  }
}

// Output transform Y = Aᵀ M[·][r] A (Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]]) of the chunk's n tiles into out
// [B, H, W, N]; outputs past the border (odd H or W) go to `scratch` (N floats) and are dropped.
LSAP_TARGET inline void output_transform(const float* __restrict M, int64_t plane, int64_t Np, int64_t N,
                                         int64_t H, int64_t W, int64_t th, int64_t tw, int64_t t0, int64_t n,
                                         float* __restrict out, float* __restrict scratch) {
  for (int64_t r = 0; r < n; ++r) {
    const int64_t t = t0 + r, b = t / (th * tw), ty = (t / tw) % th, tx = t % tw;
    float* o[4];
    for (int a = 0; a < 2; ++a)
      for (int e = 0; e < 2; ++e) {
        const int64_t y = 2 * ty + a, xx = 2 * tx + e;
        o[2 * a + e] = (y < H && xx < W) ? out + ((b * H + y) * W + xx) * N : scratch;
      }
    float *o0 = o[0], *o1 = o[1], *o2 = o[2], *o3 = o[3];
    const float* m = M + r * Np;
#pragma omp simd
    for (int64_t c = 0; c < N; ++c) {
      float f[16];
      for (int q = 0; q < 16; ++q) f[q] = m[q * plane + c];
      float g[8];  // Aᵀ M (rows): 2 × 4
      for (int j = 0; j < 4; ++j) {
        g[j] = f[j] + f[4 + j] + f[8 + j];
        g[4 + j] = f[4 + j] - f[8 + j] - f[12 + j];
      }
      o0[c] = g[0] + g[1] + g[2];
      o1[c] = g[1] - g[2] - g[3];
      o2[c] = g[4] + g[5] + g[6];
      o3[c] = g[5] - g[6] - g[7];
    }
  }
}

// C[rows, Np] = A[rows, K] · B for one transform point, B packed as [Np/16][K][16] (zero columns past N).
// Loop order: K in blocks of kKc, then 16-column panels (the panel's kKc × 16 block stays in L1, the next one is
// prefetched), then blocks of kMr rows (A's kKc-wide stripe stays in L2). The float accumulators go through C
// between K blocks: the same arithmetic as one pass.
#ifdef LSAP_WINO_AVX2
LSAP_TARGET inline void micro_tile(const float* __restrict a, int64_t lda, const float* __restrict b, int64_t kn,
                                   float* __restrict c, int64_t ldc, bool accumulate, const float* prefetch) {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (accumulate) {
    c00 = _mm256_loadu_ps(c + 0 * ldc), c01 = _mm256_loadu_ps(c + 0 * ldc + 8);
    c10 = _mm256_loadu_ps(c + 1 * ldc), c11 = _mm256_loadu_ps(c + 1 * ldc + 8);
    c20 = _mm256_loadu_ps(c + 2 * ldc), c21 = _mm256_loadu_ps(c + 2 * ldc + 8);
    c30 = _mm256_loadu_ps(c + 3 * ldc), c31 = _mm256_loadu_ps(c + 3 * ldc + 8);
    c40 = _mm256_loadu_ps(c + 4 * ldc), c41 = _mm256_loadu_ps(c + 4 * ldc + 8);
    c50 = _mm256_loadu_ps(c + 5 * ldc), c51 = _mm256_loadu_ps(c + 5 * ldc + 8);
  } else {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
  }
  const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda, *a4 = a + 4 * lda, *a5 = a + 5 * lda;
  if (prefetch)  // the next weight panel, one 64-byte line per k (it comes from L3: 16 matrices of up to 1 MB)
    for (int64_t k = 0; k < kn; ++k) _mm_prefetch(reinterpret_cast<const char*>(prefetch + 16 * k), _MM_HINT_T0);
  for (int64_t k = 0; k < kn; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + 16 * k), b1 = _mm256_loadu_ps(b + 16 * k + 8);
    __m256 v = _mm256_broadcast_ss(a0 + k);
    c00 = _mm256_fmadd_ps(v, b0, c00), c01 = _mm256_fmadd_ps(v, b1, c01);
    v = _mm256_broadcast_ss(a1 + k);
    c10 = _mm256_fmadd_ps(v, b0, c10), c11 = _mm256_fmadd_ps(v, b1, c11);
    v = _mm256_broadcast_ss(a2 + k);
    c20 = _mm256_fmadd_ps(v, b0, c20), c21 = _mm256_fmadd_ps(v, b1, c21);
    v = _mm256_broadcast_ss(a3 + k);
    c30 = _mm256_fmadd_ps(v, b0, c30), c31 = _mm256_fmadd_ps(v, b1, c31);
    v = _mm256_broadcast_ss(a4 + k);
    c40 = _mm256_fmadd_ps(v, b0, c40), c41 = _mm256_fmadd_ps(v, b1, c41);
    v = _mm256_broadcast_ss(a5 + k);
    c50 = _mm256_fmadd_ps(v, b0, c50), c51 = _mm256_fmadd_ps(v, b1, c51);
  }
  _mm256_storeu_ps(c + 0 * ldc, c00), _mm256_storeu_ps(c + 0 * ldc + 8, c01);
  _mm256_storeu_ps(c + 1 * ldc, c10), _mm256_storeu_ps(c + 1 * ldc + 8, c11);
  _mm256_storeu_ps(c + 2 * ldc, c20), _mm256_storeu_ps(c + 2 * ldc + 8, c21);
  _mm256_storeu_ps(c + 3 * ldc, c30), _mm256_storeu_ps(c + 3 * ldc + 8, c31);
  _mm256_storeu_ps(c + 4 * ldc, c40), _mm256_storeu_ps(c + 4 * ldc + 8, c41);
  _mm256_storeu_ps(c + 5 * ldc, c50), _mm256_storeu_ps(c + 5 * ldc + 8, c51);
}
#else
LSAP_TARGET inline void micro_tile(const float* __restrict a, int64_t lda, const float* __restrict b, int64_t kn,
                                   float* __restrict c, int64_t ldc, bool accumulate, const float*) {
  float acc[kMr][16];
  for (int r = 0; r < kMr; ++r)
    for (int j = 0; j < 16; ++j) acc[r][j] = accumulate ? c[r * ldc + j] : 0.0f;
  for (int64_t k = 0; k < kn; ++k)
    for (int r = 0; r < kMr; ++r) {
      const float av = a[r * lda + k];
#pragma omp simd
      for (int j = 0; j < 16; ++j) acc[r][j] += av * b[16 * k + j];
    }
  for (int r = 0; r < kMr; ++r)
    for (int j = 0; j < 16; ++j) c[r * ldc + j] = acc[r][j];
}
#endif

LSAP_TARGET inline void gemm_point(const float* __restrict A, const float* __restrict Bp, float* __restrict C,
                                   int64_t rows, int64_t K, int64_t Np) {
  const int64_t nblocks = Np / 16;
  for (int64_t k0 = 0; k0 < K; k0 += kKc) {
    const int64_t kn = std::min(kKc, K - k0);
    for (int64_t nb = 0; nb < nblocks; ++nb) {
      const float* b = Bp + (nb * K + k0) * 16;
      const float* next = nb + 1 < nblocks ? b + K * 16 : nullptr;
      for (int64_t r = 0; r < rows; r += kMr)
        micro_tile(A + r * K + k0, K, b, kn, C + r * Np + nb * 16, Np, k0 > 0, r == 0 ? next : nullptr);
    }
  }
}
