// SPDX-License-Identifier: MIT
// Learned absolute position embeddings: a [rows, dim] table, one row read per token and added to
// its embedding (ConvS2S, BERT, GPT-2, fairseq/RoBERTa), plus the two position-id rules in use
// (past + t, and fairseq's padding-aware ids) and seeded initialisers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "posenc/detail/check.hpp"
#include "posenc/detail/random.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// BERT / GPT-2 / DistilBERT position ids: past_length + t for t in [0, count).
inline std::vector<Index> sequential_positions(Index count, Index past_length = 0) {
  constexpr const char* fn = "posenc::sequential_positions";
  detail::require(count >= 0, fn, "count must be non-negative, got ", count);
  detail::require(past_length >= 0, fn, "past_length must be non-negative, got ", past_length);
  std::vector<Index> ids(static_cast<std::size_t>(count));
  for (Index t = 0; t < count; ++t) ids[static_cast<std::size_t>(t)] = past_length + t;
  return ids;
}

/// fairseq `make_positions` / HF `create_position_ids_from_input_ids` (RoBERTa, XLM-R): a pad
/// token (== padding_idx) gets padding_idx; any other token t gets padding_idx + past_length +
/// (number of non-pad tokens in tokens[0..t]). Real tokens therefore start at padding_idx + 1
/// and left padding does not shift them. tokens: one sequence.
inline std::vector<Index> padding_aware_positions(std::span<const Index> tokens, Index padding_idx,
                                                  Index past_length = 0) {
  constexpr const char* fn = "posenc::padding_aware_positions";
  detail::require(padding_idx >= 0, fn, "padding_idx must be non-negative, got ", padding_idx);
  detail::require(past_length >= 0, fn, "past_length must be non-negative, got ", past_length);
  std::vector<Index> ids(tokens.size());
  Index real = 0;
  for (std::size_t t = 0; t < tokens.size(); ++t) {
    if (tokens[t] == padding_idx) {
      ids[t] = padding_idx;
    } else {
      ids[t] = padding_idx + past_length + ++real;
    }
  }
  return ids;
}

namespace detail::learned_absolute {

/// Fills m with N(0, stddev^2) draws from `seed` (detail::GaussianSource: the same table with
/// every standard library).
template <class Scalar>
void fill_normal(Matrix<Scalar>& m, double stddev, std::uint64_t seed) {
  GaussianSource normal(seed);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>(stddev * normal());
}

}  // namespace detail::learned_absolute

/// Learned absolute position embedding: x[t, :] += table[position_offset + first_position + t, :]
/// (contiguous form) or table[position_ids[t], :] (explicit form).
///
/// Papers: Gehring et al. 2017, "Convolutional Sequence to Sequence Learning", arXiv:1705.03122
/// (learned position embeddings); Devlin et al. 2018 (BERT), arXiv:1810.04805; Radford et al.
/// 2019 (GPT-2, no arXiv); Liu et al. 2019 (RoBERTa, fairseq ids), arXiv:1907.11692.
///
/// Shapes: table is [rows, dim]; x is [n, dim]; position_ids has n entries; lookup returns
/// [n, dim].
///
/// Conventions: position ids index the table directly, as HF's `position_ids` and fairseq's
/// `make_positions` output do; `position_offset` is added only by the contiguous form, where
/// token t of the chunk sits at position first_position + t (first_position = past length):
///   - BERT / GPT-2: position_offset 0, ids = sequential_positions(n, past).
///   - fairseq / RoBERTa: position_offset padding_idx + 1 (= 2), table of max_positions +
///     padding_idx + 1 rows with a zero pad row; ids = padding_aware_positions(tokens, 1, past).
///     fairseq's one-token decoding step reads row padding_idx + length, i.e.
///     add_to(x, length - 1).
///   - HF BART: position_offset 2, padding ignored.
/// A learned table cannot extrapolate: a position beyond the table throws (no clamping).
///
/// Golden: tests/data/learned_abs.json (fairseq LearnedPositionalEmbedding, HF RoBERTa ids).
template <class Scalar_>
class LearnedAbsoluteEncoding {
 public:
  using Scalar = Scalar_;

