// SPDX-License-Identifier: MIT
#include "posenc/encoders/dape.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "encoders/bias_checks.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/fire.hpp"
#include "posenc/encoders/kerple.hpp"
#include "posenc/encoders/t5_bias.hpp"
#include "posenc/kv_cache.hpp"
#include "support/golden.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

using test::iota;
using test::Json;

static_assert(ScoreMixer<Dape<float, Alibi<float>>>);
static_assert(ScoreMixer<DapeV2<double, Kerple<double>>>);
static_assert(!ScoreBias<Dape<float, Alibi<float>>> && !ScoreBias<DapeV2<float, Fire<float>>>,
              "B would be added twice");

DapeWeights weights_of(const Json& mlp) {
  return {test::flat_rows(mlp["w1"]), test::to_vector(mlp["b1"]), test::flat_rows(mlp["w2"]),
          test::to_vector(mlp["b2"])};
}

/// One golden file: per batch element, the scaled logits the kernel forms, the mixed scores
/// (mix on the whole 8 × 8, B from the base bias), and the streaming and reference attention
/// (probabilities and output) — all at `tolerance`.
template <class Encoder>
void expect_golden(const std::string& file, const Encoder& encoder, double tolerance) {
  SCOPED_TRACE(file);
  const Json golden = test::load_golden(file);
  const Json& in = golden["inputs"];
  const Json& out = golden["outputs"];
  const Index n = golden["config"]["seq_len"].get<Index>();
  const Index heads = golden["config"]["heads"].get<Index>();
  const std::vector<Index> positions = iota(n);
  // The base bias as the reference builds it.
  const Heads<double> bias = test::to_heads(out["bias_B"]);
  for (Index h = 0; h < heads; ++h) {
    Matrix<double> tile = Matrix<double>::Zero(n, n);
    encoder.base_bias().add_bias(h, positions, positions, tile);
    EXPECT_LE(test::relative_error(tile, bias.head(h)), tolerance) << "bias_B, head " << h;
  }
  for (std::size_t b = 0; b < in["q"].size(); ++b) {
    const Heads<double> q = test::to_heads(in["q"][b]);
    const Heads<double> k = test::to_heads(in["k"][b]);
    const Heads<double> v = test::to_heads(in["v"][b]);
    const Heads<double> a = test::to_heads(out["scaled_logits_A"][b]);
    const Heads<double> modified = test::to_heads(out["modified_logits"][b]);
    const Heads<double> probs = test::to_heads(out["probs"][b]);
    const Heads<double> attn = test::to_heads(out["attn_out"][b]);
    Matrix<double> logits(heads, n * n);
    for (Index h = 0; h < heads; ++h) {
      const Matrix<double> scaled =
          q.head(h) * k.head(h).transpose() / std::sqrt(static_cast<double>(q.dim()));
      EXPECT_LE(test::relative_error(scaled, a.head(h)), 1e-15) << "A, batch " << b;
      logits.row(h) = Eigen::Map<const Vector<double>>(a.head(h).data(), n * n).transpose();
    }
    Matrix<double> scores(heads, n * n);
    encoder.mix(positions, positions, 0, n, logits, scores);
    for (Index h = 0; h < heads; ++h) {
      const Eigen::Map<const Matrix<double>> s(scores.row(h).data(), n, n);
      EXPECT_LE(test::relative_error(s, modified.head(h)), tolerance)
          << "modified_logits, batch " << b << ", head " << h;
    }
    const AttentionOptions tiny{.mask = Mask::causal(), .query_block = 3, .key_block = 3};
    const Heads<double> streamed = attention(q, k, v, encoder, tiny);
    const Heads<double> reference = attention_reference(q, k, v, encoder);
    const Heads<double> weights = attention_weights(q, k, v, encoder);
    EXPECT_LE(test::relative_error(streamed.flat(), attn.flat()), tolerance) << "batch " << b;
    EXPECT_LE(test::relative_error(reference.flat(), attn.flat()), tolerance) << "batch " << b;
    EXPECT_LE(test::relative_error(weights.flat(), probs.flat()), tolerance) << "batch " << b;
  }
}

