// SPDX-License-Identifier: MIT
// FIRE: functional interpolation for relative positions, a small learned MLP of the
// log-compressed distance normalised by the (thresholded) query position, so that its input stays
// in [0, 1] at any length ("progressive interpolation").
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "posenc/detail/check.hpp"
#include "posenc/detail/random.hpp"
#include "posenc/encoders/distance_bias.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// The hidden activation of FIRE's MLP.
enum class FireActivation {
  relu,       // the FIRE listing (mcleish7/arithmetic `FIRE`) and DAPE's plain `FIRE` baseline
  leaky_relu  // DAPE's `FIRE_C` / `FIRE_DAPE` (negative slope 0.01 by default)
};

/// Everything of FIRE except the MLP weights. Defaults are the FIRE listing's
/// (mcleish7/arithmetic, golden fire.json).
struct FireOptions {
  /// c in ψ(x) = log(|c·x| + 1); learnable, initialised to 0.1.
  double c = 0.1;
  /// L0 (`init_L`, a frozen parameter): the threshold below which the normaliser stops shrinking.
  /// A length: >= 0.
  double threshold = 512.0;
  /// `L_multiplier` (learnable, init 1): the threshold used is L = |threshold_multiplier · L0|.
  double threshold_multiplier = 1.0;
  /// Added to the normaliser ψ(max(i, L)).
  double eps = 1e-6;
  FireActivation activation = FireActivation::relu;
  /// Slope of leaky_relu for negative inputs (torch's default 0.01).
  double negative_slope = 0.01;
  /// symmetric: δ = |i − j| (the listing's abs: future keys mirror past ones and must be
  /// masked); causal: δ = max(i − j, 0) (DAPE: future keys get MLP(0)).
  BiasForm form = BiasForm::symmetric;
  /// Form the normalised distance in float32 (c, L, eps rounded to float32; log correctly rounded
  /// to float32), then widen it, as the DAPE code does even for float64 scores. The MLP stays in
  /// double either way.
  bool float32_distance = false;

  /// The options of DAPE's `FIRE_C` (chuanyang-Zheng/DAPE, `positional_embeddings.py`): leaky
  /// ReLU, causal form, float32 normalised distance, c = 0.1, and L0 = init_L // 2 where the
  /// training code passes `noise_seq_length` as init_L (128 in the 512-token configs, so L0 = 64;
  /// the standalone DAPE.py uses init_L itself: set `threshold` after the call).
  static FireOptions dape(Index noise_seq_length) {
    FireOptions options;
    const Index halved = noise_seq_length / 2;  // Python's init_L // 2 (integer division)
    options.threshold = static_cast<double>(halved);
    options.activation = FireActivation::leaky_relu;
    options.form = BiasForm::causal;
    options.float32_distance = true;
    return options;
  }
};

/// FIRE (Li, Kumar, Zhao, Cho, Joshi, Ghazi, Tomar, Das & Dong 2023, "Functional Interpolation for
/// Relative Positions Improves Long Context Transformers", arXiv 2310.04418): a ScoreBias
///
///   B_h(i, j) = f(ψ(δ) / (ψ(max(i, L)) + eps))_h,   ψ(x) = log(|c·x| + 1),   L = |mult · L0|,
///   f(x) = W2 · act(W1 · x + b1) + b2
///
/// - W1: [W, 1], b1: [W], W2: [heads, W], b2: [heads] — PyTorch's nn.Linear (out, in) layout:
///   pass `layer1.weight`, `layer1.bias`, `layer2.weight`, `layer2.bias` as they are.
/// - i is the absolute query position (the normaliser needs it; with a KV cache pass the true
///   position), j the key position; δ = |i − j| or max(i − j, 0) (BiasForm), query minus key.
/// - Evaluated in double, cast to Scalar last. A one-input ReLU/LeakyReLU MLP is piecewise linear
///   in x with at most W kinks, so each head's f is kept as its pieces (slope, intercept), and a
///   tile costs one ψ per distinct distance (vectorised), one normaliser per row, and per
///   element one multiply (a float32 division when replaying DAPE) and one multiply-add.
/// - Matches golden fire.json (ReLU, symmetric; float64 and float32) and DAPE's FIRE_C
///   (dape_fire_causal.json bias_B with FireOptions::dape).
/// - Training: Gradient holds w1, b1, w2, b2, c and threshold_multiplier. The backward
///   (accumulate_bias_gradient) walks the same pieces: rows below L share one normaliser and are
///   summed per distance first (cheaper than the forward); other rows cost one run per piece.
/// - Example: examples/relative_biases.cpp.
template <class T>
class Fire {
 public:
  using Scalar = T;

