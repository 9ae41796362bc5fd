// SPDX-License-Identifier: MIT
#include "posenc/encoders/shaw.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "encoders/bias_checks.hpp"
#include "support/golden.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

using test::Json;

/// [b][h][i][d] with b = 1 as Heads.
template <class T>
Heads<T> first_batch(const Json& x) {
  return test::to_heads<T>(x.at(0));
}

/// Golden tolerance: shaw.json is float64 (checked against the authors' code to 1e-12 when made);
/// in float the inputs are rounded (|values| < 1, D = 4), so outputs agree to a few float ulp.
template <class T>
double shaw_golden_tolerance() {
  return std::is_same_v<T, double> ? 1e-12 : 1e-6;
}

TEST(ShawIndex, ClippedKeyMinusQuery) {
  const Json m = test::load_golden("shaw.json")["outputs"]["index_matrices[i][j]"];
  const auto shaw = [](Index k) {
    return ShawRelative<double>(k, Matrix<double>::Zero(2 * k + 1, 1));
  };
  const auto check = [](const ShawRelative<double>& s, const Json& want, Index first_query,
                        const std::string& name) {
    for (std::size_t r = 0; r < want.size(); ++r) {
      for (std::size_t c = 0; c < want[r].size(); ++c) {
        const Index i = first_query + static_cast<Index>(r);
        EXPECT_EQ(s.table_row(static_cast<Index>(c) - i), want[r][c].get<Index>())
            << name << " (" << r << ", " << c << ")";
      }
    }
  };
  check(shaw(2), m["len5_k2"], 0, "len5_k2");
  check(shaw(2), m["len5_k2_cache(last query only)"], 4, "cache row");  // newest query, 5 keys
  check(shaw(2), m["q3_k5_k2(length_q != length_k, queries aligned to the end)"], 2, "q3_k5");
  check(shaw(10), m["len6_k10(k larger than sequence)"], 0, "len6_k10");
}

template <class T>
class ShawTest : public ::testing::Test {};
TYPED_TEST_SUITE(ShawTest, test::Scalars);

TYPED_TEST(ShawTest, MatchesTensor2TensorAttention) {
  using T = TypeParam;
  const Json golden = test::load_golden("shaw.json");
  const Json& in = golden["inputs"];
  const Json& out = golden["outputs"];
  const Index k = in["max_relative_position_k"].get<Index>();
  const ShawRelative<T> shaw(k, test::to_matrix<T>(in["aK_table[clip(j-i)+k][d]"]),
                             test::to_matrix<T>(in["aV_table[clip(j-i)+k][d]"]));
  const Heads<T> q = first_batch<T>(in["q[b][h][i][d]"]);
  const Heads<T> keys = first_batch<T>(in["k[b][h][j][d]"]);
  const Heads<T> v = first_batch<T>(in["v[b][h][j][d]"]);
  const Heads<double> logits = first_batch<double>(out["logits[b][h][i][j]"]);
  const Heads<double> weights = first_batch<double>(out["weights[b][h][i][j]"]);
  const Heads<double> output = first_batch<double>(out["output[b][h][i][d]"]);
  const double tol = shaw_golden_tolerance<T>();
  // t2t pre-scales q by depth^(−1/2): the kernel's default scale 1/sqrt(4).
  const AttentionOptions options{.mask = Mask::none()};
  const std::vector<Index> positions = {0, 1, 2, 3, 4};
  for (Index h = 0; h < 2; ++h) {
    const Matrix<T> scaled = q.head(h) * T(0.5);
    Matrix<T> l = scaled * keys.head(h).transpose();
    shaw.add_relative_logits(h, positions, positions, scaled, l);
    ASSERT_TRUE(l.allFinite());
    EXPECT_LE(test::relative_error(l, logits.head(h)), tol) << "logits, head " << h;
  }
  const Heads<T> w = attention_weights(q, keys, v, shaw, options);
  EXPECT_LE(test::relative_error(w.flat(), weights.flat()), tol);
  const Heads<T> reference = attention_reference(q, keys, v, shaw, options);
  EXPECT_LE(test::relative_error(reference.flat(), output.flat()), tol);
  AttentionOptions tiny = options;
  tiny.query_block = 2;
  tiny.key_block = 3;
  const Heads<T> streamed = attention(q, keys, v, shaw, tiny);
  EXPECT_LE(test::relative_error(streamed.flat(), output.flat()), tol);
}

