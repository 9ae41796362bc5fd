// SPDX-License-Identifier: MIT
// The input policies of the README ("Non-finite values", "Aliasing", "Position range") and the
// edge cases an outside check found: zero keys, empty segment sides, partial shapes, duplicate
// cache positions, the T5 natural scale and mask, decoding on the calling thread.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "posenc/posenc.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

using test::make_rng;
using test::random_heads;

template <class Scalar>
constexpr Scalar nan_v = std::numeric_limits<Scalar>::quiet_NaN();
template <class Scalar>
constexpr Scalar inf_v = std::numeric_limits<Scalar>::infinity();

/// Rows (h, r) of x that hold a non-finite entry.
template <class Scalar>
std::vector<bool> non_finite_rows(const Heads<Scalar>& x) {
  std::vector<bool> rows;
  for (Index h = 0; h < x.heads(); ++h) {
    for (Index r = 0; r < x.rows(); ++r) rows.push_back(!x.head(h).row(r).allFinite());
  }
  return rows;
}

/// Rows [first, first + count) of every head of x.
template <class Scalar>
HeadsView<const Scalar> rows_of(const Heads<Scalar>& x, Index first, Index count) {
  return x.view().middle_rows(first, count);
}

template <class Scalar>
bool row_is_nan(const Heads<Scalar>& x, Index h, Index r) {
  return x.head(h).row(r).array().isNaN().all();
}

/// Streaming (threads 1 and 2, small tiles) and the oracle agree on which rows are non-finite
/// and on every finite row.
template <class Scalar, class Encoder = NoPositionalEncoding>
Heads<Scalar> expect_stream_equals_reference(const Heads<Scalar>& q, const Heads<Scalar>& k,
                                             const Heads<Scalar>& v, AttentionOptions options,
                                             const Encoder& encoder = {}) {
  const Heads<Scalar> reference = attention_reference(q, k, v, encoder, options);
  for (const int threads : {1, 2}) {
    options.threads = threads;
    options.query_block = 4;
    options.key_block = 8;
    const Heads<Scalar> streamed = attention(q, k, v, encoder, options);
    EXPECT_EQ(non_finite_rows(streamed), non_finite_rows(reference)) << "threads " << threads;
    EXPECT_LE(test::finite_part_error(streamed.flat(), reference.flat()),
              test::Tolerance<Scalar>::kernel);
    // Split-KV: two partials over the two halves of the keys, merged, equal the one pass.
    const Index m = k.rows() / 2;
    const std::vector<Index> all_keys =
        options.key_positions.empty()
            ? test::iota(k.rows())
            : std::vector<Index>(options.key_positions.begin(), options.key_positions.end());
    AttentionOptions first_half = options;
    AttentionOptions second_half = options;
    first_half.key_positions = Positions(all_keys).first(static_cast<std::size_t>(m));
    second_half.key_positions = Positions(all_keys).subspan(static_cast<std::size_t>(m));
    if (!options.key_segments.empty()) {
      first_half.key_segments = options.key_segments.first(static_cast<std::size_t>(m));
      second_half.key_segments = options.key_segments.subspan(static_cast<std::size_t>(m));
    }
    const Heads<Scalar> merged =
        merge_partials(
            attention_partial(q, rows_of(k, 0, m), rows_of(v, 0, m), encoder, first_half),
            attention_partial(q, rows_of(k, m, k.rows() - m), rows_of(v, m, k.rows() - m), encoder,
                              second_half))
            .normalized();
    EXPECT_EQ(non_finite_rows(merged), non_finite_rows(reference)) << "split-KV";
    EXPECT_LE(test::finite_part_error(merged.flat(), reference.flat()),
              test::Tolerance<Scalar>::kernel);
  }
  return reference;
}

template <class Scalar>
class InputPolicy : public ::testing::Test {};
TYPED_TEST_SUITE(InputPolicy, test::Scalars);

// --- zero keys, empty segment sides, partial shapes ---------------------------------------------

