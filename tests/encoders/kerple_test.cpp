// SPDX-License-Identifier: MIT
#include "posenc/encoders/kerple.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "encoders/bias_checks.hpp"
#include "posenc/encoders/alibi.hpp"
#include "support/golden.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

using test::iota;
using test::Json;
using test::tile_of;

/// Golden tolerance: kerple.json's values are float64 (checked against the authors' code to 1e-12
/// when made); float tiles are the double values rounded once (|bias| < 4, so 4 ulp of float covers
/// it).
template <class T>
double kerple_golden_tolerance() {
  return std::is_same_v<T, double> ? 1e-12 : 4.0 * std::numeric_limits<float>::epsilon();
}

template <class T>
class KerpleTest : public ::testing::Test {};
TYPED_TEST_SUITE(KerpleTest, test::Scalars);

TYPED_TEST(KerpleTest, MatchesTheAuthorsModules) {
  using T = TypeParam;
  const Json golden = test::load_golden("kerple.json");
  const Json& in = golden["inputs"];
  const Json& out = golden["outputs"];
  const Kerple<T> log_kernel(KerpleKernel::log,
                             test::to_vector(in["log"]["bias_p (r1, multiplier)"]),
                             test::to_vector(in["log"]["bias_a (r2, inside log)"]));
  const Kerple<T> power_kernel(KerpleKernel::power,
                               test::to_vector(in["power_ap_"]["bias_a (r1, multiplier)"]),
                               test::to_vector(in["power_ap_"]["bias_p (r2, exponent)"]));
  // kerple_power_original: ALiBi's slopes as r1, exponent 1 (its 1/256 slope clamps to 0.01).
  const Kerple<T> power_original(KerpleKernel::power, alibi_slopes(3), Vector<double>::Ones(3));
  const Heads<double> log_bias = test::to_heads(out["log_bias"]);
  const Heads<double> log_decode = test::to_heads(out["log_bias_decode_step(query=L-1)"]);
  const Heads<double> power_bias = test::to_heads(out["power_bias"]);
  const Heads<double> original_bias = test::to_heads(out["power_original_bias"]);
  const double tol = kerple_golden_tolerance<T>();
  for (Index h = 0; h < 3; ++h) {
    const auto log_tile = tile_of(log_kernel, h, iota(6, 0), iota(6, 0));
    ASSERT_TRUE(log_tile.allFinite());
    EXPECT_LE(test::relative_error(log_tile, log_bias.head(h)), tol) << "log, head " << h;
    EXPECT_LE(test::relative_error(tile_of(log_kernel, h, {5}, iota(6, 0)), log_decode.head(h)),
              tol)
        << "log decode row, head " << h;
    EXPECT_LE(
        test::relative_error(tile_of(power_kernel, h, iota(6, 0), iota(6, 0)), power_bias.head(h)),
        tol)
        << "power, head " << h;
    EXPECT_LE(test::relative_error(tile_of(power_original, h, iota(6, 0), iota(6, 0)),
                                   original_bias.head(h)),
              tol)
        << "power_original, head " << h;
    for (Index i = 0; i < 6; ++i) {
      for (Index j = 0; j < 6; ++j) {
        EXPECT_NEAR(log_kernel.bias(h, i, j), log_tile(i, j),
                    8 * std::numeric_limits<T>::epsilon());  // log1p vs vectorised log1p
      }
    }
  }
  // Parameters after the reference's in-place clamp.
  const Json& clamped = out["parameters_after_forward_clamp"];
  EXPECT_EQ(log_kernel.r1(), test::to_vector(clamped["log_bias_p"]));
  EXPECT_EQ(log_kernel.r2(), test::to_vector(clamped["log_bias_a"]));
  EXPECT_EQ(power_kernel.r1(), test::to_vector(clamped["power_bias_a"]));
  EXPECT_EQ(power_kernel.r2(), test::to_vector(clamped["power_bias_p"]));
}

