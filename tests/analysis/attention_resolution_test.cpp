// SPDX-License-Identifier: MIT
// Attention resolution R(s), the design-time rotary score curves and the empirical sub-diagonal
// curve against tests/data/attention_resolution.json (R by 50-digit mpmath; curves from
// torchscale).
#include "posenc/analysis/attention_resolution.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>

#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/xpos.hpp"
#include "support/golden.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

using test::load_golden;

// |actual − expected| ≤ 1e-12·|expected| (the issue's tolerance for R), or ≤ 1e-15 for 0.
void expect_relative(double actual, double expected, const std::string& what) {
  ASSERT_TRUE(std::isfinite(actual)) << what;
  EXPECT_LE(std::fabs(actual - expected), std::max(1e-12 * std::fabs(expected), 1e-15))
      << what << ": " << actual << " vs " << expected;
}

TEST(AttentionResolution, HandCurves) {
  const auto golden = load_golden("attention_resolution.json");
  for (const auto& c : golden.at("hand")) {
    const Vector<double> s = test::to_vector(c.at("s"));
    expect_relative(attention_resolution(s), c.at("R").get<double>(), c.at("s").dump());
  }
}

TEST(AttentionResolution, LargeScoresDoNotOverflowAndShiftCancels) {
  Vector<double> s(3);
  s << 1000.0, 999.0, 998.0;  // e^1000 overflows a naive evaluation
  expect_relative(attention_resolution(s), 0.3835556686026205, "s = [1000, 999, 998]");
  Vector<double> shifted = s.array() - 1e6;
  expect_relative(attention_resolution(shifted), attention_resolution(s), "shifted by -1e6");
  // Row vectors and float curves are accepted as well.
  Eigen::RowVector3f row(3.0f, 2.0f, 1.0f);
  EXPECT_NEAR(attention_resolution(row), attention_resolution(Eigen::Vector3d(3, 2, 1)), 1e-15);
}

// Scores near the double limit: a score far below the others (e ~ e^{−2e308}) followed by a rise
// used to form 0·inf = NaN. It contributes nothing, so R equals R of the curve without it (or a
// hand value); only a true R below −DBL_MAX gives −inf.
TEST(AttentionResolution, ScoresNearTheDoubleLimitGiveFiniteCorrectValues) {
  constexpr double big = 1e308;
  // e = [ε, 1] over the denominator, ε = e^{−2e308}: R = (ε² − ε + 1 − ε)/(1 + ε)² = 1.
  expect_relative(attention_resolution(Eigen::Vector3d(-big, big, -big)), 1.0,
                  "[-1e308, 1e308, -1e308]");
  expect_relative(attention_resolution(Eigen::Vector3d(big, -big, big)), 1.0,
                  "[1e308, -1e308, 1e308]");
  // A leading −1e308 adds nothing: R([−1e308, 3, 2, 1]) = R([3, 2, 1]), also at ±1e308 − 1e292.
  const Eigen::Vector4d leading(-big, 3.0, 2.0, 1.0);
  expect_relative(attention_resolution(leading), attention_resolution(Eigen::Vector3d(3, 2, 1)),
                  "[-1e308, 3, 2, 1]");
  const Eigen::Vector4d top(-big, big, big - 1e292, big - 2e292);
  expect_relative(attention_resolution(top),
                  attention_resolution(Eigen::Vector3d(big, big - 1e292, big - 2e292)),
                  "[-1e308, 1e308, ...]");
  // A score at −1e308 inside the curve: terms e_1·(e_1 − 0) and 0·(0 − e_3); by hand with e^s.
  Vector<double> middle(5);
  middle << 3.0, 2.0, -big, 1.0, 0.0;
  const double e0 = std::exp(3.0), e1 = std::exp(2.0), e3 = std::exp(1.0), e4 = 1.0;
  const double hand =
      (e0 * (e0 - e1) + e1 * e1 + e3 * (e3 - e4)) / ((e0 + e1 + e3) * (e0 + e1 + e3));
  expect_relative(attention_resolution(middle), hand, "[3, 2, -1e308, 1, 0]");
  // Shifted by −1e308 (exactly representable differences of 1e292): the same R.
  Eigen::Vector3d coarse(big, big - 2e292, big - 4e292);
  expect_relative(attention_resolution(coarse),
                  attention_resolution(Eigen::Vector3d(0.0, -2e292, -4e292)), "shift by -1e308");
  // A final rise by 2e308: R = 1 − e^{2e308}, below −DBL_MAX: −inf, never NaN.
  EXPECT_EQ(attention_resolution(Eigen::Vector2d(-big, big)),
            -std::numeric_limits<double>::infinity());
}

