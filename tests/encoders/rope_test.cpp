// SPDX-License-Identifier: MIT
// RotaryEncoding: golden rows and frequencies of HF (Llama, GPT-J), Meta LLaMA, GPT-NeoX and ggml
// (golden/rope.json), relative-position and norm properties, the pairing permutation, long-position
// accuracy, thread safety, and the streaming kernel against the reference.
#include "posenc/encoders/rope.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "posenc/attention.hpp"
#include "support/golden.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

using test::Json;

template <class Scalar>
Matrix<Scalar> rotated(const RotaryEncoding<Scalar>& rope, const std::vector<Index>& positions,
                       const Matrix<Scalar>& x) {
  Matrix<Scalar> y(x.rows(), x.cols());
  rope.transform_queries(0, positions, 0, x, y);
  return y;
}

std::vector<Index> golden_positions(const Json& golden) {
  return golden.at("inputs").at("positions").get<std::vector<Index>>();
}

/// Row-wise comparison: |got − want| <= tolerance(position) for every entry of row r.
template <class Scalar>
void expect_rows_near(const Matrix<Scalar>& got, const Matrix<double>& want,
                      const std::vector<Index>& positions,
                      const std::function<double(Index)>& tolerance, const std::string& what) {
  ASSERT_TRUE(got.allFinite()) << what;
  ASSERT_EQ(got.rows(), want.rows()) << what;
  for (Index r = 0; r < got.rows(); ++r) {
    const double error = (got.row(r).template cast<double>() - want.row(r)).cwiseAbs().maxCoeff();
    const Index p = positions[static_cast<std::size_t>(r)];
    EXPECT_LE(error, tolerance(p)) << what << ", row " << r << " at position " << p;
  }
}

// The float64 goldens use p·θ rounded once in double; ours is exact then reduced, so the two
// differ by up to half an ulp of p·θ <= p: 1e-12 plus 2^-52·p.
double double_tolerance(Index p) { return 1e-12 + std::ldexp(static_cast<double>(p), -52); }

// The float32 references round θ and the angle p·θ to float32 (error up to 2^-24·p·θ, θ <= 1)
// and the rotated entries to float32 (~1e-7): 2e-6 plus 2^-23·p, for entries of size <= 2.
double float32_reference_tolerance(Index p) {
  return 2e-6 + std::ldexp(static_cast<double>(p), -23);
}

struct GoldenCase {
  const char* group;  // key under outputs ("" = directly under outputs)
  const char* name;
  std::function<RotaryEncoding<double>()> make;
};

