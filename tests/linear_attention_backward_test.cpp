// SPDX-License-Identifier: MIT
// linear_attention_backward: the streaming backward (forward scan for dq, reverse scan of suffix
// states for dk and dv; global sums when non-causal) against PyTorch autograd (golden
// grad_linear.json, float64, 1e-10 relative per element), against central finite differences
// (every feature map, Favor's stabilisers with ε > 0, grouped-query heads, a RoPE transform, a
// user's learnable transform and a user's feature map), against the materialising reference
// over a seeded sweep on one and two threads, and the forward's non-finite policy.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "posenc/linear_attention.hpp"
#include "posenc/posenc.hpp"
#include "support/golden.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

/// max over elements of |a − b| / max(|b|, floor): relative per element, with an absolute floor
/// for entries that are nearly zero in the golden.
template <class A, class B>
double linear_golden_error(const A& a, const B& b, double floor = 1e-3) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double worst = 0.0;
  for (Index i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a.data()[i]);
    const double y = static_cast<double>(b.data()[i]);
    const double e = std::abs(x - y) / std::max(std::abs(y), floor);
    worst = std::isnan(e) ? std::numeric_limits<double>::infinity() : std::max(worst, e);
  }
  return worst;
}

// --- feature maps used only here ---------------------------------------------------------------

/// A user's feature map with F = 2·D and its backward hook: φ(x) = [softplus(x), softplus(−x)].
struct SoftplusPair {
  Index feature_dim(Index dim) const { return 2 * dim; }

  template <class In, class Out>
  void features(const In& x, Out&& out) const {
    const Index d = x.cols();
    out.leftCols(d) = x.array().exp().log1p().matrix();
    out.rightCols(d) = (-x.array()).exp().log1p().matrix();
  }

  /// softplus'(x) = σ(x).
  template <class In, class DF, class Out>
  void features_backward(const In& x, const DF& dfeatures, Out&& dx) const {
    const Index d = x.cols();
    const auto sigmoid = (1.0 / (1.0 + (-x.array()).exp()));
    dx =
        (dfeatures.leftCols(d).array() * sigmoid - dfeatures.rightCols(d).array() * (1.0 - sigmoid))
            .matrix();
  }
};

/// The same map without the hook: it runs forward but has no backward.
struct SoftplusPairForwardOnly {
  Index feature_dim(Index dim) const { return 2 * dim; }
  template <class In, class Out>
  void features(const In& x, Out&& out) const {
    SoftplusPair{}.features(x, out);
  }
};

static_assert(DifferentiableFeatureMap<SoftplusPair, double>);
static_assert(FeatureMap<SoftplusPairForwardOnly, double> &&
              !DifferentiableFeatureMap<SoftplusPairForwardOnly, double>);
static_assert(DifferentiableFeatureMap<EluPlusOne, float> &&
              DifferentiableFeatureMap<ReluPlusEpsilon, double> &&
              DifferentiableStabilizedFeatureMap<Favor<float>, float> &&
              !DifferentiableStabilizedFeatureMap<EluPlusOne, double>);

/// A user's QueryKeyTransform with learnable parameters: row r at position p is scaled by
/// s_h·(1 + p/16) (queries: s = query_scale[head], keys: key_scale[head]).
struct LearnedScale {
  using Scalar = double;
  struct Gradient {
    Vector<double> query_scale, key_scale;
    Gradient& operator+=(const Gradient& other) {
      query_scale += other.query_scale;
      key_scale += other.key_scale;
      return *this;
    }
    void set_zero() {
      query_scale.setZero();
      key_scale.setZero();
    }
  };
  Vector<double> query_scale, key_scale;

