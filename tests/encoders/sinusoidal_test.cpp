// SPDX-License-Identifier: MIT
// SinusoidalEncoding: every case of tests/data/sinusoidal.json that the three layouts cover (t2t,
// fairseq, gpt-neox, HF DistilBERT and Marian), exactness at positions up to 1e7 against long
// double, the add_to forms, and argument checking.
#include "posenc/encoders/sinusoidal.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "posenc/encoders/learned_absolute.hpp"
#include "support/golden.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

using test::Json;
using test::load_golden;
using test::to_matrix;

constexpr double float_eps = std::numeric_limits<float>::epsilon();

/// Against a float64 golden: 1e-12 in double (our contract; the goldens agree with exact
/// maths to 1.1e-16); in float our own rounding of values in [-1, 1] to float, <= eps_f32 / 2.
template <class Scalar>
double float64_tolerance() {
  return std::is_same_v<Scalar, float> ? float_eps : 1e-12;
}

/// Against a golden whose reference computed the angles in float32 (t2t, fairseq, gpt-neox): the
/// frequency and the product p·w_k each carry a few float32 roundings, so |Δangle| <= 3 eps_f32 ·
/// |angle| with |angle| <= max_position (w_0 = 1 is the largest frequency); sin/cos are
/// 1-Lipschitz; the reference then rounds sin/cos to float32 (eps_f32 / 2) and a float result
/// adds eps_f32 / 2. Observed: <= 4.7e-8 in the file.
double float32_angle_tolerance(Index max_position) {
  return float_eps * (3.0 * static_cast<double>(max_position) + 1.0);
}

/// Tables rounded to float32 from float64 angles (HF DistilBERT/Marian): eps_f32 / 2 from the
/// reference, eps_f32 / 2 from a float result.
constexpr double kRoundedFloat32Tolerance = float_eps;

template <class Scalar>
void expect_table_near(const Matrix<Scalar>& got, const Matrix<double>& want, double tolerance,
                       const std::string& what) {
  ASSERT_TRUE(got.allFinite()) << what;
  ASSERT_EQ(got.rows(), want.rows()) << what;
  ASSERT_EQ(got.cols(), want.cols()) << what;
  const double error = (got.template cast<double>() - want).cwiseAbs().maxCoeff();
  EXPECT_LE(error, tolerance) << what;
}

/// The integer after `tag` in a golden key such as "float32_len8_ch8_start0".
Index key_field(const std::string& key, const std::string& tag) {
  const auto at = key.find(tag);
  EXPECT_NE(at, std::string::npos) << key << " lacks " << tag;
  return std::stoll(key.substr(at + tag.size()));
}

template <class Scalar>
class SinusoidalTest : public ::testing::Test {};
TYPED_TEST_SUITE(SinusoidalTest, test::Scalars);

// tensor2tensor get_timing_signal_1d(length, channels, start_index): layout C, rows start..
TYPED_TEST(SinusoidalTest, MatchesTensor2Tensor) {
  using Scalar = TypeParam;
  const Json cases = load_golden("sinusoidal.json")["outputs"]["t2t_get_timing_signal_1d"];
  ASSERT_EQ(cases.size(), 10u);
  for (const auto& [key, rows] : cases.items()) {
    const Index length = key_field(key, "_len");
    const Index start = key_field(key, "_start");
    const SinusoidalEncoding<Scalar> pe(key_field(key, "_ch"),
                                        {.layout = SinusoidalLayout::concatenated_t2t});
    const double tolerance = key.starts_with("float32")
                                 ? float32_angle_tolerance(start + length - 1)
                                 : float64_tolerance<Scalar>();
    expect_table_near(pe.table(start, length), to_matrix(rows), tolerance, key);
  }
}

