// SPDX-License-Identifier: MIT
// RoPE settings from model configs: HF config.json files (tests/data/hf_configs/) against the
// inverse frequencies and attention factors HF's code gives (tests/data/rope_configs.json), the
// GGUF reader on tests/data/gguf/*.gguf (every value type) and the GGUF -> RoPE mapping against
// the same HF goldens, and malformed configs and GGUF files, each error naming its key.
#include "posenc/io/rope_config.hpp"

#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "support/golden.hpp"
#include "support/test_support.hpp"

namespace posenc::test::rope_config_test {

using io::GgufFile;
using io::RopeConfig;
using io::RopeConfigOptions;

inline std::string data_path(const std::string& name) {
  return std::string(POSENC_TEST_DATA_DIR) + "/" + name;
}

inline Json golden_case(const std::string& config, Index sequence_length) {
  const Json golden = load_golden("rope_configs.json");
  for (const Json& c : golden.at("cases")) {
    if (c.at("config").get<std::string>() == config &&
        c.at("sequence_length").get<Index>() == sequence_length) {
      return c;
    }
  }
  ADD_FAILURE() << "no golden case " << config << " @ " << sequence_length;
  return {};
}

/// Frequencies and magnitude of `config` against a golden case, relative error <= tolerance.
inline void expect_matches(const RopeConfig& config, const Json& golden, double tolerance,
                           const std::string& what) {
  EXPECT_EQ(config.options.rotary_dim, golden.at("rotary_dim").get<Index>()) << what;
  const RotaryEncoding<double> rope = config.encoder<double>();
  const auto want = golden.at("inv_freq").get<std::vector<double>>();
  ASSERT_EQ(rope.frequencies().size(), want.size()) << what;
  for (std::size_t k = 0; k < want.size(); ++k) {
    EXPECT_LE(std::abs(rope.frequencies()[k] - want[k]), tolerance * want[k]) << what << " k=" << k;
  }
  const double attention = golden.at("attention_factor").get<double>();
  EXPECT_LE(std::abs(rope.magnitude() - attention), tolerance * attention) << what;
}

/// The message of the std::invalid_argument `make` throws ("no exception" otherwise).
template <class Make>
std::string error_of(Make&& make) {
  try {
    make();
  } catch (const std::invalid_argument& e) {
    return e.what();
  }
  return "no exception";
}

#define ROPE_CONFIG_EXPECT_ERROR(expression, ...)                                             \
  do {                                                                                        \
    const std::string message_ = error_of([&] { (void)(expression); });                       \
    for (const std::string& part_ : std::initializer_list<std::string>{__VA_ARGS__}) {        \
      EXPECT_NE(message_.find(part_), std::string::npos) << part_ << " not in: " << message_; \
    }                                                                                         \
  } while (false)

// ---------------------------------------------------------------------------------------------
// HF config.json

TEST(RopeConfigHf, RealConfigsMatchHfInverseFrequenciesAndAttentionFactor) {
  const Json golden = load_golden("rope_configs.json");
  for (const Json& c : golden.at("cases")) {
    const std::string name = c.at("config").get<std::string>();
    const Index length = c.at("sequence_length").get<Index>();
    const RopeConfig config = io::rope_config_from_hf_file(
        data_path("hf_configs/" + name + ".json"), {.sequence_length = length});
    const std::string what = name + " @ " + std::to_string(length);
    EXPECT_EQ(config.head_dim, c.at("head_dim").get<Index>()) << what;
    EXPECT_EQ(config.options.base, c.at("base").get<double>()) << what;
    EXPECT_EQ(config.rope_type, c.at("rope_type").get<std::string>()) << what;
    EXPECT_EQ(config.options.pairing, RotaryPairing::half) << what;
    expect_matches(config, c, 1e-12, what);
    EXPECT_NO_THROW(config.encoder<float>()) << what;
  }
}

TEST(RopeConfigHf, KeysLandWhereTheyBelong) {
  const RopeConfig llama = io::rope_config_from_hf_file(data_path("hf_configs/llama3_1_8b.json"));
  EXPECT_EQ(llama.options.scaling.kind, RopeScaling::Kind::llama3);
  EXPECT_EQ(llama.options.scaling.factor, 8.0);
  EXPECT_EQ(llama.options.scaling.original_context, 8192);
  EXPECT_EQ(llama.max_position_embeddings, 131072);
  const RopeConfig phi3 = io::rope_config_from_hf_file(data_path("hf_configs/phi3_mini_128k.json"),
                                                       {.sequence_length = 5000});
  EXPECT_EQ(phi3.options.scaling.kind, RopeScaling::Kind::longrope);
  EXPECT_EQ(phi3.options.scaling.original_context, 4096);  // the top-level key
  EXPECT_EQ(phi3.options.scaling.factor, 32.0);            // 131072 / 4096
  EXPECT_TRUE(phi3.options.scaling.uses_long_factors());
  const RopeConfig partial =
      io::rope_config_from_hf_file(data_path("hf_configs/partial_dynamic.json"));
  EXPECT_EQ(partial.head_dim, 64);
  EXPECT_EQ(partial.options.rotary_dim, 32);
  const RopeConfig qwen = io::rope_config_from_hf_file(data_path("hf_configs/qwen2_5_7b_yarn.json"),
                                                       {.pairing = RotaryPairing::interleaved});
  EXPECT_EQ(qwen.options.pairing, RotaryPairing::interleaved);
  EXPECT_EQ(qwen.rope_type, "yarn");  // from the legacy "type" key
  const RopeConfig v5 =
      io::rope_config_from_hf_file(data_path("hf_configs/v5_yarn_no_truncate.json"));
  EXPECT_FALSE(v5.options.scaling.yarn_options.truncate);
  EXPECT_EQ(v5.options.base, 150000.0);  // rope_theta inside rope_parameters
}

TEST(RopeConfigHf, PerLayerTypeParametersNeedAChoice) {
  const Json config = Json::parse(R"({"hidden_size": 1024, "num_attention_heads": 4,
      "max_position_embeddings": 32768, "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}}})");
  ROPE_CONFIG_EXPECT_ERROR(io::rope_config_from_hf(config, {}, "gemma3.json"), "gemma3.json",
                           "rope_parameters", "sliding_attention", "layer_type");
  const RopeConfig full = io::rope_config_from_hf(config, {.layer_type = "full_attention"});
  EXPECT_EQ(full.options.base, 1e6);
  EXPECT_EQ(full.options.scaling.kind, RopeScaling::Kind::linear);
  ROPE_CONFIG_EXPECT_ERROR(io::rope_config_from_hf(config, {.layer_type = "global"}),
                           "rope_parameters.global", "is missing");
}

TEST(RopeConfigHfErrors, MalformedConfigsNameTheFunctionTheFileAndTheKey) {
  const std::string base = R"("hidden_size": 4096, "num_attention_heads": 32,
                              "max_position_embeddings": 8192, "rope_theta": 10000.0)";
  auto hf = [&](const std::string& scaling, const std::string& extra = "") {
    const Json config = Json::parse(
        "{" + base + extra + (scaling.empty() ? "" : ", \"rope_scaling\": " + scaling) + "}");
    return io::rope_config_from_hf(config, {}, "bad_config.json");
  };
  const std::string fn = "posenc::io::rope_config_from_hf: 'bad_config.json'";
  ROPE_CONFIG_EXPECT_ERROR(hf(R"({"rope_type": "ntk-by-parts", "factor": 2.0})"), fn,
                           "rope_scaling.rope_type", "unknown RoPE type 'ntk-by-parts'");
  ROPE_CONFIG_EXPECT_ERROR(hf(R"({"type": "linear"})"), fn, "rope_scaling.factor", "is missing",
                           "'linear'");
  ROPE_CONFIG_EXPECT_ERROR(hf(R"({"type": "linear", "factor": "4"})"), fn, "rope_scaling.factor",
                           "must be a number, got string \"4\"");
  ROPE_CONFIG_EXPECT_ERROR(hf(R"({"type": "linear", "factor": -2})"), fn, "rope_scaling.factor",
                           "must be > 0");
  ROPE_CONFIG_EXPECT_ERROR(hf(R"({"type": "longrope", "long_factor": [1.0]})"), fn,
                           "rope_scaling.short_factor", "is missing");
  ROPE_CONFIG_EXPECT_ERROR(
      hf(R"({"type": "longrope", "short_factor": [1, 1], "long_factor": [1, 1]})"), fn,
      "rope_scaling.short_factor", "has 2 entries", "64 pairs");
  ROPE_CONFIG_EXPECT_ERROR(hf(R"({"type": "longrope", "short_factor": "abc", "long_factor": []})"),
                           fn, "rope_scaling.short_factor", "must be an array of numbers");
  ROPE_CONFIG_EXPECT_ERROR(hf(R"({"rope_type": "yarn", "factor": 0.5})"), fn, "rope_scaling.factor",
                           "must be >= 1 for yarn");
  ROPE_CONFIG_EXPECT_ERROR(hf(R"({"rope_type": "yarn", "factor": 4, "truncate": "no"})"), fn,
                           "rope_scaling.truncate", "must be true or false");
  ROPE_CONFIG_EXPECT_ERROR(
      hf(R"({"rope_type": "yarn", "factor": 4, "beta_fast": 1, "beta_slow": 8})"), fn,
      "rope_scaling.beta_fast", "must be >= beta_slow");
  ROPE_CONFIG_EXPECT_ERROR(hf(R"({"rope_type": "llama3", "factor": 8, "low_freq_factor": 4,
                            "high_freq_factor": 1, "original_max_position_embeddings": 8192})"),
                           fn, "rope_scaling.high_freq_factor", "must be > low_freq_factor");
  ROPE_CONFIG_EXPECT_ERROR(hf(R"({"rope_type": "llama3", "factor": 8, "high_freq_factor": 4})"), fn,
                           "rope_scaling.low_freq_factor", "is missing");
  ROPE_CONFIG_EXPECT_ERROR(hf(R"([1, 2])"), fn, "'rope_scaling'", "must be an object");
  ROPE_CONFIG_EXPECT_ERROR(hf(R"({"type": 3})"), fn, "rope_scaling.type", "must be a string");
  ROPE_CONFIG_EXPECT_ERROR(hf("", R"(, "partial_rotary_factor": 0.01)"), fn,
                           "partial_rotary_factor", "rotary width of 1");
  ROPE_CONFIG_EXPECT_ERROR(hf("", R"(, "partial_rotary_factor": 1.5)"), fn, "partial_rotary_factor",
                           "must be in (0, 1]");
  ROPE_CONFIG_EXPECT_ERROR(hf(R"({"rope_type": "default", "rope_theta": 5e5})"), fn, "'rope_theta'",
                           "ambiguous");
  ROPE_CONFIG_EXPECT_ERROR(hf("", R"(, "head_dim": "128")"), fn, "'head_dim'", "must be a number");
  ROPE_CONFIG_EXPECT_ERROR(
      io::rope_config_from_hf(Json::parse(R"({"num_attention_heads": 8})"), {}, "bad_config.json"),
      fn, "'hidden_size'", "is missing");
  ROPE_CONFIG_EXPECT_ERROR(io::rope_config_from_hf(Json::parse(R"({"hidden_size": 64,
                          "num_attention_heads": 1, "rope_scaling": {"type": "dynamic",
                          "factor": 2}})"),
                                                   {}, "bad_config.json"),
                           fn, "'max_position_embeddings'", "dynamic NTK");
  ROPE_CONFIG_EXPECT_ERROR(io::rope_config_from_hf(Json::parse(R"({"hidden_size": 64,
                          "num_attention_heads": 1, "rope_scaling": {"type": "linear", "factor": 2},
                          "rope_parameters": {"rope_type": "linear", "factor": 3}})"),
                                                   {}, "bad_config.json"),
                           fn, "rope_scaling", "rope_parameters", "differ");
  ROPE_CONFIG_EXPECT_ERROR(io::rope_config_from_hf(Json::parse("[]"), {}, "bad_config.json"), fn,
                           "(root)", "must be a JSON object");
}