  /// Throws unless the shapes are as above (W >= 1, heads >= 1), everything is finite,
  /// eps > 0 and threshold >= 0 (threshold_multiplier may be negative).
  Fire(Matrix<double> w1, Vector<double> b1, Matrix<double> w2, Vector<double> b2,
       FireOptions options = {})
      : w1_(std::move(w1)),
        b1_(std::move(b1)),
        w2_(std::move(w2)),
        b2_(std::move(b2)),
        options_(options) {
    constexpr const char* fn = "posenc::Fire";
    detail::require(w1_.cols() == 1 && w1_.rows() >= 1, fn,
                    "w1 must be [mlp_width, 1] (PyTorch (out, in) layout), got [", w1_.rows(), ", ",
                    w1_.cols(), "]");
    detail::require(b1_.size() == w1_.rows(), fn, "b1 must have mlp_width = ", w1_.rows(),
                    " entries, got ", b1_.size());
    detail::require(w2_.rows() >= 1 && w2_.cols() == w1_.rows(), fn,
                    "w2 must be [heads, mlp_width] = [heads >= 1, ", w1_.rows(), "], got [",
                    w2_.rows(), ", ", w2_.cols(), "]");
    detail::require(b2_.size() == w2_.rows(), fn, "b2 must have heads = ", w2_.rows(),
                    " entries, got ", b2_.size());
    detail::require(w1_.allFinite() && b1_.allFinite() && w2_.allFinite() && b2_.allFinite(), fn,
                    "MLP weights must be finite");
    detail::require(std::isfinite(options_.c) && std::isfinite(options_.threshold) &&
                        std::isfinite(options_.threshold_multiplier) &&
                        std::isfinite(options_.negative_slope),
                    fn, "c, threshold, threshold_multiplier and negative_slope must be finite");
    detail::require(std::isfinite(options_.eps) && options_.eps > 0.0, fn,
                    "eps must be finite and positive, got ", options_.eps);
    // L0 is a length (init_L); only the learnable multiplier may turn negative (L uses |·|).
    detail::require(options_.threshold >= 0.0, fn, "threshold (L0, init_L) must be >= 0, got ",
                    options_.threshold);
    exact_threshold_ = std::abs(options_.threshold_multiplier * options_.threshold);
    threshold_ = exact_threshold_;
    if (options_.float32_distance) {
      threshold_ = std::abs(static_cast<double>(static_cast<float>(options_.threshold_multiplier) *
                                                static_cast<float>(options_.threshold)));
    }
    negative_factor_ = options_.activation == FireActivation::relu ? 0.0 : options_.negative_slope;
    pieces_.reserve(static_cast<std::size_t>(heads()));
    for (Index h = 0; h < heads(); ++h) pieces_.push_back(make_pieces(h));
  }

  /// PyTorch's nn.Linear initialisation (weights and biases ~ U(−1/sqrt(fan_in), 1/sqrt(fan_in)):
  /// U(−1, 1) for the first layer, U(−1/sqrt(W), 1/sqrt(W)) for the second), drawn in the order
  /// w1, b1, w2 (row-major), b2 with detail::uniform; c, L0 and the multiplier from `options`
  /// (the reference initialises them to 0.1, init_L and 1).
  static Fire random(Index heads, Index mlp_width, std::mt19937_64& rng, FireOptions options = {}) {
    detail::require(heads >= 1 && mlp_width >= 1, "posenc::Fire::random",
                    "heads and mlp_width must be >= 1, got ", heads, " and ", mlp_width);
    const auto draw = [&rng](Index rows, Index cols, double bound) {
      Matrix<double> m(rows, cols);
      for (Index i = 0; i < m.size(); ++i) m.data()[i] = detail::uniform(rng, -bound, bound);
      return m;
    };
    const double bound2 = 1.0 / std::sqrt(static_cast<double>(mlp_width));
    Matrix<double> w1 = draw(mlp_width, 1, 1.0);
    Vector<double> b1 = draw(mlp_width, 1, 1.0);
    Matrix<double> w2 = draw(heads, mlp_width, bound2);
    Vector<double> b2 = draw(heads, 1, bound2);
    return Fire(std::move(w1), std::move(b1), std::move(w2), std::move(b2), options);
  }

