// SPDX-License-Identifier: MIT
// The malloc wrappers behind alloc_counter.hpp. Defining malloc, free, calloc, realloc,
// reallocarray, posix_memalign, aligned_alloc, memalign, valloc and pvalloc in the executable
// interposes them for the whole process (libstdc++'s operator new, Eigen, libgomp); each forwards
// to glibc's __libc_* entry point and adds malloc_usable_size of the block to a live counter.
// Compiled out under sanitizers, which interpose malloc themselves.
#include "support/alloc_counter.hpp"

#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstddef>
#include <limits>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define POSENC_BENCH_MALLOC_HOOK 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || \
    __has_feature(memory_sanitizer)
#define POSENC_BENCH_MALLOC_HOOK 0
#endif
#endif
#if !defined(POSENC_BENCH_MALLOC_HOOK)
#if defined(__GLIBC__)  // defined by <cerrno> above
#define POSENC_BENCH_MALLOC_HOOK 1
#else
#define POSENC_BENCH_MALLOC_HOOK 0
#endif
#endif
#if POSENC_BENCH_MALLOC_HOOK
#include <malloc.h>
#endif

namespace {

// Constant-initialised, so malloc may run before any static constructor.
std::atomic<std::int64_t> live_bytes{0};
std::atomic<std::int64_t> peak_bytes{0};
std::atomic<std::int64_t> allocations{0};
std::atomic<bool> hook_seen{false};

#if POSENC_BENCH_MALLOC_HOOK
void raise_peak(std::int64_t now) {
  std::int64_t peak = peak_bytes.load(std::memory_order_relaxed);
  while (now > peak && !peak_bytes.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

void* counted(void* block) {
  if (block == nullptr) return nullptr;
  const auto size = static_cast<std::int64_t>(malloc_usable_size(block));
  raise_peak(live_bytes.fetch_add(size, std::memory_order_relaxed) + size);
  allocations.fetch_add(1, std::memory_order_relaxed);
  hook_seen.store(true, std::memory_order_relaxed);
  return block;
}

void uncounted(void* block) {
  if (block == nullptr) return;
  live_bytes.fetch_sub(static_cast<std::int64_t>(malloc_usable_size(block)),
                       std::memory_order_relaxed);
}
#endif

}  // namespace

#if POSENC_BENCH_MALLOC_HOOK
extern "C" {
// glibc's own implementations, exported for exactly this purpose.
void* __libc_malloc(std::size_t size) noexcept;
void __libc_free(void* block) noexcept;
void* __libc_calloc(std::size_t count, std::size_t size) noexcept;
void* __libc_realloc(void* block, std::size_t size) noexcept;
void* __libc_memalign(std::size_t alignment, std::size_t size) noexcept;
void* __libc_valloc(std::size_t size) noexcept;
void* __libc_pvalloc(std::size_t size) noexcept;

void* malloc(std::size_t size) noexcept { return counted(__libc_malloc(size)); }

void free(void* block) noexcept {
  uncounted(block);
  __libc_free(block);
}

void* calloc(std::size_t count, std::size_t size) noexcept {
  return counted(__libc_calloc(count, size));
}

void* realloc(void* block, std::size_t size) noexcept {
  const auto old_size =
      block == nullptr ? std::int64_t{0} : static_cast<std::int64_t>(malloc_usable_size(block));
  void* moved = __libc_realloc(block, size);
  if (moved == nullptr) {
    // glibc frees the block for realloc(block, 0); on failure the block is untouched.
    if (block != nullptr && size == 0) live_bytes.fetch_sub(old_size, std::memory_order_relaxed);
    return nullptr;
  }
  const auto new_size = static_cast<std::int64_t>(malloc_usable_size(moved));
  raise_peak(live_bytes.fetch_add(new_size - old_size, std::memory_order_relaxed) + new_size -
             old_size);
  if (block == nullptr) allocations.fetch_add(1, std::memory_order_relaxed);
  return moved;
}

void* reallocarray(void* block, std::size_t count, std::size_t size) noexcept {
  if (size != 0 && count > std::numeric_limits<std::size_t>::max() / size) {
    errno = ENOMEM;
    return nullptr;
  }
  return realloc(block, count * size);
}

void* memalign(std::size_t alignment, std::size_t size) noexcept {
  return counted(__libc_memalign(alignment, size));
}

void* aligned_alloc(std::size_t alignment, std::size_t size) noexcept {
  return counted(__libc_memalign(alignment, size));
}

int posix_memalign(void** out, std::size_t alignment, std::size_t size) noexcept {
  if (alignment % sizeof(void*) != 0 || (alignment & (alignment - 1)) != 0 || alignment == 0) {
    return EINVAL;
  }
  void* block = counted(__libc_memalign(alignment, size));
  if (block == nullptr) return ENOMEM;
  *out = block;
  return 0;
}

void* valloc(std::size_t size) noexcept { return counted(__libc_valloc(size)); }

void* pvalloc(std::size_t size) noexcept { return counted(__libc_pvalloc(size)); }
}  // extern "C"
#endif

namespace posenc::bench {

bool allocation_counter_available() {
  return POSENC_BENCH_MALLOC_HOOK != 0 && hook_seen.load(std::memory_order_relaxed);
}

std::int64_t live_heap_bytes() { return live_bytes.load(std::memory_order_relaxed); }

std::int64_t peak_heap_bytes() { return peak_bytes.load(std::memory_order_relaxed); }

void reset_peak_heap_bytes() {
  peak_bytes.store(live_bytes.load(std::memory_order_relaxed), std::memory_order_relaxed);
}

std::int64_t allocation_count() { return allocations.load(std::memory_order_relaxed); }

double HeapPeak::extra_mib() const {
  if (!allocation_counter_available()) return std::numeric_limits<double>::quiet_NaN();
  return static_cast<double>(extra_bytes()) / (1024.0 * 1024.0);
}

}  // namespace posenc::bench
