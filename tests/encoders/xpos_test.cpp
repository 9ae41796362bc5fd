// SPDX-License-Identifier: MIT
// XPosEncoding and blockwise causal attention: torchscale's rotated rows and attention
// (tests/data/xpos_rotate.json, xpos_attention.json), the LEX paper code's BCA and its decoding
// window (tests/data/bca.json), relative-position properties, range at N = 131072 in float, and the
// streaming kernel against the reference.
#include "posenc/encoders/xpos.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "posenc/attention.hpp"
#include "posenc/kv_cache.hpp"
#include "support/golden.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

using test::Json;

std::vector<Index> iota_positions(Index first, Index count) {
  std::vector<Index> positions(static_cast<std::size_t>(count));
  for (Index r = 0; r < count; ++r) positions[static_cast<std::size_t>(r)] = first + r;
  return positions;
}

// Golden tolerance for float64 (1e-12 absolute, the precision the golden was made to).
constexpr double golden_tolerance = 1e-12;

TEST(XPosGolden, TorchscaleRotationOfQueriesAndKeys) {
  const Json golden = test::load_golden("xpos_rotate.json");
  ASSERT_EQ(golden.at("cases").size(), 36u);
  for (const Json& c : golden.at("cases")) {
    const Json& in = c.at("inputs");
    const auto d = in.at("head_dim").get<Index>();
    const auto length = in.at("length").get<Index>();
    const auto offset = in.at("offset").get<Index>();
    const bool keys = in.at("downscale").get<bool>();
    const std::string what = "d " + std::to_string(d) + ", sb " +
                             std::to_string(in.at("scale_base").get<double>()) + ", L " +
                             std::to_string(length) + ", offset " + std::to_string(offset) +
                             (keys ? ", keys" : ", queries");
    // torchscale's call covers positions 0 … length+offset−1 and keeps the last `length` rows.
    const XPosOptions options{.scale_base = in.at("scale_base").get<double>(),
                              .centring = XPosCentring::torchscale(length + offset)};
    const XPosEncoding<double> xpos(d, options);
    const XPosEncoding<float> xpos_float(d, options);
    const Heads<double> x = test::to_heads(in.at("x"));
    const Heads<double> want = test::to_heads(c.at("outputs").at("y"));
    const auto positions = iota_positions(offset, length);
    for (Index h = 0; h < x.heads(); ++h) {
      Matrix<double> y(length, d);
      Matrix<float> y_float(length, d);
      const Matrix<float> x_float = x.head(h).cast<float>();
      if (keys) {
        xpos.transform_keys(h, positions, 12345, x.head(h), y);
        xpos_float.transform_keys(h, positions, 12345, x_float, y_float);
      } else {
        xpos.transform_queries(h, positions, 12345, x.head(h), y);
        xpos_float.transform_queries(h, positions, 12345, x_float, y_float);
      }
      ASSERT_TRUE(y.allFinite() && y_float.allFinite()) << what;
      EXPECT_LE((y - want.head(h)).cwiseAbs().maxCoeff(), golden_tolerance) << what;
      // float: a few float32 roundings of O(1) entries (the largest factor here is ~5).
      EXPECT_LE((y_float.cast<double>() - want.head(h)).cwiseAbs().maxCoeff(), 4e-6) << what;
    }
  }
}

/// nn.Linear: rows of x times weightᵀ plus bias.
Matrix<double> linear(const Matrix<double>& x, const Json& layer) {
  const Matrix<double> weight = test::to_matrix(layer.at("weight"));
  const Vector<double> bias = test::to_vector(layer.at("bias"));
  Matrix<double> y = x * weight.transpose();
  y.rowwise() += bias.transpose();
  return y;
}

/// [T, H·d] → [H, T, d], heads split as (h d).
Heads<double> split_heads(const Matrix<double>& x, Index heads) {
  const Index d = x.cols() / heads;
  Heads<double> out(heads, x.rows(), d);
  for (Index h = 0; h < heads; ++h) out.head(h) = x.middleCols(h * d, d);
  return out;
}

Matrix<double> merge_heads(const Heads<double>& x) {
  Matrix<double> out(x.rows(), x.heads() * x.dim());
  for (Index h = 0; h < x.heads(); ++h) out.middleCols(h * x.dim(), x.dim()) = x.head(h);
  return out;
}