// fairseq get_embedding: layout C, table row = position number. With padding_idx the row
// padding_idx is zero and real tokens start at row padding_idx + 1 = origin.
TYPED_TEST(SinusoidalTest, MatchesFairseqTables) {
  using Scalar = TypeParam;
  const Json golden = load_golden("sinusoidal.json");
  const Json& cases = golden["outputs"]["fairseq_get_embedding"];
  for (const char* key : {"num8_dim8_padNone", "num8_dim7_padNone", "num4_dim6_padNone"}) {
    const Matrix<double> want = to_matrix(cases[key]);
    const SinusoidalEncoding<Scalar> pe(want.cols(),
                                        {.layout = SinusoidalLayout::concatenated_t2t});
    expect_table_near(pe.table(0, want.rows()), want, float32_angle_tolerance(want.rows() - 1),
                      key);
  }

  // num6_dim8_pad1: rows 2..5 are tokens 0..3 of fairseq(8, padding_idx 1); row 1 is the zero pad
  // row; row 0 (position 0) is never read by fairseq but is PE(0).
  const Matrix<double> padded = to_matrix(cases["num6_dim8_pad1"]);
  const auto pe = SinusoidalEncoding<Scalar>::fairseq(8, 1);
  EXPECT_EQ(pe.origin(), 2);
  const double tolerance = float32_angle_tolerance(padded.rows() - 1);
  expect_table_near(pe.table(0, 4), Matrix<double>(padded.bottomRows(4)), tolerance, "pad1 rows");
  EXPECT_TRUE(padded.row(1).isZero(0.0));
  const SinusoidalEncoding<Scalar> at_zero(8, {.layout = SinusoidalLayout::concatenated_t2t});
  expect_table_near(at_zero.table(0, 1), Matrix<double>(padded.topRows(1)), tolerance, "row 0");

  // fairseq's forward on a padded batch: ids = make_positions(tokens), emb = table[ids], pads
  // read the zero row. posenc: explicit ids at origin 0 for the real tokens, pad rows left alone.
  const Json& make_positions = golden["inputs"]["fairseq_make_positions"];
  const Json& want_ids = golden["outputs"]["fairseq_make_positions"];
  const auto pad = make_positions["padding_idx"].get<Index>();
  for (std::size_t b = 0; b < make_positions["tokens"].size(); ++b) {
    const auto tokens = make_positions["tokens"][b].get<std::vector<Index>>();
    const auto ids = padding_aware_positions(tokens, pad);
    EXPECT_EQ(ids, want_ids[b].get<std::vector<Index>>());
    Matrix<Scalar> x = Matrix<Scalar>::Zero(static_cast<Index>(tokens.size()), 8);
    Matrix<double> want(x.rows(), 8);
    for (std::size_t t = 0; t < tokens.size(); ++t) {
      const auto row = static_cast<Index>(t);
      want.row(row) = padded.row(ids[t]);
      if (tokens[t] != pad) at_zero.add_to(x.middleRows(row, 1), std::span(&ids[t], 1));
    }
    expect_table_near(x, want, tolerance, "fairseq forward, batch row " + std::to_string(b));
  }
}

// fairseq raises ZeroDivisionError for embedding_dim 2 and 3 (half_dim - 1 == 0); posenc follows
// t2t's max(half - 1, 1) guard: one frequency, min_timescale = 1, and for d = 3 a zero channel.
TYPED_TEST(SinusoidalTest, TinyDimFollowsTensor2TensorGuard) {
  using Scalar = TypeParam;
  const Json golden = load_golden("sinusoidal.json")["outputs"];
  EXPECT_TRUE(golden["fairseq_get_embedding"]["num3_dim2_padNone"].is_string());
  const SinusoidalEncoding<Scalar> d2(2, {.layout = SinusoidalLayout::concatenated_t2t});
  expect_table_near(d2.table(0, 3),
                    to_matrix(golden["t2t_get_timing_signal_1d"]["float64_shim_len3_ch2_start0"]),
                    float64_tolerance<Scalar>(), "d = 2");
  const SinusoidalEncoding<Scalar> d3(3, {.layout = SinusoidalLayout::concatenated_t2t});
  const Matrix<Scalar> table = d3.table(0, 5);
  for (Index p = 0; p < 5; ++p) {
    EXPECT_NEAR(table(p, 0), std::sin(static_cast<double>(p)), float64_tolerance<Scalar>());
    EXPECT_NEAR(table(p, 1), std::cos(static_cast<double>(p)), float64_tolerance<Scalar>());
    EXPECT_EQ(table(p, 2), Scalar(0));
  }
  EXPECT_EQ(d3.frequency(0), 1.0);
  EXPECT_EQ(d3.frequency(2), 0.0);
}

