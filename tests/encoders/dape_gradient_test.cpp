// SPDX-License-Identifier: MIT
// The backward of DAPE and DAPE V2 (Dape::mix_backward, kernel/backward_mixer.hpp): PyTorch
// autograd goldens (grad_dape.json, grad_dapev2.json, float64, 1e-10 relative per element) for
// dq, dk, dv, the network's weights and the base bias's parameters; central finite differences of
// the reference forward; the streaming backward against the reference over masks, offsets,
// explicit positions, segments, grouped-query heads and tiles smaller than the halo, the same bits
// on one and two threads.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "posenc/attention.hpp"
#include "posenc/attention_backward.hpp"
#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/dape.hpp"
#include "posenc/encoders/fire.hpp"
#include "posenc/encoders/kerple.hpp"
#include "posenc/encoders/t5_bias.hpp"
#include "support/backward_trials.hpp"
#include "support/golden.hpp"
#include "support/gradient_golden.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

using test::elementwise_error;
using test::gradient_golden_tolerance;
using test::Json;
using test::random_heads;

static_assert(DifferentiableScoreMixer<Dape<double, Kerple<double>>>);
static_assert(DifferentiableScoreMixer<DapeV2<float, T5RelativeBias<float>>>);
static_assert(std::is_same_v<decltype(Dape<double, Alibi<double>>::Gradient::bias), NoGradient>,
              "ALiBi's slopes are constants");

/// Concatenation of vectors.
Vector<double> concat(std::initializer_list<Vector<double>> parts) {
  Index size = 0;
  for (const Vector<double>& part : parts) size += part.size();
  Vector<double> out(size);
  Index at = 0;
  for (const Vector<double>& part : parts) {
    out.segment(at, part.size()) = part;
    at += part.size();
  }
  return out;
}

/// The base bias's gradient as one vector: KERPLE's r1 then r2, FIRE's w1, b1, w2, b2, c,
/// threshold_multiplier, T5's table row-major, nothing
/// for a bias without parameters.
template <class G>
Vector<double> bias_vector(const G& g) {
  if constexpr (std::is_same_v<G, NoGradient>) {
    return Vector<double>();
  } else if constexpr (requires { g.r1; }) {
    return concat({g.r1, g.r2});
  } else if constexpr (requires { g.threshold_multiplier; }) {
    return concat({g.w1.template reshaped<Eigen::RowMajor>(), g.b1,
                   g.w2.template reshaped<Eigen::RowMajor>(), g.b2,
                   Vector<double>::Constant(1, g.c),
                   Vector<double>::Constant(1, g.threshold_multiplier)});
  } else {
    return g.table.template cast<double>().template reshaped<Eigen::RowMajor>();
  }
}

/// A DAPE gradient as one vector: w1, b1, w2, b2 (row-major) then the bias's.
template <class Gradient>
Vector<double> gradient_vector(const Gradient& g) {
  return concat({g.w1.template reshaped<Eigen::RowMajor>(), g.b1,
                 g.w2.template reshaped<Eigen::RowMajor>(), g.b2, bias_vector(g.bias)});
}

/// The weights in the order of gradient_vector, and back.
Vector<double> weight_vector(const DapeWeights& w) {
  return concat({w.w1.reshaped<Eigen::RowMajor>(), w.b1, w.w2.reshaped<Eigen::RowMajor>(), w.b2});
}
DapeWeights weights_from(const Vector<double>& theta, const DapeWeights& like) {
  DapeWeights w = like;
  Index at = 0;
  const auto take = [&](auto& m) {
    for (Index r = 0; r < m.rows(); ++r) {
      for (Index c = 0; c < m.cols(); ++c) m(r, c) = theta[at++];
    }
  };
  take(w.w1);
  take(w.b1);
  take(w.w2);
  take(w.b2);
  return w;
}

// ---------------------------------------------------------------------------------------------
// Goldens.
// ---------------------------------------------------------------------------------------------

/// One golden case: dq, dk, dv (check_golden_case) and every parameter gradient, streaming and
/// reference, against `bias_names`' golden entries after the network's.
template <class Encoder>
void check_dape_case(const Json& c, const Encoder& encoder,
                     const std::vector<std::string>& bias_names, const std::string& label) {
  const auto both = test::check_golden_case(c, encoder, label);
  const Json& outputs = c.at("outputs");
  std::vector<Vector<double>> parts{
      test::flatten(outputs.at("d_W1")), test::flatten(outputs.at("d_b1")),
      test::flatten(outputs.at("d_W2")), test::flatten(outputs.at("d_b2"))};
  for (const std::string& name : bias_names) parts.push_back(test::flatten(outputs.at(name)));
  Vector<double> want;
  for (const Vector<double>& part : parts) want = concat({want, part});
  for (const auto* grads : {&both.streamed, &both.reference}) {
    const Vector<double> got = gradient_vector(grads->encoder);
    ASSERT_EQ(got.size(), want.size()) << label;
    // Relative per element with the default floor (1e-13 absolute where the golden is ~0).
    EXPECT_LT(elementwise_error(got, want), gradient_golden_tolerance)
        << label << (grads == &both.streamed ? " (streaming)" : " (reference)");
  }
}