/// One self-attention layer as the references run it (batch element b), with `attend` mapping
/// (q, k, v) heads to the attention output heads.
struct Layer {
  const Json& inputs;
  Index heads;

  Matrix<double> x(Index b) const { return test::to_matrix(inputs.at("x").at(b)); }
  Heads<double> project(Index b, const char* name) const {
    return split_heads(linear(x(b), inputs.at("params").at(name)), heads);
  }
  Matrix<double> output(const Heads<double>& attended) const {
    return linear(merge_heads(attended), inputs.at("params").at("out_proj"));
  }
};

/// Token-by-token decoding through a KvCache (optionally after a prefix prefill).
template <class Encoder>
Heads<double> decode_steps(const Encoder& encoder, const Heads<double>& q, const Heads<double>& k,
                           const Heads<double>& v, Index prefix, Mask mask = Mask::causal()) {
  KvCache cache(encoder, k.heads(), k.dim(), {.mask = mask});
  Heads<double> out(q.heads(), q.rows(), v.dim());
  Index t = 0;
  while (t < q.rows()) {
    const Index step = t == 0 && prefix > 0 ? prefix : 1;
    cache.append(k.view().middle_rows(t, step), v.view().middle_rows(t, step));
    const Heads<double> o = cache.attend(q.view().middle_rows(t, step));
    for (Index h = 0; h < q.heads(); ++h) out.head(h).middleRows(t, step) = o.head(h);
    t += step;
  }
  return out;
}

TEST(XPosGolden, TorchscaleMultiheadAttentionAndIncrementalDecoding) {
  const Json golden = test::load_golden("xpos_attention.json");
  for (const Json& c : golden.at("cases")) {
    const Json& in = c.at("inputs");
    const Json& out = c.at("outputs");
    const auto heads = in.at("num_heads").get<Index>();
    const auto d = in.at("head_dim").get<Index>();
    const auto length = in.at("seq_len").get<Index>();
    const double scale_base = in.at("xpos_scale_base").get<double>();
    const Layer layer{in, heads};
    const XPosEncoding<double> xpos(d, {.scale_base = scale_base});  // tile centring
    const XPosEncoding<double> torchscale(
        d, {.scale_base = scale_base, .centring = XPosCentring::torchscale(length)});
    const XPosEncoding<double> fixed = xpos.with_centring(XPosCentring::fixed(0));
    const auto positions = iota_positions(0, length);
    for (Index b = 0; b < in.at("batch").get<Index>(); ++b) {
      const Heads<double> q = layer.project(b, "q_proj");
      const Heads<double> k = layer.project(b, "k_proj");
      const Heads<double> v = layer.project(b, "v_proj");
      const std::string what = "sb " + std::to_string(scale_base) + ", batch " + std::to_string(b);
      const Matrix<double> want_out = test::to_matrix(out.at("attn_out").at(b));
      for (Index h = 0; h < heads; ++h) {
        const auto bh = static_cast<std::size_t>(b * heads + h);
        Matrix<double> q_rot(length, d);
        Matrix<double> k_rot(length, d);
        torchscale.transform_queries(h, positions, 0, q.head(h), q_rot);
        torchscale.transform_keys(h, positions, 0, k.head(h), k_rot);
        EXPECT_LE(
            (q_rot - test::to_matrix(out.at("q_rotated_unscaled").at(bh))).cwiseAbs().maxCoeff(),
            golden_tolerance)
            << what;
        EXPECT_LE((k_rot - test::to_matrix(out.at("k_rotated").at(bh))).cwiseAbs().maxCoeff(),
                  golden_tolerance)
            << what;
        const Matrix<double> scores =
            (q_rot / std::sqrt(static_cast<double>(d))) * k_rot.transpose();
        const Matrix<double> want_scores = test::to_matrix(out.at("scores_pre_softmax").at(bh));
        for (Index i = 0; i < length; ++i) {
          for (Index j = 0; j <= i; ++j) {
            EXPECT_NEAR(scores(i, j), want_scores(i, j), golden_tolerance) << what;
          }
        }
      }
      // Probabilities and outputs: the kernel's tile centring gives torchscale's numbers.
      const Heads<double> weights = attention_weights(q, k, v, xpos);
      for (Index h = 0; h < heads; ++h) {
        const auto bh = static_cast<std::size_t>(b * heads + h);
        EXPECT_LE(
            (weights.head(h) - test::to_matrix(out.at("attn_probs").at(bh))).cwiseAbs().maxCoeff(),
            golden_tolerance)
            << what;
      }
      for (const XPosEncoding<double>& encoder : {xpos, torchscale, fixed}) {
        const Matrix<double> streamed =
            layer.output(attention(q, k, v, encoder, {.query_block = 4, .key_block = 3}));
        EXPECT_LE((streamed - want_out).cwiseAbs().maxCoeff(), golden_tolerance) << what;
      }
      EXPECT_LE((layer.output(attention_reference(q, k, v, xpos)) - want_out).cwiseAbs().maxCoeff(),
                golden_tolerance)
          << what;
      // Decoding: raw keys re-rotated per call (tile centring) or keys rotated once on insert
      // (fixed centre); token by token and after a 4-token prefill.
      const Matrix<double> want_steps =
          test::to_matrix(out.at("incremental_one_token_steps_out").at(b));
      const Matrix<double> want_prefix = test::to_matrix(out.at("prefix4_then_steps_out").at(b));
      for (const XPosEncoding<double>& encoder : {xpos, fixed}) {
        EXPECT_LE(
            (layer.output(decode_steps(encoder, q, k, v, 0)) - want_steps).cwiseAbs().maxCoeff(),
            golden_tolerance)
            << what;
        EXPECT_LE(
            (layer.output(decode_steps(encoder, q, k, v, 4)) - want_prefix).cwiseAbs().maxCoeff(),
            golden_tolerance)
            << what;
      }
    }
  }
}

