// SPDX-License-Identifier: MIT
// Theoretical receptive field (tests/data/trf.json, the ALiBi closed form, monotonicity in eps,
// divergent series), the numerical pieces it rests on (Hurwitz zeta, stretched-exponential tails),
// the overloads for the library's encoders (limit series, per-query-position field, non-additive
// encoders), and the empirical receptive field on synthetic weights with known answers.
#include "posenc/analysis/receptive_field.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <numbers>
#include <random>
#include <string>
#include <vector>

#include "posenc/attention.hpp"
#include "posenc/compose.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/conv_spe.hpp"
#include "posenc/encoders/dape.hpp"
#include "posenc/encoders/fire.hpp"
#include "posenc/encoders/kerple.hpp"
#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/sine_spe.hpp"
#include "posenc/encoders/t5_bias.hpp"
#include "posenc/encoders/xpos.hpp"
#include "support/golden.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

bool contains(const std::string& text, const std::string& fragment) {
  return text.find(fragment) != std::string::npos;
}

/// A test-local ALiBi-shaped ScoreBias: b_h(i, j) = −slope_h·(i − j) for j ≤ i.
struct SlopeBias {
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
static_assert(ScoreBias<SlopeBias>);

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
  const SlopeBias bias{{0.5, 0.0625, 1.0 / 256}};
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

// ---------------------------------------------------------------------------------------------
// The library's encoders
// ---------------------------------------------------------------------------------------------

/// TRF_ε of the window b(0 … last) by brute force in long double (the definition, no engine).
template <class B>
Index brute_force_trf(const B& b, Index last, double eps) {
  std::vector<long double> w(static_cast<std::size_t>(last) + 1);
  long double total = 0.0L;
  for (Index t = 0; t <= last; ++t) total += w[static_cast<std::size_t>(t)] = std::exp(b(t));
  long double partial = 0.0L;
  for (Index K = 1; K <= last + 1; ++K) {
    partial += w[static_cast<std::size_t>(K - 1)];
    if (partial >= (1.0L - eps) * total) return K;
  }
  return last + 1;
}

/// A bias that forwards to another, so the generic AdditiveBias engine sees an opaque type.
template <class Bias>
struct Opaque {
  using Scalar = typename Bias::Scalar;
  Bias inner;
  Index heads() const { return inner.heads(); }
  Scalar bias(Index h, Index i, Index j) const { return inner.bias(h, i, j); }
  void add_bias(Index h, Positions qpos, Positions kpos, TileRef<Scalar> tile) const {
    inner.add_bias(h, qpos, kpos, tile);
  }
};

TEST(EncoderReceptiveField, GoldenThroughAlibiAndKerple) {
  const auto golden = test::load_golden("trf.json");
  int checked = 0;
  for (const auto& c : golden.at("cases")) {
    const std::string rpe = c.at("rpe").get<std::string>();
    const auto& p = c.at("params");
    for (const auto& [eps_text, expected] : c.at("trf_count").items()) {
      const double eps = std::stod(eps_text);
      std::vector<ReceptiveField> fields;
      if (rpe == "alibi") {
        const Alibi<double> alibi(Vector<double>::Constant(2, p.at("m").get<double>()));
        const Alibi<float> symmetric(Vector<double>::Constant(1, p.at("m").get<double>()),
                                     BiasForm::symmetric);
        fields = {theoretical_receptive_field(alibi, 1, eps),
                  theoretical_receptive_field(symmetric, 0, eps)};
        EXPECT_TRUE(contains(fields[1].reason, "symmetric form")) << fields[1].reason;
      } else if (rpe == "kerple_log" || rpe == "kerple_power") {
        const auto kernel = rpe == "kerple_log" ? KerpleKernel::log : KerpleKernel::power;
        const Vector<double> r1 = Vector<double>::Constant(1, p.at("r1").get<double>());
        const Vector<double> r2 = Vector<double>::Constant(1, p.at("r2").get<double>());
        fields = {theoretical_receptive_field(Kerple<double>(kernel, r1, r2), 0, eps),
                  theoretical_receptive_field(Kerple<float>(kernel, r1, r2, BiasForm::symmetric), 0,
                                              eps)};
      } else {
        continue;
      }
      for (const ReceptiveField& field : fields) {
        EXPECT_TRUE(field.additive);
        EXPECT_TRUE(contains(field.reason, "head ")) << field.reason;
        if (expected.is_null()) {
          EXPECT_FALSE(field.finite) << field.reason;
          EXPECT_TRUE(contains(field.reason, "diverges")) << field.reason;
          continue;
        }
        ASSERT_TRUE(field.finite) << rpe << " " << p.dump() << ": " << field.reason;
        EXPECT_EQ(field.tokens, expected.get<Index>()) << rpe << " " << p.dump() << " " << eps;
        ++checked;
      }
    }
  }
  EXPECT_EQ(checked, 10 * 4 * 2);
}

TEST(EncoderReceptiveField, AlibiAndKerpleHeadsMatchTheClosedForms) {
  const Alibi<float> alibi(8);
  for (Index h = 0; h < alibi.heads(); ++h) {
    for (const double eps : {0.5, 0.05, 1e-4}) {
      const ReceptiveField field = theoretical_receptive_field(alibi, h, eps);
      EXPECT_EQ(field.tokens, trf_alibi(alibi.slopes()[h], eps).tokens);
      EXPECT_TRUE(contains(field.reason, "head " + std::to_string(h) + " of ALiBi: geometric"))
          << field.reason;
      // The generic engine (opaque type, detected asymptote) agrees away from ties.
      EXPECT_EQ(theoretical_receptive_field(Opaque<Alibi<float>>{alibi}, h, eps).tokens,
                field.tokens);
    }
    EXPECT_TRUE(convergence(alibi, h).converges);
  }
  // Parameters are read after the reference's clamps (r2 = 0.001 acts as 0.01, r2 = 3 as 2).
  Vector<double> r1(3), r2(3);
  r1 << 2.0, 0.5, 1.5;
  r2 << 1.0, 0.5, 0.001;
  const Kerple<double> log(KerpleKernel::log, r1, r2);
  EXPECT_EQ(theoretical_receptive_field(log, 0, 0.1).tokens, trf_kerple_log(2.0, 1.0, 0.1).tokens);
  EXPECT_EQ(theoretical_receptive_field(log, 2, 0.1).tokens, trf_kerple_log(1.5, 0.01, 0.1).tokens);
  const ReceptiveField heavy = theoretical_receptive_field(log, 1, 0.1);  // r1 = 0.5 <= 1
  EXPECT_FALSE(heavy.finite);
  EXPECT_TRUE(contains(heavy.reason, "head 1 of KERPLE-log: p-series")) << heavy.reason;
  EXPECT_FALSE(convergence(log, 1).converges);
  EXPECT_TRUE(convergence(log, 1).determined);
  r2 << 1.0, 0.5, 3.0;
  const Kerple<double> power(KerpleKernel::power, r1, r2);
  for (Index h = 0; h < 3; ++h) {
    EXPECT_EQ(theoretical_receptive_field(power, h, 0.05).tokens,
              trf_kerple_power(power.r1()[h], power.r2()[h], 0.05).tokens);
  }
  EXPECT_EQ(power.r2()[2], 2.0);
}

TEST(EncoderReceptiveField, T5HasAConstantTail) {
  auto rng = test::make_rng(41);
  for (const bool bidirectional : {false, true}) {
    const T5BucketOptions options{
        .num_buckets = 32, .max_distance = 128, .bidirectional = bidirectional};
    const auto t5 = T5RelativeBias<double>::random(3, 1.0, rng, options);
    const Index last = bidirectional ? 15 : 31;
    Index from = 0;
    while (t5_bucket(-from, options) != last) ++from;
    for (Index h = 0; h < 3; ++h) {
      const ReceptiveField field = theoretical_receptive_field(t5, h, 0.1);
      EXPECT_FALSE(field.finite);
      EXPECT_TRUE(field.additive);
      EXPECT_TRUE(std::isinf(field.total_weight));
      EXPECT_TRUE(contains(field.reason, "head " + std::to_string(h) +
                                             " of T5: distances t >= " + std::to_string(from) +
                                             " share the last bucket " + std::to_string(last)))
          << field.reason;
      EXPECT_TRUE(contains(field.reason, "diverges")) << field.reason;
      const Convergence test = convergence(t5, h);
      EXPECT_FALSE(test.converges);
      EXPECT_TRUE(test.determined);
      // Within a finite window the field is finite and matches the definition.
      const auto b = [&](Index t) { return t5.bias(h, 500, 500 - t); };
      EXPECT_EQ(theoretical_receptive_field_at(t5, h, 0.1, 500).tokens,
                brute_force_trf(b, 500, 0.1));
    }
  }
}

TEST(EncoderReceptiveField, FireIsInfiniteInTheLimitAndFiniteAtAQueryPosition) {
  auto rng = test::make_rng(43);
  const auto fire = Fire<double>::random(4, 32, rng, {.threshold = 128.0});
  for (Index h = 0; h < fire.heads(); ++h) {
    const ReceptiveField limit = theoretical_receptive_field(fire, h, 0.05);
    EXPECT_FALSE(limit.finite);
    EXPECT_TRUE(limit.additive);
    EXPECT_TRUE(contains(limit.reason, "tends to the constant f(0) = ")) << limit.reason;
    EXPECT_FALSE(convergence(fire, h).converges);
    for (const Index i : {0, 1, 5, 127, 128, 1000, 5000}) {
      for (const double eps : {0.5, 0.05}) {
        const ReceptiveField at = theoretical_receptive_field_at(fire, h, eps, i);
        ASSERT_TRUE(at.finite) << at.reason;
        const auto b = [&](Index t) { return fire.bias(h, i, i - t); };
        EXPECT_EQ(at.tokens, brute_force_trf(b, i, eps)) << h << " " << i << " " << eps;
        // Bounded bias: K >= (1 − ε)(i + 1)·min w / max w, and K <= i + 1.
        double low = b(0), high = b(0);
        for (Index t = 0; t <= i; ++t) {
          low = std::min(low, b(t));
          high = std::max(high, b(t));
        }
        EXPECT_GE(static_cast<double>(at.tokens),
                  (1.0 - eps) * static_cast<double>(i + 1) * std::exp(low - high) - 1e-9);
        EXPECT_LE(at.tokens, i + 1);
        EXPECT_TRUE(contains(at.reason, "query at position " + std::to_string(i)));
      }
    }
  }
  // f(x) = −3x: b = −3·ψ(t)/ψ(max(i, L)) flattens as i grows, so the field grows with i.
  Matrix<double> w1(1, 1), w2(1, 1);
  w1 << 1.0;
  w2 << -3.0;
  const Fire<double> decreasing(w1, Vector<double>::Zero(1), w2, Vector<double>::Zero(1),
                                {.threshold = 64.0});
  EXPECT_TRUE(contains(theoretical_receptive_field(decreasing, 0, 0.1).reason, "f(0) = 0"));
  Index previous = 0;
  for (const Index i : {64, 256, 1024, 4096, 16384, 65536}) {
    const Index tokens = theoretical_receptive_field_at(decreasing, 0, 0.1, i).tokens;
    EXPECT_GT(tokens, previous) << i;
    previous = tokens;
  }
  EXPECT_GT(previous, 65536 / 4);
}

TEST(EncoderReceptiveField, AtAQueryPositionApproachesTheLimitForDistanceBiases) {
  const Alibi<double> alibi(Vector<double>::Constant(1, 0.0625));
  EXPECT_EQ(theoretical_receptive_field_at(alibi, 0, 0.1, 2000).tokens, 37);  // golden: 37
  EXPECT_EQ(theoretical_receptive_field_at(alibi, 0, 0.1, 10).tokens,
            brute_force_trf([](Index t) { return -0.0625 * static_cast<double>(t); }, 10, 0.1));
  // NoPE: uniform weights, K = ceil((1 − ε)(i + 1)), exact at ties.
  for (const Index i : {0, 9, 127, 999, 8191}) {
    for (const double eps : {0.5, 0.1, 0.05}) {
      const double share = (1.0 - eps) * static_cast<double>(i + 1);
      const auto expected = std::max<Index>(1, static_cast<Index>(std::ceil(share - 1e-9 * share)));
      const ReceptiveField field =
          theoretical_receptive_field_at(NoPositionalEncoding{}, 0, eps, i);
      EXPECT_EQ(field.tokens, expected) << i << " " << eps;
      EXPECT_DOUBLE_EQ(field.total_weight, static_cast<double>(i + 1));
    }
  }
  EXPECT_FALSE(convergence(NoPositionalEncoding{}, 0).converges);
  EXPECT_TRUE(contains(convergence(NoPositionalEncoding{}, 0).reason, "NoPE"));
}

TEST(EncoderReceptiveField, CompositionsSumTheSeries) {
  Vector<double> a(2), b(2);
  a << 0.25, 0.01;
  b << 0.05, 0.02;
  const auto alibis = compose(Alibi<double>(a), Alibi<double>(b));
  for (Index h = 0; h < 2; ++h) {
    for (const double eps : {0.3, 0.05, 0.01}) {
      const ReceptiveField field = theoretical_receptive_field(alibis, h, eps);
      ASSERT_TRUE(field.finite) << field.reason;
      EXPECT_EQ(field.tokens, trf_alibi(a[h] + b[h], eps).tokens) << h << " " << eps;
      EXPECT_TRUE(contains(field.reason, "a composition of biases")) << field.reason;
    }
  }
  // T5 + ALiBi converges (ALiBi dominates the tail); the window sum at a far position agrees.
  auto rng = test::make_rng(47);
  const auto t5 = T5RelativeBias<double>::random(2, 1.0, rng, {.bidirectional = false});
  const auto t5_alibi = compose(t5, Alibi<double>(b));
  EXPECT_FALSE(theoretical_receptive_field(t5, 0, 0.1).finite);
  for (Index h = 0; h < 2; ++h) {
    const ReceptiveField field = theoretical_receptive_field(t5_alibi, h, 0.05);
    ASSERT_TRUE(field.finite) << field.reason;
    const auto sum = [&](Index t) { return t5.bias(h, 0, -t) - b[h] * static_cast<double>(t); };
    EXPECT_EQ(field.tokens, brute_force_trf(sum, 8000, 0.05)) << h;
    EXPECT_TRUE(convergence(t5_alibi, h).converges);
  }
  // FIRE's limit is a constant: FIRE + ALiBi has ALiBi's field, FIRE + T5 none.
  const auto fire = Fire<double>::random(2, 8, rng);
  const auto fire_alibi = compose(fire, Alibi<double>(a));
  EXPECT_EQ(theoretical_receptive_field(fire_alibi, 1, 0.05).tokens, trf_alibi(a[1], 0.05).tokens);
  const ReceptiveField fire_t5 = theoretical_receptive_field(compose(fire, t5), 0, 0.05);
  EXPECT_FALSE(fire_t5.finite);
  EXPECT_TRUE(fire_t5.additive);
  EXPECT_TRUE(contains(fire_t5.reason, "constant")) << fire_t5.reason;
  // Two KERPLE-log heads with r1 = 0.6 each: the sum has exponent 1.2 > 1 and converges.
  const Vector<double> r1 = Vector<double>::Constant(1, 0.6);
  const Vector<double> r2 = Vector<double>::Constant(1, 1.0);
  const Kerple<double> kerple(KerpleKernel::log, r1, r2);
  EXPECT_FALSE(theoretical_receptive_field(kerple, 0, 0.1).finite);
  const auto both = compose(kerple, kerple);
  EXPECT_TRUE(convergence(both, 0).converges) << convergence(both, 0).reason;
  EXPECT_EQ(theoretical_receptive_field(both, 0, 0.1).tokens, trf_kerple_log(1.2, 1.0, 0.1).tokens);
  // Three parts nest; NoPE adds nothing.
  const auto three = compose(NoPositionalEncoding{}, Alibi<double>(a), Alibi<double>(b));
  EXPECT_EQ(theoretical_receptive_field(three, 0, 0.05).tokens, trf_alibi(0.3, 0.05).tokens);
  // The per-position field of a composition is the window sum of its total bias.
  const auto b0 = [&](Index t) { return alibis.bias(0, 300, 300 - t); };
  EXPECT_EQ(theoretical_receptive_field_at(alibis, 0, 0.05, 300).tokens,
            brute_force_trf(b0, 300, 0.05));
}

TEST(EncoderReceptiveField, NonAdditiveEncodersSaySo) {
  auto rng = test::make_rng(53);
  const RotaryEncoding<double> rope(16);
  const XPosEncoding<double> xpos(16);
  const auto shaw = ShawRelative<double>::random(4, 16, 16, ShawValues::separate, rng);
  const SineSpe<double> sine(SineSpeParameters<double>::initial(2, 16, 3, 5), 8, 7);
  const ConvSpe<double> conv(ConvSpeParameters<double>::initial(2, 16, 4, 5), 8, 7);
  const auto rope_alibi = compose(rope, Alibi<double>(2));
  const auto check = [](const ReceptiveField& field, const Convergence& test, const char* what,
                        const char* stage) {
    EXPECT_FALSE(field.additive) << what;
    EXPECT_FALSE(field.finite) << what;
    EXPECT_EQ(field.tokens, 0) << what;
    EXPECT_TRUE(std::isnan(field.total_weight)) << what;
    EXPECT_TRUE(contains(field.reason, "not an additive bias")) << what << ": " << field.reason;
    EXPECT_TRUE(contains(field.reason, stage)) << what << ": " << field.reason;
    EXPECT_FALSE(test.converges) << what;
    EXPECT_FALSE(test.determined) << what;
  };
  check(theoretical_receptive_field(rope, 0, 0.1), convergence(rope, 0), "RoPE", "transforms q");
  check(theoretical_receptive_field(xpos, 0, 0.1), convergence(xpos, 0), "XPos", "transforms q");
  check(theoretical_receptive_field(shaw, 0, 0.1), convergence(shaw, 0), "Shaw", "(Shaw)");
  check(theoretical_receptive_field(sine, 1, 0.1), convergence(sine, 1), "sineSPE", "SPE");
  check(theoretical_receptive_field(conv, 1, 0.1), convergence(conv, 1), "convSPE", "SPE");
  check(theoretical_receptive_field(rope_alibi, 0, 0.1), convergence(rope_alibi, 0), "RoPE + ALiBi",
        "composed.second()");
  check(theoretical_receptive_field_at(xpos, 0, 0.1, 100), convergence(xpos, 0), "XPos at", "q");
  // DAPE mixes logits and biases: no series, though its base bias has one.
  const auto kerple = Kerple<double>::random(KerpleKernel::log, 2, rng);
  const auto dape = Dape<double, Kerple<double>>::random(kerple, 8, rng);
  const auto dape2 = DapeV2<double, Kerple<double>>::random(kerple, 8, 3, rng);
  check(theoretical_receptive_field(dape, 1, 0.1), convergence(dape, 1), "DAPE", "(DAPE)");
  check(theoretical_receptive_field_at(dape2, 0, 0.1, 50), convergence(dape2, 0), "DAPE V2",
        "(DAPE)");
  EXPECT_EQ(theoretical_receptive_field(dape.base_bias(), 1, 0.1).tokens,
            theoretical_receptive_field(kerple, 1, 0.1).tokens);
  // The bias part of the composition on its own has a field.
  EXPECT_TRUE(theoretical_receptive_field(rope_alibi.second(), 0, 0.1).finite);
  POSENC_EXPECT_INVALID(theoretical_receptive_field(rope, 0, 1.5),
                        "posenc::theoretical_receptive_field", "eps");
}

TEST(EncoderReceptiveField, RejectsBadArguments) {
  auto rng = test::make_rng(59);
  const Alibi<double> alibi(4);
  POSENC_EXPECT_INVALID(theoretical_receptive_field(alibi, 4, 0.1),
                        "posenc::theoretical_receptive_field", "head 4", "4 heads");
  POSENC_EXPECT_INVALID(theoretical_receptive_field(alibi, -1, 0.1), "head -1");
  POSENC_EXPECT_INVALID(theoretical_receptive_field(alibi, 0, 0.0), "eps must lie in (0, 1)");
  POSENC_EXPECT_INVALID(convergence(alibi, 9), "posenc::convergence", "head 9");
  const auto kerple = Kerple<double>::random(KerpleKernel::log, 2, rng);
  POSENC_EXPECT_INVALID(theoretical_receptive_field(kerple, 2, 0.1), "head 2", "2 heads");
  const auto t5 = T5RelativeBias<double>::random(2, 1.0, rng);
  POSENC_EXPECT_INVALID(convergence(t5, 3), "head 3");
  const auto fire = Fire<double>::random(2, 4, rng);
  POSENC_EXPECT_INVALID(theoretical_receptive_field(fire, 5, 0.1), "head 5");
  POSENC_EXPECT_INVALID(theoretical_receptive_field_at(fire, 0, 0.1, -1),
                        "posenc::theoretical_receptive_field_at", "query_position", "got -1");
  POSENC_EXPECT_INVALID(theoretical_receptive_field_at(fire, 0, 0.1, Index{1} << 27), "2^26");
  POSENC_EXPECT_INVALID(theoretical_receptive_field_at(fire, 2, 0.1, 10), "head 2");
  POSENC_EXPECT_INVALID(theoretical_receptive_field(compose(alibi, alibi), 4, 0.1), "head 4");
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
  const SlopeBias bias{{0.5, 0.125, 0.0625}};
  const Index H = 3, N = 4, M = 1200, D = 4;
  Heads<double> q(H, N, D), k(H, M, D), v(H, M, D);
  k.flat().setRandom();
  v.flat().setRandom();
  const AttentionOptions options{.query_offset = M - N};
  const AttentionMap<double> weights = attention_weights(q, k, v, bias, options);
  for (const double eps : {0.5, 0.1, 0.01}) {
    const EmpiricalReceptiveField erf = empirical_receptive_field(weights, eps);
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
  const EmpiricalReceptiveField erf = empirical_receptive_field(weights, 0.1, {});
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
