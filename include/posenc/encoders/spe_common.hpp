// SPDX-License-Identifier: MIT
// What sineSPE and convSPE share: argument checks, the QueryKeyTransform stage and its backward
// over a tile filter, the per-thread tile buffers, filtering whole [H, N, D] tensors to
// [H, N, R], and the closed-form expectation E[q̂_m·k̂_n] from a per-feature lag kernel.
#pragma once

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "posenc/detail/check.hpp"
#include "posenc/detail/parallel.hpp"
#include "posenc/detail/scratch.hpp"
#include "posenc/encoding.hpp"
#include "posenc/tensor.hpp"

namespace posenc::detail {

inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

/// log(1 + eˣ) without overflow (torch.nn.functional.softplus with beta 1).
inline double softplus(double x) { return std::log1p(std::exp(-std::abs(x))) + std::max(x, 0.0); }

/// The encoder's `validate` hook: heads and width must be the ones the codes were built for.
inline void check_spe_shape(const char* fn, const AttentionShape& shape, Index heads, Index dim) {
  require(shape.heads == heads, fn, "q has ", shape.heads, " heads but the codes were built for ",
          heads);
  require(shape.kv_heads == heads, fn, "k and v have ", shape.kv_heads,
          " heads but the codes were built for ", heads,
          " (stochastic PE filters each head with its own code; grouped-query attention is not "
          "supported)");
  require(shape.query_dim == dim, fn, "q and k have dim ", shape.query_dim,
          " but the codes were built for D = ", dim);
}

/// The seeded constructors of SineSpe and ConvSpe (`fn`, e.g. "posenc::SineSpe"): checks R and
/// the optional gate's shape [H, D] before the noise or the gate is sampled, so a bad argument is
/// reported under the constructor the user called (not SineSpeDraw::sample, ConvSpeDraw::from_seed
/// or SpeGate::sample). Called by both sampling helpers: argument evaluation order is unspecified.
template <class Real>
void check_seeded_spe(const char* fn, Index heads, Index dim, Index realizations,
                      const std::optional<Matrix<Real>>& gate) {
  require(realizations >= 1, fn, "the number of realizations R must be >= 1, got ", realizations);
  if (gate) {
    require(gate->rows() == heads && gate->cols() == dim, fn, "gate must be [H, D] = [", heads,
            ", ", dim, "], got [", gate->rows(), ", ", gate->cols(), "]");
  }
}

/// Checks one tile of transform_queries / transform_keys.
template <class In, class Out>
void check_spe_tile(const char* fn, Index head, Positions positions, const In& in, const Out& out,
                    Index heads, Index dim, Index realizations) {
  require(head >= 0 && head < heads, fn, "head ", head, " out of range for ", heads, " heads");
  require(in.cols() == dim, fn, "the input rows have width ", in.cols(),
          " but the codes were built for D = ", dim);
  require(out.cols() == realizations && out.rows() == in.rows(), fn, "out must be [", in.rows(),
          ", R = ", realizations, "], got [", out.rows(), ", ", out.cols(), "]");
  require(static_cast<Index>(positions.size()) == in.rows(), fn, "got ", positions.size(),
          " positions for ", in.rows(), " rows");
}

/// Checks one tile of transform_queries_backward / transform_keys_backward: in and din
/// [rows, D], dout [rows, R].
template <class In, class DOut, class DIn>
void check_spe_backward_tile(const char* fn, Index head, Positions positions, const In& in,
                             const DOut& dout, const DIn& din, Index heads, Index dim,
                             Index realizations) {
  check_spe_tile(fn, head, positions, in, dout, heads, dim, realizations);
  require(din.rows() == in.rows() && din.cols() == dim, fn, "din must be [", in.rows(),
          ", D = ", dim, "], got [", din.rows(), ", ", din.cols(), "]");
}

/// The per-thread tile buffers of the SPE stages (leased through ScratchLease, grown once per
/// thread, so that a steady-state forward or backward tile allocates nothing). Eigen vectors, so
/// that every thread's buffers have the same alignment: Eigen's vectorised reductions peel by
/// address, and the results must not depend on the thread count.
template <class Real>
struct SpeScratch {
  Vector<Real> features, projections, result, noise, codes;
  Vector<double> cosine, sine, sums;
};

/// A rows × cols row-major matrix over a scratch buffer grown to fit.
template <class T>
Eigen::Map<Matrix<T>> scratch_matrix(Vector<T>& buffer, Index rows, Index cols) {
  return Eigen::Map<Matrix<T>>(grow(buffer, rows * cols), rows, cols);
}

/// dst = lhs·rhs (dst += lhs·rhs with `accumulate`) in blocks of at most 128 rows, 64 inner and
/// 128 output columns: Eigen's GEMM then packs its operands on the stack (at most 64 KiB each in
/// double, under EIGEN_STACK_ALLOCATION_LIMIT), never on the heap, whatever D, K or R are.
template <class Dst, class Lhs, class Rhs>
void product_in_blocks(Dst&& dst, const Lhs& lhs, const Rhs& rhs, bool accumulate) {
  constexpr Index row_block = 128, inner_block = 64, column_block = 128;
  if (!accumulate) dst.setZero();
  for (Index i = 0; i < lhs.rows(); i += row_block) {
    const Index rows = std::min(row_block, lhs.rows() - i);
    for (Index k = 0; k < lhs.cols(); k += inner_block) {
      const Index inner = std::min(inner_block, lhs.cols() - k);
      for (Index j = 0; j < rhs.cols(); j += column_block) {
        const Index columns = std::min(column_block, rhs.cols() - j);
        dst.block(i, j, rows, columns).noalias() +=
            lhs.block(i, k, rows, inner) * rhs.block(k, j, inner, columns);
      }
    }
  }
}

/// a += b for one member of a parameter gradient; an empty `a` (a default-constructed
/// gradient) takes b's shape.
template <class Real>
void add_gradient(Heads<Real>& a, const Heads<Real>& b) {
  if (a.flat().size() == 0 && b.flat().size() != 0) a = Heads<Real>(b.heads(), b.rows(), b.dim());
  require(a.heads() == b.heads() && a.rows() == b.rows() && a.dim() == b.dim(),
          "posenc::SpeGradient::operator+=", "gradients of different shapes: [", a.heads(), ", ",
          a.rows(), ", ", a.dim(), "] and [", b.heads(), ", ", b.rows(), ", ", b.dim(), "]");
  a.flat() += b.flat();
}
template <class Real>
void add_gradient(Matrix<Real>& a, const Matrix<Real>& b) {
  if (a.size() == 0 && b.size() != 0) a = Matrix<Real>::Zero(b.rows(), b.cols());
  require(a.rows() == b.rows() && a.cols() == b.cols(),
          "posenc::SpeGradient::operator+=", "gate gradients of different shapes: [", a.rows(),
          ", ", a.cols(), "] and [", b.rows(), ", ", b.cols(), "]");
  a += b;
}

/// Filters every row of x [H, N, D] (row i at first_position + i) to [H, N, R] with the
/// encoder's transform_queries (queries) or transform_keys, in blocks over (head, rows).
template <class Spe, class X>
Heads<typename Spe::Scalar> filter_heads(const char* fn, const Spe& spe, const X& x_in,
                                         Index first_position, bool queries, int threads) {
  using Scalar = typename Spe::Scalar;
  const HeadsView<const Scalar> x = as_const_view(x_in);
  require(x.heads() == spe.heads(), fn, "the input has ", x.heads(),
          " heads but the codes were built for ", spe.heads());
  require(x.dim() == spe.dim(), fn, "the input has dim ", x.dim(),
          " but the codes were built for D = ", spe.dim());
  require(threads >= 0, fn, "threads must be >= 0 (0 = OpenMP default), got ", threads);
  constexpr Index block = 256;
  Heads<Scalar> out(x.heads(), x.rows(), spe.realizations());
  const Index blocks = (x.rows() + block - 1) / block;
  const Index tasks = x.heads() * blocks;
  parallel_tasks(
      tasks, thread_count(threads, tasks), [] { return std::vector<Index>(); },
      [&](Index task, std::vector<Index>& positions) {
        const Index h = task % x.heads();
        const Index first = (task / x.heads()) * block;
        const Index rows = std::min(block, x.rows() - first);
        positions.resize(static_cast<std::size_t>(rows));
        for (Index r = 0; r < rows; ++r)
          positions[static_cast<std::size_t>(r)] = first_position + first + r;
        auto target = out.head(h).middleRows(first, rows);
        if (queries) {
          spe.transform_queries(h, positions, first_position, x.head(h).middleRows(first, rows),
                                target);
        } else {
          spe.transform_keys(h, positions, first_position, x.head(h).middleRows(first, rows),
                             target);
        }
      });
  return out;
}

/// The stage interface of an SPE encoder, written once over the encoder's tile filter
/// `filter(head, positions, in [rows, D], out [rows, R], query)` and its backward
/// `filter_backward(head, positions, in, dout [rows, R], din [rows, D], Gradient*, query)`
/// (private members; the encoder befriends this base) and its `heads()`, `dim()`,
/// `realizations()` and `name`.
template <class Spe, class Real, class Gradient>
class SpeStages {
 public:
  /// The width of q̂ and k̂: R, whatever D.
  Index transformed_dim(Index /*dim*/) const { return self().realizations(); }

