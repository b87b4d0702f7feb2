// Tensors derived from a convolution weight alone (Winograd transforms, oneDNN layouts, up-sampling phase taps,
// Σ w²), kept between calls of the CPU modulated convolution (csrc/weight_cache_cpu.cpp).
#pragma once
#include <ATen/ATen.h>

#include <functional>

// What is derived (one entry per weight and kind).
enum WeightDerived : int64_t {
  kWinogradForward = 0,  // the Winograd transform U of the weight
  kWinogradAdjoint = 1,  // ... of the flipped, channel-swapped weight (input gradients)
  kChannelsLast = 2,     // the weight in oneDNN's layout for channels_last activations
  kTransposedChannelsLast = 3,  // its two channel axes swapped, in that layout (up=2 as a transposed convolution)
  kSquareSums = 4,       // Q[o, i] = Σ_taps w² (demodulation)
  kPhaseTaps = 8,        // + 2a + b: the taps of output phase (a, b) of the up=2 path (csrc/modconv_cpu.cpp)
};

// make() for this `weight` and `what`, or its result from an earlier call on the same weight. Only weights that do
// not require grad are kept (a frozen generator, as in inversion). The same weight means the same storage (held
// weakly: entries of a freed weight never match again), offset, sizes, strides, dtype, version counter (an in-place
// update rebuilds) and the bytes of 64 elements spread over it (writes through `.data`, which has its own version
// counter; a `.data` write to a few elements only is not seen: call clear_workspace() after one).
// At most LSAP_MODCONV_WEIGHT_CACHE_MB (default 1024; 0 disables) of derived tensors are kept, least recently
// used dropped first. Thread-safe; make() runs outside the lock.
at::Tensor derived_from_weight(const at::Tensor& weight, int64_t what, const std::function<at::Tensor()>& make);

// Drop every entry (lsap_kernels.ops.modconv.cpu.clear_workspace()).
void weight_cache_clear();

// Set the limit in MB; returns the previous one. 0 bypasses the cache (every call rebuilds) and leaves its entries
// for when it is raised again, so a benchmark can interleave both; weight_cache_clear() frees them.
int64_t weight_cache_limit_mb(int64_t mb);

// Entries held now (tests).
int64_t weight_cache_size();