TEST(RotaryEncodingGolden, FrequenciesOfEveryScaling) {
  const Json golden = test::load_golden("rope.json");
  const Json& inv = golden.at("outputs").at("hf_inv_freq");
  struct Case {
    const char* key;
    RopeScaling scaling;
  };
  const YarnOptions betas{.beta_fast = 4.0, .beta_slow = 0.5};
  const std::vector<Case> cases = {
      {"default", RopeScaling::none()},
      {"linear_factor4", RopeScaling::linear(4.0)},
      {"dynamic_factor4_seq8192", RopeScaling::dynamic_ntk(4.0, 4096, 8192)},
      {"dynamic_factor4_seq100(no change below max_pos)", RopeScaling::dynamic_ntk(4.0, 4096, 100)},
      {"yarn_factor4_maxpos4096", RopeScaling::yarn(4.0, 4096)},
      {"yarn_factor4_maxpos4096_beta_fast4_beta_slow0.5", RopeScaling::yarn(4.0, 4096, betas)},
      {"llama3_factor8_low1_high4_orig16", RopeScaling::llama3(8.0, 16, 1.0, 4.0)},
      // Later HF: s = max_position_embeddings / original_max_position_embeddings = 16384 / 4096.
      {"yarn_v5_orig4096_max16384_truncate_true", RopeScaling::yarn(4.0, 4096)},
      {"yarn_v5_orig4096_max16384_truncate_false",
       RopeScaling::yarn(4.0, 4096, {.truncate = false})},
      {"yarn_v5_orig4096_max16384_mscale0.707_all0.707",
       RopeScaling::yarn(4.0, 4096, {.mscale = 0.707, .mscale_all_dim = 0.707})},
      {"yarn_v5_orig4096_max16384_mscale1_all0",
       RopeScaling::yarn(4.0, 4096, {.mscale = 1.0, .mscale_all_dim = 0.0})},
  };
  for (const Case& c : cases) {
    const RotaryEncoding<double> rope(8, {.scaling = c.scaling});
    const Vector<double> want = test::to_vector(inv.at(c.key).at("inv_freq(float32)"));
    ASSERT_EQ(static_cast<Index>(rope.frequencies().size()), want.size()) << c.key;
    for (Index k = 0; k < want.size(); ++k) {
      // The reference rounds each of its few float32 operations: a handful of float32 ulps.
      EXPECT_NEAR(rope.frequencies()[static_cast<std::size_t>(k)], want[k],
                  4 * std::ldexp(want[k], -24))
          << c.key << ", pair " << k;
    }
    EXPECT_NEAR(rope.magnitude(), inv.at(c.key).at("attention_factor").get<double>(), 1e-15)
        << c.key;
  }
  // ggml's YaRN correction dims [1, 3] for the same configuration show in its frequencies:
  // pair 1 kept, pair 3 fully interpolated.
  const RotaryEncoding<double> yarn(8, {.scaling = RopeScaling::yarn(4.0, 4096)});
  EXPECT_EQ(yarn.frequencies()[1], 1.0 / std::pow(10000.0, 0.25));
  EXPECT_DOUBLE_EQ(yarn.frequencies()[3], 1.0 / std::pow(10000.0, 0.75) / 4.0);
}

/// Every rotated-row golden, in double against the float64 goldens and in float against all.
std::vector<GoldenCase> golden_cases() {
  using P = RotaryPairing;
  auto make = [](P pairing, Index rotary_dim, RopeScaling scaling) {
    return [=] {
      return RotaryEncoding<double>(
          8, {.rotary_dim = rotary_dim, .pairing = pairing, .scaling = scaling});
    };
  };
  const auto none = RopeScaling::none();
  return {
      {"hf_llama_neox_style", "default_float64", make(P::half, 0, none)},
      {"hf_llama_neox_style", "default_float32", make(P::half, 0, none)},
      {"hf_llama_neox_style", "linear_factor4_float32", make(P::half, 0, RopeScaling::linear(4))},
      {"hf_llama_neox_style", "yarn_factor4_float32",
       make(P::half, 0, RopeScaling::yarn(4.0, 4096))},
      {"hf_llama_neox_style", "dynamic_factor4_seq8192_float32",
       make(P::half, 0, RopeScaling::dynamic_ntk(4.0, 4096, 8192))},
      {"hf_gptj_interleaved", "float64_all", make(P::interleaved, 0, none)},
      {"hf_gptj_interleaved", "float32", make(P::interleaved, 0, none)},
      {"", "meta_llama_interleaved_float32", make(P::interleaved, 0, none)},
      {"", "gptneox_half_float32", make(P::half, 0, none)},
      {"", "partial_neox_rotary_dim4_float32", make(P::half, 4, none)},
      {"", "partial_gptj_rotary_dim4_float32", make(P::interleaved, 4, none)},
      {"ggml_float32", "normal_default", make(P::interleaved, 0, none)},
      {"ggml_float32", "neox_default", make(P::half, 0, none)},
      {"ggml_float32", "neox_partial_n_dims4", make(P::half, 4, none)},
      {"ggml_float32", "normal_partial_n_dims4", make(P::interleaved, 4, none)},
      {"ggml_float32", "neox_linear_freq_scale0.25", make(P::half, 0, RopeScaling::linear(4))},
      {"ggml_float32", "neox_yarn_freq_scale0.25_ext1_attn1_orig4096",
       make(P::half, 0, RopeScaling::yarn(4.0, 4096))},
      {"ggml_float32", "normal_yarn_freq_scale0.25_ext1_attn1_orig4096",
       make(P::interleaved, 0, RopeScaling::yarn(4.0, 4096))},
  };
}

