// SPDX-License-Identifier: MIT
#include "posenc/encoders/t5_bias.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "encoders/bias_checks.hpp"
#include "support/golden.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

using test::iota;
using test::Json;
using test::tile_of;

T5BucketOptions options_of(const Json& config) {
  return {.num_buckets = config["num_buckets"].get<Index>(),
          .max_distance = config["max_distance"].get<Index>(),
          .bidirectional = config["bidirectional"].get<bool>()};
}

TEST(T5Buckets, MatchHuggingFaceExactly) {
  const Json golden = test::load_golden("t5_buckets.json");
  const Json& relative = golden["inputs"]["relative_positions"];
  const Json& errors = golden["outputs"]["errors"];
  int checked = 0;
  for (const Json& config : golden["inputs"]["configs"]) {
    const std::string key = config["key"].get<std::string>();
    const T5BucketOptions options = options_of(config);
    const Matrix<double> table = Matrix<double>::Zero(options.num_buckets, 1);
    if (errors.contains(key)) {  // the reference divides by zero: we refuse the configuration
      POSENC_EXPECT_INVALID(T5RelativeBias<double>(table, options), "posenc::T5RelativeBias",
                            "too small");
      continue;
    }
    const T5RelativeBias<double> t5(table, options);
    const Json& want = golden["outputs"]["buckets"][key];
    for (std::size_t n = 0; n < relative.size(); ++n) {
      EXPECT_EQ(t5.bucket(relative[n].get<Index>()), want[n].get<Index>())
          << key << ", relative position " << relative[n];
    }
    ++checked;
  }
  EXPECT_EQ(checked, 15);
}

TEST(T5Buckets, MatricesKeyMinusQuery) {
  const Json out = test::load_golden("t5_buckets.json")["outputs"]["bucket_matrix[query][key]"];
  for (const bool bidirectional : {true, false}) {
    const T5RelativeBias<double> t5(Matrix<double>::Zero(32, 1), {.bidirectional = bidirectional});
    const Json& want = out[bidirectional ? "nb32_md128_bidir" : "nb32_md128_causal"];
    for (Index i = 0; i < 6; ++i) {
      for (Index j = 0; j < 6; ++j) {
        EXPECT_EQ(t5.bucket(j - i), want[static_cast<std::size_t>(i)][static_cast<std::size_t>(j)]);
      }
    }
  }
}