TEST(DapeGolden, AlibiKerpleFireAndV2MatchTheReference) {
  {
    const Json g = test::load_golden("dape_alibi_causal.json");
    const Index heads = g["config"]["heads"].get<Index>();
    // AliBi_C: causal form, slopes rounded to float32 (`torch.Tensor(slopes)`).
    const Dape<double, Alibi<double>> dape(
        Alibi<double>(heads, BiasForm::causal, AlibiSlopes::float32),
        weights_of(g["inputs"]["mlp"]));
    expect_golden("dape_alibi_causal.json", dape, 1e-12);
  }
  {
    const Json g = test::load_golden("dape_kerple_causal.json");
    // ParallelKerpleLog_C: bias_p is r1, bias_a is r2; causal (tril) distances.
    const Kerple<double> kerple(KerpleKernel::log, test::to_vector(g["inputs"]["kerple_p"]),
                                test::to_vector(g["inputs"]["kerple_a"]));
    expect_golden("dape_kerple_causal.json",
                  Dape<double, Kerple<double>>(kerple, weights_of(g["inputs"]["mlp"])), 1e-12);
    const Json g2 = test::load_golden("dapev2_kerple_conv3_causal.json");
    const Kerple<double> kerple2(KerpleKernel::log, test::to_vector(g2["inputs"]["kerple_p"]),
                                 test::to_vector(g2["inputs"]["kerple_a"]));
    const DapeV2<double, Kerple<double>> v2(kerple2, weights_of(g2["inputs"]["conv"]),
                                            g2["config"]["kernel"].get<Index>());
    EXPECT_EQ(v2.kernel_size(), 3);
    EXPECT_EQ(v2.key_halo(), 2);
    expect_golden("dapev2_kerple_conv3_causal.json", v2, 1e-12);
  }
  {
    // FIRE_C: leaky ReLU, causal distance, L0 = init_L // 2, normalised distance in float32. The
    // file warns of ~1e-7 against a pure float64 FIRE; Fire replays the float32 steps, so the
    // float64 tolerance holds.
    const Json g = test::load_golden("dape_fire_causal.json");
    const Json& mlp = g["inputs"]["fire_mlp"];
    const Fire<double> fire(test::to_matrix(mlp["w1"]), test::to_vector(mlp["b1"]),
                            test::to_matrix(mlp["w2"]), test::to_vector(mlp["b2"]),
                            FireOptions::dape(g["config"]["fire_init_L_arg"].get<Index>()));
    expect_golden("dape_fire_causal.json",
                  Dape<double, Fire<double>>(fire, weights_of(g["inputs"]["mlp"])), 1e-12);
  }
}

template <class T>
class DapeTest : public ::testing::Test {};
TYPED_TEST_SUITE(DapeTest, test::Scalars);

TYPED_TEST(DapeTest, StreamingMatchesReferenceOverBiasesMasksAndPositions) {
  // Every mask × query offsets, explicit and spread positions, 5 × 7 tiles of 13 × 17 (the V2
  // halo crosses tile edges and the sequence ends).
  using T = TypeParam;
  constexpr Index H = 3;
  auto rng = test::make_rng(301);
  const auto kerple = Kerple<T>::random(KerpleKernel::log, H, rng);
  const Alibi<T> alibi(H, BiasForm::causal, AlibiSlopes::float32);
  const auto fire = Fire<T>::random(H, 8, rng, FireOptions::dape(10));
  test::expect_streaming_matches_reference<T>(Dape<T, Alibi<T>>::random(alibi, 8, rng), H, 8, 5,
                                              302, false);
  test::expect_streaming_matches_reference<T>(Dape<T, Kerple<T>>::random(kerple, 8, rng), H, 8, 5,
                                              303, false);
  test::expect_streaming_matches_reference<T>(Dape<T, Fire<T>>::random(fire, 8, rng), H, 8, 5, 304,
                                              true);
  test::expect_streaming_matches_reference<T>(Dape<T>::random(H, 6, rng), H, 8, 5, 305, true);
  test::expect_streaming_matches_reference<T>(DapeV2<T, Kerple<T>>::random(kerple, 8, 3, rng), H, 8,
                                              5, 306, false);
  test::expect_streaming_matches_reference<T>(DapeV2<T, Alibi<T>>::random(alibi, 4, 5, rng), H, 8,
                                              5, 307, false);
  test::expect_streaming_matches_reference<T>(DapeV2<T>::random(H, 4, 1, rng), H, 8, 5, 308, true);
}

