// SPDX-License-Identifier: MIT
// The absolute positions of the rows and columns of an [H, N, M] weight or score tensor, resolved
// from AttentionOptions exactly as the kernel does (queries at query_offset + r or the explicit
// query_positions, keys at c or the explicit key_positions). Shared by the analysis tools.
#pragma once

#include <cstddef>
#include <vector>

#include "posenc/attention.hpp"
#include "posenc/detail/check.hpp"

namespace posenc::detail {

struct ResolvedPositions {
  std::vector<Index> queries;
  std::vector<Index> keys;
};

/// Positions of `rows` queries and `cols` keys. Throws when explicit positions have another size.
inline ResolvedPositions resolve_positions(const char* fn, const AttentionOptions& options,
                                           Index rows, Index cols) {
  require(
      options.query_positions.empty() || static_cast<Index>(options.query_positions.size()) == rows,
      fn, "options.query_positions has ", options.query_positions.size(), " entries but there are ",
      rows, " query rows");
  require(options.key_positions.empty() || static_cast<Index>(options.key_positions.size()) == cols,
          fn, "options.key_positions has ", options.key_positions.size(), " entries but there are ",
          cols, " key columns");
  ResolvedPositions p{std::vector<Index>(static_cast<std::size_t>(rows)),
                      std::vector<Index>(static_cast<std::size_t>(cols))};
  for (Index r = 0; r < rows; ++r) {
    const auto i = static_cast<std::size_t>(r);
    p.queries[i] =
        options.query_positions.empty() ? options.query_offset + r : options.query_positions[i];
  }
  for (Index c = 0; c < cols; ++c) {
    const auto j = static_cast<std::size_t>(c);
    p.keys[j] = options.key_positions.empty() ? c : options.key_positions[j];
  }
  return p;
}

}  // namespace posenc::detail
