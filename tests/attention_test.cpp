// SPDX-License-Identifier: MIT
// The streaming kernel against the materialising oracle (NoPE × every mask × awkward shapes),
// layouts, split-KV partials, fully masked rows and argument checking.
#include "posenc/attention.hpp"

#include <gtest/gtest.h>

#include <numeric>
#include <vector>

#include "support/test_support.hpp"

namespace posenc {
namespace {

using test::make_rng;
using test::random_heads;
using test::relative_error;

template <class Scalar>
class AttentionTest : public ::testing::Test {};
TYPED_TEST_SUITE(AttentionTest, test::Scalars);

std::vector<Mask> all_masks() {
  return {Mask::none(),
          Mask::causal(),
          Mask::sliding_window(1),
          Mask::sliding_window(5),
          Mask::blockwise_causal(2),
          Mask::blockwise_causal(8)};
}

struct Shape {
  Index heads, queries, keys, dim, value_dim, query_offset, query_block, key_block;
};

// Shapes chosen to hit tile remainders, one-row decoding with an offset, H = 1 and H = 12,
// D in {8, 64, 80}, and blocks larger than the problem.
const std::vector<Shape>& shapes() {
  static const std::vector<Shape> list = {
      {1, 1, 1, 8, 8, 0, 4, 4},           {2, 1, 37, 8, 5, 36, 4, 8},
      {3, 23, 23, 8, 8, 0, 5, 7},         {12, 13, 29, 64, 16, 16, 8, 8},
      {1, 40, 40, 80, 80, 0, 16, 9},      {4, 17, 33, 64, 64, 3, 128, 128},
      {2, 64, 64, 8, 8, 0, 16, 16},       {2, 1, 300, 64, 32, 299, 128, 128},
      {1, 31, 47, 80, 12, 1000000, 6, 11}};
  return list;
}

template <class Scalar>
void expect_stream_matches_reference(const Shape& s, const Mask& mask, std::uint64_t salt,
                                     const AttentionOptions& extra = {}) {
  auto rng = make_rng(salt);
  const auto q = random_heads<Scalar>(s.heads, s.queries, s.dim, rng);
  const auto k = random_heads<Scalar>(s.heads, s.keys, s.dim, rng);
  const auto v = random_heads<Scalar>(s.heads, s.keys, s.value_dim, rng);
  AttentionOptions options = extra;
  options.mask = mask;
  options.query_offset = s.query_offset;
  options.query_block = s.query_block;
  options.key_block = s.key_block;
  const auto streamed = attention(q, k, v, options);
  const auto expected = attention_reference(q, k, v, options);
  ASSERT_TRUE(streamed.flat().allFinite());
  EXPECT_LE(relative_error(streamed.flat(), expected.flat()), test::Tolerance<Scalar>::kernel)
      << "H=" << s.heads << " N=" << s.queries << " M=" << s.keys << " D=" << s.dim
      << " offset=" << s.query_offset << " mask kind " << static_cast<int>(mask.kind())
      << " window " << mask.window();
}

TYPED_TEST(AttentionTest, StreamingMatchesReferenceForEveryMaskAndShape) {
  std::uint64_t salt = 1;
  for (const Shape& s : shapes()) {
    for (const Mask& mask : all_masks())
      expect_stream_matches_reference<TypeParam>(s, mask, salt++);
  }
}

TYPED_TEST(AttentionTest, StreamingMatchesReferenceWithExplicitPositions) {
  // Unsorted, repeated and negative positions: every stage must see positions, not rows.
  auto rng = make_rng(2);
  std::uniform_int_distribution<Index> position(-20, 60);
  for (const Mask& mask : all_masks()) {
    std::vector<Index> qpos(19);
    std::vector<Index> kpos(26);
    for (auto& p : qpos) p = position(rng);
    for (auto& p : kpos) p = position(rng);
    const Shape s{3, 19, 26, 8, 6, 0, 4, 5};
    expect_stream_matches_reference<TypeParam>(s, mask,
                                               100 + static_cast<std::uint64_t>(mask.window()),
                                               {.query_positions = qpos, .key_positions = kpos});
  }
}

TYPED_TEST(AttentionTest, StreamingMatchesReferenceWithSegments) {
  // Three packed documents of lengths 7, 1 and 12; positions restart in each document.
  std::vector<Index> segments;
  std::vector<Index> positions;
  const Index lengths[] = {7, 1, 12};
  for (Index doc = 0; doc < 3; ++doc) {
    for (Index t = 0; t < lengths[doc]; ++t) {
      segments.push_back(doc);
      positions.push_back(t);
    }
  }
  const auto n = static_cast<Index>(segments.size());
  for (const Mask& mask : all_masks()) {
    expect_stream_matches_reference<TypeParam>({2, n, n, 8, 8, 0, 3, 4}, mask, 200,
                                               {.query_positions = positions,
                                                .key_positions = positions,
                                                .query_segments = segments,
                                                .key_segments = segments});
  }
}

TYPED_TEST(AttentionTest, TasksThatShareKeyTilesMatchReference) {
  // With one thread a per-head task takes four query blocks, which share each key tile's
  // packing; with eight threads there are too few tasks for that and each takes one block.
  // Nine blocks of 7 rows leave a short last group, and the masks, positions and segments
  // make some blocks of a group skip a key tile that the group as a whole needs.
  ASSERT_EQ(kernel::blocks_per_task(3, 9, 1), 4);
#ifdef _OPENMP
  ASSERT_EQ(kernel::blocks_per_task(3, 9, 8), 1);
#endif
  ASSERT_EQ(kernel::blocks_per_task(1, 3, 1), 2);
  const Shape shape{3, 60, 61, 16, 8, 0, 7, 9};
  auto rng = make_rng(3);
  std::uniform_int_distribution<Index> position(-10, 70);
  std::vector<Index> qpos(60);
  std::vector<Index> kpos(61);
  for (auto& p : qpos) p = position(rng);
  for (auto& p : kpos) p = position(rng);
  std::vector<Index> qseg(60);
  std::vector<Index> kseg(61);
  for (std::size_t i = 0; i < qseg.size(); ++i) qseg[i] = static_cast<Index>(i) / 25;
  for (std::size_t i = 0; i < kseg.size(); ++i) kseg[i] = static_cast<Index>(i) / 25;
  std::uint64_t salt = 300;
  for (int threads : {1, 8}) {
    for (const Mask& mask : all_masks()) {
      expect_stream_matches_reference<TypeParam>(shape, mask, salt++, {.threads = threads});
      expect_stream_matches_reference<TypeParam>(
          shape, mask, salt++,
          {.query_positions = qpos, .key_positions = kpos, .threads = threads});
      expect_stream_matches_reference<TypeParam>(
          shape, mask, salt++, {.query_segments = qseg, .key_segments = kseg, .threads = threads});
    }
  }
}

TYPED_TEST(AttentionTest, SegmentsIsolateDocuments) {
  // Attention over a packed pair of documents equals attention over each document alone.
  using Scalar = TypeParam;
  auto rng = make_rng(3);
  const Index a = 9;
  const Index b = 6;
  const auto q = random_heads<Scalar>(2, a + b, 8, rng);
  const auto k = random_heads<Scalar>(2, a + b, 8, rng);
  const auto v = random_heads<Scalar>(2, a + b, 4, rng);
  std::vector<Index> segments(static_cast<std::size_t>(a + b), 0);
  std::vector<Index> positions(static_cast<std::size_t>(a + b));
  for (Index t = 0; t < a + b; ++t) {
    segments[static_cast<std::size_t>(t)] = t < a ? 0 : 1;
    positions[static_cast<std::size_t>(t)] = t < a ? t : t - a;
  }
  const auto packed = attention(q, k, v,
                                {.query_positions = positions,
                                 .key_positions = positions,
                                 .query_segments = segments,
                                 .key_segments = segments});
  const auto second =
      attention(q.view().middle_rows(a, b), k.view().middle_rows(a, b), v.view().middle_rows(a, b));
  for (Index h = 0; h < 2; ++h) {
    EXPECT_LE(relative_error(packed.head(h).bottomRows(b), second.head(h)),
              test::Tolerance<Scalar>::kernel);
  }
}

TYPED_TEST(AttentionTest, TokenMajorViewsEqualHeadMajor) {
  using Scalar = TypeParam;
  auto rng = make_rng(4);
  const Index H = 4;
  const Index N = 21;
  const Index D = 8;
  const auto q = random_heads<Scalar>(H, N, D, rng);
  const auto k = random_heads<Scalar>(H, N, D, rng);
  const auto v = random_heads<Scalar>(H, N, D, rng);
  // Re-lay q, k, v as one fused [N, 3, H, D] buffer, as a fused QKV projection writes it.
  std::vector<Scalar> fused(static_cast<std::size_t>(N * 3 * H * D));
  for (Index t = 0; t < N; ++t) {
    for (Index h = 0; h < H; ++h) {
      for (Index d = 0; d < D; ++d) {
        const auto at = [&](Index which) {
          return static_cast<std::size_t>(((t * 3 + which) * H + h) * D + d);
        };
        fused[at(0)] = q(h, t, d);
        fused[at(1)] = k(h, t, d);
        fused[at(2)] = v(h, t, d);
      }
    }
  }
  const Index row_stride = 3 * H * D;
  const HeadsView<const Scalar> qv(fused.data(), H, N, D, D, row_stride);
  const HeadsView<const Scalar> kv(fused.data() + H * D, H, N, D, D, row_stride);
  const HeadsView<const Scalar> vv(fused.data() + 2 * H * D, H, N, D, D, row_stride);
  const AttentionOptions options{.query_block = 5, .key_block = 6};
  const auto expected = attention(q, k, v, options);

  // Output written straight into a token-major [N, H, D] buffer.
  std::vector<Scalar> out(static_cast<std::size_t>(N * H * D));
  attention(qv, kv, vv, NoPositionalEncoding{},
            HeadsView<Scalar>::tokens_major(out.data(), N, H, D), options);
  for (Index h = 0; h < H; ++h) {
    for (Index t = 0; t < N; ++t) {
      for (Index d = 0; d < D; ++d) {
        EXPECT_NEAR(out[static_cast<std::size_t>((t * H + h) * D + d)], expected(h, t, d),
                    test::Tolerance<Scalar>::kernel);
      }
    }
  }
  EXPECT_LE(relative_error(attention_reference(qv, kv, vv, options).flat(), expected.flat()),
            test::Tolerance<Scalar>::kernel);
}

TYPED_TEST(AttentionTest, SplitKeysMergeToFullResult) {
  using Scalar = TypeParam;
  auto rng = make_rng(5);
  const Index H = 3;
  const Index N = 11;
  const Index M = 41;
  const auto q = random_heads<Scalar>(H, N, 8, rng);
  const auto k = random_heads<Scalar>(H, M, 8, rng);
  const auto v = random_heads<Scalar>(H, M, 5, rng);
  for (const Mask& mask : all_masks()) {
    const AttentionOptions full{
        .mask = mask, .query_offset = M - N, .query_block = 4, .key_block = 6};
    const auto expected = attention_reference(q, k, v, full);
    // Three uneven parts, each with its absolute key positions.
    std::optional<AttentionPartial<Scalar>> merged;
    for (auto [first, count] : {std::pair<Index, Index>{0, 3}, {3, 29}, {32, 9}}) {
      std::vector<Index> positions(static_cast<std::size_t>(count));
      std::iota(positions.begin(), positions.end(), first);
      AttentionOptions part = full;
      part.key_positions = positions;
      auto partial =
          attention_partial(q, k.view().middle_rows(first, count),
                            v.view().middle_rows(first, count), NoPositionalEncoding{}, part);
      merged = merged ? merge_partials(*merged, partial) : std::move(partial);
    }
    const auto result = merged->normalized();
    ASSERT_TRUE(result.flat().allFinite());
    EXPECT_LE(relative_error(result.flat(), expected.flat()), test::Tolerance<Scalar>::kernel)
        << "mask kind " << static_cast<int>(mask.kind());
  }
}

TYPED_TEST(AttentionTest, RowsWithNoAllowedKeyAreZero) {
  using Scalar = TypeParam;
  auto rng = make_rng(6);
  const auto q = random_heads<Scalar>(2, 6, 8, rng);
  const auto k = random_heads<Scalar>(2, 4, 8, rng);
  const auto v = random_heads<Scalar>(2, 4, 3, rng);
  // Causal with keys at positions 10..13 and queries at 0..5: no query sees any key.
  const std::vector<Index> kpos = {10, 11, 12, 13};
  const AttentionOptions options{.key_positions = kpos, .query_block = 4, .key_block = 2};
  for (const auto& out : {attention(q, k, v, options), attention_reference(q, k, v, options)}) {
    ASSERT_TRUE(out.flat().allFinite());
    EXPECT_EQ(out.flat().cwiseAbs().maxCoeff(), Scalar(0));
  }
  const auto partial = attention_partial(q, k, v, NoPositionalEncoding{}, options);
  EXPECT_TRUE((partial.row_sum.array() == Scalar(0)).all());
  EXPECT_EQ(partial.normalized().flat().cwiseAbs().maxCoeff(), Scalar(0));
  // No keys at all.
  const Heads<Scalar> none_k(2, 0, 8);
  const Heads<Scalar> none_v(2, 0, 3);
  EXPECT_EQ(attention(q, none_k, none_v).flat().cwiseAbs().maxCoeff(), Scalar(0));
  // Only the second half of the rows is isolated by segments: the others are unaffected.
  const std::vector<Index> qseg = {0, 0, 0, 9, 9, 9};
  const std::vector<Index> kseg = {0, 0, 0, 0};
  const auto segmented =
      attention(q, k, v, {.mask = Mask::none(), .query_segments = qseg, .key_segments = kseg});
  ASSERT_TRUE(segmented.flat().allFinite());
  EXPECT_EQ(segmented.head(1).bottomRows(3).cwiseAbs().maxCoeff(), Scalar(0));
  EXPECT_GT(segmented.head(1).topRows(3).cwiseAbs().maxCoeff(), Scalar(0));
}

TYPED_TEST(AttentionTest, WeightsAreProbabilities) {
  using Scalar = TypeParam;
  auto rng = make_rng(7);
  const auto q = random_heads<Scalar>(3, 9, 8, rng);
  const auto k = random_heads<Scalar>(3, 9, 8, rng);
  const auto v = random_heads<Scalar>(3, 9, 8, rng);
  for (const Mask& mask : all_masks()) {
    const auto w = attention_weights(q, k, v, {.mask = mask});
    for (Index h = 0; h < 3; ++h) {
      for (Index i = 0; i < 9; ++i) {
        EXPECT_NEAR(static_cast<double>(w.head(h).row(i).sum()), 1.0, 1e-6);
        for (Index j = 0; j < 9; ++j) {
          if (!mask.allows(i, j)) {
            EXPECT_EQ(w(h, i, j), Scalar(0));
          }
          EXPECT_GE(w(h, i, j), Scalar(0));
        }
      }
      // out = W·V
      EXPECT_LE(relative_error((w.head(h) * v.head(h)).eval(),
                               attention_reference(q, k, v, {.mask = mask}).head(h)),
                test::Tolerance<Scalar>::kernel);
    }
  }
}

TYPED_TEST(AttentionTest, CausalOutputIgnoresFutureInputs) {
  using Scalar = TypeParam;
  auto rng = make_rng(8);
  auto q = random_heads<Scalar>(2, 16, 8, rng);
  auto k = random_heads<Scalar>(2, 16, 8, rng);
  auto v = random_heads<Scalar>(2, 16, 8, rng);
  const AttentionOptions options{.query_block = 4, .key_block = 4};
  const auto before = attention(q, k, v, options);
  for (Index h = 0; h < 2; ++h) {
    k.head(h).bottomRows(6).setRandom();
    v.head(h).bottomRows(6).setConstant(Scalar(1e30));  // a masked key must contribute exactly 0
  }
  const auto after = attention(q, k, v, options);
  for (Index h = 0; h < 2; ++h) {
    EXPECT_EQ((before.head(h).topRows(10) - after.head(h).topRows(10)).cwiseAbs().maxCoeff(),
              Scalar(0));
  }
}

TYPED_TEST(AttentionTest, GroupedQueryAttentionSharesKeyValueHeads) {
  using Scalar = TypeParam;
  auto rng = make_rng(9);
  const auto q = random_heads<Scalar>(6, 13, 8, rng);
  const auto k = random_heads<Scalar>(2, 13, 8, rng);
  const auto v = random_heads<Scalar>(2, 13, 4, rng);
  // Expand k, v to 6 heads (head h uses kv head h / 3) and compare.
  Heads<Scalar> k6(6, 13, 8);
  Heads<Scalar> v6(6, 13, 4);
  for (Index h = 0; h < 6; ++h) {
    k6.head(h) = k.head(h / 3);
    v6.head(h) = v.head(h / 3);
  }
  const AttentionOptions options{.query_block = 4, .key_block = 5};
  const auto grouped = attention(q, k, v, options);
  EXPECT_LE(relative_error(grouped.flat(), attention_reference(q, k6, v6, options).flat()),
            test::Tolerance<Scalar>::kernel);
  EXPECT_LE(relative_error(attention_reference(q, k, v, options).flat(), grouped.flat()),
            test::Tolerance<Scalar>::kernel);
}

TYPED_TEST(AttentionTest, ThreadCountDoesNotChangeTheResult) {
  using Scalar = TypeParam;
  auto rng = make_rng(10);
  const auto q = random_heads<Scalar>(4, 70, 16, rng);
  const auto k = random_heads<Scalar>(4, 70, 16, rng);
  const auto v = random_heads<Scalar>(4, 70, 16, rng);
  const auto one = attention(q, k, v, {.threads = 1, .query_block = 16, .key_block = 16});
  const auto two = attention(q, k, v, {.threads = 2, .query_block = 16, .key_block = 16});
  EXPECT_EQ((one.flat() - two.flat()).cwiseAbs().maxCoeff(), Scalar(0));
}

TYPED_TEST(AttentionTest, LargeLogitsStayFinite) {
  // Logits of order 1e4 (float) would overflow a softmax without max subtraction.
  using Scalar = TypeParam;
  auto rng = make_rng(11);
  auto q = random_heads<Scalar>(1, 20, 8, rng);
  const auto k = random_heads<Scalar>(1, 20, 8, rng);
  const auto v = random_heads<Scalar>(1, 20, 8, rng);
  q.flat() *= Scalar(3000);
  const AttentionOptions options{.query_block = 3, .key_block = 3};
  const auto out = attention(q, k, v, options);
  ASSERT_TRUE(out.flat().allFinite());
  EXPECT_LE(relative_error(out.flat(), attention_reference(q, k, v, options).flat()),
            test::Tolerance<Scalar>::kernel);
}

TEST(AttentionOptionsTest, DefaultScaleIsInverseSqrtDim) {
  auto rng = make_rng(12);
  const auto q = random_heads<double>(1, 5, 16, rng);
  const auto k = random_heads<double>(1, 5, 16, rng);
  const auto v = random_heads<double>(1, 5, 16, rng);
  const auto implicit = attention(q, k, v);
  const auto explicit_scale = attention(q, k, v, {.scale = 0.25});
  EXPECT_LE(relative_error(implicit.flat(), explicit_scale.flat()), 1e-15);
  const auto other = attention(q, k, v, {.scale = 1.0});
  EXPECT_GT(relative_error(other.flat(), implicit.flat()), 1e-3);
}

TEST(AttentionErrorsTest, BadInputsThrowWithFunctionArgumentAndSizes) {
  auto rng = make_rng(13);
  const auto q = random_heads<float>(4, 6, 8, rng);
  const auto k = random_heads<float>(4, 7, 8, rng);
  const auto v = random_heads<float>(4, 7, 5, rng);
  const std::vector<Index> five(5, 0);
  POSENC_EXPECT_INVALID(attention(q, random_heads<float>(4, 7, 32, rng), v), "posenc::attention",
                        "q has dim 8 but k has dim 32");
  POSENC_EXPECT_INVALID(attention(q, k, random_heads<float>(4, 6, 5, rng)), "posenc::attention",
                        "k has 7 rows but v has 6");
  POSENC_EXPECT_INVALID(
      attention(q, random_heads<float>(3, 7, 8, rng), random_heads<float>(3, 7, 5, rng)),
      "posenc::attention", "q has 4 heads", "3 heads of k and v");
  POSENC_EXPECT_INVALID(attention(q, k, random_heads<float>(2, 7, 5, rng)),
                        "k has 4 heads but v has 2");
  POSENC_EXPECT_INVALID(attention(q, k, v, {.query_positions = five}), "query_positions has 5",
                        "q has 6 rows");
  POSENC_EXPECT_INVALID(attention(q, k, v, {.key_positions = five}), "key_positions has 5",
                        "k has 7 rows");
  POSENC_EXPECT_INVALID(attention(q, k, v, {.query_segments = five}),
                        "query_segments and key_segments must be given together");
  const std::vector<Index> six(6, 0);
  POSENC_EXPECT_INVALID(attention(q, k, v, {.query_segments = six, .key_segments = five}),
                        "key_segments has 5", "k has 7 rows");
  POSENC_EXPECT_INVALID(attention(q, k, v, {.scale = -1.0}), "scale must be finite and positive");
  POSENC_EXPECT_INVALID(attention(q, k, v, {.scale = std::nan("")}), "scale");
  POSENC_EXPECT_INVALID(attention(q, k, v, {.query_block = 0}),
                        "query_block and key_block must be >= 1");
  POSENC_EXPECT_INVALID(attention(q, k, v, {.threads = -2}), "threads must be >= 0");
  Heads<float> wrong_out(4, 6, 4);
  POSENC_EXPECT_INVALID(attention(q, k, v, NoPositionalEncoding{}, wrong_out.view()),
                        "out has shape [4, 6, 4] but must be [4, 6, 5]");
  POSENC_EXPECT_INVALID(attention_reference(q, random_heads<float>(4, 7, 9, rng), v),
                        "posenc::attention_reference", "q has dim 8 but k has dim 9");
  POSENC_EXPECT_INVALID(attention_weights(q, k, v, {.key_positions = five}),
                        "posenc::attention_weights");
  POSENC_EXPECT_INVALID(attention_partial(q, k, v, NoPositionalEncoding{}, {.query_block = -1}),
                        "posenc::attention_partial");
  const auto a = attention_partial(q, k, v);
  const auto b = attention_partial(random_heads<float>(4, 3, 8, rng), k, v);
  POSENC_EXPECT_INVALID(merge_partials(a, b), "posenc::merge_partials", "[4, 6, 5] and [4, 3, 5]");
}

}  // namespace
}  // namespace posenc
