// SPDX-License-Identifier: MIT
// DAPE: data-adaptive positional encoding. A small network reads, at every query/key pair, the
// scaled logits of all heads and a positional bias (ALiBi, KERPLE, FIRE, T5, …) and adds its
// output to the scores: pointwise across heads (DAPE) or along the keys too (DAPE V2, 1×k
// convolutions). Streamed tile by tile: nothing N × N is ever formed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <random>
#include <type_traits>
#include <utility>
#include <vector>

#include "posenc/detail/check.hpp"
#include "posenc/detail/random.hpp"
#include "posenc/detail/scratch.hpp"
#include "posenc/encoders/dape_network.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

namespace detail {

/// What Dape and DapeV2 share: the base bias, the network, the ScoreMixer interface.
template <class T, class Bias>
class DapeMixer {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "posenc::Dape: the scalar type must be float or double");
  static_assert(std::is_same_v<Bias, NoPositionalEncoding> || ScoreBias<Bias>,
                "posenc::Dape: Bias must be a ScoreBias (Alibi, Kerple, Fire, T5Bias, …) or "
                "NoPositionalEncoding (no bias: A + f(A))");

 public:
  using Scalar = T;
  /// Whether the network reads a bias B (C = 2H input channels) or only the logits (C = H).
  static constexpr bool has_bias = !std::is_same_v<Bias, NoPositionalEncoding>;
  /// Negative slope of the leaky ReLU between the layers (torch's nn.LeakyReLU() default).
  static constexpr double negative_slope = DapeNetwork<T>::negative_slope;

  Index heads() const { return network_.heads(); }
  /// Hidden width W (D_DAPE).
  Index mlp_width() const { return network_.width(); }
  /// Key columns the kernel must supply on each side of a tile: k − 1 (0 for DAPE).
  Index key_halo() const { return network_.kernel() - 1; }
  /// The weights as given (double, PyTorch layout).
  const DapeWeights& weights() const { return network_.weights(); }
  /// The bias B the network reads and the scores include (named so that DAPE is not itself a
  /// ScoreBias: the kernel must not add B a second time).
  const Bias& base_bias() const requires has_bias { return bias_; }

  /// Forwards the kernel's shape check to the base bias (the kernel itself rejects a head count
  /// other than heads()).
  void validate(const AttentionShape& shape) const requires HasValidate<Bias> {
    bias_.validate(shape);
  }

  /// The gradient of the learnable parameters: the network's weights in DapeWeights layout (w1
  /// [W, C·k], b1 [W], w2 [H, W·k], b2 [H], PyTorch's) and the base bias's own parameters (`bias`:
  /// Kerple's {r1, r2}, FIRE's MLP, T5's table; NoGradient for ALiBi or no bias). B reaches the
  /// loss twice, through the residual A + B and through the network's input; both shares are in
  /// `bias`.
  struct Gradient {
    Matrix<double> w1;
    Vector<double> b1;
    Matrix<double> w2;
    Vector<double> b2;
    encoder_gradient_t<Bias> bias;
    Gradient& operator+=(const Gradient& other) {
      w1 += other.w1;
      b1 += other.b1;
      w2 += other.w2;
      b2 += other.b2;
      bias += other.bias;
      return *this;
    }
    void set_zero() {
      w1.setZero();
      b1.setZero();
      w2.setZero();
      b2.setZero();
      bias.set_zero();
    }
  };

  Gradient zero_gradient() const {
    const DapeWeights& w = weights();
    Gradient g{Matrix<double>::Zero(w.w1.rows(), w.w1.cols()),
               Vector<double>::Zero(w.b1.size()),
               Matrix<double>::Zero(w.w2.rows(), w.w2.cols()),
               Vector<double>::Zero(w.b2.size()),
               {}};
    if constexpr (HasLearnableParameters<Bias>) g.bias = bias_.zero_gradient();
    return g;
  }

  /// The ScoreMixer stage: scores = A + B + f([A; B]) (see Dape, DapeV2).
  void mix(Positions query_positions, Positions key_positions, Index first_key, Index key_count,
           ConstTileRef<T> logits, TileRef<T> scores) const {
    if constexpr (has_bias) {
      const auto add_bias = [this](Index head, Positions qpos, Positions kpos, TileRef<T> tile) {
        bias_.add_bias(head, qpos, kpos, tile);
      };
      network_.mix(query_positions, key_positions, first_key, key_count, logits, scores, add_bias,
                   fn_, DistanceBias<Bias>);
    } else {
      const auto no_bias = [](Index, Positions, Positions, TileRef<T>) {};
      network_.mix(query_positions, key_positions, first_key, key_count, logits, scores, no_bias,
                   fn_);
    }
  }

