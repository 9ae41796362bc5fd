// SPDX-License-Identifier: MIT
// Quickstart: causal attention over [heads, tokens, dim] tensors with the streaming kernel, checked
// against the materialising reference, with the memory each one needs.
#include <chrono>
#include <cstdio>
#include <random>
#include <string_view>
#include <utility>
#include <vector>

#include <posenc/posenc.hpp>

int main(int argc, char** argv) {
  using namespace posenc;
  // --quick (used by CTest): smaller sizes, same check.
  const bool quick = argc > 1 && std::string_view(argv[1]) == "--quick";
  const std::vector<Index> lengths =
      quick ? std::vector<Index>{64, 256} : std::vector<Index>{256, 1024, 2048};
  const Index heads = 8;
  const Index dim = 64;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal;

  std::printf("posenc quickstart: causal attention, %ld heads, head dim %ld, float\n\n",
              static_cast<long>(heads), static_cast<long>(dim));
  std::printf("%8s  %14s  %14s  %12s  %16s\n", "tokens", "streaming [ms]", "reference [ms]",
              "max |diff|", "N x N logits [MiB]");
  for (const Index tokens : lengths) {
    Heads<float> q(heads, tokens, dim), k(heads, tokens, dim), v(heads, tokens, dim);
    for (Heads<float>* x : {&q, &k, &v}) {
      for (Index i = 0; i < x->flat().size(); ++i) x->flat()[i] = normal(rng);
    }
    const auto time = [](auto&& run) {
      const auto start = std::chrono::steady_clock::now();
      auto result = run();
      const std::chrono::duration<double, std::milli> elapsed =
          std::chrono::steady_clock::now() - start;
      return std::pair{std::move(result), elapsed.count()};
    };
    // Causal is the default mask; NoPositionalEncoding is the default encoder.
    const auto [streamed, stream_ms] = time([&] { return attention(q, k, v); });
    const auto [expected, reference_ms] = time([&] { return attention_reference(q, k, v); });
    const double diff = (streamed.flat() - expected.flat()).cwiseAbs().maxCoeff();
    const double logits_mib = static_cast<double>(heads * tokens * tokens) * 4.0 / (1 << 20);
    std::printf("%8ld  %14.2f  %14.2f  %12.2e  %16.1f\n", static_cast<long>(tokens), stream_ms,
                reference_ms, diff, logits_mib);
    if (!(diff < 1e-4)) {
      std::printf("mismatch between the streaming kernel and the reference\n");
      return 1;
    }
  }
  std::printf("\nThe streaming kernel never materialises the N x N logits; the reference does.\n");
  return 0;
}