TYPED_TEST(KerpleTest, AccurateNearAMillion) {
  using T = TypeParam;
  auto rng = test::make_rng(21);
  for (const KerpleKernel kernel : {KerpleKernel::log, KerpleKernel::power}) {
    for (const BiasForm form : {BiasForm::causal, BiasForm::symmetric}) {
      const auto kerple = Kerple<T>::random(kernel, 4, rng, form);
      const auto queries = iota(41, 1'000'000);
      const auto keys = iota(200, 999'900);
      for (Index h = 0; h < 4; ++h) {
        const auto tile = tile_of(kerple, h, queries, keys);
        ASSERT_TRUE(tile.allFinite());
        EXPECT_EQ(tile, tile_of(kerple, h, iota(41, 100), iota(200, 0)))
            << "the bias depends on i - j only";
        Matrix<double> exact(tile.rows(), tile.cols());
        for (Index r = 0; r < tile.rows(); ++r) {
          for (Index c = 0; c < tile.cols(); ++c) {
            const long double d = static_cast<long double>(queries[static_cast<std::size_t>(r)] -
                                                           keys[static_cast<std::size_t>(c)]);
            const long double delta = form == BiasForm::causal ? std::max(d, 0.0L) : std::abs(d);
            const long double r1 = kerple.r1()[h];
            const long double r2 = kerple.r2()[h];
            exact(r, c) =
                static_cast<double>(kernel == KerpleKernel::log ? -r1 * std::log1p(r2 * delta)
                                                                : -r1 * std::pow(delta, r2));
          }
        }
        EXPECT_LE(test::relative_error(tile, exact), test::Tolerance<T>::kernel);
      }
    }
  }
}

TEST(KerpleRandom, ReferenceDistributionsAndReproducible) {
  auto a = test::make_rng(31);
  auto b = test::make_rng(31);
  const auto log1 = Kerple<double>::random(KerpleKernel::log, 64, a);
  const auto log2 = Kerple<double>::random(KerpleKernel::log, 64, b);
  EXPECT_EQ(log1.r1(), log2.r1());
  EXPECT_EQ(log1.r2(), log2.r2());
  // log: r1 ~ 2·U[0,1), r2 ~ U[0,1) (then clamped to >= 0.01).
  EXPECT_GE(log1.r1().minCoeff(), 0.01);
  EXPECT_LT(log1.r1().maxCoeff(), 2.0);
  EXPECT_GT(log1.r1().maxCoeff(), 1.0);
  EXPECT_LT(log1.r2().maxCoeff(), 1.0);
  const auto power = Kerple<double>::random(KerpleKernel::power, 64, a);
  EXPECT_LT(power.r1().maxCoeff(), 1.0);
  EXPECT_GT(power.r2().maxCoeff(), 1.0);
  EXPECT_LE(power.r2().maxCoeff(), 2.0);
}

TYPED_TEST(KerpleTest, StreamingMatchesReference) {
  using T = TypeParam;
  auto rng = test::make_rng(41);
  const auto log_kernel = Kerple<T>::random(KerpleKernel::log, 3, rng);
  const auto power_kernel = Kerple<T>::random(KerpleKernel::power, 3, rng, BiasForm::symmetric);
  test::expect_streaming_matches_reference<T>(log_kernel, 3, 8, 5, 42, true);
  test::expect_streaming_matches_reference<T>(power_kernel, 3, 8, 5, 43, false);
  test::expect_decoding_matches_causal_pass<T>(log_kernel, 3, 8, 5, 44);
}

TEST(KerpleErrors, RejectBadParameters) {
  POSENC_EXPECT_INVALID(
      Kerple<float>(KerpleKernel::log, Vector<double>::Ones(3), Vector<double>::Ones(2)),
      "posenc::Kerple", "one entry per head, got 3 and 2");
  POSENC_EXPECT_INVALID(Kerple<float>(KerpleKernel::power, Vector<double>(), Vector<double>()),
                        "posenc::Kerple", "got 0 and 0");
  Vector<double> bad = Vector<double>::Ones(2);
  bad[0] = std::numeric_limits<double>::infinity();
  POSENC_EXPECT_INVALID(Kerple<float>(KerpleKernel::log, Vector<double>::Ones(2), bad),
                        "posenc::Kerple", "finite");
  auto rng = test::make_rng(51);
  POSENC_EXPECT_INVALID(Kerple<float>::random(KerpleKernel::log, 0, rng), "posenc::Kerple::random",
                        "heads must be >= 1, got 0");
}

// A non-finite parameter is named with its head and value.
TEST(KerpleErrors, NonFiniteParameterIsNamedWithHeadAndValue) {
  Vector<double> r1 = Vector<double>::Ones(3);
  Vector<double> r2 = Vector<double>::Ones(3);
  r2[1] = std::numeric_limits<double>::infinity();
  POSENC_EXPECT_INVALID(Kerple<float>(KerpleKernel::log, r1, r2),
                        "posenc::Kerple: parameters must be finite", "r2[1] = inf (head 1)");
  r2[1] = 1.0;
  r1[2] = std::numeric_limits<double>::quiet_NaN();
  POSENC_EXPECT_INVALID(Kerple<double>(KerpleKernel::power, r1, r2),
                        "posenc::Kerple:", "r1[2] = nan (head 2)");
}

}  // namespace
}  // namespace posenc