TYPED_TEST(InputPolicy, ZeroKeysGiveZeroRowsInEveryEntryPoint) {
  using T = TypeParam;
  auto rng = make_rng(1);
  const auto q = random_heads<T>(2, 5, 4, rng);
  const Heads<T> k(2, 0, 4);
  const Heads<T> v(2, 0, 3);
  for (const Mask mask : {Mask::causal(), Mask::none()}) {
    const AttentionOptions options{.mask = mask};
    const Heads<T> reference = attention_reference(q, k, v, options);
    EXPECT_EQ(reference.flat().cwiseAbs().maxCoeff(), T(0));
    EXPECT_EQ(attention(q, k, v, options).flat().cwiseAbs().maxCoeff(), T(0));
    const Heads<T> weights = attention_weights(q, k, v, options);
    EXPECT_EQ(weights.rows(), 5);
    EXPECT_EQ(weights.dim(), 0);
    const auto partial = attention_partial(q, k, v, NoPositionalEncoding{}, options);
    EXPECT_TRUE((partial.row_max.array() == -inf_v<T>).all());
    EXPECT_EQ(partial.normalized().flat().cwiseAbs().maxCoeff(), T(0));
  }
}

TYPED_TEST(InputPolicy, SegmentsWithAnEmptySideAreValid) {
  using T = TypeParam;
  auto rng = make_rng(2);
  const std::vector<Index> key_segments(109, 0);
  const std::vector<Index> query_segments(6, 0);
  const auto k = random_heads<T>(1, 109, 4, rng);
  const auto v = random_heads<T>(1, 109, 4, rng);
  const Heads<T> no_queries(1, 0, 4);
  const Heads<T> out = attention(
      no_queries, k, v, AttentionOptions{.query_segments = {}, .key_segments = key_segments});
  EXPECT_EQ(out.rows(), 0);
  const auto q = random_heads<T>(1, 6, 4, rng);
  const Heads<T> no_keys(1, 0, 4);
  const Heads<T> zeros =
      attention(q, no_keys, no_keys, AttentionOptions{.query_segments = query_segments});
  EXPECT_EQ(zeros.flat().cwiseAbs().maxCoeff(), T(0));
  // A side with the wrong length is still an error, naming both sizes.
  POSENC_EXPECT_INVALID(attention(q, k, v, AttentionOptions{.key_segments = key_segments}),
                        "posenc::attention", "must be given together", "0 and 109");
}

TYPED_TEST(InputPolicy, NormalizedChecksThePartialShape) {
  using T = TypeParam;
  AttentionPartial<T> partial{Heads<T>(2, 3, 4), Matrix<T>::Zero(2, 3), Matrix<T>::Zero(2, 1)};
  POSENC_EXPECT_INVALID((void)partial.normalized(), "posenc::AttentionPartial::normalized",
                        "[2, 3]", "[2, 1]");
  POSENC_EXPECT_INVALID((void)merge_partials(partial, partial), "posenc::merge_partials",
                        "row_sum");
}

// --- non-finite values ------------------------------------------------------------------------

TYPED_TEST(InputPolicy, NanInAQueryReachesExactlyItsRow) {
  using T = TypeParam;
  auto rng = make_rng(3);
  auto q = random_heads<T>(2, 23, 8, rng);
  const auto k = random_heads<T>(2, 23, 8, rng);
  const auto v = random_heads<T>(2, 23, 5, rng);
  q.head(1)(7, 3) = nan_v<T>;
  for (const Mask mask : {Mask::causal(), Mask::none(), Mask::sliding_window(5)}) {
    const Heads<T> out = expect_stream_equals_reference(q, k, v, {.mask = mask});
    for (Index h = 0; h < 2; ++h) {
      for (Index r = 0; r < 23; ++r) {
        EXPECT_EQ(!out.head(h).row(r).allFinite(), h == 1 && r == 7) << h << ", " << r;
      }
    }
    EXPECT_TRUE(row_is_nan(out, 1, 7));
  }
}