  Index transformed_dim(Index dim) const { return dim; }
  Gradient zero_gradient() const {
    return {Vector<double>::Zero(query_scale.size()), Vector<double>::Zero(key_scale.size())};
  }
  static void scale(double s, Positions positions, ConstTileRef<double> in, TileRef<double> out) {
    for (Index r = 0; r < in.rows(); ++r) {
      out.row(r) =
          s * (1.0 + static_cast<double>(positions[static_cast<std::size_t>(r)]) / 16) * in.row(r);
    }
  }
  /// Σ_r (1 + p_r/16)·dout_r·in_r, the derivative of Σ dout ∘ T(in) with respect to s.
  static double share(Positions positions, ConstTileRef<double> in, ConstTileRef<double> dout) {
    double sum = 0.0;
    for (Index r = 0; r < in.rows(); ++r) {
      sum += (1.0 + static_cast<double>(positions[static_cast<std::size_t>(r)]) / 16) *
             dout.row(r).dot(in.row(r));
    }
    return sum;
  }
  void transform_queries(Index head, Positions positions, Index /*centre*/, ConstTileRef<double> in,
                         TileRef<double> out) const {
    scale(query_scale[head], positions, in, out);
  }
  void transform_keys(Index head, Positions positions, Index /*centre*/, ConstTileRef<double> in,
                      TileRef<double> out) const {
    scale(key_scale[head], positions, in, out);
  }
  void transform_queries_backward(Index head, Positions positions, Index /*centre*/,
                                  ConstTileRef<double> /*in*/, ConstTileRef<double> dout,
                                  TileRef<double> din) const {
    scale(query_scale[head], positions, dout, din);
  }
  void transform_keys_backward(Index head, Positions positions, Index /*centre*/,
                               ConstTileRef<double> /*in*/, ConstTileRef<double> dout,
                               TileRef<double> din) const {
    scale(key_scale[head], positions, dout, din);
  }
  void transform_queries_backward(Index head, Positions positions, Index centre,
                                  ConstTileRef<double> in, ConstTileRef<double> dout,
                                  TileRef<double> din, Gradient& gradient) const {
    transform_queries_backward(head, positions, centre, in, dout, din);
    gradient.query_scale[head] += share(positions, in, dout);
  }
  void transform_keys_backward(Index head, Positions positions, Index centre,
                               ConstTileRef<double> in, ConstTileRef<double> dout,
                               TileRef<double> din, Gradient& gradient) const {
    transform_keys_backward(head, positions, centre, in, dout, din);
    gradient.key_scale[head] += share(positions, in, dout);
  }
};

static_assert(LearnableTransform<LearnedScale>);

// --- golden ---------------------------------------------------------------------------------

constexpr double linear_golden_tolerance = 1e-10;

TEST(LinearAttentionBackwardGolden, MatchesAutograd) {
  const auto golden = test::load_golden("grad_linear.json");
  ASSERT_EQ(golden.at("cases").size(), 4u);
  for (const auto& c : golden.at("cases")) {
    const std::string label = c.at("key").get<std::string>();
    const auto& config = c.at("config");
    const auto& inputs = c.at("inputs");
    const auto& outputs = c.at("outputs");
    const Heads<double> q = test::to_heads(inputs.at("q"));
    const Heads<double> k = test::to_heads(inputs.at("k"));
    const Heads<double> v = test::to_heads(inputs.at("v"));
    const Heads<double> dout = test::to_heads(inputs.at("dO"));
    const bool causal = config.at("causal").get<bool>();
    // The golden's `normaliser` is not compared: the backward recomputes it internally and
    // Favor's depends on the stabiliser (the golden's is for c = 0).
    const auto check = [&](const auto& map) {
      const Heads<double> out = linear_attention(q, k, v, map, {.causal = causal});
      EXPECT_LT(linear_golden_error(out.flat(), test::to_heads(outputs.at("out")).flat()),
                linear_golden_tolerance)
          << label << " out";
      const char* names[] = {"dq", "dk", "dv"};
      const auto expect = [&](const auto& grads, const std::string& where) {
        const Heads<double>* got[] = {&grads.dq, &grads.dk, &grads.dv};
        for (int i = 0; i < 3; ++i) {
          const Heads<double> expected = test::to_heads(outputs.at(names[i]));
          EXPECT_LT(linear_golden_error(got[i]->flat(), expected.flat()), linear_golden_tolerance)
              << label << " " << names[i] << " (" << where << ")";
        }
      };
      expect(linear_attention_backward_reference(q, k, v, map, NoPositionalEncoding{}, dout,
                                                 {.causal = causal}),
             "reference");
      for (const Index chunk : {Index{1}, Index{3}, Index{64}}) {
        for (const int threads : {1, 2}) {
          expect(linear_attention_backward(q, k, v, map, dout,
                                           {.causal = causal, .threads = threads, .chunk = chunk}),
                 "chunk " + std::to_string(chunk) + " threads " + std::to_string(threads));
        }
      }
    };
    if (config.at("feature_map").get<std::string>() == "elu+1") {
      check(EluPlusOne{});
    } else {
      // The recorded projection, ε = 0 (no stabiliser survives in out or its gradients).
      check(Favor<double>(test::to_matrix(inputs.at("omega")),
                          {.stabilizer = 0.0, .temperature = config.at("tau").get<double>()}));
    }
  }
}