TEST(AttentionResolution, IsBelowOneAndNotScaleInvariant) {
  auto rng = test::make_rng(11);
  std::normal_distribution<double> normal;
  for (int trial = 0; trial < 50; ++trial) {
    Vector<double> s(2 + trial);
    for (Index i = 0; i < s.size(); ++i) s[i] = 5.0 * normal(rng);
    EXPECT_LT(attention_resolution(s), 1.0);
  }
  Vector<double> s(4);
  s << 3.0, 2.0, 1.0, 0.0;
  EXPECT_GT(std::fabs(attention_resolution(s) - attention_resolution(Vector<double>(2.0 * s))),
            1e-3);
}

TEST(AttentionResolution, RejectsShortOrNonFiniteCurves) {
  POSENC_EXPECT_INVALID(attention_resolution(Vector<double>::Zero(1)),
                        "posenc::attention_resolution", "at least 2", "got 1");
  Vector<double> s = Vector<double>::Zero(4);
  s[2] = std::numeric_limits<double>::quiet_NaN();
  POSENC_EXPECT_INVALID(attention_resolution(s), "posenc::attention_resolution", "score_curve[2]");
  s[2] = -std::numeric_limits<double>::infinity();
  POSENC_EXPECT_INVALID(attention_resolution(s), "not finite");
}

TEST(RotaryScoreCurve, DesignTimeGolden) {
  const auto golden = load_golden("attention_resolution.json");
  int cases = 0;
  for (const auto& c : golden.at("design_time")) {
    const auto d = c.at("head_dim").get<Index>();
    const auto N = c.at("N").get<Index>();
    const std::string variant = c.at("variant").get<std::string>();
    RotaryScoreCurve options;
    if (variant != "rope") options.decay = XPosDecay{0.4, c.at("scale_base").get<double>()};
    const std::string label = variant + " d=" + std::to_string(d) + " N=" + std::to_string(N);

    options.normalization = ScoreNormalization::raw;
    const Vector<double> raw = rotary_score_curve(d, N + 1, options);
    const Vector<double> golden_raw = test::to_vector(c.at("s_raw"));
    ASSERT_EQ(raw.size(), N + 2) << label;
    // s_raw is O(d): 1e-12 relative to max(1, |s|).
    EXPECT_LE(test::relative_error(raw, golden_raw), 1e-12) << label;

    // R of the golden curve and of ours, for the three normalisations.
    expect_relative(attention_resolution(golden_raw), c.at("R_of_s_raw").get<double>(), label);
    expect_relative(attention_resolution(raw), c.at("R_of_s_raw").get<double>(), label + " raw");
    options.normalization = ScoreNormalization::sum;
    expect_relative(attention_resolution(rotary_score_curve(d, N + 1, options)),
                    c.at("R_of_g (s_raw/2 = sum_i cos*zeta)").get<double>(), label + " sum");
    options.normalization = ScoreNormalization::mean;
    expect_relative(attention_resolution(rotary_score_curve(d, N + 1, options)),
                    c.at("R_of_mean (s_raw/d = mean_i cos*zeta)").get<double>(), label + " mean");
    ++cases;
  }
  EXPECT_EQ(cases, 48);
}

TEST(RotaryScoreCurve, FromEncodersMatchesTheGolden) {
  const auto golden = load_golden("attention_resolution.json");
  int cases = 0;
  for (const auto& c : golden.at("design_time")) {
    const auto d = c.at("head_dim").get<Index>();
    const auto N = c.at("N").get<Index>();
    const std::string variant = c.at("variant").get<std::string>();
    const std::string label = variant + " d=" + std::to_string(d) + " N=" + std::to_string(N);
    const Vector<double> golden_raw = test::to_vector(c.at("s_raw"));
    const auto check = [&](const auto& encoder) {
      const Vector<double> raw = rotary_score_curve(encoder, N + 1, ScoreNormalization::raw);
      ASSERT_EQ(raw.size(), N + 2) << label;
      EXPECT_LE(test::relative_error(raw, golden_raw), 1e-12) << label;
      expect_relative(attention_resolution(raw), c.at("R_of_s_raw").get<double>(), label);
      expect_relative(attention_resolution(rotary_score_curve(encoder, N + 1)),
                      c.at("R_of_g (s_raw/2 = sum_i cos*zeta)").get<double>(), label + " sum");
      expect_relative(
          attention_resolution(rotary_score_curve(encoder, N + 1, ScoreNormalization::mean)),
          c.at("R_of_mean (s_raw/d = mean_i cos*zeta)").get<double>(), label + " mean");
    };
    if (variant == "rope") {
      check(RotaryEncoding<double>(d, {.pairing = RotaryPairing::interleaved}));
      check(RotaryEncoding<float>(d, {.pairing = RotaryPairing::half}));  // θ in double either way
    } else {
      check(XPosEncoding<double>(d, {.scale_base = c.at("scale_base").get<double>()}));
      check(XPosEncoding<float>(d, {.scale_base = c.at("scale_base").get<double>()}));
    }
    ++cases;
  }
  EXPECT_EQ(cases, 48);
}

