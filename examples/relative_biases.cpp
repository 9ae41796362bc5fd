// SPDX-License-Identifier: MIT
// Relative-position biases plugged into the streaming attention kernel: ALiBi, T5, KERPLE, FIRE,
// Shaw's relative keys/values, and a composition of two biases. Prints, per encoder, how much
// attention the last query pays to the most recent 16 keys.
#include <cstdio>
#include <random>

#include "posenc/attention.hpp"
#include "posenc/compose.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/fire.hpp"
#include "posenc/encoders/kerple.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/t5_bias.hpp"

int main() {
  using namespace posenc;
  constexpr Index heads = 8, tokens = 512, dim = 64;
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal;
  Heads<float> q(heads, tokens, dim), k(heads, tokens, dim), v(heads, tokens, dim);
  for (Heads<float>* x : {&q, &k, &v}) {
    for (Index i = 0; i < x->flat().size(); ++i) x->flat()[i] = normal(rng);
  }

  // Fixed or learned parameters; random() draws the reference initialisation from a seed.
  const Alibi<float> alibi(heads);  // slopes of the ALiBi paper, causal form −m(i − j)
  const auto t5 = T5RelativeBias<float>::random(heads, 1.0, rng, {.bidirectional = false});
  const auto kerple = Kerple<float>::random(KerpleKernel::log, heads, rng);
  const auto fire = Fire<float>::random(heads, 32, rng);  // MLP 1 → 32 → heads
  const auto shaw = ShawRelative<float>::random(16, dim, dim, ShawValues::separate, rng);

  const auto recent_mass = [&](const char* name, const auto& encoder, AttentionOptions options) {
    const Heads<float> out = attention(q, k, v, encoder, options);  // streaming, O(tile) memory
    const Heads<float> w = attention_weights(q, k, v, encoder, options);
    double mass = 0;
    for (Index h = 0; h < heads; ++h) {
      for (Index j = tokens - 16; j < tokens; ++j) mass += w(h, tokens - 1, j);
    }
    std::printf("%-16s out[0, last, 0] = %+.4f   weight on the last 16 keys = %.3f\n", name,
                out(0, tokens - 1, 0), mass / heads);
  };
  recent_mass("NoPE", NoPositionalEncoding{}, {});
  recent_mass("ALiBi", alibi, {});
  recent_mass("T5 (scale 1)", t5, {.scale = 1.0});  // T5 has no 1/sqrt(d)
  recent_mass("KERPLE-log", kerple, {});
  recent_mass("FIRE", fire, {});
  recent_mass("Shaw", shaw, {});
  recent_mass("ALiBi + KERPLE", compose(alibi, kerple), {});  // biases add
  return 0;
}