  Index heads() const { return w2_.rows(); }
  Index mlp_width() const { return w1_.rows(); }
  const FireOptions& options() const { return options_; }
  const Matrix<double>& w1() const { return w1_; }
  const Vector<double>& b1() const { return b1_; }
  const Matrix<double>& w2() const { return w2_; }
  const Vector<double>& b2() const { return b2_; }
  /// L = |threshold_multiplier · threshold|.
  double threshold() const { return threshold_; }

  /// The MLP input ψ(δ) / (ψ(max(i, L)) + eps) for query position i and key position j.
  double normalized_distance(Index i, Index j) const {
    return normalized(psi(detail::form_distance(options_.form, i - j)), denominator(i));
  }

  /// f(x)_h evaluated as the reference does (the MLP's sums, unit by unit).
  double mlp(Index head, double x) const {
    double y = b2_[head];
    for (Index w = 0; w < mlp_width(); ++w) {
      const double z = w1_(w, 0) * x + b1_[w];
      y += w2_(head, w) * (z >= 0.0 ? z : negative_factor_ * z);
    }
    return y;
  }

  /// B_h(i, j) for query position i and key position j. Unchecked head.
  T bias(Index head, Index i, Index j) const {
    return static_cast<T>(mlp(head, normalized_distance(i, j)));
  }

  /// Adds B_h(query_positions[r], key_positions[c]) to tile(r, c).
  void add_bias(Index head, Positions query_positions, Positions key_positions,
                TileRef<T> tile) const {
    const Index rows = tile.rows();
    const Index cols = tile.cols();
    if (rows == 0 || cols == 0) return;
    if (!detail::is_consecutive(key_positions)) {
      for (Index r = 0; r < rows; ++r) {
        for (Index c = 0; c < cols; ++c) {
          tile(r, c) += bias(head, query_positions[static_cast<std::size_t>(r)],
                             key_positions[static_cast<std::size_t>(c)]);
        }
      }
      return;
    }
    // Consecutive keys: ψ per distinct distance into a window (psi[m] at distance top − m, as in
    // detail::add_distance_bias; one window per block when the queries are consecutive too, one
    // per row otherwise), the row normalisers per block of rows, then per row the normalised
    // distances and the pieces of f.
    constexpr Index chunk = detail::distance_chunk;
    alignas(64) std::array<double, 2 * chunk - 1> psi;
    alignas(64) std::array<double, chunk> normaliser;
    alignas(64) std::array<double, chunk> x;
    const Pieces& pieces = pieces_[static_cast<std::size_t>(head)];
    const bool queries_consecutive = detail::is_consecutive(query_positions);
    for (Index c0 = 0; c0 < cols; c0 += chunk) {
      const Index chunk_cols = std::min(chunk, cols - c0);
      const Index first_key = key_positions[static_cast<std::size_t>(c0)];
      for (Index r0 = 0; r0 < rows; r0 += chunk) {
        const Index chunk_rows = std::min(chunk, rows - r0);
        const Positions block = query_positions.subspan(static_cast<std::size_t>(r0),
                                                        static_cast<std::size_t>(chunk_rows));
        row_normalisers(block, normaliser.data());
        if (queries_consecutive) {
          psi_window(block.back() - first_key, chunk_rows + chunk_cols - 1, psi.data());
        }
        for (Index r = 0; r < chunk_rows; ++r) {
          const Index i = block[static_cast<std::size_t>(r)];
          const double* psi_row = psi.data() + (chunk_rows - 1 - r);
          if (!queries_consecutive) {
            psi_window(i - first_key, chunk_cols, psi.data());
            psi_row = psi.data();
          }
          normalize_row(psi_row, chunk_cols, normaliser[static_cast<std::size_t>(r)], x.data());
          // Columns with i − j >= 0 have non-increasing x, the rest non-decreasing x.
          const Index split = std::clamp<Index>(i - first_key + 1, 0, chunk_cols);
          auto row = tile.row(r0 + r).segment(c0, chunk_cols);
          add_pieces(pieces, x.data(), 0, split, false, row);
          add_pieces(pieces, x.data(), split, chunk_cols, true, row);
        }
      }
    }
  }

