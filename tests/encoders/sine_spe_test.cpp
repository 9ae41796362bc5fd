// SPDX-License-Identifier: MIT
// sineSPE: golden vectors from aliutkus/spe (codes, q̂/k̂, logits, both attention outputs, gated
// and not), the Monte-Carlo expectation, the kernels on odd tiles, and bad input.
#include "posenc/encoders/sine_spe.hpp"

#include <gtest/gtest.h>

#include "encoders/spe_test_support.hpp"
#include "posenc/attention.hpp"
#include "posenc/linear_attention.hpp"
#include "support/golden.hpp"
#include "support/test_support.hpp"

namespace posenc::test {
namespace {

struct SineGolden {
  Json json;
  SineSpeParameters<double> parameters;
  SineSpeDraw<double> draw;
  Index heads, dim, sines, realizations, length;

  SineSpe<double> encoder(bool gated) const {
    if (!gated) return SineSpe<double>(parameters, draw);
    const Json& inputs = json.at("inputs");
    SpeGate<double> gate(to_matrix(inputs.at("gate")),
                         to_heads(inputs.at("gating_noise_raw_standard_normal")));
    return SineSpe<double>(parameters, draw, gate);
  }
};

SineGolden load_sine_golden() {
  Json json = load_golden("spe_sine.json");
  const Json& inputs = json.at("inputs");
  const Json& config = json.at("config");
  const auto H = config.at("heads").get<Index>();
  const auto D = config.at("in_features_D").get<Index>();
  const auto K = config.at("num_sines_K").get<Index>();
  const auto R = config.at("num_realizations_R").get<Index>();
  SineSpeParameters<double> parameters{to_heads(inputs.at("freqs")), to_heads(inputs.at("offsets")),
                                       to_heads(inputs.at("gains"))};
  SineSpeDraw<double> draw{Heads<double>(H, D * 2 * K, R)};
  draw.noise.flat() = flatten(inputs.at("z_raw_standard_normal"));  // [H][D][2K][R]
  const auto L = config.at("seq_len").get<Index>();
  return {std::move(json), std::move(parameters), std::move(draw), H, D, K, R, L};
}

TEST(SineSpeGolden, CodesMatchReference) {
  const SineGolden g = load_sine_golden();
  const SineSpe<double> spe = g.encoder(false);
  expect_codes_match(g.json, spe, g.length);
}

TEST(SineSpeGolden, LagKernelIsPosattnMatrixOver2K) {
  const SineGolden g = load_sine_golden();
  const SineSpe<double> spe = g.encoder(false);
  const Json& posattn = g.json.at("outputs").at("posattn_matrix_reference");  // [H][D][m][n]
  for (Index h = 0; h < g.heads; ++h) {
    for (Index m = 0; m < g.length; ++m) {
      for (Index n = 0; n < g.length; ++n) {
        const Vector<double> kernel = spe.lag_kernel(h, m - n) * static_cast<double>(2 * g.sines);
        for (Index d = 0; d < g.dim; ++d) {
          const double expected = posattn.at(static_cast<std::size_t>(h))
                                      .at(static_cast<std::size_t>(d))
                                      .at(static_cast<std::size_t>(m))
                                      .at(static_cast<std::size_t>(n))
                                      .get<double>();
          EXPECT_NEAR(kernel[d], expected, golden_tolerance * std::max(1.0, std::abs(expected)));
        }
      }
    }
  }
}

TEST(SineSpeGolden, UngatedOutputsMatchReference) {
  const SineGolden g = load_sine_golden();
  check_spe_outputs(g.json, g.encoder(false), "ungated");
}

TEST(SineSpeGolden, GatedOutputsMatchReference) {
  const SineGolden g = load_sine_golden();
  check_spe_outputs(g.json, g.encoder(true), "gated");
}

// The mean of q̂·k̂ over draws approaches the closed form, with error ~ 1/sqrt(R): 16x the
// realizations must cut the error by about 4.
TEST(SineSpeMonteCarlo, MeanApproachesExpectedLogitsAsOneOverSqrtR) {
  auto rng = make_rng(11);
  const Index H = 1, D = 4, K = 2, L = 10;
  const auto parameters = SineSpeParameters<double>::initial(H, D, K, 5);
  const Heads<double> q = random_heads<double>(H, L, D, rng);
  const Heads<double> k = random_heads<double>(H, L, D, rng);
  const Matrix<double> gate = Matrix<double>::Constant(H, D, 0.3);
  expect_error_falls_as_one_over_sqrt_r(
      [&](Index realizations, std::uint64_t seed, bool gated) {
        return SineSpe<double>(parameters, realizations, seed,
                               gated ? std::optional<Matrix<double>>(gate) : std::nullopt);
      },
      q, k);
}

// The positional factor depends on m − n only: the closed form is Toeplitz for equal rows, and
// draws at positions shifted by 1000 average to the same expectation.
TEST(SineSpeMonteCarlo, PositionalFactorDependsOnLagOnly) {
  auto rng = make_rng(12);
  const Index H = 2, D = 3, K = 3, L = 8;
  const auto parameters = SineSpeParameters<double>::initial(H, D, K, 6);
  const SineSpe<double> spe(parameters, 4, 1);
  Heads<double> same(H, L, D);
  for (Index h = 0; h < H; ++h)
    same.head(h).rowwise() = Vector<double>::LinSpaced(D, 0.5, 1.5).transpose();
  const Heads<double> toeplitz = expected_logits(spe, same, same);
  for (Index h = 0; h < H; ++h) {
    for (Index i = 1; i < L; ++i) {
      for (Index j = 1; j < L; ++j) {
        EXPECT_NEAR(toeplitz(h, i, j), toeplitz(h, i - 1, j - 1), 1e-14);
      }
    }
  }
  const Heads<double> q = random_heads<double>(H, L, D, rng);
  const Heads<double> k = random_heads<double>(H, L, D, rng);
  const MonteCarloError shifted =
      monte_carlo_error([&](std::uint64_t seed) { return SineSpe<double>(parameters, 4096, seed); },
                        8, q, k, 1000, 1000);
  EXPECT_LT(shifted.of_mean, 0.05);
}

template <class T>
class SineSpeKernels : public ::testing::Test {};
TYPED_TEST_SUITE(SineSpeKernels, Scalars);

// Streaming kernel == reference kernel on odd tiles, offsets and explicit positions; linear
// attention with SPE == its quadratic oracle; decoding with one draw == one pass.
TYPED_TEST(SineSpeKernels, StreamingMatchesReference) {
  using T = TypeParam;
  auto rng = make_rng(13);
  const Index H = 2, D = 5, K = 2, R = 7, N = 11;
  const SineSpe<T> spe(SineSpeParameters<T>::initial(H, D, K, 7), R, 3,
                       Matrix<T>::Constant(H, D, T(-0.5)));
  const Heads<T> q = random_heads<T>(H, N, D, rng);
  const Heads<T> k = random_heads<T>(H, N, D, rng);
  const Heads<T> v = random_heads<T>(H, N, 3, rng);
  const double tol = Tolerance<T>::kernel;
  for (const Index offset : {Index{0}, Index{5}, Index{-3}}) {
    const AttentionOptions options{.query_offset = offset, .query_block = 4, .key_block = 3};
    const AttentionOptions reference_options{.query_offset = offset};
    EXPECT_LE(relative_error(attention(q, k, v, spe, options).flat(),
                             attention_reference(q, k, v, spe, reference_options).flat()),
              tol);
  }
  std::vector<Index> scattered = {40, 3, 17, 9, 0, 22, 5, 31, 8, 13, 2};
  const AttentionOptions explicit_positions{.mask = Mask::none(),
                                            .query_positions = scattered,
                                            .key_positions = scattered,
                                            .query_block = 2,
                                            .key_block = 5};
  EXPECT_LE(relative_error(attention(q, k, v, spe, explicit_positions).flat(),
                           attention_reference(q, k, v, spe, explicit_positions).flat()),
            tol);
  EXPECT_LE(relative_error(linear_attention(q, k, v, EluPlusOne{}, spe, {.chunk = 4}).flat(),
                           linear_attention_reference(q, k, v, EluPlusOne{}, spe).flat()),
            tol);
  LinearAttentionState<T, EluPlusOne, SineSpe<T>> state(EluPlusOne{}, spe);
  const Heads<T> prefix = state.append(q.view().middle_rows(0, 6), k.view().middle_rows(0, 6),
                                       v.view().middle_rows(0, 6));
  const Heads<T> one_pass = linear_attention(q, k, v, EluPlusOne{}, spe);
  for (Index t = 6; t < N; ++t) {
    const Heads<T> out = state.step(q.view().middle_rows(t, 1), k.view().middle_rows(t, 1),
                                    v.view().middle_rows(t, 1));
    for (Index h = 0; h < H; ++h) {
      EXPECT_LE(relative_error(out.head(h), one_pass.head(h).middleRows(t, 1)), tol);
    }
  }
}

TEST(SineSpeCodes, FilteringIsLinearInTheCodes) {
  // q̂ at position m equals q · query_code(m), for scattered positions of one tile.
  auto rng = make_rng(14);
  const Index H = 2, D = 3, R = 5;
  const SineSpe<double> spe(SineSpeParameters<double>::initial(H, D, 2, 8), R, 9,
                            Matrix<double>::Constant(H, D, 0.7));
  const Heads<double> x = random_heads<double>(H, 4, D, rng);
  const std::vector<Index> positions = {7, -2, 100000, 3};
  for (Index h = 0; h < H; ++h) {
    Matrix<double> out(4, R);
    spe.transform_queries(h, positions, 0, x.head(h), out);
    for (Index r = 0; r < 4; ++r) {
      const Matrix<double> expected =
          x.head(h).row(r) * spe.query_code(h, positions[static_cast<std::size_t>(r)]);
      EXPECT_LE(relative_error(out.row(r), expected), 1e-13);
    }
  }
}

TEST(SineSpeErrors, BadInputIsRejected) {
  const auto parameters = SineSpeParameters<double>::initial(2, 4, 3, 1);
  POSENC_EXPECT_INVALID(SineSpeDraw<double>::sample(2, 4, 3, 0, 1), "posenc::SineSpeDraw::sample",
                        "R must be >= 1, got 0");
  POSENC_EXPECT_INVALID(SineSpe<double>(parameters, -1, 1), "R must be >= 1, got -1");
  POSENC_EXPECT_INVALID(SineSpe<double>(parameters, SineSpeDraw<double>::sample(2, 3, 3, 6, 1)),
                        "posenc::SineSpe", "[H, D·2K, R] = [2, 24, R]", "got [2, 18, 6]");
  auto bad = parameters;
  bad.gains = Heads<double>(2, 4, 2);
  POSENC_EXPECT_INVALID(SineSpe<double>(bad, 6, 1), "offsets and gains", "got [2, 4, 2]");
  POSENC_EXPECT_INVALID(SineSpe<double>(parameters, SineSpeDraw<double>::sample(2, 4, 3, 6, 1),
                                        SpeGate<double>::sample(Matrix<double>::Zero(2, 4), 5, 1)),
                        "the gate is for [H, D, R] = [2, 4, 5]", "[2, 4, 6]");
  const SineSpe<double> spe(parameters, 6, 1);
  Heads<double> q(2, 5, 4), wide(2, 5, 8), v(2, 5, 4), three_heads(3, 5, 4);
  POSENC_EXPECT_INVALID(attention(wide, wide, v, spe), "posenc::SineSpe",
                        "q and k have dim 8 but the codes were built for D = 4");
  POSENC_EXPECT_INVALID(attention(three_heads, three_heads, Heads<double>(3, 5, 4), spe),
                        "q has 3 heads but the codes were built for 2");
  POSENC_EXPECT_INVALID(linear_attention(wide, wide, v, EluPlusOne{}, spe),
                        "q and k have dim 8 but the codes were built for D = 4");
  POSENC_EXPECT_INVALID(spe.filter_queries(wide), "posenc::SineSpe::filter_queries",
                        "the input has dim 8 but the codes were built for D = 4");
  POSENC_EXPECT_INVALID(linear_attention(q, q, v, Favor<double>(4, 8, 1), spe),
                        "the Favor projection has width 4",
                        "have width 6 (after the encoder's transform)");
}

// The seeded constructor checks R (and the gate's shape) under its own name before sampling; it
// used to report SineSpeDraw::sample (or SpeGate::sample).
TEST(SineSpeErrors, SeededConstructorNamesItself) {
  const auto parameters = SineSpeParameters<double>::initial(2, 4, 3, 1);
  POSENC_EXPECT_INVALID(SineSpe<double>(parameters, 0, 7),
                        "posenc::SineSpe: the number of realizations R must be >= 1, got 0");
  POSENC_EXPECT_INVALID(SineSpe<double>(parameters, 0, 7, Matrix<double>::Zero(2, 4)),
                        "posenc::SineSpe: the number of realizations R must be >= 1, got 0");
  POSENC_EXPECT_INVALID(SineSpe<double>(parameters, 6, 7, Matrix<double>::Zero(3, 4)),
                        "posenc::SineSpe: gate must be [H, D] = [2, 4], got [3, 4]");
  POSENC_EXPECT_INVALID(SineSpe<double>(SineSpeParameters<double>{}, 6, 7),
                        "posenc::SineSpe: frequencies must be [H >= 1, D >= 1, K >= 1]");
}

}  // namespace
}  // namespace posenc::test