// --- finite differences -----------------------------------------------------------------------

/// L = Σ dout ∘ linear_attention_reference(q, k, v, map, encoder, options).
template <class Map, class Encoder>
double linear_loss(const std::array<Heads<double>, 3>& x, const Map& map, const Encoder& encoder,
                   const Heads<double>& dout, const LinearAttentionOptions& options) {
  return linear_attention_reference(x[0], x[1], x[2], map, encoder, options)
      .flat()
      .dot(dout.flat());
}

/// Central differences of linear_loss along every element of input `which` (0 q, 1 k, 2 v).
template <class Map, class Encoder>
Heads<double> linear_finite_difference(std::array<Heads<double>, 3> x, int which, const Map& map,
                                       const Encoder& encoder, const Heads<double>& dout,
                                       const LinearAttentionOptions& options) {
  auto& input = x[static_cast<std::size_t>(which)];
  Heads<double> grad(input.heads(), input.rows(), input.dim());
  const double step = 1e-5;
  for (Index i = 0; i < input.flat().size(); ++i) {
    double& value = input.flat()[i];
    const double saved = value;
    value = saved + step;
    const double plus = linear_loss(x, map, encoder, dout, options);
    value = saved - step;
    const double minus = linear_loss(x, map, encoder, dout, options);
    value = saved;
    grad.flat()[i] = (plus - minus) / (2 * step);
  }
  return grad;
}

/// The streaming and the reference backward both match finite differences on q, k and v.
template <class Map, class Encoder>
void expect_linear_gradients_match_differences(const Map& map, const Encoder& encoder,
                                               const std::array<Heads<double>, 3>& x,
                                               const Heads<double>& dout,
                                               const LinearAttentionOptions& options,
                                               const std::string& label) {
  const auto streamed = linear_attention_backward(x[0], x[1], x[2], map, encoder, dout, options);
  const auto reference =
      linear_attention_backward_reference(x[0], x[1], x[2], map, encoder, dout, options);
  const Heads<double>* s[] = {&streamed.dq, &streamed.dk, &streamed.dv};
  const Heads<double>* r[] = {&reference.dq, &reference.dk, &reference.dv};
  for (int which = 0; which < 3; ++which) {
    const Heads<double> fd = linear_finite_difference(x, which, map, encoder, dout, options);
    EXPECT_LT(test::relative_error(s[which]->flat(), fd.flat()), 1e-8)
        << label << " input " << which << " (streaming)";
    EXPECT_LT(test::relative_error(r[which]->flat(), fd.flat()), 1e-8)
        << label << " input " << which << " (reference)";
  }
}

