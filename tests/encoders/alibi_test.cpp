// SPDX-License-Identifier: MIT
#include "posenc/encoders/alibi.hpp"

#include <gtest/gtest.h>

#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "encoders/bias_checks.hpp"
#include "support/golden.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

using test::iota;
using test::Json;
using test::tile_of;

TEST(AlibiSlopes, MatchTheAuthorsCodeBitForBit) {
  const Json golden = test::load_golden("alibi.json");
  for (const auto& [heads, slopes] : golden["outputs"]["slopes_python_double"].items()) {
    const Vector<double> want = test::to_vector(slopes);
    const Vector<double> got = alibi_slopes(std::stoi(heads));
    ASSERT_EQ(got.size(), want.size()) << heads << " heads";
    for (Index h = 0; h < got.size(); ++h) EXPECT_EQ(got[h], want[h]) << heads << " heads, " << h;
  }
  for (const auto& [heads, slopes] : golden["outputs"]["slopes_bloom_float32"].items()) {
    const Vector<double> want = test::to_vector(slopes);
    const Vector<double> got = alibi_slopes(std::stoi(heads), AlibiSlopes::bloom);
    for (Index h = 0; h < got.size(); ++h) EXPECT_EQ(got[h], want[h]) << heads << " heads, " << h;
  }
}

TEST(AlibiSlopes, MatchTheDapeBuffersBitForBit) {
  const Json golden = test::load_golden("alibi_slopes.json");
  for (const auto& [heads, entry] : golden["outputs"].items()) {
    const Vector<double> exact = test::to_vector(entry["float64_formula"]);
    const Vector<double> buffer = test::to_vector(entry["reference_buffer_float32"]);
    const Vector<double> got = alibi_slopes(std::stoi(heads));
    const Vector<double> got32 = alibi_slopes(std::stoi(heads), AlibiSlopes::float32);
    for (Index h = 0; h < got.size(); ++h) {
      EXPECT_EQ(got[h], exact[h]) << heads << " heads, " << h;
      EXPECT_EQ(got32[h], buffer[h]) << heads << " heads, " << h;
    }
  }
}

template <class T>
class AlibiTest : public ::testing::Test {};
TYPED_TEST_SUITE(AlibiTest, test::Scalars);

TYPED_TEST(AlibiTest, CausalFormIsGptNeoxBias) {
  using T = TypeParam;
  const Json out = test::load_golden("alibi.json")["outputs"];
  const Alibi<T> alibi(3);
  const auto want = test::to_matrices(out["gptneox_bias[head][query][key]"]);
  const auto decode = test::to_matrices(out["gptneox_bias_decode_step[head][1][key]"]);
  for (Index h = 0; h < 3; ++h) {
    const auto tile = tile_of(alibi, h, iota(6, 0), iota(6, 0));
    ASSERT_TRUE(tile.allFinite());
    EXPECT_EQ(tile.template cast<double>(), want[static_cast<std::size_t>(h)]) << "head " << h;
    for (Index i = 0; i < 6; ++i) {
      for (Index j = 0; j < 6; ++j) EXPECT_EQ(alibi.bias(h, i, j), tile(i, j));
    }
    // Decoding: the newest query (position 5) against keys 0..5.
    EXPECT_EQ(tile_of(alibi, h, {5}, iota(6, 0)).template cast<double>(),
              decode[static_cast<std::size_t>(h)]);
  }
}

TYPED_TEST(AlibiTest, SymmetricFormIsOpenNmtBias) {
  using T = TypeParam;
  const Json out = test::load_golden("alibi.json")["outputs"];
  const Alibi<T> alibi(3, BiasForm::symmetric);
  const auto square = test::to_matrices(out["onmt_bias[head][query][key]"]);
  const auto two_queries = test::to_matrices(out["onmt_bias_2queries[head][query][key]"]);
  for (Index h = 0; h < 3; ++h) {
    EXPECT_EQ(tile_of(alibi, h, iota(6, 0), iota(6, 0)).template cast<double>(),
              square[static_cast<std::size_t>(h)]);
    // OpenNMT aligns 2 queries to the end of 6 keys: positions 4 and 5.
    EXPECT_EQ(tile_of(alibi, h, iota(2, 4), iota(6, 0)).template cast<double>(),
              two_queries[static_cast<std::size_t>(h)]);
  }
}

TYPED_TEST(AlibiTest, AuthorsRowsDifferByARowConstantOnly) {
  // fairseq's m·j rows equal −m(i − j) + m·i on the allowed entries: the same softmax.
  using T = TypeParam;
  const Json out = test::load_golden("alibi.json")["outputs"];
  const auto authors = test::to_matrices(out["ofirpress_future_mask[head][query][key]"]);
  const Alibi<T> alibi(3, BiasForm::causal, AlibiSlopes::float32);  // their float32 buffer
  for (Index h = 0; h < 3; ++h) {
    const auto tile = tile_of(alibi, h, iota(6, 0), iota(6, 0));
    for (Index i = 0; i < 6; ++i) {
      for (Index j = 0; j <= i; ++j) {
        EXPECT_EQ(authors[static_cast<std::size_t>(h)](i, j) - static_cast<double>(tile(i, j)),
                  alibi.slopes()[h] * static_cast<double>(i));
      }
    }
  }
}

