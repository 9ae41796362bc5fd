// SPDX-License-Identifier: MIT
// Argument checking for public entry points: every failure is a std::invalid_argument whose
// message names the function, the argument and the sizes it got.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace posenc::detail {

/// Throws std::invalid_argument("<function>: <parts...>"). `function` is the public name the
/// user called, e.g. "posenc::attention".
template <class... Parts>
[[noreturn]] void throw_invalid_argument(const char* function, Parts&&... parts) {
  std::ostringstream message;
  message << function << ": ";
  (message << ... << std::forward<Parts>(parts));
  throw std::invalid_argument(message.str());
}

/// Throws with the given message parts unless `condition` holds.
template <class... Parts>
void require(bool condition, const char* function, Parts&&... parts) {
  if (!condition) throw_invalid_argument(function, std::forward<Parts>(parts)...);
}

}  // namespace posenc::detail