  /// Rejects head counts and widths other than the codes' (called by the kernels).
  void validate(const AttentionShape& shape) const {
    check_spe_shape(Spe::name, shape, self().heads(), self().dim());
  }

  /// out [rows, R] = in [rows, D] filtered by the query codes at `positions` (centre unused).
  void transform_queries(Index head, Positions positions, Index /*centre*/, ConstTileRef<Real> in,
                         TileRef<Real> out) const {
    self().filter(head, positions, in, out, true);
  }
  /// out [rows, R] = in [rows, D] filtered by the key codes at `positions` (centre unused).
  void transform_keys(Index head, Positions positions, Index /*centre*/, ConstTileRef<Real> in,
                      TileRef<Real> out) const {
    self().filter(head, positions, in, out, false);
  }

  /// Backward (DifferentiableTransform): din [rows, D] = Jᵀ·dout for dout = ∂L/∂out [rows, R]
  /// of transform_queries(head, positions, centre, in, out). The filter is linear in `in`, so din
  /// row r is Q̄(positions[r])·dout_r; the draws are constants.
  void transform_queries_backward(Index head, Positions positions, Index /*centre*/,
                                  ConstTileRef<Real> in, ConstTileRef<Real> dout,
                                  TileRef<Real> din) const {
    self().filter_backward(head, positions, in, dout, din, nullptr, true);
  }
  /// din [rows, D] = Jᵀ·dout for transform_keys.
  void transform_keys_backward(Index head, Positions positions, Index /*centre*/,
                               ConstTileRef<Real> in, ConstTileRef<Real> dout,
                               TileRef<Real> din) const {
    self().filter_backward(head, positions, in, dout, din, nullptr, false);
  }
  /// As above, and adds Σ_rows dout·∂out/∂θ to `gradient` for every parameter θ (the
  /// encoder's parameters and, gated, the gate) (LearnableTransform).
  void transform_queries_backward(Index head, Positions positions, Index /*centre*/,
                                  ConstTileRef<Real> in, ConstTileRef<Real> dout, TileRef<Real> din,
                                  Gradient& gradient) const {
    self().filter_backward(head, positions, in, dout, din, &gradient, true);
  }
  void transform_keys_backward(Index head, Positions positions, Index /*centre*/,
                               ConstTileRef<Real> in, ConstTileRef<Real> dout, TileRef<Real> din,
                               Gradient& gradient) const {
    self().filter_backward(head, positions, in, dout, din, &gradient, false);
  }