/// Every case of grad_dape.json (kernel 1) or grad_dapev2.json (kernel 3): KERPLE-log with r1
/// below its clamp in one head, FIRE (leaky, causal form) and ALiBi (constant slopes).
void check_dape_file(const std::string& file, bool v2) {
  const Json golden = test::load_golden(file);
  for (const Json& c : golden.at("cases")) {
    const Json& config = c.at("config");
    const Json& in = c.at("inputs");
    const std::string label = file + " " + c.at("key").get<std::string>();
    const DapeWeights weights{test::flat_rows(in.at("W1")), test::to_vector(in.at("b1")),
                              test::flat_rows(in.at("W2")), test::to_vector(in.at("b2"))};
    const Index kernel = config.at("kernel").get<Index>();
    const auto run = [&](const auto& bias, const std::vector<std::string>& names) {
      using Bias = std::decay_t<decltype(bias)>;
      if (v2) {
        check_dape_case(c, DapeV2<double, Bias>(bias, weights, kernel), names, label);
      } else {
        check_dape_case(c, Dape<double, Bias>(bias, weights), names, label);
      }
    };
    const std::string kind = config.at("bias").get<std::string>();
    if (kind == "kerple_log") {
      run(Kerple<double>(KerpleKernel::log, test::to_vector(in.at("kerple_r1")),
                         test::to_vector(in.at("kerple_r2")), BiasForm::causal),
          {"d_kerple_r1", "d_kerple_r2"});
    } else if (kind == "alibi") {
      run(Alibi<double>(test::to_vector(in.at("slopes")), BiasForm::causal), {});
    } else {
      const Json& f = config.at("fire");
      FireOptions options;
      options.c = test::number(in.at("fire_c"));
      options.threshold = f.at("L0").get<double>();
      options.threshold_multiplier = test::number(in.at("fire_L_multiplier"));
      options.eps = f.at("eps").get<double>();
      options.activation = FireActivation::leaky_relu;
      options.form = BiasForm::causal;
      ASSERT_EQ(f.at("activation").get<std::string>(), "leaky");
      ASSERT_EQ(f.at("form").get<std::string>(), "causal");
      run(Fire<double>(test::to_matrix(in.at("fire_W1")), test::to_vector(in.at("fire_b1")),
                       test::to_matrix(in.at("fire_W2")), test::to_vector(in.at("fire_b2")),
                       options),
          {"d_fire_W1", "d_fire_b1", "d_fire_W2", "d_fire_b2", "d_fire_c", "d_fire_L_multiplier"});
    }
  }
}

TEST(DapeGradientGolden, DapeMatchesAutograd) { check_dape_file("grad_dape.json", false); }

TEST(DapeGradientGolden, DapeV2MatchesAutograd) { check_dape_file("grad_dapev2.json", true); }

// ---------------------------------------------------------------------------------------------
// Finite differences.
// ---------------------------------------------------------------------------------------------

/// L = Σ dout ∘ attention_reference(q, k, v).
template <class Encoder>
double loss(const Heads<double>& q, const Heads<double>& k, const Heads<double>& v,
            const Encoder& encoder, const Heads<double>& dout, const AttentionOptions& options) {
  return attention_reference(q, k, v, encoder, options).flat().dot(dout.flat());
}

