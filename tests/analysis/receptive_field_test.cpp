// SPDX-License-Identifier: MIT
// Theoretical receptive field (golden/trf.json, the ALiBi closed form, monotonicity in eps,
// divergent series), the numerical pieces it rests on (Hurwitz zeta, stretched-exponential tails),
// and the empirical receptive field on synthetic weights with known answers.
#include "posenc/analysis/receptive_field.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <numbers>
#include <random>
#include <string>
#include <vector>

#include "posenc/attention.hpp"
#include "support/golden.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

bool contains(const std::string& text, const std::string& fragment) {
  return text.find(fragment) != std::string::npos;
}

/// A test-local ALiBi-shaped ScoreBias: b_h(i, j) = −slope_h·(i − j) for j ≤ i.
struct LinearBias {
  using Scalar = double;
  std::vector<double> slopes;
  Index heads() const { return static_cast<Index>(slopes.size()); }
  double bias(Index h, Index i, Index j) const {
    return -slopes[static_cast<std::size_t>(h)] * static_cast<double>(i - j);
  }
  void add_bias(Index h, Positions qpos, Positions kpos, TileRef<double> tile) const {
    for (Index r = 0; r < tile.rows(); ++r) {
      for (Index c = 0; c < tile.cols(); ++c) tile(r, c) += bias(h, qpos[r], kpos[c]);
    }
  }
};
static_assert(ScoreBias<LinearBias>);

ReceptiveField family_trf(const test::Json& c, double eps) {
  const std::string rpe = c.at("rpe").get<std::string>();
  const auto& p = c.at("params");
  if (rpe == "alibi") return trf_alibi(p.at("m").get<double>(), eps);
  if (rpe == "kerple_log") {
    return trf_kerple_log(p.at("r1").get<double>(), p.at("r2").get<double>(), eps);
  }
  if (rpe == "kerple_power") {
    return trf_kerple_power(p.at("r1").get<double>(), p.at("r2").get<double>(), eps);
  }
  return trf_constant_tail();
}

BiasSeries family_series(const test::Json& c) {
  const std::string rpe = c.at("rpe").get<std::string>();
  const auto& p = c.at("params");
  if (rpe == "alibi") return BiasSeries::alibi(p.at("m").get<double>());
  if (rpe == "kerple_log") {
    return BiasSeries::kerple_log(p.at("r1").get<double>(), p.at("r2").get<double>());
  }
  if (rpe == "kerple_power") {
    return BiasSeries::kerple_power(p.at("r1").get<double>(), p.at("r2").get<double>());
  }
  return BiasSeries::constant(p.at("c").get<double>());
}

TEST(TheoreticalReceptiveField, GoldenCountsExact) {
  const auto golden = test::load_golden("trf.json");
  int checked = 0;
  for (const auto& c : golden.at("cases")) {
    const BiasSeries series = family_series(c);
    // The same bias as an opaque function: the generic engine (detected asymptote) must agree.
    const BiasSeries function = BiasSeries::from_function([series](Index t) { return series(t); });
    for (const auto& [eps_text, expected] : c.at("trf_count").items()) {
      const double eps = std::stod(eps_text);
      const std::string label =
          c.at("bias").get<std::string>() + " " + c.at("params").dump() + " eps " + eps_text;
      for (const ReceptiveField& field :
           {family_trf(c, eps), theoretical_receptive_field(series, eps),
            theoretical_receptive_field(function, eps)}) {
        EXPECT_FALSE(field.reason.empty()) << label;
        if (expected.is_null()) {
          EXPECT_FALSE(field.finite) << label << ": " << field.reason;
          EXPECT_EQ(field.tokens, 0);
          EXPECT_TRUE(std::isinf(field.total_weight));
          EXPECT_TRUE(contains(field.reason, "diverges")) << field.reason;
          continue;
        }
        ASSERT_TRUE(field.finite) << label << ": " << field.reason;
        EXPECT_EQ(field.tokens, expected.get<Index>()) << label << ": " << field.reason;
        const double total = c.at("sum_exp_bias").get<double>();
        EXPECT_LE(std::fabs(field.total_weight - total), 1e-11 * total) << label;
        ++checked;
      }
    }
  }
  EXPECT_EQ(checked, 10 * 4 * 3);
}

