// SPDX-License-Identifier: MIT
// attention_backward: the forward's log-sum-exp, the streaming backward against PyTorch autograd
// (golden grad_*.json, float64, 1e-10 relative per element), against central finite differences,
// and against the materialising reference over masks, offsets, explicit positions, segments,
// grouped-query attention, block sizes and threads.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "posenc/attention_backward.hpp"
#include "posenc/posenc.hpp"
#include "support/backward_trials.hpp"
#include "support/golden.hpp"
#include "support/gradient_golden.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

using test::check_golden_case;
using test::elementwise_error;
using test::golden_mask;
using test::gradient_golden_tolerance;
using test::random_heads;

TEST(AttentionBackwardGolden, AlibiMatchesAutograd) {
  const auto golden = test::load_golden("grad_alibi.json");
  for (const auto& c : golden.at("cases")) {
    const auto& config = c.at("config");
    const auto slopes = test::to_vector(c.at("inputs").at("slopes"));
    const BiasForm form =
        config.at("form").get<std::string>() == "causal" ? BiasForm::causal : BiasForm::symmetric;
    check_golden_case(c, Alibi<double>(slopes, form), c.at("key").get<std::string>());
  }
}

TEST(AttentionBackwardGolden, RopeMatchesAutograd) {
  const auto golden = test::load_golden("grad_rope.json");
  for (const auto& c : golden.at("cases")) {
    const auto& config = c.at("config");
    const RotaryPairing pairing = config.at("pairing").get<std::string>() == "half"
                                      ? RotaryPairing::half
                                      : RotaryPairing::interleaved;
    check_golden_case(c, RotaryEncoding<double>(config.at("D").get<Index>(), {.pairing = pairing}),
                      c.at("key").get<std::string>());
  }
}

TEST(AttentionBackwardGolden, XPosMatchesAutograd) {
  const auto golden = test::load_golden("grad_xpos.json");
  for (const auto& c : golden.at("cases")) {
    const auto& config = c.at("config");
    const Index D = config.at("D").get<Index>();
    // The golden centres at ceil(M/2); the gradients do not depend on the centre, so both the
    // tile centring (the default) and the golden's fixed centre must reproduce them.
    check_golden_case(
        c, XPosEncoding<double>(D, {.scale_base = config.at("scale_base").get<double>()}),
        c.at("key").get<std::string>() + " (tile centre)");
    check_golden_case(c,
                      XPosEncoding<double>(
                          D, {.scale_base = config.at("scale_base").get<double>(),
                              .centring = XPosCentring::fixed(config.at("centre").get<Index>())}),
                      c.at("key").get<std::string>() + " (fixed centre)");
  }
}

/// Checks every parameter gradient `names` (golden key "d_<name>") of both backwards.
template <class Encoder, class Members>
void expect_parameter_gradients(const test::GoldenGradients<Encoder>& both, const test::Json& c,
                                const Members& members) {
  for (const auto* grads : {&both.streamed, &both.reference}) {
    for (const auto& [name, value] : members(grads->encoder)) {
      const Vector<double> want = test::flatten(c.at("outputs").at("d_" + name));
      ASSERT_EQ(value.size(), want.size()) << name;
      // Relative per element with the default floor, i.e. at least 1e-13 absolute: where a
      // gradient is mathematically 0 the golden holds rounding noise (FIRE's b2: every row of dS
      // sums to 0, |golden| ~ 1e-17).
      EXPECT_LT(elementwise_error(value, want), gradient_golden_tolerance)
          << c.at("key").get<std::string>() << " d_" << name
          << (grads == &both.streamed ? " (streaming)" : " (reference)");
    }
  }
}