/// Calls body(map, name) for every library map and a user map, for inputs of width `dim`.
template <class Body>
void for_each_linear_map(Index dim, Body&& body) {
  body(EluPlusOne{}, "elu+1");
  // ε = 0.1 keeps the features away from 0, where a small positive input makes the loss curve
  // too fast for a step of 1e-5 (the gradient is right there too).
  body(ReluPlusEpsilon{0.1}, "relu+eps");
  // ε large enough that Favor's stabilisers (a query's own maximum, the keys' running maximum
  // and which key sets it) change the gradients well above the tolerance.
  body(Favor<double>(dim, 2 * dim + 1, 21, {.stabilizer = 0.25}), "favor eps 0.25");
  body(
      Favor<double>(dim, dim + 2, 22, {.orthogonal = false, .stabilizer = 0.0, .temperature = 0.3}),
      "favor iid eps 0");
  body(SoftplusPair{}, "user softplus pair");
}

TEST(LinearAttentionBackward, MatchesFiniteDifferences) {
  auto rng = test::make_rng(1601);
  const Index H = 4, Hkv = 2, N = 9, M = 7, D = 5, Dv = 3;
  for (const bool causal : {true, false}) {
    const Index keys = causal ? N : M;
    const Heads<double> q = test::random_heads<double>(H, N, D, rng);
    Heads<double> k = test::random_heads<double>(Hkv, keys, D, rng);
    // Key norms that rise and fall, so that the largest key projection (Favor's running
    // stabiliser) moves from key to key inside and across chunks.
    for (Index j = 0; j < keys; ++j) {
      for (Index g = 0; g < Hkv; ++g) k.head(g).row(j) *= 0.5 + 0.4 * static_cast<double>(j % 4);
    }
    const Heads<double> v = test::random_heads<double>(Hkv, keys, Dv, rng);
    const Heads<double> dout = test::random_heads<double>(H, N, Dv, rng);
    const LinearAttentionOptions options{.causal = causal, .first_position = 3, .chunk = 3};
    for_each_linear_map(D, [&](const auto& map, const char* name) {
      expect_linear_gradients_match_differences(
          map, NoPositionalEncoding{}, {q, k, v}, dout, options,
          std::string(name) + (causal ? " causal" : " non-causal"));
    });
  }
}

TEST(LinearAttentionBackward, RopeTransformMatchesFiniteDifferences) {
  auto rng = test::make_rng(1602);
  const Index H = 2, Hkv = 1, N = 7, D = 6, Dv = 3;
  const Heads<double> q = test::random_heads<double>(H, N, D, rng);
  const Heads<double> k = test::random_heads<double>(Hkv, N, D, rng);
  const Heads<double> v = test::random_heads<double>(Hkv, N, Dv, rng);
  const Heads<double> dout = test::random_heads<double>(H, N, Dv, rng);
  const RotaryEncoding<double> rope(D);
  const RotaryEncoding<double> rope_interleaved(D, {.pairing = RotaryPairing::interleaved});
  for (const bool causal : {true, false}) {
    const LinearAttentionOptions options{.causal = causal, .first_position = 5, .chunk = 2};
    const std::string where = causal ? " causal" : " non-causal";
    expect_linear_gradients_match_differences(EluPlusOne{}, rope, {q, k, v}, dout, options,
                                              "rope elu+1" + where);
    expect_linear_gradients_match_differences(Favor<double>(D, 9, 23, {.stabilizer = 0.1}),
                                              rope_interleaved, {q, k, v}, dout, options,
                                              "rope favor" + where);
  }
}

