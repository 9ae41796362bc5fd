// SPDX-License-Identifier: MIT
// Training sineSPE and convSPE: the backward of their QueryKeyTransform (dq, dk and the gradients
// of the frequencies, offsets, gains, filters and gate) against PyTorch autograd (golden
// grad_spe_*.json, float64, 1e-10 relative per element), against central finite differences
// (per tile and through attention), and streaming against the reference backward.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "posenc/attention.hpp"
#include "posenc/attention_backward.hpp"
#include "posenc/encoders/conv_spe.hpp"
#include "posenc/encoders/sine_spe.hpp"
#include "posenc/encoders/spe_gate.hpp"
#include "support/backward_trials.hpp"
#include "support/golden.hpp"
#include "support/gradient_golden.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

using test::Json;

/// max over elements of |a − b| / max(|b|, floor·max|b|): relative per element, with an absolute
/// floor (relative to the largest golden entry) for entries that are exactly or nearly zero.
template <class A, class B>
double spe_grad_error(const A& a, const B& b, double floor = 1e-3) {
  EXPECT_EQ(a.size(), b.size());
  if (a.size() != b.size()) return 1.0;
  double largest = 0.0;
  for (Index i = 0; i < b.size(); ++i) {
    largest = std::max(largest, std::abs(static_cast<double>(b.data()[i])));
  }
  double worst = 0.0;
  for (Index i = 0; i < a.size(); ++i) {
    const double x = static_cast<double>(a.data()[i]);
    const double y = static_cast<double>(b.data()[i]);
    const double error = std::abs(x - y) / std::max({std::abs(y), floor * largest, 1e-300});
    if (!(error <= worst)) worst = std::isnan(error) ? 1.0 : error;  // NaN never passes
  }
  return worst;
}

constexpr double spe_golden_tolerance = 1e-10;

/// A golden case's encoder (sine or conv, gated or not) built from its recorded parameters and
/// draws.
SineSpe<double> sine_from_golden(const Json& c) {
  const Json& config = c.at("config");
  const Json& inputs = c.at("inputs");
  SineSpeParameters<double> parameters{test::to_heads(inputs.at("freqs")),
                                       test::to_heads(inputs.at("offsets")),
                                       test::to_heads(inputs.at("gains"))};
  const Index H = parameters.frequencies.heads();
  const Index D = parameters.frequencies.rows();
  const Index K = parameters.frequencies.dim();
  const Index R = config.at("R").get<Index>();
  SineSpeDraw<double> draw{Heads<double>(H, D * 2 * K, R)};
  draw.noise.flat() = test::flatten(inputs.at("z_raw"));  // [H][D][2K][R]
  EXPECT_EQ(draw.noise.flat().size(), test::flatten(inputs.at("z_raw")).size());
  if (!config.at("gated").get<bool>()) return SineSpe<double>(parameters, draw);
  return SineSpe<double>(
      parameters, draw,
      SpeGate<double>(test::to_matrix(inputs.at("gate")), test::to_heads(inputs.at("gate_noise"))));
}

/// torch's [H·D][1][ks] conv weight as [H, D, ks].
Heads<double> spe_conv_weight(const Json& x, Index H, Index D) {
  const Vector<double> values = test::flatten(x);
  Heads<double> w(H, D, values.size() / (H * D));
  w.flat() = values;
  return w;
}

ConvSpe<double> conv_from_golden(const Json& c) {
  const Json& config = c.at("config");
  const Json& inputs = c.at("inputs");
  const Index H = config.at("H").get<Index>();
  const Index D = config.at("D").get<Index>();
  const Index R = config.at("R").get<Index>();
  const auto parameters =
      ConvSpeParameters<double>::from_torch(spe_conv_weight(inputs.at("conv_q_weight"), H, D),
                                            spe_conv_weight(inputs.at("conv_k_weight"), H, D));
  const Vector<double> z = test::flatten(inputs.at("z_raw"));  // [R][H·D][M + 4ks]
  Heads<double> noise(R, H * D, z.size() / (R * H * D));
  noise.flat() = z;
  ConvSpeDraw<double> draw(std::move(noise));
  if (!config.at("gated").get<bool>()) return ConvSpe<double>(parameters, draw);
  return ConvSpe<double>(
      parameters, draw,
      SpeGate<double>(test::to_matrix(inputs.at("gate")), test::to_heads(inputs.at("gate_noise"))));
}