TYPED_TEST(InputPolicy, NanInAKeyReachesTheRowsThatSeeIt) {
  using T = TypeParam;
  auto rng = make_rng(4);
  const auto q = random_heads<T>(1, 30, 8, rng);
  auto k = random_heads<T>(1, 30, 8, rng);
  const auto v = random_heads<T>(1, 30, 8, rng);
  k.head(0)(12, 0) = nan_v<T>;
  const Heads<T> causal = expect_stream_equals_reference(q, k, v, {});
  const Heads<T> window =
      expect_stream_equals_reference(q, k, v, {.mask = Mask::sliding_window(4)});
  for (Index r = 0; r < 30; ++r) {
    EXPECT_EQ(row_is_nan(causal, 0, r), r >= 12) << r;
    EXPECT_EQ(row_is_nan(window, 0, r), r >= 12 && r < 16) << r;
    EXPECT_EQ(causal.head(0).row(r).allFinite(), r < 12) << r;
  }
}

TYPED_TEST(InputPolicy, OverflowingScoresGiveNanNotZero) {
  using T = TypeParam;
  auto rng = make_rng(5);
  auto q = random_heads<T>(1, 9, 4, rng);
  auto k = random_heads<T>(1, 9, 4, rng);
  const auto v = random_heads<T>(1, 9, 4, rng);
  const T huge = std::sqrt(std::numeric_limits<T>::max());  // finite; huge · huge overflows
  q.head(0).row(5).setConstant(huge);
  k.head(0).row(2).setConstant(huge);   // q5 · k2 = +inf: row 5 is NaN (exp(inf − inf))
  k.head(0).row(0).setConstant(-huge);  // q5 · k0 = −inf: weight 0 only
  const Heads<T> out = expect_stream_equals_reference(q, k, v, {.scale = 1.0});
  for (Index r = 0; r < 9; ++r) EXPECT_EQ(row_is_nan(out, 0, r), r == 5) << r;
}

TYPED_TEST(InputPolicy, OnlyARowWithNoAllowedKeyIsZero) {
  using T = TypeParam;
  auto rng = make_rng(6);
  auto q = random_heads<T>(1, 4, 4, rng);
  auto k = random_heads<T>(1, 4, 4, rng);
  const auto v = random_heads<T>(1, 4, 4, rng);
  const T huge = std::sqrt(std::numeric_limits<T>::max());
  q.head(0).row(0).setConstant(huge);
  k.head(0).row(0).setConstant(-huge);  // row 0 sees key 0 only, scoring −inf: NaN (softmax 0/0)
  const std::vector<Index> qpos{0, 1, 2, -5};  // query at −5 sees no key under causal: zero
  const Heads<T> out =
      expect_stream_equals_reference(q, k, v, {.query_positions = qpos, .scale = 1.0});
  EXPECT_TRUE(row_is_nan(out, 0, 0));
  EXPECT_TRUE(out.head(0).row(1).allFinite());
  EXPECT_EQ(out.head(0).row(3).cwiseAbs().maxCoeff(), T(0));
}

TYPED_TEST(InputPolicy, AForbiddenKeysValueIsNeverRead) {
  using T = TypeParam;
  auto rng = make_rng(7);
  const auto q = random_heads<T>(1, 16, 4, rng);
  const auto k = random_heads<T>(1, 16, 4, rng);
  auto v = random_heads<T>(1, 16, 4, rng);
  v.head(0)(9, 1) = nan_v<T>;
  v.head(0)(10, 2) = inf_v<T>;
  // Key 9 and 10 in document 1, the rest in document 0: document-0 rows stay finite.
  std::vector<Index> segments(16, 0);
  segments[9] = segments[10] = 1;
  const Heads<T> packed = expect_stream_equals_reference(
      q, k, v, {.mask = Mask::none(), .query_segments = segments, .key_segments = segments});
  for (Index r = 0; r < 16; ++r) {
    EXPECT_EQ(packed.head(0).row(r).allFinite(), segments[static_cast<std::size_t>(r)] == 0) << r;
  }
  // Explicit key positions (not consecutive): causal rows before key 9's position stay finite.
  std::vector<Index> kpos = test::iota(16);
  std::swap(kpos[3], kpos[4]);
  const Heads<T> positioned = expect_stream_equals_reference(q, k, v, {.key_positions = kpos});
  for (Index r = 0; r < 16; ++r) EXPECT_EQ(positioned.head(0).row(r).allFinite(), r < 9) << r;
}

