// SPDX-License-Identifier: MIT
// RotaryEncoding: golden rows and frequencies of HF (Llama, GPT-J), Meta LLaMA, GPT-NeoX and ggml
// (tests/data/rope.json), relative-position and norm properties, the pairing permutation,
// long-position accuracy, thread safety, and the streaming kernel against the reference.
#include "posenc/encoders/rope.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numbers>
#include <string>
#include <thread>
#include <vector>

#include "posenc/attention.hpp"
#include "posenc/encoders/xpos.hpp"
#include "support/golden.hpp"
#include "support/test_support.hpp"
#include "support/tolerance.hpp"

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

/// HF's inv_freq (modeling_rope_utils, the reference of tests/data/rope.json's hf_inv_freq) for
/// rotary width r, replayed step by step: `rounded` follows every step the reference does in
/// float32 (test::round_to_float32 reproduces the golden bit for bit) or none (the same steps in
/// double). torch semantics replayed: `python_float ** float32_tensor` is evaluated in double and
/// rounded once (torch promotes the Python float to double for the power); `python_float / tensor`
/// is a reciprocal times the scalar; a Python scalar meeting a float32 tensor is cast to float32
/// first.
template <class Round>
std::vector<double> hf_inv_freq(const Round& rounded, Index r, double base,
                                const RopeScaling& scaling) {
  using Kind = RopeScaling::Kind;
  const double s = scaling.factor;
  const double l0 = static_cast<double>(scaling.original_context);
  if (scaling.kind == Kind::dynamic_ntk) {  // the new base in Python double
    const double length = std::max(static_cast<double>(scaling.sequence_length), l0);
    base *=
        std::pow(s * length / l0 - (s - 1.0), static_cast<double>(r) / static_cast<double>(r - 2));
  }
  std::vector<double> pos_freqs;  // base ** (arange(0, r, 2).float() / r)
  for (Index k = 0; k < r / 2; ++k) {
    pos_freqs.push_back(
        rounded(std::pow(base, rounded(static_cast<double>(2 * k) / static_cast<double>(r)))));
  }
  std::vector<double> inv;
  for (const double pf : pos_freqs) inv.push_back(rounded(1.0 / pf));
  switch (scaling.kind) {
    case Kind::linear:
      for (double& x : inv) x = rounded(x / rounded(s));
      break;
    case Kind::yarn: {
      // find_correction_range in Python double; linear_ramp_factor and the blend in float32.
      const YarnOptions& y = scaling.yarn_options;
      auto correction_dim = [&](double rotations) {
        return static_cast<double>(r) * std::log(l0 / (rotations * 2.0 * std::numbers::pi)) /
               (2.0 * std::log(base));
      };
      double low = correction_dim(y.beta_fast);
      double high = correction_dim(y.beta_slow);
      if (y.truncate) {
        low = std::floor(low);
        high = std::ceil(high);
      }
      low = std::max(low, 0.0);
      high = std::min(high, static_cast<double>(r - 1));
      if (low == high) high += 0.001;
      for (Index k = 0; k < r / 2; ++k) {
        const double pf = pos_freqs[static_cast<std::size_t>(k)];
        const double extrapolation = rounded(1.0 / pf);
        const double interpolation = rounded(1.0 / rounded(rounded(s) * pf));
        const double ramp = std::clamp(
            rounded(rounded(static_cast<double>(k) - rounded(low)) / rounded(high - low)), 0.0,
            1.0);
        const double keep = rounded(1.0 - ramp);
        inv[static_cast<std::size_t>(k)] =
            rounded(rounded(interpolation * rounded(1.0 - keep)) + rounded(extrapolation * keep));
      }
      break;
    }
    case Kind::llama3: {
      const double low_wavelength = l0 / scaling.low_freq_factor;
      const double high_wavelength = l0 / scaling.high_freq_factor;
      for (double& x : inv) {
        const double wavelength = rounded(rounded(1.0 / x) * rounded(2.0 * std::numbers::pi));
        const double scaled = wavelength > low_wavelength ? rounded(x / rounded(s)) : x;
        const double smooth = rounded(rounded(rounded(rounded(1.0 / wavelength) * rounded(l0)) -
                                              rounded(scaling.low_freq_factor)) /
                                      rounded(scaling.high_freq_factor - scaling.low_freq_factor));
        const double smoothed =
            rounded(rounded(rounded(rounded(1.0 - smooth) * scaled) / rounded(s)) +
                    rounded(smooth * scaled));
        const bool medium = !(wavelength < high_wavelength) && !(wavelength > low_wavelength);
        x = medium ? smoothed : scaled;
      }
      break;
    }
    default:
      break;
  }
  return inv;
}