/// The parameter gradients of a run, by golden name (d_<name>), flattened row-major.
std::vector<std::pair<std::string, Vector<double>>> spe_named_gradients(
    const SineSpe<double>::Gradient& g) {
  std::vector<std::pair<std::string, Vector<double>>> named{{"d_freqs", g.frequencies.flat()},
                                                            {"d_offsets", g.offsets.flat()},
                                                            {"d_gains", g.gains.flat()}};
  if (g.gate.size() > 0) {
    named.emplace_back("d_gate", Eigen::Map<const Vector<double>>(g.gate.data(), g.gate.size()));
  }
  return named;
}
std::vector<std::pair<std::string, Vector<double>>> spe_named_gradients(
    const ConvSpe<double>::Gradient& g) {
  // The torch module's conv_q makes K̄ (key_filter) and conv_k makes Q̄ (query_filter).
  std::vector<std::pair<std::string, Vector<double>>> named{
      {"d_conv_q_weight", g.key_filter.flat()}, {"d_conv_k_weight", g.query_filter.flat()}};
  if (g.gate.size() > 0) {
    named.emplace_back("d_gate", Eigen::Map<const Vector<double>>(g.gate.data(), g.gate.size()));
  }
  return named;
}

/// Forward + backward (streaming with the default tiles and with small odd tiles, and the
/// reference) of a golden case against its out, lse, dq, dk, dv and every parameter gradient.
template <class Encoder>
void check_spe_golden_case(const Json& c, const Encoder& encoder) {
  const std::string label = c.at("key").get<std::string>();
  const Json& config = c.at("config");
  const Json& inputs = c.at("inputs");
  const Json& outputs = c.at("outputs");
  const Heads<double> q = test::to_heads(inputs.at("q"));
  const Heads<double> k = test::to_heads(inputs.at("k"));
  const Heads<double> v = test::to_heads(inputs.at("v"));
  const Heads<double> dout = test::to_heads(inputs.at("dO"));
  const AttentionOptions options{.mask = test::golden_mask(config),
                                 .query_offset = config.at("query_offset").get<Index>(),
                                 .scale = config.at("scale").get<double>()};
  AttentionOptions tiled = options;
  tiled.query_block = 2;
  tiled.key_block = 3;
  const AttentionForward<double> forward = attention_forward(q, k, v, encoder, options);
  EXPECT_LT(spe_grad_error(forward.out.flat(), test::to_heads(outputs.at("out")).flat()),
            spe_golden_tolerance)
      << label << " out";
  EXPECT_LT(spe_grad_error(forward.lse, test::to_matrix(outputs.at("lse"))), spe_golden_tolerance)
      << label << " lse";
  const std::array<std::pair<std::string, AttentionGradients<double, Encoder>>, 3> runs{{
      {"streaming", attention_backward(q, k, v, encoder, forward.out, forward.lse, dout, options)},
      {"streaming 2x3 tiles",
       attention_backward(q, k, v, encoder, forward.out, forward.lse, dout, tiled)},
      {"reference", attention_backward_reference(q, k, v, encoder, dout, options)},
  }};
  for (const auto& [how, grads] : runs) {
    const std::string where = label + " (" + how + ") ";
    EXPECT_LT(spe_grad_error(grads.dq.flat(), test::to_heads(outputs.at("dq")).flat()),
              spe_golden_tolerance)
        << where << "dq";
    EXPECT_LT(spe_grad_error(grads.dk.flat(), test::to_heads(outputs.at("dk")).flat()),
              spe_golden_tolerance)
        << where << "dk";
    EXPECT_LT(spe_grad_error(grads.dv.flat(), test::to_heads(outputs.at("dv")).flat()),
              spe_golden_tolerance)
        << where << "dv";
    const auto named = spe_named_gradients(grads.encoder);
    std::size_t learnable = 0;
    for (const auto& name : c.at("learnable")) {
      if (name.get<std::string>() != "q" && name.get<std::string>() != "k") ++learnable;
    }
    EXPECT_EQ(named.size(), learnable) << where << "parameter count";
    for (const auto& [name, gradient] : named) {
      EXPECT_LT(spe_grad_error(gradient, test::flatten(outputs.at(name))), spe_golden_tolerance)
          << where << name;
    }
  }
}