// gpt-neox SinusoidalPositionalEmbedding equals layout B for even d; for odd d it returns d + 1
// channels (arange(0, d, 2) has ceil(d/2) entries), whose first d are layout B.
TYPED_TEST(SinusoidalTest, MatchesGptNeoxConcatenated) {
  using Scalar = TypeParam;
  const Json cases = load_golden("sinusoidal.json")["outputs"]["gptneox_sinusoidal"];
  for (const auto& [key, rows] : cases.items()) {
    const Index dim = key_field(key, "_dim");
    const Matrix<double> want = to_matrix(rows);
    EXPECT_EQ(want.cols(), dim + dim % 2) << key;
    const SinusoidalEncoding<Scalar> pe(dim, {.layout = SinusoidalLayout::concatenated});
    expect_table_near(pe.table(0, want.rows()), Matrix<double>(want.leftCols(dim)),
                      float32_angle_tolerance(want.rows() - 1), key);
  }
}

// HF DistilBERT (layout A) and Marian (layout B), float32 (angles in float64, table rounded) and
// float64 (the same code on DoubleTensor).
TYPED_TEST(SinusoidalTest, MatchesHuggingFace) {
  using Scalar = TypeParam;
  const Json golden = load_golden("sinusoidal.json")["outputs"];
  int checked = 0;
  for (const auto& [family, layout] :
       {std::pair{"hf_distilbert_interleaved", SinusoidalLayout::interleaved},
        std::pair{"hf_marian_concatenated", SinusoidalLayout::concatenated}}) {
    for (const auto& [key, rows] : golden[family].items()) {
      const Matrix<double> want = to_matrix(rows);
      const SinusoidalEncoding<Scalar> pe(key_field(key, "_dim"), {.layout = layout});
      const double tolerance =
          key.starts_with("float32") ? kRoundedFloat32Tolerance : float64_tolerance<Scalar>();
      expect_table_near(pe.table(0, key_field(key, "_num")), want, tolerance,
                        std::string(family) + "/" + key);
      ++checked;
    }
  }
  EXPECT_EQ(checked, 8);
}

/// PE(p)[channel] in long double: the angle p·w formed in long double from an independently
/// written frequency, then sinl/cosl.
long double long_double_value(SinusoidalLayout layout, Index d, Index p, Index channel) {
  const auto k_paper = [&](Index k) {
    return static_cast<long double>(p) /
           powl(10000.0L, 2.0L * static_cast<long double>(k) / static_cast<long double>(d));
  };
  switch (layout) {
    case SinusoidalLayout::interleaved:
      return channel % 2 == 0 ? sinl(k_paper(channel / 2)) : cosl(k_paper(channel / 2));
    case SinusoidalLayout::concatenated: {
      const Index sines = (d + 1) / 2;
      return channel < sines ? sinl(k_paper(channel)) : cosl(k_paper(channel - sines));
    }
    case SinusoidalLayout::concatenated_t2t: {
      const Index half = d / 2;
      if (channel >= 2 * half) return 0.0L;
      const Index k = channel % half;
      const long double angle =
          static_cast<long double>(p) *
          expl(-static_cast<long double>(k) * logl(10000.0L) / static_cast<long double>(half - 1));
      return channel < half ? sinl(angle) : cosl(angle);
    }
  }
  return 0.0L;
}

// Long contexts: positions up to 1e7 agree with a long double computation to 1e-12 in double
// (the long double reference itself rounds its angle to |angle|·2^-64 <= 5.4e-13 at 1e7) and to
// eps_f32 in float (tighter than 1e-6: a float result only adds its own rounding).
TYPED_TEST(SinusoidalTest, ExactAtLargePositions) {
  using Scalar = TypeParam;
  const double tolerance = std::is_same_v<Scalar, float> ? float_eps : 1e-12;
  const std::vector<Index> positions = {1'000'000, 1'000'001, 1'048'577,
                                        3'141'593, 9'999'991, 10'000'000};
  for (const auto layout : {SinusoidalLayout::interleaved, SinusoidalLayout::concatenated,
                            SinusoidalLayout::concatenated_t2t}) {
    for (const Index d : {Index{8}, Index{17}, Index{64}}) {
      const SinusoidalEncoding<Scalar> pe(d, {.layout = layout});
      Matrix<Scalar> x = Matrix<Scalar>::Zero(static_cast<Index>(positions.size()), d);
      pe.add_to(x, positions);
      ASSERT_TRUE(x.allFinite());
      double error = 0.0;
      for (Index r = 0; r < x.rows(); ++r) {
        for (Index c = 0; c < d; ++c) {
          const long double want =
              long_double_value(layout, d, positions[static_cast<std::size_t>(r)], c);
          error = std::max(error, static_cast<double>(fabsl(x(r, c) - want)));
          EXPECT_EQ(pe.value(positions[static_cast<std::size_t>(r)], c), x(r, c));
        }
      }
      EXPECT_LE(error, tolerance) << "layout " << static_cast<int>(layout) << ", d " << d;
    }
  }
}

