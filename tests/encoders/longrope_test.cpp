// SPDX-License-Identifier: MIT
// LongRoPE (RopeScaling::longrope): HF's inverse frequencies, attention factor and rotated rows
// (tests/data/longrope.json, from HF's formula by generators/longrope_golden.py), the switch to
// the long factors at sequence length > original_max_position_embeddings, and bad parameters.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "posenc/encoders/rope.hpp"
#include "support/golden.hpp"
#include "support/test_support.hpp"

namespace posenc::test::longrope_test {

struct Case {
  Json golden;
  Index head_dim = 0;
  Index rotary_dim = 0;
  Index l0 = 0;
  RotaryOptions options;
};

inline std::vector<Case> cases() {
  const Json golden = load_golden("longrope.json");
  std::vector<Case> out;
  for (const Json& c : golden.at("cases")) {
    const Json& config = c.at("config");
    const Json& rope =
        config.contains("rope_scaling") ? config.at("rope_scaling") : config.at("rope_parameters");
    LongRopeOptions options{rope.at("short_factor").get<std::vector<double>>(),
                            rope.at("long_factor").get<std::vector<double>>()};
    if (rope.contains("attention_factor")) {
      options.attention_factor = rope.at("attention_factor").get<double>();
    }
    const double base = rope.contains("rope_theta") ? rope.at("rope_theta").get<double>()
                                                    : config.at("rope_theta").get<double>();
    Case item{c,
              c.at("head_dim").get<Index>(),
              c.at("rotary_dim").get<Index>(),
              c.at("original_max_position_embeddings").get<Index>(),
              {}};
    // Built for sequence length L0: the short factors (HF: seq_len <= L0).
    item.options = {.base = base,
                    .rotary_dim = item.rotary_dim,
                    .pairing = RotaryPairing::half,
                    .scaling = RopeScaling::longrope(c.at("factor").get<double>(), item.l0, item.l0,
                                                     std::move(options))};
    out.push_back(std::move(item));
  }
  return out;
}

/// max_k |got_k − want_k| / |want_k|.
inline double max_relative_error(std::span<const double> got, const std::vector<double>& want) {
  EXPECT_EQ(got.size(), want.size());
  double worst = 0.0;
  for (std::size_t k = 0; k < want.size() && k < got.size(); ++k) {
    worst = std::max(worst, std::abs(got[k] - want[k]) / std::abs(want[k]));
  }
  return worst;
}

template <class Scalar>
Matrix<Scalar> rotate(const RotaryEncoding<Scalar>& rope, const std::vector<Index>& positions,
                      const Matrix<Scalar>& x) {
  Matrix<Scalar> y(x.rows(), x.cols());
  rope.transform_queries(0, positions, 0, x, y);
  return y;
}

/// Checks rows against the golden: |got − want| <= tolerance(p) · attention · max|x| per row.
template <class Scalar>
void expect_rows(const RotaryEncoding<Scalar>& rope, const Json& x_rows, const Json& want_rows,
                 const std::vector<Index>& positions, double attention, double (*tolerance)(Index),
                 const std::string& what) {
  const Matrix<double> x = to_matrix(x_rows);
  const Matrix<double> want = to_matrix(want_rows);
  const Matrix<Scalar> got = rotate(rope, positions, Matrix<Scalar>(x.template cast<Scalar>()));
  ASSERT_TRUE(got.allFinite()) << what;
  for (Index r = 0; r < got.rows(); ++r) {
    const double error = (got.row(r).template cast<double>() - want.row(r)).cwiseAbs().maxCoeff();
    const double bound = tolerance(positions[static_cast<std::size_t>(r)]) * attention *
                         (1.0 + x.row(r).cwiseAbs().maxCoeff());
    EXPECT_LE(error, bound) << what << " row " << r << " position "
                            << positions[static_cast<std::size_t>(r)];
  }
}

// Double: the golden angle p·θ is rounded once in double, ours is formed from a θ that differs
// by an ulp or two (θ/f against 1/(f·base^e)) and reduced exactly: 4 ulps of p·θ <= p, plus
// 1e-12 for the products.
inline double double_tolerance(Index p) { return 1e-12 + 4.0 * std::ldexp(double(p), -52); }
// Float: cos and sin cast to float (2^-24 each), the rotation's two products and sum in float
// (3 roundings) and the input cast (2^-24 per entry): 8·2^-24 of the row's scale covers it.
inline double float_tolerance(Index p) { return 8.0 * std::ldexp(1.0, -24) + double_tolerance(p); }

TEST(LongRopeGolden, FrequenciesAndAttentionFactorMatchHfFormula) {
  for (const Case& c : cases()) {
    const std::string name = c.golden.at("name").get<std::string>();
    const RotaryEncoding<double> short_rope(c.head_dim, c.options);
    EXPECT_FALSE(short_rope.scaling().uses_long_factors()) << name;
    EXPECT_LE(max_relative_error(short_rope.frequencies(),
                                 c.golden.at("inv_freq_short").get<std::vector<double>>()),
              1e-12)
        << name;
    EXPECT_NEAR(short_rope.magnitude(), c.golden.at("attention_factor").get<double>(), 1e-12)
        << name;

    const RotaryEncoding<double> long_rope = short_rope.for_sequence_length(c.l0 + 1);
    EXPECT_TRUE(long_rope.scaling().uses_long_factors()) << name;
    EXPECT_LE(max_relative_error(long_rope.frequencies(),
                                 c.golden.at("inv_freq_long").get<std::vector<double>>()),
              1e-12)
        << name;
    EXPECT_NEAR(long_rope.magnitude(), c.golden.at("attention_factor").get<double>(), 1e-12)
        << name;
    EXPECT_EQ(long_rope.rotary_dim(), c.rotary_dim) << name;
  }
}

template <class Scalar>
void check_rows(double (*tolerance)(Index)) {
  for (const Case& c : cases()) {
    const std::string name = c.golden.at("name").get<std::string>();
    const auto positions = c.golden.at("positions").get<std::vector<Index>>();
    const double attention = c.golden.at("attention_factor").get<double>();
    std::vector<Index> below;
    Json x_below = Json::array();
    for (std::size_t r = 0; r < positions.size(); ++r) {
      if (positions[r] < c.l0) {
        below.push_back(positions[r]);
        x_below.push_back(c.golden.at("x").at(r));
      }
    }
    const RotaryEncoding<Scalar> short_rope(c.head_dim, c.options);
    expect_rows(short_rope, x_below, c.golden.at("rotated_short"), below, attention, tolerance,
                name + " short");
    // A call reaching past L0 switches every row to the long factors, rows below L0 included.
    const Index longest = *std::max_element(positions.begin(), positions.end()) + 1;
    expect_rows(short_rope.for_sequence_length(longest), c.golden.at("x"),
                c.golden.at("rotated_long"), positions, attention, tolerance, name + " long");
  }
}

TEST(LongRopeGolden, DoubleRowsMatchHfRotateHalf) { check_rows<double>(double_tolerance); }
TEST(LongRopeGolden, FloatRowsMatchHfRotateHalf) { check_rows<float>(float_tolerance); }

TEST(LongRopeSwitch, LongFactorsExactlyWhenSequenceLengthExceedsOriginalContext) {
  const Case c = cases().front();  // Phi-3-128k, L0 = 4096
  const RotaryEncoding<double> rope(c.head_dim, c.options);
  for (const Index length : {Index{0}, Index{1}, Index{4095}, Index{4096}}) {
    EXPECT_FALSE(rope.for_sequence_length(length).scaling().uses_long_factors()) << length;
    EXPECT_EQ(rope.for_sequence_length(length).frequencies()[40], rope.frequencies()[40]);
  }
  for (const Index length : {Index{4097}, Index{131072}, Index{1} << 30}) {
    const auto long_rope = rope.for_sequence_length(length);
    EXPECT_TRUE(long_rope.scaling().uses_long_factors()) << length;
    // θ_k / θ_k' = long_k / short_k.
    const auto& o = c.options.scaling.longrope_options;
    EXPECT_NEAR(rope.frequencies()[40] / long_rope.frequencies()[40],
                o.long_factor[40] / o.short_factor[40], 1e-13);
  }
}

TEST(LongRopeSwitch, OneEncoderKeepsLogitsRelativeAcrossTheCache) {
  // Built once for the cache's capacity, the encoder rotates old keys and new queries alike, so
  // q'_i·k'_j depends on i − j only (HF's per-call switch breaks this for cached keys).
  const Case c = cases().front();
  const RotaryEncoding<double> rope =
      RotaryEncoding<double>(c.head_dim, c.options).for_sequence_length(8192);
  auto rng = make_rng(1601);
  std::normal_distribution<double> normal;
  Matrix<double> q(1, c.head_dim), k(1, c.head_dim);
  for (Index j = 0; j < c.head_dim; ++j) {
    q(0, j) = normal(rng);
    k(0, j) = normal(rng);
  }
  auto logit = [&](Index i, Index j) {
    return (rotate(rope, {i}, q) * rotate(rope, {j}, k).transpose())(0, 0);
  };
  const double reference = logit(5000, 1000);
  EXPECT_NEAR(logit(7000, 3000), reference, 1e-9 * (1 + std::abs(reference)));
  EXPECT_NEAR(logit(4000, 0), reference, 1e-9 * (1 + std::abs(reference)));
}

TEST(LongRopeSwitch, InterleavedPairingIsThePermutedRotation) {
  const Case c = cases()[1];  // partial rotary
  RotaryOptions interleaved = c.options;
  interleaved.pairing = RotaryPairing::interleaved;
  const RotaryEncoding<double> half_rope(c.head_dim, c.options);
  const RotaryEncoding<double> pair_rope(c.head_dim, interleaved);
  const auto perm = rotary_half_permutation(c.head_dim, c.rotary_dim);
  auto rng = make_rng(1602);
  std::normal_distribution<double> normal;
  Matrix<double> x(3, c.head_dim);
  for (Index r = 0; r < 3; ++r) {
    for (Index j = 0; j < c.head_dim; ++j) x(r, j) = normal(rng);
  }
  Matrix<double> permuted(3, c.head_dim);
  for (Index j = 0; j < c.head_dim; ++j) permuted.col(j) = x.col(perm[static_cast<std::size_t>(j)]);
  const std::vector<Index> positions{0, 77, 5000};
  const Matrix<double> a = rotate(half_rope, positions, permuted);
  const Matrix<double> b = rotate(pair_rope, positions, x);
  for (Index j = 0; j < c.head_dim; ++j) {
    EXPECT_LE((a.col(j) - b.col(perm[static_cast<std::size_t>(j)])).cwiseAbs().maxCoeff(), 1e-13);
  }
}

TEST(LongRopeErrors, RejectsBadFactorsNamingThem) {
  auto build = [](std::vector<double> short_factor, std::vector<double> long_factor,
                  Index l0 = 4096, std::optional<double> attention = std::nullopt,
                  Index sequence_length = 0) {
    return RotaryEncoding<double>(
        8, {.scaling = RopeScaling::longrope(
                32.0, l0, sequence_length,
                {std::move(short_factor), std::move(long_factor), attention})});
  };
  auto message = [&](auto&& make) -> std::string {
    try {
      make();
    } catch (const std::invalid_argument& e) {
      return e.what();
    }
    return "no exception";
  };
  const std::vector<double> four{1, 1, 1, 1};
  EXPECT_NE(message([&] {
              build({1, 1, 1}, four);
            }).find("short_factor has 3 entries but rotary_dim / 2 = 4"),
            std::string::npos);
  EXPECT_NE(message([&] {
              build(four, {1, 1});
            }).find("long_factor has 2 entries"),
            std::string::npos);
  EXPECT_NE(message([&] {
              build({1, 0, 1, 1}, four);
            }).find("short_factor entries must be finite and positive"),
            std::string::npos);
  EXPECT_NE(message([&] {
              build(four, {1, 1, NAN, 1});
            }).find("long_factor entries"),
            std::string::npos);
  EXPECT_NE(message([&] { build(four, four, 1); }).find("original_context must be >= 2"),
            std::string::npos);
  EXPECT_NE(message([&] {
              build(four, four, 4096, -1.0);
            }).find("attention_factor must be finite and positive"),
            std::string::npos);
  EXPECT_NE(message([&] {
              build(four, four, 4096, std::nullopt, -3);
            }).find("sequence_length must be >= 0"),
            std::string::npos);
  EXPECT_NO_THROW(build(four, four));
}

}  // namespace posenc::test::longrope_test
