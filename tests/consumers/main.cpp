// SPDX-License-Identifier: MIT
// The program every packaging consumer builds (add_subdirectory, FetchContent, find_package,
// pkg-config): a few lines of the public API, exit status 1 if streaming and reference disagree.
#include <posenc/posenc.hpp>

#include <cmath>
#include <cstdio>

#ifndef POSENC_CONSUMER
#define POSENC_CONSUMER "unknown"
#endif

int main() {
  using posenc::Index;
  const Index heads = 2, tokens = 37, dim = 8;
  posenc::Heads<float> q(heads, tokens, dim), k(heads, tokens, dim), v(heads, tokens, dim);
  for (Index h = 0; h < heads; ++h) {
    for (Index i = 0; i < tokens; ++i) {
      for (Index d = 0; d < dim; ++d) {
        const auto x = static_cast<double>(1 + h * tokens * dim + i * dim + d);
        q(h, i, d) = static_cast<float>(std::sin(0.37 * x));
        k(h, i, d) = static_cast<float>(std::cos(0.23 * x));
        v(h, i, d) = static_cast<float>(std::sin(0.11 * x + 1.0));
      }
    }
  }

  // Small tiles so the streaming kernel crosses tile edges and skips tiles the mask forbids.
  const posenc::AttentionOptions options{
      .mask = posenc::Mask::causal(), .query_block = 8, .key_block = 5};
  const posenc::Heads<float> streamed = posenc::attention(q, k, v, options);
  const posenc::Heads<float> reference = posenc::attention_reference(q, k, v, options);

  const float error = (streamed.flat() - reference.flat()).cwiseAbs().maxCoeff();
  const bool ok = streamed.flat().allFinite() && error <= 1e-5F;
  std::printf(
      "posenc consumer (%s): causal attention, streaming vs reference max |diff| %.2g: %s\n",
      POSENC_CONSUMER, static_cast<double>(error), ok ? "ok" : "MISMATCH");
  return ok ? 0 : 1;
}
