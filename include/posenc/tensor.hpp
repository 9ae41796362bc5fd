// SPDX-License-Identifier: MIT
// Shapes: row-major matrices, and [heads, rows, dim] tensors as non-owning strided views
// (HeadsView, which reads [H,N,D] and [N,H,D] buffers without copying) or owning storage (Heads).
#pragma once

#include <Eigen/Core>
#include <type_traits>

#include "posenc/detail/check.hpp"

namespace posenc {

using Index = Eigen::Index;

/// Absolute positions lie in (−position_limit, position_limit), position_limit = 2^62: the
/// difference of two positions, or a position minus a window, then never overflows Index. Every
/// entry point that takes positions, offsets or windows rejects values outside.
inline constexpr Index position_limit = Index(1) << 62;

/// Row-major dynamic matrix: the layout of every tile and table in posenc.
template <class Scalar>
using Matrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Dynamic column vector.
template <class Scalar>
using Vector = Eigen::Matrix<Scalar, Eigen::Dynamic, 1>;

/// Non-owning view of a `heads × rows × dim` tensor. `dim` is contiguous; consecutive rows are
/// `row_stride` elements apart and consecutive heads `head_stride` elements apart. `Scalar` may
/// be const-qualified for read-only views.
///
///   [H, N, D] buffer (head-major):   HeadsView<float>::heads_major(p, H, N, D)
///   [N, H, D] buffer (token-major):  HeadsView<float>::tokens_major(p, N, H, D)
///   fused QKV [N, 3, H, D], keys:    HeadsView<float>(p + H * D, H, N, D, D, 3 * H * D)
template <class Scalar>
class HeadsView {
 public:
  using value_type = std::remove_const_t<Scalar>;
  using MatrixType =
      std::conditional_t<std::is_const_v<Scalar>, const Matrix<value_type>, Matrix<value_type>>;
  /// One head as an Eigen matrix (rows × dim, outer stride = row_stride).
  using HeadMap = Eigen::Map<MatrixType, Eigen::Unaligned, Eigen::OuterStride<>>;

  HeadsView() = default;

  /// General strided view. Throws std::invalid_argument for negative sizes or strides, a null
  /// pointer with a non-empty shape, or a row stride smaller than `dim`.
  HeadsView(Scalar* data, Index heads, Index rows, Index dim, Index head_stride, Index row_stride)
      : data_(data),
        heads_(heads),
        rows_(rows),
        dim_(dim),
        head_stride_(head_stride),
        row_stride_(row_stride) {
    constexpr const char* fn = "posenc::HeadsView";
    detail::require(heads >= 0 && rows >= 0 && dim >= 0, fn,
                    "sizes must be non-negative, got heads ", heads, ", rows ", rows, ", dim ",
                    dim);
    detail::require(head_stride >= 0 && row_stride >= dim, fn, "row_stride ", row_stride,
                    " must be >= dim ", dim, " and head_stride ", head_stride,
                    " must be non-negative");
    detail::require(data != nullptr || heads * rows * dim == 0, fn,
                    "null data for a non-empty view of shape [", heads, ", ", rows, ", ", dim, "]");
  }

  /// A contiguous [heads, rows, dim] buffer.
  static HeadsView heads_major(Scalar* data, Index heads, Index rows, Index dim) {
    return HeadsView(data, heads, rows, dim, rows * dim, dim);
  }

  /// A contiguous [rows, heads, dim] buffer (the output of a fused projection).
  static HeadsView tokens_major(Scalar* data, Index rows, Index heads, Index dim) {
    return HeadsView(data, heads, rows, dim, dim, heads * dim);
  }

  /// Read-only view of the same data.
  operator HeadsView<const value_type>() const requires(!std::is_const_v<Scalar>) {
    return HeadsView<const value_type>(data_, heads_, rows_, dim_, head_stride_, row_stride_);
  }

  Index heads() const { return heads_; }
  Index rows() const { return rows_; }
  Index dim() const { return dim_; }
  Index head_stride() const { return head_stride_; }
  Index row_stride() const { return row_stride_; }
  Scalar* data() const { return data_; }

  /// Head `h` as a rows × dim matrix. Unchecked.
  HeadMap head(Index h) const {
    return HeadMap(offset(h * head_stride_), rows_, dim_, Eigen::OuterStride<>(row_stride_));
  }

  /// Rows [first, first + count) of every head (same strides). Throws when out of range.
  HeadsView middle_rows(Index first, Index count) const {
    detail::require(first >= 0 && count >= 0 && first + count <= rows_,
                    "posenc::HeadsView::middle_rows", "rows [", first, ", ", first + count,
                    ") out of range for ", rows_, " rows");
    return HeadsView(offset(first * row_stride_), heads_, count, dim_, head_stride_, row_stride_);
  }

  /// Element (head, row, column). Unchecked.
  Scalar& operator()(Index h, Index r, Index c) const {
    return data_[h * head_stride_ + r * row_stride_ + c];
  }

 private:
  /// data_ + n, or null for an empty view over no storage (offsetting null is undefined).
  Scalar* offset(Index n) const { return data_ == nullptr ? nullptr : data_ + n; }

  Scalar* data_ = nullptr;
  Index heads_ = 0;
  Index rows_ = 0;
  Index dim_ = 0;
  Index head_stride_ = 0;
  Index row_stride_ = 0;
};

/// Owning, contiguous [heads, rows, dim] tensor, zero-initialised.
template <class Scalar>
class Heads {
 public:
  static_assert(!std::is_const_v<Scalar>,
                "posenc::Heads owns its data; use HeadsView<const T> for views");
  using value_type = Scalar;

