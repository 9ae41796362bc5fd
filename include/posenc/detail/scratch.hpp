// SPDX-License-Identifier: MIT
// Per-thread scratch buffers for encoder stages, so that tile calls in the kernel's steady state
// allocate nothing (each thread's buffer grows once and is reused).
#pragma once

#include <cstddef>
#include <span>
#include <vector>

namespace posenc::detail {

/// `count` elements of the calling thread's scratch buffer for call site `Tag` (a distinct tag
/// per call site, so nested users never share a buffer). Contents are unspecified.
template <class T, class Tag>
std::span<T> thread_scratch(std::size_t count) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < count) buffer.resize(count);
  return {buffer.data(), count};
}

}  // namespace posenc::detail
