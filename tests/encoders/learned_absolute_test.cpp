// SPDX-License-Identifier: MIT
// LearnedAbsoluteEncoding and the position-id rules: every case of tests/data/learned_abs.json
// (fairseq make_positions and lookups, the incremental step, the over-length error, HF RoBERTa
// and BERT/GPT-2 ids), the seeded initialisers, and argument checking.
#include "posenc/encoders/learned_absolute.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "support/golden.hpp"
#include "support/test_support.hpp"

namespace posenc {
namespace {

using test::Json;
using test::load_golden;
using test::to_matrix;

std::vector<Index> ids_of(const Json& x) { return x.get<std::vector<Index>>(); }

template <class Scalar>
class LearnedAbsoluteTest : public ::testing::Test {};
TYPED_TEST_SUITE(LearnedAbsoluteTest, test::Scalars);

TEST(LearnedAbsolutePositions, MatchGoldenIdRules) {
  const Json golden = load_golden("learned_abs.json");
  const Json& in = golden["inputs"];
  const Json& out = golden["outputs"];
  const auto pad = in["padding_idx"].get<Index>();
  for (std::size_t b = 0; b < in["tokens"].size(); ++b) {
    const auto tokens = ids_of(in["tokens"][b]);
    EXPECT_EQ(padding_aware_positions(tokens, pad), ids_of(out["fairseq_positions"][b]));
    EXPECT_EQ(padding_aware_positions(tokens, pad, 0),
              ids_of(out["hf_roberta_position_ids(past=0)"][b]));
    EXPECT_EQ(padding_aware_positions(tokens, pad, 3),
              ids_of(out["hf_roberta_position_ids(past=3)"][b]));
  }
  EXPECT_EQ(sequential_positions(6), ids_of(out["hf_bert_gpt2_position_ids(past=0, len 6)"]));
  EXPECT_EQ(sequential_positions(2, 3), ids_of(out["hf_bert_gpt2_position_ids(past=3, len 2)"]));
  EXPECT_TRUE(padding_aware_positions({}, pad).empty());
  EXPECT_TRUE(sequential_positions(0, 5).empty());
}

TYPED_TEST(LearnedAbsoluteTest, MatchesFairseqLookups) {
  using Scalar = TypeParam;
  const Json golden = load_golden("learned_abs.json");
  const Json& in = golden["inputs"];
  const Json& out = golden["outputs"];
  const auto pad = in["padding_idx"].get<Index>();
  const Matrix<Scalar> table = to_matrix<Scalar>(in["table[row][c]"]);
  ASSERT_EQ(table.rows(), in["table_rows"].get<Index>());
  ASSERT_EQ(table.rows(), in["max_positions"].get<Index>() + pad + 1);

  // Explicit ids (make_positions output) index the table directly: pads read the zero row.
  const LearnedAbsoluteEncoding<Scalar> by_id(table);
  for (std::size_t b = 0; b < in["tokens"].size(); ++b) {
    const auto ids = padding_aware_positions(ids_of(in["tokens"][b]), pad);
    const Matrix<Scalar> want = to_matrix<Scalar>(out["fairseq_lookup[b][t][c]"][b]);
    EXPECT_EQ(by_id.lookup(ids), want) << "batch row " << b;
    Matrix<Scalar> x = Matrix<Scalar>::Constant(want.rows(), want.cols(), Scalar(0.5));
    by_id.add_to(x, ids);
    EXPECT_EQ(x, Matrix<Scalar>(want.array() + Scalar(0.5))) << "batch row " << b;
  }

  // The contiguous form with position_offset padding_idx + 1 reads the same rows for the
  // unpadded prefix of batch row 0 (tokens 5 6 7 8).
  const LearnedAbsoluteEncoding<Scalar> contiguous(table, pad + 1);
  EXPECT_EQ(contiguous.max_positions(), in["max_positions"].get<Index>());
  Matrix<Scalar> prefix = Matrix<Scalar>::Zero(4, 3);
  contiguous.add_to(prefix, 0);
  EXPECT_EQ(prefix, to_matrix<Scalar>(out["fairseq_lookup[b][t][c]"][0]).topRows(4));

  // One incremental decoding step after tokens[:, :4]: fairseq reads row padding_idx + 4.
  const Matrix<Scalar> step_want =
      to_matrix<Scalar>(out["fairseq_incremental_step_lookup (tokens[:, :4], one decode step)"][0]);
  Matrix<Scalar> step = Matrix<Scalar>::Zero(1, 3);
  contiguous.add_to(step, 3);  // the 4th token, 0-based position 3
  EXPECT_EQ(step, step_want);
  auto first_four = ids_of(in["tokens"][0]);
  first_four.resize(4);
  const std::vector<Index> last_id = {padding_aware_positions(first_four, pad).back()};
  EXPECT_EQ(by_id.lookup(last_id), step_want);
}

// fairseq raises IndexError past max_positions; posenc throws naming the position and the table.
TYPED_TEST(LearnedAbsoluteTest, RefusesPositionsBeyondTheTable) {
  using Scalar = TypeParam;
  const Json golden = load_golden("learned_abs.json");
  EXPECT_TRUE(golden["outputs"]["fairseq_over_max_positions"].is_string());
  const Json& in = golden["inputs"];
  const auto pad = in["padding_idx"].get<Index>();
  const Matrix<Scalar> table = to_matrix<Scalar>(in["table[row][c]"]);

  const std::vector<Index> seven_tokens = {5, 6, 7, 8, 9, 10, 11};  // max_positions is 6
  const auto ids = padding_aware_positions(seven_tokens, pad);
  EXPECT_EQ(ids.back(), 8);
  const LearnedAbsoluteEncoding<Scalar> by_id(table);
  POSENC_EXPECT_INVALID(by_id.lookup(ids), "posenc::LearnedAbsoluteEncoding::lookup",
                        "position id 8", "index 6", "table of 8 rows");

  const LearnedAbsoluteEncoding<Scalar> contiguous(table, pad + 1);
  Matrix<Scalar> x = Matrix<Scalar>::Zero(7, 3);
  POSENC_EXPECT_INVALID(contiguous.add_to(x, 0), "posenc::LearnedAbsoluteEncoding::add_to",
                        "position 6", "position_offset 2", "table of 8 rows");
  Matrix<Scalar> one = Matrix<Scalar>::Zero(1, 3);
  POSENC_EXPECT_INVALID(contiguous.add_to(one, 6), "LearnedAbsoluteEncoding::add_to", "position 6");
  POSENC_EXPECT_INVALID(contiguous.add_to(one, 1'000'000'000'000), "position 1000000000000");
  EXPECT_TRUE(x.isZero(0) && one.isZero(0));  // nothing written before the checks
  contiguous.add_to(one, 5);                  // the last position that fits
  EXPECT_EQ(one, table.bottomRows(1));
}

// BERT / GPT-2: position_offset 0, ids = past + t, so a chunk after a KV cache of 3 tokens reads
// rows 3 and 4 whichever form is used.
TYPED_TEST(LearnedAbsoluteTest, BertStyleChunkAfterCache) {
  using Scalar = TypeParam;
  const Matrix<Scalar> table =
      to_matrix<Scalar>(load_golden("learned_abs.json")["inputs"]["table[row][c]"]);
  const LearnedAbsoluteEncoding<Scalar> pe(table);
  Matrix<Scalar> chunk = Matrix<Scalar>::Zero(2, 3);
  pe.add_to(chunk, 3);
  EXPECT_EQ(chunk, table.middleRows(3, 2));
  EXPECT_EQ(pe.lookup(sequential_positions(2, 3)), chunk);

  // A block of a wider matrix: only the block changes.
  Matrix<Scalar> wide = Matrix<Scalar>::Zero(4, 5);
  pe.add_to(wide.block(1, 2, 2, 3), 3);
  EXPECT_EQ(Matrix<Scalar>(wide.block(1, 2, 2, 3)), chunk);
  wide.block(1, 2, 2, 3).setZero();
  EXPECT_TRUE(wide.isZero(0));
}

TYPED_TEST(LearnedAbsoluteTest, SeededInitialisers) {
  using Scalar = TypeParam;
  using E = LearnedAbsoluteEncoding<Scalar>;
  // HF: N(0, 0.02^2). 32768 draws: the sample std is within 3% (about 5 standard errors) and the
  // mean within 5 standard errors 5 · 0.02 / sqrt(n).
  const E hf = E::normal(512, 64, 0.02, 7);
  const auto n = static_cast<double>(hf.table().size());
  const Matrix<double> w = hf.table().template cast<double>();
  const double mean = w.mean();
  const double stddev = std::sqrt((w.array() - mean).square().sum() / (n - 1));
  EXPECT_LT(std::abs(mean), 5 * 0.02 / std::sqrt(n));
  EXPECT_NEAR(stddev / 0.02, 1.0, 0.03);
  EXPECT_EQ(hf.position_offset(), 0);
  EXPECT_EQ(E::normal(512, 64, 0.02, 7).table(), hf.table());
  EXPECT_NE(E::normal(512, 64, 0.02, 8).table(), hf.table());
  EXPECT_TRUE(E::normal(3, 5, 0.0, 1).table().isZero(0));

  // fairseq: max_positions + padding_idx + 1 rows of N(0, 1/dim), pad row zeroed.
  const E fs = E::fairseq(510, 64, 1, 7);
  EXPECT_EQ(fs.rows(), 512);
  EXPECT_EQ(fs.position_offset(), 2);
  EXPECT_EQ(fs.max_positions(), 510);
  EXPECT_TRUE(fs.table().row(1).isZero(0));
  EXPECT_FALSE(fs.table().row(0).isZero(0));
  const Matrix<double> v = fs.table().template cast<double>();
  const double rms = std::sqrt(v.squaredNorm() / static_cast<double>(v.size() - 64));
  EXPECT_NEAR(rms * std::sqrt(64.0), 1.0, 0.03);
}

TEST(LearnedAbsoluteEncoding, RejectsBadArguments) {
  using E = LearnedAbsoluteEncoding<double>;
  POSENC_EXPECT_INVALID(E(Matrix<double>(0, 3)), "posenc::LearnedAbsoluteEncoding", "non-empty",
                        "[0, 3]");
  POSENC_EXPECT_INVALID(E(Matrix<double>(4, 0)), "posenc::LearnedAbsoluteEncoding", "[4, 0]");
  POSENC_EXPECT_INVALID(E(Matrix<double>::Zero(4, 3), -1), "position_offset", "-1");
  POSENC_EXPECT_INVALID(E::normal(0, 3, 0.02, 1), "LearnedAbsoluteEncoding::normal", "rows 0");
  POSENC_EXPECT_INVALID(E::normal(4, 3, -1.0, 1), "LearnedAbsoluteEncoding::normal", "stddev");
  POSENC_EXPECT_INVALID(E::normal(4, 3, std::nan(""), 1), "LearnedAbsoluteEncoding::normal",
                        "stddev");
  POSENC_EXPECT_INVALID(E::fairseq(6, 3, -1, 1), "LearnedAbsoluteEncoding::fairseq", "padding_idx",
                        "-1");
  POSENC_EXPECT_INVALID(E::fairseq(0, 3, 1, 1), "LearnedAbsoluteEncoding::fairseq",
                        "max_positions 0");

  const E pe(Matrix<double>::Zero(8, 3));
  Matrix<double> narrow = Matrix<double>::Zero(2, 4);
  POSENC_EXPECT_INVALID(pe.add_to(narrow, 0), "LearnedAbsoluteEncoding::add_to", "x has 4",
                        "dim 3");
  Matrix<double> x = Matrix<double>::Zero(2, 3);
  POSENC_EXPECT_INVALID(pe.add_to(x, -1), "LearnedAbsoluteEncoding::add_to", "first_position",
                        "-1");
  const std::vector<Index> three = {0, 1, 2};
  POSENC_EXPECT_INVALID(pe.add_to(x, three), "LearnedAbsoluteEncoding::add_to", "2 rows",
                        "position_ids has 3");
  const std::vector<Index> negative = {0, -4};
  POSENC_EXPECT_INVALID(pe.add_to(x, negative), "LearnedAbsoluteEncoding::add_to", "position id -4",
                        "index 1", "negative");
  POSENC_EXPECT_INVALID(pe.lookup(negative), "LearnedAbsoluteEncoding::lookup", "-4");

  const std::vector<Index> tokens = {3, 1, 4};
  POSENC_EXPECT_INVALID(padding_aware_positions(tokens, -1), "posenc::padding_aware_positions",
                        "padding_idx", "-1");
  POSENC_EXPECT_INVALID(padding_aware_positions(tokens, 1, -2), "padding_aware_positions",
                        "past_length", "-2");
  POSENC_EXPECT_INVALID(sequential_positions(-1), "posenc::sequential_positions", "count", "-1");
  POSENC_EXPECT_INVALID(sequential_positions(2, -1), "sequential_positions", "past_length");
}

}  // namespace
}  // namespace posenc