const Json& golden_entry(const Json& golden, const GoldenCase& c) {
  const Json& outputs = golden.at("outputs");
  return std::string(c.group).empty() ? outputs.at(c.name) : outputs.at(c.group).at(c.name);
}

TEST(RotaryEncodingGolden, DoubleRowsMatchFloat64References) {
  const Json golden = test::load_golden("rope.json");
  const auto positions = golden_positions(golden);
  const Matrix<double> q = test::to_matrix(golden.at("inputs").at("q[row][d]"));
  const Matrix<double> k = test::to_matrix(golden.at("inputs").at("k[row][d]"));
  for (const GoldenCase& c : golden_cases()) {
    if (std::string(c.name).find("float64") == std::string::npos) continue;
    const RotaryEncoding<double> rope = c.make();
    const Json& entry = golden_entry(golden, c);
    expect_rows_near(rotated(rope, positions, q), test::to_matrix(entry.at("q")), positions,
                     double_tolerance, std::string(c.name) + " q");
    expect_rows_near(rotated(rope, positions, k), test::to_matrix(entry.at("k")), positions,
                     double_tolerance, std::string(c.name) + " k");
  }
}

TEST(RotaryEncodingGolden, StoredFloat32FrequenciesReplayGptjOnFloat64Inputs) {
  // HF GPT-J builds inv_freq in float32 even for float64 tensors; with those very frequencies
  // (the golden's own float32 inv_freq) the double rotation matches to 1e-12.
  const Json golden = test::load_golden("rope.json");
  const auto positions = golden_positions(golden);
  const Vector<double> inv =
      test::to_vector(golden.at("outputs").at("hf_inv_freq").at("default").at("inv_freq(float32)"));
  const auto rope = RotaryEncoding<double>::with_frequencies(
      8, std::span<const double>(inv.data(), static_cast<std::size_t>(inv.size())),
      RotaryPairing::interleaved);
  const Json& entry =
      golden.at("outputs").at("hf_gptj_interleaved").at("float64_tensors_but_float32_inv_freq");
  for (const char* x : {"q", "k"}) {
    const Matrix<double> in = test::to_matrix(golden.at("inputs").at(std::string(x) + "[row][d]"));
    expect_rows_near(rotated(rope, positions, in), test::to_matrix(entry.at(x)), positions,
                     double_tolerance, std::string("gptj mixed ") + x);
  }
}

TEST(RotaryEncodingGolden, FloatRowsMatchEveryReference) {
  const Json golden = test::load_golden("rope.json");
  const auto positions = golden_positions(golden);
  for (const char* x : {"q", "k"}) {
    const Matrix<float> in =
        test::to_matrix<float>(golden.at("inputs").at(std::string(x) + "[row][d]"));
    for (const GoldenCase& c : golden_cases()) {
      const RotaryEncoding<double> config = c.make();
      const RotaryEncoding<float> rope(8, {.rotary_dim = config.rotary_dim(),
                                           .pairing = config.pairing(),
                                           .scaling = config.scaling()});
      const bool exact_reference = std::string(c.name).find("float64") != std::string::npos;
      // Against a float64 reference only our own float rounding remains (~1e-7 per entry).
      const auto tolerance = exact_reference
                                 ? std::function<double(Index)>([](Index) { return 1e-6; })
                                 : float32_reference_tolerance;
      expect_rows_near(rotated(rope, positions, in), test::to_matrix(golden_entry(golden, c).at(x)),
                       positions, tolerance, std::string(c.name) + " " + x + " (float)");
    }
  }
}

// --------------------------------------------------------------------------------------------
// Properties
// --------------------------------------------------------------------------------------------

template <class Scalar>
class RotaryEncodingProperties : public ::testing::Test {};
TYPED_TEST_SUITE(RotaryEncodingProperties, test::Scalars);