TEST(LinearAttentionBackward, LearnableTransformGradientMatchesFiniteDifferences) {
  auto rng = test::make_rng(1603);
  const Index H = 4, Hkv = 2, N = 8, D = 3, Dv = 2;
  const Heads<double> q = test::random_heads<double>(H, N, D, rng);
  const Heads<double> k = test::random_heads<double>(Hkv, N, D, rng);
  const Heads<double> v = test::random_heads<double>(Hkv, N, Dv, rng);
  const Heads<double> dout = test::random_heads<double>(H, N, Dv, rng);
  LearnedScale encoder{Vector<double>::LinSpaced(H, 0.3, 0.9),
                       Vector<double>::LinSpaced(Hkv, 0.5, 0.7)};
  for (const bool causal : {true, false}) {
    const LinearAttentionOptions options{.causal = causal, .first_position = 2, .chunk = 3};
    expect_linear_gradients_match_differences(EluPlusOne{}, encoder, {q, k, v}, dout, options,
                                              causal ? "learned scale causal" : "learned scale");
    const auto streamed = linear_attention_backward(q, k, v, EluPlusOne{}, encoder, dout, options);
    const auto two_threads = linear_attention_backward(
        q, k, v, EluPlusOne{}, encoder, dout,
        {.causal = causal, .first_position = 2, .threads = 2, .chunk = 3});
    const auto reference =
        linear_attention_backward_reference(q, k, v, EluPlusOne{}, encoder, dout, options);
    // Central differences of the loss along each learnable parameter.
    const auto derivative = [&](Vector<double>& parameter, Index i) {
      const double saved = parameter[i];
      const double step = 1e-6;
      parameter[i] = saved + step;
      const double plus = linear_loss({q, k, v}, EluPlusOne{}, encoder, dout, options);
      parameter[i] = saved - step;
      const double minus = linear_loss({q, k, v}, EluPlusOne{}, encoder, dout, options);
      parameter[i] = saved;
      return (plus - minus) / (2 * step);
    };
    Vector<double> fd_query(H), fd_key(Hkv);
    for (Index h = 0; h < H; ++h) fd_query[h] = derivative(encoder.query_scale, h);
    for (Index g = 0; g < Hkv; ++g) fd_key[g] = derivative(encoder.key_scale, g);
    EXPECT_LT(test::relative_error(streamed.encoder.query_scale, fd_query), 1e-8);
    EXPECT_LT(test::relative_error(streamed.encoder.key_scale, fd_key), 1e-8);
    EXPECT_LT(test::relative_error(reference.encoder.query_scale, fd_query), 1e-8);
    EXPECT_LT(test::relative_error(reference.encoder.key_scale, fd_key), 1e-8);
    EXPECT_EQ(streamed.encoder.query_scale, two_threads.encoder.query_scale);
    EXPECT_EQ(streamed.encoder.key_scale, two_threads.encoder.key_scale);
  }
}

/// The hooks on their own: L = Σ W ∘ φ(x) (and, for Favor's key exponentials, + Σ w ∘ m) by
/// central differences.
TEST(LinearAttentionBackward, FeatureMapHooksMatchFiniteDifferences) {
  auto rng = test::make_rng(1604);
  const Index rows = 5, D = 4;
  const Matrix<double> x = test::random_heads<double>(1, rows, D, rng).head(0);
  const auto check = [&](const auto& map, const char* name) {
    const Index F = static_cast<Index>(map.feature_dim(D));
    const Matrix<double> weights = test::random_heads<double>(1, rows, F, rng).head(0);
    const auto loss = [&](const Matrix<double>& at) {
      Matrix<double> out(rows, F);
      map.features(at, out);
      return out.cwiseProduct(weights).sum();
    };
    Matrix<double> dx(rows, D);
    map.features_backward(x, weights, dx);
    Matrix<double> fd(rows, D);
    for (Index i = 0; i < x.size(); ++i) {
      Matrix<double> at = x;
      at.data()[i] += 1e-6;
      const double plus = loss(at);
      at.data()[i] -= 2e-6;
      fd.data()[i] = (plus - loss(at)) / 2e-6;
    }
    EXPECT_LT(test::relative_error(dx, fd), 1e-8) << name;
  };
  check(EluPlusOne{}, "elu+1");
  check(ReluPlusEpsilon{0.1}, "relu+eps");
  check(SoftplusPair{}, "softplus pair");
  const Favor<double> favor(D, 7, 24, {.stabilizer = 0.2});
  check(favor, "favor features");
  // key_exponentials_backward, given ∂L/∂E and ∂L/∂m.
  const Matrix<double> de = test::random_heads<double>(1, rows, 7, rng).head(0);
  const Vector<double> dm = test::random_heads<double>(1, rows, 1, rng).head(0).col(0);
  const auto loss = [&](const Matrix<double>& at) {
    Matrix<double> e(rows, 7);
    Vector<double> m(rows);
    favor.key_exponentials(at, e, m);
    return e.cwiseProduct(de).sum() + m.dot(dm);
  };
  Matrix<double> dx(rows, D);
  favor.key_exponentials_backward(x, de, dm, dx);
  Matrix<double> fd(rows, D);
  for (Index i = 0; i < x.size(); ++i) {
    Matrix<double> at = x;
    at.data()[i] += 1e-6;
    const double plus = loss(at);
    at.data()[i] -= 2e-6;
    fd.data()[i] = (plus - loss(at)) / 2e-6;
  }
  EXPECT_LT(test::relative_error(dx, fd), 1e-8) << "favor key exponentials";
}