// PE(p + k) is PE(p) rotated by k·w in every (sin, cos) pair, here at p = 5e6 (the property the
// paper cites for relative attention; it needs exact angles at both positions).
TEST(SinusoidalEncoding, ShiftIsRotationAtLargePositions) {
  const SinusoidalEncoding<double> pe(16);
  const Index p = 5'000'000;
  const Index k = 123;
  const Matrix<double> a = pe.table(p, 1);
  const Matrix<double> b = pe.table(p + k, 1);
  for (Index c = 0; c < 16; c += 2) {
    const double angle = static_cast<double>(k) * pe.frequency(c);
    EXPECT_NEAR(b(0, c), a(0, c) * std::cos(angle) + a(0, c + 1) * std::sin(angle), 1e-12);
    EXPECT_NEAR(b(0, c + 1), a(0, c + 1) * std::cos(angle) - a(0, c) * std::sin(angle), 1e-12);
  }
}

TYPED_TEST(SinusoidalTest, AddToFormsAgree) {
  using Scalar = TypeParam;
  const SinusoidalEncoding<Scalar> pe(7, {.layout = SinusoidalLayout::concatenated, .origin = 2});
  auto rng = test::make_rng(41);
  const Matrix<Scalar> x0 = test::random_heads<Scalar>(1, 5, 7, rng).head(0);
  const Matrix<Scalar> table = pe.table(3, 5);  // positions 5..9

  Matrix<Scalar> contiguous = x0;
  pe.add_to(contiguous, 3);
  EXPECT_EQ(contiguous, Matrix<Scalar>(x0 + table));

  Matrix<Scalar> explicit_positions = x0;
  const std::vector<Index> positions = {5, 6, 7, 8, 9};  // absolute: origin not added
  pe.add_to(explicit_positions, positions);
  EXPECT_EQ(explicit_positions, contiguous);

  // A block of a wider matrix: only the block changes.
  Matrix<Scalar> wide = Matrix<Scalar>::Zero(8, 10);
  pe.add_to(wide.block(2, 1, 5, 7), 3);
  EXPECT_EQ(Matrix<Scalar>(wide.block(2, 1, 5, 7)), table);
  wide.block(2, 1, 5, 7).setZero();
  EXPECT_TRUE(wide.isZero(0));

  // Position 0: sines 0, cosines 1, in every layout; negative positions are odd in the sines.
  for (const auto layout : {SinusoidalLayout::interleaved, SinusoidalLayout::concatenated,
                            SinusoidalLayout::concatenated_t2t}) {
    const SinusoidalEncoding<Scalar> e(6, {.layout = layout});
    const Matrix<Scalar> t = e.table(-3, 7);
    for (Index c = 0; c < 6; ++c) {
      const bool is_sine = layout == SinusoidalLayout::interleaved ? c % 2 == 0 : c < 3;
      EXPECT_EQ(t(3, c), Scalar(is_sine ? 0 : 1));
      EXPECT_EQ(t(0, c), is_sine ? -t(6, c) : t(6, c));
    }
  }
  EXPECT_EQ(pe.table(0, 0).rows(), 0);
}

TEST(SinusoidalEncoding, FrequencyLadders) {
  // d = 8: the paper's 1, 0.1, 0.01, 0.001 versus t2t's 1, 10^(-4/3), 10^(-8/3), 1e-4.
  const SinusoidalEncoding<double> paper(8);
  const SinusoidalEncoding<double> t2t(8, {.layout = SinusoidalLayout::concatenated_t2t});
  for (Index k = 0; k < 4; ++k) {
    EXPECT_NEAR(paper.frequency(2 * k), std::pow(10.0, -static_cast<double>(k)), 1e-16);
    EXPECT_EQ(paper.frequency(2 * k + 1), paper.frequency(2 * k));
    EXPECT_NEAR(t2t.frequency(k), std::pow(10.0, -4.0 * static_cast<double>(k) / 3.0), 1e-16);
    EXPECT_EQ(t2t.frequency(4 + k), t2t.frequency(k));
  }
  // t2t multiplies by min_timescale (its code, not 1/min_timescale).
  const SinusoidalEncoding<double> scaled(
      8,
      {.layout = SinusoidalLayout::concatenated_t2t, .min_timescale = 2.0, .max_timescale = 2e4});
  EXPECT_EQ(scaled.frequency(0), 2.0);
  EXPECT_NEAR(scaled.frequency(3), 2.0e-4, 1e-18);
}

