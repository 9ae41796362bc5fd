// SPDX-License-Identifier: MIT
// Shaw et al.'s relative position representations: learned embeddings of the clipped relative
// position added to the keys inside the logit (a^K) and to the values inside the output (a^V).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <random>
#include <utility>

#include "posenc/detail/check.hpp"
#include "posenc/detail/random.hpp"
#include "posenc/encoders/distance_bias.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// What the value side of ShawRelative uses.
enum class ShawValues {
  none,      // a^K only (the paper's ablation: a^K carries the gain)
  separate,  // a^V from its own table (the paper; tensor2tensor)
  tied       // a^V = a^K, one table for both (OpenNMT-py's `relations_values = relations_keys`)
};

/// Shaw, Uszkoreit & Vaswani 2018, "Self-Attention with Relative Position Representations"
/// (arXiv 1803.02155, §3): a RelativeKeyValue stage
///
///   logit_ij = scale · q_i · (k_j + a^K[j − i]),   out_i = Σ_j p_ij · (v_j + a^V[j − i])
///
/// with a[r] = table row clip(r, −k, k) + k (key minus query, as in the paper and
/// tensor2tensor's `_generate_relative_positions_matrix`).
/// - key_table: [2k + 1, D] (D = the per-head width of the logits), value_table: [2k + 1, Dv];
///   both shared by all heads (one pair per layer). k = max_relative_position (t2t's
///   `transformer_relative` uses 20).
/// - The query is scaled before the a^K term, as t2t pre-scales q by D^(−1/2): the kernel's
///   default scale reproduces golden shaw.json (logits, weights, output).
/// - Positions are absolute; with fewer queries than keys a caller aligning queries to the end of
///   the keys (t2t) passes query_offset = M − N.
/// - Per tile: the products of the queries with the table rows the tile needs (one small GEMM),
///   then contiguous runs per row for consecutive key positions.
/// - Example: examples/relative_biases.cpp.
template <class T>
class ShawRelative {
 public:
  using Scalar = T;

  /// a^K only (values untouched). Throws unless the table is [2k + 1, D >= 1] and finite.
  ShawRelative(Index max_relative_position, Matrix<T> key_table)
      : ShawRelative(max_relative_position, std::move(key_table), Matrix<T>(), ShawValues::none) {}

  /// Separate a^K and a^V tables. Throws unless both are [2k + 1, ·] with >= 1 column and finite.
  ShawRelative(Index max_relative_position, Matrix<T> key_table, Matrix<T> value_table)
      : ShawRelative(max_relative_position, std::move(key_table), std::move(value_table),
                     ShawValues::separate) {}

  /// One table for keys and values (OpenNMT-py).
  static ShawRelative tied(Index max_relative_position, Matrix<T> table) {
    return ShawRelative(max_relative_position, std::move(table), Matrix<T>(), ShawValues::tied);
  }

  /// Seeded tables, every entry ~ U(−a, a) with a = sqrt(6 / (rows + cols)) per table (Glorot
  /// uniform, TensorFlow's default variable initialiser, which t2t's tables get); key table
  /// first. `value_dim` is ignored unless values == separate.
  static ShawRelative random(Index max_relative_position, Index dim, Index value_dim,
                             ShawValues values, std::mt19937_64& rng) {
    constexpr const char* fn = "posenc::ShawRelative::random";
    detail::require(max_relative_position >= 0 && dim >= 1, fn,
                    "need max_relative_position >= 0 and dim >= 1, got ", max_relative_position,
                    " and ", dim);
    const auto glorot = [&rng](Index rows, Index cols) {
      const double limit = std::sqrt(6.0 / static_cast<double>(rows + cols));
      Matrix<T> table(rows, cols);
      for (Index i = 0; i < table.size(); ++i) {
        table.data()[i] = static_cast<T>(detail::uniform(rng, -limit, limit));
      }
      return table;
    };
    const Index rows = 2 * max_relative_position + 1;
    Matrix<T> keys = glorot(rows, dim);
    if (values == ShawValues::separate) {
      detail::require(value_dim >= 1, fn, "value_dim must be >= 1, got ", value_dim);
      Matrix<T> vals = glorot(rows, value_dim);
      return ShawRelative(max_relative_position, std::move(keys), std::move(vals));
    }
    return ShawRelative(max_relative_position, std::move(keys), Matrix<T>(), values);
  }

  Index max_relative_position() const { return max_relative_position_; }
  ShawValues values() const { return values_; }
  const Matrix<T>& key_table() const { return key_table_; }
  /// The a^V table (the key table when tied; empty when values == none).
  const Matrix<T>& value_table() const {
    return values_ == ShawValues::tied ? key_table_ : value_table_;
  }

  /// Table row of relative position j − i: clip(j − i, −k, k) + k.
  Index table_row(Index relative_position) const {
    const Index k = max_relative_position_;
    return std::clamp(relative_position, -k, k) + k;
  }