TEST(BlockwiseCausalGolden, MaskParallelBcaAndDecodingWindow) {
  const Json golden = test::load_golden("bca.json");
  ASSERT_EQ(golden.at("cases").size(), 4u);
  for (const Json& c : golden.at("cases")) {
    const Json& in = c.at("inputs");
    const Json& out = c.at("outputs");
    const auto w = in.at("block_size").get<Index>();
    const auto length = in.at("seq_len").get<Index>();
    const auto heads = in.at("num_heads").get<Index>();
    const auto d = in.at("head_dim").get<Index>();
    const std::string what = "w " + std::to_string(w) + ", T " + std::to_string(length);
    const Mask bca = Mask::blockwise_causal(w);
    const Matrix<double> allowed = test::to_matrix(out.at("allowed_mask"));
    for (Index t = 0; t < length; ++t) {
      for (Index s = 0; s < length; ++s) {
        EXPECT_EQ(bca.allows(t, s), allowed(t, s) == 1.0) << what << ", t " << t << ", s " << s;
      }
    }
    const Layer layer{in, heads};
    const Heads<double> q = layer.project(0, "q_proj");
    const Heads<double> k = layer.project(0, "k_proj");
    const Heads<double> v = layer.project(0, "v_proj");
    const XPosEncoding<double> xpos(d, {.scale_base = in.at("xpos_scale_base").get<double>()});
    const Matrix<double> want_bca = test::to_matrix(out.at("attn_out_bca_parallel").at(0));
    for (const Index block : {Index{2}, Index{3}, Index{128}}) {
      const auto o =
          attention(q, k, v, xpos, {.mask = bca, .query_block = block, .key_block = block});
      EXPECT_LE((layer.output(o) - want_bca).cwiseAbs().maxCoeff(), golden_tolerance) << what;
    }
    EXPECT_LE((layer.output(attention_reference(q, k, v, xpos, {.mask = bca})) - want_bca)
                  .cwiseAbs()
                  .maxCoeff(),
              golden_tolerance)
        << what;
    EXPECT_LE((layer.output(attention(q, k, v, xpos)) -
               test::to_matrix(out.at("attn_out_full_causal_no_block").at(0)))
                  .cwiseAbs()
                  .maxCoeff(),
              golden_tolerance)
        << what;
    // The reference's decoding keeps the last w keys and appends the new one: a sliding window
    // of w + 1, evicting as it goes.
    const Matrix<double> want_window = test::to_matrix(out.at("attn_out_incremental_window").at(0));
    for (const XPosEncoding<double>& encoder : {xpos, xpos.with_centring(XPosCentring::fixed(3))}) {
      const auto decoded = decode_steps(encoder, q, k, v, 0, blockwise_causal_decoding_window(w));
      EXPECT_LE((layer.output(decoded) - want_window).cwiseAbs().maxCoeff(), golden_tolerance)
          << what;
    }
  }
}