  /// ∂L/∂ each learnable parameter, named and shaped like it: w1 [W, 1], b1 [W], w2 [heads, W],
  /// b2 [heads], c and threshold_multiplier (options().c, options().threshold_multiplier)
  /// (HasLearnableParameters). L0 (options().threshold), eps and the slope are constants.
  struct Gradient {
    Matrix<double> w1;
    Vector<double> b1;
    Matrix<double> w2;
    Vector<double> b2;
    double c = 0.0;
    double threshold_multiplier = 0.0;
    Gradient& operator+=(const Gradient& other) {
      w1 += other.w1;
      b1 += other.b1;
      w2 += other.w2;
      b2 += other.b2;
      c += other.c;
      threshold_multiplier += other.threshold_multiplier;
      return *this;
    }
    void set_zero() {
      w1.setZero();
      b1.setZero();
      w2.setZero();
      b2.setZero();
      c = 0.0;
      threshold_multiplier = 0.0;
    }
  };
  Gradient zero_gradient() const {
    return {Matrix<double>::Zero(mlp_width(), 1),
            Vector<double>::Zero(mlp_width()),
            Matrix<double>::Zero(heads(), mlp_width()),
            Vector<double>::Zero(heads()),
            0.0,
            0.0};
  }

  /// Adds Σ_{r,c} dbias(r, c)·∂B_h/∂θ to `gradient` for every θ (LearnableScoreBias). With
  /// z_w = W1_w·x + b1_w, a_w = act'(z_w), f'(x) = Σ_w W2_hw·a_w·W1_w (the slope of x's piece):
  ///   ∂B/∂b2_h = 1, ∂B/∂W2_hw = act(z_w), ∂B/∂b1_w = W2_hw·a_w, ∂B/∂W1_w = W2_hw·a_w·x,
  ///   ∂B/∂c = f'(x)·(ψ_c(δ) − x·ψ_c(m)) / D,   ψ_c(u) = sign(c)·u / (|c|·u + 1),
  ///   ∂B/∂mult = −f'(x)·x/D·ψ'(m)·∂m/∂L·sign(mult·L0)·L0,   ψ'(m) = |c| / (|c|·m + 1) (0 at m = 0)
  /// with m = max(i, L), D = ψ(m) + eps. Per row, runs of one piece of f are summed (Σ dbias,
  /// Σ dbias·x, Σ dbias·ψ_c); the MLP terms are applied once per piece per tile.
  /// Conventions (torch's): act'(0) = 0 for relu and the slope for leaky_relu, so where x = 0
  /// exactly (δ = 0 or c = 0) a unit counts as on iff b1_w > 0; at another kink the piece to the
  /// right of it decides (torch's choice there depends on the rounding of z); ∂m/∂L = 1 for
  /// i < L, 1/2 for i = L (torch.maximum splits ties), 0 for i > L; |·|' = sign (0 at 0).
  /// float32_distance: the backward works in double and treats that rounding as the identity
  /// (straight-through), evaluating everything at the unrounded double values.
  /// Unchecked head and shapes.
  void accumulate_bias_gradient(Index head, Positions query_positions, Positions key_positions,
                                ConstTileRef<T> dbias, Gradient& gradient) const {
    const Index rows = dbias.rows();
    const Index cols = dbias.cols();
    if (rows == 0 || cols == 0) return;
    constexpr Index chunk = detail::distance_chunk;
    constexpr Index window = 2 * chunk - 1;
    alignas(64) std::array<double, window> psi;   // ψ(δ) per distance
    alignas(64) std::array<double, window> dpsi;  // δ / (|c|·δ + 1) per distance
    alignas(64) std::array<double, window> x;
    alignas(64) std::array<double, window> g;  // a row of dbias (or a sum per distance), double
    BackwardSums sums;
    const std::size_t piece_count = pieces_[static_cast<std::size_t>(head)].slope.size();
    if (piece_count <= BackwardSums::capacity) {
      std::fill_n(sums.s0.begin(), piece_count, 0.0);
      std::fill_n(sums.s1.begin(), piece_count, 0.0);
    }
    const double c_abs = std::abs(options_.c);
    const double L = exact_threshold_;
    const bool keys_consecutive = detail::is_consecutive(key_positions);
    const bool queries_consecutive = keys_consecutive && detail::is_consecutive(query_positions);
    double d_c = 0.0;  // Σ ∂B/∂c / sign(c)
    double d_L = 0.0;  // Σ ∂B/∂L
    // A row (or rows summed per distance) of normaliser 1/D at m = max(i, L): the c and L terms.
    const auto finish = [&](double m, double inverse, double dm_dL) {
      d_c += (sums.g_psi - sums.g_x * m / (c_abs * m + 1.0)) * inverse;
      if (m > 0.0) d_L -= sums.g_x * inverse * dm_dL * c_abs / (c_abs * m + 1.0);
      sums.g_x = 0.0;
      sums.g_psi = 0.0;
    };
    // The window entries [first, last) with dbias g: x = ψ·inverse, i − j >= 0 below `split`.
    const auto walk = [&](double inverse, Index first, Index last, Index split) {
      for (Index c = first; c < last; ++c) {
        x[static_cast<std::size_t>(c)] = psi[static_cast<std::size_t>(c)] * inverse;
      }
      split = std::clamp(split, first, last);
      add_runs(head, x.data(), dpsi.data(), g.data(), first, split, false, sums, gradient);
      add_runs(head, x.data(), dpsi.data(), g.data(), split, last, true, sums, gradient);
    };
    const double inverse_at_L = 1.0 / (std::log1p(c_abs * L) + options_.eps);
    for (Index c0 = 0; c0 < cols; c0 += chunk) {
      const Index chunk_cols = std::min(chunk, cols - c0);
      const Index first_key = key_positions[static_cast<std::size_t>(c0)];
      for (Index r0 = 0; r0 < rows; r0 += chunk) {
        const Index chunk_rows = std::min(chunk, rows - r0);
        const Positions block = query_positions.subspan(static_cast<std::size_t>(r0),
                                                        static_cast<std::size_t>(chunk_rows));
        Index r = 0;
        if (queries_consecutive) {
          const Index count = chunk_rows + chunk_cols - 1;
          const Index top = block.back() - first_key;
          distance_window(top, count, psi.data(), dpsi.data());
          // Rows with i < L share m = L: summed per distance (as reduce_distance_gradient) and
          // walked once as one row.
          while (r < chunk_rows && static_cast<double>(block[static_cast<std::size_t>(r)]) < L) ++r;
          if (r > 1) {
            const Index low = chunk_rows - r;  // the distances rows [0, r) reach
            std::fill(g.begin() + low, g.begin() + count, 0.0);
            for (Index q = 0; q < r; ++q) {
              const T* row = &dbias.coeffRef(r0 + q, c0);
              double* out = g.data() + (chunk_rows - 1 - q);
              for (Index c = 0; c < chunk_cols; ++c) out[c] += static_cast<double>(row[c]);
            }
            walk(inverse_at_L, low, count, top + 1);
            finish(L, inverse_at_L, 1.0);
          } else {
            r = 0;
          }
        }
        for (; r < chunk_rows; ++r) {
          const Index i = block[static_cast<std::size_t>(r)];
          const double m = std::max(static_cast<double>(i), L);
          const double inverse = 1.0 / (std::log1p(c_abs * m) + options_.eps);  // 1 / D
          const T* row = &dbias.coeffRef(r0 + r, c0);
          for (Index c = 0; c < chunk_cols; ++c) g[static_cast<std::size_t>(c)] = row[c];
          if (!keys_consecutive) {
            for (Index c = 0; c < chunk_cols; ++c) {
              const Index j = key_positions[static_cast<std::size_t>(c0 + c)];
              distance_window(i - j, 1, psi.data(), dpsi.data());
              add_element(head, psi[0] * inverse, dpsi[0], g[static_cast<std::size_t>(c)], sums,
                          gradient);
            }
          } else if (queries_consecutive) {
            // Row r reads the block's window from chunk_rows − 1 − r; shift its dbias there.
            const auto offset = static_cast<std::size_t>(chunk_rows - 1 - r);
            std::copy_backward(g.begin(), g.begin() + chunk_cols,
                               g.begin() + static_cast<Index>(offset) + chunk_cols);
            walk(inverse, static_cast<Index>(offset), static_cast<Index>(offset) + chunk_cols,
                 block.back() - first_key + 1);
          } else {
            distance_window(i - first_key, chunk_cols, psi.data(), dpsi.data());
            walk(inverse, 0, chunk_cols, i - first_key + 1);
          }
          const double tie = L == static_cast<double>(i) ? 0.5 : 0.0;
          finish(m, inverse, L > static_cast<double>(i) ? 1.0 : tie);
        }
      }
    }
    const double mult_l0 = options_.threshold_multiplier * options_.threshold;
    gradient.c += sign(options_.c) * d_c;
    gradient.threshold_multiplier += d_L * sign(mult_l0) * options_.threshold;
    gradient.b2[head] += sums.total;
    if (piece_count <= BackwardSums::capacity) {
      for (std::size_t k = 0; k < piece_count; ++k) {
        add_piece_gradient(head, k, sums.s0[k], sums.s1[k], gradient);
      }
    }
    for (Index w = 0; w < mlp_width(); ++w) {  // x = 0: z_w = b1_w exactly
      const double factor = b1_[w] > 0.0 ? 1.0 : negative_factor_;
      gradient.w2(head, w) += factor * b1_[w] * sums.zero;
      gradient.b1[w] += w2_(head, w) * factor * sums.zero;
    }
  }