// Two double evaluations of one formula (ours and the double replay) of at most ~12 operations,
// the pow's exponent rounding amplified by |e·ln base| <= 10: each within γ_32 in double.
double double_replay_tolerance(double x) { return 2.0 * 32.0 * 0x1p-53 * std::abs(x); }

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
    // The golden's own float32 rounding, re-computed: the float32 replay of HF's steps gives the
    // golden bit for bit, and the same steps in double are the exact value the golden rounds.
    // Ours may differ from the golden by exactly that rounding plus double rounding.
    const auto replay32 = hf_inv_freq(test::round_to_float32, 8, 10000.0, c.scaling);
    const auto replay64 = hf_inv_freq([](double x) { return x; }, 8, 10000.0, c.scaling);
    for (Index k = 0; k < want.size(); ++k) {
      const auto i = static_cast<std::size_t>(k);
      EXPECT_EQ(replay32[i], want[k]) << c.key << ", pair " << k << ": the replay is not HF's";
      const double ours = rope.frequencies()[i];
      EXPECT_NEAR(ours, replay64[i], double_replay_tolerance(want[k])) << c.key << ", pair " << k;
      EXPECT_NEAR(ours, want[k], std::abs(want[k] - replay64[i]) + double_replay_tolerance(want[k]))
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

/// Error model of a rotated float entry against a golden, per pair k at position p with input
/// pair (a, b), magnitude m and θ_k (HF inv_freq):
///
///   |got − want| <= m·(‖(a, b)‖·γ_φ(k)·|p|·θ_k + (|a| + |b|)·γ_(7 + n_m))
///
/// - γ_φ(k): the reference's relative error of the angle p·θ_k (0 for a float64 golden). Rotating
///   (a, b) by an angle off by δ moves each entry by at most ‖(a, b)‖·|δ|. Pair 0 is exact in
///   every reference (θ_0 = 1, or 1/s with s a power of two; p < 2^24; YaRN's weights are 0 and 1
///   there). For k >= 1:
///     HF, Meta, GPT-J, NeoX: pow (2) + reciprocal (1) + p·θ (1) = 4, plus |e·ln base| if the
///       exponent e = 2k/r is not exact in float32; linear: θ/s (0 for s a power of two);
///       dynamic: + e for the new base if cast to float32; YaRN: + 2 (a weight product and the
///       blend's sum).
///     ggml: θ_k = p·scale^k by k float32 products with scale = powf(base, −2/r) (2 each): 3k,
///       plus k·|(2/r)·ln base| if −2/r is inexact; linear: freq_scale·θ (0 for a power of two);
///       YaRN: + 2 (the angle blend).
/// - 7 + n_m: the reference's cos/sin (1 ulp: 2) and a·c − b·s (2), our cast of cos/sin to float
///   (1) and our a·c − b·s (2); n_m: the reference's magnitude (HF: attention_scaling cast to
///   float32 and the product, 2; ggml: 1 + 0.1·logf(1/freq_scale) (2 + 1 + 1 + 1) and the
///   product, 6). Both sides round the golden's float64 inputs to float32 alike. Against a float64
///   golden (computed from the unrounded inputs) our 3 remain, plus that input rounding (1): 4.
/// Channels beyond rotary_dim pass through unchanged on both sides (only the input's float32
/// rounding may differ).
struct Float32Recipe {
  enum class Family : std::uint8_t { float64, hf, ggml };
  Family family;
  RopeScaling::Kind kind;
  double factor;

  double angle_roundings(Index k, Index r, double base) const {
    using Kind = RopeScaling::Kind;
    if (family == Family::float64 || k == 0) return 0.0;
    const auto exact_in_float32 = [](double x) { return test::round_to_float32(x) == x; };
    // × or ÷ by the factor: exact for a power of two.
    const double power_of_two_factor =
        std::exp2(std::round(std::log2(factor))) == factor ? 0.0 : 1.0;
    const double e = 2.0 * static_cast<double>(k) / static_cast<double>(r);
    if (family == Family::hf) {
      double n = 4.0;
      if (!exact_in_float32(e)) n += e * std::log(base);
      if (kind == Kind::linear) n += power_of_two_factor;
      if (kind == Kind::dynamic_ntk) n += e;
      if (kind == Kind::yarn) n += 2.0 + power_of_two_factor;
      return n;
    }
    const double step = 2.0 / static_cast<double>(r);
    double n = 3.0 * static_cast<double>(k);
    if (!exact_in_float32(step)) n += static_cast<double>(k) * step * std::log(base);
    if (kind == Kind::linear || kind == Kind::yarn) n += power_of_two_factor;
    if (kind == Kind::yarn) n += 2.0;
    return n;
  }
  double magnitude_roundings() const {
    if (family == Family::float64) return 0.0;
    if (kind != RopeScaling::Kind::yarn) return 0.0;
    return family == Family::hf ? 2.0 : 6.0;
  }
  double entry_roundings() const { return family == Family::float64 ? 4.0 : 7.0; }
};

Float32Recipe recipe_of(const GoldenCase& c, const RopeScaling& scaling) {
  using Family = Float32Recipe::Family;
  const std::string name = c.name;
  const Family family = name.find("float64") != std::string::npos ? Family::float64
                        : std::string(c.group) == "ggml_float32"  ? Family::ggml
                                                                  : Family::hf;
  return {family, scaling.kind, scaling.factor};
}

/// Float rows rotated by `rope` against a golden, entry by entry within the model above.
void expect_float_rows_near_reference(const RotaryEncoding<double>& config,
                                      const RotaryEncoding<float>& rope, const Matrix<float>& in,
                                      const Matrix<double>& want,
                                      const std::vector<Index>& positions,
                                      const Float32Recipe& recipe, const std::string& what) {
  const Matrix<float> got = rotated(rope, positions, in);
  ASSERT_TRUE(got.allFinite()) << what;
  ASSERT_EQ(got.rows(), want.rows()) << what;
  ASSERT_EQ(got.cols(), want.cols()) << what;
  const Index r = config.rotary_dim();
  const Index pairs = r / 2;
  const double m = config.magnitude();
  const double base = 10000.0;
  const bool interleaved = config.pairing() == RotaryPairing::interleaved;
  for (Index row = 0; row < got.rows(); ++row) {
    const auto p = static_cast<double>(positions[static_cast<std::size_t>(row)]);
    for (Index k = 0; k < pairs; ++k) {
      const Index i = interleaved ? 2 * k : k;
      const Index j = interleaved ? 2 * k + 1 : k + pairs;
      const double a = in(row, i);
      const double b = in(row, j);
      const double theta = config.frequencies()[static_cast<std::size_t>(k)];
      const double tolerance =
          m * (std::hypot(a, b) * test::float32_gamma(recipe.angle_roundings(k, r, base)) *
                   std::abs(p) * theta +
               (std::abs(a) + std::abs(b)) *
                   test::float32_gamma(recipe.entry_roundings() + recipe.magnitude_roundings()));
      for (const Index channel : {i, j}) {
        EXPECT_NEAR(got(row, channel), want(row, channel), tolerance)
            << what << ", row " << row << " (position " << p << "), pair " << k << ", channel "
            << channel;
      }
    }
    for (Index channel = r; channel < got.cols(); ++channel) {
      // Our float copy of the input against the golden's (some goldens keep the float64 input):
      // at most the input's rounding to float32, 1.
      EXPECT_NEAR(got(row, channel), want(row, channel),
                  test::float32_reference_tolerance(want(row, channel), 1.0))
          << what << ", pass-through channel " << channel;
    }
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
      expect_float_rows_near_reference(
          config, rope, in, test::to_matrix(golden_entry(golden, c).at(x)), positions,
          recipe_of(c, config.scaling()), std::string(c.name) + " " + x + " (float)");
    }
  }
}

