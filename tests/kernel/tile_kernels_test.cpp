// SPDX-License-Identifier: MIT
// The register-blocked tile micro-kernels against plain Eigen products on every remainder of the
// register blocking (rows, key columns and value width not multiples of the blocks or packets),
// and the softmax exponential's error over the range the softmax uses.
#include "posenc/kernel/tile_kernels.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "support/test_support.hpp"

namespace posenc {
namespace {

/// A rows × cols matrix of standard normal draws.
template <class Scalar>
Matrix<Scalar> tile_normal_matrix(Index rows, Index cols, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  Matrix<Scalar> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = static_cast<Scalar>(normal(rng));
  return m;
}

template <class Scalar>
class TileKernelsTest : public ::testing::Test {};
TYPED_TEST_SUITE(TileKernelsTest, test::Scalars);

TYPED_TEST(TileKernelsTest, LogitsAndAccumulateMatchEigenOnEveryRemainder) {
  using Scalar = TypeParam;
  using Traits = kernel::TileKernelTraits<Scalar>;
  const Index W = Traits::width;
  auto rng = test::make_rng(41);
  const auto random = [&](Index r, Index c) { return tile_normal_matrix<Scalar>(r, c, rng); };
  // Every row count up to two register blocks, column counts around packet multiples.
  for (Index rows = 1; rows <= 2 * Traits::logits_rows + 1; ++rows) {
    for (const Index cols : {Index{1}, W - 1, W, W + 1, 2 * W + 3, 5 * W}) {
      for (const Index depth : {Index{1}, Index{7}, Index{64}}) {
        if (cols < 1) continue;
        const Matrix<Scalar> q = random(rows, depth);
        const Matrix<Scalar> k = random(cols, depth);
        const Index ldk = kernel::padded_width<Scalar>(cols);
        Matrix<Scalar> k_t(depth, ldk);
        kernel::pack_transposed(k.data(), depth, cols, depth, k_t.data(), ldk);
        // Narrow output stride (partial stores) and padded stride (full stores).
        for (const Index ld : {cols, ldk}) {
          Matrix<Scalar> logits = Matrix<Scalar>::Constant(rows, ld, Scalar(99));
          kernel::tile_logits(q.data(), depth, rows, depth, k_t.data(), ldk, cols, logits.data(),
                              ld);
          const Matrix<Scalar> expected = q * k.transpose();
          ASSERT_LE(test::relative_error(logits.leftCols(cols), expected),
                    50 * std::numeric_limits<Scalar>::epsilon() * static_cast<double>(depth))
              << "rows " << rows << " cols " << cols << " depth " << depth << " ld " << ld;
        }
      }
    }
  }
  for (Index rows = 1; rows <= 2 * Traits::output_rows + 1; ++rows) {
    for (const Index cols : {Index{1}, Index{5}, W + 3}) {
      for (const Index dim : {Index{1}, W - 1, W, 3 * W + 1, 4 * W, 5 * W + 2}) {
        if (dim < 1) continue;
        const Matrix<Scalar> p = random(rows, cols);
        const Matrix<Scalar> v = random(cols, dim);
        const Index ldv = kernel::padded_width<Scalar>(dim);
        Matrix<Scalar> v_p(cols, ldv);
        kernel::pack_rows(v.data(), dim, cols, dim, v_p.data(), ldv);
        Matrix<Scalar> out = random(rows, ldv);
        const Matrix<Scalar> expected = out.leftCols(dim) + p * v;
        kernel::tile_accumulate(p.data(), cols, rows, cols, v_p.data(), ldv, ldv, out.data(), ldv);
        ASSERT_LE(test::relative_error(out.leftCols(dim), expected),
                  50 * std::numeric_limits<Scalar>::epsilon() * static_cast<double>(cols))
            << "rows " << rows << " cols " << cols << " dim " << dim;
      }
    }
  }
}

TYPED_TEST(TileKernelsTest, ColumnLimitsSkipOnlyBlocksOutsideEveryRowsRange) {
  // Per-row column ranges of a causal diagonal tile, a sliding window and empty rows: inside its
  // range every logit is computed; P·V with zero weights outside the ranges equals the full
  // product. Odd sizes hit every remainder of the register blocks.
  using Scalar = TypeParam;
  using Traits = kernel::TileKernelTraits<Scalar>;
  const Index W = Traits::width;
  auto rng = test::make_rng(43);
  std::normal_distribution<double> normal;
  const auto random = [&](Index r, Index c) { return tile_normal_matrix<Scalar>(r, c, rng); };
  for (const Index rows : {Index{1}, Index{7}, Index{3 * Traits::logits_rows + 1}}) {
    for (const Index cols : {Index{1}, 2 * W + 3, 6 * W}) {
      for (int pattern = 0; pattern < 3; ++pattern) {
        std::vector<Index> begin(static_cast<std::size_t>(rows));
        std::vector<Index> end(static_cast<std::size_t>(rows));
        for (Index r = 0; r < rows; ++r) {
          const auto i = static_cast<std::size_t>(r);
          const Index diagonal = r * cols / rows;  // causal: keys up to the diagonal
          begin[i] = pattern == 1 ? std::max<Index>(0, diagonal - W) : 0;
          end[i] = std::min(cols, diagonal + 1);
          if (pattern == 2 && r % 3 == 1) begin[i] = end[i] = 0;  // no allowed key
        }
        const kernel::ColumnLimits limits{begin.data(), end.data()};
        const Index depth = 9;
        const Matrix<Scalar> q = random(rows, depth);
        const Matrix<Scalar> k = random(cols, depth);
        const Index ldk = kernel::padded_width<Scalar>(cols);
        Matrix<Scalar> k_t(depth, ldk);
        kernel::pack_transposed(k.data(), depth, cols, depth, k_t.data(), ldk);
        Matrix<Scalar> logits = Matrix<Scalar>::Zero(rows, ldk);
        kernel::tile_logits(q.data(), depth, rows, depth, k_t.data(), ldk, cols, logits.data(), ldk,
                            limits);
        const Matrix<Scalar> expected = q * k.transpose();
        Matrix<Scalar> weights = Matrix<Scalar>::Zero(rows, cols);
        for (Index r = 0; r < rows; ++r) {
          const auto i = static_cast<std::size_t>(r);
          for (Index c = begin[i]; c < end[i]; ++c) {
            ASSERT_NEAR(logits(r, c), expected(r, c), 1e-4) << "row " << r << " col " << c;
            weights(r, c) = static_cast<Scalar>(normal(rng));
          }
        }
        const Index dim = 2 * W + 1;
        const Index ldv = kernel::padded_width<Scalar>(dim);
        const Matrix<Scalar> v = random(cols, ldv);
        Matrix<Scalar> out = Matrix<Scalar>::Zero(rows, ldv);
        kernel::tile_accumulate(weights.data(), cols, rows, cols, v.data(), ldv, ldv, out.data(),
                                ldv, limits);
        EXPECT_LE(test::relative_error(out, weights * v),
                  50 * std::numeric_limits<Scalar>::epsilon() * static_cast<double>(cols))
            << "rows " << rows << " cols " << cols << " pattern " << pattern;
      }
    }
  }
}

TYPED_TEST(TileKernelsTest, SoftmaxExponentialIsAccurateAndExactlyZeroBelowRange) {
  using Scalar = TypeParam;
  constexpr Index n = 20011;
  const Scalar lowest = std::log(std::numeric_limits<Scalar>::min());
  // x from slightly below the normal range up to 0, plus the exact values that matter.
  Vector<Scalar> x(n + 4);
  for (Index i = 0; i < n; ++i) {
    x[i] = (lowest - Scalar(2)) * static_cast<Scalar>(i) / static_cast<Scalar>(n - 1);
  }
  x[n] = Scalar(0);
  x[n + 1] = -std::numeric_limits<Scalar>::infinity();
  x[n + 2] = -std::numeric_limits<Scalar>::max();
  x[n + 3] = Scalar(-1e-30);
  Vector<Scalar> y = x;
  const Scalar sum = kernel::exp_shifted_row(y.data(), y.size(), Scalar(0));
  long double expected_sum = 0;
  double worst_ulps = 0;
  for (Index i = 0; i < y.size(); ++i) {
    ASSERT_TRUE(std::isfinite(y[i]));
    if (x[i] < lowest) {
      EXPECT_EQ(y[i], Scalar(0)) << "x = " << x[i];
      continue;
    }
    const long double exact = std::exp(static_cast<long double>(x[i]));
    expected_sum += exact;
    const double ulp = static_cast<double>(exact) * std::numeric_limits<Scalar>::epsilon();
    worst_ulps = std::max(worst_ulps, std::abs(static_cast<double>(y[i] - exact)) / ulp);
  }
  EXPECT_EQ(y[n], Scalar(1));
  // Eigen's vectorised exp: within a few ulp over [log(min normal), 0].
  EXPECT_LE(worst_ulps, 4.0);
  EXPECT_NEAR(static_cast<double>(sum), static_cast<double>(expected_sum),
              1e-5 * static_cast<double>(expected_sum));
}

}  // namespace
}  // namespace posenc