 private:
  /// f_h as a piecewise-linear function: on [kinks[k − 1], kinks[k]) (kinks[−1] = −inf,
  /// kinks[P] = +inf) f_h(x) = slope[k]·x + intercept[k].
  struct Pieces {
    std::vector<double> kinks;
    std::vector<double> slope;
    std::vector<double> intercept;

    std::size_t piece_of(double x) const {
      return static_cast<std::size_t>(std::upper_bound(kinks.begin(), kinks.end(), x) -
                                      kinks.begin());
    }
    double low(std::size_t k) const {
      return k == 0 ? -std::numeric_limits<double>::infinity() : kinks[k - 1];
    }
    double high(std::size_t k) const {
      return k == kinks.size() ? std::numeric_limits<double>::infinity() : kinks[k];
    }
  };

  /// Whether unit z = a·x + b is on (act = identity) on the piece [low, high), decided from its
  /// kink −b/a; with a = 0 on iff b > 0 (torch: relu'(0) = 0).
  static bool unit_on(double a, double b, double low, double high) {
    if (a > 0.0) return -b / a <= low;
    if (a < 0.0) return -b / a >= high;
    return b > 0.0;
  }

  Pieces make_pieces(Index head) const {
    Pieces p;
    for (Index w = 0; w < mlp_width(); ++w) {
      if (w1_(w, 0) != 0.0) p.kinks.push_back(-b1_[w] / w1_(w, 0));
    }
    std::sort(p.kinks.begin(), p.kinks.end());
    p.kinks.erase(std::unique(p.kinks.begin(), p.kinks.end()), p.kinks.end());
    for (std::size_t k = 0; k <= p.kinks.size(); ++k) {
      double slope = 0.0;
      double intercept = b2_[head];
      for (Index w = 0; w < mlp_width(); ++w) {
        const double a = w1_(w, 0);
        const double b = b1_[w];
        const double factor = unit_on(a, b, p.low(k), p.high(k)) ? 1.0 : negative_factor_;
        slope += w2_(head, w) * factor * a;
        intercept += w2_(head, w) * factor * b;
      }
      p.slope.push_back(slope);
      p.intercept.push_back(intercept);
    }
    return p;
  }

