// SPDX-License-Identifier: MIT
// Writing your own encoder: a per-head Cauchy distance bias b_h(i, j) = −log(1 + ((i − j)/w_h)²)
// is a ScoreBias in ~30 lines (heads, bias, add_bias). The streaming kernel takes it as it takes
// ALiBi; the program checks it against attention_reference and asks the analysis tools for its
// theoretical receptive field (the generic TRF of any additive bias of the distance).
#include <cmath>
#include <cstdio>
#include <random>
#include <string_view>
#include <vector>

#include <posenc/posenc.hpp>

/// b_h(i, j) = −log(1 + ((i − j)/w_h)²): a heavy-tailed (Cauchy-shaped) decay with width w_h.
template <class T>
class CauchyBias {
 public:
  using Scalar = T;
  explicit CauchyBias(std::vector<double> widths) : widths_(std::move(widths)) {}

  posenc::Index heads() const { return static_cast<posenc::Index>(widths_.size()); }

  T bias(posenc::Index head, posenc::Index i, posenc::Index j) const {
    const double x = static_cast<double>(i - j) / widths_[static_cast<std::size_t>(head)];
    return static_cast<T>(-std::log1p(x * x));  // formed in double, cast last
  }

  /// Adds the bias to a tile of logits: rows are queries at qpos, columns keys at kpos.
  void add_bias(posenc::Index head, posenc::Positions qpos, posenc::Positions kpos,
                posenc::TileRef<T> tile) const {
    for (posenc::Index r = 0; r < tile.rows(); ++r) {
      for (posenc::Index c = 0; c < tile.cols(); ++c) {
        tile(r, c) +=
            bias(head, qpos[static_cast<std::size_t>(r)], kpos[static_cast<std::size_t>(c)]);
      }
    }
  }

 private:
  std::vector<double> widths_;
};
static_assert(posenc::ScoreBias<CauchyBias<float>>);

int main(int argc, char** argv) {
  using namespace posenc;
  const bool quick = argc > 1 && std::string_view(argv[1]) == "--quick";
  const Index heads = 4, tokens = quick ? 300 : 2000, dim = 64;
  std::mt19937_64 rng(11);
  std::normal_distribution<double> normal;
  Heads<double> q(heads, tokens, dim), k(heads, tokens, dim), v(heads, tokens, dim);
  for (Heads<double>* x : {&q, &k, &v}) {
    for (Index i = 0; i < x->flat().size(); ++i) x->flat()[i] = normal(rng);
  }

  const CauchyBias<double> cauchy({2.0, 8.0, 32.0, 128.0});
  const AttentionOptions options{.query_block = 48, .key_block = 80};  // odd tiles on purpose
  const Heads<double> fast = attention(q, k, v, cauchy, options);
  const Heads<double> slow = attention_reference(q, k, v, cauchy, options);
  const double diff = (fast.flat() - slow.flat()).cwiseAbs().maxCoeff();
  std::printf("Cauchy bias, %ld heads, %ld tokens: streaming vs reference, max |diff| = %.2e\n",
              static_cast<long>(heads), static_cast<long>(tokens), diff);

  // exp(b_t) = 1/(1 + (t/w)²) ~ w²/t²: a p-series with exponent 2, so the TRF is finite.
  for (Index h = 0; h < heads; ++h) {
    const ReceptiveField trf = theoretical_receptive_field(cauchy, h, 0.1);
    std::printf("head %ld (w = %g): TRF_0.1 = %ld tokens\n", static_cast<long>(h),
                std::ldexp(1.0, static_cast<int>(1 + 2 * h)), static_cast<long>(trf.tokens));
    if (h + 1 == heads) std::printf("  (%s)\n", trf.reason.c_str());
  }
  return fast.flat().allFinite() && diff < 1e-10 ? 0 : 1;
}
