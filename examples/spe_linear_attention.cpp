// SPDX-License-Identifier: MIT
// Stochastic positional encoding (sineSPE) with linear attention: a prompt in one pass, then
// decoding token by token with the same random draw; the same encoder in softmax attention;
// and the relative kernel the draws average to.
#include <cmath>
#include <iostream>
#include <random>

#include "posenc/attention.hpp"
#include "posenc/encoders/sine_spe.hpp"
#include "posenc/linear_attention.hpp"

int main() {
  using namespace posenc;
  const Index heads = 4, dim = 32, realizations = 64, prompt = 256, decode = 8;

  std::mt19937_64 engine(7);
  std::normal_distribution<float> normal;
  auto random = [&](Index rows, Index width) {
    Heads<float> x(heads, rows, width);
    for (Index i = 0; i < x.flat().size(); ++i) x.flat()[i] = normal(engine);
    return x;
  };
  const Heads<float> q = random(prompt + decode, dim);
  const Heads<float> k = random(prompt + decode, dim);
  const Heads<float> v = random(prompt + decode, dim);

  // sineSPE: K = 10 sines per feature, R = 64 realizations, gated (gate 0: half code, half
  // position-free noise). Queries and keys become R wide; FAVOR+ then works on width R.
  const SineSpe<float> spe(SineSpeParameters<float>::initial(heads, dim, 10, /*seed=*/1),
                           realizations, /*seed=*/2, Matrix<float>::Zero(heads, dim));
  const Favor<float> favor(realizations, /*features=*/128, /*seed=*/3);

  // Prompt in one pass, then one token at a time: the state holds O(F·Dv) per head and the
  // encoder's draw, so every step sees the same codes.
  LinearAttentionState<float, Favor<float>, SineSpe<float>> decoder(favor, spe);
  decoder.append(q.view().middle_rows(0, prompt), k.view().middle_rows(0, prompt),
                 v.view().middle_rows(0, prompt));
  const Heads<float> all = linear_attention(q, k, v, favor, spe);  // causal, one pass
  double worst = 0.0;
  for (Index t = prompt; t < prompt + decode; ++t) {
    const Heads<float> out = decoder.step(q.view().middle_rows(t, 1), k.view().middle_rows(t, 1),
                                          v.view().middle_rows(t, 1));
    for (Index h = 0; h < heads; ++h) {
      worst = std::max(
          worst,
          static_cast<double>((out.head(h) - all.head(h).middleRows(t, 1)).cwiseAbs().maxCoeff()));
    }
  }
  std::cout << "decoding vs one pass, max |difference|: " << worst << "\n";

  // The same encoder in softmax attention (default scale 1/sqrt(R), the reference's pairing).
  const Heads<float> softmax = attention(q, k, v, spe);
  std::cout << "softmax attention with sineSPE, out[0, last, 0:3]: "
            << softmax.head(0).row(prompt + decode - 1).head(3) << "\n";

  // The draws average to a relative kernel: E[q̂_m·k̂_n] depends on q, k and m − n only.
  const Heads<float> mean =
      expected_logits(spe, q.view().middle_rows(0, 4), k.view().middle_rows(0, 4));
  std::cout << "E[q̂·k̂] for head 0, queries 0-3 x keys 0-3:\n" << mean.head(0) << "\n";
  return worst < 1e-3 ? 0 : 1;
}