TEST(RotaryScoreCurve, FromEncodersWithScalings) {
  const Index d = 32;
  const Vector<double> plain = rotary_score_curve(RotaryEncoding<double>(d), 200);
  // Linear interpolation by s stretches the curve: g_s[s·n] = g[n].
  const Vector<double> linear =
      rotary_score_curve(RotaryEncoding<double>(d, {.scaling = RopeScaling::linear(4.0)}), 800);
  for (Index n = 0; n <= 200; ++n) EXPECT_NEAR(linear[4 * n], plain[n], 1e-12 * d) << n;
  // YaRN: the encoder's frequencies, and every logit scaled by the squared magnitude.
  const RotaryEncoding<double> yarn(d, {.scaling = RopeScaling::yarn(8.0, 128)});
  const double magnitude = 0.1 * std::log(8.0) + 1.0;
  EXPECT_NEAR(yarn.magnitude(), magnitude, 1e-15);
  const Vector<double> curve = rotary_score_curve(yarn, 300);
  const Vector<double> unscaled = rotary_score_curve(yarn.frequencies(), {}, 1.0, 300);
  EXPECT_LE(test::relative_error(curve, Vector<double>(magnitude * magnitude * unscaled)), 1e-15);
  EXPECT_NEAR(curve[0], magnitude * magnitude * d / 2, 1e-12);
  // The slowest pairs are interpolated (θ/8), the fastest kept: the curve differs from RoPE's
  // beyond the magnitude, and with `mean` starts at magnitude².
  EXPECT_GT((curve.head(201) / (magnitude * magnitude) - plain).cwiseAbs().maxCoeff(), 1e-3);
  EXPECT_NEAR(rotary_score_curve(yarn, 10, ScoreNormalization::mean)[0], magnitude * magnitude,
              1e-14);
  // Partial rotary: only the rotated pairs enter.
  const RotaryEncoding<double> partial(d, {.rotary_dim = 16});
  EXPECT_DOUBLE_EQ(rotary_score_curve(partial, 5)[0], 8.0);
  POSENC_EXPECT_INVALID(rotary_score_curve(partial, -1), "posenc::rotary_score_curve",
                        "max_distance");
}

TEST(RotaryScoreCurve, ExplicitFrequenciesMatchTheHeadDimForm) {
  const Index d = 16;
  std::vector<double> theta(d / 2), zeta(d / 2);
  for (Index i = 0; i < d / 2; ++i) {
    theta[i] = std::pow(10000.0, -2.0 * static_cast<double>(i) / d);
    zeta[i] = (2.0 * static_cast<double>(i) + 0.4 * d) / (1.4 * d);
  }
  const Vector<double> a = rotary_score_curve(theta, zeta, 512.0, 100);
  const Vector<double> b = rotary_score_curve(d, 100, {.decay = XPosDecay{}});
  EXPECT_EQ(test::relative_error(a, b), 0.0);
  // RoPE: g[0] = d/2 and g[n] ≤ d/2.
  const Vector<double> rope = rotary_score_curve(theta, {}, 1.0, 100);
  EXPECT_DOUBLE_EQ(rope[0], d / 2.0);
  EXPECT_LE(rope.maxCoeff(), d / 2.0);
}

TEST(RotaryScoreCurve, RejectsBadArguments) {
  POSENC_EXPECT_INVALID(rotary_score_curve(7, 10), "posenc::rotary_score_curve", "head_dim",
                        "got 7");
  POSENC_EXPECT_INVALID(rotary_score_curve(8, -1), "max_distance", "got -1");
  POSENC_EXPECT_INVALID(rotary_score_curve(8, 10, {.decay = XPosDecay{0.4, 0.0}}), "scale_base");
  const std::vector<double> theta{1.0, 0.1};
  const std::vector<double> zeta{0.5};
  POSENC_EXPECT_INVALID(rotary_score_curve(theta, zeta, 512.0, 10), "decay_bases has 1",
                        "frequencies has 2");
}

