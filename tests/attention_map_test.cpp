// SPDX-License-Identifier: MIT
// AttentionMap: attention_weights and attention_scores carry the positions and mask of their
// call, and the analysis functions measure with them, so an analysis cannot disagree with the
// pass that made the map (issue 14, point 13: a forgotten query_offset used to give an ERF of 190
// instead of 108, silently).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "posenc/posenc.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

// Weights or scores without positions need the options that place them; a map does not.
template <class W>
concept ErfWithoutOptions = requires(const W& w) {
  empirical_receptive_field(w, 0.1);
};
template <class W>
concept StatisticsWithoutOptions = requires(const W& w) {
  attention_statistics(w, 4);
};
template <class W>
concept ResolutionWithoutOptions = requires(const W& w) {
  empirical_attention_resolution(w);
};
static_assert(ErfWithoutOptions<AttentionMap<double>> && !ErfWithoutOptions<Heads<double>> &&
              !ErfWithoutOptions<HeadsView<const double>>);
static_assert(StatisticsWithoutOptions<AttentionMap<float>> &&
              !StatisticsWithoutOptions<Heads<float>>);
static_assert(ResolutionWithoutOptions<AttentionMap<double>> &&
              !ResolutionWithoutOptions<Heads<double>>);
static_assert(HeadsLike<AttentionMap<float>>);

