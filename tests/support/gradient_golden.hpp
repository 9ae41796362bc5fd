// SPDX-License-Identifier: MIT
// Golden gradient cases (tests/data/grad_*.json, PyTorch autograd in float64): the mask of a
// case, the per-element comparison, and one forward + streaming backward + reference backward
// checked against out, lse, dq, dk and dv.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "posenc/attention_backward.hpp"
#include "support/golden.hpp"

namespace posenc::test {

/// The mask of a golden case's config.
inline Mask golden_mask(const Json& config) {
  const auto& m = config.at("mask");
  const std::string kind = m.at("kind").get<std::string>();
  if (kind == "none") return Mask::none();
  if (kind == "causal") return Mask::causal();
  if (kind == "sliding_window") return Mask::sliding_window(m.at("window").get<Index>());
  if (kind == "blockwise_causal") return Mask::blockwise_causal(m.at("window").get<Index>());
  throw std::runtime_error("unknown mask kind " + kind);
}

/// max over elements of |a − b| / max(|b|, floor): relative per element, with an absolute floor
/// for entries that are exactly or nearly zero in the golden.
template <class A, class B>
double elementwise_error(const A& a, const B& b, double floor = 1e-3) {
  double worst = 0.0;
  for (Index i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a.data()[i]);
    const double y = static_cast<double>(b.data()[i]);
    worst = std::max(worst, std::abs(x - y) / std::max(std::abs(y), floor));
  }
  return worst;
}

constexpr double gradient_golden_tolerance = 1e-10;

/// Runs attention_forward, attention_backward and attention_backward_reference on a golden case
/// and checks out, lse, dq, dk, dv against the golden; returns both backwards' gradients (the
/// caller checks the encoder's parameters).
template <class Encoder>
struct GoldenGradients {
  AttentionGradients<double, Encoder> streamed;
  AttentionGradients<double, Encoder> reference;
};

template <class Encoder>
GoldenGradients<Encoder> check_golden_case(const Json& c, const Encoder& encoder,
                                           const std::string& label) {
  const auto& config = c.at("config");
  const auto& inputs = c.at("inputs");
  const auto& outputs = c.at("outputs");
  const Heads<double> q = to_heads(inputs.at("q"));
  const Heads<double> k = to_heads(inputs.at("k"));
  const Heads<double> v = to_heads(inputs.at("v"));
  const Heads<double> dout = to_heads(inputs.at("dO"));
  const AttentionOptions options{.mask = golden_mask(config),
                                 .query_offset = config.at("query_offset").get<Index>(),
                                 .scale = config.at("scale").get<double>()};
  const AttentionForward<double> forward = attention_forward(q, k, v, encoder, options);
  const Heads<double> out = to_heads(outputs.at("out"));
  const Matrix<double> lse = to_matrix(outputs.at("lse"));
  EXPECT_LT(elementwise_error(forward.out.flat(), out.flat()), gradient_golden_tolerance) << label;
  EXPECT_LT(elementwise_error(forward.lse, lse), gradient_golden_tolerance) << label;
  const auto grads = attention_backward(q, k, v, encoder, forward.out, forward.lse, dout, options);
  const auto reference = attention_backward_reference(q, k, v, encoder, dout, options);
  const char* names[] = {"dq", "dk", "dv"};
  const Heads<double>* streamed[] = {&grads.dq, &grads.dk, &grads.dv};
  const Heads<double>* oracle[] = {&reference.dq, &reference.dk, &reference.dv};
  for (int i = 0; i < 3; ++i) {
    const Heads<double> expected = to_heads(outputs.at(names[i]));
    EXPECT_LT(elementwise_error(streamed[i]->flat(), expected.flat()), gradient_golden_tolerance)
        << label << " " << names[i] << " (streaming)";
    EXPECT_LT(elementwise_error(oracle[i]->flat(), expected.flat()), gradient_golden_tolerance)
        << label << " " << names[i] << " (reference)";
  }
  return {grads, reference};
}

}  // namespace posenc::test