TEST(RopeConfigHfErrors, FilesThatCannotBeReadOrParsed) {
  EXPECT_THROW(io::rope_config_from_hf_file(data_path("hf_configs/no_such_file.json")),
               std::runtime_error);
  ROPE_CONFIG_EXPECT_ERROR(io::rope_config_from_hf_file(data_path("gguf/qwen2_5_7b_yarn.gguf")),
                           "rope_config_from_hf_file", "qwen2_5_7b_yarn.gguf", "not valid JSON");
}

// ---------------------------------------------------------------------------------------------
// GGUF reader

TEST(GgufReader, ReadsEveryValueTypeArraysAndTensorInfos) {
  const GgufFile file = GgufFile::open(data_path("gguf/all_types.gguf"));
  EXPECT_EQ(file.version(), 3u);
  EXPECT_EQ(file.alignment(), 64u);
  EXPECT_EQ(file.data_section() % 64, 0u);
  EXPECT_EQ(file.string("general.architecture"), "llama");
  EXPECT_EQ(file.integer("t.u8"), 200u);
  EXPECT_EQ(file.number("t.i8"), -100.0);
  EXPECT_EQ(file.integer("t.u16"), 60000u);
  EXPECT_EQ(file.number("t.i16"), -30000.0);
  EXPECT_EQ(file.integer("t.u32"), 4000000000u);
  EXPECT_EQ(file.number("t.i32"), -2000000000.0);
  EXPECT_EQ(file.number("t.f32"), 0.25);
  EXPECT_EQ(std::get<bool>(file.find("t.bool")->scalar), true);
  EXPECT_EQ(file.string("t.str"), "h\xc3\xa9llo");
  EXPECT_EQ(file.integer("t.u64"), (std::uint64_t{1} << 63) + 5);
  EXPECT_EQ(std::get<std::int64_t>(file.find("t.i64")->scalar), -(std::int64_t{1} << 62));
  EXPECT_EQ(file.number("t.f64"), 1e-300);
  EXPECT_EQ(file.numbers("t.arr_i32"), (std::vector<double>{1, -2, 3}));
  EXPECT_EQ(file.numbers("t.arr_f32"), (std::vector<double>{0.5, 1.5}));
  EXPECT_TRUE(file.numbers("t.arr_empty").empty());
  const io::GgufValue* strings = file.find("t.arr_str");
  ASSERT_NE(strings, nullptr);
  ASSERT_EQ(strings->elements.size(), 3u);
  EXPECT_EQ(std::get<std::string>(strings->elements[2].scalar), "ccc");
  const io::GgufValue* nested = file.find("t.nested");
  ASSERT_NE(nested, nullptr);
  EXPECT_EQ(nested->element_type, io::GgufType::array);
  ASSERT_EQ(nested->elements.size(), 2u);
  EXPECT_EQ(nested->elements[0].elements[1].to_double(), 2.0);
  EXPECT_EQ(file.metadata().front().first, "general.architecture");  // file order

  ASSERT_EQ(file.tensors().size(), 5u);
  const io::GgufTensorInfo* f32 = file.find_tensor("f32.weight");
  ASSERT_NE(f32, nullptr);
  EXPECT_EQ(f32->shape, (std::vector<std::uint64_t>{3, 2}));
  EXPECT_EQ(f32->byte_size, 24u);
  EXPECT_EQ(file.tensor_values("f32.weight"), (std::vector<double>{1, 2, 3, 4, 5, 6}));
  EXPECT_EQ(file.tensor_values("f16.weight"),
            (std::vector<double>{1.0, -2.5, 0.0999755859375, 65504.0}));
  EXPECT_EQ(file.tensor_values("bf16.weight"), (std::vector<double>{1.0, -3.0, 0.5, 256.0}));
  EXPECT_EQ(file.tensor_values("f64.weight"), (std::vector<double>{3.141592653589793}));
  EXPECT_EQ(file.find_tensor("q8.weight")->byte_size, 34u);
  for (const auto& info : file.tensors()) EXPECT_EQ(info.data_offset % 64, 0u) << info.name;
  ROPE_CONFIG_EXPECT_ERROR(file.tensor_values("q8.weight"), "all_types.gguf", "'q8.weight'",
                           "ggml type 8");
  ROPE_CONFIG_EXPECT_ERROR(file.number("t.str"), "all_types.gguf", "key 't.str'",
                           "must be a number, got string");
  ROPE_CONFIG_EXPECT_ERROR(file.integer("t.i8"), "key 't.i8'", "must be >= 0");
  ROPE_CONFIG_EXPECT_ERROR(file.numbers("t.arr_str"), "key 't.arr_str'", "array of string");
  ROPE_CONFIG_EXPECT_ERROR(file.string("no.such.key"), "key 'no.such.key'", "is missing");
  ROPE_CONFIG_EXPECT_ERROR(file.tensor_values("nothing"), "tensor 'nothing'", "is not in the file");
}