TEST(AttentionBackwardGolden, KerpleMatchesAutograd) {
  const auto golden = test::load_golden("grad_kerple.json");
  for (const auto& c : golden.at("cases")) {
    const auto& config = c.at("config");
    const Kerple<double> kerple(
        config.at("variant").get<std::string>() == "log" ? KerpleKernel::log : KerpleKernel::power,
        test::to_vector(c.at("inputs").at("r1")), test::to_vector(c.at("inputs").at("r2")),
        config.at("form").get<std::string>() == "causal" ? BiasForm::causal : BiasForm::symmetric);
    expect_parameter_gradients(
        check_golden_case(c, kerple, c.at("key").get<std::string>()), c,
        [](const Kerple<double>::Gradient& g) {
          return std::vector<std::pair<std::string, Vector<double>>>{{"r1", g.r1}, {"r2", g.r2}};
        });
  }
}

TEST(AttentionBackwardGolden, T5MatchesAutograd) {
  const auto golden = test::load_golden("grad_t5.json");
  for (const auto& c : golden.at("cases")) {
    const auto& config = c.at("config");
    const T5BucketOptions options{config.at("num_buckets").get<Index>(),
                                  config.at("max_distance").get<Index>(),
                                  config.at("bidirectional").get<bool>()};
    const T5RelativeBias<double> t5(test::to_matrix(c.at("inputs").at("table")), options);
    expect_parameter_gradients(check_golden_case(c, t5, c.at("key").get<std::string>()), c,
                               [](const T5RelativeBias<double>::Gradient& g) {
                                 return std::vector<std::pair<std::string, Vector<double>>>{
                                     {"table", g.table.reshaped<Eigen::RowMajor>()}};
                               });
  }
}

TEST(AttentionBackwardGolden, FireMatchesAutograd) {
  const auto golden = test::load_golden("grad_fire.json");
  for (const auto& c : golden.at("cases")) {
    const auto& f = c.at("config").at("fire");
    const auto& in = c.at("inputs");
    FireOptions options;
    options.c = test::number(in.at("fire_c"));
    options.threshold = f.at("L0").get<double>();
    options.threshold_multiplier = test::number(in.at("fire_L_multiplier"));
    options.eps = f.at("eps").get<double>();
    options.activation = f.at("activation").get<std::string>() == "relu"
                             ? FireActivation::relu
                             : FireActivation::leaky_relu;
    options.form =
        f.at("form").get<std::string>() == "causal" ? BiasForm::causal : BiasForm::symmetric;
    const Fire<double> fire(test::to_matrix(in.at("fire_W1")), test::to_vector(in.at("fire_b1")),
                            test::to_matrix(in.at("fire_W2")), test::to_vector(in.at("fire_b2")),
                            options);
    expect_parameter_gradients(
        check_golden_case(c, fire, c.at("key").get<std::string>()), c,
        [](const Fire<double>::Gradient& g) {
          return std::vector<std::pair<std::string, Vector<double>>>{
              {"fire_W1", g.w1.reshaped<Eigen::RowMajor>()},
              {"fire_b1", g.b1},
              {"fire_W2", g.w2.reshaped<Eigen::RowMajor>()},
              {"fire_b2", g.b2},
              {"fire_c", Vector<double>::Constant(1, g.c)},
              {"fire_L_multiplier", Vector<double>::Constant(1, g.threshold_multiplier)}};
        });
  }
}

TEST(AttentionBackwardGolden, ShawMatchesAutograd) {
  const auto golden = test::load_golden("grad_shaw.json");
  for (const auto& c : golden.at("cases")) {
    const auto& config = c.at("config");
    const auto& inputs = c.at("inputs");
    const auto& outputs = c.at("outputs");
    const Index k = config.at("max_relative_position").get<Index>();
    const bool values = inputs.contains("aV");
    const ShawRelative<double> shaw =
        values ? ShawRelative<double>(k, test::to_matrix(inputs.at("aK")),
                                      test::to_matrix(inputs.at("aV")))
               : ShawRelative<double>(k, test::to_matrix(inputs.at("aK")));
    const std::string label = c.at("key").get<std::string>();
    const auto both = check_golden_case(c, shaw, label);
    for (const auto* grads : {&both.streamed, &both.reference}) {
      EXPECT_LT(elementwise_error(grads->encoder.key_table, test::to_matrix(outputs.at("d_aK"))),
                gradient_golden_tolerance)
          << label << " d_aK";
      if (values) {
        EXPECT_LT(
            elementwise_error(grads->encoder.value_table, test::to_matrix(outputs.at("d_aV"))),
            gradient_golden_tolerance)
            << label << " d_aV";
      }
    }
  }
}

