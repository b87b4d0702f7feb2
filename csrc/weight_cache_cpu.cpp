// Why: an inversion calls every layer with the same frozen weight at every step, and rebuilding what the CPU
// convolution derives from it (a 16 MB Winograd transform, oneDNN's channels_last copy, the phase taps of the
// up-sampling path, Σ w²) cost about as much as the convolution itself on small layers.
#include "weight_cache_cpu.h"

#include <c10/core/StorageImpl.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <list>
#include <mutex>
#include <string>
#include <vector>

namespace {

struct Key {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  int64_t offset, what;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
};

struct Entry {
  Key key;
  int64_t version;
  uint64_t fingerprint;
  at::Tensor value;
};

// FNV-1a over the bytes of up to 64 elements spread over the weight: writes through `.data` (a separate version
// counter; rosinality's EMA update `p.data.mul_(d).add_(...)`) change them, where the version counter does not see it.
uint64_t fingerprint(const at::Tensor& w) {
  const auto flat = w.reshape(-1);
  const int64_t n = flat.numel(), step = std::max<int64_t>(1, n / 64), size = flat.element_size();
  const auto* base = static_cast<const unsigned char*>(flat.data_ptr());
  uint64_t h = 1469598103934665603ull;
  for (int64_t i = 0; i < n; i += step)
    for (int64_t b = 0; b < size; ++b) h = (h ^ base[i * flat.stride(0) * size + b]) * 1099511628211ull;
  return h;
}

std::atomic<int64_t>& limit_mb() {
  static std::atomic<int64_t> limit{[] {
    const char* env = std::getenv("LSAP_MODCONV_WEIGHT_CACHE_MB");
    return env == nullptr ? int64_t(1024) : std::atoll(env);
  }()};
  return limit;
}

int64_t limit_bytes() { return limit_mb().load() << 20; }

bool same(const Key& a, const at::Tensor& w, int64_t what) {
  if (a.what != what || a.offset != w.storage_offset() || a.dtype != w.scalar_type()) return false;
  if (a.sizes != w.sizes().vec() || a.strides != w.strides().vec()) return false;
  const auto alive = a.storage.lock();  // null once the weight's storage is freed
  return alive.defined() && alive.get() == w.storage().unsafeGetStorageImpl();
}

class Cache {
 public:
  at::Tensor get(const at::Tensor& w, int64_t what, const std::function<at::Tensor()>& make) {
    // a weight being trained changes at every step: only frozen weights (inversion) are kept
    if (limit_bytes() <= 0 || !w.has_storage() || w.requires_grad() || w.numel() == 0) return make();
    const int64_t version = w._version();
    const uint64_t print = fingerprint(w);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = entries_.begin(); it != entries_.end(); ++it)
        if (same(it->key, w, what) && it->version == version && it->fingerprint == print) {
          entries_.splice(entries_.begin(), entries_, it);  // most recently used first
          return it->value;
        }
    }
    at::Tensor value = make();
    std::lock_guard<std::mutex> lock(mutex_);
    // the same weight at an older version, and entries of freed weights, are dead: drop them
    entries_.remove_if([&](const Entry& e) { return same(e.key, w, what) || e.key.storage.expired(); });
    entries_.push_front({Key{c10::weak_intrusive_ptr<c10::StorageImpl>(w.storage().getWeakStorageImpl()),
                             w.storage_offset(), what, w.sizes().vec(), w.strides().vec(), w.scalar_type()},
                         version, print, value});
    int64_t bytes = 0;
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      bytes += static_cast<int64_t>(it->value.nbytes());
      if (bytes > limit_bytes()) {
        entries_.erase(it, entries_.end());
        break;
      }
    }
    return value;
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_.clear();
  }

  int64_t size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(entries_.size());
  }

 private:
  std::mutex mutex_;
  std::list<Entry> entries_;
};

Cache& cache() {
  static Cache instance;
  return instance;
}

}  // namespace

at::Tensor derived_from_weight(const at::Tensor& weight, int64_t what, const std::function<at::Tensor()>& make) {
  return cache().get(weight, what, make);
}

void weight_cache_clear() { cache().clear(); }

int64_t weight_cache_limit_mb(int64_t mb) { return limit_mb().exchange(mb); }

int64_t weight_cache_size() { return cache().size(); }