TYPED_TEST(RotaryEncodingProperties, LogitsDependOnlyOnRelativePosition) {
  using Scalar = TypeParam;
  auto rng = test::make_rng(101);
  const Heads<Scalar> x = test::random_heads<Scalar>(1, 2, 64, rng);
  const Matrix<Scalar> q = x.head(0).row(0);
  const Matrix<Scalar> k = x.head(0).row(1);
  for (const RotaryPairing pairing : {RotaryPairing::interleaved, RotaryPairing::half}) {
    const RotaryEncoding<Scalar> rope(
        64, {.rotary_dim = 48, .pairing = pairing, .scaling = RopeScaling::yarn(8.0, 2048)});
    auto logit = [&](Index i, Index j) {
      return static_cast<double>((rotated(rope, {i}, q) * rotated(rope, {j}, k).transpose())(0, 0));
    };
    for (const Index distance : {Index{0}, Index{1}, Index{37}, Index{-5}, Index{3000}}) {
      const double at_zero = logit(distance + 4000, 4000);
      for (const Index offset : {Index{0}, Index{1000}, Index{1000000}}) {
        const Index j = offset + 4000;
        // Each rotated entry carries ~eps of rounding; a 64-term dot product of O(1) terms.
        const double tolerance = std::is_same_v<Scalar, float> ? 2e-5 : 1e-12;
        EXPECT_NEAR(logit(j + distance, j), at_zero, tolerance)
            << "distance " << distance << ", offset " << offset;
      }
    }
  }
}

TYPED_TEST(RotaryEncodingProperties, PreservesNorms) {
  using Scalar = TypeParam;
  auto rng = test::make_rng(102);
  const Heads<Scalar> x = test::random_heads<Scalar>(1, 6, 32, rng);
  const std::vector<Index> positions = {0, 1, 17, -3, 123456, 999999};
  const RotaryEncoding<Scalar> rope(32, {.rotary_dim = 24, .pairing = RotaryPairing::half});
  const Matrix<Scalar> y = rotated(rope, positions, Matrix<Scalar>(x.head(0)));
  ASSERT_TRUE(y.allFinite());
  for (Index r = 0; r < y.rows(); ++r) {
    EXPECT_NEAR(y.row(r).norm(), x.head(0).row(r).norm(),
                8 * std::numeric_limits<Scalar>::epsilon() * x.head(0).row(r).norm());
  }
  // Position 0 is the identity.
  const Matrix<Scalar> first = x.head(0).topRows(1);
  EXPECT_EQ(rotated(rope, {0}, first), first);
}

TYPED_TEST(RotaryEncodingProperties, ChannelPermutationTurnsInterleavedIntoHalfExactly) {
  using Scalar = TypeParam;
  auto rng = test::make_rng(103);
  const Index d = 12;
  const Index r = 8;
  const Matrix<Scalar> x = test::random_heads<Scalar>(1, 5, d, rng).head(0);
  const std::vector<Index> positions = {0, 3, 77, 4096, 250000};
  const std::vector<Index> perm = rotary_half_permutation(d, r);
  Matrix<Scalar> permuted(x.rows(), d);
  for (Index j = 0; j < d; ++j) permuted.col(j) = x.col(perm[static_cast<std::size_t>(j)]);
  const RotaryEncoding<Scalar> interleaved(d, {.rotary_dim = r});
  const RotaryEncoding<Scalar> half(d, {.rotary_dim = r, .pairing = RotaryPairing::half});
  const Matrix<Scalar> a = rotated(interleaved, positions, x);
  const Matrix<Scalar> b = rotated(half, positions, permuted);
  for (Index j = 0; j < d; ++j) {
    EXPECT_EQ(b.col(j), a.col(perm[static_cast<std::size_t>(j)])) << "channel " << j;
  }
}