TEST(SpeGradientGolden, SineMatchesAutograd) {
  const Json golden = test::load_golden("grad_spe_sine.json");
  ASSERT_EQ(golden.at("cases").size(), 3u);
  for (const Json& c : golden.at("cases")) check_spe_golden_case(c, sine_from_golden(c));
}

TEST(SpeGradientGolden, ConvMatchesAutograd) {
  const Json golden = test::load_golden("grad_spe_conv.json");
  ASSERT_EQ(golden.at("cases").size(), 3u);
  for (const Json& c : golden.at("cases")) check_spe_golden_case(c, conv_from_golden(c));
}

// ---------------------------------------------------------------------------------------------
// Random problems: the parameters as one flat list, rebuilt into an encoder with the SAME draws.
// ---------------------------------------------------------------------------------------------

/// A family of encoders over a flat parameter vector (every learnable parameter, gate last)
/// whose draws stay fixed, and the flattened gradient in the same order.
template <class Encoder>
struct SpeFamily {
  std::vector<double> theta;
  std::vector<std::string> tensor_names;
  std::vector<Index> tensor_sizes;
  std::function<Encoder(const std::vector<double>&)> build;
  std::function<std::vector<double>(const typename Encoder::Gradient&)> flatten;
};

void spe_append(std::vector<double>& out, const double* data, Index size) {
  out.insert(out.end(), data, data + size);
}

SpeFamily<SineSpe<double>> spe_sine_family(Index H, Index D, Index K, Index R, bool gated,
                                           std::uint64_t seed) {
  const auto initial = SineSpeParameters<double>::initial(H, D, K, seed);
  const SineSpeDraw<double> draw = SineSpeDraw<double>::sample(H, D, K, R, seed + 1);
  auto rng = test::make_rng(seed + 2);
  std::normal_distribution<double> normal;
  Matrix<double> gate(H, D);
  for (Index i = 0; i < gate.size(); ++i) gate.data()[i] = normal(rng);
  const Heads<double> gate_noise = test::random_heads<double>(H, D, R, rng);
  SpeFamily<SineSpe<double>> family;
  const Index n = H * D * K;
  spe_append(family.theta, initial.frequencies.data(), n);
  spe_append(family.theta, initial.offsets.data(), n);
  spe_append(family.theta, initial.gains.data(), n);
  family.tensor_names = {"frequencies", "offsets", "gains"};
  family.tensor_sizes = {n, n, n};
  if (gated) {
    spe_append(family.theta, gate.data(), gate.size());
    family.tensor_names.push_back("gate");
    family.tensor_sizes.push_back(gate.size());
  }
  family.build = [=](const std::vector<double>& theta) {
    SineSpeParameters<double> p{Heads<double>(H, D, K), Heads<double>(H, D, K),
                                Heads<double>(H, D, K)};
    std::copy_n(theta.begin(), n, p.frequencies.data());
    std::copy_n(theta.begin() + n, n, p.offsets.data());
    std::copy_n(theta.begin() + 2 * n, n, p.gains.data());
    if (!gated) return SineSpe<double>(p, draw);
    Matrix<double> g(H, D);
    std::copy_n(theta.begin() + 3 * n, H * D, g.data());
    return SineSpe<double>(p, draw, SpeGate<double>(g, gate_noise));
  };
  family.flatten = [](const SineSpe<double>::Gradient& g) {
    std::vector<double> out;
    spe_append(out, g.frequencies.data(), g.frequencies.flat().size());
    spe_append(out, g.offsets.data(), g.offsets.flat().size());
    spe_append(out, g.gains.data(), g.gains.flat().size());
    spe_append(out, g.gate.data(), g.gate.size());
    return out;
  };
  return family;
}

