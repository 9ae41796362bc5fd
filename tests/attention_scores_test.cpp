// SPDX-License-Identifier: MIT
// attention_scores: its softmax is attention_weights (same stages, masks and positions), masked
// entries are −inf.
#include "posenc/attention.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "support/test_support.hpp"

namespace posenc {
namespace {

/// A test-local ScoreBias: b_h(i, j) = −slope_h·|i − j|.
template <class T>
struct SymmetricSlopeBias {
  using Scalar = T;
  std::vector<double> slopes;
  Index heads() const { return static_cast<Index>(slopes.size()); }
  T bias(Index h, Index i, Index j) const {
    return static_cast<T>(-slopes[static_cast<std::size_t>(h)] *
                          std::fabs(static_cast<double>(i - j)));
  }
  void add_bias(Index h, Positions qpos, Positions kpos, TileRef<T> tile) const {
    for (Index r = 0; r < tile.rows(); ++r) {
      for (Index c = 0; c < tile.cols(); ++c) tile(r, c) += bias(h, qpos[r], kpos[c]);
    }
  }
};

template <class Scalar>
Heads<Scalar> softmax_rows(const Heads<Scalar>& scores) {
  Heads<Scalar> p(scores.heads(), scores.rows(), scores.dim());
  for (Index h = 0; h < scores.heads(); ++h) {
    for (Index r = 0; r < scores.rows(); ++r) {
      const auto row = scores.head(h).row(r);
      const Scalar max = row.maxCoeff();
      if (max == -std::numeric_limits<Scalar>::infinity()) continue;
      for (Index c = 0; c < scores.dim(); ++c) {
        p(h, r, c) =
            row[c] == -std::numeric_limits<Scalar>::infinity() ? Scalar(0) : std::exp(row[c] - max);
      }
      p.head(h).row(r) /= p.head(h).row(r).sum();
    }
  }
  return p;
}

template <class Scalar>
class AttentionScoresTest : public ::testing::Test {};
TYPED_TEST_SUITE(AttentionScoresTest, test::Scalars);

TYPED_TEST(AttentionScoresTest, SoftmaxIsAttentionWeights) {
  using T = TypeParam;
  auto rng = test::make_rng(5);
  const Index H = 4, N = 7, M = 23, D = 8;
  const Heads<T> q = test::random_heads<T>(H, N, D, rng);
  const Heads<T> k = test::random_heads<T>(2, M, D, rng);  // grouped-query: 2 kv heads
  const Heads<T> v = test::random_heads<T>(2, M, 3, rng);
  const SymmetricSlopeBias<T> bias{{0.5, 0.25, 0.125, 0.0}};
  const std::vector<Index> qpos{30, 3, 9, 9, 15, 22, 0};
  for (const AttentionOptions& options :
       {AttentionOptions{}, AttentionOptions{.query_offset = M - N},
        AttentionOptions{.mask = Mask::sliding_window(5), .query_offset = 10},
        AttentionOptions{.mask = Mask::none(), .query_positions = qpos, .scale = 0.3}}) {
    const Heads<T> nope = attention_scores(q, k, NoPositionalEncoding{}, options);
    const Heads<T> biased = attention_scores(q, k, bias, options);
    ASSERT_EQ(biased.rows(), N);
    ASSERT_EQ(biased.dim(), M);
    EXPECT_LE(
        test::relative_error(softmax_rows(nope).flat(), attention_weights(q, k, v, options).flat()),
        test::Tolerance<T>::kernel);
    EXPECT_LE(test::relative_error(softmax_rows(biased).flat(),
                                   attention_weights(q, k, v, bias, options).flat()),
              test::Tolerance<T>::kernel);
    // Masked entries are exactly −inf, allowed ones finite; the bias is added.
    std::vector<Index> positions(N);
    for (Index r = 0; r < N; ++r) {
      positions[r] = options.query_positions.empty() ? options.query_offset + r : qpos[r];
    }
    for (Index h = 0; h < H; ++h) {
      for (Index r = 0; r < N; ++r) {
        for (Index c = 0; c < M; ++c) {
          if (!options.mask.value_or(Mask::causal()).allows(positions[r], c)) {
            EXPECT_EQ(biased(h, r, c), -std::numeric_limits<T>::infinity());
          } else {
            EXPECT_NEAR(biased(h, r, c) - nope(h, r, c), bias.bias(h, positions[r], c),
                        100 * std::numeric_limits<T>::epsilon() * (1 + std::fabs(biased(h, r, c))));
          }
        }
      }
    }
  }
}

TEST(AttentionScores, ChecksItsArguments) {
  const Heads<double> q(2, 3, 4), k(2, 5, 8);
  POSENC_EXPECT_INVALID(attention_scores(q, k), "posenc::attention_scores", "q has dim 4",
                        "k has dim 8");
}

}  // namespace
}  // namespace posenc