/// The network written out pixel by pixel in double, as the reference's formulas read: A + B +
/// conv2(act(conv1(tril?[A; B]))) at keys [first, first + count) of a tile with K keys (zero
/// outside the tile's keys). k = 1 without tril is DAPE.
template <class Encoder>
Matrix<double> naive_mix(const Encoder& e, const DapeWeights& w, Index kernel, bool tril,
                         const std::vector<Index>& qpos, const std::vector<Index>& kpos,
                         Index first, Index count, const Matrix<double>& logits) {
  const Index H = w.w2.rows();
  const Index W = w.w1.rows();
  const auto rows = static_cast<Index>(qpos.size());
  const auto K = static_cast<Index>(kpos.size());
  const Index C = w.w1.cols() / kernel;
  const Index half = kernel / 2;
  std::vector<Matrix<double>> x(static_cast<std::size_t>(C), Matrix<double>::Zero(rows, K));
  for (Index h = 0; h < H; ++h) {
    x[static_cast<std::size_t>(h)] =
        Eigen::Map<const Matrix<double>>(logits.row(h).data(), rows, K);
    if (C == 2 * H) {
      for (Index r = 0; r < rows; ++r) {
        for (Index c = 0; c < K; ++c) {
          x[static_cast<std::size_t>(H + h)](r, c) = static_cast<double>(e.base_bias().bias(
              h, qpos[static_cast<std::size_t>(r)], kpos[static_cast<std::size_t>(c)]));
        }
      }
    }
  }
  Matrix<double> out(H, rows * count);
  for (Index r = 0; r < rows; ++r) {
    const auto input = [&](Index c, Index j) {
      if (j < 0 || j >= K) return 0.0;
      if (tril && kpos[static_cast<std::size_t>(j)] > qpos[static_cast<std::size_t>(r)]) return 0.0;
      return x[static_cast<std::size_t>(c)](r, j);
    };
    const auto hidden = [&](Index u, Index j) {
      if (j < 0 || j >= K) return 0.0;
      double z = w.b1[u];
      for (Index c = 0; c < C; ++c) {
        for (Index t = 0; t < kernel; ++t) z += w.w1(u, c * kernel + t) * input(c, j + t - half);
      }
      return z >= 0.0 ? z : 0.01 * z;
    };
    for (Index j = first; j < first + count; ++j) {
      for (Index h = 0; h < H; ++h) {
        double g = w.b2[h];
        for (Index u = 0; u < W; ++u) {
          for (Index t = 0; t < kernel; ++t) g += w.w2(h, u * kernel + t) * hidden(u, j + t - half);
        }
        double residual = x[static_cast<std::size_t>(h)](r, j);
        if (C == 2 * H) residual += x[static_cast<std::size_t>(H + h)](r, j);
        out(h, r * count + (j - first)) = residual + g;
      }
    }
  }
  return out;
}