SpeFamily<ConvSpe<double>> spe_conv_family(Index H, Index D, Index ks, Index R, bool gated,
                                           std::uint64_t seed) {
  auto rng = test::make_rng(seed + 2);
  std::normal_distribution<double> normal;
  // Filters of both signs (the reference's initialisation is non-negative).
  const Heads<double> wq = test::random_heads<double>(H, D, ks, rng);
  const Heads<double> wk = test::random_heads<double>(H, D, ks, rng);
  Matrix<double> gate(H, D);
  for (Index i = 0; i < gate.size(); ++i) gate.data()[i] = normal(rng);
  const Heads<double> gate_noise = test::random_heads<double>(H, D, R, rng);
  const ConvSpeDraw<double> draw = ConvSpeDraw<double>::from_seed(R, H * D, seed + 1);
  SpeFamily<ConvSpe<double>> family;
  const Index n = H * D * ks;
  spe_append(family.theta, wq.data(), n);
  spe_append(family.theta, wk.data(), n);
  family.tensor_names = {"query_filter", "key_filter"};
  family.tensor_sizes = {n, n};
  if (gated) {
    spe_append(family.theta, gate.data(), gate.size());
    family.tensor_names.push_back("gate");
    family.tensor_sizes.push_back(gate.size());
  }
  family.build = [=](const std::vector<double>& theta) {
    ConvSpeParameters<double> p{Heads<double>(H, D, ks), Heads<double>(H, D, ks)};
    std::copy_n(theta.begin(), n, p.query_filter.data());
    std::copy_n(theta.begin() + n, n, p.key_filter.data());
    if (!gated) return ConvSpe<double>(p, draw);
    Matrix<double> g(H, D);
    std::copy_n(theta.begin() + 2 * n, H * D, g.data());
    return ConvSpe<double>(p, draw, SpeGate<double>(g, gate_noise));
  };
  family.flatten = [](const ConvSpe<double>::Gradient& g) {
    std::vector<double> out;
    spe_append(out, g.query_filter.data(), g.query_filter.flat().size());
    spe_append(out, g.key_filter.data(), g.key_filter.flat().size());
    spe_append(out, g.gate.data(), g.gate.size());
    return out;
  };
  return family;
}

/// Central difference of f along theta[i] with step relative_step·max(1, |θ_i|).
template <class F>
double spe_central_difference(const F& f, std::vector<double> theta, std::size_t i,
                              double relative_step = 1e-5) {
  const double step = relative_step * std::max(1.0, std::abs(theta[i]));
  const double saved = theta[i];
  theta[i] = saved + step;
  const double plus = f(theta);
  theta[i] = saved - step;
  const double minus = f(theta);
  return (plus - minus) / (2 * step);
}

/// |analytic − fd| <= 1e-6·(|fd| + scale) for `scale` the size of the tensor's gradient.
void spe_expect_close(double analytic, double fd, double scale, const std::string& what) {
  EXPECT_LE(std::abs(analytic - fd), 1e-6 * (std::abs(fd) + scale))
      << what << ": analytic " << analytic << " finite difference " << fd;
}