TEST(T5Buckets, ExactNearAMillion) {
  // Every distance past the last boundary shares the last bucket of its direction.
  const T5RelativeBias<double> bidirectional(Matrix<double>::Zero(32, 1));
  const T5RelativeBias<double> causal(Matrix<double>::Zero(32, 1), {.bidirectional = false});
  for (Index d = 999'950; d <= 1'000'050; ++d) {
    EXPECT_EQ(bidirectional.bucket(-d), 15);
    EXPECT_EQ(bidirectional.bucket(d), 31);
    EXPECT_EQ(causal.bucket(-d), 31);
    EXPECT_EQ(causal.bucket(d), 0);
  }
  // Positions near 10^6 give the buckets of positions near 0.
  auto rng = test::make_rng(61);
  const auto t5 = T5RelativeBias<double>::random(2, 1.0, rng);
  EXPECT_EQ(tile_of(t5, 1, iota(40, 1'000'000), iota(300, 999'800)),
            tile_of(t5, 1, iota(40, 200), iota(300, 0)));
}

TEST(T5Buckets, TilesUseTheBucketsOfEveryDistance) {
  // The tabulated buckets of the tile path against bucket() for every golden configuration, and
  // for one whose exact range exceeds the table (buckets beyond it are computed directly).
  const Json golden = test::load_golden("t5_buckets.json");
  std::vector<T5BucketOptions> configs;
  for (const Json& config : golden["inputs"]["configs"]) {
    if (!golden["outputs"]["errors"].contains(config["key"].get<std::string>())) {
      configs.push_back(options_of(config));
    }
  }
  configs.push_back({.num_buckets = 20000, .max_distance = 30000, .bidirectional = true});
  auto rng = test::make_rng(65);
  for (const T5BucketOptions& options : configs) {
    const auto t5 = T5RelativeBias<double>::random(1, 1.0, rng, options);
    for (const Index first_key : {Index{-700}, Index{-6000}, Index{3000}}) {
      const auto queries = iota(40, 0);
      const auto keys = iota(1500, first_key);
      const auto tile = tile_of(t5, 0, queries, keys);
      for (Index r = 0; r < tile.rows(); ++r) {
        for (Index c = 0; c < tile.cols(); ++c) {
          ASSERT_EQ(tile(r, c), t5.table()(t5.bucket(keys[static_cast<std::size_t>(c)] - r), 0))
              << options.num_buckets << " buckets, relative position "
              << keys[static_cast<std::size_t>(c)] - r;
        }
      }
    }
  }
}

template <class T>
class T5BiasTest : public ::testing::Test {};
TYPED_TEST_SUITE(T5BiasTest, test::Scalars);

TYPED_TEST(T5BiasTest, LooksUpTheTableLikeComputeBias) {
  using T = TypeParam;
  const Json golden = test::load_golden("t5_buckets.json");
  const Json& example = golden["inputs"]["bias_example"];
  const T5RelativeBias<T> t5(test::to_matrix<T>(example["table[bucket][head]"]),
                             {.num_buckets = 8, .max_distance = 16, .bidirectional = true});
  const Heads<double> want = test::to_heads(golden["outputs"]["bias_example[head][query][key]"]);
  for (Index h = 0; h < 2; ++h) {
    const auto tile = tile_of(t5, h, iota(5, 0), iota(6, 0));
    EXPECT_EQ(tile.template cast<double>(), Matrix<double>(want.head(h))) << "head " << h;
    for (Index i = 0; i < 5; ++i) {
      for (Index j = 0; j < 6; ++j) EXPECT_EQ(t5.bias(h, i, j), tile(i, j));
    }
  }
}

TYPED_TEST(T5BiasTest, AttentionWithoutScalingIsSoftmaxOfDotPlusBias) {
  // T5 has no 1/sqrt(d): with .scale = 1 the weights are softmax(q·k + table[bucket(j − i)]).
  using T = TypeParam;
  auto rng = test::make_rng(71);
  const auto t5 = T5RelativeBias<T>::random(2, 1.0, rng, {.num_buckets = 8, .max_distance = 16});
  const Heads<T> q = test::random_heads<T>(2, 5, 4, rng);
  const Heads<T> k = test::random_heads<T>(2, 9, 4, rng);
  const Heads<T> weights =
      attention_weights(q, k, k, t5, {.mask = Mask::none(), .query_offset = 2, .scale = 1.0});
  for (Index h = 0; h < 2; ++h) {
    Matrix<double> want =
        q.head(h).template cast<double>() * k.head(h).template cast<double>().transpose();
    for (Index r = 0; r < 5; ++r) {
      for (Index c = 0; c < 9; ++c) want(r, c) += t5.table()(t5.bucket(c - (r + 2)), h);
      want.row(r) = (want.row(r).array() - want.row(r).maxCoeff()).exp().matrix();
      want.row(r) /= want.row(r).sum();
    }
    EXPECT_LE(test::relative_error(weights.head(h), want), test::Tolerance<T>::kernel);
  }
}

TYPED_TEST(T5BiasTest, StreamingMatchesReference) {
  using T = TypeParam;
  auto rng = test::make_rng(81);
  const auto bidirectional =
      T5RelativeBias<T>::random(3, 1.0, rng, {.num_buckets = 8, .max_distance = 12});
  const auto causal = T5RelativeBias<T>::random(3, 1.0, rng, {.bidirectional = false});
  test::expect_streaming_matches_reference<T>(bidirectional, 3, 8, 5, 82, true);
  test::expect_streaming_matches_reference<T>(causal, 3, 8, 5, 83, true);
  test::expect_decoding_matches_causal_pass<T>(causal, 3, 8, 5, 84);
}

TEST(T5BiasErrors, RejectDegenerateConfigurations) {
  const Matrix<float> table = Matrix<float>::Zero(2, 3);
  POSENC_EXPECT_INVALID(T5RelativeBias<float>(table, {.num_buckets = 2, .max_distance = 8}),
                        "posenc::T5RelativeBias", "num_buckets 2 is too small", "bidirectional",
                        "need at least 4");
  POSENC_EXPECT_INVALID(
      T5RelativeBias<float>(Matrix<float>::Zero(1, 3), {.num_buckets = 1, .bidirectional = false}),
      "num_buckets 1 is too small", "causal", "need at least 2");
  POSENC_EXPECT_INVALID(T5RelativeBias<float>(Matrix<float>::Zero(32, 3), {.max_distance = 8}),
                        "max_distance 8 must exceed the exact range 8");
  POSENC_EXPECT_INVALID(T5RelativeBias<float>(Matrix<float>::Zero(16, 3)),
                        "table must be [num_buckets, heads] = [32, heads >= 1], got [16, 3]");
  auto rng = test::make_rng(91);
  POSENC_EXPECT_INVALID(T5RelativeBias<float>::random(0, 1.0, rng),
                        "posenc::T5RelativeBias::random", "heads must be >= 1");
  POSENC_EXPECT_INVALID(T5RelativeBias<float>::random(2, -1.0, rng), "stddev must be finite");
}

}  // namespace
}  // namespace posenc
