// SPDX-License-Identifier: MIT
#include "posenc/compose.hpp"

#include <gtest/gtest.h>

#include <vector>

#include "encoders/bias_checks.hpp"
#include "posenc/attention.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/kerple.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/t5_bias.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

/// A test-only QueryKeyTransform that widens q and k by one channel: queries get 1, keys get
/// slope · (position mod 5) (bounded, so that logits keep their digits at positions near 10^6).
template <class T>
struct AppendPositionChannel {
  using Scalar = T;
  double slope = 0.25;

  Index transformed_dim(Index dim) const { return dim + 1; }
  void transform_queries(Index, Positions, Index, ConstTileRef<T> in, TileRef<T> out) const {
    out.leftCols(in.cols()) = in;
    out.col(in.cols()).setOnes();
  }
  void transform_keys(Index, Positions positions, Index, ConstTileRef<T> in, TileRef<T> out) const {
    out.leftCols(in.cols()) = in;
    for (Index r = 0; r < in.rows(); ++r) {
      out(r, in.cols()) =
          static_cast<T>(slope * static_cast<double>(positions[static_cast<std::size_t>(r)] % 5));
    }
  }
};

/// A test-only width-preserving QueryKeyTransform: row r scaled by 1 + rate · (position mod 7).
template <class T>
struct ScaleByPosition {
  using Scalar = T;
  double rate = 0.05;

  Index transformed_dim(Index dim) const { return dim; }
  void transform_queries(Index, Positions positions, Index, ConstTileRef<T> in,
                         TileRef<T> out) const {
    apply(positions, in, out);
  }
  void transform_keys(Index, Positions positions, Index, ConstTileRef<T> in, TileRef<T> out) const {
    apply(positions, in, out);
  }
  void apply(Positions positions, ConstTileRef<T> in, TileRef<T> out) const {
    for (Index r = 0; r < in.rows(); ++r) {
      const double factor =
          1.0 + rate * static_cast<double>(positions[static_cast<std::size_t>(r)] % 7);
      out.row(r) = in.row(r) * static_cast<T>(factor);
    }
  }
};

static_assert(ScoreBias<Composed<Alibi<float>, Kerple<float>>>);
static_assert(!QueryKeyTransform<Composed<Alibi<float>, Kerple<float>>>);
static_assert(!RelativeKeyValue<Composed<Alibi<float>, Kerple<float>>>);
static_assert(QueryKeyTransform<Composed<AppendPositionChannel<float>, Alibi<float>>>);
static_assert(ScoreBias<Composed<AppendPositionChannel<float>, Alibi<float>>>);
static_assert(RelativeKeyValue<Composed<ShawRelative<float>, Alibi<float>>>);
static_assert(ScoreBias<Composed<ShawRelative<float>, Alibi<float>>>);
static_assert(!ScoreBias<Composed<AppendPositionChannel<float>, ScaleByPosition<float>>>);
static_assert(ScoreBias<Composed<NoPositionalEncoding, Alibi<double>>>);
static_assert(AttentionEncoder<
              Composed<Composed<ScaleByPosition<double>, ShawRelative<double>>, Kerple<double>>>);

/// [H, N, D] → [H, N, D'] by applying a transform's queries or keys side at positions from
/// `first` on.
template <class T, class Transform>
Heads<T> transformed(const Heads<T>& x, const Transform& t, bool queries, Index first) {
  std::vector<Index> positions(static_cast<std::size_t>(x.rows()));
  for (Index r = 0; r < x.rows(); ++r) positions[static_cast<std::size_t>(r)] = first + r;
  Heads<T> out(x.heads(), x.rows(), t.transformed_dim(x.dim()));
  for (Index h = 0; h < x.heads(); ++h) {
    Matrix<T> head(x.rows(), out.dim());
    if (queries) {
      t.transform_queries(h, positions, 0, x.head(h), head);
    } else {
      t.transform_keys(h, positions, 0, x.head(h), head);
    }
    out.head(h) = head;
  }
  return out;
}

template <class T>
class ComposeTest : public ::testing::Test {};
TYPED_TEST_SUITE(ComposeTest, test::Scalars);