  /// The backward of mix (DifferentiableScoreMixer): given dscores = ∂L/∂scores [H,
  /// rows·key_count] (zero where the mask forbids a key) for the arguments of a mix call, writes
  /// dlogits = ∂L/∂A [H, rows·K] at all K keys (with a halo: the share of this tile's scores) and
  /// adds the gradient of the network's weights and, through ∂L/∂B = dS + the network's input
  /// gradient, the base bias's (accumulate_bias_gradient). DapeNetwork::mix_backward has the
  /// formulas; it recomputes the scores on the way (into per-thread scratch).
  void mix_backward(Positions query_positions, Positions key_positions, Index first_key,
                    Index key_count, ConstTileRef<T> logits, ConstTileRef<T> dscores,
                    TileRef<T> dlogits, Gradient& gradient) const {
    backward_of_dscores(query_positions, key_positions, first_key, key_count, logits, dscores,
                        dlogits, &gradient);
  }

  /// dlogits only (no parameter gradient).
  void mix_backward(Positions query_positions, Positions key_positions, Index first_key,
                    Index key_count, ConstTileRef<T> logits, ConstTileRef<T> dscores,
                    TileRef<T> dlogits) const {
    backward_of_dscores(query_positions, key_positions, first_key, key_count, logits, dscores,
                        dlogits, static_cast<Gradient*>(nullptr));
  }

  /// The streaming kernel's fused form (kernel/backward_mixer.hpp): mix and its backward in one
  /// sweep over the tile's chunks. Writes scores [H, rows·key_count] = mix(logits) block by block
  /// and after each block calls `finish(r0, rows, c0, count)`, which must turn the block (rows
  /// [r0, r0 + rows) × score columns [c0, c0 + count), every head) of `dscores` into ∂L/∂scores
  /// (it may rewrite the block of `scores`, e.g. into probabilities); then as mix_backward, with
  /// `gradient` null for dlogits only. The network's hidden layer is computed once per pixel.
  template <class Finish>
  void mix_and_backward(Positions query_positions, Positions key_positions, Index first_key,
                        Index key_count, ConstTileRef<T> logits, TileRef<T> scores,
                        ConstTileRef<T> dscores, const Finish& finish, TileRef<T> dlogits,
                        Gradient* gradient) const {
    const auto add_bias = [&](Index head, Positions qpos, Positions kpos, TileRef<T> tile) {
      if constexpr (has_bias) bias_.add_bias(head, qpos, kpos, tile);
    };
    const auto bias_gradient = [&](Index head, Positions qpos, Positions kpos,
                                   ConstTileRef<T> dbias) {
      if constexpr (LearnableScoreBias<Bias>) {
        bias_.accumulate_bias_gradient(head, qpos, kpos, dbias, gradient->bias);
      }
    };
    const bool with_dbias = LearnableScoreBias<Bias> && gradient != nullptr;
    network_.mix_backward(query_positions, key_positions, first_key, key_count, logits, scores,
                          dscores, finish, dlogits, add_bias, with_dbias ? &bias_gradient : nullptr,
                          gradient, fn_, has_bias && DistanceBias<Bias>);
  }

 protected:
  DapeMixer(Bias bias, DapeWeights weights, Index kernel, bool tril, const char* fn)
      : bias_(std::move(bias)), network_(std::move(weights), kernel, has_bias, tril, fn), fn_(fn) {
    if constexpr (has_bias) {
      using BiasScalar = typename Bias::Scalar;
      static_assert(std::is_same_v<BiasScalar, T>,
                    "posenc::Dape: the bias's Scalar differs from the Dape's");
      detail::require(static_cast<Index>(bias_.heads()) == network_.heads(), fn,
                      "the base bias has ", bias_.heads(), " heads but w2 has ", network_.heads(),
                      " rows (one per head)");
    }
  }