  /// Rejects a query width other than the key table's, or a value width other than the value
  /// table's.
  void validate(const AttentionShape& shape) const {
    constexpr const char* fn = "posenc::ShawRelative";
    detail::require(shape.query_dim == key_table_.cols(), fn, "the key table has width ",
                    key_table_.cols(), " but q and k have dim ", shape.query_dim);
    detail::require(values_ == ShawValues::none || shape.value_dim == value_table().cols(), fn,
                    "the value table has width ", value_table().cols(), " but v has dim ",
                    shape.value_dim);
  }

  /// logits(r, c) += scaled_queries.row(r) · a^K[kpos[c] − qpos[r]].
  /// scaled_queries: [rows, D]; logits: [rows, cols].
  void add_relative_logits(Index /*head*/, Positions query_positions, Positions key_positions,
                           ConstTileRef<T> scaled_queries, TileRef<T> logits) const {
    add_table_products(query_positions, key_positions, scaled_queries, key_table_, logits);
  }

  /// output.row(r) += Σ_c weights(r, c) · a^V[kpos[c] − qpos[r]] (nothing when values == none).
  /// weights: [rows, cols]; output: [rows, Dv].
  void add_relative_values(Index /*head*/, Positions query_positions, Positions key_positions,
                           ConstTileRef<T> weights, TileRef<T> output) const {
    if (values_ == ShawValues::none || weights.size() == 0) return;
    const TableRange range = table_range(query_positions, key_positions);
    output.noalias() += run_sums(query_positions, key_positions, range, weights) *
                        value_table().middleRows(range.first, range.count);
  }

  // Backward (attention_backward). With dO = ∂L/∂out and dS = ∂L/∂logit of a tile:
  //   ∂L/∂p_ij gains dO_i · a^V[j − i];   ∂L/∂(scaled q_i) gains Σ_j dS_ij · a^K[j − i];
  //   ∂L/∂a^K[t] = Σ_{j − i ↦ t} dS_ij · scaled q_i;   ∂L/∂a^V[t] = Σ_{j − i ↦ t} p_ij · dO_i.

  /// The tables' gradients, shaped like the tables (value_table empty unless values ==
  /// separate: a tied table's value share goes to key_table).
  struct Gradient {
    Matrix<T> key_table;
    Matrix<T> value_table;
    Gradient& operator+=(const Gradient& other) {
      key_table += other.key_table;
      value_table += other.value_table;
      return *this;
    }
    void set_zero() {
      key_table.setZero();
      value_table.setZero();
    }
  };

  Gradient zero_gradient() const {
    return {Matrix<T>::Zero(key_table_.rows(), key_table_.cols()),
            Matrix<T>::Zero(value_table_.rows(), value_table_.cols())};
  }

  /// dscores(r, c) += dout.row(r) · a^V[kpos[c] − qpos[r]] (nothing when values == none).
  /// dout: [rows, Dv]; dscores: [rows, cols].
  void add_relative_value_scores(Index /*head*/, Positions query_positions, Positions key_positions,
                                 ConstTileRef<T> dout, TileRef<T> dscores) const {
    if (values_ == ShawValues::none) return;
    add_table_products(query_positions, key_positions, dout, value_table(), dscores);
  }

  /// dqueries.row(r) += Σ_c dscores(r, c) · a^K[kpos[c] − qpos[r]] (the gradient of the scaled
  /// queries). dscores: [rows, cols]; dqueries: [rows, D].
  void add_relative_query_gradient(Index /*head*/, Positions query_positions,
                                   Positions key_positions, ConstTileRef<T> dscores,
                                   TileRef<T> dqueries) const {
    if (dscores.size() == 0) return;
    const TableRange range = table_range(query_positions, key_positions);
    dqueries.noalias() += run_sums(query_positions, key_positions, range, dscores) *
                          key_table_.middleRows(range.first, range.count);
  }

  /// Adds the tile's share of ∂L/∂a^K (from dscores and the scaled queries) and ∂L/∂a^V (from
  /// the weights and dout) to `gradient`.
  void accumulate_relative_gradient(Index /*head*/, Positions query_positions,
                                    Positions key_positions, ConstTileRef<T> scaled_queries,
                                    ConstTileRef<T> dscores, ConstTileRef<T> weights,
                                    ConstTileRef<T> dout, Gradient& gradient) const {
    if (dscores.size() == 0) return;
    const TableRange range = table_range(query_positions, key_positions);
    gradient.key_table.middleRows(range.first, range.count).noalias() +=
        run_sums(query_positions, key_positions, range, dscores).transpose() * scaled_queries;
    if (values_ == ShawValues::none) return;
    Matrix<T>& values = values_ == ShawValues::tied ? gradient.key_table : gradient.value_table;
    values.middleRows(range.first, range.count).noalias() +=
        run_sums(query_positions, key_positions, range, weights).transpose() * dout;
  }

