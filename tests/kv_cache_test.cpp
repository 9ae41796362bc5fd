// SPDX-License-Identifier: MIT
// KvCache: prefill + token-by-token decoding equals one causal pass for every kind of encoder
// (rotary with stored transformed keys, XPos with raw keys, a score bias, a score mixer, NoPE),
// sliding-window eviction, explicit positions and segments, growth, and bad input.
#include "posenc/kv_cache.hpp"

#include <gtest/gtest.h>

#include <vector>

#include "posenc/encoders/rope.hpp"
#include "posenc/encoders/xpos.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

/// A test-local ScoreBias: B_h(i, j) = −m_h·(i − j), m_h = 2^−(h+1) (ALiBi's shape).
template <class ScalarType>
struct LinearBias {
  using Scalar = ScalarType;
  Index head_count;
  Index heads() const { return head_count; }
  Scalar slope(Index h) const {
    return static_cast<Scalar>(std::ldexp(1.0, -static_cast<int>(h) - 1));
  }
  Scalar bias(Index h, Index i, Index j) const { return -slope(h) * static_cast<Scalar>(i - j); }
  void add_bias(Index h, Positions qpos, Positions kpos, TileRef<Scalar> tile) const {
    for (Index r = 0; r < tile.rows(); ++r) {
      for (Index c = 0; c < tile.cols(); ++c) {
        tile(r, c) += bias(h, qpos[static_cast<std::size_t>(r)], kpos[static_cast<std::size_t>(c)]);
      }
    }
  }
};
static_assert(ScoreBias<LinearBias<float>>);

/// A test-local ScoreMixer: each head's score is its logit plus a quarter of the next head's.
template <class ScalarType>
struct NeighbourMixer {
  using Scalar = ScalarType;
  Index head_count;
  Index heads() const { return head_count; }
  Index key_halo() const { return 0; }
  void mix(Positions qpos, Positions kpos, Index first_key, Index key_count,
           ConstTileRef<Scalar> logits, TileRef<Scalar> scores) const {
    const auto rows = static_cast<Index>(qpos.size());
    const auto keys = static_cast<Index>(kpos.size());
    for (Index h = 0; h < head_count; ++h) {
      const Index next = (h + 1) % head_count;
      for (Index r = 0; r < rows; ++r) {
        for (Index c = 0; c < key_count; ++c) {
          scores(h, r * key_count + c) = logits(h, r * keys + first_key + c) +
                                         Scalar(0.25) * logits(next, r * keys + first_key + c);
        }
      }
    }
  }
};
static_assert(ScoreMixer<NeighbourMixer<float>>);

template <class Scalar>
class KvCacheDecoding : public ::testing::Test {};
TYPED_TEST_SUITE(KvCacheDecoding, test::Scalars);

/// Prefill `prefix` rows, then append and attend one token at a time; returns [H, N, Dv].
template <class Scalar, class Encoder>
Heads<Scalar> decode(KvCache<Scalar, Encoder>& cache, const Heads<Scalar>& q,
                     const Heads<Scalar>& k, const Heads<Scalar>& v, Index prefix) {
  Heads<Scalar> out(q.heads(), q.rows(), v.dim());
  for (Index t = 0; t < q.rows();) {
    const Index step = t == 0 ? prefix : 1;
    cache.append(k.view().middle_rows(t, step), v.view().middle_rows(t, step));
    const Heads<Scalar> o = cache.attend(q.view().middle_rows(t, step));
    for (Index h = 0; h < q.heads(); ++h) out.head(h).middleRows(t, step) = o.head(h);
    t += step;
  }
  return out;
}

template <class Scalar, class Encoder>
void expect_decoding_matches_causal_pass(const Encoder& encoder, bool stores_transformed) {
  auto rng = test::make_rng(301);
  const Index n = 23;
  const Heads<Scalar> q = test::random_heads<Scalar>(4, n, 16, rng);  // 4 heads over 2 kv heads
  const Heads<Scalar> k = test::random_heads<Scalar>(2, n, 16, rng);
  const Heads<Scalar> v = test::random_heads<Scalar>(2, n, 12, rng);
  const auto full = attention_reference(q, k, v, encoder);
  for (const Index prefix : {Index{1}, Index{7}}) {
    KvCache<Scalar, Encoder> cache(encoder, 2, 16, {.value_dim = 12});
    EXPECT_EQ(cache.stores_transformed_keys(), stores_transformed);
    const auto decoded = decode(cache, q, k, v, prefix);
    EXPECT_EQ(cache.size(), n);
    EXPECT_EQ(cache.next_position(), n);
    EXPECT_LE(test::relative_error(decoded.flat(), full.flat()), test::Tolerance<Scalar>::kernel)
        << "prefix " << prefix;
  }
}

TYPED_TEST(KvCacheDecoding, RopeStoresRotatedKeys) {
  using Scalar = TypeParam;
  expect_decoding_matches_causal_pass<Scalar>(
      RotaryEncoding<Scalar>(16, {.pairing = RotaryPairing::half}), true);
}

TYPED_TEST(KvCacheDecoding, XPosWithTileCentringKeepsRawKeys) {
  using Scalar = TypeParam;
  expect_decoding_matches_causal_pass<Scalar>(XPosEncoding<Scalar>(16, {.scale_base = 16}), false);
}

TYPED_TEST(KvCacheDecoding, XPosWithFixedCentreStoresRotatedKeys) {
  using Scalar = TypeParam;
  expect_decoding_matches_causal_pass<Scalar>(
      XPosEncoding<Scalar>(16, {.scale_base = 16, .centring = XPosCentring::fixed(0)}), true);
}