 private:
  /// mix_backward: mix_and_backward with dscores given (no finish), the scores in scratch.
  void backward_of_dscores(Positions query_positions, Positions key_positions, Index first_key,
                           Index key_count, ConstTileRef<T> logits, ConstTileRef<T> dscores,
                           TileRef<T> dlogits, Gradient* gradient) const {
    ScratchLease<RowScratch<T>> lease;
    const Index size = heads() * static_cast<Index>(query_positions.size()) * key_count;
    Eigen::Map<Matrix<T>> scores(grow(lease.get().values, size), heads(),
                                 static_cast<Index>(query_positions.size()) * key_count);
    const auto finish = [](Index, Index, Index, Index) {};
    mix_and_backward(query_positions, key_positions, first_key, key_count, logits, scores, dscores,
                     finish, dlogits, gradient);
  }

  Bias bias_;
  DapeNetwork<T> network_;
  const char* fn_;
};

}  // namespace detail

/// DAPE (Zheng, Gao, Shi, Xiong, Sun, Li, Shang, Zhou, Lin & Ma 2024, "DAPE: Data-Adaptive
/// Positional Encoding for Length Extrapolation", NeurIPS 2024, arXiv 2405.14722): a ScoreMixer
///
///   scores_h(i, j) = A_h(i, j) + B_h(i, j) + f([A(i, j); B(i, j)])_h,
///   f(x) = W2 · LeakyReLU_0.01(W1 · x + b1) + b2
///
/// at every query/key pair, across heads: A the scaled logits (the kernel's default scale
/// 1/sqrt(d), the reference's norm factor) before any mask, B any ScoreBias of the library (the
/// reference's are the causal forms: `Alibi<T>(H, BiasForm::causal, AlibiSlopes::float32)`,
/// `Kerple<T>(KerpleKernel::log, p, a)`, `Fire<T>(…, FireOptions::dape(noise_seq_length))`).
/// - weights: DapeWeights with k = 1: w1 [W, 2H], b1 [W], w2 [H, W], b2 [H] (nn.Linear layout;
///   input channels A of every head, then B of every head); or Dape::random (PyTorch's default
///   initialisation from a seed).
/// - Dape<T> (Bias = NoPositionalEncoding) is the bias-free variant scores = A + f(A), w1 [W, H]
///   (the reference's `Nope_C` / `DAPEV1`).
/// - i, j absolute positions (only the bias uses them: f is pointwise, so every tile shape,
///   mask, query offset and KV cache gives the same scores). The kernel adds no bias of its own:
///   B is the base bias's (base_bias()), added once here.
/// - Cost per pair: 3·H·W multiply-adds (two small GEMMs per chunk of a tile), memory O(tile).
/// - Matches chuanyang-Zheng/DAPE `AliBi_C`, `ParallelKerpleLog_C`, `FIRE_C` (golden
///   dape_{alibi,kerple,fire}_causal.json). Example: examples/dape_extrapolation.cpp.
template <class T, class Bias = NoPositionalEncoding>
class Dape : public detail::DapeMixer<T, Bias> {
  using Base = detail::DapeMixer<T, Bias>;

 public:
  /// DAPE over `bias`. Throws std::invalid_argument unless the shapes are as above (naming the
  /// expected and the given shapes), the weights are finite and bias.heads() == H.
  Dape(Bias bias, DapeWeights weights) requires Base::has_bias
      : Base(std::move(bias), std::move(weights), 1, false, "posenc::Dape") {}

  /// The bias-free variant A + f(A). Throws unless w1 is [W, H] and the rest as above.
  explicit Dape(DapeWeights weights) requires(!Base::has_bias)
      : Base(Bias{}, std::move(weights), 1, false, "posenc::Dape") {}

  /// PyTorch's default nn.Linear initialisation (U(±1/sqrt(fan_in)) for weights and biases),
  /// drawn from `rng` in the order w1, b1, w2, b2 (row-major). Throws unless mlp_width >= 1.
  static Dape random(Bias bias, Index mlp_width, std::mt19937_64& rng) requires Base::has_bias {
    detail::require(mlp_width >= 1, "posenc::Dape::random", "mlp_width must be >= 1, got ",
                    mlp_width);
    const auto heads = static_cast<Index>(bias.heads());
    return Dape(std::move(bias), detail::dape_random_weights(2 * heads, mlp_width, heads, 1, rng));
  }

  /// The bias-free variant, randomly initialised as above. Throws unless heads, mlp_width >= 1.
  static Dape random(Index heads, Index mlp_width, std::mt19937_64& rng) requires(!Base::has_bias) {
    detail::require(heads >= 1 && mlp_width >= 1, "posenc::Dape::random",
                    "heads and mlp_width must be >= 1, got ", heads, " and ", mlp_width);
    return Dape(detail::dape_random_weights(heads, mlp_width, heads, 1, rng));
  }
};