TEST(RotaryEncodingGolden, FrequenciesMatchHfFloat32WhenHeadDimIsNotAPowerOfTwo) {
  // HF rounds the exponent 2k/d to float32 before the power: exact for d = 8 or 128, not for
  // d = 96 or 80 (rope_inv_freq_float32.json, tests/data/generators/rope_inv_freq_float32.py).
  const Json golden = test::load_golden("rope_inv_freq_float32.json");
  Index checked = 0;
  for (const Json& entry : golden.at("outputs")) {
    const auto d = entry.at("head_dim").get<Index>();
    const double base = entry.at("base").get<double>();
    const std::string what = "d = " + std::to_string(d) + ", base " + std::to_string(base);
    const Vector<double> want = test::to_vector(entry.at("inv_freq(float32)"));
    const RotaryEncoding<double> rope(d, {.base = base});
    ASSERT_EQ(static_cast<Index>(rope.frequencies().size()), want.size()) << what;
    const auto replay32 = hf_inv_freq(test::round_to_float32, d, base, RopeScaling::none());
    Index beyond_pow_and_reciprocal = 0;
    for (Index k = 0; k < want.size(); ++k) {
      const auto i = static_cast<std::size_t>(k);
      EXPECT_EQ(replay32[i], want[k]) << what << ", pair " << k << ": the replay is not HF's";
      // Model: fl32(2k/d) (1 rounding, amplified by |e·ln base|), the power (2), the reciprocal
      // (1); k = 0 is exact (base^0 = 1).
      const double e = 2.0 * static_cast<double>(k) / static_cast<double>(d);
      const bool exact_exponent = test::round_to_float32(e) == e;
      const double roundings = k == 0 ? 0.0 : 3.0 + (exact_exponent ? 0.0 : e * std::log(base));
      const double tolerance = test::float32_reference_tolerance(want[k], roundings);
      const double ours = rope.frequencies()[i];
      EXPECT_NEAR(ours, want[k], tolerance) << what << ", pair " << k;
      // The tolerance still catches a wrong pair index: θ_(k±1) is a factor base^(2/d) away.
      if (k + 1 < want.size()) {
        EXPECT_GT(std::abs(rope.frequencies()[i + 1] - want[k]), tolerance) << what << ", " << k;
      }
      if (k > 0) {
        EXPECT_GT(std::abs(rope.frequencies()[i - 1] - want[k]), tolerance) << what << ", " << k;
      }
      // The exponent term is needed: without it (pow and reciprocal only) some pairs fail.
      if (std::abs(ours - want[k]) > test::float32_reference_tolerance(want[k], 3.0)) {
        ++beyond_pow_and_reciprocal;
      }
      ++checked;
    }
    EXPECT_GT(beyond_pow_and_reciprocal, 0) << what;
  }
  EXPECT_EQ(checked, 48 + 40 + 48);
}

