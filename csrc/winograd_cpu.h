// Winograd F(2×2, 3×3) convolution on CPU (csrc/winograd_cpu.cpp), used by the modulated convolution's up=1 3×3
// path (csrc/modconv_cpu.cpp) where it measured faster than oneDNN (bench/bench_cpu_winograd.py).
#pragma once
#include <ATen/ATen.h>

// out = conv2d(x ⊙ scale, weight, stride 1, padding 1), or with `adjoint` the input gradient of that convolution
// applied to x (the weight flipped and its two channel axes swapped). x: [B, K, H, W] channels_last, float32 or
// bfloat16; scale: [B, K] float32 or undefined (no scaling); weight: [Cout, Cin, 3, 3] (K = Cin, or Cout with
// adjoint); out: [B, N, H, W] channels_last float32 (N = Cout, or Cin with adjoint), fully overwritten.
// Deterministic: the same bits for any thread count.
void winograd_conv3x3_cpu(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& weight, bool adjoint,
                          const at::Tensor& out);