TYPED_TEST(InputPolicy, MergePartialsPropagatesNanInEitherOrder) {
  using T = TypeParam;
  auto rng = make_rng(8);
  auto q = random_heads<T>(1, 6, 4, rng);
  const auto k = random_heads<T>(1, 10, 4, rng);
  const auto v = random_heads<T>(1, 10, 4, rng);
  q.head(0)(2, 0) = nan_v<T>;
  const AttentionOptions options{.mask = Mask::none()};
  const auto a =
      attention_partial(q, rows_of(k, 0, 5), rows_of(v, 0, 5), NoPositionalEncoding{}, options);
  const std::vector<Index> tail = test::iota(5, 5);
  AttentionOptions second = options;
  second.key_positions = tail;
  const auto b =
      attention_partial(q, rows_of(k, 5, 5), rows_of(v, 5, 5), NoPositionalEncoding{}, second);
  EXPECT_TRUE(std::isnan(a.row_max(0, 2)));
  const auto ab = merge_partials(a, b);
  const auto ba = merge_partials(b, a);
  for (Index r = 0; r < 6; ++r) {
    EXPECT_EQ(std::isnan(ab.row_max(0, r)), r == 2);
    EXPECT_EQ(std::isnan(ba.row_max(0, r)), r == 2);
  }
  const Heads<T> x = ab.normalized();
  const Heads<T> y = ba.normalized();
  EXPECT_EQ(non_finite_rows(x), non_finite_rows(y));
  EXPECT_LE(test::finite_part_error(x.flat(), y.flat()), 0.0);  // bitwise: order-independent
  const Heads<T> one_pass = attention(q, k, v, options);
  EXPECT_EQ(non_finite_rows(x), non_finite_rows(one_pass));
  EXPECT_LE(test::finite_part_error(x.flat(), one_pass.flat()), test::Tolerance<T>::kernel);
}

TYPED_TEST(InputPolicy, LinearAttentionPropagatesNanCausally) {
  using T = TypeParam;
  auto rng = make_rng(9);
  const auto q = random_heads<T>(2, 40, 8, rng);
  auto k = random_heads<T>(2, 40, 8, rng);
  auto v = random_heads<T>(2, 40, 8, rng);
  k.head(0)(17, 2) = nan_v<T>;
  v.head(1)(25, 0) = nan_v<T>;
  for (const Index chunk : {Index(1), Index(8), Index(64)}) {
    const LinearAttentionOptions options{.chunk = chunk};
    const Heads<T> out = linear_attention(q, k, v, EluPlusOne{}, NoPositionalEncoding{}, options);
    const Heads<T> reference =
        linear_attention_reference(q, k, v, EluPlusOne{}, NoPositionalEncoding{}, options);
    EXPECT_EQ(non_finite_rows(out), non_finite_rows(reference));
    EXPECT_LE(test::finite_part_error(out.flat(), reference.flat()),
              1e3 * test::Tolerance<T>::kernel);
    for (Index r = 0; r < 40; ++r) {
      EXPECT_EQ(out.head(0).row(r).allFinite(), r < 17) << "chunk " << chunk << " row " << r;
      EXPECT_EQ(out.head(1).row(r).allFinite(), r < 25) << "chunk " << chunk << " row " << r;
    }
  }
}

// --- aliasing ---------------------------------------------------------------------------------

