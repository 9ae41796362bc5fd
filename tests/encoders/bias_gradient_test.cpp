// SPDX-License-Identifier: MIT
// The encoder-side backward of the score-bias stage (accumulate_bias_gradient of KERPLE, T5 and
// FIRE): against central differences of the encoders' own add_bias, and its conventions at the
// kinks. Torch autograd (golden grad_*.json) is checked through the kernel in
// tests/attention_backward_test.cpp.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "posenc/encoders/fire.hpp"
#include "posenc/encoders/kerple.hpp"
#include "posenc/encoders/t5_bias.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

using FlatParams = std::vector<double>;

/// The positions of one tile and ∂L/∂B for every head (the dbias a backward kernel hands over).
struct GradientProblem {
  std::string name;
  std::vector<Index> queries;
  std::vector<Index> keys;
  std::vector<Matrix<double>> dbias;  // [heads] of queries × keys
};

/// Tile shapes: 1×1, odd, the kernel's 128×128, and past the distance chunk (256) both ways.
const std::vector<std::pair<Index, Index>>& gradient_tile_shapes() {
  static const std::vector<std::pair<Index, Index>> shapes = {{1, 1},     {7, 13},  {13, 5},
                                                              {128, 128}, {261, 3}, {2, 300}};
  return shapes;
}