TEST(TheoreticalReceptiveField, AlibiClosedFormForManySlopesAndEps) {
  std::vector<double> slopes;
  for (const int heads : {8, 12, 16, 32}) {  // the ALiBi slopes 2^(−8k/H)
    for (int k = 1; k <= heads; ++k) slopes.push_back(std::exp2(-8.0 * k / heads));
  }
  auto rng = test::make_rng(31);
  std::uniform_real_distribution<double> log_slope(std::log(1e-4), std::log(8.0));
  for (int i = 0; i < 40; ++i) slopes.push_back(std::exp(log_slope(rng)));
  std::uniform_real_distribution<double> log_eps(std::log(1e-8), std::log(0.95));
  std::vector<double> eps_values{0.5, 0.1, 0.05, 0.01, 1e-3, 1e-6};
  for (int i = 0; i < 10; ++i) eps_values.push_back(std::exp(log_eps(rng)));
  int cross_checked = 0;
  for (const double m : slopes) {
    const BiasSeries linear = BiasSeries::from_function(
        [m](Index t) { return -m * static_cast<double>(t); }, BiasAsymptote::linear(m), 4096);
    for (const double eps : eps_values) {
      const double x = std::log(1.0 / eps) / m;
      const auto expected = std::max<Index>(1, static_cast<Index>(std::ceil(x)));
      const ReceptiveField field = trf_alibi(m, eps);
      ASSERT_TRUE(field.finite);
      EXPECT_EQ(field.tokens, expected) << "m = " << m << ", eps = " << eps;
      EXPECT_NEAR(field.total_weight, 1.0 / -std::expm1(-m), 1e-13 / -std::expm1(-m));
      // Away from ties, summing the series (generic engine; KERPLE-power with r2 = 1) agrees.
      if (std::fabs(x - std::nearbyint(x)) > 1e-9 * std::max(1.0, x) && x < 2e6) {
        EXPECT_EQ(theoretical_receptive_field(linear, eps).tokens, expected) << m << " " << eps;
        EXPECT_EQ(trf_kerple_power(m, 1.0, eps).tokens, expected) << m << " " << eps;
        ++cross_checked;
      }
    }
  }
  EXPECT_GT(cross_checked, 1000);
}

TEST(TheoreticalReceptiveField, AlibiExactIntegerBoundaries) {
  // ln(1/eps)/m is mathematically an integer k: the tail share e^(−mk) equals eps, which the
  // definition's ≥ accepts, so the answer is k whichever way the doubles rounded.
  struct Case {
    double slope, eps;
    Index tokens;
  };
  for (const Case& c : {Case{0.5, std::exp(-5.0), 10}, Case{0.0625, std::exp(-2.0), 32},
                        Case{std::numbers::ln2, 0.5, 1}, Case{std::numbers::ln2 / 4, 0.5, 4},
                        Case{std::numbers::ln2 / 3, 0.125, 9}, Case{0.1, std::exp(-0.3), 3},
                        Case{10.0, 0.5, 1}, Case{1.0 / 1024, std::exp(-1.0), 1024}}) {
    EXPECT_EQ(trf_alibi(c.slope, c.eps).tokens, c.tokens) << c.slope << " " << c.eps;
  }
}

TEST(TheoreticalReceptiveField, MonotoneInEps) {
  const std::vector<BiasSeries> series{BiasSeries::alibi(0.03),
                                       BiasSeries::alibi(2.0),
                                       BiasSeries::kerple_log(1.2, 0.7),
                                       BiasSeries::kerple_log(4.0, 3.0),
                                       BiasSeries::kerple_power(0.2, 0.4),
                                       BiasSeries::kerple_power(0.01, 1.7),
                                       BiasSeries::from_function([](Index t) {
                                         return -2.5 * std::log1p(0.1 * static_cast<double>(t));
                                       })};
  for (std::size_t s = 0; s < series.size(); ++s) {
    Index previous = 1;
    for (double eps = 0.999; eps > 1e-7; eps *= 0.83) {
      const ReceptiveField field = theoretical_receptive_field(series[s], eps);
      ASSERT_TRUE(field.finite) << s << ": " << field.reason;
      EXPECT_GE(field.tokens, previous) << "series " << s << ", eps " << eps;
      previous = field.tokens;
    }
    EXPECT_GT(previous, 1) << s;
  }
}