TYPED_TEST(InputPolicy, OutputMayNotAliasAnInput) {
  using T = TypeParam;
  auto rng = make_rng(10);
  auto q = random_heads<T>(2, 8, 4, rng);
  auto k = random_heads<T>(2, 8, 4, rng);
  auto v = random_heads<T>(2, 8, 4, rng);
  POSENC_EXPECT_INVALID(attention(q, k, v, NoPositionalEncoding{}, k.view()), "posenc::attention",
                        "out shares memory with k");
  POSENC_EXPECT_INVALID(attention(q, k, v, NoPositionalEncoding{}, v.view()), "posenc::attention",
                        "out shares memory with v");
  POSENC_EXPECT_INVALID(attention(q, k, v, NoPositionalEncoding{}, q.view()), "posenc::attention",
                        "out shares memory with q");
  // Partly overlapping: the last head of k's storage.
  Heads<T> big(3, 8, 4);
  const auto k_view = HeadsView<T>::heads_major(big.data(), 2, 8, 4);
  const auto out_view = HeadsView<T>::heads_major(big.data() + 8 * 4, 2, 8, 4);
  POSENC_EXPECT_INVALID(attention(q, k_view, v, NoPositionalEncoding{}, out_view),
                        "out shares memory with k");
  // Disjoint views of one buffer are fine.
  const auto k_first = HeadsView<T>::heads_major(big.data(), 1, 8, 4);
  const auto out_last = HeadsView<T>::heads_major(big.data() + 2 * 8 * 4, 1, 8, 4);
  const auto q1 = random_heads<T>(1, 8, 4, rng);
  const auto v1 = random_heads<T>(1, 8, 4, rng);
  attention(q1, k_first, v1, NoPositionalEncoding{}, out_last);
  const Heads<T> expected = attention(q1, k_first, v1);
  EXPECT_EQ(Matrix<T>(out_last.head(0)), Matrix<T>(expected.head(0)));
}

// --- the position range -----------------------------------------------------------------------

TYPED_TEST(InputPolicy, PositionsOutsideTheRangeAreRejectedAtEveryEntryPoint) {
  using T = TypeParam;
  auto rng = make_rng(11);
  const auto q = random_heads<T>(2, 2, 4, rng);
  const auto k = random_heads<T>(2, 2, 4, rng);
  const auto v = random_heads<T>(2, 2, 4, rng);
  constexpr Index limit = position_limit;
  constexpr Index int64_max = std::numeric_limits<Index>::max();
  // Just inside: valid, finite, and the same as near zero for a distance-only encoder.
  const Alibi<T> alibi(2);
  const std::vector<Index> near_top{limit - 1, limit - 1};
  const std::vector<Index> near_bottom{-(limit - 1), -(limit - 1) + 1};
  const Heads<T> top = attention(
      q, k, v, alibi, {.mask = Mask::none(), .query_offset = limit - 2, .key_positions = near_top});
  EXPECT_TRUE(top.flat().allFinite());
  const Heads<T> bottom = attention(q, k, v, alibi,
                                    {.mask = Mask::sliding_window(limit),
                                     .query_positions = near_bottom,
                                     .key_positions = near_bottom});
  EXPECT_TRUE(bottom.flat().allFinite());
  const T5RelativeBias<T> t5 = T5RelativeBias<T>::random(2, 1.0, rng);
  EXPECT_TRUE(
      attention(q, k, v, t5,
                {.mask = Mask::none(), .query_positions = near_bottom, .key_positions = near_top})
          .flat()
          .allFinite());
  // Outside: rejected, naming the argument.
  POSENC_EXPECT_INVALID(attention(q, k, v, {.query_offset = limit - 1}), "posenc::attention",
                        "query_offset", "2^62");
  POSENC_EXPECT_INVALID(attention(q, k, v, {.query_offset = int64_max}), "query_offset");
  const std::vector<Index> too_far{0, int64_max};
  POSENC_EXPECT_INVALID(attention(q, k, v, {.key_positions = too_far}), "key_positions[1]");
  POSENC_EXPECT_INVALID(attention_reference(q, k, v, {.query_positions = too_far}),
                        "posenc::attention_reference", "query_positions[1]");
  POSENC_EXPECT_INVALID(Mask::sliding_window(int64_max), "posenc::Mask::sliding_window");
  POSENC_EXPECT_INVALID(Mask::blockwise_causal(int64_max - 1), "posenc::Mask::blockwise_causal");
  POSENC_EXPECT_INVALID(blockwise_causal_decoding_window(int64_max),
                        "posenc::blockwise_causal_decoding_window");
  POSENC_EXPECT_INVALID(linear_attention(q, k, v, EluPlusOne{}, NoPositionalEncoding{},
                                         {.first_position = limit - 1}),
                        "posenc::linear_attention", "first_position");
  // The KV cache: explicit positions, automatic positions past the top, reserve.
  KvCache<T> cache(2, 4);
  const std::vector<Index> last{limit - 1};
  cache.append(rows_of(k, 0, 1), rows_of(v, 0, 1), last);
  EXPECT_EQ(cache.next_position(), limit);
  POSENC_EXPECT_INVALID(cache.append(rows_of(k, 1, 1), rows_of(v, 1, 1)), "posenc::KvCache::append",
                        "next_position()");
  const std::vector<Index> overflow{int64_max};
  POSENC_EXPECT_INVALID(cache.append(rows_of(k, 1, 1), rows_of(v, 1, 1), overflow), "positions[0]");
  POSENC_EXPECT_INVALID(cache.reserve(Index(1) << 62), "posenc::KvCache::reserve", "rows");
}