TYPED_TEST(ComposeTest, TwoBiasesAdd) {
  using T = TypeParam;
  auto rng = test::make_rng(201);
  const Alibi<T> alibi(3, BiasForm::symmetric);
  const auto kerple = Kerple<T>::random(KerpleKernel::log, 3, rng);
  const auto t5 = T5RelativeBias<T>::random(3, 1.0, rng, {.num_buckets = 8, .max_distance = 12});
  const auto both = compose(alibi, kerple);
  const auto three = compose(alibi, kerple, t5);
  static_assert(std::is_same_v<std::remove_const_t<decltype(three)>,
                               Composed<Composed<Alibi<T>, Kerple<T>>, T5RelativeBias<T>>>);
  EXPECT_EQ(both.heads(), 3);
  const std::vector<Index> queries = {4, 5, 6, 7, 8};
  const std::vector<Index> keys = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  for (Index h = 0; h < 3; ++h) {
    Matrix<T> sum = Matrix<T>::Zero(5, 11);
    Matrix<T> separate = Matrix<T>::Zero(5, 11);
    three.add_bias(h, queries, keys, sum);
    alibi.add_bias(h, queries, keys, separate);
    kerple.add_bias(h, queries, keys, separate);
    t5.add_bias(h, queries, keys, separate);
    EXPECT_EQ(sum, separate);
    EXPECT_EQ(both.bias(h, 7, 2), alibi.bias(h, 7, 2) + kerple.bias(h, 7, 2));
  }
  test::expect_streaming_matches_reference<T>(three, 3, 8, 5, 202, true);
}

TYPED_TEST(ComposeTest, TransformThenBiasEqualsTransformedInputs) {
  using T = TypeParam;
  auto rng = test::make_rng(211);
  const Heads<T> q = test::random_heads<T>(2, 9, 6, rng);
  const Heads<T> k = test::random_heads<T>(2, 12, 6, rng);
  const Heads<T> v = test::random_heads<T>(2, 12, 4, rng);
  const Alibi<T> alibi(2);
  const AppendPositionChannel<T> widen;
  const ScaleByPosition<T> scale;
  const AttentionOptions options{.query_offset = 3, .query_block = 4, .key_block = 5};
  // Width-changing transform then bias; default scale 1/sqrt(7) on both sides.
  {
    const auto encoder = compose(widen, alibi);
    EXPECT_EQ(encoder.transformed_dim(6), 7);
    const Heads<T> want = attention(transformed(q, widen, true, 3), transformed(k, widen, false, 0),
                                    v, alibi, options);
    const Heads<T> got = attention(q, k, v, encoder, options);
    EXPECT_LE(test::relative_error(got.flat(), want.flat()), test::Tolerance<T>::kernel);
    test::expect_streaming_matches_reference<T>(encoder, 2, 6, 4, 212, false);
  }
  // Two transforms: same width first (temporary for the widening second), and widening first
  // (the second then works in place).
  {
    const auto scale_then_widen = compose(scale, widen, alibi);
    const auto widen_then_scale = compose(widen, scale, alibi);
    const Heads<T> q1 = transformed(transformed(q, scale, true, 3), widen, true, 3);
    const Heads<T> k1 = transformed(transformed(k, scale, false, 0), widen, false, 0);
    const Heads<T> q2 = transformed(transformed(q, widen, true, 3), scale, true, 3);
    const Heads<T> k2 = transformed(transformed(k, widen, false, 0), scale, false, 0);
    EXPECT_LE(test::relative_error(attention(q, k, v, scale_then_widen, options).flat(),
                                   attention(q1, k1, v, alibi, options).flat()),
              test::Tolerance<T>::kernel);
    EXPECT_LE(test::relative_error(attention(q, k, v, widen_then_scale, options).flat(),
                                   attention(q2, k2, v, alibi, options).flat()),
              test::Tolerance<T>::kernel);
  }
}

TYPED_TEST(ComposeTest, RelativeStageSeesTheTransformedWidth) {
  using T = TypeParam;
  auto rng = test::make_rng(221);
  const Heads<T> q = test::random_heads<T>(2, 7, 5, rng);
  const Heads<T> k = test::random_heads<T>(2, 7, 5, rng);
  const Heads<T> v = test::random_heads<T>(2, 7, 3, rng);
  const AppendPositionChannel<T> widen;
  const auto shaw = ShawRelative<T>::random(2, 6, 3, ShawValues::separate, rng);
  const Heads<T> want =
      attention(transformed(q, widen, true, 0), transformed(k, widen, false, 0), v, shaw);
  const Heads<T> got = attention(q, k, v, compose(widen, shaw));
  EXPECT_LE(test::relative_error(got.flat(), want.flat()), test::Tolerance<T>::kernel);
}

TEST(ComposeErrors, HeadCountsAndWidthsMustAgree) {
  POSENC_EXPECT_INVALID(compose(Alibi<double>(4), Alibi<double>(3)), "posenc::compose",
                        "the first encoder has 4 heads but the second has 3");
  auto rng = test::make_rng(231);
  const Heads<float> q = test::random_heads<float>(2, 3, 8, rng);
  const auto shaw = ShawRelative<float>(1, Matrix<float>::Zero(3, 4));
  POSENC_EXPECT_INVALID(attention(q, q, q, compose(shaw, Alibi<float>(2))), "posenc::ShawRelative",
                        "the key table has width 4 but q and k have dim 8");
}

}  // namespace
}  // namespace posenc