TEST(SinusoidalEncoding, RejectsBadArguments) {
  using E = SinusoidalEncoding<float>;
  POSENC_EXPECT_INVALID(E(0), "posenc::SinusoidalEncoding", "dim", "0");
  POSENC_EXPECT_INVALID(E(-3), "posenc::SinusoidalEncoding", "dim", "-3");
  for (const double base : {1.0, 0.5, -2.0, std::numeric_limits<double>::quiet_NaN(),
                            std::numeric_limits<double>::infinity()}) {
    POSENC_EXPECT_INVALID(E(8, {.base = base}), "posenc::SinusoidalEncoding", "base");
  }
  POSENC_EXPECT_INVALID(E(8, {.min_timescale = 0.0}), "SinusoidalEncoding", "min_timescale 0");
  POSENC_EXPECT_INVALID(E(8, {.min_timescale = 2.0, .max_timescale = 1.0}), "SinusoidalEncoding",
                        "max_timescale 1");
  POSENC_EXPECT_INVALID(E(8, {.max_timescale = std::numeric_limits<double>::infinity()}),
                        "SinusoidalEncoding", "timescales");
  POSENC_EXPECT_INVALID(E(8, {.origin = (Index{1} << 53) + 1}), "SinusoidalEncoding", "origin");
  POSENC_EXPECT_INVALID(E::fairseq(8, -1), "posenc::SinusoidalEncoding::fairseq", "padding_idx",
                        "-1");

  const E pe(8);
  Matrix<float> narrow = Matrix<float>::Zero(3, 7);
  POSENC_EXPECT_INVALID(pe.add_to(narrow, 0), "posenc::SinusoidalEncoding::add_to", "x has 7",
                        "dim 8");
  Matrix<float> x = Matrix<float>::Zero(3, 8);
  const std::vector<Index> two = {0, 1};
  POSENC_EXPECT_INVALID(pe.add_to(x, two), "posenc::SinusoidalEncoding::add_to", "3 rows",
                        "positions has 2");
  const std::vector<Index> huge = {0, 1, Index{1} << 60};
  POSENC_EXPECT_INVALID(pe.add_to(x, huge), "SinusoidalEncoding::add_to", "positions[2]", "2^53");
  POSENC_EXPECT_INVALID(pe.add_to(x, Index{1} << 53), "SinusoidalEncoding::add_to",
                        "first_position");
  POSENC_EXPECT_INVALID(pe.table(0, -1), "posenc::SinusoidalEncoding::table", "count", "-1");
  POSENC_EXPECT_INVALID(pe.value(0, 8), "posenc::SinusoidalEncoding::value", "channel 8", "dim 8");
  POSENC_EXPECT_INVALID(pe.frequency(-1), "posenc::SinusoidalEncoding::frequency", "channel -1");
  EXPECT_TRUE(x.isZero(0.0f));  // nothing written before the checks
}

// concatenated_t2t has floor(d/2) sine/cosine pairs: d = 1 would be one all-zero channel.
// Odd d >= 3 keeps t2t's zero last channel (TinyDimFollowsTensor2TensorGuard).
TEST(SinusoidalEncoding, RejectsAllZeroT2tEncoding) {
  using E = SinusoidalEncoding<float>;
  POSENC_EXPECT_INVALID(E(1, {.layout = SinusoidalLayout::concatenated_t2t}),
                        "posenc::SinusoidalEncoding", "concatenated_t2t", "dim >= 2", "got dim 1");
  POSENC_EXPECT_INVALID(SinusoidalEncoding<double>::fairseq(1), "posenc::SinusoidalEncoding",
                        "got dim 1");
  EXPECT_EQ(E(1).dim(), 1);  // the other layouts hold a sine there
  EXPECT_EQ(E(1, {.layout = SinusoidalLayout::concatenated}).dim(), 1);
}

}  // namespace
}  // namespace posenc
