// SPDX-License-Identifier: MIT
// Token-by-token decoding with a KvCache and RoPE: each step appends the new token's key and
// value and attends its query. The result equals one causal attention pass over the whole
// sequence, which the program checks.
#include <posenc/attention.hpp>
#include <posenc/encoders/rope.hpp>
#include <posenc/kv_cache.hpp>

#include <cstdio>
#include <random>

int main() {
  using namespace posenc;
  const Index heads = 8, kv_heads = 2, dim = 64, tokens = 200;  // grouped-query attention
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  auto random = [&](Index h) {
    Heads<float> x(h, tokens, dim);
    for (Index i = 0; i < x.flat().size(); ++i) x.flat()[i] = normal(rng);
    return x;
  };
  const Heads<float> q = random(heads), k = random(kv_heads), v = random(kv_heads);
  const RotaryEncoding<float> rope(dim, {.base = 500000, .pairing = RotaryPairing::half});

  // Decoding: three lines per token. Keys are rotated once, when appended.
  KvCache cache(rope, kv_heads, dim);
  Heads<float> decoded(heads, tokens, dim);
  for (Index t = 0; t < tokens; ++t) {
    cache.append(k.view().middle_rows(t, 1), v.view().middle_rows(t, 1));  // position t
    const Heads<float> o = cache.attend(q.view().middle_rows(t, 1));       // query at t
    for (Index h = 0; h < heads; ++h) decoded.head(h).row(t) = o.head(h).row(0);
  }

  const Heads<float> full = attention(q, k, v, rope);  // one causal pass
  const float error = (decoded.flat() - full.flat()).cwiseAbs().maxCoeff();
  std::printf("decoded %lld tokens; max |decoded - one causal pass| = %.3g\n",
              static_cast<long long>(tokens), static_cast<double>(error));
  return error <= 1e-5f ? 0 : 1;
}