  /// Adds f(x[c]) to row[c] for c in [first, last), x monotone there (non-decreasing when
  /// `increasing`, else non-increasing): one vectorised multiply-add per run of one piece. At a
  /// kink both neighbouring pieces agree (f is continuous), so a run boundary off by rounding
  /// changes nothing beyond rounding.
  template <class Row>
  static void add_pieces(const Pieces& pieces, const double* x, Index first, Index last,
                         bool increasing, Row& row) {
    using Array = Eigen::Map<const Eigen::Array<double, 1, Eigen::Dynamic>>;
    const std::size_t count = pieces.kinks.size();
    Index c = first;
    while (c < last) {
      const std::size_t k = pieces.piece_of(x[c]);
      const double* end = x + last;
      if (increasing && k < count) {
        const double high = pieces.kinks[k];
        end = std::partition_point(x + c, x + last, [high](double v) { return v < high; });
      } else if (!increasing && k > 0) {
        const double low = pieces.kinks[k - 1];
        end = std::partition_point(x + c, x + last, [low](double v) { return v >= low; });
      }
      const Index stop = std::max<Index>(end - x, c + 1);
      row.segment(c, stop - c).array() +=
          (Array(x + c, stop - c) * pieces.slope[k] + pieces.intercept[k]).template cast<T>();
      c = stop;
    }
  }

  /// What the backward sums over a tile: per piece k of f (up to `capacity` pieces, else added
  /// to the gradient run by run) and over x = 0, then per row the terms of ∂B/∂c and ∂B/∂L.
  struct BackwardSums {
    static constexpr std::size_t capacity = 256;
    std::array<double, capacity> s0;  // Σ dbias over the piece
    std::array<double, capacity> s1;  // Σ dbias·x over the piece
    double zero = 0.0;                // Σ dbias where x = 0
    double total = 0.0;               // Σ dbias
    double g_x = 0.0;                 // row: Σ dbias·f'(x)·x
    double g_psi = 0.0;               // row: Σ dbias·f'(x)·δ / (|c|·δ + 1)
  };