/// The per-tile backward of the transform alone, queries and keys: din against the adjoint
/// identity Σ dout∘T(x) = Σ din∘x (T is linear in x), the overload without a gradient gives the
/// same din, and every parameter gradient against central differences of Σ dout∘T(in), for
/// consecutive, scattered (unsorted, repeated) and far positions (where ∂/∂frequencies grows with
/// the position, so that the step must shrink to keep the truncation error of the difference
/// small).
template <class Encoder>
void expect_tile_backward_matches_differences(const SpeFamily<Encoder>& family, Index H, Index D,
                                              Index R, Index first_position, std::uint64_t salt,
                                              const std::string& label) {
  auto rng = test::make_rng(salt);
  const Encoder encoder = family.build(family.theta);
  std::uniform_int_distribution<Index> anywhere(0, 300);
  std::vector<Index> strided{first_position + 24, first_position + 3,  first_position + 9,
                             first_position,      first_position + 6,  first_position + 21,
                             first_position + 12, first_position + 18, first_position + 15};
  const std::array<std::vector<Index>, 4> position_sets{
      test::iota(9, first_position),
      {anywhere(rng), anywhere(rng), 17, 5, anywhere(rng), 17, anywhere(rng)},
      test::iota(5, first_position + 100000),
      strided};
  for (std::size_t set = 0; set < position_sets.size(); ++set) {
    const std::vector<Index>& positions = position_sets[set];
    const auto rows = static_cast<Index>(positions.size());
    for (const bool query : {true, false}) {
      const std::string where =
          label + (query ? " queries" : " keys") + " positions " + std::to_string(set);
      std::vector<Matrix<double>> in, dout;
      for (Index h = 0; h < H; ++h) {
        in.push_back(test::random_heads<double>(1, rows, D, rng).head(0));
        dout.push_back(test::random_heads<double>(1, rows, R, rng).head(0));
      }
      const auto objective = [&](const Encoder& e) {
        double total = 0.0;
        for (Index h = 0; h < H; ++h) {
          Matrix<double> out(rows, R);
          const auto hs = static_cast<std::size_t>(h);
          if (query) {
            e.transform_queries(h, positions, 0, in[hs], out);
          } else {
            e.transform_keys(h, positions, 0, in[hs], out);
          }
          total += (out.array() * dout[hs].array()).sum();
        }
        return total;
      };
      typename Encoder::Gradient gradient = encoder.zero_gradient();
      for (Index h = 0; h < H; ++h) {
        const auto hs = static_cast<std::size_t>(h);
        Matrix<double> din(rows, D), din_plain(rows, D), out(rows, R);
        if (query) {
          encoder.transform_queries_backward(h, positions, 0, in[hs], dout[hs], din, gradient);
          encoder.transform_queries_backward(h, positions, 0, in[hs], dout[hs], din_plain);
          encoder.transform_queries(h, positions, 0, in[hs], out);
        } else {
          encoder.transform_keys_backward(h, positions, 0, in[hs], dout[hs], din, gradient);
          encoder.transform_keys_backward(h, positions, 0, in[hs], dout[hs], din_plain);
          encoder.transform_keys(h, positions, 0, in[hs], out);
        }
        // The overloads with and without the gradient share filter_backward; din agrees to a
        // few ulps (the branch that accumulates the gradient changes which products GCC -O3
        // contracts into FMAs).
        EXPECT_LE((din - din_plain).cwiseAbs().maxCoeff(),
                  8 * std::numeric_limits<double>::epsilon() * din.cwiseAbs().maxCoeff())
            << where;
        for (Index r = 0; r < rows; ++r) {  // the forward against the codes, row by row
          const Index p = positions[static_cast<std::size_t>(r)];
          const Matrix<double> code = query ? encoder.query_code(h, p) : encoder.key_code(h, p);
          EXPECT_LE(test::relative_error(out.row(r), in[hs].row(r) * code), 1e-12) << where;
        }
        const double lhs = (out.array() * dout[hs].array()).sum();
        const double rhs = (din.array() * in[hs].array()).sum();
        EXPECT_NEAR(lhs, rhs, 1e-12 * (std::abs(lhs) + 1.0)) << where << " head " << h;
      }
      const std::vector<double> analytic = family.flatten(gradient);
      ASSERT_EQ(analytic.size(), family.theta.size());
      std::size_t offset = 0;
      for (std::size_t t = 0; t < family.tensor_names.size(); ++t) {
        const auto size = static_cast<std::size_t>(family.tensor_sizes[t]);
        double scale = 0.0;
        for (std::size_t i = offset; i < offset + size; ++i) {
          scale = std::max(scale, std::abs(analytic[i]));
        }
        for (std::size_t i = offset; i < offset + size; ++i) {
          const double fd = spe_central_difference(
              [&](const std::vector<double>& theta) { return objective(family.build(theta)); },
              family.theta, i, set == 2 && family.tensor_names[t] == "frequencies" ? 1e-8 : 1e-5);
          spe_expect_close(
              analytic[i], fd, scale,
              where + " " + family.tensor_names[t] + "[" + std::to_string(i - offset) + "]");
        }
        offset += size;
      }
    }
  }
}