TYPED_TEST(AlibiTest, ToeplitzAndAccurateNearAMillion) {
  using T = TypeParam;
  // Tiles wider and taller than the 256-distance windows, so both chunk loops run.
  for (const auto& [rows, cols] : {std::pair<Index, Index>{37, 300}, {300, 41}}) {
    const BiasForm form = rows < cols ? BiasForm::causal : BiasForm::symmetric;
    const Alibi<T> alibi(12, form);
    const auto queries = iota(rows, 1'000'000);
    const auto keys = iota(cols, 999'850);
    for (Index h = 0; h < 12; ++h) {
      const auto far = tile_of(alibi, h, queries, keys);
      const auto near = tile_of(alibi, h, iota(rows, 150), iota(cols, 0));
      ASSERT_TRUE(far.allFinite());
      EXPECT_EQ(far, near) << "the bias depends on i - j only";
      Matrix<double> exact(far.rows(), far.cols());
      for (Index r = 0; r < far.rows(); ++r) {
        for (Index c = 0; c < far.cols(); ++c) {
          const long double d = static_cast<long double>(queries[static_cast<std::size_t>(r)]) -
                                static_cast<long double>(keys[static_cast<std::size_t>(c)]);
          const long double delta = form == BiasForm::causal ? std::max(d, 0.0L) : std::abs(d);
          exact(r, c) = static_cast<double>(-static_cast<long double>(alibi.slopes()[h]) * delta);
        }
      }
      EXPECT_LE(test::relative_error(far, exact), test::Tolerance<T>::kernel);
    }
  }
}

TYPED_TEST(AlibiTest, ExplicitPositionsMatchElementwiseBias) {
  using T = TypeParam;
  auto rng = test::make_rng(11);
  const Alibi<T> alibi(5, BiasForm::symmetric);
  const auto queries = test::spread_positions(9, 40, rng);
  const auto keys = test::spread_positions(23, 0, rng);
  const auto tile = tile_of(alibi, 4, queries, keys);
  for (Index r = 0; r < tile.rows(); ++r) {
    for (Index c = 0; c < tile.cols(); ++c) {
      EXPECT_EQ(tile(r, c), alibi.bias(4, queries[static_cast<std::size_t>(r)],
                                       keys[static_cast<std::size_t>(c)]));
    }
  }
}

TYPED_TEST(AlibiTest, StreamingMatchesReference) {
  using T = TypeParam;
  test::expect_streaming_matches_reference<T>(Alibi<T>(3), 3, 8, 5, 101, false);
  test::expect_streaming_matches_reference<T>(Alibi<T>(3, BiasForm::symmetric), 3, 8, 5, 102,
                                              false);
  test::expect_decoding_matches_causal_pass<T>(Alibi<T>(4), 4, 8, 6, 103);
}

TEST(AlibiErrors, RejectBadConfigurations) {
  POSENC_EXPECT_INVALID(alibi_slopes(-3), "posenc::alibi_slopes", "got -3");
  POSENC_EXPECT_INVALID((void)Alibi<float>(Vector<double>()), "posenc::Alibi", "at least one");
  Vector<double> nan_slopes = Vector<double>::Constant(2, 0.5);
  nan_slopes[1] = std::numeric_limits<double>::quiet_NaN();
  POSENC_EXPECT_INVALID((void)Alibi<float>(nan_slopes), "posenc::Alibi", "finite");
  auto rng = test::make_rng(12);
  const Heads<float> q = test::random_heads<float>(4, 3, 8, rng);
  POSENC_EXPECT_INVALID(attention(q, q, q, Alibi<float>(3)), "posenc::attention",
                        "the bias has 3 heads but q has 4");
}

// The constructor reports bad heads under its own name, not the alibi_slopes it calls; explicit
// slopes name the offending entry.
TEST(AlibiErrors, MessagesNameTheConstructorTheUserCalled) {
  POSENC_EXPECT_INVALID(Alibi<float>(0), "posenc::Alibi: heads must be >= 1, got 0");
  POSENC_EXPECT_INVALID(Alibi<double>(-2, BiasForm::symmetric, AlibiSlopes::bloom),
                        "posenc::Alibi: heads must be >= 1, got -2");
  Vector<double> slopes = Vector<double>::Constant(3, 0.5);
  slopes[2] = std::numeric_limits<double>::infinity();
  POSENC_EXPECT_INVALID((void)Alibi<float>(slopes), "posenc::Alibi: slopes must be finite",
                        "got inf at slopes[2] (head 2)");
}

}  // namespace
}  // namespace posenc