TEST(TheoreticalReceptiveField, DivergentSeriesReportWhy) {
  struct Case {
    ReceptiveField field;
    const char* fragment;
  };
  const auto function = [](auto b) { return BiasSeries::from_function(b); };
  for (const Case& c :
       {Case{trf_alibi(0.0, 0.1), "constant"}, Case{trf_alibi(-0.1, 0.1), "grows"},
        Case{trf_kerple_log(1.0, 1.0, 0.1), "p-series with exponent r1 = 1 <= 1 diverges"},
        Case{trf_kerple_log(0.3, 2.0, 0.1), "<= 1"},
        Case{trf_kerple_power(0.0, 0.5, 0.1), "does not decrease"},
        Case{trf_constant_tail(), "tends to a constant"},
        Case{theoretical_receptive_field(NoPositionalEncoding{}, 0, 0.1), "NoPE"},
        // T5-like: learned values up to the last bucket, then constant.
        Case{theoretical_receptive_field(
                 function([](Index t) { return t < 128 ? -0.05 * static_cast<double>(t) : -3.0; }),
                 0.1),
             "tends to a constant"},
        Case{theoretical_receptive_field(
                 function([](Index t) { return 1e-3 * static_cast<double>(t); }), 0.1),
             "grows"},
        Case{theoretical_receptive_field(
                 function([](Index t) { return -0.9 * std::log1p(static_cast<double>(t)); }), 0.1),
             "p-series"},
        // The bias levels off: b_t = −1 + 1/(1 + t).
        Case{
            theoretical_receptive_field(
                function([](Index t) { return -1.0 + 1.0 / (1.0 + static_cast<double>(t)); }), 0.1),
            "constant"}}) {
    EXPECT_FALSE(c.field.finite) << c.field.reason;
    EXPECT_TRUE(contains(c.field.reason, c.fragment)) << c.field.reason;
  }
  // Oscillating (Sandwich-like): convergence undetermined, said so.
  const BiasSeries oscillating =
      BiasSeries::from_function([](Index t) { return std::cos(0.001 * static_cast<double>(t)); });
  const Convergence test = convergence(oscillating);
  EXPECT_FALSE(test.determined);
  EXPECT_FALSE(theoretical_receptive_field(oscillating, 0.1).finite);
  EXPECT_TRUE(contains(test.reason, "declare it")) << test.reason;
}

TEST(TheoreticalReceptiveField, ConvergenceReasons) {
  EXPECT_TRUE(contains(convergence(BiasSeries::alibi(0.25)).reason, "geometric decay"));
  EXPECT_TRUE(convergence(BiasSeries::kerple_log(1.01, 1.0)).converges);
  EXPECT_FALSE(convergence(BiasSeries::kerple_log(1.0, 1.0)).converges);
  EXPECT_TRUE(
      contains(convergence(BiasSeries::kerple_power(0.5, 0.5)).reason, "stretched-exponential"));
  EXPECT_FALSE(convergence(BiasSeries::constant()).converges);
  const BiasAsymptote detected =
      detect_asymptote([](Index t) { return -0.7 * std::pow(static_cast<double>(t), 0.35); });
  EXPECT_EQ(detected.kind, BiasAsymptote::Kind::power);
  EXPECT_NEAR(detected.exponent, 0.35, 1e-9);
  EXPECT_NEAR(detected.rate, 0.7, 1e-9);
  const BiasAsymptote log_form =
      detect_asymptote([](Index t) { return -2.0 * std::log1p(0.5 * static_cast<double>(t)); });
  EXPECT_EQ(log_form.kind, BiasAsymptote::Kind::logarithmic);
  EXPECT_NEAR(log_form.rate, 2.0, 1e-6);
}

TEST(TheoreticalReceptiveField, GenericScoreBiasOverload) {
  const LinearBias bias{{0.5, 0.0625, 1.0 / 256}};
  for (Index h = 0; h < bias.heads(); ++h) {
    for (const double eps : {0.5, 0.1, 0.01}) {
      const ReceptiveField field = theoretical_receptive_field(bias, h, eps);
      ASSERT_TRUE(field.finite) << field.reason;
      EXPECT_EQ(field.tokens, trf_alibi(bias.slopes[h], eps).tokens);
    }
  }
  POSENC_EXPECT_INVALID(theoretical_receptive_field(bias, 3, 0.1),
                        "posenc::theoretical_receptive_field", "head 3", "3 heads");
}