  /// Adds the MLP terms of elements of piece k with Σ dbias = s0, Σ dbias·x = s1:
  /// d_W2_hw += act(z_w) summed = factor·(W1_w·s1 + b1_w·s0), d_b1_w += W2_hw·factor·s0,
  /// d_W1_w += W2_hw·factor·s1, factor = act'(z_w) on the piece.
  void add_piece_gradient(Index head, std::size_t k, double s0, double s1,
                          Gradient& gradient) const {
    const Pieces& pieces = pieces_[static_cast<std::size_t>(head)];
    for (Index w = 0; w < mlp_width(); ++w) {
      const double a = w1_(w, 0);
      const double b = b1_[w];
      const double factor = unit_on(a, b, pieces.low(k), pieces.high(k)) ? 1.0 : negative_factor_;
      gradient.w2(head, w) += factor * (a * s1 + b * s0);
      const double t = w2_(head, w) * factor;
      gradient.b1[w] += t * s0;
      gradient.w1(w, 0) += t * s1;
    }
  }

  /// Accumulates a run of elements of piece k (sums of dbias, dbias·x, dbias·ψ_c).
  void add_run(Index head, std::size_t k, double s0, double s1, double s_psi, BackwardSums& sums,
               Gradient& gradient) const {
    if (pieces_[static_cast<std::size_t>(head)].slope.size() <= BackwardSums::capacity) {
      sums.s0[k] += s0;
      sums.s1[k] += s1;
    } else {
      add_piece_gradient(head, k, s0, s1, gradient);
    }
    const double slope = pieces_[static_cast<std::size_t>(head)].slope[k];
    sums.g_x += slope * s1;
    sums.g_psi += slope * s_psi;
  }

  /// One element: x, δ/(|c|·δ + 1) and dbias = g.
  void add_element(Index head, double x, double dpsi, double g, BackwardSums& sums,
                   Gradient& gradient) const {
    sums.total += g;
    if (x == 0.0) {
      sums.zero += g;
      return;
    }
    add_run(head, pieces_[static_cast<std::size_t>(head)].piece_of(x), g, g * x, g * dpsi, sums,
            gradient);
  }

  /// The elements [first, last) of a row with monotone x (non-decreasing when `increasing`):
  /// the x = 0 ones (at the low end, x >= 0) into sums.zero, the others run by run of one piece
  /// (as add_pieces walks them).
  void add_runs(Index head, const double* x, const double* dpsi, const double* g, Index first,
                Index last, bool increasing, BackwardSums& sums, Gradient& gradient) const {
    using Array = Eigen::Map<const Eigen::Array<double, 1, Eigen::Dynamic>>;
    sums.total += Array(g + first, last - first).sum();
    if (increasing) {
      const Index zeros_end =
          std::partition_point(x + first, x + last, [](double v) { return v <= 0.0; }) - x;
      sums.zero += Array(g + first, zeros_end - first).sum();
      first = zeros_end;
    } else {
      const Index zeros_begin =
          std::partition_point(x + first, x + last, [](double v) { return v > 0.0; }) - x;
      sums.zero += Array(g + zeros_begin, last - zeros_begin).sum();
      last = zeros_begin;
    }
    const Pieces& pieces = pieces_[static_cast<std::size_t>(head)];
    const std::size_t count = pieces.kinks.size();
    Index c = first;
    while (c < last) {
      const std::size_t k = pieces.piece_of(x[c]);
      const double* end = x + last;
      if (increasing && k < count) {
        const double high = pieces.kinks[k];
        end = std::partition_point(x + c, x + last, [high](double v) { return v < high; });
      } else if (!increasing && k > 0) {
        const double low = pieces.kinks[k - 1];
        end = std::partition_point(x + c, x + last, [low](double v) { return v >= low; });
      }
      const Index stop = std::max<Index>(end - x, c + 1);
      const Array gs(g + c, stop - c);
      add_run(head, k, gs.sum(), (gs * Array(x + c, stop - c)).sum(),
              (gs * Array(dpsi + c, stop - c)).sum(), sums, gradient);
      c = stop;
    }
  }