/// Writes GGUF bytes by hand, as the Python generator does, for malformed variants.
class GgufBuilder {
 public:
  GgufBuilder& u8(std::uint8_t v) { return raw(&v, 1); }
  GgufBuilder& u32(std::uint32_t v) { return raw(&v, 4); }
  GgufBuilder& u64(std::uint64_t v) { return raw(&v, 8); }
  GgufBuilder& f32(float v) { return raw(&v, 4); }
  GgufBuilder& str(const std::string& s) {
    u64(s.size());
    return raw(s.data(), s.size());
  }
  GgufBuilder& header(std::uint64_t tensors, std::uint64_t kvs, std::uint32_t version = 3) {
    return str_raw("GGUF").u32(version).u64(tensors).u64(kvs);
  }
  GgufBuilder& kv_str(const std::string& key, const std::string& value) {
    return str(key).u32(8).str(value);
  }
  GgufBuilder& kv_u32(const std::string& key, std::uint32_t value) {
    return str(key).u32(4).u32(value);
  }
  GgufBuilder& kv_f32(const std::string& key, float value) { return str(key).u32(6).f32(value); }
  GgufBuilder& tensor(const std::string& name, std::vector<std::uint64_t> shape, std::uint32_t type,
                      std::uint64_t offset) {
    str(name).u32(static_cast<std::uint32_t>(shape.size()));
    for (const auto d : shape) u64(d);
    return u32(type).u64(offset);
  }
  GgufBuilder& pad(std::size_t alignment = 32) {
    while (bytes.size() % alignment != 0) bytes.push_back(0);
    return *this;
  }
  GgufBuilder& zeros(std::size_t n) {
    bytes.insert(bytes.end(), n, 0);
    return *this;
  }
  GgufBuilder& str_raw(const std::string& s) { return raw(s.data(), s.size()); }
  GgufFile parse() const { return GgufFile::parse(bytes, "bad.gguf"); }

