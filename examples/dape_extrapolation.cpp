// SPDX-License-Identifier: MIT
// DAPE over ALiBi at lengths far beyond training: built from PyTorch-layout weights (here
// PyTorch's default initialisation from a seed: untrained, so the numbers show the mechanics, not
// quality), checked against the materialising reference, streamed where the authors' code would
// hold ~120 N × N planes per layer, and decoded token by token through a KV cache.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string_view>
#include <vector>

#include <posenc/encoders/alibi.hpp>
#include <posenc/encoders/dape.hpp>
#include <posenc/posenc.hpp>

namespace {

using namespace posenc;

Heads<float> random_heads(Index heads, Index tokens, Index dim, std::mt19937_64& rng) {
  std::normal_distribution<float> normal;
  Heads<float> x(heads, tokens, dim);
  for (Index i = 0; i < x.flat().size(); ++i) x.flat()[i] = normal(rng);
  return x;
}

/// Mean distance i − j from the last query to the keys it attends to, averaged over heads.
template <class Encoder>
double mean_attended_distance(const Heads<float>& q, const Heads<float>& k, const Heads<float>& v,
                              const Encoder& encoder) {
  const Index n = q.rows();
  const Heads<float> p =
      attention_weights(q.view().middle_rows(n - 1, 1), k, v, encoder, {.query_offset = n - 1});
  double sum = 0.0;
  for (Index h = 0; h < p.heads(); ++h) {
    for (Index j = 0; j < n; ++j)
      sum += static_cast<double>(p.head(h)(0, j)) * static_cast<double>(n - 1 - j);
  }
  return sum / static_cast<double>(p.heads());
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string_view(argv[1]) == "--quick";
  const std::vector<Index> lengths =
      quick ? std::vector<Index>{256, 1024} : std::vector<Index>{512, 4096, 16384};
  constexpr Index heads = 8;
  constexpr Index dim = 64;
  constexpr Index width = 32;
  std::mt19937_64 rng(2024);

  // DAPE-ALiBi as the authors' AliBi_C: causal ALiBi with float32 slopes, then an MLP over the
  // 2H channels [A; B]. Trained weights would be passed as DapeWeights{w1, b1, w2, b2}, the
  // tensors of nn.Linear(2H, W) and nn.Linear(W, H) as they are.
  const Alibi<float> alibi(heads, BiasForm::causal, AlibiSlopes::float32);
  const auto dape = Dape<float, Alibi<float>>::random(alibi, width, rng);

  // 1. Streaming equals the reference (which materialises every N × N score matrix).
  {
    const Heads<float> q = random_heads(heads, 200, dim, rng);
    const Heads<float> k = random_heads(heads, 200, dim, rng);
    const Heads<float> v = random_heads(heads, 200, dim, rng);
    const double diff =
        (attention(q, k, v, dape).flat() - attention_reference(q, k, v, dape).flat())
            .cwiseAbs()
            .maxCoeff();
    std::printf("DAPE-ALiBi, %ld heads, head dim %ld, MLP width %ld, float\n", long{heads},
                long{dim}, long{width});
    std::printf("streaming vs reference at N = 200: max |diff| = %.2e\n\n", diff);
    if (!(diff < 1e-4)) return 1;
  }

  // 2. Long sequences, streamed tile by tile.
  std::printf("%8s  %14s  %20s  %24s\n", "tokens", "streaming [ms]", "authors' N x N [GiB]",
              "mean distance ALiBi/DAPE");
  for (const Index n : lengths) {
    const Heads<float> q = random_heads(heads, n, dim, rng);
    const Heads<float> k = random_heads(heads, n, dim, rng);
    const Heads<float> v = random_heads(heads, n, dim, rng);
    const auto start = std::chrono::steady_clock::now();
    const Heads<float> out = attention(q, k, v, dape);
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (!out.flat().allFinite()) return 1;
    const double planes = 7.0 * heads + 2.0 * width;  // A, B, [A;B] twice, hidden twice, f
    const double gib = planes * static_cast<double>(n) * static_cast<double>(n) * 4.0 / (1 << 30);
    std::printf("%8ld  %14.1f  %20.2f  %11.1f / %.1f\n", static_cast<long>(n), ms, gib,
                mean_attended_distance(q, k, v, alibi), mean_attended_distance(q, k, v, dape));
  }

  // 3. Decoding: one token at a time through a KV cache equals one causal pass (DAPE is
  // pointwise in (i, j)).
  const Index n = quick ? 64 : 256;
  const Heads<float> q = random_heads(heads, n, dim, rng);
  const Heads<float> k = random_heads(heads, n, dim, rng);
  const Heads<float> v = random_heads(heads, n, dim, rng);
  const Heads<float> full = attention(q, k, v, dape);
  KvCache<float, Dape<float, Alibi<float>>> cache(dape, heads, dim);
  double worst = 0.0;
  for (Index t = 0; t < n; ++t) {
    cache.append(k.view().middle_rows(t, 1), v.view().middle_rows(t, 1));
    const Heads<float> o = cache.attend(q.view().middle_rows(t, 1));
    for (Index h = 0; h < heads; ++h) {
      worst =
          std::max<double>(worst, (o.head(h).row(0) - full.head(h).row(t)).cwiseAbs().maxCoeff());
    }
  }
  std::printf("\ndecoding %ld tokens through KvCache vs one pass: max |diff| = %.2e\n",
              static_cast<long>(n), worst);
  return worst < 1e-4 ? 0 : 1;
}