// --- the KV cache -----------------------------------------------------------------------------

TYPED_TEST(InputPolicy, KvCacheRejectsDuplicatePositions) {
  using T = TypeParam;
  auto rng = make_rng(12);
  const auto k = random_heads<T>(1, 3, 4, rng);
  const auto v = random_heads<T>(1, 3, 4, rng);
  KvCache<T> cache(1, 4);
  const std::vector<Index> five{5};
  cache.append(rows_of(k, 0, 1), rows_of(v, 0, 1), five);
  POSENC_EXPECT_INVALID(cache.append(rows_of(k, 1, 1), rows_of(v, 1, 1), five),
                        "posenc::KvCache::append", "position 5 is already held");
  const std::vector<Index> repeated{7, 7};
  POSENC_EXPECT_INVALID(cache.append(rows_of(k, 0, 2), rows_of(v, 0, 2), repeated),
                        "position 7 appears twice");
  EXPECT_EQ(cache.size(), 1);
  // Distinct positions in any order stay valid.
  const std::vector<Index> unordered{3, 1};
  cache.append(rows_of(k, 0, 2), rows_of(v, 0, 2), unordered);
  EXPECT_EQ(cache.size(), 3);
  // The same position in another document is a different row.
  KvCache<T> packed(1, 4);
  const std::vector<Index> zero_zero{0, 0};
  const std::vector<Index> documents{1, 2};
  packed.append(rows_of(k, 0, 2), rows_of(v, 0, 2), zero_zero, documents);
  EXPECT_EQ(packed.size(), 2);
  const std::vector<Index> zero{0};
  const std::vector<Index> document_two{2};
  POSENC_EXPECT_INVALID(packed.append(rows_of(k, 2, 1), rows_of(v, 2, 1), zero, document_two),
                        "position 0 is already held", "same document");
}

TYPED_TEST(InputPolicy, KvCacheChecksTheEncoderWidthOnConstruction) {
  using T = TypeParam;
  POSENC_EXPECT_INVALID((void)KvCache(RotaryEncoding<T>(64), 2, 8), "posenc::KvCache", "64",
                        "dim 8");
}

TYPED_TEST(InputPolicy, KvCacheAttendsIntoATokensMajorViewOnTheCallingThread) {
  using T = TypeParam;
  auto rng = make_rng(13);
  const auto k = random_heads<T>(2, 20, 8, rng);
  const auto v = random_heads<T>(2, 20, 6, rng);
  const auto q = random_heads<T>(4, 1, 8, rng);
  KvCache cache(RotaryEncoding<T>(8), 2, 8, {.value_dim = 6});
  cache.append(k, v);
  const Heads<T> returned = cache.attend(q);
  std::vector<T> tokens_major(4 * 6, T(-1));
  cache.attend(q, HeadsView<T>::tokens_major(tokens_major.data(), 1, 4, 6));
  for (Index h = 0; h < 4; ++h) {
    for (Index c = 0; c < 6; ++c) {
      EXPECT_EQ(tokens_major[static_cast<std::size_t>(h * 6 + c)], returned.head(h)(0, c));
    }
  }
  // The same as one attention() call over the rows.
  const std::vector<Index> query_position{19};
  EXPECT_LE(
      test::relative_error(
          returned.flat(),
          attention(q, k, v, RotaryEncoding<T>(8), {.query_positions = query_position}).flat()),
      test::Tolerance<T>::kernel);
  POSENC_EXPECT_INVALID(cache.attend(q, HeadsView<T>::tokens_major(tokens_major.data(), 1, 4, 5)),
                        "posenc::KvCache::attend", "out has shape");
}