TEST(RotaryEncodingAccuracy, FloatCosSinAtLongPositionsMatchLongDouble) {
  // Transforming unit vectors exposes the (cos, sin) the encoder uses at each position.
  const Index d = 64;
  const RotaryEncoding<float> rope(d);
  const std::vector<Index> positions = {100000, 131071, 262144, 500001, 777777, 1000000};
  double worst = 0;
  for (Index k = 0; k < d / 2; ++k) {
    Matrix<float> unit = Matrix<float>::Zero(static_cast<Index>(positions.size()), d);
    unit.col(2 * k).setOnes();
    const Matrix<float> y = rotated(rope, positions, unit);
    const long double theta = powl(10000.0L, -2.0L * static_cast<long double>(k) / d);
    for (std::size_t r = 0; r < positions.size(); ++r) {
      const long double angle = static_cast<long double>(positions[r]) * theta;
      worst = std::max<double>(
          worst, static_cast<double>(fabsl(y(static_cast<Index>(r), 2 * k) - cosl(angle))));
      worst = std::max<double>(
          worst, static_cast<double>(fabsl(y(static_cast<Index>(r), 2 * k + 1) - sinl(angle))));
    }
  }
  EXPECT_LE(worst, 2e-6);
  // Double: p·θ is formed exactly and reduced, so position ~10^6 is as accurate as position 10.
  // Positions with a small odd part make p·θ exact in long double too (<= 56 significant bits).
  // Tolerance: one ulp of the reduced angle in [−π, π] (4.4e-16).
  const RotaryEncoding<double> exact(d);
  for (const Index p : {Index{1} << 20, Index{3} << 18, Index{7} << 17}) {
    for (Index k = 1; k < d / 2; k += 5) {
      Matrix<double> unit_row = Matrix<double>::Zero(1, d);
      unit_row(0, 2 * k) = 1;
      const Matrix<double> y = rotated(exact, {p}, unit_row);
      const long double angle =
          static_cast<long double>(p) *
          static_cast<long double>(exact.frequencies()[static_cast<std::size_t>(k)]);
      EXPECT_NEAR(y(0, 2 * k), static_cast<double>(cosl(angle)), 4.5e-16) << p << ", pair " << k;
      EXPECT_NEAR(y(0, 2 * k + 1), static_cast<double>(sinl(angle)), 4.5e-16)
          << p << ", pair " << k;
    }
  }
}

TEST(RotaryEncodingAccuracy, CachedAndUncachedPositionsAgree) {
  // Positions beyond cached_positions (and negative ones) are computed on the fly, identically.
  auto rng = test::make_rng(104);
  const Matrix<double> x = test::random_heads<double>(1, 4, 16, rng).head(0);
  const std::vector<Index> positions = {-7, 5, 300, 70000};
  const RotaryEncoding<double> cached(16, {.cached_positions = 100000});
  const RotaryEncoding<double> uncached(16, {.cached_positions = 0});
  EXPECT_EQ(rotated(cached, positions, x), rotated(uncached, positions, x));
}

TEST(RotaryEncodingThreads, ConcurrentFirstUseIsSafeAndDeterministic) {
  // Many threads fill the lazily cached rows of one shared encoder at once.
  const RotaryEncoding<float> rope(64, {.pairing = RotaryPairing::half});
  auto rng = test::make_rng(105);
  const Matrix<float> x = test::random_heads<float>(1, 64, 64, rng).head(0);
  std::vector<Matrix<float>> results(8);
  std::vector<std::thread> threads;
  for (std::size_t t = 0; t < results.size(); ++t) {
    threads.emplace_back([&, t] {
      std::vector<Index> positions(64);
      for (Index r = 0; r < 64; ++r) positions[static_cast<std::size_t>(r)] = 1000 * r + 7;
      results[t] = rotated(rope, positions, x);
    });
  }
  for (auto& thread : threads) thread.join();
  for (const auto& result : results) EXPECT_EQ(result, results[0]);
}