// --------------------------------------------------------------------------------------------
// Properties and range
// --------------------------------------------------------------------------------------------

template <class Scalar>
class XPosProperties : public ::testing::Test {};
TYPED_TEST_SUITE(XPosProperties, test::Scalars);

TYPED_TEST(XPosProperties, LogitsDependOnlyOnRelativePositionWhateverTheCentre) {
  using Scalar = TypeParam;
  auto rng = test::make_rng(201);
  const Heads<Scalar> x = test::random_heads<Scalar>(1, 2, 32, rng);
  const Matrix<Scalar> q = x.head(0).row(0);
  const Matrix<Scalar> k = x.head(0).row(1);
  for (const RotaryPairing pairing : {RotaryPairing::interleaved, RotaryPairing::half}) {
    const XPosEncoding<Scalar> xpos(32, {.scale_base = 64, .pairing = pairing});
    // The kernel's centre is the first query of the tile; any shared centre must do.
    auto logit = [&](Index i, Index j, Index centre) {
      Matrix<Scalar> a(1, 32);
      Matrix<Scalar> b(1, 32);
      xpos.transform_queries(0, std::vector<Index>{i}, centre, q, a);
      xpos.transform_keys(0, std::vector<Index>{j}, centre, k, b);
      return static_cast<double>((a * b.transpose())(0, 0));
    };
    for (const Index distance : {Index{0}, Index{1}, Index{29}, Index{200}, Index{-3}}) {
      const double at_zero = logit(distance + 300, 300, 300);
      for (const Index offset : {Index{0}, Index{1000}, Index{1000000}}) {
        const Index j = offset + 300;
        for (const Index centre_shift : {Index{0}, Index{-40}, Index{17}}) {
          const double tolerance = std::is_same_v<Scalar, float> ? 2e-5 : 1e-12;
          EXPECT_NEAR(logit(j + distance, j, j + centre_shift), at_zero,
                      tolerance * std::max(1.0, std::abs(at_zero)))
              << "distance " << distance << ", offset " << offset << ", centre " << centre_shift;
        }
      }
    }
  }
}

TYPED_TEST(XPosProperties, HalfPairingIsInterleavedOnPermutedChannels) {
  using Scalar = TypeParam;
  auto rng = test::make_rng(202);
  const Index d = 16;
  const Matrix<Scalar> x = test::random_heads<Scalar>(1, 4, d, rng).head(0);
  const auto positions = std::vector<Index>{0, 9, 700, 5000};
  const auto perm = rotary_half_permutation(d, d);
  Matrix<Scalar> permuted(x.rows(), d);
  for (Index j = 0; j < d; ++j) permuted.col(j) = x.col(perm[static_cast<std::size_t>(j)]);
  const XPosEncoding<Scalar> interleaved(d);
  const XPosEncoding<Scalar> half(d, {.pairing = RotaryPairing::half});
  Matrix<Scalar> a(4, d);
  Matrix<Scalar> b(4, d);
  interleaved.transform_keys(0, positions, 100, x, a);
  half.transform_keys(0, positions, 100, permuted, b);
  for (Index j = 0; j < d; ++j) EXPECT_EQ(b.col(j), a.col(perm[static_cast<std::size_t>(j)]));
}