// --- streaming == reference -------------------------------------------------------------------

/// Streaming backward == reference backward on random problems: causal and not, odd sizes,
/// grouped-query heads, chunk sizes with remainders, first positions; the same bits on one and
/// two threads.
template <class Scalar, class Map, class MakeMap>
void expect_linear_streaming_matches_reference(MakeMap&& make_map, std::uint64_t salt,
                                               const std::string& label) {
  auto rng = test::make_rng(salt);
  std::uniform_int_distribution<Index> size(1, 40);
  const double eps = std::numeric_limits<Scalar>::epsilon();
  const std::array<std::array<Index, 2>, 4> head_shapes{{{1, 1}, {2, 1}, {4, 2}, {3, 3}}};
  for (int trial = 0; trial < 12; ++trial) {
    const bool causal = trial % 2 == 0;
    const auto [H, Hkv] = head_shapes[static_cast<std::size_t>(trial % 4)];
    const Index N = size(rng), M = causal ? N : size(rng), D = 1 + trial % 6,
                Dv = 1 + size(rng) % 5;
    const Map map = make_map(D);
    const auto q = test::random_heads<Scalar>(H, N, D, rng);
    const auto k = test::random_heads<Scalar>(Hkv, M, D, rng);
    const auto v = test::random_heads<Scalar>(Hkv, M, Dv, rng);
    const auto dout = test::random_heads<Scalar>(H, N, Dv, rng);
    LinearAttentionOptions options{.causal = causal,
                                   .first_position = trial - 4,
                                   .chunk = trial % 5 == 4 ? 64 : 1 + trial % 7};
    const auto reference =
        linear_attention_backward_reference(q, k, v, map, NoPositionalEncoding{}, dout, options);
    std::array<LinearAttentionGradients<Scalar, NoPositionalEncoding>, 2> streamed;
    for (const int threads : {1, 2}) {
      options.threads = threads;
      streamed[static_cast<std::size_t>(threads - 1)] =
          linear_attention_backward(q, k, v, map, dout, options);
    }
    const std::string where = label + " trial " + std::to_string(trial) + " N " +
                              std::to_string(N) + " M " + std::to_string(M) + " chunk " +
                              std::to_string(options.chunk);
    const double tolerance = 64 * eps * static_cast<double>(M + 2 * D + Dv + 4);
    const auto& s = streamed[0];
    EXPECT_LT(test::relative_error(s.dq.flat(), reference.dq.flat()), tolerance) << where << " dq";
    EXPECT_LT(test::relative_error(s.dk.flat(), reference.dk.flat()), tolerance) << where << " dk";
    EXPECT_LT(test::relative_error(s.dv.flat(), reference.dv.flat()), tolerance) << where << " dv";
    EXPECT_EQ(s.dq.flat(), streamed[1].dq.flat()) << where << ": threads change dq";
    EXPECT_EQ(s.dk.flat(), streamed[1].dk.flat()) << where << ": threads change dk";
    EXPECT_EQ(s.dv.flat(), streamed[1].dv.flat()) << where << ": threads change dv";
  }
}