TEST(SpeGradientTile, SineBackwardMatchesDifferences) {
  const Index H = 2, D = 3, K = 2, R = 5;
  for (const bool gated : {false, true}) {
    expect_tile_backward_matches_differences(spe_sine_family(H, D, K, R, gated, 1601), H, D, R, -4,
                                             1602, gated ? "sine gated" : "sine");
  }
}

TEST(SpeGradientTile, ConvBackwardMatchesDifferences) {
  const Index H = 2, D = 3, ks = 4, R = 5;
  for (const bool gated : {false, true}) {
    expect_tile_backward_matches_differences(spe_conv_family(H, D, ks, R, gated, 1603), H, D, R, 3,
                                             1604, gated ? "conv gated" : "conv");
  }
}

/// L(θ) = Σ dO∘attention_reference(q, k, v, encoder(θ)): the streaming backward's parameter
/// gradient (odd tiles) against central differences in a few random entries of every parameter
/// tensor, and its dq, dk against differences in a few entries of q and k; odd sizes, an offset,
/// a mask.
template <class Encoder>
void expect_attention_gradient_matches_differences(const SpeFamily<Encoder>& family, Index H,
                                                   Index D, const AttentionOptions& options,
                                                   std::uint64_t salt, const std::string& label) {
  auto rng = test::make_rng(salt);
  const Index N = 7, M = 9, Dv = 3;
  const auto q = test::random_heads<double>(H, N, D, rng);
  const auto k = test::random_heads<double>(H, M, D, rng);
  const auto v = test::random_heads<double>(H, M, Dv, rng);
  const auto dout = test::random_heads<double>(H, N, Dv, rng);
  const Encoder encoder = family.build(family.theta);
  const auto loss = [&](const Heads<double>& qq, const Heads<double>& kk, const Encoder& e) {
    return attention_reference(qq, kk, v, e, options).flat().dot(dout.flat());
  };
  const AttentionForward<double> forward = attention_forward(q, k, v, encoder, options);
  const auto grads = attention_backward(q, k, v, encoder, forward.out, forward.lse, dout, options);
  const std::vector<double> analytic = family.flatten(grads.encoder);
  ASSERT_EQ(analytic.size(), family.theta.size());
  std::size_t offset = 0;
  for (std::size_t t = 0; t < family.tensor_names.size(); ++t) {
    const auto size = static_cast<std::size_t>(family.tensor_sizes[t]);
    double scale = 0.0;
    for (std::size_t i = offset; i < offset + size; ++i) {
      scale = std::max(scale, std::abs(analytic[i]));
    }
    EXPECT_GT(scale, 0.0) << label << " " << family.tensor_names[t] << " has no gradient";
    std::uniform_int_distribution<std::size_t> entry(offset, offset + size - 1);
    for (int trial = 0; trial < 4; ++trial) {
      const std::size_t i = entry(rng);
      const double fd = spe_central_difference(
          [&](const std::vector<double>& theta) { return loss(q, k, family.build(theta)); },
          family.theta, i);
      spe_expect_close(
          analytic[i], fd, scale,
          label + " " + family.tensor_names[t] + "[" + std::to_string(i - offset) + "]");
    }
    offset += size;
  }
  for (const bool wrt_q : {true, false}) {
    const Heads<double>& x = wrt_q ? q : k;
    const Heads<double>& dx = wrt_q ? grads.dq : grads.dk;
    std::uniform_int_distribution<Index> entry(0, x.flat().size() - 1);
    const double scale = dx.flat().cwiseAbs().maxCoeff();
    for (int trial = 0; trial < 4; ++trial) {
      const Index i = entry(rng);
      std::vector<double> value{x.flat()[i]};
      const double fd = spe_central_difference(
          [&](const std::vector<double>& theta) {
            Heads<double> moved = x;
            moved.flat()[i] = theta[0];
            return wrt_q ? loss(moved, k, encoder) : loss(q, moved, encoder);
          },
          value, 0);
      spe_expect_close(dx.flat()[i], fd, scale,
                       label + (wrt_q ? " dq[" : " dk[") + std::to_string(i) + "]");
    }
  }
}