/// Positions of kind 0: consecutive (negative offsets possible); 1: consecutive keys, shuffled
/// queries; 2: scattered and unsorted both; 3: queries near 10^6, keys about 1000 before them.
void gradient_positions(int kind, Index rows, Index cols, std::mt19937_64& rng,
                        std::vector<Index>& queries, std::vector<Index>& keys) {
  std::uniform_int_distribution<Index> offset(-40, 60);
  queries = test::iota(rows, offset(rng));
  keys = test::iota(cols, offset(rng));
  if (kind == 1) std::shuffle(queries.begin(), queries.end(), rng);
  if (kind == 2) {
    std::uniform_int_distribution<Index> anywhere(-50, 400);
    for (Index& q : queries) q = anywhere(rng);
    for (Index& k : keys) k = anywhere(rng);
  }
  if (kind == 3) {
    queries = test::iota(rows, 1'000'000);
    keys = test::iota(cols, 999'000);
  }
}

/// N(0, 1) entries with about a fifth of them zero (masked).
Matrix<double> random_dbias(Index rows, Index cols, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> u;
  Matrix<double> d(rows, cols);
  for (Index i = 0; i < d.size(); ++i) d.data()[i] = u(rng) < 0.2 ? 0.0 : normal(rng);
  return d;
}

/// Every tile shape × position kind with random dbias.
std::vector<GradientProblem> gradient_problems(Index heads, std::uint64_t salt) {
  auto rng = test::make_rng(salt);
  std::vector<GradientProblem> problems;
  for (const auto& [rows, cols] : gradient_tile_shapes()) {
    for (int kind = 0; kind < 4; ++kind) {
      GradientProblem p;
      p.name =
          std::to_string(rows) + "x" + std::to_string(cols) + " positions " + std::to_string(kind);
      gradient_positions(kind, rows, cols, rng, p.queries, p.keys);
      for (Index h = 0; h < heads; ++h) p.dbias.push_back(random_dbias(rows, cols, rng));
      problems.push_back(std::move(p));
    }
  }
  return problems;
}

/// Σ_{r,c} dbias_h(r, c)·B_h(q[r], k[c]) per head h, from the encoder's own add_bias; with
/// `magnitude`, Σ |dbias_h·B_h| instead (the scale of the rounding of those sums).
template <class E>
std::vector<double> weighted_bias_sum(const E& encoder, const GradientProblem& p,
                                      bool magnitude = false) {
  std::vector<double> per_head;
  for (Index h = 0; h < static_cast<Index>(p.dbias.size()); ++h) {
    const auto& d = p.dbias[static_cast<std::size_t>(h)];
    Matrix<double> tile = Matrix<double>::Zero(d.rows(), d.cols());
    encoder.add_bias(h, p.queries, p.keys, tile);
    per_head.push_back(magnitude ? (tile.array() * d.array()).abs().sum()
                                 : (tile.array() * d.array()).sum());
  }
  return per_head;
}

/// (Σ_h a_h − b_h) / step, differenced per head (a head the parameter does not reach gives 0).
double per_head_difference(const std::vector<double>& a, const std::vector<double>& b,
                           double step) {
  double total = 0.0;
  for (std::size_t h = 0; h < a.size(); ++h) total += (a[h] - b[h]) / step;
  return total;
}

/// accumulate_bias_gradient over every head of the problem.
template <class E>
typename E::Gradient bias_gradient_of(const E& encoder, const GradientProblem& p) {
  auto g = encoder.zero_gradient();
  for (Index h = 0; h < static_cast<Index>(p.dbias.size()); ++h) {
    encoder.accumulate_bias_gradient(h, p.queries, p.keys, p.dbias[static_cast<std::size_t>(h)], g);
  }
  return g;
}

/// Central differences of weighted_bias_sum in every parameter (step 1e-5·max(|θ|, 0.1): truncation
/// below 1e-8 relative here), and a bound on their rounding (32ε·Σ|dbias·B| / 2·step).
struct BiasDifferences {
  FlatParams value;
  FlatParams rounding;
};
template <class Build>
BiasDifferences bias_central_differences(const Build& build, const FlatParams& theta,
                                         const GradientProblem& p) {
  BiasDifferences fd{FlatParams(theta.size()), FlatParams(theta.size())};
  const auto magnitudes = weighted_bias_sum(build(theta), p, true);
  const double magnitude = std::accumulate(magnitudes.begin(), magnitudes.end(), 0.0);
  for (std::size_t n = 0; n < theta.size(); ++n) {
    const double step = 1e-5 * std::max(std::abs(theta[n]), 0.1);
    FlatParams plus = theta;
    FlatParams minus = theta;
    plus[n] += step;
    minus[n] -= step;
    const double width = plus[n] - minus[n];
    fd.value[n] = per_head_difference(weighted_bias_sum(build(plus), p),
                                      weighted_bias_sum(build(minus), p), width);
    fd.rounding[n] = 32.0 * std::numeric_limits<double>::epsilon() * magnitude / width;
  }
  return fd;
}

/// |analytic − fd| <= 1e-7·(|fd| + 0.01·Σ|dbias|) + the rounding bound, per parameter.
void expect_matches_differences(const FlatParams& analytic, const BiasDifferences& fd,
                                const GradientProblem& p, const std::string& what) {
  ASSERT_EQ(analytic.size(), fd.value.size());
  double l1 = 0.0;
  for (const auto& d : p.dbias) l1 += d.cwiseAbs().sum();
  for (std::size_t n = 0; n < analytic.size(); ++n) {
    EXPECT_NEAR(analytic[n], fd.value[n],
                1e-7 * (std::abs(fd.value[n]) + 0.01 * l1) + fd.rounding[n])
        << what << ", " << p.name << ", parameter " << n;
  }
}

/// Appends the entries of each argument (row-major) to a flat parameter list.
template <class... Parts>
FlatParams flat_params(const Parts&... parts) {
  FlatParams out;
  const auto append = [&out](const auto& part) {
    if constexpr (std::is_arithmetic_v<std::decay_t<decltype(part)>>) {
      out.push_back(part);
    } else {
      const Matrix<double> m = part;
      out.insert(out.end(), m.data(), m.data() + m.size());
    }
  };
  (append(parts), ...);
  return out;
}

// ---------------------------------------------------------------------------------------------
// KERPLE
// ---------------------------------------------------------------------------------------------

Kerple<double> kerple_from(KerpleKernel kernel, BiasForm form, const FlatParams& theta) {
  const auto heads = static_cast<Index>(theta.size() / 2);
  return Kerple<double>(kernel, Eigen::Map<const Vector<double>>(theta.data(), heads),
                        Eigen::Map<const Vector<double>>(theta.data() + heads, heads), form);
}

/// Raw parameters for 3 heads: inside the clamp ranges, or with r1[0] below 0.01, r1[1] negative
/// and r2[2] below 0.01 (log) / above 2 (power).
FlatParams kerple_parameters(KerpleKernel kernel, bool clamped, std::mt19937_64& rng) {
  std::uniform_real_distribution<double> u(0.0, 1.0);
  FlatParams theta(6);
  for (int h = 0; h < 3; ++h) {
    theta[h] = kernel == KerpleKernel::log ? 0.1 + 1.9 * u(rng) : 0.1 + 0.9 * u(rng);
    theta[3 + h] = kernel == KerpleKernel::log ? 0.1 + 0.9 * u(rng) : 0.2 + 1.7 * u(rng);
  }
  if (clamped) {
    theta[0] = 0.004;
    theta[1] = -0.5;
    theta[5] = kernel == KerpleKernel::log ? 0.006 : 2.3;
  }
  return theta;
}

TEST(KerpleGradient, MatchesCentralDifferencesOfAddBias) {
  auto rng = test::make_rng(1501);
  const auto problems = gradient_problems(3, 1502);
  for (const KerpleKernel kernel : {KerpleKernel::log, KerpleKernel::power}) {
    for (const BiasForm form : {BiasForm::causal, BiasForm::symmetric}) {
      for (const bool clamped : {false, true}) {
        const FlatParams theta = kerple_parameters(kernel, clamped, rng);
        const auto build = [&](const FlatParams& t) { return kerple_from(kernel, form, t); };
        const auto kerple = build(theta);
        const std::string what = std::string(kernel == KerpleKernel::log ? "log" : "power") +
                                 (form == BiasForm::causal ? " causal" : " symmetric") +
                                 (clamped ? " clamped" : "");
        for (const auto& p : problems) {
          const auto g = bias_gradient_of(kerple, p);
          const FlatParams analytic = flat_params(g.r1, g.r2);
          const BiasDifferences fd = bias_central_differences(build, theta, p);
          expect_matches_differences(analytic, fd, p, what);
          if (clamped) {  // clamped raw values: the bias does not move, the gradient is exactly 0
            for (const std::size_t n : {std::size_t{0}, std::size_t{1}, std::size_t{5}}) {
              EXPECT_EQ(analytic[n], 0.0) << what << ", " << p.name << ", parameter " << n;
              EXPECT_EQ(fd.value[n], 0.0) << what << ", " << p.name << ", parameter " << n;
            }
          }
        }
      }
    }
  }
}

TEST(KerpleGradient, ClampBoundsPassTheGradientLikeTorch) {
  // torch.clamp's backward passes the gradient at the bounds themselves (min <= x <= max): there
  // the gradient is the one-sided derivative from inside the range (second-order difference).
  const auto problems = gradient_problems(1, 1504);
  for (const KerpleKernel kernel : {KerpleKernel::log, KerpleKernel::power}) {
    const double r2 = kernel == KerpleKernel::power ? Kerple<double>::maximum_exponent : 0.5;
    const FlatParams theta = {Kerple<double>::minimum_parameter, r2};
    const auto build = [&](const FlatParams& t) {
      return kerple_from(kernel, BiasForm::symmetric, t);
    };
    // (−3 S(θ) + 4 S(θ + h) − S(θ + 2h)) / 2h in parameter n, h of either sign.
    const auto one_sided = [&](const GradientProblem& p, std::size_t n, double h) {
      FlatParams near = theta;
      FlatParams far = theta;
      near[n] += h;
      far[n] += 2.0 * h;
      const double s0 = weighted_bias_sum(build(theta), p)[0];
      return (-3.0 * s0 + 4.0 * weighted_bias_sum(build(near), p)[0] -
              weighted_bias_sum(build(far), p)[0]) /
             (2.0 * h);
    };
    for (const auto& p : problems) {
      const auto g = bias_gradient_of(build(theta), p);
      const double d_r1 = one_sided(p, 0, 1e-5 * theta[0]);
      EXPECT_NEAR(g.r1[0], d_r1, 1e-6 * (std::abs(d_r1) + 1.0)) << p.name;
      if (p.dbias[0].size() > 100) {
        EXPECT_NE(g.r1[0], 0.0) << p.name;  // not clamped away
      }
      if (kernel == KerpleKernel::power) {
        const double d_r2 = one_sided(p, 1, -1e-5 * theta[1]);
        EXPECT_NEAR(g.r2[0], d_r2, 1e-6 * (std::abs(d_r2) + 1.0)) << p.name;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// T5
// ---------------------------------------------------------------------------------------------

TEST(T5Gradient, MatchesCentralDifferencesOfAddBias) {
  auto rng = test::make_rng(1511);
  const auto problems = gradient_problems(2, 1512);
  for (const bool bidirectional : {true, false}) {
    const T5BucketOptions options{16, 40, bidirectional};
    const auto t5 = T5RelativeBias<double>::random(2, 1.0, rng, options);
    const Matrix<double> table = t5.table();
    const FlatParams theta(table.data(), table.data() + table.size());
    const auto build = [&](const FlatParams& t) {
      return T5RelativeBias<double>(Eigen::Map<const Matrix<double>>(t.data(), 16, 2), options);
    };
    for (const auto& p : problems) {
      const auto g = bias_gradient_of(t5, p);
      const FlatParams analytic = flat_params(g.table);
      expect_matches_differences(analytic, bias_central_differences(build, theta, p), p,
                                 bidirectional ? "bidirectional" : "causal");
      // Each entry of dbias lands in exactly one bucket of its head.
      for (Index h = 0; h < 2; ++h) {
        EXPECT_NEAR(g.table.col(h).sum(), p.dbias[static_cast<std::size_t>(h)].sum(),
                    1e-12 * (1.0 + p.dbias[static_cast<std::size_t>(h)].cwiseAbs().sum()))
            << p.name;
      }
    }
  }
}

TEST(T5Gradient, FloatTableGradientIsTheDoubleOneRounded) {
  auto rng = test::make_rng(1513);
  const auto problems = gradient_problems(2, 1514);
  const auto t5 = T5RelativeBias<double>::random(2, 1.0, rng);
  const T5RelativeBias<float> t5f(t5.table().cast<float>(), t5.options());
  for (const auto& p : problems) {
    const auto g = bias_gradient_of(t5, p);
    auto gf = t5f.zero_gradient();
    for (Index h = 0; h < 2; ++h) {
      const Matrix<float> d = p.dbias[static_cast<std::size_t>(h)].cast<float>();
      t5f.accumulate_bias_gradient(h, p.queries, p.keys, d, gf);
    }
    static_assert(std::is_same_v<decltype(gf.table), Matrix<float>>);
    EXPECT_LE(test::relative_error(gf.table, g.table), 1e-5) << p.name;
  }
}

// ---------------------------------------------------------------------------------------------
// FIRE
// ---------------------------------------------------------------------------------------------

constexpr Index fire_width = 8;
constexpr Index fire_heads = 2;

/// θ = [w1 (W), b1 (W), w2 (heads·W, row-major), b2 (heads), c, threshold_multiplier].
Fire<double> fire_from_params(const FlatParams& t, FireOptions options) {
  constexpr Index w = fire_width;
  constexpr Index h = fire_heads;
  options.c = t[2 * w + h * w + h];
  options.threshold_multiplier = t[2 * w + h * w + h + 1];
  return Fire<double>(Eigen::Map<const Matrix<double>>(t.data(), w, 1),
                      Eigen::Map<const Vector<double>>(t.data() + w, w),
                      Eigen::Map<const Matrix<double>>(t.data() + 2 * w, h, w),
                      Eigen::Map<const Vector<double>>(t.data() + 2 * w + h * w, h), options);
}

FlatParams fire_parameters(const Fire<double>& fire) {
  return flat_params(fire.w1(), fire.b1(), fire.w2(), fire.b2(), fire.options().c,
                     fire.options().threshold_multiplier);
}

template <class Gradient>
FlatParams fire_gradient(const Gradient& g) {
  return flat_params(g.w1, g.b1, g.w2, g.b2, g.c, g.threshold_multiplier);
}

/// The problem with dbias zeroed where a hidden unit sits within 1e-4 of its kink
/// (|W1_w·x + b1_w| < 1e-4): central differences are then free of relu kinks.
GradientProblem away_from_kinks(const Fire<double>& fire, GradientProblem p) {
  for (auto& d : p.dbias) {
    for (Index r = 0; r < d.rows(); ++r) {
      for (Index c = 0; c < d.cols(); ++c) {
        const double x = fire.normalized_distance(p.queries[static_cast<std::size_t>(r)],
                                                  p.keys[static_cast<std::size_t>(c)]);
        const double z = (fire.w1().col(0).array() * x + fire.b1().array()).abs().minCoeff();
        if (z < 1e-4) d(r, c) = 0.0;
      }
    }
  }
  return p;
}

/// The chain rule element by element with torch's conventions: act'(z) = [z > 0] (relu) or
/// slope for z <= 0 (leaky), ∂max(i, L)/∂L = 1, 1/2, 0 for i <, =, > L, |·|' = sign.
Fire<double>::Gradient naive_fire_gradient(const Fire<double>& fire, const GradientProblem& p) {
  const FireOptions& o = fire.options();
  const double negative = o.activation == FireActivation::relu ? 0.0 : o.negative_slope;
  const auto sign = [](double v) { return v > 0.0 ? 1.0 : v < 0.0 ? -1.0 : 0.0; };
  const double c = o.c;
  const double L = std::abs(o.threshold_multiplier * o.threshold);
  auto g = fire.zero_gradient();
  for (Index h = 0; h < fire.heads(); ++h) {
    const auto& d = p.dbias[static_cast<std::size_t>(h)];
    for (Index r = 0; r < d.rows(); ++r) {
      const Index i = p.queries[static_cast<std::size_t>(r)];
      const double m = std::max(static_cast<double>(i), L);
      const double den = std::log(std::abs(c * m) + 1.0) + o.eps;
      const double dm_dL = L > static_cast<double>(i)    ? 1.0
                           : L == static_cast<double>(i) ? 0.5
                                                         : 0.0;
      for (Index col = 0; col < d.cols(); ++col) {
        const double dd = d(r, col);
        const auto delta = static_cast<double>(
            detail::form_distance(o.form, i - p.keys[static_cast<std::size_t>(col)]));
        const double x = std::log(std::abs(c * delta) + 1.0) / den;
        double slope = 0.0;
        for (Index w = 0; w < fire.mlp_width(); ++w) {
          const double z = fire.w1()(w, 0) * x + fire.b1()[w];
          const double da = z > 0.0 ? 1.0 : negative;
          g.w2(h, w) += dd * (z > 0.0 ? z : negative * z);
          g.b1[w] += dd * fire.w2()(h, w) * da;
          g.w1(w, 0) += dd * fire.w2()(h, w) * da * x;
          slope += fire.w2()(h, w) * da * fire.w1()(w, 0);
        }
        g.b2[h] += dd;
        const double psi_c = [&](double u) {
          return sign(c * u) * u / (std::abs(c * u) + 1.0);
        }(delta);
        const double psi_cm = sign(c * m) * m / (std::abs(c * m) + 1.0);
        const double psi_m = sign(c * m) * c / (std::abs(c * m) + 1.0);
        g.c += dd * slope * (psi_c - x * psi_cm) / den;
        g.threshold_multiplier += dd * slope * (-x / den * psi_m * dm_dL) *
                                  sign(o.threshold_multiplier * o.threshold) * o.threshold;
      }
    }
  }
  return g;
}

/// The FIRE configurations: threshold L inside the query range (41.03), inside with a negative
/// multiplier (45.27) and below every query (2.96, c < 0), × activation × form.
std::vector<std::pair<std::string, FireOptions>> fire_configurations() {
  std::vector<std::pair<std::string, FireOptions>> out;
  const struct {
    double c, threshold, multiplier;
  } thresholds[] = {{0.1, 37.3, 1.1}, {0.5, 50.3, -0.9}, {-0.3, 3.7, 0.8}};
  for (const auto activation : {FireActivation::relu, FireActivation::leaky_relu}) {
    for (const auto form : {BiasForm::symmetric, BiasForm::causal}) {
      for (const auto& t : thresholds) {
        FireOptions o;
        o.c = t.c;
        o.threshold = t.threshold;
        o.threshold_multiplier = t.multiplier;
        o.activation = activation;
        o.form = form;
        out.emplace_back(std::string(activation == FireActivation::relu ? "relu" : "leaky") +
                             (form == BiasForm::causal ? " causal" : " symmetric") + " L " +
                             std::to_string(std::abs(t.threshold * t.multiplier)),
                         o);
      }
    }
  }
  return out;
}

TEST(FireGradient, MatchesCentralDifferencesOfAddBias) {
  auto rng = test::make_rng(1521);
  const auto problems = gradient_problems(fire_heads, 1522);
  for (const auto& [what, options] : fire_configurations()) {
    const auto fire = Fire<double>::random(fire_heads, fire_width, rng, options);
    const FlatParams theta = fire_parameters(fire);
    const auto build = [&options = options](const FlatParams& t) {
      return fire_from_params(t, options);
    };
    for (const auto& problem : problems) {
      const GradientProblem p = away_from_kinks(fire, problem);
      const FlatParams analytic = fire_gradient(bias_gradient_of(fire, p));
      expect_matches_differences(analytic, bias_central_differences(build, theta, p), p, what);
    }
  }
}

TEST(FireGradient, MatchesTheChainRuleElementByElement) {
  // Includes c = 0 (every x = 0, ∂/∂c = 0 as torch's |·|' = sign) and hidden units with b1 = 0,
  // which make x = 0 (δ = 0) an exact kink: torch's relu'(0) = 0, leaky_relu'(0) = slope.
  auto rng = test::make_rng(1523);
  const auto problems = gradient_problems(fire_heads, 1524);
  auto configurations = fire_configurations();
  FireOptions zero_c;
  zero_c.c = 0.0;
  zero_c.threshold = 20.0;
  zero_c.threshold_multiplier = 1.5;
  configurations.emplace_back("c = 0", zero_c);
  for (const auto& [what, options] : configurations) {
    for (const bool zero_biases : {false, true}) {
      auto fire = Fire<double>::random(fire_heads, fire_width, rng, options);
      if (zero_biases) {
        Vector<double> b1 = fire.b1();
        Matrix<double> w1 = fire.w1();
        b1[0] = 0.0;
        b1[1] = 0.0;
        w1(0, 0) = 0.7;
        w1(1, 0) = -0.4;
        b1[2] = 0.0;
        w1(2, 0) = 0.0;
        fire = Fire<double>(w1, b1, fire.w2(), fire.b2(), options);
      }
      for (const auto& p : problems) {
        const FlatParams fast = fire_gradient(bias_gradient_of(fire, p));
        const FlatParams naive = fire_gradient(naive_fire_gradient(fire, p));
        double scale = 1.0;
        for (const auto& d : p.dbias) scale += d.cwiseAbs().sum();
        for (std::size_t n = 0; n < naive.size(); ++n) {
          EXPECT_NEAR(fast[n], naive[n], 1e-12 * scale)
              << what << (zero_biases ? ", b1 = 0 units" : "") << ", " << p.name << ", parameter "
              << n;
        }
      }
    }
  }
}

TEST(FireGradient, WideMlpMatchesTheChainRule) {
  // 300 hidden units: more pieces than the backward keeps per tile, so it adds them run by run.
  auto rng = test::make_rng(1528);
  const auto problems = gradient_problems(fire_heads, 1529);
  FireOptions options;
  options.threshold = 45.5;
  options.activation = FireActivation::leaky_relu;
  const auto fire = Fire<double>::random(fire_heads, 300, rng, options);
  for (const auto& p : problems) {
    const FlatParams fast = fire_gradient(bias_gradient_of(fire, p));
    const FlatParams naive = fire_gradient(naive_fire_gradient(fire, p));
    double scale = 1.0;
    for (const auto& d : p.dbias) scale += d.cwiseAbs().sum();
    for (std::size_t n = 0; n < naive.size(); ++n) {
      EXPECT_NEAR(fast[n], naive[n], 1e-12 * scale) << p.name << ", parameter " << n;
    }
  }
}

TEST(FireGradient, ThresholdTieSplitsLikeTorchMaximum) {
  // L = 40 exactly and a query at 40: ∂max(i, L)/∂L = 1/2 there (torch.maximum), the mean of the
  // one-sided derivatives, which the central difference in the multiplier also measures.
  auto rng = test::make_rng(1525);
  for (const auto form : {BiasForm::symmetric, BiasForm::causal}) {
    FireOptions options;
    options.threshold = 40.0;
    options.threshold_multiplier = 1.0;
    options.form = form;
    const auto fire = Fire<double>::random(fire_heads, fire_width, rng, options);
    GradientProblem p;
    p.name = "queries 10..59";
    p.queries = test::iota(50, 10);
    p.keys = test::iota(64, 0);
    for (Index h = 0; h < fire_heads; ++h) p.dbias.push_back(Matrix<double>::Zero(50, 64));
    p.dbias[0].row(30) = random_dbias(1, 64, rng);  // the query at 40 only
    p = away_from_kinks(fire, p);
    const auto g = bias_gradient_of(fire, p);
    EXPECT_NE(g.threshold_multiplier, 0.0);
    EXPECT_NEAR(g.threshold_multiplier, naive_fire_gradient(fire, p).threshold_multiplier,
                1e-12 * (1.0 + std::abs(g.threshold_multiplier)));
    FlatParams plus = fire_parameters(fire);
    FlatParams minus = plus;
    plus.back() += 1e-7;
    minus.back() -= 1e-7;
    const double fd =
        per_head_difference(weighted_bias_sum(fire_from_params(plus, options), p),
                            weighted_bias_sum(fire_from_params(minus, options), p), 2e-7);
    EXPECT_NEAR(g.threshold_multiplier, fd, 1e-5 * std::abs(fd));
  }
}

TEST(FireGradient, Float32DistanceIsStraightThrough) {
  // The backward treats the forward's float32 rounding as the identity: the same gradient as
  // the float64 encoder's.
  auto rng = test::make_rng(1526);
  const auto problems = gradient_problems(fire_heads, 1527);
  FireOptions dape = FireOptions::dape(128);
  dape.threshold_multiplier = 1.3;
  FireOptions exact = dape;
  exact.float32_distance = false;
  const auto fire32 = Fire<double>::random(fire_heads, fire_width, rng, dape);
  const Fire<double> fire64(fire32.w1(), fire32.b1(), fire32.w2(), fire32.b2(), exact);
  for (const auto& p : problems) {
    EXPECT_EQ(fire_gradient(bias_gradient_of(fire32, p)),
              fire_gradient(bias_gradient_of(fire64, p)))
        << p.name;
  }
}

// ---------------------------------------------------------------------------------------------
// Every encoder: the Gradient type and float tiles.
// ---------------------------------------------------------------------------------------------

TEST(BiasGradientMechanics, ZeroGradientShapesSumAndRepeat) {
  auto rng = test::make_rng(1531);
  const auto problems = gradient_problems(3, 1532);
  const auto kerple = Kerple<double>::random(KerpleKernel::log, 3, rng);
  const auto t5 = T5RelativeBias<double>::random(3, 1.0, rng);
  const auto fire = Fire<double>::random(3, 5, rng);
  const auto k0 = kerple.zero_gradient();
  EXPECT_EQ(k0.r1, Vector<double>::Zero(3));
  EXPECT_EQ(k0.r2, Vector<double>::Zero(3));
  const auto t0 = t5.zero_gradient();
  EXPECT_EQ(t0.table, Matrix<double>::Zero(32, 3));
  const auto f0 = fire.zero_gradient();
  EXPECT_EQ(f0.w1, Matrix<double>::Zero(5, 1));
  EXPECT_EQ(f0.b1, Vector<double>::Zero(5));
  EXPECT_EQ(f0.w2, Matrix<double>::Zero(3, 5));
  EXPECT_EQ(f0.b2, Vector<double>::Zero(3));
  EXPECT_EQ(f0.c, 0.0);
  EXPECT_EQ(f0.threshold_multiplier, 0.0);
  const auto twice = [](const auto& encoder, const GradientProblem& p) {
    auto g = bias_gradient_of(encoder, p);
    for (Index h = 0; h < 3; ++h) {
      encoder.accumulate_bias_gradient(h, p.queries, p.keys, p.dbias[static_cast<std::size_t>(h)],
                                       g);
    }
    return g;
  };
  const auto expect_doubled = [](const FlatParams& once, const FlatParams& two,
                                 const FlatParams& summed, const std::string& what) {
    for (std::size_t n = 0; n < once.size(); ++n) {
      EXPECT_NEAR(two[n], 2.0 * once[n], 1e-13 * (1.0 + std::abs(once[n]))) << what << " " << n;
      EXPECT_EQ(summed[n], once[n] + once[n]) << what << " " << n;
    }
  };
  for (const auto& p : problems) {
    const auto gk = bias_gradient_of(kerple, p);
    auto sk = gk;
    sk += gk;
    expect_doubled(flat_params(gk.r1, gk.r2), flat_params(twice(kerple, p).r1, twice(kerple, p).r2),
                   flat_params(sk.r1, sk.r2), "kerple " + p.name);
    const auto gt = bias_gradient_of(t5, p);
    auto st = gt;
    st += gt;
    expect_doubled(flat_params(gt.table), flat_params(twice(t5, p).table), flat_params(st.table),
                   "t5 " + p.name);
    const auto gf = bias_gradient_of(fire, p);
    auto sf = gf;
    sf += gf;
    expect_doubled(fire_gradient(gf), fire_gradient(twice(fire, p)), fire_gradient(sf),
                   "fire " + p.name);
  }
}

TEST(BiasGradientMechanics, FloatTilesAccumulateInDouble) {
  // Float encoders read a float dbias and accumulate in double: the gradient of the double
  // encoder for the same (float-representable) dbias, bit for bit.
  auto rng = test::make_rng(1533);
  auto problems = gradient_problems(3, 1534);
  for (auto& p : problems) {
    for (auto& d : p.dbias) d = d.cast<float>().cast<double>();
  }
  const auto kerple = Kerple<double>::random(KerpleKernel::power, 3, rng, BiasForm::symmetric);
  const Kerple<float> kerple_f(kerple.kernel(), kerple.raw_r1(), kerple.raw_r2(), kerple.form());
  FireOptions options;
  options.threshold = 30.5;
  const auto fire = Fire<double>::random(3, 6, rng, options);
  const Fire<float> fire_f(fire.w1(), fire.b1(), fire.w2(), fire.b2(), options);
  for (const auto& p : problems) {
    auto gk = kerple_f.zero_gradient();
    auto gf = fire_f.zero_gradient();
    for (Index h = 0; h < 3; ++h) {
      const Matrix<float> d = p.dbias[static_cast<std::size_t>(h)].cast<float>();
      kerple_f.accumulate_bias_gradient(h, p.queries, p.keys, d, gk);
      fire_f.accumulate_bias_gradient(h, p.queries, p.keys, d, gf);
    }
    const auto want_k = bias_gradient_of(kerple, p);
    EXPECT_EQ(flat_params(gk.r1, gk.r2), flat_params(want_k.r1, want_k.r2)) << p.name;
    EXPECT_EQ(fire_gradient(gf), fire_gradient(bias_gradient_of(fire, p))) << p.name;
  }
}

// The golden gradients (tests/data/grad_kerple.json, grad_t5.json, grad_fire.json) are checked
// end to end, through attention_backward and its reference, in tests/attention_backward_test.cpp.

}  // namespace
}  // namespace posenc