TYPED_TEST(KvCacheDecoding, ScoreBiasSeesTheCachePositions) {
  using Scalar = TypeParam;
  expect_decoding_matches_causal_pass<Scalar>(LinearBias<Scalar>{4}, false);
}

TYPED_TEST(KvCacheDecoding, ScoreMixerSeesEveryHead) {
  using Scalar = TypeParam;
  expect_decoding_matches_causal_pass<Scalar>(NeighbourMixer<Scalar>{4}, false);
}

TYPED_TEST(KvCacheDecoding, NoPositionalEncoding) {
  using Scalar = TypeParam;
  expect_decoding_matches_causal_pass<Scalar>(NoPositionalEncoding{}, false);
}

TEST(KvCache, SlidingWindowEvictsWhatNoLaterQueryCanSee) {
  auto rng = test::make_rng(302);
  const Index n = 40;
  const Index window = 6;
  const Heads<double> q = test::random_heads<double>(2, n, 8, rng);
  const Heads<double> k = test::random_heads<double>(2, n, 8, rng);
  const Heads<double> v = test::random_heads<double>(2, n, 8, rng);
  const RotaryEncoding<double> rope(8, {.pairing = RotaryPairing::interleaved});
  const auto full = attention_reference(q, k, v, rope, {.mask = Mask::sliding_window(window)});
  KvCache cache(rope, 2, 8, {.mask = Mask::sliding_window(window)});
  Heads<double> out(2, n, 8);
  for (Index t = 0; t < n; ++t) {
    cache.append(k.view().middle_rows(t, 1), v.view().middle_rows(t, 1));
    EXPECT_LE(cache.size(), window);
    const auto o = cache.attend(q.view().middle_rows(t, 1));
    for (Index h = 0; h < 2; ++h) out.head(h).row(t) = o.head(h).row(0);
  }
  EXPECT_LE(test::relative_error(out.flat(), full.flat()), 1e-12);
  EXPECT_LE(cache.capacity(), 4 * window);  // compaction, not unbounded growth
  POSENC_EXPECT_INVALID(
      cache.append(k.view().middle_rows(0, 1), v.view().middle_rows(0, 1), std::vector<Index>{3}),
      "posenc::KvCache::append", "positions must increase");
}

TEST(KvCache, ExplicitPositionsAndSegmentsMatchOneCall) {
  // Two documents packed into one cache, each with its own positions (restarting at 0).
  auto rng = test::make_rng(303);
  const Index n = 12;
  const Heads<double> q = test::random_heads<double>(2, n, 8, rng);
  const Heads<double> k = test::random_heads<double>(2, n, 8, rng);
  const Heads<double> v = test::random_heads<double>(2, n, 8, rng);
  const std::vector<Index> positions = {0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4};
  const std::vector<Index> segments = {0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1};
  const RotaryEncoding<double> rope(8, {.pairing = RotaryPairing::half});
  const auto full = attention_reference(q, k, v, rope,
                                        {.mask = Mask::none(),
                                         .query_positions = positions,
                                         .key_positions = positions,
                                         .query_segments = segments,
                                         .key_segments = segments});
  KvCache cache(rope, 2, 8, {.mask = Mask::none()});
  cache.append(k.view().middle_rows(0, 5), v.view().middle_rows(0, 5),
               std::span(positions).first(5), std::span(segments).first(5));
  cache.append(k.view().middle_rows(5, 7), v.view().middle_rows(5, 7),
               std::span(positions).subspan(5), std::span(segments).subspan(5));
  const auto o = cache.attend(q);
  EXPECT_LE(test::relative_error(o.flat(), full.flat()), 1e-12);
  POSENC_EXPECT_INVALID(cache.append(k.view().middle_rows(0, 1), v.view().middle_rows(0, 1)),
                        "segments");
}

TEST(KvCache, GrowsGeometricallyAndReserveAvoidsReallocation) {
  KvCache<float> cache(2, 4);
  Heads<float> row(2, 1, 4);
  Index reallocations = 0;
  Index capacity = cache.capacity();
  for (Index t = 0; t < 1000; ++t) {
    cache.append(row, row);
    if (cache.capacity() != capacity) ++reallocations;
    capacity = cache.capacity();
  }
  EXPECT_LE(reallocations, 12);
  KvCache<float> reserved(2, 4, {.capacity = 64});
  const float* data = reserved.keys().data();
  for (Index t = 0; t < 64; ++t) reserved.append(row, row);
  EXPECT_EQ(reserved.keys().data(), data);
  EXPECT_EQ(reserved.positions().back(), 63);
  reserved.clear();
  EXPECT_EQ(reserved.size(), 0);
  EXPECT_EQ(reserved.next_position(), 0);
}

TEST(KvCache, RejectsBadInput) {
  KvCache<float> cache(2, 4);
  Heads<float> k(2, 3, 4);
  Heads<float> wide(2, 3, 5);
  Heads<float> one_head(1, 3, 4);
  POSENC_EXPECT_INVALID(cache.append(wide, k), "posenc::KvCache::append", "k has shape [2, 3, 5]");
  POSENC_EXPECT_INVALID(cache.append(k, one_head), "v has shape [1, 3, 4]");
  POSENC_EXPECT_INVALID(cache.append(k, k, std::vector<Index>{1, 2}), "positions has 2 entries");
  cache.append(k, k);
  Heads<float> q(3, 1, 4);
  POSENC_EXPECT_INVALID(cache.attend(q), "posenc::KvCache::attend", "3 heads");
  Heads<float> many(2, 4, 4);
  POSENC_EXPECT_INVALID(cache.attend(many), "4 rows", "holds only 3");
  POSENC_EXPECT_INVALID((KvCache<float>(0, 4)), "posenc::KvCache", "kv_heads");
}

}  // namespace
}  // namespace posenc