/// Central differences of L along q, k, v and the parameters θ (make(θ) builds the encoder;
/// θ is the network's weights then the bias's, as gradient_vector), against the streaming
/// backward on small tiles and the reference backward.
template <class Make>
void expect_finite_differences(const Make& make, const Vector<double>& theta, Index H, Index Hkv,
                               Index N, Index M, Index D, Index Dv, AttentionOptions options,
                               std::uint64_t salt, const std::string& label) {
  auto rng = test::make_rng(salt);
  std::array<Heads<double>, 3> inputs{random_heads<double>(H, N, D, rng),
                                      random_heads<double>(Hkv, M, D, rng),
                                      random_heads<double>(Hkv, M, Dv, rng)};
  const Heads<double> dout = random_heads<double>(H, N, Dv, rng);
  const auto encoder = make(theta);
  options.query_block = 3;  // several tiles, partial ones, key tiles narrower than the halo
  options.key_block = 2;
  const AttentionForward<double> forward =
      attention_forward(inputs[0], inputs[1], inputs[2], encoder, options);
  const auto streamed = attention_backward(inputs[0], inputs[1], inputs[2], encoder, forward.out,
                                           forward.lse, dout, options);
  const auto reference =
      attention_backward_reference(inputs[0], inputs[1], inputs[2], encoder, dout, options);
  const double step = 1e-5;
  const Heads<double>* analytic[] = {&streamed.dq, &streamed.dk, &streamed.dv};
  const Heads<double>* oracle[] = {&reference.dq, &reference.dk, &reference.dv};
  for (int which = 0; which < 3; ++which) {
    Heads<double> fd(inputs[which].heads(), inputs[which].rows(), inputs[which].dim());
    for (Index i = 0; i < fd.flat().size(); ++i) {
      double& x = inputs[which].flat()[i];
      const double saved = x;
      x = saved + step;
      const double plus = loss(inputs[0], inputs[1], inputs[2], encoder, dout, options);
      x = saved - step;
      const double minus = loss(inputs[0], inputs[1], inputs[2], encoder, dout, options);
      x = saved;
      fd.flat()[i] = (plus - minus) / (2 * step);
    }
    // Central differences: O(step²) truncation plus O(eps / step) rounding.
    EXPECT_LT(test::relative_error(analytic[which]->flat(), fd.flat()), 1e-8)
        << label << " input " << which << " (streaming)";
    EXPECT_LT(test::relative_error(oracle[which]->flat(), fd.flat()), 1e-8)
        << label << " input " << which << " (reference)";
  }
  Vector<double> fd(theta.size());
  for (Index i = 0; i < theta.size(); ++i) {
    Vector<double> t = theta;
    t[i] = theta[i] + step;
    const double plus = loss(inputs[0], inputs[1], inputs[2], make(t), dout, options);
    t[i] = theta[i] - step;
    const double minus = loss(inputs[0], inputs[1], inputs[2], make(t), dout, options);
    fd[i] = (plus - minus) / (2 * step);
  }
  EXPECT_LT(test::relative_error(gradient_vector(streamed.encoder), fd), 1e-8)
      << label << " parameters (streaming)";
  EXPECT_LT(test::relative_error(gradient_vector(reference.encoder), fd), 1e-8)
      << label << " parameters (reference)";
}

TEST(DapeGradient, MatchesFiniteDifferences) {
  auto rng = test::make_rng(3101);
  {
    // DAPE V2 (k = 3) over KERPLE-log: causal, decode-style offset, two query heads per key/value
    // head; the parameters are the convolutions' and r1, r2 (inside their clamp).
    constexpr Index H = 4;
    const DapeWeights w0 = detail::dape_random_weights(2 * H, 3, H, 3, rng);
    Vector<double> r(2 * H);
    for (Index i = 0; i < 2 * H; ++i) r[i] = std::uniform_real_distribution<>(0.2, 1.5)(rng);
    const auto make = [&](const Vector<double>& theta) {
      const Vector<double> b = theta.tail(2 * H);
      return DapeV2<double, Kerple<double>>(Kerple<double>(KerpleKernel::log, b.head(H), b.tail(H)),
                                            weights_from(theta, w0), 3);
    };
    expect_finite_differences(make, concat({weight_vector(w0), r}), H, 2, 7, 11, 5, 3,
                              {.mask = Mask::causal(), .query_offset = 4}, 3102, "DapeV2<Kerple>");
    // A sliding window: the convolutions read forbidden neighbours, so ∂L/∂B is nonzero at keys
    // the mask forbids and reaches r1, r2 from there too.
    expect_finite_differences(make, concat({weight_vector(w0), r}), H, 4, 9, 10, 3, 2,
                              {.mask = Mask::sliding_window(3), .query_offset = 1}, 3106,
                              "DapeV2<Kerple>, sliding window");
  }
  {
    // DAPE over a T5 table: a sliding window (a convolution-free mixer reads masked logits too,
    // but they never reach an allowed score), queries ahead of the keys.
    constexpr Index H = 2;
    const T5BucketOptions buckets{.num_buckets = 6, .max_distance = 12, .bidirectional = true};
    const T5RelativeBias<double> t5 = T5RelativeBias<double>::random(H, 0.5, rng, buckets);
    const DapeWeights w0 = detail::dape_random_weights(2 * H, 5, H, 1, rng);
    const auto make = [&](const Vector<double>& theta) {
      const Vector<double> table = theta.tail(t5.table().size());
      return Dape<double, T5RelativeBias<double>>(
          T5RelativeBias<double>(
              Eigen::Map<const Matrix<double>>(table.data(), t5.table().rows(), t5.table().cols()),
              buckets),
          weights_from(theta, w0));
    };
    expect_finite_differences(
        make, concat({weight_vector(w0), t5.table().reshaped<Eigen::RowMajor>()}), H, 1, 9, 6, 4, 5,
        {.mask = Mask::sliding_window(4), .query_offset = 2}, 3103, "Dape<T5>");
  }
  {
    // Bias-free DAPE V2 with k = 5 (halo 4, wider than the key tiles) and no mask: every masked
    // and zero-padded neighbour matters; rows before every key (offset −2) under a causal mask.
    constexpr Index H = 3;
    const DapeWeights w0 = detail::dape_random_weights(H, 3, H, 5, rng);
    const auto make = [&](const Vector<double>& theta) {
      return DapeV2<double>(weights_from(theta, w0), 5);
    };
    expect_finite_differences(make, weight_vector(w0), H, 3, 8, 9, 3, 2, {.mask = Mask::none()},
                              3104, "DapeV2 bias-free, no mask");
    expect_finite_differences(make, weight_vector(w0), H, 1, 5, 9, 3, 2,
                              {.mask = Mask::causal(), .query_offset = -2}, 3105,
                              "DapeV2 bias-free, causal");
  }
}