/// q = split_heads(x + PE(positions from first_position)) for x [rows, H·D]: [H, rows, D].
template <class Encoding>
Heads<double> embed(const Matrix<double>& x, const Encoding& pe, Index first_position, Index H) {
  Matrix<double> sum = x;
  pe.add_to(sum, first_position);
  const auto view = HeadsView<const double>::tokens_major(sum.data(), x.rows(), H, x.cols() / H);
  Heads<double> heads(H, x.rows(), x.cols() / H);
  for (Index h = 0; h < H; ++h) heads.head(h) = view.head(h);
  return heads;
}

/// [rows, H·D] with the heads of g merged back (the inverse of embed's split).
Matrix<double> merge_heads(const Heads<double>& g) {
  Matrix<double> merged(g.rows(), g.heads() * g.dim());
  for (Index h = 0; h < g.heads(); ++h) merged.middleCols(h * g.dim(), g.dim()) = g.head(h);
  return merged;
}

// Absolute encodings act before attention: the gradient of x passes through the addition, and a
// learned table gathers it by position (LearnedAbsoluteEncoding::accumulate_gradient).
TEST(AttentionBackwardGolden, AbsoluteEncodingsMatchAutograd) {
  const auto golden = test::load_golden("grad_absolute.json");
  for (const auto& c : golden.at("cases")) {
    const auto& config = c.at("config");
    const auto& inputs = c.at("inputs");
    const auto& outputs = c.at("outputs");
    const std::string label = c.at("key").get<std::string>();
    const Index H = config.at("H").get<Index>();
    const Index offset = config.at("query_offset").get<Index>();
    const AttentionOptions options{.mask = golden_mask(config),
                                   .query_offset = offset,
                                   .scale = config.at("scale").get<double>()};
    const Matrix<double> x_q = test::to_matrix(inputs.at("x_q"));
    const Matrix<double> x_k = test::to_matrix(inputs.at("x_k"));
    const Heads<double> v = test::to_heads(inputs.at("v"));
    const Heads<double> dout = test::to_heads(inputs.at("dO"));
    const auto run = [&](const auto& pe) {
      const Heads<double> q = embed(x_q, pe, offset, H);
      const Heads<double> k = embed(x_k, pe, 0, H);
      const AttentionForward<double> forward = attention_forward(q, k, v, options);
      EXPECT_LT(elementwise_error(forward.out.flat(), test::to_heads(outputs.at("out")).flat()),
                gradient_golden_tolerance)
          << label;
      const auto grads = attention_backward(q, k, v, NoPositionalEncoding{}, forward.out,
                                            forward.lse, dout, options);
      const Matrix<double> dx_q = merge_heads(grads.dq);
      const Matrix<double> dx_k = merge_heads(grads.dk);
      EXPECT_LT(elementwise_error(dx_q, test::to_matrix(outputs.at("d_x_q"))),
                gradient_golden_tolerance)
          << label << " d_x_q";
      EXPECT_LT(elementwise_error(dx_k, test::to_matrix(outputs.at("d_x_k"))),
                gradient_golden_tolerance)
          << label << " d_x_k";
      EXPECT_LT(elementwise_error(grads.dv.flat(), test::to_heads(outputs.at("dv")).flat()),
                gradient_golden_tolerance)
          << label << " d_v";
      return std::pair{dx_q, dx_k};
    };
    if (config.at("encoding").get<std::string>() == "learned") {
      const LearnedAbsoluteEncoding<double> table(test::to_matrix(inputs.at("table")));
      const auto [dx_q, dx_k] = run(table);
      auto gradient = table.zero_gradient();
      table.accumulate_gradient(dx_q, offset, gradient);
      table.accumulate_gradient(dx_k, 0, gradient);
      EXPECT_LT(elementwise_error(gradient.table, test::to_matrix(outputs.at("d_table"))),
                gradient_golden_tolerance)
          << label << " d_table";
    } else {
      const SinusoidalLayout layout = config.at("layout").get<std::string>() == "interleaved"
                                          ? SinusoidalLayout::interleaved
                                          : SinusoidalLayout::concatenated;
      run(SinusoidalEncoding<double>(x_q.cols(), {.layout = layout}));
    }
  }
}