  /// psi[m] = ψ(δ) = log(1 + |c|·δ) and dpsi[m] = δ / (|c|·δ + 1) for δ = δ(top − m), m < count,
  /// in double (the backward's; ψ as psi_window's double path).
  void distance_window(Index top, Index count, double* psi, double* dpsi) const {
    detail::form_distances(options_.form, top, count, dpsi);
    const double c = std::abs(options_.c);
    for (Index m = 0; m < count; ++m) psi[m] = c * dpsi[m];
    for (Index m = 0; m < count; ++m) dpsi[m] /= psi[m] + 1.0;
    detail::log1p_in_place(psi, count);
  }

  static double sign(double v) { return v > 0.0 ? 1.0 : v < 0.0 ? -1.0 : 0.0; }

  /// ψ(δ) = log(|c·δ| + 1), in double or replaying the reference's float32 steps.
  double psi(Index distance) const {
    if (options_.float32_distance) {
      const float scaled = std::abs(static_cast<float>(options_.c) * static_cast<float>(distance));
      return static_cast<float>(std::log(static_cast<double>(scaled + 1.0f)));
    }
    return std::log1p(std::abs(options_.c * static_cast<double>(distance)));
  }

  /// ψ(max(i, L)) + eps.
  double denominator(Index i) const {
    if (options_.float32_distance) {
      const float normaliser = std::max(static_cast<float>(i), static_cast<float>(threshold_));
      const float scaled = std::abs(static_cast<float>(options_.c) * normaliser);
      const float log = static_cast<float>(std::log(static_cast<double>(scaled + 1.0f)));
      return log + static_cast<float>(options_.eps);
    }
    return std::log1p(std::abs(options_.c * std::max(static_cast<double>(i), threshold_))) +
           options_.eps;
  }

  /// out[m] = ψ(δ(top − m)) for m < count: vectorised in double, element by element when
  /// replaying float32.
  void psi_window(Index top, Index count, double* out) const {
    if (options_.float32_distance) {
      for (Index m = 0; m < count; ++m) out[m] = psi(detail::form_distance(options_.form, top - m));
      return;
    }
    detail::form_distances(options_.form, top, count, out);
    const double c = std::abs(options_.c);
    for (Index m = 0; m < count; ++m) out[m] *= c;
    detail::log1p_in_place(out, count);
  }

  /// Per query position: 1 / (ψ(max(i, L)) + eps) in double (rows then multiply), the
  /// float32 denominator itself when replaying float32 (rows then divide, as the reference).
  void row_normalisers(Positions queries, double* out) const {
    const auto count = static_cast<Index>(queries.size());
    if (options_.float32_distance) {
      for (Index r = 0; r < count; ++r) out[r] = denominator(queries[static_cast<std::size_t>(r)]);
      return;
    }
    const double c = std::abs(options_.c);
    for (Index r = 0; r < count; ++r) {
      out[r] = c * std::max(static_cast<double>(queries[static_cast<std::size_t>(r)]), threshold_);
    }
    detail::log1p_in_place(out, count);
    for (Index r = 0; r < count; ++r) out[r] = 1.0 / (out[r] + options_.eps);
  }

  /// x[c] = the normalised distance of psi[c] in a row with normaliser `normaliser`, vectorised.
  void normalize_row(const double* psi_row, Index count, double normaliser, double* x) const {
    using Row = Eigen::Array<double, 1, Eigen::Dynamic>;
    const Eigen::Map<const Row> in(psi_row, count);
    Eigen::Map<Row> out(x, count);
    if (options_.float32_distance) {
      out = (in.cast<float>() / static_cast<float>(normaliser)).template cast<double>();
    } else {
      out = in * normaliser;
    }
  }

  double normalized(double psi_value, double den) const {
    if (options_.float32_distance) {
      return static_cast<float>(psi_value) / static_cast<float>(den);
    }
    return psi_value / den;
  }

  Matrix<double> w1_;
  Vector<double> b1_;
  Matrix<double> w2_;
  Vector<double> b2_;
  FireOptions options_;
  double threshold_ = 0.0;        // L as the forward uses it (float32-rounded when replaying)
  double exact_threshold_ = 0.0;  // |threshold_multiplier · threshold| in double (backward)
  double negative_factor_ = 0.0;
  std::vector<Pieces> pieces_;
};

static_assert(ScoreBias<Fire<float>>);
static_assert(ScoreBias<Fire<double>>);
static_assert(LearnableScoreBias<Fire<float>>);
static_assert(LearnableScoreBias<Fire<double>>);

}  // namespace posenc
