// Activation buffers for the ViT's own kernels (src/vit/buffers.rs), kept for reuse.
//
// A training step allocates the same activation and gradient-temporary sizes every time.
// From glibc they come from the top of the heap, and when a step frees them the heap is
// trimmed and the next step faults every page in again: 36,000 minor faults and 40-70 ms
// of a 520 ms ViT step on a 2-core AMD EPYC. Buffers taken here are ordinary CPU tensors
// whose deleter hands the memory back to a free list (by exact size) instead of to glibc, so
// the next step reuses it without faulting. Memory is reused only after torch has dropped
// the last reference to it. At most kMaxCached bytes wait in the free lists; the rest goes
// back to glibc, and ft_pool_empty_cache() releases everything waiting.

#include <ATen/ATen.h>

#include <pthread.h>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr size_t kMaxCached = size_t(1) << 30;
constexpr size_t kAlign = 64;  // c10's CPU allocator alignment

struct Pool {
  std::mutex mu;
  std::unordered_map<size_t, std::vector<void*>> free;
  size_t cached = 0;
};

// Never destroyed: tensors holding its buffers may be freed after static destructors run.
Pool& pool() {
  static Pool* p = [] {
    auto* q = new Pool();
    // fork() waits for the lock, so no other thread is halfway through changing the free
    // lists when it copies them; both processes then release it (the child's copy is held
    // by the forking thread, the only one the child has).
    pthread_atfork([] { pool().mu.lock(); }, [] { pool().mu.unlock(); }, [] { pool().mu.unlock(); });
    return q;
  }();
  return *p;
}

void* take(size_t bytes) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> g(p.mu);
    auto it = p.free.find(bytes);
    if (it != p.free.end() && !it->second.empty()) {
      void* out = it->second.back();
      it->second.pop_back();
      p.cached -= bytes;
      return out;
    }
  }
  void* out = nullptr;
  return posix_memalign(&out, kAlign, bytes) == 0 ? out : nullptr;
}

void give_back(void* ptr, size_t bytes) {
  Pool& p = pool();
  {
    std::lock_guard<std::mutex> g(p.mu);
    if (p.cached + bytes <= kMaxCached) {
      p.free[bytes].push_back(ptr);
      p.cached += bytes;
      return;
    }
  }
  std::free(ptr);
}

}  // namespace

extern "C" {

// A new contiguous CPU tensor of `sizes` and ScalarType `dtype`, uninitialized, its memory
// from the free lists; null on any failure (the caller then allocates through torch).
at::Tensor* ft_pool_empty(const int64_t* sizes, size_t ndim, int32_t dtype) noexcept {
  void* mem = nullptr;
  size_t bytes = 0;
  try {
    auto st = static_cast<c10::ScalarType>(dtype);
    std::vector<int64_t> shape(sizes, sizes + ndim);
    size_t n = 1;
    for (int64_t s : shape) {
      if (s < 0) return nullptr;
      n *= static_cast<size_t>(s);
    }
    bytes = n * c10::elementSize(st);
    if (bytes == 0) return nullptr;
    mem = take(bytes);
    if (mem == nullptr) return nullptr;
    auto t = at::from_blob(
        mem, shape, [bytes](void* q) { give_back(q, bytes); },
        at::TensorOptions().dtype(st).device(at::kCPU));
    mem = nullptr;  // owned by the tensor now
    return new at::Tensor(std::move(t));
  } catch (...) {
    if (mem != nullptr) give_back(mem, bytes);
    return nullptr;
  }
}

// Frees every buffer waiting for reuse; returns how many bytes.
size_t ft_pool_empty_cache() noexcept {
  Pool& p = pool();
  std::unordered_map<size_t, std::vector<void*>> drop;
  size_t bytes;
  {
    std::lock_guard<std::mutex> g(p.mu);
    drop.swap(p.free);
    bytes = p.cached;
    p.cached = 0;
  }
  for (auto& kv : drop)
    for (void* q : kv.second) std::free(q);
  return bytes;
}

// Bytes waiting for reuse.
size_t ft_pool_cached() noexcept {
  Pool& p = pool();
  std::lock_guard<std::mutex> g(p.mu);
  return p.cached;
}

}  // extern "C"