/// DAPE V2 (Zheng et al. 2024, "DAPE V2: Process Attention Score as Feature Map for Length
/// Extrapolation", ACL 2025, arXiv 2410.04798; CDAPE): a ScoreMixer
///
///   scores = A + B + g(tril([A; B])),   g = Conv_{W→H, 1×k} ∘ LeakyReLU_0.01 ∘ Conv_{C→W, 1×k}
///
/// the convolutions sliding along the keys of each query row (torch cross-correlation,
/// out[j] = Σ_t w[t]·in[j + t − k/2], biases on both), zero padding at the ends of the key
/// sequence, and the input zeroed at keys after the query (key position > query position) before
/// the first convolution, not between them (the reference's `*_DAPEV2`).
/// - weights: DapeWeights with kernel k (odd): w1 [W, C·k] and w2 [H, W·k] are the Conv2d
///   weights [out, in, 1, k] reshaped to [out, in·k]; C = 2H with a bias, H without (DapeV2<T>).
/// - Neighbours are neighbours in the key sequence (key index order), the tril compares
///   positions. The streaming kernel supplies key_halo() = k − 1 keys on each side of a tile;
///   keys outside the sequence are zero padding, as in the reference's padded N × N map.
/// - Like the reference, a score at key j depends on whether keys j + 1 … j + k − 1 exist (the
///   hidden layer there is nonzero even above the diagonal): decoding through a KV cache equals a
///   full pass over the same keys, and row t of a longer pass may differ at its last k/2 keys.
/// - Cost per pair: 3·H·W·k multiply-adds, memory O(tile).
/// - Matches `Kerple_DAPEV2` (golden dapev2_kerple_conv3_causal.json).
template <class T, class Bias = NoPositionalEncoding>
class DapeV2 : public detail::DapeMixer<T, Bias> {
  using Base = detail::DapeMixer<T, Bias>;

 public:
  /// DAPE V2 over `bias` with 1 × kernel convolutions. Throws std::invalid_argument unless the
  /// kernel is odd and >= 1, the shapes are as above, the weights finite and bias.heads() == H.
  DapeV2(Bias bias, DapeWeights weights, Index kernel) requires Base::has_bias
      : Base(std::move(bias), std::move(weights), kernel, true, "posenc::DapeV2") {}

  /// The bias-free variant A + g(tril(A)). Throws as above.
  DapeV2(DapeWeights weights, Index kernel) requires(!Base::has_bias)
      : Base(Bias{}, std::move(weights), kernel, true, "posenc::DapeV2") {}

  /// PyTorch's default nn.Conv2d initialisation (U(±1/sqrt(in·k))), drawn as Dape::random.
  static DapeV2 random(Bias bias, Index mlp_width, Index kernel,
                       std::mt19937_64& rng) requires Base::has_bias {
    detail::require(mlp_width >= 1 && kernel >= 1, "posenc::DapeV2::random",
                    "mlp_width and kernel must be >= 1, got ", mlp_width, " and ", kernel);
    const auto heads = static_cast<Index>(bias.heads());
    return DapeV2(std::move(bias),
                  detail::dape_random_weights(2 * heads, mlp_width, heads, kernel, rng), kernel);
  }

  /// The bias-free variant, randomly initialised as above.
  static DapeV2 random(Index heads, Index mlp_width, Index kernel,
                       std::mt19937_64& rng) requires(!Base::has_bias) {
    detail::require(heads >= 1 && mlp_width >= 1 && kernel >= 1, "posenc::DapeV2::random",
                    "heads, mlp_width and kernel must be >= 1, got ", heads, ", ", mlp_width,
                    " and ", kernel);
    return DapeV2(detail::dape_random_weights(heads, mlp_width, heads, kernel, rng), kernel);
  }

  /// The convolutions' kernel size k.
  Index kernel_size() const { return this->key_halo() + 1; }
};

static_assert(ScoreMixer<Dape<float>>);
static_assert(ScoreMixer<Dape<double>>);
static_assert(ScoreMixer<DapeV2<float>>);
static_assert(DifferentiableScoreMixer<Dape<float>> && DifferentiableScoreMixer<DapeV2<double>>);
static_assert(!ScoreBias<Dape<float>> && !QueryKeyTransform<Dape<float>>,
              "Dape must not look like a ScoreBias: the kernel would add B twice");

}  // namespace posenc