TEST(SpeGradientAttention, SineMatchesDifferences) {
  const Index H = 2, D = 3, K = 2, R = 5;
  const AttentionOptions causal{
      .mask = Mask::causal(), .query_offset = 3, .query_block = 3, .key_block = 4};
  const AttentionOptions window{
      .mask = Mask::sliding_window(4), .query_offset = -2, .query_block = 4, .key_block = 2};
  for (const bool gated : {false, true}) {
    const auto family = spe_sine_family(H, D, K, R, gated, 1610);
    const std::string label = gated ? "sine gated" : "sine";
    expect_attention_gradient_matches_differences(family, H, D, causal, 1611, label + " causal");
    expect_attention_gradient_matches_differences(family, H, D, window, 1612, label + " window");
  }
}

TEST(SpeGradientAttention, ConvMatchesDifferences) {
  const Index H = 2, D = 3, ks = 3, R = 5;
  const AttentionOptions causal{
      .mask = Mask::causal(), .query_offset = 3, .query_block = 3, .key_block = 4};
  const AttentionOptions none{
      .mask = Mask::none(), .query_offset = 5, .query_block = 4, .key_block = 2};
  for (const bool gated : {false, true}) {
    const auto family = spe_conv_family(H, D, ks, R, gated, 1613);
    const std::string label = gated ? "conv gated" : "conv";
    expect_attention_gradient_matches_differences(family, H, D, causal, 1614, label + " causal");
    expect_attention_gradient_matches_differences(family, H, D, none, 1615, label + " none");
  }
}

/// Streaming == reference for dq, dk, dv and the parameter gradient on random problems (odd
/// sizes, tiles with remainders, explicit scattered key positions, segments), and the same bits
/// for one and two threads.
template <class Scalar, class Encoder, class Flatten>
void expect_spe_streaming_matches_reference(const Encoder& encoder, Index H, Index D,
                                            const Flatten& flatten, std::uint64_t salt,
                                            const std::string& label) {
  const double tolerance = std::is_same_v<Scalar, float> ? 2e-4 : 1e-11;
  test::for_each_backward_trial<Scalar>(
      {.heads = H,
       .kv_heads = H,
       .dim = D,
       .trials = 6,
       .salt = salt,
       .min_keys = 4,
       .nonnegative = true},
      label, [&](const test::BackwardTrial<Scalar>& t) {
        const auto reference =
            attention_backward_reference(t.q, t.k, t.v, encoder, t.dout, t.options);
        const auto streamed = test::backward_on_one_and_two_threads(t, encoder);
        test::expect_backward_close_and_deterministic(streamed, reference, tolerance, t.where);
        const Vector<Scalar> params = flatten(streamed[0].encoder);
        EXPECT_LT(test::relative_error(params, flatten(reference.encoder)), tolerance)
            << t.where << " parameters";
        EXPECT_EQ(params, flatten(streamed[1].encoder))
            << t.where << ": threads change the parameters";
      });
}

template <class Scalar>
Vector<Scalar> spe_concatenate(std::initializer_list<Eigen::Map<const Vector<Scalar>>> parts) {
  Index total = 0;
  for (const auto& p : parts) total += p.size();
  Vector<Scalar> out(total);
  Index at = 0;
  for (const auto& p : parts) {
    out.segment(at, p.size()) = p;
    at += p.size();
  }
  return out;
}