  /// Throws std::invalid_argument for an empty table or a negative position_offset.
  explicit LearnedAbsoluteEncoding(Matrix<Scalar> table, Index position_offset = 0)
      : table_(std::move(table)), position_offset_(position_offset) {
    constexpr const char* fn = "posenc::LearnedAbsoluteEncoding";
    detail::require(table_.rows() > 0 && table_.cols() > 0, fn, "table must be non-empty, got [",
                    table_.rows(), ", ", table_.cols(), "]");
    detail::require(position_offset >= 0, fn, "position_offset must be non-negative, got ",
                    position_offset);
  }

  /// A [rows, dim] table of N(0, stddev^2) draws from `seed`. HF (BERT, GPT-2) initialises with
  /// stddev = initializer_range = 0.02 and rows = max_position_embeddings.
  static LearnedAbsoluteEncoding normal(Index rows, Index dim, double stddev, std::uint64_t seed,
                                        Index position_offset = 0) {
    constexpr const char* fn = "posenc::LearnedAbsoluteEncoding::normal";
    detail::require(rows > 0 && dim > 0, fn, "rows and dim must be positive, got rows ", rows,
                    ", dim ", dim);
    detail::require(std::isfinite(stddev) && stddev >= 0.0, fn,
                    "stddev must be finite and non-negative, got ", stddev);
    Matrix<Scalar> table(rows, dim);
    detail::learned_absolute::fill_normal(table, stddev, seed);
    return LearnedAbsoluteEncoding(std::move(table), position_offset);
  }

  /// fairseq's LearnedPositionalEmbedding: max_positions + padding_idx + 1 rows of
  /// N(0, 1/dim) draws with the padding_idx row zeroed, position_offset padding_idx + 1.
  static LearnedAbsoluteEncoding fairseq(Index max_positions, Index dim, Index padding_idx,
                                         std::uint64_t seed) {
    constexpr const char* fn = "posenc::LearnedAbsoluteEncoding::fairseq";
    detail::require(max_positions > 0 && dim > 0, fn,
                    "max_positions and dim must be positive, got max_positions ", max_positions,
                    ", dim ", dim);
    detail::require(padding_idx >= 0, fn, "padding_idx must be non-negative, got ", padding_idx);
    Matrix<Scalar> table(max_positions + padding_idx + 1, dim);
    detail::learned_absolute::fill_normal(table, 1.0 / std::sqrt(static_cast<double>(dim)), seed);
    table.row(padding_idx).setZero();
    return LearnedAbsoluteEncoding(std::move(table), padding_idx + 1);
  }

  Index dim() const { return table_.cols(); }
  Index rows() const { return table_.rows(); }
  Index position_offset() const { return position_offset_; }
  /// Contiguous positions [0, max_positions()) fit in the table.
  Index max_positions() const { return table_.rows() - position_offset_; }
  const Matrix<Scalar>& table() const { return table_; }

  /// x[t, :] += table[position_offset + first_position + t, :]. x: [n, dim].
  void add_to(Eigen::Ref<Matrix<Scalar>> x, Index first_position) const {
    constexpr const char* fn = "posenc::LearnedAbsoluteEncoding::add_to";
    check_width(x.cols(), fn);
    detail::require(first_position >= 0, fn, "first_position must be non-negative, got ",
                    first_position);
    // The first position that does not fit, if any (written so that nothing overflows).
    const Index fitting = std::max<Index>(max_positions() - first_position, 0);
    if (x.rows() > fitting) {
      const Index position = first_position + fitting;
      detail::throw_invalid_argument(fn, "position ", position, " (row position_offset ",
                                     position_offset_, " + ", position, ") is beyond the table of ",
                                     table_.rows(), " rows (x has ", x.rows(),
                                     " rows from first_position ", first_position, ")");
    }
    if (x.rows() > 0) x += table_.middleRows(position_offset_ + first_position, x.rows());
  }