TYPED_TEST(DapeTest, MixEqualsTheNetworkWrittenOutPixelByPixel) {
  // Tiles whose rows are whole packets (read and written in place) and odd ones (gathered), key
  // windows inside a halo, explicit unsorted positions, rows longer than one run.
  using T = TypeParam;
  constexpr Index H = 3;
  auto rng = test::make_rng(315);
  const auto kerple = Kerple<T>::random(KerpleKernel::log, H, rng);
  const auto dape = Dape<T, Kerple<T>>::random(kerple, 7, rng);
  const auto v2 = DapeV2<T, Kerple<T>>::random(kerple, 5, 3, rng);
  const auto v2_wide = DapeV2<T, Kerple<T>>::random(kerple, 4, 5, rng);
  const auto v2_pointwise = DapeV2<T, Kerple<T>>::random(kerple, 4, 1, rng);
  struct Shape {
    Index rows, K, first, count;
    bool shuffled;
  };
  for (const Shape& shape :
       {Shape{4, 32, 0, 32, false}, Shape{7, 13, 0, 13, false}, Shape{5, 20, 4, 12, false},
        Shape{6, 11, 0, 11, true}, Shape{2, 1100, 2, 1096, false}, Shape{9, 64, 0, 64, false},
        Shape{3, 48, 0, 48, false}}) {
    std::vector<Index> qpos = iota(shape.rows, 30);
    std::vector<Index> kpos = iota(shape.K, 25);
    if (shape.shuffled) {
      std::shuffle(qpos.begin(), qpos.end(), rng);
      std::shuffle(kpos.begin(), kpos.end(), rng);
    }
    const Matrix<double> logits =
        test::random_heads<double>(1, H, shape.rows * shape.K, rng).head(0);
    Matrix<T> scores(H, shape.rows * shape.count);
    const auto check = [&](const auto& encoder, Index kernel, bool tril, const char* name) {
      if (shape.first < kernel - 1 && shape.first > 0) return;  // a window without its halo
      encoder.mix(qpos, kpos, shape.first, shape.count, logits.cast<T>(), scores);
      const Matrix<double> want = naive_mix(encoder, encoder.weights(), kernel, tril, qpos, kpos,
                                            shape.first, shape.count, logits);
      EXPECT_LE(test::relative_error(scores, want), 20 * test::Tolerance<T>::kernel)
          << name << ", tile " << shape.rows << " x " << shape.K << " keys [" << shape.first
          << ", +" << shape.count << ")";
    };
    check(dape, 1, false, "DAPE");
    check(v2, 3, true, "V2 k = 3");
    check(v2_wide, 5, true, "V2 k = 5");
    check(v2_pointwise, 1, true, "V2 k = 1");
  }
}

TYPED_TEST(DapeTest, DistanceBiasesEvaluatedPerDistanceMatchTheNetwork) {
  // ALiBi, KERPLE and T5 depend on i − j only: on tiles with consecutive positions and whole
  // packets per row, DAPE evaluates B and W1_B·B once per distance (mix_by_distance). FIRE does
  // not, and takes the general path; both must equal the network written out pixel by pixel.
  using T = TypeParam;
  constexpr Index H = 4;
  auto rng = test::make_rng(316);
  static_assert(DistanceBias<Alibi<T>> && DistanceBias<Kerple<T>> &&
                DistanceBias<T5RelativeBias<T>> && !DistanceBias<Fire<T>>);
  const auto check = [&](const auto& dape, const char* name) {
    for (const Index rows : {1, 5, 9}) {
      for (const Index K : {32, 48, 64}) {
        const std::vector<Index> qpos = iota(rows, 40);
        const std::vector<Index> kpos = iota(K, 7);
        const Matrix<double> logits = test::random_heads<double>(1, H, rows * K, rng).head(0);
        Matrix<T> scores(H, rows * K);
        dape.mix(qpos, kpos, 0, K, logits.cast<T>(), scores);
        const Matrix<double> want =
            naive_mix(dape, dape.weights(), 1, false, qpos, kpos, 0, K, logits);
        EXPECT_LE(test::relative_error(scores, want), 20 * test::Tolerance<T>::kernel)
            << name << ", tile " << rows << " x " << K;
      }
    }
  };
  check(Dape<T, Alibi<T>>::random(Alibi<T>(H), 12, rng), "ALiBi");
  check(Dape<T, Kerple<T>>::random(Kerple<T>::random(KerpleKernel::power, H, rng), 32, rng),
        "KERPLE-power");
  check(Dape<T, T5RelativeBias<T>>::random(T5RelativeBias<T>::random(H, 0.5, rng), 8, rng), "T5");
  check(Dape<T, Fire<T>>::random(Fire<T>::random(H, 16, rng), 16, rng), "FIRE");
}