TEST(RotaryEncodingErrors, RejectsBadConfigurations) {
  POSENC_EXPECT_INVALID(RotaryEncoding<float>(8, {.rotary_dim = 5}), "posenc::RotaryEncoding",
                        "rotary_dim", "odd");
  POSENC_EXPECT_INVALID(RotaryEncoding<float>(7), "posenc::RotaryEncoding", "odd");
  POSENC_EXPECT_INVALID(RotaryEncoding<float>(8, {.rotary_dim = 10}), "rotary_dim", "10");
  POSENC_EXPECT_INVALID(RotaryEncoding<float>(8, {.base = -1.0}), "base");
  POSENC_EXPECT_INVALID(RotaryEncoding<float>(8, {.scaling = RopeScaling::linear(0.0)}), "factor");
  POSENC_EXPECT_INVALID(RotaryEncoding<float>(8, {.scaling = RopeScaling::yarn(4.0, 0)}),
                        "original_context");
  POSENC_EXPECT_INVALID(RotaryEncoding<float>(2, {.scaling = RopeScaling::ntk(2.0)}), "NTK");
  POSENC_EXPECT_INVALID(RotaryEncoding<float>(8, {.scaling = RopeScaling::llama3(8, 16, 4, 1)}),
                        "low_freq_factor");
  const RotaryEncoding<float> rope(8);
  Matrix<float> x(3, 8);
  Matrix<float> y(3, 6);
  std::vector<Index> positions = {0, 1, 2};
  POSENC_EXPECT_INVALID(rope.transform_queries(0, positions, 0, x, y), "out is [3, 6]");
  POSENC_EXPECT_INVALID(rope.transform_keys(0, std::vector<Index>{0, 1}, 0, x, x),
                        "positions has 2 entries");
  Heads<float> q(1, 4, 16);
  POSENC_EXPECT_INVALID(attention(q, q, q, rope), "built for head_dim 8", "dim 16");
}

TEST(RotaryEncodingScaling, DynamicNtkFollowsTheSequenceLength) {
  const RotaryEncoding<double> rope(8, {.scaling = RopeScaling::dynamic_ntk(4.0, 4096, 0)});
  const RotaryEncoding<double> plain(8);
  EXPECT_EQ(rope.frequencies()[1], plain.frequencies()[1]);  // below the training length
  const RotaryEncoding<double> long_call = rope.for_sequence_length(8192);
  EXPECT_NEAR(long_call.frequencies()[1], std::pow(10000.0 * std::pow(5.0, 4.0 / 3.0), -0.25),
              1e-16);
  EXPECT_EQ(long_call.for_sequence_length(100).frequencies()[1], plain.frequencies()[1]);
}

// --------------------------------------------------------------------------------------------
// Streaming kernel == reference
// --------------------------------------------------------------------------------------------

template <class Scalar>
class RotaryEncodingAttention : public ::testing::Test {};
TYPED_TEST_SUITE(RotaryEncodingAttention, test::Scalars);

TYPED_TEST(RotaryEncodingAttention, StreamingMatchesReferenceForEveryMask) {
  using Scalar = TypeParam;
  auto rng = test::make_rng(106);
  const Index n = 37;
  const Heads<Scalar> q = test::random_heads<Scalar>(4, n, 16, rng);
  const Heads<Scalar> k = test::random_heads<Scalar>(2, n + 6, 16, rng);
  const Heads<Scalar> v = test::random_heads<Scalar>(2, n + 6, 8, rng);
  const RotaryEncoding<Scalar> rope(
      16, {.rotary_dim = 12, .pairing = RotaryPairing::half, .scaling = RopeScaling::linear(2)});
  for (const Mask mask :
       {Mask::none(), Mask::causal(), Mask::sliding_window(9), Mask::blockwise_causal(8)}) {
    for (const Index offset : {Index{6}, Index{100000}}) {
      AttentionOptions options{
          .mask = mask, .query_offset = offset, .query_block = 8, .key_block = 5};
      // Keys at 0 … M−1 by default; for the large offset place them just before the queries.
      std::vector<Index> key_positions(static_cast<std::size_t>(n + 6));
      for (Index c = 0; c < n + 6; ++c) key_positions[static_cast<std::size_t>(c)] = offset - 6 + c;
      options.key_positions = key_positions;
      const auto streamed = attention(q, k, v, rope, options);
      const auto reference = attention_reference(q, k, v, rope, options);
      EXPECT_LE(test::relative_error(streamed.flat(), reference.flat()),
                test::Tolerance<Scalar>::kernel)
          << "mask kind " << static_cast<int>(mask.kind()) << ", offset " << offset;
    }
  }
}

}  // namespace
}  // namespace posenc