 private:
  ShawRelative(Index max_relative_position, Matrix<T> key_table, Matrix<T> value_table,
               ShawValues values)
      : max_relative_position_(max_relative_position),
        key_table_(std::move(key_table)),
        value_table_(std::move(value_table)),
        values_(values) {
    constexpr const char* fn = "posenc::ShawRelative";
    detail::require(max_relative_position_ >= 0, fn, "max_relative_position must be >= 0, got ",
                    max_relative_position_);
    const Index rows = 2 * max_relative_position_ + 1;
    detail::require(key_table_.rows() == rows && key_table_.cols() >= 1, fn,
                    "key_table must be [2k + 1, D] = [", rows,
                    ", D >= 1] for k = ", max_relative_position_, ", got [", key_table_.rows(),
                    ", ", key_table_.cols(), "]");
    detail::require(key_table_.allFinite(), fn, "key_table must be finite");
    if (values_ == ShawValues::separate) {
      detail::require(value_table_.rows() == rows && value_table_.cols() >= 1, fn,
                      "value_table must be [2k + 1, Dv] = [", rows,
                      ", Dv >= 1] for k = ", max_relative_position_, ", got [", value_table_.rows(),
                      ", ", value_table_.cols(), "]");
      detail::require(value_table_.allFinite(), fn, "value_table must be finite");
    }
  }

  /// The table rows [first, first + count) that a tile's relative positions read.
  struct TableRange {
    Index first;
    Index count;
  };

  /// tile(r, c) += x.row(r) · table[kpos[c] − qpos[r]] for x [rows, table width].
  void add_table_products(Positions qpos, Positions kpos, ConstTileRef<T> x, const Matrix<T>& table,
                          TileRef<T> tile) const {
    if (tile.size() == 0) return;
    const TableRange range = table_range(qpos, kpos);
    // products[r, t] = x_r · table[first + t]
    const Matrix<T> products = x * table.middleRows(range.first, range.count).transpose();
    for_each_run(qpos, kpos, range, [&](Index r, Index c, Index length, Index t, bool constant) {
      auto segment = tile.row(r).segment(c, length);
      if (constant) {
        segment.array() += products(r, t);
      } else {
        segment += products.row(r).segment(t, length);
      }
    });
  }

  /// sums[r, t] = Σ of the entries of row r of `tile` whose relative position reads table row
  /// range.first + t.
  Matrix<T> run_sums(Positions qpos, Positions kpos, const TableRange& range,
                     ConstTileRef<T> tile) const {
    Matrix<T> sums = Matrix<T>::Zero(tile.rows(), range.count);
    for_each_run(qpos, kpos, range, [&](Index r, Index c, Index length, Index t, bool constant) {
      const auto segment = tile.row(r).segment(c, length);
      if (constant) {
        sums(r, t) += segment.sum();
      } else {
        sums.row(r).segment(t, length) += segment;
      }
    });
    return sums;
  }

  TableRange table_range(Positions qpos, Positions kpos) const {
    const auto [qmin, qmax] = std::minmax_element(qpos.begin(), qpos.end());
    const auto [kmin, kmax] = std::minmax_element(kpos.begin(), kpos.end());
    const Index first = table_row(*kmin - *qmax);
    return {first, table_row(*kmax - *qmin) - first + 1};
  }

  /// Calls run(r, c, length, t, constant) for runs of columns [c, c + length) of row r that read
  /// table row range.first + t: the same row for every column (constant) or rows t, t + 1, …
  /// With consecutive key positions each row is at most three runs (clipped below, the diagonal
  /// band, clipped above); otherwise every element is its own run.
  template <class Run>
  void for_each_run(Positions qpos, Positions kpos, const TableRange& range, Run&& run) const {
    const Index k = max_relative_position_;
    const auto rows = static_cast<Index>(qpos.size());
    const auto cols = static_cast<Index>(kpos.size());
    if (!detail::is_consecutive(kpos)) {
      for (Index r = 0; r < rows; ++r) {
        for (Index c = 0; c < cols; ++c) {
          const Index t =
              table_row(kpos[static_cast<std::size_t>(c)] - qpos[static_cast<std::size_t>(r)]) -
              range.first;
          run(r, c, 1, t, true);
        }
      }
      return;
    }
    const Index k0 = kpos[0];
    for (Index r = 0; r < rows; ++r) {
      // Column c has relative position k0 + c − i: <= −k for c < low, >= k for c >= high.
      const Index i = qpos[static_cast<std::size_t>(r)];
      const Index low = std::clamp<Index>(i - k0 - k + 1, 0, cols);
      const Index high = std::clamp<Index>(i - k0 + k, low, cols);
      if (low > 0) run(r, 0, low, table_row(-k) - range.first, true);
      if (high > low) run(r, low, high - low, table_row(k0 + low - i) - range.first, false);
      if (cols > high) run(r, high, cols - high, table_row(k) - range.first, true);
    }
  }

  Index max_relative_position_;
  Matrix<T> key_table_;
  Matrix<T> value_table_;
  ShawValues values_;
};

static_assert(RelativeKeyValue<ShawRelative<float>>);
static_assert(RelativeKeyValue<ShawRelative<double>>);

}  // namespace posenc