// ---------------------------------------------------------------------------------------------
// Streaming against the reference.
// ---------------------------------------------------------------------------------------------

/// Streaming backward == reference backward on random problems (every mask, offsets, explicit
/// shuffled key positions, segments, grouped-query heads, odd sizes, tiles with remainders and
/// narrower than the halo); the same bits on one and two threads.
template <class Scalar, class Encoder>
void expect_streaming_matches_reference(const Encoder& encoder, Index Hkv, Index D,
                                        std::uint64_t salt, const std::string& label) {
  const double eps = std::numeric_limits<Scalar>::epsilon();
  test::for_each_backward_trial<Scalar>(
      {.heads = encoder.heads(), .kv_heads = Hkv, .dim = D, .trials = 8, .salt = salt}, label,
      [&](const test::BackwardTrial<Scalar>& t) {
        const auto reference =
            attention_backward_reference(t.q, t.k, t.v, encoder, t.dout, t.options);
        const auto streamed = test::backward_on_one_and_two_threads(t, encoder);
        // Both sides sum O(M + D) rounded terms per element, in different orders; in double this
        // is below 1e-12.
        const double tolerance = std::is_same_v<Scalar, double>
                                     ? 1e-12
                                     : 64 * eps * static_cast<double>(t.keys + D + t.value_dim);
        test::expect_backward_close_and_deterministic(streamed, reference, tolerance, t.where);
        const Vector<double> g = gradient_vector(streamed[0].encoder);
        EXPECT_LT(test::relative_error(g, gradient_vector(reference.encoder)), tolerance)
            << t.where << " parameters";
        EXPECT_EQ(g, gradient_vector(streamed[1].encoder))
            << t.where << ": threads change parameters";
      });
}

TEST(DapeGradient, StreamingMatchesReference) {
  auto rng = test::make_rng(3110);
  const Kerple<double> kerple(KerpleKernel::log, Vector<double>::Constant(4, 0.7),
                              Vector<double>::Constant(4, 0.4));
  expect_streaming_matches_reference<double>(
      DapeV2<double, Kerple<double>>::random(kerple, 5, 3, rng), 2, 5, 3111, "DapeV2<Kerple>");
  expect_streaming_matches_reference<double>(
      Dape<double, T5RelativeBias<double>>::random(
          T5RelativeBias<double>::random(2, 0.5, rng, {.num_buckets = 8, .max_distance = 16}), 6,
          rng),
      1, 4, 3112, "Dape<T5>");
  expect_streaming_matches_reference<double>(DapeV2<double>::random(3, 4, 5, rng), 3, 3, 3113,
                                             "DapeV2 bias-free k = 5");
  // float: compiles, and agrees to the float tolerance.
  const Kerple<float> kerple_float(KerpleKernel::log, Vector<double>::Constant(2, 0.7),
                                   Vector<double>::Constant(2, 0.4));
  expect_streaming_matches_reference<float>(
      DapeV2<float, Kerple<float>>::random(kerple_float, 4, 3, rng), 1, 6, 3114,
      "DapeV2<Kerple> float");
}