template <class Scalar>
Eigen::Map<const Vector<Scalar>> spe_gate_values(const Matrix<Scalar>& gate) {
  return Eigen::Map<const Vector<Scalar>>(gate.data(), gate.size());
}

template <class T>
class SpeGradientStreaming : public ::testing::Test {};
TYPED_TEST_SUITE(SpeGradientStreaming, test::Scalars);

TYPED_TEST(SpeGradientStreaming, MatchesReference) {
  using T = TypeParam;
  const Index H = 3, D = 5, R = 7;
  const auto sine_flatten = [](const typename SineSpe<T>::Gradient& g) {
    return spe_concatenate<T>(
        {g.frequencies.flat(), g.offsets.flat(), g.gains.flat(), spe_gate_values(g.gate)});
  };
  const auto conv_flatten = [](const typename ConvSpe<T>::Gradient& g) {
    return spe_concatenate<T>(
        {g.query_filter.flat(), g.key_filter.flat(), spe_gate_values(g.gate)});
  };
  const Matrix<T> gate = Matrix<T>::Constant(H, D, T(0.4));
  const auto sine_parameters = SineSpeParameters<T>::initial(H, D, 3, 1620);
  const auto conv_parameters = ConvSpeParameters<T>::initial(H, D, 4, 1621);
  expect_spe_streaming_matches_reference<T>(SineSpe<T>(sine_parameters, R, 1622), H, D,
                                            sine_flatten, 1623, "sine");
  expect_spe_streaming_matches_reference<T>(SineSpe<T>(sine_parameters, R, 1622, gate), H, D,
                                            sine_flatten, 1624, "sine gated");
  expect_spe_streaming_matches_reference<T>(ConvSpe<T>(conv_parameters, R, 1625), H, D,
                                            conv_flatten, 1626, "conv");
  expect_spe_streaming_matches_reference<T>(ConvSpe<T>(conv_parameters, R, 1625, gate), H, D,
                                            conv_flatten, 1627, "conv gated");
}

TEST(SpeGradientContract, GradientsAddAndRejectMisshapenAccumulators) {
  const SineSpe<double> sine(SineSpeParameters<double>::initial(2, 3, 2, 1630), 4, 1631,
                             Matrix<double>::Zero(2, 3));
  SineSpe<double>::Gradient total;  // default-constructed: takes the other's shape
  SineSpe<double>::Gradient one = sine.zero_gradient();
  one.frequencies.flat().setConstant(1.0);
  one.gate.setConstant(2.0);
  total += one;
  total += one;
  EXPECT_EQ(total.frequencies.flat(), Vector<double>::Constant(12, 2.0));
  EXPECT_EQ(total.gate, Matrix<double>::Constant(2, 3, 4.0));
  EXPECT_EQ(total.offsets.flat(), Vector<double>::Zero(12));

  const ConvSpe<double> conv(ConvSpeParameters<double>::initial(2, 3, 3, 1632), 4, 1633);
  EXPECT_EQ(conv.zero_gradient().gate.size(), 0);
  EXPECT_EQ(conv.zero_gradient().query_filter.dim(), 3);

  const std::vector<Index> positions{0, 1};
  const Matrix<double> in = Matrix<double>::Ones(2, 3);
  const Matrix<double> dout = Matrix<double>::Ones(2, 4);
  Matrix<double> din(2, 3);
  SineSpe<double>::Gradient empty;
  POSENC_EXPECT_INVALID(sine.transform_queries_backward(0, positions, 0, in, dout, din, empty),
                        "shaped like zero_gradient()");
  Matrix<double> wrong(2, 2);
  POSENC_EXPECT_INVALID(sine.transform_keys_backward(0, positions, 0, in, dout, wrong),
                        "din must be [2, D = 3]");
  ConvSpe<double>::Gradient conv_gradient = conv.zero_gradient();
  const std::vector<Index> negative{-1, 0};
  POSENC_EXPECT_INVALID(conv.transform_keys_backward(0, negative, 0, in, dout, din, conv_gradient),
                        "outside the draw");
}

}  // namespace
}  // namespace posenc
