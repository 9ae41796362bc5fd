// SPDX-License-Identifier: MIT
// The network of DAPE and DAPE V2 on tiles of all heads: its weights as PyTorch holds them
// (DapeWeights), the tiling of a score tile into runs, bands and chunks, the two layers
// (detail/dape_layer.hpp) and their backward on the same chunks. The public encoders are in
// encoders/dape.hpp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <random>
#include <type_traits>
#include <utility>
#include <vector>

#include "posenc/detail/check.hpp"
#include "posenc/detail/dape_layer.hpp"
#include "posenc/detail/random.hpp"
#include "posenc/detail/scratch.hpp"
#include "posenc/detail/simd.hpp"
#include "posenc/encoders/distance_bias.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc {

/// The weights of a DAPE network, as PyTorch holds them (y = W·x + b, W is (out, in)).
///
///   w1 [W, C·k]   first layer: nn.Linear(C, W).weight (k = 1), or nn.Conv2d(C, W, (1, k)).weight
///                 [W, C, 1, k] reshaped to [W, C·k] (column c·k + t is input channel c, tap t)
///   b1 [W]        its bias
///   w2 [H, W·k]   second layer, the same way: nn.Linear(W, H).weight or Conv2d(W, H, (1, k))
///   b2 [H]        its bias
///
/// W is the hidden width (the paper's D_DAPE, `mlp_width`: 32 in every released config), H the
/// head count, C the input channels: 2H with a bias (A of heads 0…H−1, then B of heads 0…H−1, the
/// reference's `cat([A, B], dim=1)`), H without.
struct DapeWeights {
  Matrix<double> w1;
  Vector<double> b1;
  Matrix<double> w2;
  Vector<double> b2;
};