TEST(DapeStreaming, LongRowsSplitIntoRunsMatchTheReference) {
  // 1100 keys: the reference's single mix splits each row into runs (and V2 runs need their
  // halo from the neighbouring run); the streaming kernel uses 128-key tiles on 2 threads.
  constexpr Index H = 4;
  constexpr Index N = 9;
  constexpr Index M = 1100;
  auto rng = test::make_rng(311);
  const Heads<double> q = test::random_heads<double>(H, N, 16, rng);
  const Heads<double> k = test::random_heads<double>(H, M, 16, rng);
  const Heads<double> v = test::random_heads<double>(H, M, 8, rng);
  const Kerple<double> kerple = Kerple<double>::random(KerpleKernel::log, H, rng);
  const auto dape = Dape<double, Kerple<double>>::random(kerple, 16, rng);
  const auto v2 = DapeV2<double, Kerple<double>>::random(kerple, 16, 3, rng);
  for (const Mask& mask : {Mask::none(), Mask::causal()}) {
    const AttentionOptions options{.mask = mask, .query_offset = M - N, .query_block = 4};
    EXPECT_LE(test::relative_error(attention(q, k, v, dape, options).flat(),
                                   attention_reference(q, k, v, dape, options).flat()),
              1e-12);
    EXPECT_LE(test::relative_error(attention(q, k, v, v2, options).flat(),
                                   attention_reference(q, k, v, v2, options).flat()),
              1e-12);
  }
}

TYPED_TEST(DapeTest, DecodingMatchesOnePass) {
  // DAPE is pointwise: one query at offset t against keys 0..t is row t of a causal pass, and a
  // KvCache fed 1, 2 or 3 tokens at a time gives every row of one pass.
  using T = TypeParam;
  constexpr Index H = 4;
  constexpr Index N = 11;
  auto rng = test::make_rng(321);
  const auto dape = Dape<T, Alibi<T>>::random(Alibi<T>(H, BiasForm::causal), 8, rng);
  test::expect_decoding_matches_causal_pass<T>(dape, H, 8, 5, 322);

  // DAPE V2 reads keys after j: through a cache, attention over the keys held equals one pass
  // over the same keys (the reference's full forward of the prefix), for every chunk size.
  const auto v2 =
      DapeV2<T, Kerple<T>>::random(Kerple<T>::random(KerpleKernel::log, H, rng), 8, 3, rng);
  const Heads<T> q = test::random_heads<T>(H, N, 8, rng);
  const Heads<T> k = test::random_heads<T>(H, N, 8, rng);
  const Heads<T> v = test::random_heads<T>(H, N, 5, rng);
  const Heads<T> full = attention(q, k, v, dape);
  const Heads<T> full2 = attention(q, k, v, v2);
  double v2_longer_pass_difference = 0.0;
  for (const Index chunk : {Index{1}, Index{2}, Index{3}}) {
    KvCache<T, Dape<T, Alibi<T>>> cache(dape, H, 8, {.value_dim = 5, .capacity = 2});
    KvCache<T, DapeV2<T, Kerple<T>>> cache2(v2, H, 8, {.value_dim = 5, .capacity = 2});
    for (Index t = 0; t < N; t += chunk) {
      const Index c = std::min(chunk, N - t);
      cache.append(k.view().middle_rows(t, c), v.view().middle_rows(t, c));
      cache2.append(k.view().middle_rows(t, c), v.view().middle_rows(t, c));
      const auto q_t = q.view().middle_rows(t, c);
      const Heads<T> got = cache.attend(q_t, {.query_block = 2, .key_block = 3});
      const Heads<T> got2 = cache2.attend(q_t, {.query_block = 2, .key_block = 3});
      const Heads<T> prefix =
          attention_reference(q_t, k.view().middle_rows(0, t + c), v.view().middle_rows(0, t + c),
                              v2, {.mask = Mask::causal(), .query_offset = t});
      for (Index h = 0; h < H; ++h) {
        EXPECT_LE(test::relative_error(got.head(h), full.head(h).middleRows(t, c)),
                  test::Tolerance<T>::kernel)
            << "chunk " << chunk << ", step " << t << ", head " << h;
      }
      EXPECT_LE(test::relative_error(got2.flat(), prefix.flat()), test::Tolerance<T>::kernel)
          << "V2, chunk " << chunk << ", step " << t;
      for (Index h = 0; h < H; ++h) {
        v2_longer_pass_difference =
            std::max(v2_longer_pass_difference,
                     test::relative_error(got2.head(h), full2.head(h).middleRows(t, c)));
      }
    }
  }
  // As documented: V2's last keys see whether later keys exist, so a longer pass differs.
  EXPECT_GT(v2_longer_pass_difference, 1e-4);
}