TEST(AttentionBackward, LseIsTheLogSumExpOfTheFinalLogits) {
  auto rng = test::make_rng(1501);
  const Index H = 3, N = 37, M = 53, D = 8;
  const auto q = random_heads<double>(H, N, D, rng);
  const auto k = random_heads<double>(H, M, D, rng);
  const auto v = random_heads<double>(H, M, D, rng);
  const Alibi<double> alibi(H);
  const AttentionOptions options{.mask = Mask::sliding_window(9), .query_offset = -3};
  const AttentionForward<double> forward = attention_forward(q, k, v, alibi, options);
  const AttentionMap<double> scores = attention_scores(q, k, alibi, options);
  for (Index h = 0; h < H; ++h) {
    for (Index r = 0; r < N; ++r) {
      const auto row = scores.head(h).row(r);
      const double m = row.maxCoeff();
      if (m == -std::numeric_limits<double>::infinity()) {
        EXPECT_EQ(forward.lse(h, r), m) << "row with no allowed key";
        continue;
      }
      const double expected = m + std::log((row.array() - m).exp().sum());
      EXPECT_NEAR(forward.lse(h, r), expected, 1e-13 * std::max(1.0, std::abs(expected)));
    }
  }
  // The first rows sit before every key (offset −3): no allowed key, lse −inf, out 0.
  EXPECT_EQ(forward.lse(0, 0), -std::numeric_limits<double>::infinity());
  EXPECT_EQ(forward.out.head(0).row(0).norm(), 0.0);
}

/// L(q, k, v) = Σ dout ∘ attention(q, k, v).
template <class Encoder>
double loss(const Heads<double>& q, const Heads<double>& k, const Heads<double>& v,
            const Encoder& encoder, const Heads<double>& dout, const AttentionOptions& options) {
  return attention_reference(q, k, v, encoder, options).flat().dot(dout.flat());
}

/// Central differences of `loss` along every element of `x` (a copy of q, k or v in `inputs`).
template <class Encoder>
Heads<double> finite_difference(std::array<Heads<double>, 3> inputs, int which,
                                const Encoder& encoder, const Heads<double>& dout,
                                const AttentionOptions& options) {
  Heads<double> grad(inputs[which].heads(), inputs[which].rows(), inputs[which].dim());
  const double step = 1e-5;
  for (Index i = 0; i < grad.flat().size(); ++i) {
    double& x = inputs[which].flat()[i];
    const double saved = x;
    x = saved + step;
    const double plus = loss(inputs[0], inputs[1], inputs[2], encoder, dout, options);
    x = saved - step;
    const double minus = loss(inputs[0], inputs[1], inputs[2], encoder, dout, options);
    x = saved;
    grad.flat()[i] = (plus - minus) / (2 * step);
  }
  return grad;
}