namespace detail {

/// Scratch of DapeNetwork::mix, leased per thread (detail::ScratchLease): one band of the bias (or,
/// for a DistanceBias, its values and W1_B·B per distance of the tile) and one chunk of the
/// network's input, hidden layer and output. Bounded by the band and chunk sizes (never O(N)); each
/// buffer grows to the largest size seen, then serves every later tile of the thread.
template <class T>
struct DapeScratch {
  Vector<T> bias, input, hidden, output;
  std::vector<const T*> input_rows, hidden_rows, residual_a, residual_b, residual_hidden;
  std::vector<T*> hidden_out, output_rows;
  std::vector<Index> window_positions;
};

/// Scratch of the backward (DapeNetwork::mix_backward), leased per thread: the forward's chunk
/// buffers, one chunk of ∂L/∂scores, of the hidden layer's and of the input's gradient (dS [H,
/// ld], dz [W, ld], dx [C, padded]), one band of ∂L/∂B, and the weight gradient of one call
/// (tap-major, as the layers hold the weights). O(chunk + band); each buffer grows to the largest
/// size seen.
template <class T>
struct DapeBackwardScratch {
  DapeScratch<T> forward;
  Vector<T> ds, dz, dx, dbias;
  Vector<T> dw1, db1, dw2, db2;
  // backward_by_rows: per-distance sums of dz [W, Lp] and dS [H, Lp], and dB per distance [H, Lp].
  Vector<T> dz_sums, ds_sums, dbias_window;
  std::vector<const T*> ds_in, dz_in, left_rows, right_rows;
  std::vector<T*> dz_out, dx_out;
};

/// out[i·stride + j] += Σ_{q < count} a[i][q]·b[j][q] for i < MA, j < MB, in registers (count a
/// multiple of the packet width).
template <class T, int MA, int MB>
void dape_product_block(const T* const* a, const T* const* b, Index count, T* out, Index stride) {
  using Packet = typename SimdPacket<T>::Packet;
  using namespace Eigen::internal;
  constexpr Index W = SimdPacket<T>::width;
  Packet acc[MA][MB];
  for (int i = 0; i < MA; ++i) {
    for (int j = 0; j < MB; ++j) acc[i][j] = pset1<Packet>(T(0));
  }
  for (Index q = 0; q < count; q += W) {
    Packet bp[MB];
    for (int j = 0; j < MB; ++j) bp[j] = ploadu<Packet>(b[j] + q);
    for (int i = 0; i < MA; ++i) {
      const Packet ap = ploadu<Packet>(a[i] + q);
      for (int j = 0; j < MB; ++j) acc[i][j] = pmadd(ap, bp[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MA; ++i) {
    for (int j = 0; j < MB; ++j) out[i * stride + j] += sum_lanes(acc[i][j]);
  }
}

/// Σ_{q < count} row[q] (count a multiple of the packet width), in packets: a bias's gradient.
template <class T>
T dape_row_sum(const T* row, Index count) {
  using Packet = typename SimdPacket<T>::Packet;
  using namespace Eigen::internal;
  constexpr Index W = SimdPacket<T>::width;
  Packet acc[2] = {pset1<Packet>(T(0)), pset1<Packet>(T(0))};
  Index q = 0;
  for (; q + 2 * W <= count; q += 2 * W) {
    acc[0] = padd(acc[0], ploadu<Packet>(row + q));
    acc[1] = padd(acc[1], ploadu<Packet>(row + q + W));
  }
  if (q < count) acc[0] = padd(acc[0], ploadu<Packet>(row + q));
  return sum_lanes(padd(acc[0], acc[1]));
}

/// The weight gradient of a layer over a chunk: out[i·stride + j] += Σ_q a[i][q]·b[j][q], i < na,
/// j < nb, q < count (a multiple of the packet width), i.e. [na × count]·[count × nb] for row
/// pointers a (the layer's output gradient) and b (its input, shifted by the tap). Blocks of 4 × 2
/// rows.
template <class T>
void dape_accumulate_products(const T* const* a, Index na, const T* const* b, Index nb, Index count,
                              T* out, Index stride) {
  Index i = 0;
  const auto row_block = [&]<int MA>(std::integral_constant<int, MA>) {
    Index j = 0;
    for (; j + 2 <= nb; j += 2) {
      dape_product_block<T, MA, 2>(a + i, b + j, count, out + i * stride + j, stride);
    }
    if (j < nb) dape_product_block<T, MA, 1>(a + i, b + j, count, out + i * stride + j, stride);
  };
  for (; i + 4 <= na; i += 4) row_block(std::integral_constant<int, 4>{});
  for (; i < na; ++i) row_block(std::integral_constant<int, 1>{});
}

/// Pixels (query/key pairs) per chunk of the network, small enough that the chunk's input (C
/// rows), hidden layer (W rows) and output stay in L1/L2 (W = 32, float: 48 KiB of hidden layer);
/// 384 = three rows of a 128-key tile = eight strips of three AVX-512 packets. Measured on the
/// benchmark's shapes (bench_dape): 256 and 768 are 5–10 % slower.
inline constexpr Index dape_chunk_pixels = 384;
/// Pixels per band of the bias: B is filled for a band of rows at once, so that a distance bias
/// evaluates each distance once per band rather than once per chunk.
inline constexpr Index dape_band_pixels = 4096;
/// Longest run of output keys of one query row.
inline constexpr Index dape_max_run = 512;

/// The network of DAPE (k = 1, no tril) and DAPE V2 (k odd, tril), on tiles of all heads.
///
/// A tile is cut into runs of at most dape_max_run keys, each run into bands of query rows (the
/// bias B of a band is filled at once), each band into chunks of a few rows. A chunk's pixels are
/// laid out channel-major (one row per channel, pixels contiguous), one segment per query row
/// holding the run's keys plus 2·(k/2) neighbours on each side (zero where the neighbour lies
/// outside the sequence); a 1×k convolution along keys is then a GEMM over k shifted views of the
/// chunk: [W × C·k]·[C·k × pixels] for the first layer (leaky ReLU on the way out of the
/// registers), [H × W·k]·[W·k × pixels] for the second (dape_layer). Pixels near a segment's ends
/// read the next segment's data and are discarded; the run's keys get A + B + the network.
template <class T>
class DapeNetwork {
 public:
  static constexpr double negative_slope = 0.01;

  /// Checks the shapes (naming `fn`) and keeps the weights, cast to T and split per tap.
  DapeNetwork(DapeWeights weights, Index kernel, bool with_bias, bool tril, const char* fn)
      : weights_(std::move(weights)), kernel_(kernel), with_bias_(with_bias), tril_(tril) {
    detail::require(
        kernel_ >= 1 && kernel_ % 2 == 1, fn,
        "kernel size must be odd and >= 1 (zero padding of k/2 keys on each side), got ", kernel_);
    const Matrix<double>& w1 = weights_.w1;
    const Matrix<double>& w2 = weights_.w2;
    const char* k_text = kernel_ == 1 ? "" : "·kernel";
    const Index heads = w2.rows();
    detail::require(heads >= 1, fn, "w2 must have one row per head (at least one), got [",
                    w2.rows(), ", ", w2.cols(), "]");
    detail::require(w1.rows() >= 1, fn,
                    "w1 must have mlp_width >= 1 rows (PyTorch (out, in) layout), got [", w1.rows(),
                    ", ", w1.cols(), "]");
    const Index channels = (with_bias_ ? 2 : 1) * heads;
    detail::require(
        w1.cols() == channels * kernel_, fn, "w1 must be [mlp_width, ",
        with_bias_ ? "2·heads" : "heads", k_text, "] = [", w1.rows(), ", ", channels * kernel_,
        "] for the ", heads, " heads of w2 (PyTorch (out, in) layout; input channels: ",
        with_bias_ ? "the heads' scaled logits, then their biases" : "the scaled logits",
        kernel_ == 1 ? "" : "; Conv2d weight [out, in, 1, k] reshaped to [out, in·k]", "), got [",
        w1.rows(), ", ", w1.cols(), "]");
    detail::require(weights_.b1.size() == w1.rows(), fn, "b1 must have mlp_width = ", w1.rows(),
                    " entries, got ", weights_.b1.size());
    detail::require(w2.cols() == w1.rows() * kernel_, fn, "w2 must be [heads, mlp_width", k_text,
                    "] = [", heads, ", ", w1.rows() * kernel_, "], got [", w2.rows(), ", ",
                    w2.cols(), "]");
    detail::require(weights_.b2.size() == heads, fn, "b2 must have heads = ", heads,
                    " entries, got ", weights_.b2.size());
    detail::require(
        w1.allFinite() && weights_.b1.allFinite() && w2.allFinite() && weights_.b2.allFinite(), fn,
        "weights must be finite");
    heads_ = heads;
    channels_ = channels;
    width_ = w1.rows();
    // Columns reordered tap-major (t·in + c): a convolution is one GEMM over k shifted inputs.
    w1_.resize(width_, kernel_ * channels_);
    w2_.resize(heads_, kernel_ * width_);
    for (Index t = 0; t < kernel_; ++t) {
      for (Index c = 0; c < channels_; ++c) {
        w1_.col(t * channels_ + c) = w1.col(c * kernel_ + t).template cast<T>();
      }
      for (Index c = 0; c < width_; ++c) {
        w2_.col(t * width_ + c) = w2.col(c * kernel_ + t).template cast<T>();
      }
    }
    b1_ = weights_.b1.template cast<T>();
    b2_ = weights_.b2.template cast<T>();
    w1t_.resize(channels_, kernel_ * width_);
    w2t_.resize(width_, kernel_ * heads_);
    for (Index t = 0; t < kernel_; ++t) {
      w1t_.middleCols(t * width_, width_) = w1_.middleCols(t * channels_, channels_).transpose();
      w2t_.middleCols(t * heads_, heads_) = w2_.middleCols(t * width_, width_).transpose();
    }
    zeros_ = Vector<T>::Zero(std::max(width_, channels_));
    if (kernel_ == 1 && !tril_ && with_bias_) {
      w1_logits_ = w1_.leftCols(heads_);
      w1_bias_ = w1_.rightCols(heads_);
    }
  }

  Index heads() const { return heads_; }
  Index width() const { return width_; }
  Index kernel() const { return kernel_; }
  const DapeWeights& weights() const { return weights_; }

  /// scores = A + B + g([A; B]) on one tile (the ScoreMixer contract, encoding.hpp): logits [H,
  /// rows·K], scores [H, rows·key_count] for keys [first_key, first_key + key_count) of the K
  /// key_positions. `add_bias(h, qpos, kpos, tile)` adds head h's bias B to a zero tile (called
  /// only when the network reads a bias); `distance_bias`: B_h(i, j) depends on i − j only.
  template <class AddBias>
  void mix(Positions query_positions, Positions key_positions, Index first_key, Index key_count,
           ConstTileRef<T> logits, TileRef<T> scores, const AddBias& add_bias, const char* fn,
           bool distance_bias = false) const {
    const auto rows = static_cast<Index>(query_positions.size());
    const auto K = static_cast<Index>(key_positions.size());
    detail::require(first_key >= 0 && key_count >= 0 && first_key + key_count <= K, fn, "keys [",
                    first_key, ", ", first_key + key_count, ") do not lie in the ", K,
                    " key positions");
    detail::require(logits.rows() == heads_ && logits.cols() == rows * K, fn,
                    "logits must be [heads, rows·keys] = [", heads_, ", ", rows * K, "], got [",
                    logits.rows(), ", ", logits.cols(), "]");
    detail::require(scores.rows() == heads_ && scores.cols() == rows * key_count, fn,
                    "scores must be [heads, rows·key_count] = [", heads_, ", ", rows * key_count,
                    "], got [", scores.rows(), ", ", scores.cols(), "]");
    if (rows == 0 || key_count == 0) return;
    if (distance_bias && w1_logits_.size() > 0 && first_key == 0 && key_count == K &&
        K % SimdPacket<T>::width == 0 && is_consecutive(query_positions) &&
        is_consecutive(key_positions)) {
      mix_by_distance(query_positions, key_positions, logits, scores, add_bias);
      return;
    }
    ScratchLease<DapeScratch<T>> lease;
    DapeScratch<T>& scratch = lease.get();
    const Tile tile{query_positions, key_positions,        logits.data(), logits.outerStride(),
                    scores.data(),   scores.outerStride(), first_key,     key_count};
    for_each_band(tile, add_bias, scratch.bias, [&](const Band& band, const T* bias) {
      for (Index r0 = 0; r0 < band.rows; r0 += band.chunk_rows) {
        run_chunk(tile, band, r0, std::min(band.chunk_rows, band.rows - r0), bias, scratch);
      }
    });
  }

  /// The backward of mix on one tile, fused with its forward, chunk by chunk (the chunks of mix).
  /// With x = tril?([A; B]) zero-padded along the keys, z = b1 + Σ_t W1_t·x(j + t − k/2), a =
  /// LeakyReLU(z) (zero outside the sequence), g = b2 + Σ_t W2_t·a(j + t − k/2) and S = A + B + g:
  /// each chunk writes S to `scores` [H, rows·key_count], calls `finish(r0, rows, c0, count)`,
  /// which must turn dscores [H, rows·key_count] into dS = ∂L/∂S on the block of rows [r0, r0 +
  /// rows) × score columns [c0, c0 + count) of every head (the streaming kernel's softmax backward:
  /// S → P, dP → P ∘ (dP − D)), then goes back through the network with a, kept from the forward:
  ///   db2 += Σ_j dS(j),  dW2_t += Σ_j dS(j)·a(j + t − k/2)ᵀ,  da(i) = Σ_t W2_tᵀ·dS(i − t + k/2),
  ///   dz = da ∘ LeakyReLU'(z),  db1 += Σ_i dz(i),  dW1_t += Σ_i dz(i)·x(i + t − k/2)ᵀ,
  ///   dx(m) = Σ_t W1_tᵀ·dz(m − t + k/2) (times the tril),  dA = dS + dx_A,  dB = dS + dx_B,
  /// each a GEMM over the chunk ([W × k·H]·[k·H × pixels], [H × pixels]·[pixels × W], …). Writes
  /// dlogits = dA [H, rows·K] at every key (a key's logit reaches the scores of up to k − 1
  /// neighbours on each side: with a halo, this is the tile's share), passes dB of each band to
  /// `bias_gradient(h, qpos, kpos, dB_h)` when it is non-null (the band's rows × input keys) and
  /// adds dW1, db1, dW2, db2 in DapeWeights layout to `*gradient` when it is non-null.
  /// `distance_bias`: B_h(i, j) depends on i − j only (DAPE's tiles of whole-packet rows with
  /// consecutive positions then take backward_by_rows).
  template <class AddBias, class Finish, class BiasGradient, class WeightGradient>
  void mix_backward(Positions query_positions, Positions key_positions, Index first_key,
                    Index key_count, ConstTileRef<T> logits, TileRef<T> scores,
                    ConstTileRef<T> dscores, const Finish& finish, TileRef<T> dlogits,
                    const AddBias& add_bias, const BiasGradient* bias_gradient,
                    WeightGradient* gradient, const char* fn, bool distance_bias = false) const;

 private:
  /// The arguments of one mix call.
  struct Tile {
    Positions qpos, kpos;
    const T* logits;  // row h at logits + h·logits_stride
    Index logits_stride;
    T* scores;  // row h at scores + h·scores_stride
    Index scores_stride;
    Index first_key, key_count;
  };

  /// What the backward adds to a Tile: dS (row h at dscores + h·dscores_stride, [rows·key_count])
  /// and dA (row h at dlogits + h·dlogits_stride, [rows·K]).
  struct BackwardTile {
    const T* dscores;
    Index dscores_stride;
    T* dlogits;
    Index dlogits_stride;
  };

  /// The weight gradient of one backward call, tap-major as w1_, b1_, w2_, b2_ (null: none).
  struct WeightGradients {
    T* dw1;
    T* db1;
    T* dw2;
    T* db2;
  };

  /// Query rows [r0, r0 + rows) × output keys [first, last) of a tile, whose input keys are
  /// [in_first, in_last) (the run and its neighbours inside the sequence), cut into chunks of
  /// chunk_rows rows.
  struct Band {
    Index r0, rows, first, last, in_first, in_last, chunk_rows;
  };

  /// A chunk in the gathered layout: query rows [first_row, first_row + rows) of the tile, each a
  /// segment of S slots (slot u: key column slot_key + u of the row; the run's count output keys
  /// at slots [2·half, 2·half + count)), slots = rows·S pixels padded to `padded`; the input,
  /// hidden layer and dS buffers hold slot q at column half + q of rows of ld = padded + 2·half.
  struct ChunkLayout {
    Index first_row, rows, count, S, padded, ld, slot_key;
  };

  /// Cuts a tile into runs of at most dape_max_run keys and each run into bands of query rows,
  /// fills the bias B of each band ([H] blocks band.rows × (in_last − in_first), row-major, in
  /// `bias_buffer`; null without a bias) and calls body(band, B).
  template <class AddBias, class Body>
  void for_each_band(const Tile& tile, const AddBias& add_bias, Vector<T>& bias_buffer,
                     const Body& body) const {
    const auto rows = static_cast<Index>(tile.qpos.size());
    const auto K = static_cast<Index>(tile.kpos.size());
    const Index half = kernel_ / 2;
    const Index end = tile.first_key + tile.key_count;
    const Index runs = (tile.key_count + dape_max_run - 1) / dape_max_run;
    const Index run_length = (tile.key_count + runs - 1) / runs;
    const Index chunk_rows = std::max<Index>(1, dape_chunk_pixels / (run_length + 4 * half));
    const Index band_rows =
        chunk_rows * std::max<Index>(1, dape_band_pixels / (chunk_rows * run_length));
    for (Index run_first = tile.first_key; run_first < end; run_first += run_length) {
      Band band{0, 0, run_first, std::min(run_first + run_length, end), 0, 0, chunk_rows};
      band.in_first = std::max<Index>(0, run_first - 2 * half);
      band.in_last = std::min<Index>(K, band.last + 2 * half);
      for (band.r0 = 0; band.r0 < rows; band.r0 += band_rows) {
        band.rows = std::min(band_rows, rows - band.r0);
        T* bias = nullptr;
        if (with_bias_) {
          const Index count = band.in_last - band.in_first;
          bias = grow(bias_buffer, heads_ * band.rows * count);
          std::fill(bias, bias + heads_ * band.rows * count, T(0));
          for (Index h = 0; h < heads_; ++h) {
            Eigen::Map<Matrix<T>> b(bias + h * band.rows * count, band.rows, count);
            add_bias(h,
                     tile.qpos.subspan(static_cast<std::size_t>(band.r0),
                                       static_cast<std::size_t>(band.rows)),
                     tile.kpos.subspan(static_cast<std::size_t>(band.in_first),
                                       static_cast<std::size_t>(count)),
                     b);
          }
        }
        body(band, static_cast<const T*>(bias));
      }
    }
  }

  /// DAPE (k = 1) on a tile with consecutive positions, whole-packet rows and a bias that depends
  /// on i − j only. B then takes rows + K − 1 values per head (one per distance, from a single
  /// add_bias call on one query row), not rows·K, and so does the bias's share of the first
  /// layer, W1_B·B; the first layer runs on the logits alone (depth H, not 2H) with W1_B·B added
  /// as a residual. The same sums as the general path, in another order. Pixel (r, c) has
  /// distance index m = (rows − 1 − r) + c.
  template <class AddBias>
  void mix_by_distance(Positions qpos, Positions kpos, ConstTileRef<T> logits, TileRef<T> scores,
                       const AddBias& add_bias) const {
    const auto rows = static_cast<Index>(qpos.size());
    const auto K = static_cast<Index>(kpos.size());
    const Index L = rows + K - 1;
    ScratchLease<DapeScratch<T>> lease;
    DapeScratch<T>& scratch = lease.get();
    // B_h(last query, kpos[0] + m) = b_h(top − m) for m < L: every distance of the tile.
    Index* key_positions = grow(scratch.window_positions, L);
    for (Index m = 0; m < L; ++m) key_positions[m] = kpos[0] + m;
    const Index last_query = qpos[static_cast<std::size_t>(rows - 1)];
    T* window = grow(scratch.bias, (heads_ + width_) * L);
    std::fill(window, window + heads_ * L, T(0));
    for (Index h = 0; h < heads_; ++h) {
      Eigen::Map<Matrix<T>> row(window + h * L, 1, L);
      add_bias(h, Positions(&last_query, 1), Positions(key_positions, static_cast<std::size_t>(L)),
               row);
    }
    // hidden_bias[w][m] = Σ_h W1_B[w, h]·B_h[m].
    T* hidden_bias = window + heads_ * L;
    for (Index w = 0; w < width_; ++w) {
      T* out = hidden_bias + w * L;
      std::fill(out, out + L, T(0));
      for (Index h = 0; h < heads_; ++h) {
        const T weight = w1_bias_(w, h);
        const T* b = window + h * L;
        for (Index m = 0; m < L; ++m) out[m] += weight * b[m];
      }
    }
    // One query row at a time: its rows of W1_B·B and of B are slices of the per-distance rows.
    const T slope = static_cast<T>(negative_slope);
    const T** in = grow(scratch.input_rows, heads_);
    const T** residual_hidden = grow(scratch.residual_hidden, width_);
    const T** hidden_in = grow(scratch.hidden_rows, width_);
    T** hidden_out = grow(scratch.hidden_out, width_);
    const T** residual_a = grow(scratch.residual_a, heads_);
    const T** residual_b = grow(scratch.residual_b, heads_);
    T** out = grow(scratch.output_rows, heads_);
    T* hidden = grow(scratch.hidden, width_ * K);
    for (Index w = 0; w < width_; ++w) hidden_in[w] = hidden_out[w] = hidden + w * K;
    for (Index r = 0; r < rows; ++r) {
      const Index m0 = rows - 1 - r;  // distance index of (r, 0)
      for (Index w = 0; w < width_; ++w) residual_hidden[w] = hidden_bias + w * L + m0;
      for (Index h = 0; h < heads_; ++h) {
        in[h] = residual_a[h] = logits.data() + h * logits.outerStride() + r * K;
        residual_b[h] = window + h * L + m0;
        out[h] = scores.data() + h * scores.outerStride() + r * K;
      }
      dape_layer(DapeLayer<T>{w1_logits_.data(), b1_.data(), width_, heads_, in, hidden_out,
                              residual_hidden, nullptr, true, slope},
                 0, K);
      dape_layer(DapeLayer<T>{w2_.data(), b2_.data(), heads_, width_, hidden_in, out, residual_a,
                              residual_b, false, slope},
                 0, K);
    }
  }

  /// The backward of DAPE (k = 1, no tril) on a tile of whole-packet rows (first_key = 0, key_count
  /// = K, K a multiple of the packet width), without a bias or with a distance bias and
  /// consecutive positions: the layers read and write the tile's logits, scores, dS and dA in
  /// place (no gathered copy), a chunk of whole rows at a time. With a bias, B and W1_B·B are
  /// computed once per distance of the tile, as mix_by_distance does (the recomputed scores are
  /// the forward's, bit for bit), so the first layer reads only the logits; and since B_h(i, j)
  /// depends on m = (rows − 1 − r) + c alone, so do its gradients' shares: with dz and dS summed
  /// per distance, dW1_B = Σ_m Σdz(m)·B(m)ᵀ and ∂L/∂B(m) = ΣdS(m) + W1_Bᵀ·Σdz(m) (one value per
  /// distance, passed to `bias_gradient` as a row of the last query against the window's keys).
  template <class Finish, class AddBias, class BiasGradient>
  void backward_by_rows(const Tile& tile, const BackwardTile& back, const Finish& finish,
                        const AddBias& add_bias, const BiasGradient* bias_gradient,
                        const WeightGradients& grads, DapeBackwardScratch<T>& scratch) const;

  /// Rows [band.r0 + r0, … + rows) of a band. Each row is a segment of S slots, slot u holding
  /// key column band.first − 2·half + u. When the chunk is a contiguous block of the logits, the
  /// band's bias and the scores (DAPE over whole tile rows: no halo, no tril, one run, a whole
  /// number of packets) the layers read and write them in place; otherwise forward_chunk gathers
  /// the input.
  void run_chunk(const Tile& tile, const Band& band, Index r0, Index rows, const T* band_bias,
                 DapeScratch<T>& scratch) const {
    const auto K = static_cast<Index>(tile.kpos.size());
    const Index half = kernel_ / 2;
    const Index count = band.last - band.first;
    const Index S = count + 4 * half;
    const Index slots = rows * S;
    const Index in_count = band.in_last - band.in_first;
    const Index first_row = band.r0 + r0;
    const auto logits_row = [&](Index h, Index row) {
      return tile.logits + h * tile.logits_stride + row * K;
    };
    const auto bias_row = [&](Index h, Index r) {
      return band_bias + (h * band.rows + r0 + r) * in_count;
    };
    const auto scores_row = [&](Index h, Index row) {
      return tile.scores + h * tile.scores_stride + row * tile.key_count +
             (band.first - tile.first_key);
    };
    const T slope = static_cast<T>(negative_slope);
    const T** in = grow(scratch.input_rows, kernel_ * channels_);
    const T** hidden_in = grow(scratch.hidden_rows, kernel_ * width_);
    T** hidden_out = grow(scratch.hidden_out, width_);
    T** out = grow(scratch.output_rows, heads_);

    if (!tril_ && half == 0 && count == K && count == tile.key_count &&
        slots % SimdPacket<T>::width == 0) {
      const T** residual_a = grow(scratch.residual_a, heads_);
      const T** residual_b = grow(scratch.residual_b, heads_);
      T* hidden = grow(scratch.hidden, width_ * slots);
      for (Index h = 0; h < heads_; ++h) {
        in[h] = residual_a[h] = logits_row(h, first_row);
        if (with_bias_) in[heads_ + h] = residual_b[h] = bias_row(h, 0);
        out[h] = scores_row(h, first_row);
      }
      for (Index w = 0; w < width_; ++w) hidden_in[w] = hidden_out[w] = hidden + w * slots;
      dape_layer(DapeLayer<T>{w1_.data(), b1_.data(), width_, channels_, in, hidden_out, nullptr,
                              nullptr, true, slope},
                 0, slots);
      dape_layer(DapeLayer<T>{w2_.data(), b2_.data(), heads_, width_, hidden_in, out, residual_a,
                              with_bias_ ? residual_b : nullptr, false, slope},
                 0, slots);
      return;
    }
    forward_chunk(tile, band, r0, rows, band_bias, scratch);
  }

  /// run_chunk with the input gathered into buffers with `half` margin columns on each side, so
  /// that every tap of every slot reads valid (zero) memory: slot q of the chunk is column half +
  /// q. Leaves the input x and the hidden layer a in scratch.input and scratch.hidden ([C] and [W]
  /// rows of ld) for the backward.
  ChunkLayout forward_chunk(const Tile& tile, const Band& band, Index r0, Index rows,
                            const T* band_bias, DapeScratch<T>& scratch) const {
    const auto K = static_cast<Index>(tile.kpos.size());
    const Index half = kernel_ / 2;
    const Index count = band.last - band.first;
    const Index S = count + 4 * half;
    const Index slots = rows * S;
    const Index in_count = band.in_last - band.in_first;
    const Index first_row = band.r0 + r0;
    const auto logits_row = [&](Index h, Index row) {
      return tile.logits + h * tile.logits_stride + row * K;
    };
    const auto bias_row = [&](Index h, Index r) {
      return band_bias + (h * band.rows + r0 + r) * in_count;
    };
    const auto scores_row = [&](Index h, Index row) {
      return tile.scores + h * tile.scores_stride + row * tile.key_count +
             (band.first - tile.first_key);
    };
    const T slope = static_cast<T>(negative_slope);
    const T** in = grow(scratch.input_rows, kernel_ * channels_);
    const T** hidden_in = grow(scratch.hidden_rows, kernel_ * width_);
    T** hidden_out = grow(scratch.hidden_out, width_);
    T** out = grow(scratch.output_rows, heads_);

    const Index padded = padded_width<T>(slots);
    const Index ld = padded + 2 * half;
    const Index slot_key = band.first - 2 * half;  // key column of slot 0 of a segment
    const Index u_first = band.in_first - slot_key;
    T* input = grow(scratch.input, channels_ * ld);
    T* hidden = grow(scratch.hidden, width_ * ld);
    T* output = grow(scratch.output, heads_ * padded);

    // Input: A of every head, then B; zero in the gaps, the margins and the padding.
    const bool gaps = in_count != S;  // slots outside the sequence
    for (Index c = 0; c < channels_; ++c) {
      T* row = input + c * ld;
      if (gaps) {
        std::fill(row, row + ld, T(0));
      } else {
        std::fill(row, row + half, T(0));
        std::fill(row + half + slots, row + ld, T(0));
      }
      const bool is_bias = c >= heads_;
      const Index h = is_bias ? c - heads_ : c;
      for (Index r = 0; r < rows; ++r) {
        const T* from = is_bias ? bias_row(h, r) : logits_row(h, first_row + r) + band.in_first;
        std::copy(from, from + in_count, row + half + r * S + u_first);
      }
      for (Index t = 0; t < kernel_; ++t) in[t * channels_ + c] = row + t;
    }
    if (tril_) zero_future_keys(tile, first_row, rows, S, slot_key, input, ld);

    // First layer (leaky ReLU), zero where its key lies outside the sequence; second layer.
    for (Index w = 0; w < width_; ++w) {
      T* row = hidden + w * ld;
      std::fill(row, row + half, T(0));
      std::fill(row + half + padded, row + ld, T(0));
      hidden_out[w] = row + half;
      for (Index t = 0; t < kernel_; ++t) hidden_in[t * width_ + w] = row + t;
    }
    dape_layer(DapeLayer<T>{w1_.data(), b1_.data(), width_, kernel_ * channels_, in, hidden_out,
                            nullptr, nullptr, true, slope},
               0, padded);
    if (slot_key + half < 0 || slot_key + S - half > K) {
      for (Index r = 0; r < rows; ++r) {
        for (Index u = 0; u < S; ++u) {
          const Index e = slot_key + u;
          if (e >= 0 && e < K) continue;
          for (Index w = 0; w < width_; ++w) hidden[w * ld + half + r * S + u] = T(0);
        }
      }
    }
    for (Index h = 0; h < heads_; ++h) out[h] = output + h * padded;
    dape_layer(DapeLayer<T>{w2_.data(), b2_.data(), heads_, kernel_ * width_, hidden_in, out,
                            nullptr, nullptr, false, slope},
               0, padded);

    // scores = A + B + network output at the run's keys (A and B before the tril).
    const Index bias_offset = band.first - band.in_first;
    for (Index h = 0; h < heads_; ++h) {
      for (Index r = 0; r < rows; ++r) {
        const T* g = output + h * padded + r * S + 2 * half;
        const T* a = logits_row(h, first_row + r) + band.first;
        T* s = scores_row(h, first_row + r);
        if (with_bias_) {
          const T* b = bias_row(h, r) + bias_offset;
          for (Index c = 0; c < count; ++c) s[c] = a[c] + b[c] + g[c];
        } else {
          for (Index c = 0; c < count; ++c) s[c] = a[c] + g[c];
        }
      }
    }
    return ChunkLayout{first_row, rows, count, S, padded, ld, slot_key};
  }

  /// The backward of one chunk (mix_backward): its forward (forward_chunk, which writes S), then
  /// finish (S → P, dP → dS on the chunk's block of the tile), dS gathered into the slot layout
  /// (zero outside the output slots), then the layers transposed as dape_layer GEMMs and the weight
  /// gradients as dape_accumulate_products. dA and dB (band layout, when `dbias` is non-null) are
  /// added at the chunk's input keys.
  template <class Finish>
  void backward_chunk(const Tile& tile, const BackwardTile& back, const Band& band, Index r0,
                      Index rows, const T* band_bias, const Finish& finish, T* dbias,
                      const WeightGradients& grads, DapeBackwardScratch<T>& scratch) const;

  /// DAPE V2's tril: the network's input is zero at keys after the query (position order).
  void zero_future_keys(const Tile& tile, Index first_row, Index rows, Index S, Index slot_key,
                        T* input, Index ld) const {
    const auto K = static_cast<Index>(tile.kpos.size());
    const Index half = kernel_ / 2;
    for (Index r = 0; r < rows; ++r) {
      const Index i = tile.qpos[static_cast<std::size_t>(first_row + r)];
      for (Index u = 0; u < S; ++u) {
        const Index e = slot_key + u;
        if (e < 0 || e >= K || tile.kpos[static_cast<std::size_t>(e)] <= i) continue;
        for (Index c = 0; c < channels_; ++c) input[c * ld + half + r * S + u] = T(0);
      }
    }
  }

  DapeWeights weights_;
  Index kernel_;
  bool with_bias_;
  bool tril_;
  Index heads_ = 0;
  Index channels_ = 0;
  Index width_ = 0;
  Matrix<T> w1_;  // [W, k·C], column t·C + c
  Matrix<T> w2_;  // [H, k·W], column t·W + w
  Vector<T> b1_;
  Vector<T> b2_;
  Matrix<T> w1t_;    // [C, k·W]: w1t_(c, t·W + w) = w1_(w, t·C + c), the first layer transposed
  Matrix<T> w2t_;    // [W, k·H]: w2t_(w, t·H + h) = w2_(h, t·W + w)
  Vector<T> zeros_;  // the bias of the transposed layers
  // DAPE (k = 1) with a bias: w1's columns for the logits and for the bias, each contiguous
  // [W, H], for mix_by_distance (else empty).
  Matrix<T> w1_logits_;
  Matrix<T> w1_bias_;
};

/// PyTorch's default initialisation of nn.Linear / nn.Conv2d (weights and biases ~
/// U(−1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = inputs·k), drawn in the order w1 (row-major), b1,
/// w2, b2 with detail::uniform.
inline DapeWeights dape_random_weights(Index channels, Index width, Index heads, Index kernel,
                                       std::mt19937_64& rng) {
  const auto draw = [&rng](Index rows, Index cols, Index fan_in) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(fan_in));
    Matrix<double> m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = detail::uniform(rng, -bound, bound);
    return m;
  };
  DapeWeights weights;
  weights.w1 = draw(width, channels * kernel, channels * kernel);
  weights.b1 = draw(width, 1, channels * kernel);
  weights.w2 = draw(heads, width * kernel, width * kernel);
  weights.b2 = draw(heads, 1, width * kernel);
  return weights;
}

}  // namespace detail

}  // namespace posenc

// The backward members of DapeNetwork (mix_backward and its chunk and row paths).
#include "posenc/encoders/dape_network_backward.hpp"  // IWYU pragma: export