  /// x[t, :] += table[position_ids[t], :]. x: [n, dim]; position_ids: n entries.
  void add_to(Eigen::Ref<Matrix<Scalar>> x, std::span<const Index> position_ids) const {
    constexpr const char* fn = "posenc::LearnedAbsoluteEncoding::add_to";
    check_width(x.cols(), fn);
    detail::require(static_cast<Index>(position_ids.size()) == x.rows(), fn, "x has ", x.rows(),
                    " rows but position_ids has ", position_ids.size(), " entries");
    check_ids(position_ids, fn);
    for (Index t = 0; t < x.rows(); ++t) {
      x.row(t) += table_.row(position_ids[static_cast<std::size_t>(t)]);
    }
  }

  // Backward. add_to passes ∂L/∂x through unchanged (x + p has identity Jacobian in x); the
  // table's gradient gathers dx by position: ∂L/∂table[row] = Σ_{t reading row} dx[t, :].

  /// The table's gradient, shaped like the table.
  struct Gradient {
    Matrix<Scalar> table;
    Gradient& operator+=(const Gradient& other) {
      table += other.table;
      return *this;
    }
    void set_zero() { table.setZero(); }
  };

  Gradient zero_gradient() const { return {Matrix<Scalar>::Zero(table_.rows(), table_.cols())}; }

  /// Backward of add_to(x, first_position): gradient.table[position_offset + first_position + t]
  /// += dx[t, :]. dx: [n, dim] (∂L/∂x after the addition). Throws as add_to.
  void accumulate_gradient(ConstTileRef<Scalar> dx, Index first_position,
                           Gradient& gradient) const {
    constexpr const char* fn = "posenc::LearnedAbsoluteEncoding::accumulate_gradient";
    check_width(dx.cols(), fn);
    detail::require(
        first_position >= 0 && dx.rows() <= std::max<Index>(max_positions() - first_position, 0),
        fn, "rows ", first_position, " … ", first_position + dx.rows() - 1,
        " do not fit the table of ", max_positions(), " positions");
    if (dx.rows() > 0) {
      gradient.table.middleRows(position_offset_ + first_position, dx.rows()) += dx;
    }
  }

  /// Backward of add_to(x, position_ids): gradient.table[position_ids[t]] += dx[t, :].
  void accumulate_gradient(ConstTileRef<Scalar> dx, std::span<const Index> position_ids,
                           Gradient& gradient) const {
    constexpr const char* fn = "posenc::LearnedAbsoluteEncoding::accumulate_gradient";
    check_width(dx.cols(), fn);
    detail::require(static_cast<Index>(position_ids.size()) == dx.rows(), fn, "dx has ", dx.rows(),
                    " rows but position_ids has ", position_ids.size(), " entries");
    check_ids(position_ids, fn);
    for (Index t = 0; t < dx.rows(); ++t) {
      gradient.table.row(position_ids[static_cast<std::size_t>(t)]) += dx.row(t);
    }
  }

  /// [n, dim]: row t = table[position_ids[t], :].
  Matrix<Scalar> lookup(std::span<const Index> position_ids) const {
    constexpr const char* fn = "posenc::LearnedAbsoluteEncoding::lookup";
    check_ids(position_ids, fn);
    Matrix<Scalar> out(static_cast<Index>(position_ids.size()), dim());
    for (Index t = 0; t < out.rows(); ++t) {
      out.row(t) = table_.row(position_ids[static_cast<std::size_t>(t)]);
    }
    return out;
  }

 private:
  void check_width(Index cols, const char* fn) const {
    detail::require(cols == dim(), fn, "x has ", cols, " columns but the table has dim ", dim());
  }

  void check_ids(std::span<const Index> position_ids, const char* fn) const {
    for (std::size_t t = 0; t < position_ids.size(); ++t) {
      const Index id = position_ids[t];
      detail::require(id >= 0, fn, "position id ", id, " at index ", t, " is negative");
      detail::require(id < table_.rows(), fn, "position id ", id, " at index ", t,
                      " is beyond the table of ", table_.rows(), " rows");
    }
  }

  Matrix<Scalar> table_;
  Index position_offset_;
};

static_assert(AbsoluteEncoding<LearnedAbsoluteEncoding<float>>);
static_assert(AbsoluteEncoding<LearnedAbsoluteEncoding<double>>);

}  // namespace posenc