  std::vector<unsigned char> bytes;

 private:
  GgufBuilder& raw(const void* p, std::size_t n) {
    const auto* c = static_cast<const unsigned char*>(p);
    bytes.insert(bytes.end(), c, c + n);
    return *this;
  }
};

TEST(GgufReaderErrors, MalformedFilesThrowNamingTheFileAndTheKey) {
  const std::string fn = "posenc::io::GgufFile: 'bad.gguf'";
  ROPE_CONFIG_EXPECT_ERROR(GgufBuilder().str_raw("GGML").u32(3).u64(0).u64(0).parse(), fn,
                           "not a GGUF file");
  ROPE_CONFIG_EXPECT_ERROR(GgufBuilder().header(0, 0, 1).parse(), fn, "version 1");
  ROPE_CONFIG_EXPECT_ERROR(GgufBuilder().header(0, 0, 0x03000000).parse(), fn, "big-endian");
  ROPE_CONFIG_EXPECT_ERROR(GgufBuilder().str_raw("GGUF").u32(3).parse(), fn, "tensor count",
                           "needs 8 bytes");
  ROPE_CONFIG_EXPECT_ERROR(GgufBuilder().header(0, 1u << 30).parse(), fn, "metadata count");
  ROPE_CONFIG_EXPECT_ERROR(GgufBuilder().header(0, 1).u64(1000).str_raw("abc").zeros(16).parse(),
                           fn, "key of metadata entry 0", "string of 1000 bytes");
  ROPE_CONFIG_EXPECT_ERROR(GgufBuilder().header(0, 1).str("k").u32(13).zeros(8).parse(), fn,
                           "key 'k'", "unknown value type 13");
  ROPE_CONFIG_EXPECT_ERROR(
      GgufBuilder().header(0, 1).str("k").u32(9).u32(4).u64(1ull << 60).parse(), fn, "key 'k'",
      "array of", "does not fit");
  ROPE_CONFIG_EXPECT_ERROR(GgufBuilder().header(0, 1).str("k").u32(9).u32(77).u64(0).parse(), fn,
                           "key 'k'", "unknown array element type 77");
  ROPE_CONFIG_EXPECT_ERROR(GgufBuilder().header(0, 1).str("k").u32(7).u8(2).parse(), fn, "key 'k'",
                           "bool value 2");
  ROPE_CONFIG_EXPECT_ERROR(GgufBuilder().header(0, 2).kv_u32("k", 1).kv_u32("k", 2).parse(), fn,
                           "duplicate key 'k'");
  ROPE_CONFIG_EXPECT_ERROR(GgufBuilder().header(0, 1).str("").u32(4).u32(1).parse(), fn,
                           "empty key");
  {
    GgufBuilder deep;
    deep.header(0, 1).str("deep").u32(9);
    for (int level = 0; level < 12; ++level) deep.u32(9).u64(1);
    ROPE_CONFIG_EXPECT_ERROR(deep.parse(), fn, "key 'deep'", "nested deeper");
  }
  ROPE_CONFIG_EXPECT_ERROR(GgufBuilder().header(0, 1).str("k").u32(8).u64(5).str_raw("ab").parse(),
                           fn, "value of key 'k'", "string of 5 bytes");
  ROPE_CONFIG_EXPECT_ERROR(GgufBuilder().header(0, 1).kv_u32("general.alignment", 48).parse(), fn,
                           "key 'general.alignment'", "power of two");
  ROPE_CONFIG_EXPECT_ERROR(GgufBuilder().header(0, 1).kv_f32("general.alignment", 32).parse(), fn,
                           "key 'general.alignment'", "must be uint32");
  // Tensor infos.
  auto one_tensor = [](std::vector<std::uint64_t> shape, std::uint32_t type, std::uint64_t offset,
                       std::size_t data) {
    GgufBuilder b;
    b.header(1, 0).tensor("w", std::move(shape), type, offset).pad().zeros(data);
    return b;
  };
  ROPE_CONFIG_EXPECT_ERROR(one_tensor({4}, 0, 0, 8).parse(), fn, "tensor 'w'",
                           "exceed the data section");
  ROPE_CONFIG_EXPECT_ERROR(one_tensor({4}, 0, 3, 64).parse(), fn, "tensor 'w'",
                           "not a multiple of the alignment");
  ROPE_CONFIG_EXPECT_ERROR(one_tensor({4}, 99, 0, 64).parse(), fn, "tensor 'w'",
                           "unknown ggml type 99");
  ROPE_CONFIG_EXPECT_ERROR(one_tensor({}, 0, 0, 64).parse(), fn, "tensor 'w'", "0 dimensions");
  ROPE_CONFIG_EXPECT_ERROR(one_tensor({1, 1, 1, 1, 1}, 0, 0, 64).parse(), fn, "5 dimensions");
  ROPE_CONFIG_EXPECT_ERROR(one_tensor({33}, 8, 0, 64).parse(), fn, "tensor 'w'", "block size 32");
  ROPE_CONFIG_EXPECT_ERROR(one_tensor({1ull << 40, 1ull << 40}, 0, 0, 64).parse(), fn, "2^62");
  ROPE_CONFIG_EXPECT_ERROR(one_tensor({1ull << 60}, 0, 0, 64).parse(), fn,
                           "exceed the data section");
  {
    GgufBuilder b;
    b.header(2, 0).tensor("a", {8}, 0, 0).tensor("b", {8}, 0, 0).pad().zeros(64);
    ROPE_CONFIG_EXPECT_ERROR(b.parse(), fn, "overlap");
    GgufBuilder same;
    same.header(2, 0).tensor("a", {8}, 0, 0).tensor("a", {8}, 0, 32).pad().zeros(64);
    ROPE_CONFIG_EXPECT_ERROR(same.parse(), fn, "duplicate tensor 'a'");
  }
  ROPE_CONFIG_EXPECT_ERROR(GgufBuilder().header(1, 0).tensor("w", {4}, 0, 0).parse(), fn,
                           "data section starts past the end of the file");
  EXPECT_NO_THROW(one_tensor({4}, 0, 0, 16).parse());
  EXPECT_THROW(GgufFile::open(data_path("gguf/no_such_file.gguf")), std::runtime_error);
}