TEST(AttentionBackward, MatchesFiniteDifferencesWithGroupsSegmentsAndPositions) {
  auto rng = test::make_rng(1502);
  const Index H = 4, Hkv = 2, N = 7, M = 11, D = 5, Dv = 3;
  const auto q = random_heads<double>(H, N, D, rng);
  const auto k = random_heads<double>(Hkv, M, D, rng);
  const auto v = random_heads<double>(Hkv, M, Dv, rng);
  const auto dout = random_heads<double>(H, N, Dv, rng);
  const std::vector<Index> qseg{0, 0, 1, 1, 1, 2, 2};
  const std::vector<Index> kseg{0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2};
  const std::vector<Index> kpos{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10};
  const std::vector<AttentionOptions> cases{
      {.mask = Mask::causal(), .query_offset = M - N},
      {.mask = Mask::none(), .query_segments = qseg, .key_segments = kseg},
      {.mask = Mask::sliding_window(3), .query_offset = 5, .key_positions = kpos},
  };
  const Alibi<double> alibi(H);
  for (std::size_t i = 0; i < cases.size(); ++i) {
    AttentionOptions options = cases[i];
    options.query_block = 3;  // several tiles, partial ones included
    options.key_block = 4;
    const AttentionForward<double> forward = attention_forward(q, k, v, alibi, options);
    const auto grads = attention_backward(q, k, v, alibi, forward.out, forward.lse, dout, options);
    const Heads<double>* analytic[] = {&grads.dq, &grads.dk, &grads.dv};
    for (int which = 0; which < 3; ++which) {
      const Heads<double> fd = finite_difference({q, k, v}, which, alibi, dout, options);
      EXPECT_LT(test::relative_error(analytic[which]->flat(), fd.flat()), 1e-8)
          << "case " << i << " input " << which;
    }
  }
}

/// Streaming backward == reference backward on random problems: every mask, offsets, explicit
/// (unsorted) key positions, segments, grouped-query heads, odd sizes, tile sizes with
/// remainders; the same bits for one and two threads.
template <class Scalar, class Encoder>
void expect_streaming_matches_reference(const Encoder& encoder, Index H, Index Hkv, Index D,
                                        std::uint64_t salt, const std::string& label,
                                        Index value_dim = 0 /* 0: random */) {
  const double eps = std::numeric_limits<Scalar>::epsilon();
  test::for_each_backward_trial<Scalar>(
      {.heads = H,
       .kv_heads = Hkv,
       .dim = D,
       .trials = 12,
       .salt = salt,
       .max_rows = 40,
       .value_dim = value_dim},
      label, [&](const test::BackwardTrial<Scalar>& t) {
        const auto reference =
            attention_backward_reference(t.q, t.k, t.v, encoder, t.dout, t.options);
        // Both sides accumulate O(M + D) rounded terms per element.
        test::expect_backward_close_and_deterministic(
            test::backward_on_one_and_two_threads(t, encoder), reference,
            64 * eps * static_cast<double>(t.keys + D + t.value_dim), t.where);
      });
}

TEST(AttentionBackward, StreamingMatchesReference) {
  expect_streaming_matches_reference<double>(NoPositionalEncoding{}, 4, 2, 5, 1510, "NoPE double");
  expect_streaming_matches_reference<float>(NoPositionalEncoding{}, 3, 3, 7, 1511, "NoPE float");
  expect_streaming_matches_reference<double>(Alibi<double>(4), 4, 1, 3, 1512, "ALiBi double");
  expect_streaming_matches_reference<float>(Alibi<float>(2), 2, 2, 9, 1513, "ALiBi float");
  expect_streaming_matches_reference<double>(RotaryEncoding<double>(6), 2, 1, 6, 1514,
                                             "RoPE double");
  expect_streaming_matches_reference<float>(
      RotaryEncoding<float>(8, {.pairing = RotaryPairing::interleaved}), 4, 2, 8, 1515,
      "RoPE float");
  expect_streaming_matches_reference<double>(XPosEncoding<double>(4), 2, 2, 4, 1516, "XPos double");
  auto rng = test::make_rng(1517);
  expect_streaming_matches_reference<double>(
      ShawRelative<double>::random(3, 5, 0, ShawValues::tied, rng), 2, 1, 5, 1518, "Shaw tied", 5);
  expect_streaming_matches_reference<float>(
      ShawRelative<float>::random(2, 4, 0, ShawValues::none, rng), 2, 2, 4, 1519, "Shaw keys");
  expect_streaming_matches_reference<double>(compose(RotaryEncoding<double>(4), Alibi<double>(2)),
                                             2, 1, 4, 1520, "RoPE + ALiBi");
  expect_streaming_matches_reference<double>(
      compose(ShawRelative<double>::random(2, 6, 3, ShawValues::separate, rng), Alibi<double>(3)),
      3, 3, 6, 1521, "Shaw + ALiBi", 3);
  expect_streaming_matches_reference<double>(
      compose(XPosEncoding<double>(4),
              RotaryEncoding<double>(4, {.base = 500.0, .pairing = RotaryPairing::interleaved})),
      2, 2, 4, 1522, "XPos then RoPE");
}