TEST(TheoreticalReceptiveField, RejectsBadArguments) {
  for (const double eps : {0.0, 1.0, -0.5, std::numeric_limits<double>::quiet_NaN()}) {
    POSENC_EXPECT_INVALID(trf_alibi(0.5, eps), "posenc::trf_alibi", "eps must lie in (0, 1)");
  }
  POSENC_EXPECT_INVALID(trf_kerple_log(2.0, 0.0, 0.1), "posenc::trf_kerple_log", "r2 > 0");
  POSENC_EXPECT_INVALID(trf_kerple_power(1.0, -1.0, 0.1), "posenc::trf_kerple_power", "r2 = -1");
  POSENC_EXPECT_INVALID(trf_alibi(std::numeric_limits<double>::infinity(), 0.1), "slope");
  POSENC_EXPECT_INVALID(BiasSeries::from_function({}), "bias is empty");
  POSENC_EXPECT_INVALID(BiasSeries::from_function(
                            [](Index t) {
                              return t == 3 ? std::numeric_limits<double>::quiet_NaN()
                                            : -static_cast<double>(t);
                            },
                            BiasAsymptote::linear(1.0), 8),
                        "posenc::BiasSeries::from_function", "b(3) = ");
  POSENC_EXPECT_INVALID(
      BiasSeries::from_function([](Index) { return -std::numeric_limits<double>::infinity(); },
                                BiasAsymptote::linear(1.0), 8),
      "no weight");
}

TEST(TrfNumerics, HurwitzZetaScaled) {
  // q^s ζ(s, q) for double s and q, references from mpmath (40 digits, same double inputs).
  struct Case {
    double s, q;
    long double expected;
  };
  const long double pi = std::numbers::pi_v<long double>;
  for (const Case& c :
       {Case{2, 1, pi * pi / 6}, Case{4, 1, pi * pi * pi * pi / 90}, Case{2, 0.5, pi * pi / 8},
        Case{3, 1, 1.202056903159594285399738L}, Case{1.5, 1, 2.612375348685488343348568L},
        Case{1.001, 1, 1000.577288476011626848067L}, Case{2, 1e6, 1000000.500000166666666667L},
        Case{1.5, 3.25, 7.037957239821410166246218L}, Case{7.5, 0.1, 1.00000001560100699394149L},
        Case{40, 2, 1.000000090438636453843063L}, Case{1.2, 1e12, 5000000000000.501110223025L}}) {
    const long double value = detail::hurwitz_zeta_scaled(c.s, c.q);
    EXPECT_LE(std::fabs(value - c.expected), 1e-15L * c.expected)
        << "s = " << c.s << ", q = " << c.q;
  }
}

TEST(TrfNumerics, StretchedExponentialTails) {
  // Exactly geometric for p = 1 (also through the Euler–Maclaurin branch: c < 0.01).
  for (const long double c : {2.0L, 0.3L, 0.004L, 1e-6L}) {
    for (const Index K : {Index{0}, Index{5}, Index{1000}}) {
      const long double exact = 1.0L / -std::expm1(-c);
      EXPECT_LE(std::fabs(detail::power_tail_ratio(c, 1.0L, K) - exact), 1e-15L * exact)
          << static_cast<double>(c) << " " << K;
    }
  }
  // Brute force (long double, until terms are below 1e-25 of the sum) for p ≠ 1.
  struct Case {
    long double c, p;
    Index first;
  };
  // Each case reaches the Euler–Maclaurin branch (ρ < 0.01 at some t ≥ 64 before the terms
  // become negligible).
  for (const Case& c : {Case{0.2L, 0.5L, 0}, Case{1.5L, 0.3L, 0}, Case{1e-6L, 2.0L, 0},
                        Case{1e-6L, 2.0L, 100}, Case{0.2L, 0.5L, 400}, Case{3e-4L, 1.5L, 10}}) {
    const long double g0 = c.c * std::pow(static_cast<long double>(c.first), c.p);
    long double brute = 0.0L;
    for (Index t = c.first;; ++t) {
      const long double term = std::exp(g0 - c.c * std::pow(static_cast<long double>(t), c.p));
      brute += term;
      if (term < 1e-25L * brute) break;
    }
    EXPECT_LE(std::fabs(detail::power_tail_ratio(c.c, c.p, c.first) - brute), 1e-14L * brute)
        << static_cast<double>(c.c) << " " << static_cast<double>(c.p) << " " << c.first;
  }
}

TEST(EmpiricalReceptiveField, UniformWindow) {
  for (const Index w : {1, 2, 3, 10, 64, 100, 1000}) {
    for (const double eps : {0.5, 0.3, 0.1, 0.05, 0.01, 0.001}) {
      const auto expected =
          std::max<Index>(1, static_cast<Index>(std::ceil((1.0 - eps) * w - 1e-9)));
      // By distance, with zero weight beyond the window.
      Vector<double> by_distance = Vector<double>::Zero(w + 17);
      by_distance.head(w).setConstant(1.0 / static_cast<double>(w));
      EXPECT_EQ(erf_from_distance_weights(by_distance, eps), expected) << w << " " << eps;
      // One attention row: a query at position 200 + w over keys 0 … 200 + w.
      const Index query = 200 + w;
      Vector<double> row = Vector<double>::Zero(query + 1);
      row.segment(query - w + 1, w).setConstant(1.0 / static_cast<double>(w));
      EXPECT_EQ(empirical_receptive_field(row, query, eps), expected) << w << " " << eps;
    }
  }
}

