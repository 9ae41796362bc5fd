// SPDX-License-Identifier: MIT
// posenc/io/checkpoint.hpp: the checkpoint-shaped files of tests/data/checkpoints (written by
// tests/data/generators/make_checkpoint_fixtures.py with the real tensor names and the golden
// cases' parameters) reproduce what the golden files expect; every encoder survives a save/load
// round trip exactly (F64; F32 as the float rounding); missing tensors, wrong shapes and dtypes
// are reported by name.
#include "posenc/io/checkpoint.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "posenc/attention.hpp"
#include "support/golden.hpp"
#include "support/test_support.hpp"

namespace posenc::test::checkpoint_test {

using io::Dtype;
using io::SafetensorsFile;
using io::SafetensorsWriter;

/// tests/data/checkpoints/<name>.
inline std::string fixture_path(const std::string& name) {
  return std::string(POSENC_TEST_DATA_DIR) + "/checkpoints/" + name;
}

inline SafetensorsFile open_fixture(const std::string& name) {
  return SafetensorsFile::open(fixture_path(name));
}

/// The file `writer` would write, read back under the name `source`.
inline SafetensorsFile reread(const SafetensorsWriter& writer,
                              const std::string& source = "roundtrip.safetensors") {
  return SafetensorsFile::from_bytes(writer.bytes(), source);
}

/// The bias tile of `head` at positions 0..rows−1 × 0..cols−1.
template <class Encoder>
Matrix<typename Encoder::Scalar> bias_tile(const Encoder& encoder, Index head, Index rows,
                                           Index cols) {
  Matrix<typename Encoder::Scalar> tile = Matrix<typename Encoder::Scalar>::Zero(rows, cols);
  encoder.add_bias(head, iota(rows), iota(cols), tile);
  return tile;
}

/// `values` as T would store them, widened back to double (the F32 rounding of a float save).
template <class T, class Derived>
Matrix<double> as_stored(const Eigen::MatrixBase<Derived>& values) {
  return values.template cast<T>().template cast<double>();
}

// ---------------------------------------------------------------------------------------------
// Checkpoint-shaped files against the goldens.

TEST(CheckpointGolden, T5EncoderAndDecoderBiasesOfAnHfCheckpoint) {
  const SafetensorsFile file = open_fixture("t5.safetensors");
  const Json golden = load_golden("t5_buckets.json");
  const Json& example = golden["inputs"]["bias_example"];
  // The encoder's table is the golden bias_example table (num_buckets 8, max_distance 16,
  // bidirectional), stored in F32 as released T5 weights are.
  const auto encoder =
      io::load_t5_bias<float>(file, io::T5Stack::encoder, example["max_distance"].get<Index>());
  EXPECT_EQ(encoder.options().num_buckets, 8);
  EXPECT_TRUE(encoder.options().bidirectional);
  EXPECT_EQ(encoder.heads(), example["n_heads"].get<Index>());
  const Heads<double> want = to_heads(golden["outputs"]["bias_example[head][query][key]"]);
  for (Index h = 0; h < encoder.heads(); ++h) {
    const Matrix<float> tile =
        bias_tile(encoder, h, example["query_len"].get<Index>(), example["key_len"].get<Index>());
    EXPECT_EQ(tile, want.head(h).cast<float>()) << "head " << h;
  }
  // The decoder's table holds b + h/4 − 1 at bucket b, head h; its buckets (causal, max_distance
  // 20) are the golden nb8_md20_causal ones at every relative position of the golden.
  const auto decoder = io::load_t5_bias<double>(file, io::T5Stack::decoder, 20);
  EXPECT_FALSE(decoder.options().bidirectional);
  EXPECT_EQ(decoder.natural_mask(), Mask::causal());
  const Json& relative = golden["inputs"]["relative_positions"];
  const Json& buckets = golden["outputs"]["buckets"]["nb8_md20_causal"];
  for (std::size_t r = 0; r < relative.size(); ++r) {
    const Index rel = relative[r].get<Index>();  // key minus query
    const double want_bias = static_cast<double>(buckets[r].get<Index>()) - 1.0;
    EXPECT_EQ(decoder.bias(0, 1000, 1000 + rel), want_bias) << "relative position " << rel;
    EXPECT_EQ(decoder.bias(1, 1000, 1000 + rel), want_bias + 0.25) << "relative position " << rel;
  }
}

TEST(CheckpointGolden, Gpt2AndOptPositionTables) {
  const Json golden = load_golden("learned_abs.json");
  const Matrix<double> table = to_matrix(golden["inputs"]["table[row][c]"]);
  const auto gpt2 =
      io::load_learned_absolute<float>(open_fixture("gpt2.safetensors"), io::PositionTable::gpt2);
  EXPECT_EQ(gpt2.position_offset(), 0);
  EXPECT_EQ(gpt2.table(), table.cast<float>());
  // OPT: position p reads row p + 2, the fairseq ids of an unpadded sequence (2, 3, …).
  const auto opt =
      io::load_learned_absolute<double>(open_fixture("opt.safetensors"), io::PositionTable::opt);
  EXPECT_EQ(opt.position_offset(), 2);
  EXPECT_EQ(opt.max_positions(), 6);
  const Json& lookup = golden["outputs"]["fairseq_lookup[b][t][c]"];
  Matrix<double> x = Matrix<double>::Zero(4, 3);
  opt.add_to(x, 0);  // batch row 0 starts with the unpadded tokens 5 6 7 8
  EXPECT_EQ(x, as_stored<float>(to_matrix(lookup[0]).topRows(4)));
  // Batch row 1 is left-padded: OPT's ids cumsum(mask)·mask − 1 + 2 put pads on row 1, the
  // fairseq padding row, and real tokens on rows 2, 3, ….
  const Json& tokens = golden["inputs"]["tokens"][1];
  std::vector<Index> ids;
  Index seen = 0;
  for (const Json& token : tokens) {
    const bool real = token.get<Index>() != golden["inputs"]["padding_idx"].get<Index>();
    seen += real ? 1 : 0;
    ids.push_back((real ? seen : 0) - 1 + 2);
  }
  EXPECT_EQ(opt.lookup(ids), as_stored<float>(to_matrix(lookup[1])));
}

TEST(CheckpointGolden, KerpleLogAndPowerOfAGptNeoxPipelineCheckpoint) {
  const Json golden = load_golden("kerple.json");
  const Json& out = golden["outputs"];
  const SafetensorsFile log_file = open_fixture("kerple_log.safetensors");
  const auto log_kernel = io::load_kerple<double>(log_file, "2.attention.rpe.");
  const auto shared = io::load_kerple<double>(log_file, "3.attention.rpe.");
  EXPECT_EQ(shared.raw_r1(), log_kernel.raw_r1());
  const auto power_kernel = io::load_kerple<double>(open_fixture("kerple_power.safetensors"),
                                                    "2.attention.rpe.", KerpleKernel::power);
  const Heads<double> log_bias = to_heads(out["log_bias"]);
  const Heads<double> power_bias = to_heads(out["power_bias"]);
  for (Index h = 0; h < 3; ++h) {
    EXPECT_LE(relative_error(bias_tile(log_kernel, h, 6, 6), log_bias.head(h)), 1e-12);
    EXPECT_LE(relative_error(bias_tile(power_kernel, h, 6, 6), power_bias.head(h)), 1e-12);
  }
  EXPECT_EQ(log_kernel.r1(), to_vector(out["parameters_after_forward_clamp"]["log_bias_p"]));
  EXPECT_EQ(power_kernel.r2(), to_vector(out["parameters_after_forward_clamp"]["power_bias_p"]));
}

TEST(CheckpointGolden, FireCasesOfTheFireListing) {
  const Json golden = load_golden("fire.json");
  const SafetensorsFile file = open_fixture("fire.safetensors");
  Index layer = 2;
  for (const Json& c : golden["inputs"]["cases"]) {
    const std::string key = c["key"].get<std::string>();
    FireOptions options;  // the listing's: ReLU, symmetric
    options.eps = golden["inputs"]["eps"].get<double>();
    const auto fire =
        io::load_fire<double>(file, std::to_string(layer++) + ".attention.fire.", options);
    EXPECT_EQ(fire.options().c, c["c"].get<double>()) << key;
    EXPECT_EQ(fire.options().threshold, c["init_L"].get<double>()) << key;
    EXPECT_EQ(fire.options().threshold_multiplier, c["L_multiplier"].get<double>()) << key;
    const Index n = c["seq_len"].get<Index>();
    const Heads<double> want = to_heads(golden["outputs"][key]["float64"]);
    for (Index h = 0; h < fire.heads(); ++h) {
      EXPECT_LE(relative_error(bias_tile(fire, h, n, n), want.head(h)), 1e-12)
          << key << ", head " << h;
    }
  }
}

/// A DAPE golden file against `encoder`: the base bias B, the mixed scores of every batch and
/// the causal attention output.
template <class Encoder>
void expect_dape_golden(const std::string& name, const Encoder& encoder) {
  SCOPED_TRACE(name);
  const Json golden = load_golden(name);
  const Json& in = golden["inputs"];
  const Json& out = golden["outputs"];
  const Index n = golden["config"]["seq_len"].get<Index>();
  const Index heads = golden["config"]["heads"].get<Index>();
  ASSERT_EQ(encoder.heads(), heads);
  const Heads<double> bias = to_heads(out["bias_B"]);
  for (Index h = 0; h < heads; ++h) {
    EXPECT_LE(relative_error(bias_tile(encoder.base_bias(), h, n, n), bias.head(h)), 1e-12);
  }
  const std::vector<Index> positions = iota(n);
  for (std::size_t b = 0; b < in["q"].size(); ++b) {
    const Heads<double> a = to_heads(out["scaled_logits_A"][b]);
    const Heads<double> modified = to_heads(out["modified_logits"][b]);
    Matrix<double> logits(heads, n * n);
    for (Index h = 0; h < heads; ++h) {
      logits.row(h) = Eigen::Map<const Vector<double>>(a.head(h).data(), n * n).transpose();
    }
    Matrix<double> scores(heads, n * n);
    encoder.mix(positions, positions, 0, n, logits, scores);
    for (Index h = 0; h < heads; ++h) {
      const Eigen::Map<const Matrix<double>> s(scores.row(h).data(), n, n);
      EXPECT_LE(relative_error(s, modified.head(h)), 1e-12) << "batch " << b << ", head " << h;
    }
    const Heads<double> streamed =
        attention(to_heads(in["q"][b]), to_heads(in["k"][b]), to_heads(in["v"][b]), encoder,
                  AttentionOptions{.mask = Mask::causal(), .query_block = 3, .key_block = 3});
    EXPECT_LE(relative_error(streamed.flat(), to_heads(out["attn_out"][b]).flat()), 1e-12)
        << "batch " << b;
  }
}

TEST(CheckpointGolden, DapeModulesOfTheDapeRepository) {
  {
    const SafetensorsFile file = open_fixture("dape_alibi.safetensors");
    const std::string prefix = "2.attention.alibi_c_embed.";
    expect_dape_golden("dape_alibi_causal.json",
                       io::load_dape<double>(file, prefix, io::load_alibi<double>(file, prefix)));
  }
  {
    const SafetensorsFile file = open_fixture("dape_kerple.safetensors");
    const std::string prefix = "2.attention.kerple_c.";
    expect_dape_golden("dape_kerple_causal.json",
                       io::load_dape<double>(file, prefix, io::load_kerple<double>(file, prefix)));
  }
  {
    // FIRE_C: leaky ReLU, causal, float32 distances; its `init_L` holds the halved threshold.
    const SafetensorsFile file = open_fixture("dape_fire.safetensors");
    const std::string prefix = "2.attention.fire_c.";
    const auto fire = io::load_fire<double>(file, prefix, FireOptions::dape(0));
    EXPECT_EQ(fire.options().threshold, 4.0);
    expect_dape_golden("dape_fire_causal.json", io::load_dape<double>(file, prefix, fire));
  }
  {
    const SafetensorsFile file = open_fixture("dapev2_kerple.safetensors");
    const std::string prefix = "2.attention.kerple_dapev2.";
    const auto v2 = io::load_dape_v2<double>(file, prefix, io::load_kerple<double>(file, prefix));
    EXPECT_EQ(v2.kernel_size(), 3);
    expect_dape_golden("dapev2_kerple_conv3_causal.json", v2);
  }
}

TEST(CheckpointGolden, SpeParametersOfTheSpeRepositoryWithTheGoldenDraws) {
  {
    const Json golden = load_golden("spe_sine.json");
    const Json& in = golden["inputs"];
    const SafetensorsFile file = open_fixture("spe_sine.safetensors");
    auto parameters = io::load_sine_spe_parameters<double>(file, "transformer_decoder.spe.0.");
    const Matrix<double> gate =
        io::load_spe_gate<double>(file, "transformer_decoder.spe_filters.0.", 2, 4);
    EXPECT_EQ(gate, to_matrix(in["gate"]));
    SineSpeDraw<double> draw{Heads<double>(2, 4 * 2 * 3, 6)};
    draw.noise.flat() = flatten(in["z_raw_standard_normal"]);
    const SineSpe<double> spe(
        std::move(parameters), draw,
        SpeGate<double>(gate, to_heads(in["gating_noise_raw_standard_normal"])));
    for (std::size_t b = 0; b < 2; ++b) {
      EXPECT_LE(relative_error(spe.filter_queries(tokens_to_heads(in["queries"][b])).flat(),
                               tokens_to_heads(golden["outputs"]["gated"]["qhat"][b]).flat()),
                1e-12);
      EXPECT_LE(relative_error(spe.filter_keys(tokens_to_heads(in["keys"][b])).flat(),
                               tokens_to_heads(golden["outputs"]["gated"]["khat"][b]).flat()),
                1e-12);
    }
  }
  {
    const Json golden = load_golden("spe_conv.json");
    const Json& in = golden["inputs"];
    const SafetensorsFile file = open_fixture("spe_conv.safetensors");
    auto parameters = io::load_conv_spe_parameters<double>(file, "transformer_decoder.spe.0.", 2);
    const Matrix<double> gate =
        io::load_spe_gate<double>(file, "transformer_decoder.spe_filters.0.", 2, 4);
    Heads<double> noise(6, 8, 10 + 4 * 3);  // [R][H·D][L + 4ks]
    noise.flat() = flatten(in["z_raw_standard_normal"]);
    const ConvSpe<double> spe(
        std::move(parameters), ConvSpeDraw<double>(noise),
        SpeGate<double>(gate, to_heads(in["gating_noise_raw_standard_normal"])));
    for (std::size_t b = 0; b < 2; ++b) {
      EXPECT_LE(relative_error(spe.filter_queries(tokens_to_heads(in["queries"][b])).flat(),
                               tokens_to_heads(golden["outputs"]["gated"]["qhat"][b]).flat()),
                1e-12);
      EXPECT_LE(relative_error(spe.filter_keys(tokens_to_heads(in["keys"][b])).flat(),
                               tokens_to_heads(golden["outputs"]["gated"]["khat"][b]).flat()),
                1e-12);
    }
  }
}

TEST(CheckpointGolden, ShawTablesByTensor2TensorVariableNames) {
  const Json golden = load_golden("shaw.json");
  const Json& in = golden["inputs"];
  const auto shaw =
      io::load_shaw<double>(open_fixture("shaw.safetensors"),
                            "transformer/body/encoder/layer_0/self_attention/multihead_attention/"
                            "dot_product_attention_relative/");
  EXPECT_EQ(shaw.max_relative_position(), in["max_relative_position_k"].get<Index>());
  EXPECT_EQ(shaw.values(), ShawValues::separate);
  const Heads<double> out =
      attention(to_heads(in["q[b][h][i][d]"][0]), to_heads(in["k[b][h][j][d]"][0]),
                to_heads(in["v[b][h][j][d]"][0]), shaw, AttentionOptions{.mask = Mask::none()});
  EXPECT_LE(relative_error(out.flat(), to_heads(golden["outputs"]["output[b][h][i][d]"][0]).flat()),
            1e-12);
}

// ---------------------------------------------------------------------------------------------
// Round trips: save, read the bytes back, load; F64 exact, F32 the float rounding.

template <class T>
class CheckpointRoundTrip : public ::testing::Test {};
TYPED_TEST_SUITE(CheckpointRoundTrip, Scalars);

TYPED_TEST(CheckpointRoundTrip, T5BothStacks) {
  using T = TypeParam;
  auto rng = make_rng(1601);
  const auto encoder = T5RelativeBias<T>::random(3, 0.5, rng, {.num_buckets = 32});
  const auto decoder = T5RelativeBias<T>::random(
      3, 0.5, rng, {.num_buckets = 16, .max_distance = 64, .bidirectional = false});
  SafetensorsWriter writer;
  io::save(writer, encoder, io::t5_bias_prefix(io::T5Stack::encoder));
  io::save(writer, decoder, io::t5_bias_prefix(io::T5Stack::decoder));
  const SafetensorsFile file = reread(writer);
  const Dtype stored = std::is_same_v<T, float> ? Dtype::F32 : Dtype::F64;
  EXPECT_EQ(file.info("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight").dtype,
            stored);
  const auto e = io::load_t5_bias<T>(file);
  const auto d = io::load_t5_bias<T>(file, io::T5Stack::decoder, 64);
  EXPECT_EQ(e.table(), encoder.table());
  EXPECT_EQ(d.table(), decoder.table());
  EXPECT_TRUE(e.options().bidirectional);
  EXPECT_FALSE(d.options().bidirectional);
  EXPECT_EQ(d.options().num_buckets, 16);
  EXPECT_EQ(bias_tile(d, 2, 9, 40), bias_tile(decoder, 2, 9, 40));
}

TYPED_TEST(CheckpointRoundTrip, LearnedAbsoluteTablesOfEveryLayout) {
  using T = TypeParam;
  const auto gpt2 = LearnedAbsoluteEncoding<T>::normal(10, 4, 0.02, 1);
  const auto bert = LearnedAbsoluteEncoding<T>::normal(9, 4, 0.02, 2);
  const auto opt = LearnedAbsoluteEncoding<T>::normal(12, 4, 0.02, 3, 2);
  const auto bart = LearnedAbsoluteEncoding<T>::normal(11, 4, 0.02, 4, 2);
  SafetensorsWriter writer;
  io::save(writer, gpt2, "transformer.wpe.");
  io::save(writer, bert, "bert.embeddings.position_embeddings.");
  io::save(writer, opt, "decoder.embed_positions.");  // OPTModel (no "model.")
  io::save(writer, bart, "model.encoder.embed_positions.");
  const SafetensorsFile file = reread(writer);
  EXPECT_EQ(io::load_learned_absolute<T>(file, io::PositionTable::gpt2).table(), gpt2.table());
  EXPECT_EQ(io::load_learned_absolute<T>(file, io::PositionTable::bert).table(), bert.table());
  const auto o = io::load_learned_absolute<T>(file, io::PositionTable::opt);
  EXPECT_EQ(o.table(), opt.table());
  EXPECT_EQ(o.position_offset(), 2);
  const auto b = io::load_learned_absolute<T>(file, io::PositionTable::bart_encoder);
  EXPECT_EQ(b.table(), bart.table());
  EXPECT_EQ(b.position_offset(), 2);
  EXPECT_EQ(io::load_learned_absolute<T>(file, "transformer.wpe.", 0).rows(), 10);  // explicit
}

TYPED_TEST(CheckpointRoundTrip, KerpleFireAlibiShaw) {
  using T = TypeParam;
  auto rng = make_rng(1602);
  Vector<double> r1 = Vector<double>::Random(4);  // raw values below the clamp survive too
  const Kerple<T> log_kernel(KerpleKernel::log, r1, Vector<double>::Random(4));
  const Kerple<T> power_kernel = Kerple<T>::random(KerpleKernel::power, 4, rng);
  FireOptions options = FireOptions::dape(128);
  options.c = 0.37;
  options.threshold_multiplier = -1.25;
  const Fire<T> fire = Fire<T>::random(4, 6, rng, options);
  const Alibi<T> alibi(5, BiasForm::symmetric);
  const auto shaw = ShawRelative<T>::random(3, 4, 5, ShawValues::separate, rng);
  const auto tied = ShawRelative<T>::random(2, 4, 0, ShawValues::tied, rng);
  SafetensorsWriter writer;
  io::save(writer, log_kernel, "2.attention.rpe.");
  io::save(writer, power_kernel, "3.attention.rpe.");
  io::save(writer, fire, "2.attention.fire_c.");
  io::save(writer, alibi, "alibi.");
  io::save(writer, shaw, "t2t/");
  io::save(writer, tied, "encoder.transformer.0.self_attn.");
  const SafetensorsFile file = reread(writer);
  EXPECT_EQ(file.info("2.attention.rpe.bias_p").shape, (std::vector<Index>{4, 1, 1}));
  EXPECT_TRUE(file.info("2.attention.fire_c.c").shape.empty());

  const auto k1 = io::load_kerple<T>(file, "2.attention.rpe.");
  EXPECT_EQ(k1.raw_r1(), as_stored<T>(log_kernel.raw_r1()));
  EXPECT_EQ(k1.raw_r2(), as_stored<T>(log_kernel.raw_r2()));
  const auto k2 = io::load_kerple<T>(file, "3.attention.rpe.", KerpleKernel::power);
  EXPECT_EQ(k2.raw_r1(), as_stored<T>(power_kernel.raw_r1()));
  EXPECT_EQ(k2.raw_r2(), as_stored<T>(power_kernel.raw_r2()));

  const auto f = io::load_fire<T>(file, "2.attention.fire_c.", FireOptions::dape(0));
  EXPECT_EQ(f.w1(), as_stored<T>(fire.w1()));
  EXPECT_EQ(f.b1(), as_stored<T>(fire.b1()));
  EXPECT_EQ(f.w2(), as_stored<T>(fire.w2()));
  EXPECT_EQ(f.b2(), as_stored<T>(fire.b2()));
  EXPECT_EQ(f.options().c, static_cast<double>(static_cast<T>(0.37)));
  EXPECT_EQ(f.options().threshold, 64.0);
  EXPECT_EQ(f.options().threshold_multiplier, -1.25);
  if constexpr (std::is_same_v<T, double>) {
    EXPECT_EQ(bias_tile(f, 3, 70, 70), bias_tile(fire, 3, 70, 70));
  }

  const auto a = io::load_alibi<T>(file, "alibi.", BiasForm::symmetric);
  EXPECT_EQ(a.slopes(), as_stored<T>(alibi.slopes()));

  const auto s = io::load_shaw<T>(file, "t2t/");
  EXPECT_EQ(s.values(), ShawValues::separate);
  EXPECT_EQ(s.max_relative_position(), 3);
  EXPECT_EQ(s.key_table(), shaw.key_table());
  EXPECT_EQ(s.value_table(), shaw.value_table());
  const auto t = io::load_shaw<T>(file, "encoder.transformer.0.self_attn.");
  EXPECT_EQ(t.values(), ShawValues::tied);
  EXPECT_EQ(t.key_table(), tied.key_table());
}

TYPED_TEST(CheckpointRoundTrip, DapeAndDapeV2WithAndWithoutABaseBias) {
  using T = TypeParam;
  auto rng = make_rng(1603);
  const auto kerple = Kerple<T>::random(KerpleKernel::log, 3, rng);
  const auto fire = Fire<T>::random(3, 5, rng, FireOptions::dape(32));
  const auto dape = Dape<T, Kerple<T>>::random(kerple, 7, rng);
  const auto v2 = DapeV2<T, Fire<T>>::random(fire, 6, 5, rng);
  const auto plain = Dape<T>::random(3, 4, rng);
  const auto plain_v2 = DapeV2<T>::random(3, 4, 3, rng);
  SafetensorsWriter writer;
  io::save(writer, dape, "2.attention.kerple_c.");
  io::save(writer, v2, "2.attention.fire_dapev2.");
  io::save(writer, plain, "2.attention.nope_c.");
  io::save(writer, plain_v2, "2.attention.nope_c_ffn.");
  const SafetensorsFile file = reread(writer);
  const std::vector<Index> w1_shape{6, 6, 1, 5};
  const std::vector<Index> w2_shape{3, 6, 1, 5};
  EXPECT_EQ(file.info("2.attention.fire_dapev2.mlp2.0.weight").shape, w1_shape);
  EXPECT_EQ(file.info("2.attention.fire_dapev2.mlp2.2.weight").shape, w2_shape);
  EXPECT_TRUE(file.contains("2.attention.fire_dapev2.init_L"));
  const auto same_weights = [](const DapeWeights& got, const DapeWeights& want) {
    EXPECT_EQ(got.w1, as_stored<T>(want.w1));
    EXPECT_EQ(got.b1, as_stored<T>(want.b1));
    EXPECT_EQ(got.w2, as_stored<T>(want.w2));
    EXPECT_EQ(got.b2, as_stored<T>(want.b2));
  };
  const std::string kp = "2.attention.kerple_c.";
  const auto d = io::load_dape<T>(file, kp, io::load_kerple<T>(file, kp));
  same_weights(d.weights(), dape.weights());
  EXPECT_EQ(d.base_bias().raw_r1(), as_stored<T>(kerple.raw_r1()));
  const std::string fp = "2.attention.fire_dapev2.";
  const auto e = io::load_dape_v2<T>(file, fp, io::load_fire<T>(file, fp, FireOptions::dape(0)));
  EXPECT_EQ(e.kernel_size(), 5);
  same_weights(e.weights(), v2.weights());
  same_weights(io::load_dape<T>(file, "2.attention.nope_c.").weights(), plain.weights());
  const auto p2 = io::load_dape_v2<T>(file, "2.attention.nope_c_ffn.");
  EXPECT_EQ(p2.kernel_size(), 3);
  same_weights(p2.weights(), plain_v2.weights());
}

TYPED_TEST(CheckpointRoundTrip, SineAndConvSpeGatedWithTheSameSeed) {
  using T = TypeParam;
  const auto sine_parameters = SineSpeParameters<T>::initial(2, 4, 3, 11);
  const Matrix<T> gate = Matrix<T>::Random(2, 4);
  const SineSpe<T> sine(sine_parameters, 8, 5, gate);
  const auto conv_parameters = ConvSpeParameters<T>::initial(2, 4, 3, 12);
  const ConvSpe<T> conv(conv_parameters, 8, 6, gate);
  SafetensorsWriter writer;
  io::save(writer, sine, "transformer_decoder.spe.0.", "transformer_decoder.spe_filters.0.");
  io::save(writer, conv, "conv_spe.");
  const SafetensorsFile file = reread(writer);
  EXPECT_EQ(file.info("conv_spe.conv_q.weight").shape, (std::vector<Index>{8, 1, 3}));
  const auto s = io::load_sine_spe<T>(file, "transformer_decoder.spe.0.", 8, 5,
                                      "transformer_decoder.spe_filters.0.");
  EXPECT_EQ(s.parameters().frequencies.flat(), sine_parameters.frequencies.flat());
  EXPECT_EQ(s.parameters().offsets.flat(), sine_parameters.offsets.flat());
  EXPECT_EQ(s.parameters().gains.flat(), sine_parameters.gains.flat());
  ASSERT_NE(s.gate(), nullptr);
  EXPECT_EQ(s.gate()->gate(), gate);
  const auto c = io::load_conv_spe<T>(file, "conv_spe.", 2, 8, 6, "conv_spe.");
  EXPECT_EQ(c.parameters().query_filter.flat(), conv_parameters.query_filter.flat());
  EXPECT_EQ(c.parameters().key_filter.flat(), conv_parameters.key_filter.flat());
  auto rng = make_rng(1604);
  const Heads<T> q = random_heads<T>(2, 7, 4, rng);
  EXPECT_EQ(s.filter_queries(q).flat(), sine.filter_queries(q).flat());
  EXPECT_EQ(c.filter_keys(q).flat(), conv.filter_keys(q).flat());
  // Without a filter prefix the loaded encoder is ungated.
  EXPECT_EQ(io::load_sine_spe<T>(file, "transformer_decoder.spe.0.", 8, 5).gate(), nullptr);
}

TEST(CheckpointRoundTripFile, WrittenToDiskAndInOtherDtypes) {
  auto rng = make_rng(1605);
  const auto t5 = T5RelativeBias<double>::random(2, 1.0, rng);
  const auto kerple = Kerple<double>::random(KerpleKernel::log, 2, rng);
  SafetensorsWriter writer;
  io::save(writer, t5, io::t5_bias_prefix(io::T5Stack::encoder), Dtype::F32);
  io::save(writer, kerple, "attention.rpe.", Dtype::BF16);
  const std::filesystem::path path =
      std::filesystem::temp_directory_path() /
      ("posenc_checkpoint_test_" + std::to_string(test_seed()) + ".safetensors");
  writer.write(path);
  const SafetensorsFile file = SafetensorsFile::open(path);
  std::filesystem::remove(path);
  EXPECT_EQ(io::load_t5_bias<double>(file).table(), as_stored<float>(t5.table()));
  EXPECT_EQ(file.info("attention.rpe.bias_a").dtype, Dtype::BF16);
  const auto k = io::load_kerple<double>(file, "attention.rpe.");
  for (Index h = 0; h < 2; ++h) {  // bfloat16 keeps 8 significant bits
    EXPECT_NEAR(k.raw_r1()[h], kerple.raw_r1()[h], std::abs(kerple.raw_r1()[h]) / 128.0);
  }
}

// ---------------------------------------------------------------------------------------------
// Malformed checkpoints: every error names the function, the file and the tensor.

TEST(CheckpointErrors, MissingTensorsAreNamedWithTheTensorsEndingAlike) {
  const SafetensorsFile kerple = open_fixture("kerple_log.safetensors");
  // The pipeline checkpoint's layers are numbered: the bare layer prefix is not there.
  POSENC_EXPECT_INVALID(io::load_kerple<double>(kerple, "attention.rpe."),
                        "posenc::io::load_kerple", "kerple_log.safetensors",
                        "no tensor \"attention.rpe.bias_p\"", "\"2.attention.rpe.bias_p\"",
                        "\"3.attention.rpe.bias_p\"");
  POSENC_EXPECT_INVALID(io::load_t5_bias<float>(open_fixture("gpt2.safetensors")),
                        "posenc::io::load_t5_bias", "gpt2.safetensors",
                        "no tensor \"encoder.block.0.layer.0.SelfAttention.relative_attention_"
                        "bias.weight\"",
                        "the file holds 3");
  POSENC_EXPECT_INVALID(
      io::load_learned_absolute<float>(open_fixture("opt.safetensors"), io::PositionTable::gpt2),
      "posenc::io::load_learned_absolute", "opt.safetensors",
      "\"transformer.wpe.weight\" or \"wpe.weight\"", "\"model.decoder.embed_positions.weight\"");
  SafetensorsWriter writer;
  auto rng = make_rng(1606);
  io::save(writer, Fire<double>::random(2, 3, rng), "fire.");
  io::save(writer, Dape<double>::random(2, 3, rng), "dape.");
  SafetensorsWriter without_init_l;
  SafetensorsWriter without_b2;
  const SafetensorsFile full = reread(writer);
  for (const std::string& name : full.names()) {
    const std::vector<double> values = full.values<double>(name);
    if (name != "fire.init_L") without_init_l.add(name, values, full.info(name).shape);
    if (name != "dape.mlp2.2.bias") without_b2.add(name, values, full.info(name).shape);
  }
  POSENC_EXPECT_INVALID(io::load_fire<double>(reread(without_init_l, "no_init_L"), "fire."),
                        "posenc::io::load_fire", "no_init_L", "no tensor \"fire.init_L\"");
  POSENC_EXPECT_INVALID(io::load_dape<double>(reread(without_b2, "no_b2"), "dape."),
                        "posenc::io::load_dape_network", "no_b2", "no tensor \"dape.mlp2.2.bias\"");
  POSENC_EXPECT_INVALID(
      io::load_sine_spe<double>(open_fixture("spe_sine.safetensors"), "transformer_decoder.spe.0.",
                                4, 1, "transformer_decoder.spe.0."),
      "posenc::io::load_spe_gate", "no tensor \"transformer_decoder.spe.0.gate\"",
      "\"transformer_decoder.spe_filters.0.gate\"");
}

TEST(CheckpointErrors, WrongShapesAreNamedWithTheShapeAndWhatWasExpected) {
  const auto file_of = [](const std::string& source, auto&& fill) {
    SafetensorsWriter writer;
    fill(writer);
    return reread(writer, source);
  };
  const auto zeros = [](std::vector<Index> shape) {
    Index count = 1;
    for (Index extent : shape) count *= extent;
    return std::vector<double>(static_cast<std::size_t>(count), 0.5);
  };
  const std::string t5_name =
      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";
  POSENC_EXPECT_INVALID(
      io::load_t5_bias<float>(file_of("t5_3d",
                                      [&](SafetensorsWriter& w) {
                                        w.add(t5_name, zeros({32, 2, 1}), {32, 2, 1});
                                      })),
      "posenc::io::load_t5_bias", "'t5_3d'", t5_name.c_str(), "shape [32, 2, 1]",
      "expected [num_buckets, heads]");
  POSENC_EXPECT_INVALID(
      io::load_kerple<double>(file_of("kerple_2d",
                                      [&](SafetensorsWriter& w) {
                                        w.add("rpe.bias_p", zeros({3, 1, 1}), {3, 1, 1});
                                        w.add("rpe.bias_a", zeros({3, 2}), {3, 2});
                                      }),
                              "rpe."),
      "posenc::io::load_kerple", "kerple_2d", "tensor \"rpe.bias_a\"", "shape [3, 2]",
      "expected [heads, 1, 1]");
  POSENC_EXPECT_INVALID(
      io::load_kerple<double>(file_of("kerple_heads",
                                      [&](SafetensorsWriter& w) {
                                        w.add("rpe.bias_p", zeros({3, 1, 1}), {3, 1, 1});
                                        w.add("rpe.bias_a", zeros({4, 1, 1}), {4, 1, 1});
                                      }),
                              "rpe."),
      "posenc::io::load_kerple", "\"rpe.bias_p\" [3, 1, 1] F64 and \"rpe.bias_a\" [4, 1, 1] F64",
      "one entry per head");
  auto rng = make_rng(1607);
  SafetensorsWriter fire_writer;
  io::save(fire_writer, Fire<double>::random(2, 4, rng), "fire.");
  const SafetensorsFile fire_file = reread(fire_writer);
  SafetensorsWriter bad_fire;
  for (const std::string& name : fire_file.names()) {
    if (name == "fire.mlp.2.weight") {
      bad_fire.add(name, zeros({2, 5}), {2, 5});
    } else {
      bad_fire.add(name, fire_file.values<double>(name), fire_file.info(name).shape);
    }
  }
  POSENC_EXPECT_INVALID(io::load_fire<double>(reread(bad_fire, "fire_w2"), "fire."),
                        "posenc::io::load_fire", "fire_w2", "tensor \"fire.mlp.2.weight\"",
                        "shape [2, 5]", "expected [heads, 4]");
  // A DAPE V2 (Conv2d) network loaded as DAPE, and the reverse; a Conv2d second layer with a
  // Linear first one.
  SafetensorsWriter dape_writer;
  io::save(dape_writer, DapeV2<double>::random(2, 3, 3, rng), "v2.");
  io::save(dape_writer, Dape<double>::random(2, 3, rng), "v1.");
  const SafetensorsFile dape_file = reread(dape_writer, "dapes");
  POSENC_EXPECT_INVALID(io::load_dape<double>(dape_file, "v2."), "posenc::io::load_dape", "dapes",
                        "tensor \"v2.mlp2.0.weight\"", "shape [3, 2, 1, 3]", "load_dape_v2");
  POSENC_EXPECT_INVALID(io::load_dape_v2<double>(dape_file, "v1."), "posenc::io::load_dape_v2",
                        "tensor \"v1.mlp2.0.weight\"", "shape [3, 2]", "load it with load_dape");
  POSENC_EXPECT_INVALID(
      io::load_dape<double>(file_of("dape_mixed",
                                    [&](SafetensorsWriter& w) {
                                      w.add("d.mlp2.0.weight", zeros({3, 4}), {3, 4});
                                      w.add("d.mlp2.0.bias", zeros({3}), {3});
                                      w.add("d.mlp2.2.weight", zeros({2, 3, 1, 1}), {2, 3, 1, 1});
                                      w.add("d.mlp2.2.bias", zeros({2}), {2});
                                    }),
                            "d."),
      "posenc::io::load_dape_network", "tensor \"d.mlp2.2.weight\"", "shape [2, 3, 1, 1]",
      "expected [heads, 3] (nn.Linear");
  POSENC_EXPECT_INVALID(io::load_sine_spe_parameters<double>(
                            file_of("spe_gains",
                                    [&](SafetensorsWriter& w) {
                                      w.add("spe.freqs", zeros({2, 4, 3}), {2, 4, 3});
                                      w.add("spe.offsets", zeros({2, 4, 3}), {2, 4, 3});
                                      w.add("spe.gains", zeros({2, 4, 2}), {2, 4, 2});
                                    }),
                            "spe."),
                        "posenc::io::load_sine_spe_parameters", "tensor \"spe.gains\"",
                        "shape [2, 4, 2]", "expected [2, 4, 3]");
  POSENC_EXPECT_INVALID(io::load_conv_spe_parameters<double>(
                            file_of("conv_heads",
                                    [&](SafetensorsWriter& w) {
                                      w.add("spe.conv_q.weight", zeros({8, 1, 3}), {8, 1, 3});
                                      w.add("spe.conv_k.weight", zeros({8, 1, 3}), {8, 1, 3});
                                    }),
                            "spe.", 3),
                        "posenc::io::load_conv_spe_parameters", "tensor \"spe.conv_q.weight\"",
                        "shape [8, 1, 3]", "divisible by heads = 3");
  POSENC_EXPECT_INVALID(
      io::load_shaw<double>(
          file_of("shaw_even",
                  [&](SafetensorsWriter& w) {
                    w.add("t2t/relative_positions_keys/embeddings", zeros({4, 2}), {4, 2});
                  }),
          "t2t/"),
      "posenc::io::load_shaw", "tensor \"t2t/relative_positions_keys/embeddings\"", "shape [4, 2]",
      "odd number of rows");
  POSENC_EXPECT_INVALID(
      io::load_learned_absolute<double>(
          file_of("wpe_1d", [&](SafetensorsWriter& w) { w.add("wpe.weight", zeros({16}), {16}); }),
          io::PositionTable::gpt2),
      "posenc::io::load_learned_absolute", "tensor \"wpe.weight\"", "shape [16]",
      "expected [rows, dim]");
  POSENC_EXPECT_INVALID(
      io::load_fire<double>(file_of("fire_c",
                                    [&](SafetensorsWriter& w) {
                                      w.add("f.mlp.0.weight", zeros({2, 1}), {2, 1});
                                      w.add("f.mlp.0.bias", zeros({2}), {2});
                                      w.add("f.mlp.2.weight", zeros({1, 2}), {1, 2});
                                      w.add("f.mlp.2.bias", zeros({1}), {1});
                                      w.add("f.c", zeros({2}), {2});
                                    }),
                            "f."),
      "posenc::io::load_fire", "tensor \"f.c\"", "shape [2]", "a scalar");
}

TEST(CheckpointErrors, WrongDtypesAndRejectedValues) {
  SafetensorsWriter writer;
  writer.add("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
             std::vector<std::int64_t>(8, 1), {4, 2});
  writer.add("rpe.bias_p", std::vector<double>{1.0, std::numeric_limits<double>::quiet_NaN()},
             {2, 1, 1});
  writer.add("rpe.bias_a", std::vector<double>{1.0, 1.0}, {2, 1, 1});
  writer.add("small.relative_attention_bias.weight", std::vector<double>(4, 0.0), {2, 2});
  const SafetensorsFile file = reread(writer, "bad_values");
  POSENC_EXPECT_INVALID(io::load_t5_bias<float>(file), "posenc::io::load_t5_bias", "bad_values",
                        "relative_attention_bias.weight\"", "dtype I64",
                        "expected a floating-point tensor");
  // The encoder's own check, reported with the file and the tensors read.
  POSENC_EXPECT_INVALID(io::load_kerple<double>(file, "rpe."), "posenc::io::load_kerple",
                        "bad_values", "\"rpe.bias_p\" [2, 1, 1] F64", "posenc::Kerple",
                        "r1[1] = nan");
  POSENC_EXPECT_INVALID(io::load_t5_bias<double>(file, "small.", true), "posenc::io::load_t5_bias",
                        "\"small.relative_attention_bias.weight\" "
                        "[2, 2] F64",
                        "posenc::T5RelativeBias", "too small");
  // Power KERPLE: the weight kernel is refused rather than dropped.
  SafetensorsWriter power;
  power.add("rpe.bias_a", std::vector<double>{0.5}, {1, 1, 1});
  power.add("rpe.wei_a", std::vector<double>{0.5}, {1, 1, 1});
  POSENC_EXPECT_INVALID(io::load_kerple<double>(reread(power, "wei"), "rpe.", KerpleKernel::power),
                        "posenc::io::load_kerple", "tensor \"rpe.wei_a\"", "weight kernel");
  // Saving needs a floating dtype.
  auto rng = make_rng(1608);
  SafetensorsWriter out;
  POSENC_EXPECT_INVALID(
      io::save(out, Kerple<double>::random(KerpleKernel::log, 2, rng), "k.", Dtype::I32),
      "posenc::io::save(Kerple)", "dtype I32");
}

TEST(CheckpointKerple, PowerWithoutAnExponentIsTheOriginalConfiguration) {
  // kerple_power_original: bias_a holds ALiBi's slopes, no bias_p (exponent 1).
  SafetensorsWriter writer;
  const Vector<double> slopes = alibi_slopes(3);
  writer.add("rpe.bias_a", std::vector<double>(slopes.data(), slopes.data() + 3), {3, 1, 1});
  const auto kerple = io::load_kerple<double>(reread(writer), "rpe.", KerpleKernel::power);
  EXPECT_EQ(kerple.raw_r2(), Vector<double>::Ones(3));
  const Heads<double> want = to_heads(load_golden("kerple.json")["outputs"]["power_original_bias"]);
  for (Index h = 0; h < 3; ++h) {
    EXPECT_LE(relative_error(bias_tile(kerple, h, 6, 6), want.head(h)), 1e-12);
  }
}

}  // namespace posenc::test::checkpoint_test