TEST(RotaryEncodingPairing, DefaultIsHalfLikeHfRotateHalf) {
  // HF transformers' rotate_half: pair k = channels (k, k + r/2); checked against the rotation
  // written out by hand, θ_k = 10000^(−2k/r).
  EXPECT_EQ(RotaryOptions{}.pairing, RotaryPairing::half);
  EXPECT_EQ(RotaryEncoding<double>(8).pairing(), RotaryPairing::half);
  // XPos keeps torchscale's (its paper's code) interleaved pairs.
  EXPECT_EQ(XPosOptions{}.pairing, RotaryPairing::interleaved);
  auto rng = test::make_rng(107);
  const Matrix<double> x = test::random_heads<double>(1, 3, 10, rng).head(0);
  const std::vector<Index> positions = {0, 3, 1001};
  for (const Index r : {Index{10}, Index{6}}) {
    const RotaryEncoding<double> rope(10, {.rotary_dim = r});
    const Matrix<double> y = rotated(rope, positions, x);
    const Index half = r / 2;
    for (Index row = 0; row < 3; ++row) {
      const auto p = static_cast<double>(positions[static_cast<std::size_t>(row)]);
      for (Index k = 0; k < half; ++k) {
        const double phi =
            p * std::pow(10000.0, -2.0 * static_cast<double>(k) / static_cast<double>(r));
        const double a = x(row, k);
        const double b = x(row, k + half);
        // Both sides form φ in double (θ_k within 2 ulps of each other, a half-ulp product: under
        // 2^-50·φ apart); cos, sin and the two products add a few ulps of |a| + |b|.
        const double tolerance = (std::abs(a) + std::abs(b)) * 0x1p-50 * (phi + 1.0);
        EXPECT_NEAR(y(row, k), a * std::cos(phi) - b * std::sin(phi), tolerance)
            << "r " << r << ", row " << row << ", pair " << k;
        EXPECT_NEAR(y(row, k + half), a * std::sin(phi) + b * std::cos(phi), tolerance)
            << "r " << r << ", row " << row << ", pair " << k;
      }
      for (Index c = r; c < 10; ++c) EXPECT_EQ(y(row, c), x(row, c));
    }
  }
  // The float encoder too, and the default differs from interleaved on the same input.
  const Matrix<float> xf = x.cast<float>();
  const RotaryEncoding<float> by_default(10);
  const RotaryEncoding<float> half(10, {.pairing = RotaryPairing::half});
  const RotaryEncoding<float> interleaved(10, {.pairing = RotaryPairing::interleaved});
  EXPECT_EQ(rotated(by_default, positions, xf), rotated(half, positions, xf));
  EXPECT_NE(rotated(by_default, positions, xf), rotated(interleaved, positions, xf));
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
  const RotaryEncoding<Scalar> interleaved(
      d, {.rotary_dim = r, .pairing = RotaryPairing::interleaved});
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
  const RotaryEncoding<float> rope(d, {.pairing = RotaryPairing::interleaved});  // pairs (2k, 2k+1)
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
  const RotaryEncoding<double> exact(d, {.pairing = RotaryPairing::interleaved});
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

// Scalings outside their domain are rejected (HF warns about the YaRN ones): YaRN with
// beta_fast < beta_slow or factor < 1, dynamic NTK with a negative sequence length.
TEST(RotaryEncodingErrors, RejectsScalingsOutsideTheirDomain) {
  using E = RotaryEncoding<float>;
  POSENC_EXPECT_INVALID(
      E(8, {.scaling = RopeScaling::yarn(4.0, 4096, {.beta_fast = 1.0, .beta_slow = 32.0})}),
      "posenc::RotaryEncoding", "beta_fast must be >= beta_slow", "beta_fast 1 < beta_slow 32");
  POSENC_EXPECT_INVALID(E(8, {.scaling = RopeScaling::yarn(0.5, 4096)}), "posenc::RotaryEncoding",
                        "YaRN factor must be >= 1", "got 0.5");
  POSENC_EXPECT_INVALID(E(8, {.scaling = RopeScaling::dynamic_ntk(4.0, 4096, -1)}),
                        "posenc::RotaryEncoding", "sequence_length must be >= 0", "got -1");
  const E dynamic(8, {.scaling = RopeScaling::dynamic_ntk(4.0, 4096, 0)});
  POSENC_EXPECT_INVALID(dynamic.for_sequence_length(-5),
                        "posenc::RotaryEncoding::for_sequence_length", "got -5");
  // The boundaries stay accepted: factor 1, equal betas, sequence length 0.
  EXPECT_NO_THROW(E(8, {.scaling = RopeScaling::yarn(1.0, 4096)}));
  EXPECT_NO_THROW(
      E(8, {.scaling = RopeScaling::yarn(2.0, 4096, {.beta_fast = 4.0, .beta_slow = 4.0})}));
  EXPECT_NO_THROW(dynamic.for_sequence_length(0));
}

}  // namespace
}  // namespace posenc