  Heads() = default;
  Heads(Index heads, Index rows, Index dim) : heads_(heads), rows_(rows), dim_(dim) {
    detail::require(heads >= 0 && rows >= 0 && dim >= 0, "posenc::Heads",
                    "sizes must be non-negative, got heads ", heads, ", rows ", rows, ", dim ",
                    dim);
    storage_.setZero(heads * rows * dim);
  }

  Index heads() const { return heads_; }
  Index rows() const { return rows_; }
  Index dim() const { return dim_; }
  Scalar* data() { return storage_.data(); }
  const Scalar* data() const { return storage_.data(); }

  HeadsView<Scalar> view() { return HeadsView<Scalar>::heads_major(data(), heads_, rows_, dim_); }
  HeadsView<const Scalar> view() const {
    return HeadsView<const Scalar>::heads_major(data(), heads_, rows_, dim_);
  }
  operator HeadsView<Scalar>() { return view(); }
  operator HeadsView<const Scalar>() const { return view(); }

  /// Head `h` as a contiguous rows × dim matrix. Unchecked.
  Eigen::Map<Matrix<Scalar>> head(Index h) {
    return Eigen::Map<Matrix<Scalar>>(data() + h * rows_ * dim_, rows_, dim_);
  }
  Eigen::Map<const Matrix<Scalar>> head(Index h) const {
    return Eigen::Map<const Matrix<Scalar>>(data() + h * rows_ * dim_, rows_, dim_);
  }

  Scalar& operator()(Index h, Index r, Index c) { return storage_[(h * rows_ + r) * dim_ + c]; }
  Scalar operator()(Index h, Index r, Index c) const {
    return storage_[(h * rows_ + r) * dim_ + c];
  }

  /// All elements as one flat vector (for norms and comparisons).
  Eigen::Map<Vector<Scalar>> flat() { return Eigen::Map<Vector<Scalar>>(data(), storage_.size()); }
  Eigen::Map<const Vector<Scalar>> flat() const {
    return Eigen::Map<const Vector<Scalar>>(data(), storage_.size());
  }

 private:
  Index heads_ = 0;
  Index rows_ = 0;
  Index dim_ = 0;
  Vector<Scalar> storage_;
};

namespace detail {

/// Read-only view of anything that holds heads: Heads<T>, HeadsView<T>, HeadsView<const T>.
template <class Scalar>
HeadsView<const Scalar> as_const_view(const Heads<Scalar>& x) {
  return x.view();
}
template <class Scalar>
HeadsView<const std::remove_const_t<Scalar>> as_const_view(const HeadsView<Scalar>& x) {
  return x;
}

template <class T>
struct heads_scalar;
template <class Scalar>
struct heads_scalar<Heads<Scalar>> {
  using type = Scalar;
};
template <class Scalar>
struct heads_scalar<HeadsView<Scalar>> {
  using type = std::remove_const_t<Scalar>;
};

}  // namespace detail

/// Heads<T>, HeadsView<T> or HeadsView<const T>: what the attention entry points accept.
template <class T>
concept HeadsLike = requires {
  typename detail::heads_scalar<std::remove_cvref_t<T>>::type;
};

/// The scalar type of a HeadsLike argument.
template <HeadsLike T>
using heads_scalar_t = typename detail::heads_scalar<std::remove_cvref_t<T>>::type;

namespace detail {

/// Compile-time check of the attention entry points (softmax and linear): q, k and v share one
/// scalar type, float or double.
template <class Q, class K, class V>
constexpr void check_qkv_scalars() {
  static_assert(std::is_same_v<heads_scalar_t<Q>, heads_scalar_t<K>> &&
                    std::is_same_v<heads_scalar_t<Q>, heads_scalar_t<V>>,
                "posenc: q, k and v must have the same scalar type");
  static_assert(
      std::is_same_v<heads_scalar_t<Q>, float> || std::is_same_v<heads_scalar_t<Q>, double>,
      "posenc: the scalar type of q, k and v must be float or double");
}

/// Runtime shape checks shared by the attention entry points (softmax and linear): q [H, N, D],
/// k [H_kv, M, D], v [H_kv, M, Dv] with H_kv ≥ 1 dividing H and D ≥ 1. Throws
/// std::invalid_argument naming `fn` and the sizes.
template <class Scalar>
void check_qkv_shapes(const char* fn, const HeadsView<const Scalar>& q,
                      const HeadsView<const Scalar>& k, const HeadsView<const Scalar>& v) {
  require(q.heads() >= 1, fn, "q must have at least one head, got ", q.heads());
  require(k.heads() == v.heads(), fn, "k has ", k.heads(), " heads but v has ", v.heads());
  require(k.heads() >= 1 && q.heads() % k.heads() == 0, fn, "q has ", q.heads(),
          " heads, which is not a multiple of the ", k.heads(), " heads of k and v");
  require(q.dim() == k.dim(), fn, "q has dim ", q.dim(), " but k has dim ", k.dim());
  require(q.dim() >= 1, fn, "q and k must have dim >= 1, got ", q.dim());
  require(k.rows() == v.rows(), fn, "k has ", k.rows(), " rows but v has ", v.rows());
}

}  // namespace detail

}  // namespace posenc
