// SPDX-License-Identifier: MIT
// The one per-thread scratch mechanism of the library: the attention kernel's tile workspace,
// DAPE's network buffers and the rotary encoders' uncached rows all lease a per-thread instance,
// so that the steady state allocates nothing (each thread's buffers grow once and are reused).
#pragma once

#include <cstddef>
#include <memory>
#include <utility>
#include <vector>

#include "posenc/tensor.hpp"

namespace posenc::detail {

/// Exclusive use, for one scope, of the calling thread's instance of `Workspace` (default
/// constructed once per thread and kept for the life of the thread: OpenMP reuses its threads).
/// If that instance is already leased on this thread (a stage that itself calls into a user of
/// the same workspace type), the lease holds a fresh instance instead, so nested users never
/// share buffers.
template <class Workspace>
class ScratchLease {
 public:
  ScratchLease() {
    Slot& slot = thread_slot();
    if (slot.in_use) {
      owned_ = std::make_unique<Workspace>();
      workspace_ = owned_.get();
    } else {
      slot.in_use = true;
      in_use_ = &slot.in_use;
      workspace_ = &slot.workspace;
    }
  }
  ScratchLease(ScratchLease&& other) noexcept
      : workspace_(std::exchange(other.workspace_, nullptr)),
        in_use_(std::exchange(other.in_use_, nullptr)),
        owned_(std::move(other.owned_)) {}
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;
  ScratchLease& operator=(ScratchLease&&) = delete;
  ~ScratchLease() {
    if (in_use_ != nullptr) *in_use_ = false;
  }

  Workspace& get() { return *workspace_; }

 private:
  struct Slot {
    Workspace workspace;
    bool in_use = false;
  };
  static Slot& thread_slot() {
    thread_local Slot slot;
    return slot;
  }

  Workspace* workspace_ = nullptr;
  bool* in_use_ = nullptr;
  std::unique_ptr<Workspace> owned_;
};

/// Grows `buffer` (a std::vector or an Eigen vector) to at least `size` elements and returns its
/// data. Contents are unspecified; the buffer never shrinks.
template <class T>
T* grow(std::vector<T>& buffer, Index size) {
  if (static_cast<Index>(buffer.size()) < size) buffer.resize(static_cast<std::size_t>(size));
  return buffer.data();
}
template <class T>
T* grow(Vector<T>& buffer, Index size) {
  if (buffer.size() < size) buffer.resize(size);
  return buffer.data();
}

/// A row buffer for encoder stages that compute a few values per row on the spot (the rotary
/// encoders' uncached positions).
template <class Scalar>
struct RowScratch {
  std::vector<Scalar> values;
};

}  // namespace posenc::detail