TEST(GgufReaderErrors, EveryTruncationAndRandomCorruptionThrowsCleanly) {
  // Run under ASan in the sanitizer build: no read outside the buffer, only exceptions.
  auto rng = make_rng(1603);
  for (const char* name : {"gguf/all_types.gguf", "gguf/phi3_mini_128k.gguf"}) {
    std::ifstream in(data_path(name), std::ios::binary);
    const std::vector<unsigned char> bytes((std::istreambuf_iterator<char>(in)),
                                           std::istreambuf_iterator<char>());
    ASSERT_GT(bytes.size(), 100u);
    std::size_t parsed = 0;
    for (std::size_t n = 0; n < bytes.size(); ++n) {
      try {
        (void)GgufFile::parse(std::vector<unsigned char>(bytes.begin(), bytes.begin() + n));
        ++parsed;
      } catch (const std::invalid_argument&) {
      }
    }
    // A prefix parses only once every tensor's data is in it: only the tail can be cut.
    EXPECT_LT(parsed, 64u) << name;
    std::uniform_int_distribution<std::size_t> where(0, bytes.size() - 1);
    std::uniform_int_distribution<int> byte(0, 255);
    for (int trial = 0; trial < 3000; ++trial) {
      std::vector<unsigned char> corrupt = bytes;
      for (int flips = 0; flips < 1 + trial % 4; ++flips) {
        corrupt[where(rng)] = static_cast<unsigned char>(byte(rng));
      }
      try {
        const GgufFile file = GgufFile::parse(std::move(corrupt));
        for (const auto& info : file.tensors()) {
          if (info.ggml_type == 0 || info.ggml_type == 1 || info.ggml_type == 28 ||
              info.ggml_type == 30) {
            (void)file.tensor_values(info.name);
          }
        }
        (void)io::rope_config_from_gguf(file);
      } catch (const std::invalid_argument&) {
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// GGUF -> RoPE

TEST(RopeConfigGguf, LlamaCppFilesMatchTheHfGoldensOfTheSameModels) {
  // Float32 values in the file (rope_freqs, attn_factor, rope factors): relative 2^-24 from
  // the storage, 2^-53 steps in double around it; 4·2^-24 bounds the rest.
  const double float32_stored = 4.0 * std::ldexp(1.0, -24);
  {
    const RopeConfig c = io::rope_config_from_gguf_file(data_path("gguf/llama3_1_8b.gguf"));
    EXPECT_EQ(c.options.pairing, RotaryPairing::interleaved);  // ggml NORM
    EXPECT_EQ(c.head_dim, 128);
    EXPECT_EQ(c.rope_type, "rope_freqs");
    EXPECT_EQ(c.max_position_embeddings, 131072);
    expect_matches(c, golden_case("llama3_1_8b", 0), float32_stored, "llama3 gguf");
  }
  {
    const RopeConfig c = io::rope_config_from_gguf_file(data_path("gguf/qwen2_5_7b_yarn.gguf"));
    EXPECT_EQ(c.options.pairing, RotaryPairing::half);  // ggml NEOX
    EXPECT_EQ(c.options.scaling.kind, RopeScaling::Kind::yarn);
    expect_matches(c, golden_case("qwen2_5_7b_yarn", 0), 1e-12, "qwen2 gguf");
  }
  for (const Index length : {Index{4096}, Index{4097}}) {
    const RopeConfig c = io::rope_config_from_gguf_file(data_path("gguf/phi3_mini_128k.gguf"),
                                                        {.sequence_length = length});
    EXPECT_EQ(c.options.pairing, RotaryPairing::half);
    EXPECT_EQ(c.options.scaling.uses_long_factors(), length > 4096);
    expect_matches(c, golden_case("phi3_mini_128k", length), float32_stored, "phi3 gguf");
  }
  {
    const RopeConfig c = io::rope_config_from_gguf_file(data_path("gguf/deepseek_v2_lite.gguf"));
    EXPECT_EQ(c.head_dim, 64);  // the rotated q_pe / k_pe part
    EXPECT_EQ(c.options.pairing, RotaryPairing::interleaved);
    expect_matches(c, golden_case("deepseek_v2_lite", 0), 1e-12, "deepseek2 gguf");
  }
}

TEST(RopeConfigGgufErrors, BadRopeKeysNameTheKey) {
  const std::string fn = "posenc::io::rope_config_from_gguf: 'bad.gguf'";
  auto qwen = [](const std::function<void(GgufBuilder&)>& extra, std::uint64_t extra_kvs) {
    GgufBuilder b;
    b.header(0, 4 + extra_kvs)
        .kv_str("general.architecture", "qwen2")
        .kv_u32("qwen2.embedding_length", 1024)
        .kv_u32("qwen2.attention.head_count", 8)
        .kv_u32("qwen2.context_length", 4096);
    extra(b);
    return b.parse();
  };
  EXPECT_NO_THROW(io::rope_config_from_gguf(qwen([](GgufBuilder&) {}, 0)));
  ROPE_CONFIG_EXPECT_ERROR(io::rope_config_from_gguf(GgufBuilder().header(0, 0).parse()),
                           "'bad.gguf'", "key 'general.architecture'", "is missing");
  ROPE_CONFIG_EXPECT_ERROR(io::rope_config_from_gguf(qwen(
                               [](GgufBuilder& b) { b.kv_str("qwen2.rope.freq_base", "1e6"); }, 1)),
                           "'bad.gguf'", "key 'qwen2.rope.freq_base'", "must be a number");
  ROPE_CONFIG_EXPECT_ERROR(
      io::rope_config_from_gguf(
          qwen([](GgufBuilder& b) { b.kv_str("qwen2.rope.scaling.type", "ntk"); }, 1)),
      fn, "key 'qwen2.rope.scaling.type'", "unknown scaling 'ntk'");
  ROPE_CONFIG_EXPECT_ERROR(
      io::rope_config_from_gguf(
          qwen([](GgufBuilder& b) { b.kv_u32("qwen2.rope.dimension_count", 7); }, 1)),
      fn, "key 'qwen2.rope.dimension_count'", "rotary width of 7");
  ROPE_CONFIG_EXPECT_ERROR(io::rope_config_from_gguf(qwen(
                               [](GgufBuilder& b) {
                                 b.kv_str("qwen2.rope.scaling.type", "yarn")
                                     .kv_f32("qwen2.rope.scaling.factor", 4)
                                     .kv_f32("qwen2.rope.scaling.yarn_log_multiplier", 0.1f);
                               },
                               3)),
                           fn, "key 'qwen2.rope.scaling.yarn_log_multiplier'",
                           "yarn_attention_factor");
  ROPE_CONFIG_EXPECT_ERROR(io::rope_config_from_gguf(qwen(
                               [](GgufBuilder& b) {
                                 b.kv_str("qwen2.rope.scaling.type", "yarn")
                                     .kv_f32("qwen2.rope.scaling.factor", 4)
                                     .kv_f32("qwen2.rope.scaling.yarn_ext_factor", 0.5f);
                               },
                               3)),
                           fn, "key 'qwen2.rope.scaling.yarn_ext_factor'", "ext_factor 1");
  ROPE_CONFIG_EXPECT_ERROR(
      io::rope_config_from_gguf(qwen(
          [](GgufBuilder& b) {
            b.kv_str("qwen2.rope.scaling.type", "yarn").kv_f32("qwen2.rope.scaling.factor", 0.5f);
          },
          2)),
      fn, "key 'qwen2.rope.scaling.factor'", ">= 1 for yarn");
  ROPE_CONFIG_EXPECT_ERROR(
      io::rope_config_from_gguf(
          qwen([](GgufBuilder& b) { b.kv_str("qwen2.rope.scaling.type", "longrope"); }, 1)),
      fn, "rope_factors_long.weight");
  {
    GgufBuilder b;
    b.header(0, 3)
        .kv_str("general.architecture", "mystery")
        .kv_u32("mystery.embedding_length", 64)
        .kv_u32("mystery.attention.head_count", 1);
    ROPE_CONFIG_EXPECT_ERROR(io::rope_config_from_gguf(b.parse()), fn, "key 'general.architecture'",
                             "'mystery'", "RopeConfigOptions::pairing");
    EXPECT_NO_THROW(io::rope_config_from_gguf(b.parse(), {.pairing = RotaryPairing::half}));
  }
  {  // one LongRoPE table of the wrong length
    GgufBuilder b;
    b.header(2, 5)
        .kv_str("general.architecture", "phi3")
        .kv_u32("phi3.embedding_length", 64)
        .kv_u32("phi3.attention.head_count", 4)
        .kv_u32("phi3.context_length", 8192)
        .kv_u32("phi3.rope.scaling.original_context_length", 4096)
        .tensor("rope_factors_long.weight", {8}, 0, 0)
        .tensor("rope_factors_short.weight", {4}, 0, 32)
        .pad();
    for (int i = 0; i < 8; ++i) b.f32(1.0f);
    b.pad();
    for (int i = 0; i < 4; ++i) b.f32(2.0f);
    b.pad();
    ROPE_CONFIG_EXPECT_ERROR(io::rope_config_from_gguf(b.parse()), fn,
                             "tensor 'rope_factors_short.weight' has 4 values", "8 pairs");
  }
  {  // YaRN with a model-specific log multiplier, resolved by the caller
    const GgufFile file = qwen(
        [](GgufBuilder& b) {
          b.kv_str("qwen2.rope.scaling.type", "yarn")
              .kv_f32("qwen2.rope.scaling.factor", 4)
              .kv_f32("qwen2.rope.scaling.yarn_log_multiplier", 0.1f);
        },
        3);
    const RopeConfig c = io::rope_config_from_gguf(file, {.yarn_attention_factor = 1.0});
    EXPECT_EQ(c.encoder<double>().magnitude(), 1.0);
  }
}

}  // namespace posenc::test::rope_config_test

#undef ROPE_CONFIG_EXPECT_ERROR