TEST(LinearAttentionBackward, StreamingMatchesReference) {
  const auto elu = [](Index) { return EluPlusOne{}; };
  const auto relu = [](Index) { return ReluPlusEpsilon{1e-3}; };
  expect_linear_streaming_matches_reference<double, EluPlusOne>(elu, 1610, "elu+1 double");
  expect_linear_streaming_matches_reference<float, EluPlusOne>(elu, 1611, "elu+1 float");
  expect_linear_streaming_matches_reference<double, ReluPlusEpsilon>(relu, 1612, "relu double");
  expect_linear_streaming_matches_reference<double, Favor<double>>(
      [](Index d) { return Favor<double>(d, d + 3, 25, {.stabilizer = 1e-2}); }, 1613,
      "favor double");
  expect_linear_streaming_matches_reference<float, Favor<float>>(
      [](Index d) { return Favor<float>(d, 2 * d, 26); }, 1614, "favor float");
  expect_linear_streaming_matches_reference<double, SoftplusPair>(
      [](Index) { return SoftplusPair{}; }, 1615, "user map double");
}

TEST(LinearAttentionBackward, RopeStreamingMatchesReference) {
  auto rng = test::make_rng(1616);
  const Index H = 4, Hkv = 2, N = 23, M = 17, D = 8, Dv = 5;
  for (const bool causal : {true, false}) {
    const Index keys = causal ? N : M;
    const auto q = test::random_heads<float>(H, N, D, rng);
    const auto k = test::random_heads<float>(Hkv, keys, D, rng);
    const auto v = test::random_heads<float>(Hkv, keys, Dv, rng);
    const auto dout = test::random_heads<float>(H, N, Dv, rng);
    const RotaryEncoding<float> rope(D);
    LinearAttentionOptions options{.causal = causal, .first_position = 100, .chunk = 5};
    const auto reference =
        linear_attention_backward_reference(q, k, v, EluPlusOne{}, rope, dout, options);
    const auto streamed = linear_attention_backward(q, k, v, EluPlusOne{}, rope, dout, options);
    EXPECT_LT(test::relative_error(streamed.dq.flat(), reference.dq.flat()), 1e-5);
    EXPECT_LT(test::relative_error(streamed.dk.flat(), reference.dk.flat()), 1e-5);
    EXPECT_LT(test::relative_error(streamed.dv.flat(), reference.dv.flat()), 1e-5);
  }
}

// --- input policies ---------------------------------------------------------------------------

/// Row r of x is finite.
template <class T>
std::vector<bool> linear_finite_rows(const Heads<T>& x, Index h) {
  std::vector<bool> rows(static_cast<std::size_t>(x.rows()));
  for (Index r = 0; r < x.rows(); ++r) {
    rows[static_cast<std::size_t>(r)] = x.head(h).row(r).allFinite();
  }
  return rows;
}

