// SPDX-License-Identifier: MIT
// Converting a checkpoint between RoPE pairings: a model trained with interleaved pairs (Meta
// LLaMA, GPT-J, llama.cpp NORMAL) runs with half-split RoPE (HF Llama's rotate_half, NeoX) once
// the q and k projection rows of every head are permuted by rotary_half_permutation. The program
// converts random projections and checks that the attention logits agree.
#include <posenc/encoders/rope.hpp>

#include <cstdio>
#include <vector>

int main() {
  using namespace posenc;
  const Index heads = 4, dim = 32, rotary_dim = 24, embed = heads * dim, tokens = 16;
  const Matrix<double> w_q = Matrix<double>::Random(embed, embed);  // [out, in], rows = h·dim + j
  const Matrix<double> w_k = Matrix<double>::Random(embed, embed);
  const Matrix<double> x = Matrix<double>::Random(tokens, embed);

  // The conversion: row j of each head's block comes from row perm[j] of the original block.
  const std::vector<Index> perm = rotary_half_permutation(dim, rotary_dim);
  auto convert = [&](const Matrix<double>& w) {
    Matrix<double> out(w.rows(), w.cols());
    for (Index h = 0; h < heads; ++h) {
      for (Index j = 0; j < dim; ++j)
        out.row(h * dim + j) = w.row(h * dim + perm[static_cast<std::size_t>(j)]);
    }
    return out;
  };
  const Matrix<double> w_q_half = convert(w_q), w_k_half = convert(w_k);

  const RotaryEncoding<double> interleaved(
      dim, {.rotary_dim = rotary_dim, .pairing = RotaryPairing::interleaved});
  const RotaryEncoding<double> half(dim,
                                    {.rotary_dim = rotary_dim, .pairing = RotaryPairing::half});
  std::vector<Index> positions(tokens);
  for (Index t = 0; t < tokens; ++t) positions[static_cast<std::size_t>(t)] = 1000 + 37 * t;

  double worst = 0;
  for (Index h = 0; h < heads; ++h) {
    auto logits = [&](const RotaryEncoding<double>& rope, const Matrix<double>& wq,
                      const Matrix<double>& wk) {
      const Matrix<double> q = x * wq.middleRows(h * dim, dim).transpose();  // [tokens, dim]
      const Matrix<double> k = x * wk.middleRows(h * dim, dim).transpose();
      Matrix<double> q_rot(tokens, dim), k_rot(tokens, dim);
      rope.transform_queries(h, positions, 0, q, q_rot);
      rope.transform_keys(h, positions, 0, k, k_rot);
      return Matrix<double>(q_rot * k_rot.transpose());
    };
    const Matrix<double> a = logits(interleaved, w_q, w_k);
    const Matrix<double> b = logits(half, w_q_half, w_k_half);
    worst = std::max(worst, (a - b).cwiseAbs().maxCoeff() / a.cwiseAbs().maxCoeff());
  }
  std::printf(
      "interleaved checkpoint vs converted half-split checkpoint: max relative logit "
      "difference %.3g\n",
      worst);
  return worst <= 1e-12 ? 0 : 1;
}