/// DAPE (k = 1) on tiles of whole-packet rows with consecutive positions: the backward runs the
/// network in place, a distance bias once per distance (DapeNetwork::backward_by_rows), and must
/// match the reference (and give the same bits on one and two threads) under every mask, with
/// the last key tile partial (the general path) and rows before every key.
template <class Scalar, class Encoder>
void expect_row_path_matches_reference(const Encoder& encoder, std::uint64_t salt,
                                       const std::string& label) {
  auto rng = test::make_rng(salt);
  const Index H = encoder.heads();
  const Index packet = detail::SimdPacket<Scalar>::width;
  const double eps = std::numeric_limits<Scalar>::epsilon();
  const Mask masks[] = {Mask::causal(), Mask::none(), Mask::sliding_window(5),
                        Mask::blockwise_causal(6)};
  for (int trial = 0; trial < 4; ++trial) {
    const Index N = 5 * packet + 3 * trial;
    const Index M = 4 * packet + (trial % 2) * 3;
    const Index D = 5;
    const Index Dv = 3;
    const auto q = random_heads<Scalar>(H, N, D, rng);
    const auto k = random_heads<Scalar>(1, M, D, rng);
    const auto v = random_heads<Scalar>(1, M, Dv, rng);
    const auto dout = random_heads<Scalar>(H, N, Dv, rng);
    AttentionOptions options{.mask = masks[trial],
                             .query_offset = M - N + trial - 1,
                             .query_block = 2 * packet - trial,
                             .key_block = (1 + trial % 2) * packet};
    const auto reference = attention_backward_reference(q, k, v, encoder, dout, options);
    Heads<Scalar> out(H, N, Dv);
    Matrix<Scalar> lse(H, N);
    attention(q, k, v, encoder, out.view(), lse, options);
    std::array<AttentionGradients<Scalar, Encoder>, 2> streamed;
    for (const int threads : {1, 2}) {
      options.threads = threads;
      streamed[static_cast<std::size_t>(threads - 1)] =
          attention_backward(q, k, v, encoder, out, lse, dout, options);
    }
    const std::string where = label + " trial " + std::to_string(trial);
    const double tolerance =
        std::is_same_v<Scalar, double> ? 1e-12 : 64 * eps * static_cast<double>(M + D + Dv);
    const auto& s = streamed[0];
    EXPECT_LT(test::relative_error(s.dq.flat(), reference.dq.flat()), tolerance) << where << " dq";
    EXPECT_LT(test::relative_error(s.dk.flat(), reference.dk.flat()), tolerance) << where << " dk";
    EXPECT_LT(test::relative_error(s.dv.flat(), reference.dv.flat()), tolerance) << where << " dv";
    const Vector<double> g = gradient_vector(s.encoder);
    EXPECT_LT(test::relative_error(g, gradient_vector(reference.encoder)), tolerance)
        << where << " parameters";
    EXPECT_EQ(s.dq.flat(), streamed[1].dq.flat()) << where << ": threads change dq";
    EXPECT_EQ(s.dk.flat(), streamed[1].dk.flat()) << where << ": threads change dk";
    EXPECT_EQ(s.dv.flat(), streamed[1].dv.flat()) << where << ": threads change dv";
    EXPECT_EQ(g, gradient_vector(streamed[1].encoder)) << where << ": threads change parameters";
  }
}

TEST(DapeGradient, RowPathMatchesReference) {
  auto rng = test::make_rng(3120);
  const Kerple<double> kerple(KerpleKernel::log, Vector<double>::Constant(3, 0.7),
                              Vector<double>::Constant(3, 0.4));
  expect_row_path_matches_reference<double>(Dape<double, Kerple<double>>::random(kerple, 6, rng),
                                            3121, "Dape<Kerple>");
  expect_row_path_matches_reference<double>(
      Dape<double, T5RelativeBias<double>>::random(
          T5RelativeBias<double>::random(2, 0.5, rng, {.num_buckets = 8, .max_distance = 16}), 5,
          rng),
      3122, "Dape<T5>");
  expect_row_path_matches_reference<double>(
      Dape<double, Alibi<double>>::random(Alibi<double>(2), 4, rng), 3123, "Dape<ALiBi>");
  expect_row_path_matches_reference<double>(Dape<double>::random(3, 4, rng), 3124,
                                            "Dape bias-free");
  const Kerple<float> kerple_float(KerpleKernel::log, Vector<double>::Constant(2, 0.7),
                                   Vector<double>::Constant(2, 0.4));
  expect_row_path_matches_reference<float>(Dape<float, Kerple<float>>::random(kerple_float, 8, rng),
                                           3125, "Dape<Kerple> float");
}

}  // namespace
}  // namespace posenc
