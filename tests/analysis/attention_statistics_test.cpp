// SPDX-License-Identifier: MIT
// Entropy, mean attention distance and mass beyond a training length on hand-made distributions
// and on the weights of the kernel.
#include "posenc/analysis/attention_statistics.hpp"
#include "posenc/attention.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "support/test_support.hpp"

namespace posenc {
namespace {

TEST(AttentionStatistics, HandMadeRows) {
  // Uniform over the causal keys 0 … i of query i = 9: entropy ln 10, mean distance 4.5, and
  // keys at distance ≥ 4 (positions 0 … 5) hold 6/10.
  const Vector<double> uniform = Vector<double>::Constant(10, 0.1);
  RowAttentionStatistics row = attention_row_statistics(uniform, 9, 4);
  EXPECT_NEAR(row.entropy, std::log(10.0), 1e-15);
  EXPECT_NEAR(row.mean_distance, 4.5, 1e-14);
  EXPECT_NEAR(row.mass_beyond, 0.6, 1e-15);
  EXPECT_FALSE(row.empty);
  // Unnormalised weights are normalised first.
  const RowAttentionStatistics scaled =
      attention_row_statistics(Vector<double>(7.0 * uniform), 9, 4);
  EXPECT_NEAR(scaled.entropy, row.entropy, 1e-15);
  EXPECT_NEAR(scaled.mean_distance, row.mean_distance, 1e-14);
  // One-hot: entropy exactly 0 (0·ln 0 = 0).
  Vector<double> one_hot = Vector<double>::Zero(10);
  one_hot[2] = 1.0;
  row = attention_row_statistics(one_hot, 9, 7);
  EXPECT_EQ(row.entropy, 0.0);
  EXPECT_EQ(row.mean_distance, 7.0);
  EXPECT_EQ(row.mass_beyond, 1.0);  // distance 7 ≥ 7
  EXPECT_EQ(attention_row_statistics(one_hot, 9, 8).mass_beyond, 0.0);
  // Two keys, explicit positions on both sides of the query: distances |i − j|.
  Vector<double> two(2);
  two << 0.25, 0.75;
  row = attention_row_statistics(two, 10, 3, std::vector<Index>{14, 8});
  EXPECT_NEAR(row.entropy, -(0.25 * std::log(0.25) + 0.75 * std::log(0.75)), 1e-15);
  EXPECT_NEAR(row.mean_distance, 0.25 * 4 + 0.75 * 2, 1e-15);
  EXPECT_NEAR(row.mass_beyond, 0.25, 1e-15);
  // A row with no weight.
  row = attention_row_statistics(Vector<double>::Zero(3), 2, 1);
  EXPECT_TRUE(row.empty);
  EXPECT_EQ(row.entropy, 0.0);
}

TEST(AttentionStatistics, PerHeadMeansSkipEmptyRows) {
  // Head 0: row 0 one-hot at distance 0, row 1 uniform over 2 keys; head 1: nothing allowed.
  Heads<double> weights(2, 2, 2);
  weights(0, 0, 0) = 1.0;
  weights(0, 1, 0) = 0.5;
  weights(0, 1, 1) = 0.5;
  const AttentionStatistics stats = attention_statistics(weights, 1, {});
  EXPECT_EQ(stats.training_length, 1);
  EXPECT_EQ(stats.rows[0], 2);
  EXPECT_NEAR(stats.entropy[0], 0.5 * std::log(2.0), 1e-15);
  EXPECT_NEAR(stats.mean_distance[0], 0.25, 1e-15);
  EXPECT_NEAR(stats.mass_beyond[0], 0.25, 1e-15);
  EXPECT_EQ(stats.rows[1], 0);
  EXPECT_TRUE(std::isnan(stats.entropy[1]));
  // Query offset moves the queries: with offset 5 every weight is 5 or 4 tokens away.
  const AttentionStatistics shifted = attention_statistics(weights, 5, {.query_offset = 5});
  EXPECT_NEAR(shifted.mean_distance[0], 0.5 * 5 + 0.5 * 5.5, 1e-14);
  EXPECT_NEAR(shifted.mass_beyond[0], 0.5 * 1 + 0.5 * 1, 1e-15);
}

TEST(AttentionStatistics, UniformCausalWeightsFromTheKernel) {
  // Zero queries: every allowed key gets the same weight; query i sees i + 1 keys.
  const Index H = 2, N = 8, M = 40, D = 4;
  Heads<float> q(H, N, D), k(H, M, D), v(H, M, D);
  k.flat().setRandom();
  const AttentionOptions options{.query_offset = M - N};
  const AttentionMap<float> weights = attention_weights(q, k, v, options);
  const AttentionStatistics stats = attention_statistics(weights, 16);  // at the map's positions
  double entropy = 0.0, distance = 0.0, beyond = 0.0;
  for (Index r = 0; r < N; ++r) {
    const double keys = static_cast<double>(M - N + r + 1);
    entropy += std::log(keys) / N;
    distance += (keys - 1.0) / 2.0 / N;
    beyond += (keys - 16.0) / keys / N;
  }
  for (Index h = 0; h < H; ++h) {
    EXPECT_NEAR(stats.entropy[h], entropy, 1e-5);  // float weights
    EXPECT_NEAR(stats.mean_distance[h], distance, 1e-4);
    EXPECT_NEAR(stats.mass_beyond[h], beyond, 1e-6);
  }
}

TEST(AttentionStatistics, RejectsBadInput) {
  Vector<double> w(3);
  w << 0.5, -0.1, 0.6;
  POSENC_EXPECT_INVALID(attention_row_statistics(w, 2, 1), "posenc::attention_row_statistics",
                        "non-negative", "column 1");
  w[1] = std::numeric_limits<double>::infinity();
  POSENC_EXPECT_INVALID(attention_row_statistics(w, 2, 1), "finite");
  POSENC_EXPECT_INVALID(attention_row_statistics(Vector<double>::Zero(3), 2, -1),
                        "training_length must be >= 0");
  const Heads<double> weights(1, 2, 3);
  const std::vector<Index> keys{0, 1};
  POSENC_EXPECT_INVALID(attention_statistics(weights, 4, {.key_positions = keys}),
                        "posenc::attention_statistics", "key_positions has 2", "3 key columns");
}

// attention_statistics reports bad weights under its own name, with the head, row and column (it
// used to say attention_row_statistics).
TEST(AttentionStatistics, MessagesNameAttentionStatisticsAndTheEntry) {
  Heads<double> weights(2, 3, 4);
  weights.flat().setConstant(0.25);
  weights(1, 2, 3) = -0.5;
  POSENC_EXPECT_INVALID(attention_statistics(weights, 2, {}),
                        "posenc::attention_statistics: weights must be finite and non-negative",
                        "got -0.5", "head 1, row 2, column 3");
  weights(1, 2, 3) = std::numeric_limits<double>::quiet_NaN();
  POSENC_EXPECT_INVALID(attention_statistics(weights, 2, {}),
                        "posenc::attention_statistics:", "nan", "head 1, row 2, column 3");
  weights(1, 2, 3) = 0.25;
  POSENC_EXPECT_INVALID(attention_statistics(weights, -1, {}),
                        "posenc::attention_statistics: training_length must be >= 0, got -1");
  // Checked even when there is no row to look at.
  POSENC_EXPECT_INVALID(attention_statistics(Heads<double>(1, 0, 3), -2, {}),
                        "posenc::attention_statistics: training_length must be >= 0, got -2");
}

}  // namespace
}  // namespace posenc
