// SPDX-License-Identifier: MIT
// convSPE: golden vectors from aliutkus/spe (codes with the torch filter swap, lag kernel, q̂/k̂,
// logits, both attention outputs, gated and not), the Monte-Carlo expectation, tiles and
// positions, and bad input.
#include "posenc/encoders/conv_spe.hpp"

#include <gtest/gtest.h>

#include <cmath>

#include "encoders/spe_test_support.hpp"
#include "posenc/attention.hpp"
#include "posenc/linear_attention.hpp"
#include "support/golden.hpp"
#include "support/test_support.hpp"

namespace posenc::test {
namespace {

struct ConvGolden {
  Json json;
  ConvSpeParameters<double> parameters;
  Heads<double> noise;
  Index heads, dim, kernel_size, realizations, length;

  ConvSpe<double> encoder(bool gated) const {
    ConvSpeDraw<double> draw(noise);
    if (!gated) return ConvSpe<double>(parameters, draw);
    const Json& inputs = json.at("inputs");
    SpeGate<double> gate(to_matrix(inputs.at("gate")),
                         to_heads(inputs.at("gating_noise_raw_standard_normal")));
    return ConvSpe<double>(parameters, draw, gate);
  }
};

ConvGolden load_conv_golden() {
  Json json = load_golden("spe_conv.json");
  const Json& inputs = json.at("inputs");
  const Json& config = json.at("config");
  const auto H = config.at("heads").get<Index>();
  const auto D = config.at("in_features_D").get<Index>();
  const auto ks = config.at("kernel_size").get<Index>();
  const auto R = config.at("num_realizations_R").get<Index>();
  const auto L = config.at("seq_len").get<Index>();
  Heads<double> conv_q(H, D, ks), conv_k(H, D, ks);  // torch [H·D][1][ks]
  conv_q.flat() = flatten(inputs.at("conv_q_weight"));
  conv_k.flat() = flatten(inputs.at("conv_k_weight"));
  Heads<double> noise(R, H * D, L + 4 * ks);  // [R][H·D][L + 4ks]
  noise.flat() = flatten(inputs.at("z_raw_standard_normal"));
  return {std::move(json),
          ConvSpeParameters<double>::from_torch(conv_q, conv_k),
          std::move(noise),
          H,
          D,
          ks,
          R,
          L};
}

TEST(ConvSpeGolden, CodesMatchReferenceWithSwappedFilters) {
  const ConvGolden g = load_conv_golden();
  const ConvSpe<double> spe = g.encoder(false);
  EXPECT_EQ(spe.max_length(), g.length);
  expect_codes_match(g.json, spe, g.length);
}

TEST(ConvSpeGolden, LagKernelMatchesReference) {
  const ConvGolden g = load_conv_golden();
  const ConvSpe<double> spe = g.encoder(false);
  const Json& kernel = g.json.at("outputs").at("kernel_P_conv");  // [H][D][m][n]
  for (Index h = 0; h < g.heads; ++h) {
    for (Index m = 0; m < g.length; ++m) {
      for (Index n = 0; n < g.length; ++n) {
        const Vector<double> p = spe.lag_kernel(h, m - n);
        for (Index d = 0; d < g.dim; ++d) {
          EXPECT_NEAR(p[d],
                      kernel.at(static_cast<std::size_t>(h))
                          .at(static_cast<std::size_t>(d))
                          .at(static_cast<std::size_t>(m))
                          .at(static_cast<std::size_t>(n))
                          .get<double>(),
                      golden_tolerance);
        }
      }
    }
  }
}

TEST(ConvSpeGolden, UngatedOutputsMatchReference) {
  const ConvGolden g = load_conv_golden();
  check_spe_outputs(g.json, g.encoder(false), "ungated");
}

TEST(ConvSpeGolden, GatedOutputsMatchReference) {
  const ConvGolden g = load_conv_golden();
  check_spe_outputs(g.json, g.encoder(true), "gated");
}

TEST(ConvSpeMonteCarlo, MeanApproachesExpectedLogitsAsOneOverSqrtR) {
  auto rng = make_rng(21);
  const Index H = 1, D = 3, ks = 4, L = 9;
  const auto parameters = ConvSpeParameters<double>::initial(H, D, ks, 5);
  const Heads<double> q = random_heads<double>(H, L, D, rng);
  const Heads<double> k = random_heads<double>(H, L, D, rng);
  const Matrix<double> gate = Matrix<double>::Constant(H, D, -0.4);
  expect_error_falls_as_one_over_sqrt_r(
      [&](Index realizations, std::uint64_t seed, bool gated) {
        return ConvSpe<double>(parameters, realizations, seed,
                               gated ? std::optional<Matrix<double>>(gate) : std::nullopt);
      },
      q, k);
}

TEST(ConvSpeMonteCarlo, PositionalFactorDependsOnLagOnly) {
  auto rng = make_rng(22);
  const Index H = 1, D = 2, ks = 3, L = 8;
  const auto parameters = ConvSpeParameters<double>::initial(H, D, ks, 6);
  const Heads<double> q = random_heads<double>(H, L, D, rng);
  const Heads<double> k = random_heads<double>(H, L, D, rng);
  const MonteCarloError shifted =
      monte_carlo_error([&](std::uint64_t seed) { return ConvSpe<double>(parameters, 4096, seed); },
                        8, q, k, 5000, 5000);
  EXPECT_LT(shifted.of_mean, 0.05);
  // Zero beyond the filter support, and not symmetric in the lag.
  const ConvSpe<double> spe(parameters, 4, 1);
  EXPECT_EQ(spe.lag_kernel(0, ks).cwiseAbs().maxCoeff(), 0.0);
  EXPECT_EQ(spe.lag_kernel(0, -ks).cwiseAbs().maxCoeff(), 0.0);
  EXPECT_GT((spe.lag_kernel(0, 1) - spe.lag_kernel(0, -1)).cwiseAbs().maxCoeff(), 1e-6);
}

// Codes by the definition, for even and odd kernel sizes, from explicit noise; a tile with
// scattered positions (one window per row) equals the contiguous path.
TEST(ConvSpeCodes, MatchDefinitionForAnyKernelSize) {
  auto rng = make_rng(23);
  const Index H = 2, D = 3, R = 4, L = 12;
  for (const Index ks : {Index{1}, Index{2}, Index{3}, Index{4}}) {
    SCOPED_TRACE("kernel_size " + std::to_string(ks));
    const auto parameters = ConvSpeParameters<double>::initial(H, D, ks, 3);
    const Heads<double> noise = random_heads<double>(R, H * D, L + 4 * ks, rng);
    const ConvSpe<double> spe(parameters, ConvSpeDraw<double>(noise));
    const double scale = std::pow(static_cast<double>(R * D), -0.25);
    for (Index h = 0; h < H; ++h) {
      for (const Index m : {Index{0}, Index{5}, L - 1}) {
        Matrix<double> expected = Matrix<double>::Zero(D, R);
        for (Index d = 0; d < D; ++d) {
          for (Index r = 0; r < R; ++r) {
            for (Index j = 0; j < ks; ++j) {
              expected(d, r) +=
                  parameters.query_filter(h, d, j) * noise(r, h * D + d, m + ks + j) * scale;
            }
          }
        }
        EXPECT_LE(relative_error(spe.query_code(h, m), expected), 1e-14);
      }
      const Heads<double> x = random_heads<double>(1, 4, D, rng);
      const std::vector<Index> scattered = {11, 0, 6, 1};
      Matrix<double> out(4, R);
      spe.transform_keys(h, scattered, 0, x.head(0), out);
      for (Index r = 0; r < 4; ++r) {
        const Matrix<double> row =
            x.head(0).row(r) * spe.key_code(h, scattered[static_cast<std::size_t>(r)]);
        EXPECT_LE(relative_error(out.row(r), row), 1e-14);
      }
    }
  }
}

template <class T>
class ConvSpeKernels : public ::testing::Test {};
TYPED_TEST_SUITE(ConvSpeKernels, Scalars);

TYPED_TEST(ConvSpeKernels, StreamingMatchesReference) {
  using T = TypeParam;
  auto rng = make_rng(24);
  const Index H = 2, D = 4, ks = 5, R = 6, N = 13;
  const ConvSpe<T> spe(ConvSpeParameters<T>::initial(H, D, ks, 7), R, 3,
                       Matrix<T>::Constant(H, D, T(0.2)));
  const Heads<T> q = random_heads<T>(H, N, D, rng);
  const Heads<T> k = random_heads<T>(H, N, D, rng);
  const Heads<T> v = random_heads<T>(H, N, 2, rng);
  const double tol = Tolerance<T>::kernel;
  for (const Index offset : {Index{0}, Index{7}}) {
    EXPECT_LE(relative_error(attention(q, k, v, spe,
                                       {.query_offset = offset, .query_block = 4, .key_block = 3})
                                 .flat(),
                             attention_reference(q, k, v, spe, {.query_offset = offset}).flat()),
              tol);
  }
  EXPECT_LE(
      relative_error(
          linear_attention(q, k, v, ReluPlusEpsilon{}, spe, {.causal = false, .chunk = 5}).flat(),
          linear_attention_reference(q, k, v, ReluPlusEpsilon{}, spe, {.causal = false}).flat()),
      tol);
}

TEST(ConvSpeErrors, BadInputIsRejected) {
  const auto parameters = ConvSpeParameters<double>::initial(2, 3, 3, 1);
  POSENC_EXPECT_INVALID(ConvSpeDraw<double>::from_seed(0, 6, 1), "R must be >= 1, got 0");
  POSENC_EXPECT_INVALID(ConvSpeParameters<double>::initial(2, 3, 0, 1),
                        "kernel_size must be >= 1, got 2, 3, 0");
  POSENC_EXPECT_INVALID(ConvSpe<double>(parameters, ConvSpeDraw<double>(Heads<double>(4, 6, 12))),
                        "posenc::ConvSpe", "noise of 12 samples is too short for kernel_size 3");
  POSENC_EXPECT_INVALID(ConvSpe<double>(parameters, ConvSpeDraw<double>(Heads<double>(4, 5, 20))),
                        "the noise has 5 channels but the filters need H·D = 6");
  auto bad = parameters;
  bad.key_filter = Heads<double>(2, 3, 4);
  POSENC_EXPECT_INVALID(ConvSpe<double>(bad, 4, 1), "query_filter is [2, 3, 3]",
                        "key_filter is [2, 3, 4]");
  // Explicit noise for L = 5 positions: position 5 is outside the draw.
  const ConvSpe<double> spe(parameters, ConvSpeDraw<double>(Heads<double>(4, 6, 5 + 12)));
  Heads<double> x(2, 6, 3), v(2, 6, 3);
  POSENC_EXPECT_INVALID(spe.filter_queries(x), "posenc::ConvSpe::transform_queries",
                        "positions 0 … 5 are outside the draw, which covers positions 0 … 4");
  POSENC_EXPECT_INVALID(attention(x, x, v, spe), "outside the draw");
  POSENC_EXPECT_INVALID(linear_attention(x, x, v, EluPlusOne{}, spe), "outside the draw");
  POSENC_EXPECT_INVALID(spe.filter_keys(x.view().middle_rows(0, 2), -1), "positions -1 … 0");
  POSENC_EXPECT_INVALID(
      attention(Heads<double>(2, 4, 5), Heads<double>(2, 4, 5), Heads<double>(2, 4, 3), spe),
      "q and k have dim 5 but the codes were built for D = 3");
}

// The seeded constructor checks R (and the gate's shape) under its own name before sampling; it
// used to report ConvSpeDraw::from_seed (or SpeGate::sample).
TEST(ConvSpeErrors, SeededConstructorNamesItself) {
  const auto parameters = ConvSpeParameters<double>::initial(2, 3, 3, 1);
  POSENC_EXPECT_INVALID(ConvSpe<double>(parameters, 0, 7),
                        "posenc::ConvSpe: the number of realizations R must be >= 1, got 0");
  POSENC_EXPECT_INVALID(ConvSpe<double>(parameters, -4, 7, Matrix<double>::Zero(2, 3)),
                        "posenc::ConvSpe: the number of realizations R must be >= 1, got -4");
  POSENC_EXPECT_INVALID(ConvSpe<double>(parameters, 4, 7, Matrix<double>::Zero(2, 5)),
                        "posenc::ConvSpe: gate must be [H, D] = [2, 3], got [2, 5]");
  POSENC_EXPECT_INVALID(ConvSpe<double>(ConvSpeParameters<double>{}, 4, 7),
                        "posenc::ConvSpe: the filters must be [H >= 1, D >= 1, ks]");
}

}  // namespace
}  // namespace posenc::test