TEST(DapeProperties, ZeroSecondLayerLeavesTheBaseBias) {
  // With w2 = 0 and b2 = 0, f vanishes: DAPE over B is attention with B, the bias-free DAPE is
  // NoPE, for both variants.
  constexpr Index H = 4;
  auto rng = test::make_rng(331);
  const Heads<double> q = test::random_heads<double>(H, 10, 8, rng);
  const Heads<double> k = test::random_heads<double>(H, 10, 8, rng);
  const Heads<double> v = test::random_heads<double>(H, 10, 8, rng);
  const Alibi<double> alibi(H);
  DapeWeights w = Dape<double, Alibi<double>>::random(alibi, 5, rng).weights();
  w.w2.setZero();
  w.b2.setZero();
  const Heads<double> with_alibi = attention(q, k, v, alibi);
  EXPECT_LE(test::relative_error(attention(q, k, v, Dape<double, Alibi<double>>(alibi, w)).flat(),
                                 with_alibi.flat()),
            1e-14);
  DapeWeights w3 = DapeV2<double, Alibi<double>>::random(alibi, 5, 3, rng).weights();
  w3.w2.setZero();
  w3.b2.setZero();
  EXPECT_LE(
      test::relative_error(attention(q, k, v, DapeV2<double, Alibi<double>>(alibi, w3, 3)).flat(),
                           with_alibi.flat()),
      1e-14);
  DapeWeights none = Dape<double>::random(H, 5, rng).weights();
  none.w2.setZero();
  none.b2.setZero();
  EXPECT_LE(test::relative_error(attention(q, k, v, Dape<double>(none)).flat(),
                                 attention(q, k, v).flat()),
            1e-14);
}

TEST(DapeProperties, OverAnyBiasOfTheLibrary) {
  // T5's bucketed bias as B: the streaming kernel equals the reference.
  constexpr Index H = 2;
  auto rng = test::make_rng(341);
  const auto t5 = T5RelativeBias<double>::random(H, 1.0, rng);
  test::expect_streaming_matches_reference<double>(
      Dape<double, T5RelativeBias<double>>::random(t5, 4, rng), H, 8, 4, 342, true);
}

TEST(DapeRandom, PyTorchDefaultInitialisation) {
  auto rng = test::make_rng(351);
  auto same = rng;
  const auto a = DapeV2<float, Alibi<float>>::random(Alibi<float>(4), 32, 3, rng);
  const auto b = DapeV2<float, Alibi<float>>::random(Alibi<float>(4), 32, 3, same);
  const DapeWeights& w = a.weights();
  ASSERT_EQ(w.w1.rows(), 32);
  ASSERT_EQ(w.w1.cols(), 24);  // 2H inputs × k taps
  ASSERT_EQ(w.w2.rows(), 4);
  ASSERT_EQ(w.w2.cols(), 96);
  EXPECT_EQ(w.w1, b.weights().w1);
  EXPECT_EQ(w.b2, b.weights().b2);
  // U(−1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = inputs · k.
  EXPECT_LE(w.w1.cwiseAbs().maxCoeff(), 1.0 / std::sqrt(24.0));
  EXPECT_LE(w.b1.cwiseAbs().maxCoeff(), 1.0 / std::sqrt(24.0));
  EXPECT_GT(w.w1.cwiseAbs().maxCoeff(), 0.9 / std::sqrt(24.0));
  EXPECT_LE(w.w2.cwiseAbs().maxCoeff(), 1.0 / std::sqrt(96.0));
  EXPECT_LE(w.b2.cwiseAbs().maxCoeff(), 1.0 / std::sqrt(96.0));
  EXPECT_EQ(Dape<float>::random(3, 7, rng).weights().w1.cols(), 3);
}

