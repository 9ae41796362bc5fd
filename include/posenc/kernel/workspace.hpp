// SPDX-License-Identifier: MIT
// The per-thread buffers of the streaming kernel (TileWorkspace, leased through
// detail::ScratchLease) and the views the drivers take of them.
// IWYU pragma: private, include "posenc/attention.hpp"
#pragma once

#include <algorithm>
#include <vector>

#include "posenc/detail/scratch.hpp"
#include "posenc/detail/simd.hpp"
#include "posenc/kernel/online_softmax.hpp"
#include "posenc/tensor.hpp"

namespace posenc::kernel {

/// Buffers of one thread of the streaming kernel. They only grow; each thread keeps its own
/// between calls (see WorkspaceLease), so repeated calls of a shape allocate nothing.
template <class Scalar>
struct TileWorkspace {
  Vector<Scalar> queries, keys, keys_t, values_p, logits, scores, row_max, row_sum, rescale, output;
  std::vector<Index> query_positions, key_positions, column_begin, column_end;
  std::vector<OnlineSoftmax<Scalar>> states;

  /// `slots`: query blocks whose state a task keeps at once (the heads of a ScoreMixer task,
  /// the query blocks of a per-head task); `mixes`: a ScoreMixer's all-head logits and scores.
  void reserve(Index slots, Index query_block, Index key_block, Index key_halo, Index query_dim,
               Index logit_dim, Index value_dim, bool mixes) {
    const Index key_rows = key_block + 2 * key_halo;
    grow(queries, slots * query_block * logit_dim);
    grow(keys, key_rows * std::max(query_dim, logit_dim));
    grow(keys_t, logit_dim * padded_width<Scalar>(key_rows));
    grow(values_p, key_block * padded_width<Scalar>(value_dim));
    grow(logits, mixes ? slots * query_block * key_rows : 0);
    grow(scores, (mixes ? slots : 1) * query_block * padded_width<Scalar>(key_block));
    grow(row_max, slots * query_block);
    grow(row_sum, slots * query_block);
    grow(rescale, slots * query_block);
    grow(output, slots * query_block * padded_width<Scalar>(value_dim));
    if (static_cast<Index>(query_positions.size()) < slots * query_block) {
      query_positions.resize(static_cast<std::size_t>(slots * query_block));
    }
    if (static_cast<Index>(column_begin.size()) < query_block) {
      column_begin.resize(static_cast<std::size_t>(query_block));
      column_end.resize(static_cast<std::size_t>(query_block));
    }
    if (static_cast<Index>(key_positions.size()) < key_rows) {
      key_positions.resize(static_cast<std::size_t>(key_rows));
    }
    states.reserve(static_cast<std::size_t>(slots));
  }

 private:
  // Zeroed once when grown: tile entries the micro-kernels skip are then never uninitialised.
  static void grow(Vector<Scalar>& buffer, Index size) {
    if (buffer.size() < size) buffer.setZero(size);
  }
};

template <class Scalar>
Eigen::Map<Matrix<Scalar>> as_matrix(Vector<Scalar>& buffer, Index offset, Index rows, Index cols) {
  return Eigen::Map<Matrix<Scalar>>(buffer.data() + offset, rows, cols);
}
template <class Scalar>
Eigen::Map<Vector<Scalar>> as_vector(Vector<Scalar>& buffer, Index offset, Index size) {
  return Eigen::Map<Vector<Scalar>>(buffer.data() + offset, size);
}
template <class Scalar>
StridedTile<Scalar> as_strided(Scalar* data, Index rows, Index cols, Index stride) {
  return StridedTile<Scalar>(data, rows, cols, Eigen::OuterStride<>(stride));
}

/// The online-softmax state of `rows` query rows stored at slot `slot` of the workspace.
template <class Scalar>
OnlineSoftmax<Scalar> softmax_state(TileWorkspace<Scalar>& ws, Index slot, Index query_block,
                                    Index rows, Index value_dim) {
  const Index ld = padded_width<Scalar>(value_dim);
  Scalar* output = ws.output.data() + slot * query_block * ld;
  return {as_vector(ws.row_max, slot * query_block, rows),
          as_vector(ws.row_sum, slot * query_block, rows),
          as_vector(ws.rescale, slot * query_block, rows), as_strided(output, rows, value_dim, ld),
          as_strided(output, rows, ld, ld)};
}

/// Exclusive use of the calling thread's workspace for one call (or of a fresh one when the
/// thread's is in use: an encoder stage that itself calls attention). A few tiles: O(tile).
template <class Scalar>
using WorkspaceLease = detail::ScratchLease<TileWorkspace<Scalar>>;

}  // namespace posenc::kernel