TEST(XPosRange, FloatAttentionAt131072PositionsIsFiniteAndMatchesDouble) {
  // The last queries of a 131072-token causal pass see every key: uncentred factors would be
  // ζ^(±256) ≈ 1e±139, far outside float. Measured from the query tile, they stay in range.
  const Index n = 131072;
  const Index d = 64;
  auto rng = test::make_rng(203);
  const Heads<double> q = test::random_heads<double>(1, 4, d, rng);
  const Heads<double> k = test::random_heads<double>(1, n, d, rng);
  const Heads<double> v = test::random_heads<double>(1, n, d, rng);
  Heads<float> qf(1, 4, d);
  Heads<float> kf(1, n, d);
  Heads<float> vf(1, n, d);
  qf.flat() = q.flat().cast<float>();
  kf.flat() = k.flat().cast<float>();
  vf.flat() = v.flat().cast<float>();
  // Last four queries, and two pairs of queries at the middle and the end (explicit positions).
  const std::vector<Index> spread = {65536, 65537, n - 2, n - 1};
  for (const bool explicit_positions : {false, true}) {
    AttentionOptions options{.query_offset = n - 4, .query_block = 2};
    if (explicit_positions) options.query_positions = spread;
    const auto exact = attention(q, k, v, XPosEncoding<double>(d), options);
    const auto single = attention(qf, kf, vf, XPosEncoding<float>(d), options);
    ASSERT_TRUE(single.flat().allFinite());
    EXPECT_LE(test::relative_error(single.flat(), exact.flat()), 1e-4);
  }
}

template <class Scalar>
class XPosAttention : public ::testing::Test {};
TYPED_TEST_SUITE(XPosAttention, test::Scalars);

TYPED_TEST(XPosAttention, StreamingMatchesReferenceForEveryMask) {
  using Scalar = TypeParam;
  auto rng = test::make_rng(204);
  const Index n = 41;
  const Heads<Scalar> q = test::random_heads<Scalar>(4, n, 8, rng);
  const Heads<Scalar> k = test::random_heads<Scalar>(2, n, 8, rng);
  const Heads<Scalar> v = test::random_heads<Scalar>(2, n, 6, rng);
  const XPosEncoding<Scalar> tile(8, {.scale_base = 32});
  const XPosEncoding<Scalar> fixed(
      8, {.scale_base = 32, .pairing = RotaryPairing::half, .centring = XPosCentring::fixed(20)});
  for (const XPosEncoding<Scalar>& xpos : {tile, fixed}) {
    for (const Mask mask :
         {Mask::none(), Mask::causal(), Mask::sliding_window(7), Mask::blockwise_causal(10)}) {
      for (const Index offset : {Index{0}, Index{9}}) {
        const AttentionOptions options{
            .mask = mask, .query_offset = offset, .query_block = 6, .key_block = 5};
        const auto streamed = attention(q, k, v, xpos, options);
        const auto reference = attention_reference(q, k, v, xpos, options);
        EXPECT_LE(test::relative_error(streamed.flat(), reference.flat()),
                  test::Tolerance<Scalar>::kernel)
            << "mask kind " << static_cast<int>(mask.kind()) << ", offset " << offset;
      }
    }
  }
}

template <class Scalar>
class XPosFixedCentreRange : public ::testing::Test {};
TYPED_TEST_SUITE(XPosFixedCentreRange, test::Scalars);