TYPED_TEST(ShawTest, TiedAndKeyOnlyModes) {
  using T = TypeParam;
  auto rng = test::make_rng(111);
  const auto tied = ShawRelative<T>::random(2, 6, 0, ShawValues::tied, rng);
  EXPECT_EQ(tied.values(), ShawValues::tied);
  EXPECT_EQ(&tied.value_table(), &tied.key_table());
  const ShawRelative<T> key_only(2, tied.key_table());
  const ShawRelative<T> separate(2, tied.key_table(), tied.key_table());
  const Heads<T> q = test::random_heads<T>(2, 7, 6, rng);
  const Heads<T> k = test::random_heads<T>(2, 7, 6, rng);
  const Heads<T> v = test::random_heads<T>(2, 7, 6, rng);
  // tied == separate with the key table as value table; key-only == tied minus Σ p·a^V.
  const Heads<T> a = attention_reference(q, k, v, tied);
  const Heads<T> b = attention_reference(q, k, v, separate);
  EXPECT_LE(test::relative_error(a.flat(), b.flat()), test::Tolerance<T>::kernel);
  const Heads<T> c = attention_reference(q, k, v, key_only);
  const Heads<T> p = attention_weights(q, k, v, key_only);
  for (Index h = 0; h < 2; ++h) {
    Matrix<T> expected = c.head(h);
    for (Index i = 0; i < 7; ++i) {
      for (Index j = 0; j < 7; ++j) {
        expected.row(i) += p(h, i, j) * tied.key_table().row(tied.table_row(j - i));
      }
    }
    EXPECT_LE(test::relative_error(a.head(h), expected), test::Tolerance<T>::kernel);
  }
}

TYPED_TEST(ShawTest, StreamingMatchesReference) {
  using T = TypeParam;
  auto rng = test::make_rng(121);
  const auto separate = ShawRelative<T>::random(3, 8, 5, ShawValues::separate, rng);
  const auto tied = ShawRelative<T>::random(1, 8, 0, ShawValues::tied, rng);
  const auto key_only = ShawRelative<T>::random(4, 8, 0, ShawValues::none, rng);
  const auto wide = ShawRelative<T>::random(40, 8, 5, ShawValues::separate, rng);  // k > tiles
  test::expect_streaming_matches_reference<T>(separate, 3, 8, 5, 122, true);
  test::expect_streaming_matches_reference<T>(tied, 3, 8, 8, 123, true);
  test::expect_streaming_matches_reference<T>(key_only, 2, 8, 3, 124, true);
  test::expect_streaming_matches_reference<T>(wide, 2, 8, 5, 125, true);
  test::expect_decoding_matches_causal_pass<T>(separate, 2, 8, 5, 126);
}

TEST(ShawErrors, RejectBadTablesAndShapes) {
  POSENC_EXPECT_INVALID(ShawRelative<float>(2, Matrix<float>::Zero(4, 8)), "posenc::ShawRelative",
                        "key_table must be [2k + 1, D] = [5, D >= 1]", "got [4, 8]");
  POSENC_EXPECT_INVALID(ShawRelative<float>(-1, Matrix<float>::Zero(1, 8)),
                        "max_relative_position must be >= 0, got -1");
  POSENC_EXPECT_INVALID(
      ShawRelative<float>(1, Matrix<float>::Zero(3, 8), Matrix<float>::Zero(2, 8)),
      "value_table must be [2k + 1, Dv] = [3, Dv >= 1]", "got [2, 8]");
  Matrix<float> nan_table = Matrix<float>::Zero(3, 2);
  nan_table(1, 1) = std::numeric_limits<float>::quiet_NaN();
  POSENC_EXPECT_INVALID(ShawRelative<float>(1, nan_table), "key_table must be finite");
  auto rng = test::make_rng(131);
  const Heads<float> q8 = test::random_heads<float>(2, 3, 8, rng);
  const Heads<float> v5 = test::random_heads<float>(2, 3, 5, rng);
  POSENC_EXPECT_INVALID(attention(q8, q8, q8, ShawRelative<float>(1, Matrix<float>::Zero(3, 4))),
                        "posenc::ShawRelative", "the key table has width 4 but q and k have dim 8");
  POSENC_EXPECT_INVALID(
      attention(q8, q8, v5,
                ShawRelative<float>(1, Matrix<float>::Zero(3, 8), Matrix<float>::Zero(3, 8))),
      "the value table has width 8 but v has dim 5");
}

}  // namespace
}  // namespace posenc