TEST(EmpiricalScoreCurve, XPosAttentionGolden) {
  const auto golden = load_golden("attention_resolution.json");
  const auto attention = load_golden("xpos_attention.json");
  for (const auto& e : golden.at("empirical")) {
    const auto& scores = attention.at("cases")
                             .at(e.at("attention_case_index").get<std::size_t>())
                             .at("outputs")
                             .at("scores_pre_softmax");
    double sum = 0.0;
    int count = 0;
    for (const auto& head : e.at("per_batch_head")) {
      const Matrix<double> logits = test::to_matrix(scores.at(head.at("bh").get<std::size_t>()));
      const Vector<double> curve = empirical_score_curve(logits);
      const Vector<double> expected = test::to_vector(head.at("s_hat"));
      ASSERT_EQ(curve.size(), expected.size());
      EXPECT_LE(test::relative_error(curve, expected), 1e-12);
      const double r = attention_resolution(curve);
      expect_relative(r, head.at("R_of_s_hat").get<double>(), "bh " + head.at("bh").dump());
      sum += r;
      ++count;
    }
    expect_relative(sum / count, e.at("mean_R_over_batch_heads").get<double>(), "mean over heads");
  }
}

TEST(EmpiricalScoreCurve, OffsetRowsPositionsAndMasks) {
  // scores(i, j) = −(i − j) + i: every sub-diagonal n has mean −n + mean of its rows.
  const Index T = 9;
  Matrix<double> full(T, T);
  for (Index i = 0; i < T; ++i) {
    for (Index j = 0; j < T; ++j) {
      full(i, j) = j <= i ? -static_cast<double>(i - j) + 0.5 * static_cast<double>(i)
                          : -std::numeric_limits<double>::infinity();
    }
  }
  const Vector<double> curve = empirical_score_curve(full);
  ASSERT_EQ(curve.size(), T);
  for (Index n = 0; n < T; ++n) {
    const double mean_row = static_cast<double>(n + T - 1) / 2.0;  // mean of i = n..T−1
    EXPECT_NEAR(curve[n], -static_cast<double>(n) + 0.5 * mean_row, 1e-14) << n;
  }
  // The last 3 rows alone (query_offset = T − 3) and the same with explicit positions.
  const Matrix<double> last = full.bottomRows(3);
  const Vector<double> tail = empirical_score_curve(last, T - 3);
  ASSERT_EQ(tail.size(), T);
  std::vector<Index> qpos{T - 3, T - 2, T - 1};
  std::vector<Index> kpos(T);
  for (Index j = 0; j < T; ++j) kpos[j] = j;
  EXPECT_EQ(test::relative_error(empirical_score_curve(last, qpos, kpos), tail), 0.0);
  EXPECT_NEAR(tail[0], 0.5 * static_cast<double>(T - 2), 1e-14);
  // A sliding window of 3 keys: the curve stops at distance 2.
  Matrix<double> window = full;
  for (Index i = 0; i < T; ++i) {
    for (Index j = 0; j + 3 <= i; ++j) window(i, j) = -std::numeric_limits<double>::infinity();
  }
  EXPECT_EQ(empirical_score_curve(window).size(), 3);
  // Errors: nothing at distance 0; NaN.
  POSENC_EXPECT_INVALID(empirical_score_curve(full, -T), "posenc::empirical_score_curve",
                        "distance 0");
  full(4, 2) = std::numeric_limits<double>::quiet_NaN();
  POSENC_EXPECT_INVALID(empirical_score_curve(full), "scores(4, 2)");
  POSENC_EXPECT_INVALID(empirical_score_curve(last, qpos, std::vector<Index>{0, 1}), "2 key");
}

TEST(EmpiricalScoreCurve, PerHeadResolution) {
  const auto attention = load_golden("xpos_attention.json");
  const Heads<double> scores =
      test::to_heads(attention.at("cases").at(0).at("outputs").at("scores_pre_softmax"));
  const Vector<double> r = empirical_attention_resolution(scores, {});
  const auto golden = load_golden("attention_resolution.json");
  const auto& heads = golden.at("empirical").at(0).at("per_batch_head");
  ASSERT_EQ(r.size(), static_cast<Index>(heads.size()));
  for (Index h = 0; h < r.size(); ++h) {
    expect_relative(r[h], heads.at(h).at("R_of_s_hat").get<double>(), "head " + std::to_string(h));
  }
}

}  // namespace
}  // namespace posenc