// With a fixed centre c, a row at n gets ζ_k^(±(n − c)/scale_base); the extreme pair is
// ζ_0 = γ/(1 + γ). The limit is the largest |n − c| whose factors stay finite and normal in the
// scalar type: about ln(1/min)·scale_base/|ln ζ_0| (35 694 in float, 289 519 in double). Rows
// just inside attend exactly as with tile centring; one position beyond, every entry point
// throws (before the fix the reference was NaN and the streaming kernel finite but wrong).
TYPED_TEST(XPosFixedCentreRange, JustInsideMatchesTileCentringAndJustOutsideThrows) {
  using Scalar = TypeParam;
  const Index d = 8;
  const Index centre = 1000;
  const XPosEncoding<Scalar> tile(d);
  const XPosEncoding<Scalar> fixed = tile.with_centring(XPosCentring::fixed(centre));
  const double steepest = -std::log(0.4 / 1.4) / 512.0;
  const double formula =
      std::log(1.0 / static_cast<double>(std::numeric_limits<Scalar>::min())) / steepest;
  const Index limit = fixed.fixed_centre_range();
  EXPECT_NEAR(static_cast<double>(limit), std::floor(formula), 1.0);
  EXPECT_EQ(limit, (std::is_same_v<Scalar, float> ? Index{35694} : Index{289519}));

  auto rng = test::make_rng(205);
  const Index n = 6;
  // Entries O(1): a row 2^126 times larger (the largest float factor) stays below FLT_MAX.
  Heads<Scalar> q = test::random_heads<Scalar>(2, n, d, rng);
  Heads<Scalar> k = test::random_heads<Scalar>(2, n, d, rng);
  const Heads<Scalar> v = test::random_heads<Scalar>(2, n, d, rng);
  q.flat() *= Scalar(0.5);
  k.flat() *= Scalar(0.5);
  for (const Index side : {Index{1}, Index{-1}}) {
    // Positions c ± limit ∓ 5 … c ± limit: the farthest rows allowed, on either side.
    std::vector<Index> inside(static_cast<std::size_t>(n));
    for (Index r = 0; r < n; ++r) {
      inside[static_cast<std::size_t>(r)] = centre + side * limit + (side > 0 ? r - (n - 1) : r);
    }
    const std::string what = side > 0 ? "after the centre" : "before the centre";
    const AttentionOptions options{.query_positions = inside, .key_positions = inside};
    const auto streamed = attention(q, k, v, fixed, options);
    const auto reference = attention_reference(q, k, v, fixed, options);
    const auto centred = attention_reference(q, k, v, tile, options);
    ASSERT_TRUE(streamed.flat().allFinite() && reference.flat().allFinite()) << what;
    EXPECT_LE(test::relative_error(streamed.flat(), reference.flat()),
              test::Tolerance<Scalar>::kernel)
        << what;
    EXPECT_LE(test::relative_error(streamed.flat(), centred.flat()),
              test::Tolerance<Scalar>::kernel)
        << what;

    // One position farther: rejected by transform_queries / transform_keys and attention (both
    // kernels), naming the limit.
    std::vector<Index> outside = inside;
    outside[side > 0 ? static_cast<std::size_t>(n - 1) : 0] += side;
    const std::string far = std::to_string(centre + side * (limit + 1));
    const std::string limit_text = "at most " + std::to_string(limit);
    const char* scalar = std::is_same_v<Scalar, float> ? "in float" : "in double";
    Matrix<Scalar> out(n, d);
    POSENC_EXPECT_INVALID(fixed.transform_queries(0, outside, 0, q.head(0), out),
                          "posenc::XPosEncoding::transform_queries", far.c_str(),
                          limit_text.c_str(), scalar);
    POSENC_EXPECT_INVALID(fixed.transform_keys(0, outside, 0, k.head(0), out),
                          "posenc::XPosEncoding::transform_keys", far.c_str(), limit_text.c_str());
    const AttentionOptions beyond{.query_positions = inside, .key_positions = outside};
    POSENC_EXPECT_INVALID(attention(q, k, v, fixed, beyond), "transform_keys", far.c_str(),
                          limit_text.c_str());
    POSENC_EXPECT_INVALID(attention_reference(q, k, v, fixed, beyond), "transform_keys",
                          limit_text.c_str());
    // Tile centring has no such limit: the same positions are finite.
    EXPECT_TRUE(attention(q, k, v, tile, beyond).flat().allFinite()) << what;
  }
}

TEST(XPosErrors, RejectsBadConfigurations) {
  POSENC_EXPECT_INVALID(XPosEncoding<float>(7), "posenc::XPosEncoding", "even", "7");
  POSENC_EXPECT_INVALID(XPosEncoding<float>(8, {.scale_base = 0}), "scale_base");
  POSENC_EXPECT_INVALID(XPosEncoding<float>(8, {.gamma = -1}), "gamma");
  POSENC_EXPECT_INVALID(blockwise_causal_decoding_window(0), "window");
  const XPosEncoding<float> xpos(8);
  Matrix<float> x(2, 8);
  Matrix<float> y(2, 4);
  POSENC_EXPECT_INVALID(xpos.transform_queries(0, std::vector<Index>{0, 1}, 0, x, y),
                        "out is [2, 4]");
  Heads<float> q(1, 3, 4);
  POSENC_EXPECT_INVALID(attention(q, q, q, xpos), "built for head_dim 8", "dim 4");
}

}  // namespace
}  // namespace posenc