  /// q̂ for a whole tensor q [H, N, D] (row i at first_position + i) → [H, N, R].
  template <HeadsLike X>
  Heads<Real> filter_queries(const X& q, Index first_position = 0, int threads = 0) const {
    return filter_heads((std::string(Spe::name) + "::filter_queries").c_str(), self(), q,
                        first_position, true, threads);
  }
  /// k̂ for a whole tensor k [H, M, D] (row j at first_position + j) → [H, M, R].
  template <HeadsLike X>
  Heads<Real> filter_keys(const X& k, Index first_position = 0, int threads = 0) const {
    return filter_heads((std::string(Spe::name) + "::filter_keys").c_str(), self(), k,
                        first_position, false, threads);
  }

  /// The query code Q̄[position, head] as [D, R] (gated when a gate is set), for inspection: row
  /// d is the filtered unit vector e_d.
  Matrix<Real> query_code(Index head, Index position) const { return code(head, position, true); }
  /// The key code K̄[position, head] as [D, R].
  Matrix<Real> key_code(Index head, Index position) const { return code(head, position, false); }

 private:
  const Spe& self() const { return static_cast<const Spe&>(*this); }

  Matrix<Real> code(Index head, Index position, bool query) const {
    const Index dim = self().dim();
    const std::vector<Index> positions(static_cast<std::size_t>(dim), position);
    const Matrix<Real> identity = Matrix<Real>::Identity(dim, dim);
    Matrix<Real> result(dim, self().realizations());
    self().filter(head, positions, identity, result, query);
    return result;
  }
};

/// E[q̂_m·k̂_n] = sqrt(R/D)·Σ_d q_md·k_nd·(a_hd·P̃_hd(m − n) + b_hd) for queries at
/// query_offset + i and keys at j, with P̃ the encoder's `lag_kernel` and (a, b) = (1, 0)
/// ungated, (code_weight², noise_weight²) gated. q [H, N, D], k [H, M, D] → [H, N, M].
template <class Spe, class Q, class K>
Heads<typename Spe::Scalar> spe_expected_logits(const char* fn, const Spe& spe, const Q& q_in,
                                                const K& k_in, Index query_offset) {
  using Scalar = typename Spe::Scalar;
  const HeadsView<const Scalar> q = as_const_view(q_in);
  const HeadsView<const Scalar> k = as_const_view(k_in);
  require(q.heads() == spe.heads() && k.heads() == spe.heads(), fn, "q has ", q.heads(),
          " heads and k has ", k.heads(), " but the codes were built for ", spe.heads());
  require(q.dim() == spe.dim() && k.dim() == spe.dim(), fn, "q has dim ", q.dim(),
          " and k has dim ", k.dim(), " but the codes were built for D = ", spe.dim());
  const Index N = q.rows();
  const Index M = k.rows();
  const Index D = spe.dim();
  Heads<Scalar> out(q.heads(), N, M);
  if (N == 0 || M == 0) return out;
  const double factor = std::sqrt(static_cast<double>(spe.realizations()) / static_cast<double>(D));
  const Index lowest_lag = query_offset - (M - 1);  // lag of (row 0, key M−1)
  const Index lags = N + M - 1;
  Matrix<double> kernel(lags, D);  // row t: the effective kernel at lag lowest_lag + t
  for (Index h = 0; h < q.heads(); ++h) {
    for (Index t = 0; t < lags; ++t) kernel.row(t) = spe.lag_kernel(h, lowest_lag + t).transpose();
    if (const auto* gate = spe.gate()) {
      for (Index d = 0; d < D; ++d) {
        const double a = gate->code_weight(h, d) * gate->code_weight(h, d);
        const double b = gate->noise_weight(h, d) * gate->noise_weight(h, d);
        kernel.col(d) = (a * kernel.col(d).array() + b).matrix();
      }
    }
    for (Index i = 0; i < N; ++i) {
      for (Index j = 0; j < M; ++j) {
        const auto pair = q.head(h).row(i).template cast<double>().cwiseProduct(
            k.head(h).row(j).template cast<double>());
        out(h, i, j) = static_cast<Scalar>(factor * pair.dot(kernel.row(i - j + M - 1)));
      }
    }
  }
  return out;
}

}  // namespace posenc::detail