TEST(EmpiricalReceptiveField, GeometricWeightsGiveTheAlibiClosedForm) {
  for (const double m : {0.5, 0.1, 0.0625, 0.02}) {
    const Index length = static_cast<Index>(60.0 / m);  // e^(−60): truncation is invisible
    Vector<double> w(length);
    for (Index t = 0; t < length; ++t) w[t] = std::exp(-m * static_cast<double>(t));
    for (const double eps : {0.5, 0.2, 0.1, 0.05, 0.01}) {
      EXPECT_EQ(erf_from_distance_weights(w, eps), trf_alibi(m, eps).tokens) << m << " " << eps;
      EXPECT_EQ(erf_from_gradients(Vector<double>(-3.0 * w), eps), trf_alibi(m, eps).tokens);
    }
  }
}

TEST(EmpiricalReceptiveField, AttentionWeightsOfALinearBias) {
  // Zero queries: the logits are the bias alone, the weights of the last query are geometric.
  const LinearBias bias{{0.5, 0.125, 0.0625}};
  const Index H = 3, N = 4, M = 1200, D = 4;
  Heads<double> q(H, N, D), k(H, M, D), v(H, M, D);
  k.flat().setRandom();
  v.flat().setRandom();
  const AttentionOptions options{.query_offset = M - N};
  const Heads<double> weights = attention_weights(q, k, v, bias, options);
  for (const double eps : {0.5, 0.1, 0.01}) {
    const EmpiricalReceptiveField erf = empirical_receptive_field(weights, eps, options);
    for (Index h = 0; h < H; ++h) {
      const Index expected = trf_alibi(bias.slopes[h], eps).tokens;
      for (Index r = 0; r < N; ++r) EXPECT_EQ(erf.per_query(h, r), expected) << h << " " << r;
      EXPECT_DOUBLE_EQ(erf.mean[h], static_cast<double>(expected));
      EXPECT_EQ(erf.max[h], expected);
    }
  }
}

TEST(EmpiricalReceptiveField, PositionsMaskedRowsAndErrors) {
  // Keys given out of order, on both sides of the query (bidirectional): distance |i − j|.
  Vector<double> row(5);
  row << 0.1, 0.4, 0.1, 0.3, 0.1;                   // keys at positions below
  const std::vector<Index> keys{12, 10, 7, 11, 9};  // distances 2, 0, 3, 1, 1 from 10
  // cumulative by distance: d0 0.4, d1 0.8, d2 0.9, d3 1.0
  EXPECT_EQ(empirical_receptive_field(row, 10, 0.5, keys), 2);
  EXPECT_EQ(empirical_receptive_field(row, 10, 0.15, keys), 3);
  EXPECT_EQ(empirical_receptive_field(row, 10, 0.05, keys), 4);
  EXPECT_EQ(empirical_receptive_field(Vector<double>::Zero(4), 3, 0.1), 0);  // nothing allowed
  Heads<double> weights(1, 2, 3);
  weights(0, 1, 0) = 1.0;
  const EmpiricalReceptiveField erf = empirical_receptive_field(weights, 0.1);
  EXPECT_EQ(erf.per_query(0, 0), 0);
  EXPECT_EQ(erf.per_query(0, 1), 2);  // query at 1, all weight on key 0
  EXPECT_DOUBLE_EQ(erf.mean[0], 2.0);
  row[2] = -0.1;
  POSENC_EXPECT_INVALID(empirical_receptive_field(row, 10, 0.5, keys),
                        "posenc::empirical_receptive_field", "non-negative", "-0.1");
  POSENC_EXPECT_INVALID(empirical_receptive_field(row, 10, 0.5, std::vector<Index>{1, 2}),
                        "5 entries", "2 key positions");
  POSENC_EXPECT_INVALID(empirical_receptive_field(weights, 0.1, {.query_positions = keys}),
                        "query_positions has 5");
  POSENC_EXPECT_INVALID(erf_from_gradients(Vector<double>::Zero(3), 0.1),
                        "posenc::erf_from_gradients", "every one of the 3 gradients is 0");
}

}  // namespace
}  // namespace posenc
