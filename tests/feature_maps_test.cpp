// SPDX-License-Identifier: MIT
// Feature maps of linear attention: the library's maps model the FeatureMap contract of
// encoding.hpp, and a map the user writes (here one whose feature width differs from the input
// width) plugs into linear attention, its decoding state and its oracle with no change to posenc.
#include "posenc/feature_maps.hpp"

#include <cmath>
#include <limits>
#include <type_traits>

#include <gtest/gtest.h>

#include "posenc/linear_attention.hpp"
#include "support/test_support.hpp"

namespace posenc::test {
namespace {

/// A user's positive feature map with F = 2·D: φ(x) = [exp(x/2), exp(−x/2)] elementwise, so that
/// φ(q)·φ(k) = Σ_d 2·cosh((q_d + k_d)/2). Not one of the library's, and it changes the width.
struct ExpPlusMinus {
  Index feature_dim(Index dim) const { return 2 * dim; }

  template <class In, class Out>
  void features(const In& x, Out&& out) const {
    const Index d = x.cols();
    out.leftCols(d) = (x.array() * 0.5).exp().matrix();
    out.rightCols(d) = (x.array() * -0.5).exp().matrix();
  }
};

static_assert(FeatureMap<ExpPlusMinus, float> && FeatureMap<ExpPlusMinus, double>);
static_assert(!StabilizedFeatureMap<ExpPlusMinus, float>);
static_assert(FeatureMap<EluPlusOne, float> && FeatureMap<ReluPlusEpsilon, float>);
static_assert(FeatureMap<Favor<double>, double> && StabilizedFeatureMap<Favor<double>, double>);
static_assert(ValidatedFeatureMap<ReluPlusEpsilon> && !ValidatedFeatureMap<EluPlusOne>);

template <class T>
class FeatureMaps : public ::testing::Test {};
TYPED_TEST_SUITE(FeatureMaps, Scalars);

/// out_i = Σ_{j ≤ i} (φ(q_i)·φ(k_j)) v_j / Σ_{j ≤ i} φ(q_i)·φ(k_j), written out for one head.
template <class T>
Matrix<T> by_hand(const Matrix<T>& q, const Matrix<T>& k, const Matrix<T>& v, bool causal) {
  Matrix<T> fq(q.rows(), 2 * q.cols()), fk(k.rows(), 2 * k.cols());
  ExpPlusMinus{}.features(q, fq);
  ExpPlusMinus{}.features(k, fk);
  Matrix<T> out = Matrix<T>::Zero(q.rows(), v.cols());
  for (Index i = 0; i < q.rows(); ++i) {
    T den = 0;
    for (Index j = 0; j < k.rows(); ++j) {
      if (causal && j > i) break;
      const T w = fq.row(i).dot(fk.row(j));
      out.row(i) += w * v.row(j);
      den += w;
    }
    out.row(i) /= den;
  }
  return out;
}

TYPED_TEST(FeatureMaps, UserDefinedMapPlugsIntoLinearAttention) {
  using T = TypeParam;
  auto rng = make_rng(41);
  const Index H = 3, Hkv = 1, N = 23, D = 5, Dv = 4;
  const Heads<T> q = random_heads<T>(H, N, D, rng);
  const Heads<T> k = random_heads<T>(Hkv, N, D, rng);
  const Heads<T> v = random_heads<T>(Hkv, N, Dv, rng);
  for (const bool causal : {true, false}) {
    const Heads<T> out = linear_attention(q, k, v, ExpPlusMinus{}, {.causal = causal, .chunk = 4});
    const Heads<T> oracle =
        linear_attention_reference(q, k, v, ExpPlusMinus{}, {}, {.causal = causal});
    ASSERT_TRUE(out.flat().allFinite());
    for (Index h = 0; h < H; ++h) {
      const Matrix<T> expected = by_hand<T>(q.head(h), k.head(0), v.head(0), causal);
      EXPECT_LE(relative_error(out.head(h), expected), Tolerance<T>::kernel) << "causal " << causal;
      EXPECT_LE(relative_error(oracle.head(h), expected), Tolerance<T>::kernel);
    }
  }
}

TYPED_TEST(FeatureMaps, UserDefinedMapDecodesTokenByToken) {
  using T = TypeParam;
  auto rng = make_rng(42);
  const Index H = 2, N = 11, D = 4;
  const Heads<T> q = random_heads<T>(H, N, D, rng);
  const Heads<T> k = random_heads<T>(H, N, D, rng);
  const Heads<T> v = random_heads<T>(H, N, D, rng);
  const Heads<T> one_pass = linear_attention(q, k, v, ExpPlusMinus{});
  LinearAttentionState<T, ExpPlusMinus> state;
  for (Index t = 0; t < N; ++t) {
    const Heads<T> out = state.step(q.view().middle_rows(t, 1), k.view().middle_rows(t, 1),
                                    v.view().middle_rows(t, 1));
    for (Index h = 0; h < H; ++h) {
      EXPECT_LE(relative_error(out.head(h), one_pass.head(h).middleRows(t, 1)),
                Tolerance<T>::kernel)
          << "step " << t;
    }
  }
}

/// The edges of the elementwise maps are the same at every vector width: a 1-column block goes
/// through Eigen's scalar path, a 35-column one through its packets and a scalar tail.
/// φ(−inf) = 0 exactly (EluPlusOne; a vectorised exp would clamp to ~1e−38), φ(NaN) = NaN
/// (a vectorised max/min may drop it), and φ(+inf) = +inf.
TYPED_TEST(FeatureMaps, ElementwiseMapsAgreeAtEveryWidthOnNonFiniteInput) {
  using T = TypeParam;
  constexpr T inf = std::numeric_limits<T>::infinity();
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const T edges[] = {-inf, nan, inf, T(-3), T(0), T(2)};
  const auto check = [&](const auto& map, const char* name) {
    for (const T x : edges) {
      for (const Index width : {Index{1}, Index{35}}) {
        const Matrix<T> in = Matrix<T>::Constant(3, width, x);
        Matrix<T> out(3, width);
        Matrix<T> dx(3, width);
        map.features(in, out);
        map.features_backward(in, Matrix<T>::Ones(3, width), dx);
        const T want = std::isnan(x) ? nan : x > 0 ? x + 1 : std::exp(x);
        for (Index i = 0; i < out.size(); ++i) {
          if constexpr (std::is_same_v<std::remove_cvref_t<decltype(map)>, EluPlusOne>) {
            if (std::isnan(x)) {
              EXPECT_TRUE(std::isnan(out(i)) && std::isnan(dx(i))) << name << " width " << width;
            } else {
              const T tolerance = 4 * std::numeric_limits<T>::epsilon() * std::abs(want);
              if (std::isfinite(want)) {
                EXPECT_NEAR(out(i), want, tolerance) << name << " at " << x << ", width " << width;
              } else {
                EXPECT_EQ(out(i), want) << name << " at " << x << ", width " << width;
              }
              EXPECT_NEAR(dx(i), x > 0 ? T(1) : std::exp(x), 4 * std::numeric_limits<T>::epsilon())
                  << name << " at " << x;
            }
          } else {
            if (std::isnan(x)) {
              EXPECT_TRUE(std::isnan(out(i)) && std::isnan(dx(i))) << name << " width " << width;
            } else {
              EXPECT_EQ(out(i), (x > 0 ? x : T(0)) + static_cast<T>(map.epsilon)) << name;
              EXPECT_EQ(dx(i), x > 0 ? T(1) : T(0)) << name << " at " << x;
            }
          }
        }
      }
    }
  };
  check(EluPlusOne{}, "EluPlusOne");
  check(ReluPlusEpsilon{}, "ReluPlusEpsilon");
}

TEST(FeatureMaps, ValidateHooksNameTheCaller) {
  const Heads<double> x(1, 3, 4);
  POSENC_EXPECT_INVALID(linear_attention(x, x, x, ReluPlusEpsilon{-1.0}),
                        "posenc::linear_attention", "ReluPlusEpsilon::epsilon must be finite");
  POSENC_EXPECT_INVALID(linear_attention(x, x, x, Favor<double>(5, 8, 1)),
                        "posenc::linear_attention", "the Favor projection has width 5");
}

}  // namespace
}  // namespace posenc::test