TEST(DapeErrors, RejectBadShapesWithTheShapesInTheMessage) {
  const Alibi<double> alibi(4);
  const DapeWeights good{Matrix<double>::Ones(6, 8), Vector<double>::Zero(6),
                         Matrix<double>::Ones(4, 6), Vector<double>::Zero(4)};
  DapeWeights bad = good;
  bad.w1 = Matrix<double>::Ones(6, 4);
  POSENC_EXPECT_INVALID((Dape<double, Alibi<double>>(alibi, bad)), "posenc::Dape",
                        "w1 must be [mlp_width, 2·heads] = [6, 8] for the 4 heads of w2",
                        "got [6, 4]");
  POSENC_EXPECT_INVALID((Dape<double>(good)), "posenc::Dape", "w1 must be [mlp_width, heads]",
                        "= [6, 4]", "got [6, 8]");
  bad = good;
  bad.b1 = Vector<double>::Zero(5);
  POSENC_EXPECT_INVALID((Dape<double, Alibi<double>>(alibi, bad)),
                        "b1 must have mlp_width = 6 entries, got 5");
  bad = good;
  bad.w2 = Matrix<double>::Ones(4, 5);
  POSENC_EXPECT_INVALID((Dape<double, Alibi<double>>(alibi, bad)), "w2 must be", "got [4, 5]");
  bad = good;
  bad.b2 = Vector<double>::Zero(3);
  POSENC_EXPECT_INVALID((Dape<double, Alibi<double>>(alibi, bad)),
                        "b2 must have heads = 4 entries, got 3");
  bad = good;
  bad.w1(0, 0) = std::nan("");
  POSENC_EXPECT_INVALID((Dape<double, Alibi<double>>(alibi, bad)), "weights must be finite");
  POSENC_EXPECT_INVALID((Dape<double, Alibi<double>>(Alibi<double>(3), good)),
                        "the base bias has 3 heads but w2 has 4 rows");
  POSENC_EXPECT_INVALID((DapeV2<double, Alibi<double>>(alibi, good, 2)), "posenc::DapeV2",
                        "kernel size must be odd and >= 1", "got 2");
  POSENC_EXPECT_INVALID((DapeV2<double, Alibi<double>>(alibi, good, 3)),
                        "w1 must be [mlp_width, 2·heads·kernel] = [6, 24]",
                        "Conv2d weight [out, in, 1, k] reshaped to [out, in·k]", "got [6, 8]");
  auto rng = test::make_rng(361);
  POSENC_EXPECT_INVALID((Dape<double, Alibi<double>>::random(alibi, 0, rng)),
                        "posenc::Dape::random", "mlp_width must be >= 1, got 0");
  // The head count is checked against the attention call.
  const Dape<double, Alibi<double>> dape(alibi, good);
  const Heads<double> x(2, 3, 4);
  POSENC_EXPECT_INVALID(attention(x, x, x, dape), "the mixer has 4 heads but q has 2");
  Matrix<double> logits(4, 9);
  Matrix<double> scores(4, 6);
  const std::vector<Index> p = iota(3);
  POSENC_EXPECT_INVALID(dape.mix(p, p, 1, 3, logits, scores), "keys [1, 4) do not lie in the 3");
  POSENC_EXPECT_INVALID(dape.mix(p, p, 0, 2, logits, scores.leftCols(5)),
                        "scores must be [heads, rows·key_count] = [4, 6], got [4, 5]");
}

}  // namespace
}  // namespace posenc
