// SPDX-License-Identifier: MIT
// Shared by the sineSPE and convSPE tests: reads the SPE golden files' [batch][pos][head][...]
// arrays, checks an encoder against every output they record (codes aside), and measures the
// Monte-Carlo error of the mean logits against the closed-form expectation.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "posenc/attention.hpp"
#include "posenc/linear_attention.hpp"
#include "support/golden.hpp"
#include "support/test_support.hpp"

namespace posenc::test {

/// Golden tolerance in double: the reference is float64 and the formulas are short sums.
inline constexpr double golden_tolerance = 1e-12;

/// Checks q̂, k̂, logits, causal softmax (kernel default scale 1/sqrt(R), plus odd tiles),
/// causal elu+1 linear attention (plus a small chunk) and the closed-form expectation for
/// `encoder` against outputs[mode] of a golden SPE file.
template <class Encoder>
void check_spe_outputs(const Json& golden, const Encoder& encoder, const std::string& mode) {
  const Json& inputs = golden.at("inputs");
  const Json& outputs = golden.at("outputs");
  const Json& expected = outputs.at(mode);
  const auto batches = static_cast<Index>(inputs.at("queries").size());
  for (Index b = 0; b < batches; ++b) {
    SCOPED_TRACE(mode + " batch " + std::to_string(b));
    const auto bi = static_cast<std::size_t>(b);
    const Heads<double> q = tokens_to_heads(inputs.at("queries").at(bi));
    const Heads<double> k = tokens_to_heads(inputs.at("keys").at(bi));
    const Heads<double> v = tokens_to_heads(inputs.at("values").at(bi));

    const Heads<double> q_hat = encoder.filter_queries(q);
    const Heads<double> k_hat = encoder.filter_keys(k);
    EXPECT_LE(relative_error(q_hat.flat(), tokens_to_heads(expected.at("qhat").at(bi)).flat()),
              golden_tolerance);
    EXPECT_LE(relative_error(k_hat.flat(), tokens_to_heads(expected.at("khat").at(bi)).flat()),
              golden_tolerance);

    const Heads<double> logits_expected = to_heads(expected.at("logits_qhat_khat").at(bi));
    for (Index h = 0; h < q.heads(); ++h) {
      const Matrix<double> logits = q_hat.head(h) * k_hat.head(h).transpose();
      EXPECT_LE(relative_error(logits, logits_expected.head(h)), golden_tolerance);
    }

    const Heads<double> probs_expected =
        to_heads(expected.at("causal_softmax_probs_temp_1_over_sqrt_R").at(bi));
    EXPECT_LE(relative_error(attention_weights(q, k, v, encoder).flat(), probs_expected.flat()),
              golden_tolerance);
    const Heads<double> softmax_expected =
        tokens_to_heads(expected.at("causal_softmax_out").at(bi));
    EXPECT_LE(relative_error(attention(q, k, v, encoder).flat(), softmax_expected.flat()),
              golden_tolerance);
    const Heads<double> tiled =
        attention(q, k, v, encoder, AttentionOptions{.query_block = 3, .key_block = 4});
    EXPECT_LE(relative_error(tiled.flat(), softmax_expected.flat()), golden_tolerance);

    const Heads<double> linear_expected =
        tokens_to_heads(expected.at("causal_linear_elu1_out").at(bi));
    EXPECT_LE(relative_error(linear_attention(q, k, v, EluPlusOne{}, encoder).flat(),
                             linear_expected.flat()),
              golden_tolerance);
    EXPECT_LE(relative_error(linear_attention(q, k, v, EluPlusOne{}, encoder, {.chunk = 3}).flat(),
                             linear_expected.flat()),
              golden_tolerance);

    const Heads<double> mean = expected_logits(encoder, q, k);
    EXPECT_LE(
        relative_error(mean.flat(), to_heads(outputs.at("expected_logits_" + mode).at(bi)).flat()),
        golden_tolerance);
  }
}

/// The query and key codes at every position and head equal the golden's `qbar` / `kbar`
/// ([position][head][D][R]).
template <class Spe>
void expect_codes_match(const Json& json, const Spe& spe, Index length) {
  const Json& outputs = json.at("outputs");
  for (Index m = 0; m < length; ++m) {
    for (Index h = 0; h < spe.heads(); ++h) {
      const auto mi = static_cast<std::size_t>(m);
      const auto hi = static_cast<std::size_t>(h);
      EXPECT_LE(relative_error(spe.query_code(h, m), to_matrix(outputs.at("qbar").at(mi).at(hi))),
                golden_tolerance);
      EXPECT_LE(relative_error(spe.key_code(h, m), to_matrix(outputs.at("kbar").at(mi).at(hi))),
                golden_tolerance);
    }
  }
}

/// Monte-Carlo error of q̂·k̂ against expected_logits, relative to the RMS of the expectation:
/// `per_draw` is the RMS error of one draw (averaged in square over the draws, so that it is a
/// stable estimate of the 1/sqrt(R) law), `of_mean` the error of the mean over the draws.
struct MonteCarloError {
  double per_draw;
  double of_mean;
};

/// Queries at query_first + i and keys at key_first + j; `make(seed)` builds an encoder.
template <class MakeEncoder>
MonteCarloError monte_carlo_error(MakeEncoder make, int draws, const Heads<double>& q,
                                  const Heads<double>& k, Index query_first, Index key_first) {
  Heads<double> mean(q.heads(), q.rows(), k.rows());
  Heads<double> expected;
  double squared_error = 0.0;
  for (int s = 0; s < draws; ++s) {
    const auto encoder = make(static_cast<std::uint64_t>(1000 + s));
    if (s == 0) expected = expected_logits(encoder, q, k, query_first - key_first);
    const Heads<double> q_hat = encoder.filter_queries(q, query_first);
    const Heads<double> k_hat = encoder.filter_keys(k, key_first);
    for (Index h = 0; h < q.heads(); ++h) {
      // lazyProduct: a plain loop, not Eigen's threaded GEMM (R is long, the result tiny).
      const Matrix<double> logits = q_hat.head(h).lazyProduct(k_hat.head(h).transpose());
      EXPECT_TRUE(logits.allFinite());
      squared_error += (logits - expected.head(h)).squaredNorm();
      mean.head(h) += logits / static_cast<double>(draws);
    }
  }
  const double scale = expected.flat().norm();
  return {std::sqrt(squared_error / draws) / scale, (mean.flat() - expected.flat()).norm() / scale};
}

/// The 1/sqrt(R) law, ungated and gated: 16 draws at R = 256 and at R = 4096 (16x the
/// realizations: 4x less error; over 80 seeds the ratio stayed within 3.2 … 4.8), and the mean
/// of the 16 draws ~4x closer than one draw and close to the closed form.
/// `make(realizations, seed, gated)` builds the encoder.
template <class MakeEncoder>
void expect_error_falls_as_one_over_sqrt_r(MakeEncoder make, const Heads<double>& q,
                                           const Heads<double>& k) {
  for (const bool gated : {false, true}) {
    SCOPED_TRACE(gated ? "gated" : "ungated");
    MonteCarloError errors[2];
    const Index realizations[2] = {256, 4096};
    for (int i = 0; i < 2; ++i) {
      errors[i] = monte_carlo_error(
          [&](std::uint64_t seed) { return make(realizations[i], seed, gated); }, 16, q, k, 0, 0);
    }
    const double ratio = errors[0].per_draw / errors[1].per_draw;
    EXPECT_GT(ratio, 2.8);
    EXPECT_LT(ratio, 5.7);
    EXPECT_LT(errors[1].of_mean, 0.6 * errors[1].per_draw);
    EXPECT_LT(errors[1].of_mean, 0.05);
  }
}

}  // namespace posenc::test