/// The overload writing into the caller's AttentionGradients gives the returning overload's
/// bits, overwrites dq, dk, dv and adds to the encoder gradient (two calls: twice the gradient).
TEST(AttentionBackward, IntoCallerBuffersOverwritesInputsAndAccumulatesTheEncoder) {
  auto rng = test::make_rng(1530);
  const auto kerple = Kerple<double>::random(KerpleKernel::log, 4, rng);
  const auto q = random_heads<double>(4, 9, 5, rng);
  const auto k = random_heads<double>(2, 11, 5, rng);
  const auto v = random_heads<double>(2, 11, 3, rng);
  const auto dout = random_heads<double>(4, 9, 3, rng);
  const AttentionOptions options{
      .mask = Mask::sliding_window(6), .query_offset = 2, .query_block = 4, .key_block = 3};
  const AttentionForward<double> forward = attention_forward(q, k, v, kerple, options);
  const auto want = attention_backward(q, k, v, kerple, forward.out, forward.lse, dout, options);
  AttentionGradients<double, Kerple<double>> grads{Heads<double>(4, 9, 5), Heads<double>(2, 11, 5),
                                                   Heads<double>(2, 11, 3), kerple.zero_gradient()};
  grads.dq.flat().setConstant(7.0);  // overwritten, not added to
  for (int call = 1; call <= 2; ++call) {
    attention_backward(q, k, v, kerple, forward.out, forward.lse, dout, grads, options);
    EXPECT_EQ(grads.dq.flat(), want.dq.flat());
    EXPECT_EQ(grads.dk.flat(), want.dk.flat());
    EXPECT_EQ(grads.dv.flat(), want.dv.flat());
    EXPECT_LE((grads.encoder.r1 - call * want.encoder.r1).cwiseAbs().maxCoeff(),
              1e-15 * want.encoder.r1.cwiseAbs().maxCoeff())
        << "call " << call;
    EXPECT_LE((grads.encoder.r2 - call * want.encoder.r2).cwiseAbs().maxCoeff(),
              1e-15 * want.encoder.r2.cwiseAbs().maxCoeff())
        << "call " << call;
  }
  grads.encoder.set_zero();
  EXPECT_EQ(grads.encoder.r1.cwiseAbs().maxCoeff(), 0.0);
}

TEST(AttentionBackward, IntoCallerBuffersRejectsWrongShapesAndAliasing) {
  auto rng = test::make_rng(1531);
  const auto q = random_heads<double>(2, 6, 4, rng);
  const auto k = random_heads<double>(2, 6, 4, rng);
  const auto v = random_heads<double>(2, 6, 4, rng);
  const auto dout = random_heads<double>(2, 6, 4, rng);
  const AttentionForward<double> forward = attention_forward(q, k, v);
  using Grads = AttentionGradients<double, NoPositionalEncoding>;
  Grads wrong{Heads<double>(2, 5, 4), Heads<double>(2, 6, 4), Heads<double>(2, 6, 4), {}};
  POSENC_EXPECT_INVALID(
      attention_backward(q, k, v, NoPositionalEncoding{}, forward.out, forward.lse, dout, wrong),
      "posenc::attention_backward", "grads.dq has shape [2, 5, 4]", "[2, 6, 4]", "shape of q");
  Grads grads{Heads<double>(2, 6, 4), Heads<double>(2, 6, 4), Heads<double>(2, 6, 4), {}};
  // q read through a view of grads.dq's storage: dq would overwrite it while it is read.
  grads.dq.flat() = q.flat();
  POSENC_EXPECT_INVALID(attention_backward(grads.dq.view(), k, v, NoPositionalEncoding{},
                                           forward.out, forward.lse, dout, grads),
                        "posenc::attention_backward", "grads.dq shares memory with q");
}

}  // namespace
}  // namespace posenc
