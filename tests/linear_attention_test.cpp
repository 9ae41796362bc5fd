// SPDX-License-Identifier: MIT
// Linear attention: the chunked causal scan and the non-causal form against the quadratic oracle
// for every feature map, decoding state == one pass, causality, Performer's formula and its
// softmax approximation, stability, zero rows, bad input.
#include "posenc/linear_attention.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "posenc/attention.hpp"
#include "support/test_support.hpp"

namespace posenc::test {
namespace {

template <class T>
class LinearAttention : public ::testing::Test {};
TYPED_TEST_SUITE(LinearAttention, Scalars);

/// Calls body(map, name) for each feature map, for inputs of width `dim`.
template <class T, class Body>
void for_each_map(Index dim, Body&& body) {
  body(EluPlusOne{}, "elu+1");
  body(ReluPlusEpsilon{1e-3}, "relu+eps");
  body(Favor<T>(dim, 3 * dim + 1, 17), "favor");
  body(Favor<T>(dim, 5, 18, {.orthogonal = false, .stabilizer = 0.0, .temperature = 0.3}),
       "favor-iid");
}

TYPED_TEST(LinearAttention, CausalScanMatchesQuadraticForm) {
  using T = TypeParam;
  auto rng = make_rng(1);
  const Index H = 4, Hkv = 2, N = 37, D = 6, Dv = 5;
  const Heads<T> q = random_heads<T>(H, N, D, rng);
  const Heads<T> k = random_heads<T>(Hkv, N, D, rng);
  const Heads<T> v = random_heads<T>(Hkv, N, Dv, rng);
  for_each_map<T>(D, [&](const auto& map, const char* name) {
    const Heads<T> expected = linear_attention_reference(q, k, v, map);
    ASSERT_TRUE(expected.flat().allFinite()) << name;
    for (const Index chunk : {Index{1}, Index{3}, Index{16}, Index{64}}) {
      for (const int threads : {1, 2}) {
        const Heads<T> out = linear_attention(q, k, v, map, {.threads = threads, .chunk = chunk});
        EXPECT_LE(relative_error(out.flat(), expected.flat()), Tolerance<T>::kernel)
            << name << " chunk " << chunk << " threads " << threads;
      }
    }
  });
}

TYPED_TEST(LinearAttention, NonCausalMatchesQuadraticForm) {
  using T = TypeParam;
  auto rng = make_rng(2);
  const Index H = 3, N = 17, M = 29, D = 4, Dv = 7;
  const Heads<T> q = random_heads<T>(H, N, D, rng);
  const Heads<T> k = random_heads<T>(H, M, D, rng);
  const Heads<T> v = random_heads<T>(H, M, Dv, rng);
  for_each_map<T>(D, [&](const auto& map, const char* name) {
    const Heads<T> expected = linear_attention_reference(q, k, v, map, {}, {.causal = false});
    for (const Index chunk : {Index{1}, Index{5}, Index{64}}) {
      const Heads<T> out = linear_attention(q, k, v, map, {.causal = false, .chunk = chunk});
      EXPECT_LE(relative_error(out.flat(), expected.flat()), Tolerance<T>::kernel)
          << name << " chunk " << chunk;
    }
  });
}

TYPED_TEST(LinearAttention, DecodingStateEqualsOnePass) {
  using T = TypeParam;
  auto rng = make_rng(3);
  const Index H = 2, N = 21, D = 4, Dv = 3, prompt = 8;
  const Heads<T> q = random_heads<T>(H, N, D, rng);
  Heads<T> k = random_heads<T>(H, N, D, rng);
  for (Index t = 0; t < N; ++t) {
    for (Index h = 0; h < H; ++h)
      k.head(h).row(t) *= T(0.2) * static_cast<T>(t % 7);  // maxima grow and fall
  }
  const Heads<T> v = random_heads<T>(H, N, Dv, rng);
  for_each_map<T>(D, [&](const auto& map, const char* name) {
    using Map = std::remove_cvref_t<decltype(map)>;
    const Heads<T> one_pass = linear_attention(q, k, v, map, {.chunk = 5});
    LinearAttentionState<T, Map> whole(map, {}, 0, 5);
    whole.append(q, k, v);
    LinearAttentionState<T, Map> state(map);
    const Heads<T> head_out =
        state.append(q.view().middle_rows(0, prompt), k.view().middle_rows(0, prompt),
                     v.view().middle_rows(0, prompt));
    for (Index h = 0; h < H; ++h) {
      EXPECT_LE(relative_error(head_out.head(h), one_pass.head(h).topRows(prompt)),
                Tolerance<T>::kernel)
          << name;
    }
    for (Index t = prompt; t < N; ++t) {
      const Heads<T> out = state.step(q.view().middle_rows(t, 1), k.view().middle_rows(t, 1),
                                      v.view().middle_rows(t, 1));
      for (Index h = 0; h < H; ++h) {
        EXPECT_LE(relative_error(out.head(h), one_pass.head(h).middleRows(t, 1)),
                  Tolerance<T>::kernel)
            << name << " step " << t;
      }
    }
    EXPECT_EQ(state.position(), N);
    EXPECT_EQ(state.tokens(), N);
    for (Index h = 0; h < H; ++h) {
      const auto& a = state.head_state(h);
      const auto& b = whole.head_state(h);
      EXPECT_EQ(a.count, N);
      if (std::isinf(b.offset)) {
        EXPECT_EQ(a.offset, b.offset) << name;  // deterministic maps keep no offset
      } else {  // the largest key projection, from GEMMs of other shapes
        EXPECT_NEAR(a.offset, b.offset, 64 * std::numeric_limits<T>::epsilon() * std::abs(b.offset))
            << name;
      }
      EXPECT_LE(relative_error(a.key_values, b.key_values), Tolerance<T>::kernel) << name;
      EXPECT_LE(relative_error(a.key_sum, b.key_sum), Tolerance<T>::kernel) << name;
      EXPECT_LE(relative_error(a.value_sum, b.value_sum), Tolerance<T>::kernel) << name;
    }
  });
}

TYPED_TEST(LinearAttention, CausalOutputIgnoresLaterTokens) {
  using T = TypeParam;
  auto rng = make_rng(4);
  const Index H = 1, N = 19, D = 4, t = 9;
  const Heads<T> q = random_heads<T>(H, N, D, rng);
  const Heads<T> k = random_heads<T>(H, N, D, rng);
  const Heads<T> v = random_heads<T>(H, N, D, rng);
  Heads<T> k2 = k, v2 = v;
  for (Index r = t + 1; r < N; ++r) {
    k2.head(0).row(r) *= T(40);  // a much larger key projection after t
    v2.head(0).row(r).setConstant(T(7));
  }
  for_each_map<T>(D, [&](const auto& map, const char* name) {
    const Heads<T> a = linear_attention(q, k, v, map, {.chunk = 8});
    const Heads<T> b = linear_attention(q, k2, v2, map, {.chunk = 8});
    EXPECT_LE(relative_error(b.head(0).topRows(t + 1), a.head(0).topRows(t + 1)),
              Tolerance<T>::kernel)
        << name;
  });
}

// Non-causal Favor is Performer's formula: φ(x) = F^(−1/2)(exp(ωx' − |x'|²/2 − c) + ε), with c
// the row max for queries and the max over all keys and features for keys.
TEST(LinearAttentionFavor, NonCausalIsPerformersFormula) {
  auto rng = make_rng(5);
  const Index N = 6, M = 9, D = 4, F = 10;
  const Heads<double> q = random_heads<double>(1, N, D, rng);
  const Heads<double> k = random_heads<double>(1, M, D, rng);
  const Heads<double> v = random_heads<double>(1, M, 3, rng);
  const Favor<double> favor(D, F, 3, {.stabilizer = 1e-3});
  const double normalizer = std::pow(static_cast<double>(D), -0.25);
  const Matrix<double> qs = q.head(0) * normalizer;
  const Matrix<double> ks = k.head(0) * normalizer;
  const Matrix<double> uq = qs * favor.projection().transpose();
  const Matrix<double> uk = ks * favor.projection().transpose();
  const double ratio = 1.0 / std::sqrt(static_cast<double>(F));
  Matrix<double> phi_q(N, F), phi_k(M, F);
  for (Index i = 0; i < N; ++i) {
    phi_q.row(i) =
        ratio *
        ((uq.row(i).array() - qs.row(i).squaredNorm() / 2 - uq.row(i).maxCoeff()).exp() + 1e-3);
  }
  for (Index j = 0; j < M; ++j) {
    phi_k.row(j) =
        ratio * ((uk.row(j).array() - ks.row(j).squaredNorm() / 2 - uk.maxCoeff()).exp() + 1e-3);
  }
  const Matrix<double> weights = phi_q * phi_k.transpose();
  Matrix<double> expected = weights * v.head(0);
  for (Index i = 0; i < N; ++i) expected.row(i) /= weights.row(i).sum();
  const Heads<double> out = linear_attention(q, k, v, favor, {.causal = false, .chunk = 4});
  EXPECT_LE(relative_error(out.head(0), expected), 1e-13);
}

TEST(LinearAttentionFavor, ApproximatesSoftmaxAttention) {
  auto rng = make_rng(6);
  const Index N = 12, D = 8;
  Heads<double> q = random_heads<double>(2, N, D, rng);
  Heads<double> k = random_heads<double>(2, N, D, rng);
  const Heads<double> v = random_heads<double>(2, N, 4, rng);
  q.flat() *= 0.5;
  k.flat() *= 0.5;
  const Heads<double> exact = attention(q, k, v, {.mask = Mask::none()});
  const Heads<double> approx =
      linear_attention(q, k, v, Favor<double>(D, 16384, 7), {.causal = false});
  EXPECT_LT(nmse(approx.flat(), exact.flat()), 2e-3);  // ~1.5e-4 expected at F = 16384
  const Heads<double> exact_causal = attention(q, k, v);
  const Heads<double> approx_causal = linear_attention(q, k, v, Favor<double>(D, 16384, 8));
  EXPECT_LT(nmse(approx_causal.flat(), exact_causal.flat()), 2e-3);
}

TEST(LinearAttentionFavor, ProjectionRowsAreOrthogonalWithinBlocks) {
  const Index D = 5, F = 12;
  const Favor<double> favor(D, F, 9);
  const Matrix<double>& w = favor.projection();
  ASSERT_EQ(w.rows(), F);
  ASSERT_EQ(w.cols(), D);
  for (Index first = 0; first < F; first += D) {
    const Index rows = std::min(D, F - first);
    const Matrix<double> block = w.middleRows(first, rows);
    Matrix<double> gram = block * block.transpose();
    for (Index i = 0; i < rows; ++i) {
      for (Index j = 0; j < rows; ++j) {
        if (i != j) {
          EXPECT_NEAR(gram(i, j), 0.0, 1e-12 * std::sqrt(gram(i, i) * gram(j, j)));
        }
      }
    }
  }
  // Same seed, same projection (to a few ulps: the Householder QR behind it is rounded the same
  // way in every call in a separately compiled test, but GCC 12 -O3 -march=native (AVX2) in the
  // unity-built suite has given one-ulp differences between two calls); another seed, another one.
  EXPECT_LE((Favor<double>(D, F, 9).projection() - w).cwiseAbs().maxCoeff(),
            8 * std::numeric_limits<double>::epsilon() * w.cwiseAbs().maxCoeff());
  EXPECT_NE(Favor<double>(D, F, 10).projection(), w);
}

TYPED_TEST(LinearAttention, FavorStaysFiniteForLargeInputs) {
  using T = TypeParam;
  auto rng = make_rng(7);
  const Index N = 40, D = 16;
  Heads<T> q = random_heads<T>(1, N, D, rng);
  Heads<T> k = random_heads<T>(1, N, D, rng);
  const Heads<T> v = random_heads<T>(1, N, 3, rng);
  q.flat() *= T(8);
  for (Index t = 0; t < N; ++t) k.head(0).row(t) *= static_cast<T>(1 + t);  // norms up to ~160
  const Favor<T> favor(D, 32, 11);
  const Heads<T> out = linear_attention(q, k, v, favor, {.chunk = 7});
  ASSERT_TRUE(out.flat().allFinite());
  EXPECT_LE(relative_error(out.flat(), linear_attention_reference(q, k, v, favor).flat()),
            Tolerance<T>::kernel);
}

TYPED_TEST(LinearAttention, WritesIntoAStridedOutputView) {
  using T = TypeParam;
  auto rng = make_rng(8);
  const Index H = 3, N = 10, D = 4;
  const Heads<T> q = random_heads<T>(H, N, D, rng);
  const Heads<T> k = random_heads<T>(H, N, D, rng);
  const Heads<T> v = random_heads<T>(H, N, D, rng);
  Vector<T> buffer = Vector<T>::Zero(N * H * D);  // [N, H, D], token-major
  const auto out = HeadsView<T>::tokens_major(buffer.data(), N, H, D);
  linear_attention(q, k, v, EluPlusOne{}, NoPositionalEncoding{}, out, {.chunk = 3});
  const Heads<T> expected = linear_attention(q, k, v, EluPlusOne{});
  for (Index h = 0; h < H; ++h) {
    EXPECT_LE(relative_error(Matrix<T>(out.head(h)), expected.head(h)), Tolerance<T>::kernel);
  }
  Heads<T> wrong(H, N, D + 1);
  POSENC_EXPECT_INVALID(
      linear_attention(q, k, v, EluPlusOne{}, NoPositionalEncoding{}, wrong.view()),
      "posenc::linear_attention", "out has shape [3, 10, 5] but must be [3, 10, 4]");
}

TYPED_TEST(LinearAttention, RowsWithZeroWeightAreZero) {
  using T = TypeParam;
  Heads<T> q(1, 5, 3), k(1, 5, 3), v(1, 5, 2);
  q.flat().setConstant(T(-1));
  k.flat().setConstant(T(-2));
  v.flat().setConstant(T(3));
  const Heads<T> out = linear_attention(q, k, v, ReluPlusEpsilon{0.0});
  ASSERT_TRUE(out.flat().allFinite());
  EXPECT_EQ(out.flat().cwiseAbs().maxCoeff(), T(0));
  // No keys at all (non-causal, M = 0): zeros.
  const Heads<T> none =
      linear_attention(q, Heads<T>(1, 0, 3), Heads<T>(1, 0, 2), EluPlusOne{}, {.causal = false});
  EXPECT_EQ(none.flat().cwiseAbs().maxCoeff(), T(0));
}

TEST(LinearAttentionErrors, BadInputIsRejected) {
  Heads<double> q(2, 5, 4), k(2, 5, 4), v(2, 5, 3), longer(2, 6, 4), narrow(2, 5, 3);
  POSENC_EXPECT_INVALID(linear_attention(q, narrow, v, EluPlusOne{}), "posenc::linear_attention",
                        "q has dim 4 but k has dim 3");
  POSENC_EXPECT_INVALID(linear_attention(q, longer, Heads<double>(2, 6, 3), EluPlusOne{}),
                        "causal linear attention needs as many keys as queries", "5 queries",
                        "6 keys");
  POSENC_EXPECT_INVALID(linear_attention(q, k, Heads<double>(2, 4, 3), EluPlusOne{}),
                        "k has 5 rows but v has 4");
  POSENC_EXPECT_INVALID(linear_attention(Heads<double>(3, 5, 4), k, v, EluPlusOne{}),
                        "q has 3 heads, which is not a multiple of the 2 heads");
  POSENC_EXPECT_INVALID(linear_attention(q, k, v, EluPlusOne{}, {.chunk = 0}),
                        "chunk must be >= 1, got 0");
  POSENC_EXPECT_INVALID(linear_attention(q, k, v, EluPlusOne{}, {.threads = -1}),
                        "threads must be >= 0");
  POSENC_EXPECT_INVALID(linear_attention(q, k, v, ReluPlusEpsilon{-1.0}),
                        "ReluPlusEpsilon::epsilon must be finite and >= 0, got -1");
  POSENC_EXPECT_INVALID(linear_attention(q, k, v, Favor<double>(8, 16, 1)),
                        "the Favor projection has width 8",
                        "queries and keys it sees have width 4");
  POSENC_EXPECT_INVALID(Favor<double>(0, 16, 1), "posenc::Favor", "dim and features must be >= 1");
  POSENC_EXPECT_INVALID(Favor<double>(4, 16, 1, {.temperature = -1.0}),
                        "temperature must be finite and positive");
  POSENC_EXPECT_INVALID(Favor<double>(4, 16, 1, {.stabilizer = -1.0}),
                        "stabilizer must be finite and >= 0");
  LinearAttentionState<double> state;
  state.append(q, k, v);
  POSENC_EXPECT_INVALID(state.append(narrow, narrow, v), "posenc::LinearAttentionState::append",
                        "this state holds 2 query heads, 2 key/value heads, dim 4");
  POSENC_EXPECT_INVALID(state.step(q, k, v), "posenc::LinearAttentionState::step",
                        "q_t must have one row, got 5");
  POSENC_EXPECT_INVALID(state.head_state(2), "head 2 out of range for 2 heads");
  POSENC_EXPECT_INVALID(LinearAttentionState<double>(EluPlusOne{}, {}, 0, 0),
                        "chunk must be >= 1, got 0");
}

}  // namespace
}  // namespace posenc::test