/// A zero bias that records whether it ran inside an OpenMP parallel region.
template <class T>
struct RecordsParallelRegion {
  using Scalar = T;
  bool* in_parallel = nullptr;
  Index heads() const { return 2; }
  T bias(Index, Index, Index) const { return T(0); }
  void add_bias(Index, Positions, Positions, TileRef<T>) const {
#ifdef _OPENMP
    if (omp_in_parallel()) *in_parallel = true;
#endif
  }
};

TYPED_TEST(InputPolicy, SmallCallsRunOnTheCallingThread) {
  using T = TypeParam;
  auto rng = make_rng(14);
  const auto k = random_heads<T>(2, 300, 64, rng);
  const auto v = random_heads<T>(2, 300, 64, rng);
  const auto q = random_heads<T>(2, 1, 64, rng);
  bool in_parallel = false;
  const RecordsParallelRegion<T> bias{&in_parallel};
  KvCache cache(bias, 2, 64);
  cache.append(k, v);
  (void)cache.attend(q);  // a decoding step: 2·300·128 multiply-adds
  EXPECT_FALSE(in_parallel);
  const std::vector<Index> last_position{299};
  (void)attention(q, k, v, bias, {.query_positions = last_position});
  EXPECT_FALSE(in_parallel);
#ifdef _OPENMP
  const auto big_q = random_heads<T>(2, 300, 64, rng);
  (void)attention(big_q, k, v, bias, {.threads = 2});
  EXPECT_TRUE(in_parallel);  // an explicit thread count is obeyed
#endif
}

// --- T5: natural scale and direction ----------------------------------------------------------

TYPED_TEST(InputPolicy, T5UsesItsNaturalScaleAndDirection) {
  using T = TypeParam;
  auto rng = make_rng(15);
  const auto q = random_heads<T>(2, 12, 8, rng);
  const auto k = random_heads<T>(2, 12, 8, rng);
  const auto v = random_heads<T>(2, 12, 8, rng);
  const auto encoder_side = T5RelativeBias<T>::random(2, 1.0, rng);
  const auto decoder_side = T5RelativeBias<T>::random(2, 1.0, rng, {.bidirectional = false});
  const auto expect_same = [](const Heads<T>& a, const Heads<T>& b) {
    EXPECT_LE(test::relative_error(a.flat(), b.flat()), test::Tolerance<T>::kernel);
  };
  expect_same(attention(q, k, v, encoder_side),
              attention_reference(q, k, v, encoder_side, {.mask = Mask::none(), .scale = 1.0}));
  expect_same(attention(q, k, v, decoder_side),
              attention_reference(q, k, v, decoder_side, {.mask = Mask::causal(), .scale = 1.0}));
  // A bidirectional bias under a causal mask is an explicit choice, and differs.
  const Heads<T> chosen = attention(q, k, v, encoder_side, {.mask = Mask::causal()});
  expect_same(chosen,
              attention_reference(q, k, v, encoder_side, {.mask = Mask::causal(), .scale = 1.0}));
  EXPECT_GT(test::relative_error(chosen.flat(), attention(q, k, v, encoder_side).flat()), 1e-3);
  // A caller's scale wins; a composition carries the natural scale and mask.
  expect_same(attention(q, k, v, encoder_side, {.scale = 0.5}),
              attention_reference(q, k, v, encoder_side, {.mask = Mask::none(), .scale = 0.5}));
  const auto rope_t5 = compose(RotaryEncoding<T>(8), encoder_side);
  expect_same(attention(q, k, v, rope_t5),
              attention_reference(q, k, v, rope_t5, {.mask = Mask::none(), .scale = 1.0}));
  // The KV cache takes the natural mask too.
  KvCache cache(encoder_side, 2, 8);
  EXPECT_EQ(cache.mask(), Mask::none());
}

}  // namespace
}  // namespace posenc
