// SPDX-License-Identifier: MIT
#include "posenc/encoders/fire.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "encoders/bias_checks.hpp"
#include "support/golden.hpp"
#include "support/test_support.hpp"
#include "support/tolerance.hpp"

namespace posenc {
namespace {

using test::iota;
using test::Json;
using test::tile_of;

template <class T>
Fire<T> fire_from(const Json& mlp, const FireOptions& options) {
  return Fire<T>(
      test::to_matrix(mlp["layer1.weight[out][in]"]), test::to_vector(mlp["layer1.bias"]),
      test::to_matrix(mlp["layer2.weight[out][in]"]), test::to_vector(mlp["layer2.bias"]), options);
}

template <class T>
class FireTest : public ::testing::Test {};
TYPED_TEST_SUITE(FireTest, test::Scalars);

TYPED_TEST(FireTest, MatchesTheFireListing) {
  // fire.json: float64 values at 1e-12 (the tolerance the golden was checked at when made); the
  // float32 run of the reference against our float tiles (formed in double, rounded once) at γ_n
  // relative to max(1, max |B|) (support/tolerance.hpp), n counting the float32 roundings of the
  // reference: ψ(δ) = log(|c·δ| + 1) 4 (×, +, log 2), the normaliser ψ(max(i, |m·L0|)) + eps 6
  // (×, ×, +, log 2, +), ÷ 1, layer 1 2 (×, +), layer 2 W + 1 (W products summed with b2; W the
  // MLP width), and our own rounding of the double value 1.
  using T = TypeParam;
  const Json golden = test::load_golden("fire.json");
  for (const Json& c : golden["inputs"]["cases"]) {
    const std::string key = c["key"].get<std::string>();
    FireOptions options;
    options.c = c["c"].get<double>();
    options.threshold = c["init_L"].get<double>();
    options.threshold_multiplier = c["L_multiplier"].get<double>();
    options.eps = golden["inputs"]["eps"].get<double>();
    const Fire<T> fire = fire_from<T>(golden["inputs"]["mlp"], options);
    // γ_(W + 15): the float32 roundings counted above (4 + 6 + 1 + 2 + (W + 1) + 1).
    const double float32_tolerance =
        test::float32_gamma(static_cast<double>(fire.mlp_width()) + 15.0);
    const Index n = c["seq_len"].get<Index>();
    const Heads<double> want64 = test::to_heads(golden["outputs"][key]["float64"]);
    const Heads<double> want32 = test::to_heads(golden["outputs"][key]["float32"]);
    for (Index h = 0; h < fire.heads(); ++h) {
      const auto tile = tile_of(fire, h, iota(n, 0), iota(n, 0));
      ASSERT_TRUE(tile.allFinite());
      if constexpr (std::is_same_v<T, double>) {
        EXPECT_LE(test::relative_error(tile, want64.head(h)), 1e-12) << key << ", head " << h;
      } else {
        EXPECT_LE(test::relative_error(tile, want32.head(h)), float32_tolerance)
            << key << ", head " << h;
      }
      for (Index i = 0; i < n; ++i) {
        for (Index j = 0; j < n; ++j) {
          // bias() is the double MLP rounded once to T: γ_2 (that rounding, plus room for the
          // double evaluation's own error) relative to max(1, |B|) in float.
          const double want = want64(h, i, j);
          const double element_tolerance =
              std::is_same_v<T, double> ? 1e-12
                                        : test::float32_gamma(2.0) * std::max(1.0, std::abs(want));
          EXPECT_NEAR(fire.bias(h, i, j), want, element_tolerance);
        }
      }
    }
  }
}

TEST(Fire, MatchesDapeFireC) {
  // dape_fire_causal.json: FIRE_C (leaky ReLU, causal distance, L0 = init_L // 2, normalised
  // distance formed in float32): the distances bit for bit, the float64 bias at 1e-12.
  const Json golden = test::load_golden("dape_fire_causal.json");
  const Json& config = golden["config"];
  const Json& mlp = golden["inputs"]["fire_mlp"];
  const FireOptions options = FireOptions::dape(config["fire_init_L_arg"].get<Index>());
  EXPECT_EQ(options.threshold, config["fire_L_effective"].get<double>());
  const Fire<double> fire(test::to_matrix(mlp["w1"]), test::to_vector(mlp["b1"]),
                          test::to_matrix(mlp["w2"]), test::to_vector(mlp["b2"]), options);
  const Index n = config["seq_len"].get<Index>();
  const Matrix<double> distance = test::to_matrix(golden["outputs"]["normalized_distance"]);
  const Heads<double> bias = test::to_heads(golden["outputs"]["bias_B"]);
  for (Index i = 0; i < n; ++i) {
    for (Index j = 0; j < n; ++j) EXPECT_EQ(fire.normalized_distance(i, j), distance(i, j));
  }
  for (Index h = 0; h < fire.heads(); ++h) {
    EXPECT_LE(test::relative_error(tile_of(fire, h, iota(n, 0), iota(n, 0)), bias.head(h)), 1e-12);
  }
}

TYPED_TEST(FireTest, TilesEqualTheMlpNearAMillion) {
  // The piecewise-linear tile path against the unit-by-unit MLP, for ReLU and leaky ReLU, both
  // forms, kinks spread over the inputs' range, positions near 0 and near 10^6; float tiles
  // against the double computation at 1e-5.
  using T = TypeParam;
  auto rng = test::make_rng(141);
  for (const FireActivation activation : {FireActivation::relu, FireActivation::leaky_relu}) {
    for (const BiasForm form : {BiasForm::symmetric, BiasForm::causal}) {
      FireOptions options;
      options.activation = activation;
      options.form = form;
      options.threshold = 100.0;
      auto seed = rng;
      const auto fire = Fire<T>::random(3, 32, rng, options);
      const auto exact = Fire<double>::random(3, 32, seed, options);
      for (const Index first : {Index{0}, Index{1'000'000}}) {
        const auto queries = iota(70, first + 40);
        const auto keys = iota(300, first);
        for (Index h = 0; h < 3; ++h) {
          const auto tile = tile_of(fire, h, queries, keys);
          ASSERT_TRUE(tile.allFinite());
          Matrix<double> want(tile.rows(), tile.cols());
          for (Index r = 0; r < tile.rows(); ++r) {
            for (Index c = 0; c < tile.cols(); ++c) {
              want(r, c) =
                  exact.mlp(h, exact.normalized_distance(queries[static_cast<std::size_t>(r)],
                                                         keys[static_cast<std::size_t>(c)]));
            }
          }
          EXPECT_LE(test::relative_error(tile, want), test::Tolerance<T>::kernel)
              << "first position " << first << ", head " << h;
        }
      }
    }
  }
}

TEST(FireRandom, PyTorchLinearBoundsAndReproducible) {
  auto a = test::make_rng(151);
  auto b = test::make_rng(151);
  const auto x = Fire<float>::random(4, 32, a);
  const auto y = Fire<float>::random(4, 32, b);
  EXPECT_EQ(x.w1(), y.w1());
  EXPECT_EQ(x.w2(), y.w2());
  EXPECT_LE(x.w1().cwiseAbs().maxCoeff(), 1.0);
  EXPECT_LE(x.b1().cwiseAbs().maxCoeff(), 1.0);
  EXPECT_LE(x.w2().cwiseAbs().maxCoeff(), 1.0 / std::sqrt(32.0));
  EXPECT_LE(x.b2().cwiseAbs().maxCoeff(), 1.0 / std::sqrt(32.0));
  EXPECT_GT(x.w1().cwiseAbs().maxCoeff(), 0.5);
  EXPECT_EQ(x.threshold(), 512.0);
}

TYPED_TEST(FireTest, StreamingMatchesReference) {
  using T = TypeParam;
  auto rng = test::make_rng(161);
  FireOptions listing;
  listing.threshold = 6.0;  // rows beyond L exercise the growing normaliser
  const auto fire = Fire<T>::random(3, 16, rng, listing);
  const auto dape = Fire<T>::random(3, 8, rng, FireOptions::dape(10));
  test::expect_streaming_matches_reference<T>(fire, 3, 8, 5, 162, true);
  test::expect_streaming_matches_reference<T>(dape, 3, 8, 5, 163, true);
  test::expect_decoding_matches_causal_pass<T>(fire, 3, 8, 5, 164);
}

TEST(FireErrors, RejectBadShapesAndOptions) {
  const Matrix<double> w1 = Matrix<double>::Ones(4, 1);
  const Vector<double> b1 = Vector<double>::Zero(4);
  const Matrix<double> w2 = Matrix<double>::Ones(2, 4);
  const Vector<double> b2 = Vector<double>::Zero(2);
  POSENC_EXPECT_INVALID(Fire<float>(Matrix<double>::Ones(1, 4), b1, w2, b2), "posenc::Fire",
                        "w1 must be [mlp_width, 1] (PyTorch (out, in) layout), got [1, 4]");
  POSENC_EXPECT_INVALID(Fire<float>(w1, Vector<double>::Zero(3), w2, b2),
                        "b1 must have mlp_width = 4 entries, got 3");
  POSENC_EXPECT_INVALID(Fire<float>(w1, b1, Matrix<double>::Ones(2, 3), b2),
                        "w2 must be [heads, mlp_width] = [heads >= 1, 4], got [2, 3]");
  POSENC_EXPECT_INVALID(Fire<float>(w1, b1, w2, Vector<double>::Zero(3)),
                        "b2 must have heads = 2 entries, got 3");
  FireOptions no_eps;
  no_eps.eps = 0.0;
  POSENC_EXPECT_INVALID(Fire<float>(w1, b1, w2, b2, no_eps), "eps must be finite and positive");
  FireOptions bad_c;
  bad_c.c = std::numeric_limits<double>::quiet_NaN();
  POSENC_EXPECT_INVALID(Fire<float>(w1, b1, w2, b2, bad_c), "c, threshold");
  auto rng = test::make_rng(171);
  POSENC_EXPECT_INVALID(Fire<float>::random(2, 0, rng), "posenc::Fire::random",
                        "heads and mlp_width must be >= 1, got 2 and 0");
}

// L0 (init_L) is a length: a negative one is rejected; a negative learnable multiplier is not
// (L = |multiplier·L0|, as the listing).
TEST(FireErrors, RejectsNegativeThreshold) {
  const Matrix<double> w1 = Matrix<double>::Ones(4, 1);
  const Vector<double> b1 = Vector<double>::Zero(4);
  const Matrix<double> w2 = Matrix<double>::Ones(2, 4);
  const Vector<double> b2 = Vector<double>::Zero(2);
  FireOptions negative;
  negative.threshold = -512.0;
  POSENC_EXPECT_INVALID(Fire<float>(w1, b1, w2, b2, negative), "posenc::Fire:", "threshold", ">= 0",
                        "got -512");
  auto rng = test::make_rng(172);
  POSENC_EXPECT_INVALID(Fire<double>::random(2, 4, rng, negative), "posenc::Fire:", "got -512");
  FireOptions flipped;
  flipped.threshold_multiplier = -2.0;
  EXPECT_EQ(Fire<float>(w1, b1, w2, b2, flipped).threshold(), 1024.0);
}

}  // namespace
}  // namespace posenc