TEST(LinearAttentionBackward, NanPropagatesCausallyAsInTheForward) {
  auto rng = test::make_rng(1617);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const auto q = test::random_heads<double>(2, 40, 8, rng);
  auto k = test::random_heads<double>(2, 40, 8, rng);
  auto v = test::random_heads<double>(2, 40, 8, rng);
  const auto dout = test::random_heads<double>(2, 40, 8, rng);
  k.head(0)(17, 2) = nan;
  v.head(1)(25, 0) = nan;
  const auto check = [&](const auto& map, const char* name) {
    const auto reference =
        linear_attention_backward_reference(q, k, v, map, NoPositionalEncoding{}, dout, {});
    for (const Index chunk : {Index(1), Index(8), Index(64)}) {
      const auto streamed = linear_attention_backward(q, k, v, map, dout, {.chunk = chunk});
      const std::string where = std::string(name) + " chunk " + std::to_string(chunk);
      // The same non-finite entries as the reference (which combines allowed pairs only), and
      // the same finite values.
      EXPECT_LE(test::finite_part_error(streamed.dq.flat(), reference.dq.flat()), 1e-12) << where;
      EXPECT_LE(test::finite_part_error(streamed.dk.flat(), reference.dk.flat()), 1e-12) << where;
      EXPECT_LE(test::finite_part_error(streamed.dv.flat(), reference.dv.flat()), 1e-12) << where;
      // dq_i is non-finite exactly where out_i is: rows i >= 17 (head 0), i >= 25 (head 1).
      const Heads<double> out = linear_attention(q, k, v, map, {.chunk = chunk});
      for (Index h = 0; h < 2; ++h) {
        EXPECT_EQ(linear_finite_rows(streamed.dq, h), linear_finite_rows(out, h)) << where;
        for (Index r = 0; r < 40; ++r) {
          EXPECT_EQ(out.head(h).row(r).allFinite(), r < (h == 0 ? 17 : 25)) << where;
        }
      }
      // A NaN value leaves dv finite (dv_j = Σ_i w_ij dO_i / den_i reads no value) but reaches
      // dk of every key through the rows after it (autograd gives the same).
      EXPECT_TRUE(streamed.dv.head(1).allFinite()) << where;
      EXPECT_FALSE(streamed.dk.head(1).row(0).allFinite()) << where;
    }
  };
  check(EluPlusOne{}, "elu+1");
  check(Favor<double>(8, 12, 27, {.stabilizer = 1e-3}), "favor");
}

TEST(LinearAttentionBackward, ZeroRowsHaveZeroGradients) {
  Heads<double> q(1, 5, 3), k(1, 5, 3), v(1, 5, 2), dout(1, 5, 2);
  q.flat().setConstant(-1.0);
  k.flat().setConstant(-2.0);
  v.flat().setConstant(3.0);
  dout.flat().setConstant(1.0);
  for (const bool causal : {true, false}) {
    const auto grads = linear_attention_backward(q, k, v, ReluPlusEpsilon{0.0}, dout,
                                                 {.causal = causal, .chunk = 2});
    EXPECT_EQ(grads.dq.flat().cwiseAbs().maxCoeff(), 0.0);
    EXPECT_EQ(grads.dk.flat().cwiseAbs().maxCoeff(), 0.0);
    EXPECT_EQ(grads.dv.flat().cwiseAbs().maxCoeff(), 0.0);
  }
  // No keys (non-causal, M = 0): zero dq, empty dk and dv.
  const auto none = linear_attention_backward(q, Heads<double>(1, 0, 3), Heads<double>(1, 0, 2),
                                              EluPlusOne{}, dout, {.causal = false});
  EXPECT_EQ(none.dq.flat().cwiseAbs().maxCoeff(), 0.0);
  EXPECT_EQ(none.dk.rows(), 0);
}

TEST(LinearAttentionBackward, BadInputIsRejected) {
  Heads<double> q(2, 5, 4), k(2, 5, 4), v(2, 5, 3), dout(2, 5, 3);
  POSENC_EXPECT_INVALID(linear_attention_backward(q, k, v, EluPlusOne{}, Heads<double>(2, 5, 4)),
                        "posenc::linear_attention_backward",
                        "dout has shape [2, 5, 4] but must be [2, 5, 3]");
  POSENC_EXPECT_INVALID(linear_attention_backward_reference(
                            q, k, v, EluPlusOne{}, NoPositionalEncoding{}, Heads<double>(1, 5, 3)),
                        "posenc::linear_attention_backward_reference", "dout has shape [1, 5, 3]");
  POSENC_EXPECT_INVALID(linear_attention_backward(q, k, v, EluPlusOne{}, dout, {.chunk = 0}),
                        "posenc::linear_attention_backward", "chunk must be >= 1, got 0");
  POSENC_EXPECT_INVALID(linear_attention_backward(q, k, v, Favor<double>(8, 16, 1), dout),
                        "the Favor projection has width 8");
}

}  // namespace
}  // namespace posenc