TEST(AttentionMap, CarriesThePositionsAndMaskOfTheCall) {
  const Index H = 2, N = 3, M = 7, D = 4;
  auto rng = test::make_rng(1401);
  const auto q = test::random_heads<double>(H, N, D, rng);
  const auto k = test::random_heads<double>(H, M, D, rng);
  const auto v = test::random_heads<double>(H, M, D, rng);
  const AttentionMap<double> w = attention_weights(q, k, v, Alibi<double>(H), {.query_offset = 4});
  EXPECT_EQ(w.query_positions(), (std::vector<Index>{4, 5, 6}));
  EXPECT_EQ(w.key_positions(), (std::vector<Index>{0, 1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(w.mask().kind(), Mask::Kind::causal);
  EXPECT_EQ(w.heads(), H);
  EXPECT_EQ(w.rows(), N);
  EXPECT_EQ(w.dim(), M);

  const std::vector<Index> queries{10, 3, 8};
  const std::vector<Index> keys{9, 0, 2, 8, 4, 5, 6};
  const auto t5 = T5RelativeBias<double>::random(H, 1.0, rng);  // bidirectional by default
  const AttentionMap<double> s =
      attention_scores(q, k, t5, {.query_positions = queries, .key_positions = keys});
  EXPECT_EQ(s.query_positions(), queries);
  EXPECT_EQ(s.key_positions(), keys);
  EXPECT_EQ(s.mask().kind(), Mask::Kind::none);  // a bidirectional T5's natural mask
  // The values are what a Heads would hold: row softmax of the scores is the weights.
  const AttentionMap<double> p =
      attention_weights(q, k, v, t5, {.query_positions = queries, .key_positions = keys});
  for (Index h = 0; h < H; ++h) {
    for (Index r = 0; r < N; ++r) {
      const auto row = s.head(h).row(r);
      const Eigen::RowVectorXd e = (row.array() - row.maxCoeff()).exp();
      EXPECT_LT((e / e.sum() - p.head(h).row(r)).cwiseAbs().maxCoeff(), 1e-15);
    }
  }
}

// The analysis of a map equals the analysis of its values with the call's options, and
// differs from an analysis that forgets the offset: the map makes forgetting impossible.
TEST(AttentionMap, AnalysisUsesThePositionsOfThePass) {
  const Index H = 2, N = 16, M = 400, D = 8;
  auto rng = test::make_rng(1402);
  const auto q = test::random_heads<double>(H, N, D, rng);
  const auto k = test::random_heads<double>(H, M, D, rng);
  const auto v = test::random_heads<double>(H, M, D, rng);
  const AttentionOptions options{.query_offset = M - N};
  const Alibi<double> alibi(H);
  const AttentionMap<double> w = attention_weights(q, k, v, alibi, options);
  const Heads<double>& values = w;  // the same numbers, no positions
  const EmpiricalReceptiveField from_map = empirical_receptive_field(w, 0.05);
  const EmpiricalReceptiveField with_options = empirical_receptive_field(values, 0.05, options);
  const EmpiricalReceptiveField forgotten = empirical_receptive_field(values, 0.05, {});
  EXPECT_EQ(from_map.per_query, with_options.per_query);
  EXPECT_NE(from_map.per_query, forgotten.per_query);
  for (Index h = 0; h < H; ++h) {
    EXPECT_GT(forgotten.mean[h], from_map.mean[h]) << "head " << h;
  }

  const AttentionStatistics stats = attention_statistics(w, 64);
  const AttentionStatistics stats_options = attention_statistics(values, 64, options);
  EXPECT_EQ(stats.mean_distance, stats_options.mean_distance);
  EXPECT_EQ(stats.entropy, stats_options.entropy);
  EXPECT_EQ(stats.mass_beyond, stats_options.mass_beyond);

  const AttentionMap<double> scores = attention_scores(q, k, alibi, options);
  const Vector<double> resolution = empirical_attention_resolution(scores);
  const Heads<double>& score_values = scores;
  EXPECT_EQ(resolution, empirical_attention_resolution(score_values, options));
  // ALiBi's scores decrease with distance: each head resolves positions.
  for (Index h = 0; h < H; ++h) EXPECT_TRUE(std::isfinite(resolution[h])) << "head " << h;
}

TEST(AttentionMap, OptionsThatDisagreeWithTheMapThrow) {
  const Index H = 1, N = 2, M = 5, D = 2;
  Heads<float> q(H, N, D), k(H, M, D), v(H, M, D);
  const AttentionMap<float> w = attention_weights(q, k, v, {.query_offset = 3});
  // The same positions given again are accepted.
  EXPECT_EQ(empirical_receptive_field(w, 0.1, {.query_offset = 3}).per_query,
            empirical_receptive_field(w, 0.1).per_query);
  POSENC_EXPECT_INVALID(empirical_receptive_field(w, 0.1, {}), "posenc::empirical_receptive_field",
                        "the options place query row 0 at 0",
                        "the attention map was computed at 3");
  const std::vector<Index> keys{0, 1, 2, 3, 9};
  POSENC_EXPECT_INVALID(attention_statistics(w, 4, {.query_offset = 3, .key_positions = keys}),
                        "posenc::attention_statistics", "key column 4 at 9", "computed at 4");
  const AttentionMap<float> s = attention_scores(q, k, NoPositionalEncoding{}, {.query_offset = 3});
  POSENC_EXPECT_INVALID(empirical_attention_resolution(s, {.query_offset = 2}),
                        "posenc::empirical_attention_resolution", "query row 0 at 2");
  // Sizes are still checked first.
  POSENC_EXPECT_INVALID(empirical_receptive_field(w, 0.1, {.key_positions = {keys.data(), 2}}),
                        "key_positions has 2 entries but there are 5 key columns");
}

// Point 4 for the analysis functions: positions outside (−2^62, 2^62) are rejected, never
// overflowed into a distance (runs under UBSan in the asan preset).
TEST(AttentionMap, AnalysisPositionsOutsideTheRangeAreRejected) {
  const Index big = position_limit;
  Vector<double> row = Vector<double>::Constant(3, 1.0);
  const std::vector<Index> far_keys{-big + 1, 0, big - 1};
  POSENC_EXPECT_INVALID(
      empirical_receptive_field(row, big, 0.1), "posenc::empirical_receptive_field",
      "query_position is 4611686018427387904", "outside the supported position range");
  POSENC_EXPECT_INVALID(empirical_receptive_field(row, 0, 0.1, std::vector<Index>{0, 1, -big}),
                        "key_positions[2]");
  EXPECT_EQ(empirical_receptive_field(row, 0, 0.5, far_keys), big);  // the edges are fine
  POSENC_EXPECT_INVALID(attention_row_statistics(row, -big, 4), "posenc::attention_row_statistics",
                        "query_position");
  const RowAttentionStatistics edge = attention_row_statistics(row, 0, 4, far_keys);
  EXPECT_NEAR(edge.mean_distance, 2.0 * static_cast<double>(big - 1) / 3.0, 1e3);

  Heads<double> weights(1, 2, 3);
  weights.flat().setConstant(1.0);
  POSENC_EXPECT_INVALID(empirical_receptive_field(weights, 0.1, {.query_offset = big - 1}),
                        "posenc::empirical_receptive_field", "query_offset",
                        "places 2 rows beyond the supported position range");
  POSENC_EXPECT_INVALID(attention_statistics(weights, 1, {.query_offset = -big}),
                        "posenc::attention_statistics", "query_offset");
  Matrix<double> scores = Matrix<double>::Zero(2, 3);
  POSENC_EXPECT_INVALID(empirical_score_curve(scores, big - 1), "posenc::empirical_score_curve",
                        "query_offset");
  POSENC_EXPECT_INVALID(
      empirical_score_curve(scores, std::vector<Index>{0, big}, std::vector<Index>{0, 1, 2}),
      "query_positions[1]");
  POSENC_EXPECT_INVALID(
      theoretical_receptive_field(Alibi<double>(1), 0, 0.1, std::numeric_limits<Index>::max()),
      "posenc::theoretical_receptive_field", "[2^34, 2^62)");
}

}  // namespace
}  // namespace posenc
