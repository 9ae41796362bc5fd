// SPDX-License-Identifier: MIT
// RoPE settings (RotaryOptions: base, rotary width, pairing, RopeScaling) read from a model's own
// config, one function per source, every key under its own name: Hugging Face config.json
// (`rope_theta`, `partial_rotary_factor`, `head_dim`, `rope_scaling` / `rope_parameters`) and GGUF
// metadata (`{arch}.rope.*`, `rope_factors_long/short`, ggml's rope mode per architecture).
// Needs nlohmann/json (Debian: nlohmann-json3-dev). README "Model configs" has the mapping table.
//
//   rope_config_from_hf(json [, options, name]), rope_config_from_hf_file(path [, options])
//   rope_config_from_gguf(GgufFile [, options]), rope_config_from_gguf_file(path [, options])
//   config.encoder<float>()  ->  RotaryEncoding<float>(config.head_dim, config.options)
#pragma once

#include <algorithm>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "posenc/encoders/rope.hpp"
#include "posenc/io/gguf.hpp"

namespace posenc::io {

/// What a config says about RoPE. `head_dim` is the width of the q/k rows the encoder rotates
/// (DeepSeek MLA: qk_rope_head_dim, the separate q_pe/k_pe part); `options.rotary_dim` of them
/// rotate.
struct RopeConfig {
  Index head_dim = 0;
  RotaryOptions options = {};
  /// HF max_position_embeddings / GGUF {arch}.context_length; 0 when the config has none.
  Index max_position_embeddings = 0;
  /// The scaling's name in the source (HF rope_type, GGUF rope.scaling.type or the factor tensor).
  std::string rope_type;

  template <class Scalar>
  RotaryEncoding<Scalar> encoder() const {
    return RotaryEncoding<Scalar>(head_dim, options);
  }
};

/// Choices a config cannot make by itself.
struct RopeConfigOptions {
  /// Dynamic NTK and LongRoPE: the sequence length the encoder serves (max position + 1 over
  /// everything it rotates, a KV cache's capacity included). 0: HF's initial frequencies
  /// (dynamic: max_position_embeddings; LongRoPE: the short factors). llama.cpp's choice is n_ctx.
  Index sequence_length = 0;
  /// Overrides the channel pairing (HF: `half`, rotate_half; GGUF: from the architecture).
  std::optional<RotaryPairing> pairing = std::nullopt;
  /// HF configs with one rope_parameters entry per layer type (Gemma 3): the one to read.
  std::string layer_type = {};
  /// GGUF YaRN with `rope.scaling.yarn_log_multiplier` on an architecture other than deepseek2,
  /// whose meaning llama.cpp decides per model: the cos/sin magnitude to use.
  std::optional<double> yarn_attention_factor = std::nullopt;
};

namespace detail {

/// Reads one HF config, naming the function, the file and the key in every error.
class HfRopeReader {
 public:
  HfRopeReader(const nlohmann::json& root, std::string file)
      : root_(root), file_(std::move(file)) {}

  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw std::invalid_argument("posenc::io::rope_config_from_hf: '" + file_ + "': key '" + key +
                                "' " + what);
  }
  /// The member `key` of `object`, nullptr when absent or null.
  static const nlohmann::json* get(const nlohmann::json& object, const std::string& key) {
    const auto it = object.find(key);
    return it == object.end() || it->is_null() ? nullptr : &*it;
  }
  static std::string kind(const nlohmann::json& value) {
    std::string text = value.type_name();  // appended: GCC 12 -O3 warns falsely on operator+
    if (value.is_primitive()) text.append(" ").append(value.dump());
    return text;
  }
  double number(const nlohmann::json& value, const std::string& key) const {
    if (!value.is_number()) fail(key, "must be a number, got " + kind(value));
    const double x = value.get<double>();
    if (!std::isfinite(x)) fail(key, "must be finite");
    return x;
  }
  Index integer(const nlohmann::json& value, const std::string& key) const {
    if (value.is_number_integer()) {
      if (value.is_number_unsigned() && value.get<std::uint64_t>() > (std::uint64_t{1} << 53)) {
        fail(key, "is too large: " + value.dump());
      }
      const auto x = value.get<std::int64_t>();
      if (x < 0) fail(key, "must be >= 0, got " + value.dump());
      return static_cast<Index>(x);
    }
    const double x = number(value, key);
    if (x != std::floor(x) || x < 0 || x > 9007199254740992.0) {
      fail(key, "must be a non-negative integer, got " + value.dump());
    }
    return static_cast<Index>(x);
  }
  std::vector<double> numbers(const nlohmann::json& value, const std::string& key) const {
    if (!value.is_array()) fail(key, "must be an array of numbers, got " + kind(value));
    std::vector<double> out;
    for (std::size_t i = 0; i < value.size(); ++i) {
      out.push_back(number(value[i], key + "[" + std::to_string(i) + "]"));
    }
    return out;
  }

  /// The value of `key` from the top level and the rope dict; both present and different fails.
  const nlohmann::json* merged(const nlohmann::json& dict, const std::string& dict_name,
                               const std::string& key) const {
    const nlohmann::json* top = get(root_, key);
    const nlohmann::json* inner = get(dict, key);
    if (top != nullptr && inner != nullptr && *top != *inner) {
      fail(key, "is " + top->dump() + " at the top level but " + inner->dump() + " in " +
                    dict_name + " (which one the model uses is ambiguous)");
    }
    return inner != nullptr ? inner : top;
  }

  const nlohmann::json& root_;
  std::string file_;
};

}  // namespace detail

/// RoPE settings from a Hugging Face config.json (parsed), following transformers'
/// modeling_rope_utils (v5 line; README "Model configs" says which commit and where v4 differs):
/// rope_scaling or rope_parameters with rope_type (legacy `type`) default | linear | dynamic |
/// yarn | longrope | llama3. `file` names the config in error messages. Pairing: `half` (HF
/// rotate_half) unless options.pairing says otherwise.
inline RopeConfig rope_config_from_hf(const nlohmann::json& config,
                                      const RopeConfigOptions& options = {},
                                      const std::string& file = "config.json") {
  using nlohmann::json;
  const detail::HfRopeReader in(config, file);
  if (!config.is_object()) in.fail("(root)", "must be a JSON object, got " + in.kind(config));

  // The rope dict: rope_scaling (transformers v4) or rope_parameters (v5).
  const json* scaling = in.get(config, "rope_scaling");
  const json* parameters = in.get(config, "rope_parameters");
  if (scaling != nullptr && parameters != nullptr && *scaling != *parameters) {
    in.fail("rope_scaling", "and 'rope_parameters' are both present and differ");
  }
  std::string dict_name = scaling != nullptr ? "rope_scaling" : "rope_parameters";
  static const json empty = json::object();
  const json* dict = scaling != nullptr ? scaling : parameters != nullptr ? parameters : &empty;
  if (!dict->is_object()) in.fail(dict_name, "must be an object, got " + in.kind(*dict));
  // One entry per layer type (Gemma 3: sliding_attention, full_attention).
  if (!dict->empty() && !dict->contains("rope_type") && !dict->contains("type") &&
      std::all_of(dict->begin(), dict->end(), [](const json& v) { return v.is_object(); })) {
    std::string layers;
    for (const auto& item : dict->items()) layers += (layers.empty() ? "" : ", ") + item.key();
    if (options.layer_type.empty()) {
      in.fail(dict_name, "has one entry per layer type (" + layers +
                             "): choose one with RopeConfigOptions::layer_type");
    }
    const json* layer = in.get(*dict, options.layer_type);
    if (layer == nullptr) {
      in.fail(dict_name + "." + options.layer_type, "is missing (layer types: " + layers + ")");
    }
    dict = layer;
    dict_name += "." + options.layer_type;
  }
  auto key = [&](const std::string& name) { return dict_name + "." + name; };

  RopeConfig out;
  std::string rope_type = "default";
  if (const json* t = in.get(*dict, "rope_type")) {
    if (!t->is_string()) in.fail(key("rope_type"), "must be a string, got " + in.kind(*t));
    rope_type = t->get<std::string>();
  } else if (const json* legacy = in.get(*dict, "type")) {
    if (!legacy->is_string()) in.fail(key("type"), "must be a string, got " + in.kind(*legacy));
    rope_type = legacy->get<std::string>();
  }
  out.rope_type = rope_type;

  const json* theta = in.merged(*dict, dict_name, "rope_theta");
  const double base = theta != nullptr ? in.number(*theta, "rope_theta") : 10000.0;  // HF default
  if (!(base > 1.0)) in.fail("rope_theta", "must be > 1, got " + std::to_string(base));

  const json* partial = in.merged(*dict, dict_name, "partial_rotary_factor");
  const double partial_factor =
      partial != nullptr ? in.number(*partial, "partial_rotary_factor") : 1.0;
  if (!(partial_factor > 0.0 && partial_factor <= 1.0)) {
    in.fail("partial_rotary_factor", "must be in (0, 1], got " + partial->dump());
  }

  if (const json* rope_head = in.get(config, "qk_rope_head_dim")) {  // DeepSeek MLA
    out.head_dim = in.integer(*rope_head, "qk_rope_head_dim");
  } else if (const json* head = in.get(config, "head_dim")) {
    out.head_dim = in.integer(*head, "head_dim");
  } else {
    const json* hidden = in.get(config, "hidden_size");
    const json* heads = in.get(config, "num_attention_heads");
    if (hidden == nullptr || heads == nullptr) {
      in.fail(hidden == nullptr ? "hidden_size" : "num_attention_heads",
              "is missing (needed for the head width, as there is no 'head_dim')");
    }
    const Index h = in.integer(*heads, "num_attention_heads");
    if (h == 0) in.fail("num_attention_heads", "must be positive");
    out.head_dim = in.integer(*hidden, "hidden_size") / h;  // HF: hidden_size // heads
  }
  if (out.head_dim > (Index{1} << 16)) {
    in.fail("head_dim",
            "gives heads of " + std::to_string(out.head_dim) + " channels (at most 65536)");
  }
  // HF: int(head_dim * partial_rotary_factor), then arange(0, dim, 2).
  const auto rotary_dim = static_cast<Index>(static_cast<double>(out.head_dim) * partial_factor);
  if (rotary_dim < 2 || rotary_dim % 2 != 0) {
    in.fail(partial != nullptr ? "partial_rotary_factor" : "head_dim",
            "gives a rotary width of " + std::to_string(rotary_dim) + " (head_dim " +
                std::to_string(out.head_dim) + "), which must be even and >= 2");
  }
  out.options.base = base;
  out.options.rotary_dim = rotary_dim;
  out.options.pairing = options.pairing.value_or(RotaryPairing::half);

  const json* max_positions = in.get(config, "max_position_embeddings");
  if (max_positions != nullptr) {
    out.max_position_embeddings = in.integer(*max_positions, "max_position_embeddings");
  }
  auto require_max_positions = [&](const std::string& why) {
    if (max_positions == nullptr || out.max_position_embeddings < 1) {
      in.fail("max_position_embeddings", "is missing or 0 (needed " + why + ")");
    }
    return out.max_position_embeddings;
  };
  auto required = [&](const std::string& name) -> const json& {
    const json* value = in.get(*dict, name);
    if (value == nullptr)
      in.fail(key(name), "is missing (required by rope_type '" + rope_type + "')");
    return *value;
  };
  auto positive = [&](const std::string& name, double x) {
    if (!(x > 0.0)) in.fail(key(name), "must be > 0, got " + std::to_string(x));
    return x;
  };
  // L0 of yarn, longrope and llama3: Phi-3's top-level key wins (HF standardize_rope_params),
  // then the rope dict's, then max_position_embeddings.
  auto original_context = [&]() {
    Index l0 = 0;
    if (const json* top = in.get(config, "original_max_position_embeddings")) {
      l0 = in.integer(*top, "original_max_position_embeddings");
    } else if (const json* inner = in.get(*dict, "original_max_position_embeddings")) {
      l0 = in.integer(*inner, key("original_max_position_embeddings"));
    } else {
      l0 = require_max_positions("as original_max_position_embeddings is absent");
    }
    if (l0 < 1) in.fail(key("original_max_position_embeddings"), "must be >= 1");
    return l0;
  };

  RopeScaling& scaling_out = out.options.scaling;
  if (rope_type == "default") {
    scaling_out = RopeScaling::none();
  } else if (rope_type == "linear") {
    scaling_out =
        RopeScaling::linear(positive("factor", in.number(required("factor"), key("factor"))));
  } else if (rope_type == "dynamic") {
    const double factor = positive("factor", in.number(required("factor"), key("factor")));
    scaling_out = RopeScaling::dynamic_ntk(factor, require_max_positions("by dynamic NTK"),
                                           options.sequence_length);
  } else if (rope_type == "yarn") {
    const Index l0 = original_context();
    const json& factor_value = required("factor");
    double factor = 0.0;  // HF v5: an explicit factor wins; null means the length ratio
    if (factor_value.is_null()) {
      factor =
          static_cast<double>(require_max_positions("as factor is null")) / static_cast<double>(l0);
    } else {
      factor = in.number(factor_value, key("factor"));
    }
    if (!(factor >= 1.0))
      in.fail(key("factor"), "must be >= 1 for yarn, got " + factor_value.dump());
    YarnOptions yarn;
    auto optional_number = [&](const std::string& name) -> std::optional<double> {
      const json* v = in.get(*dict, name);
      return v == nullptr ? std::nullopt : std::optional<double>(in.number(*v, key(name)));
    };
    // HF: `get("beta_fast") or 32`, so 0 means the default too; likewise mscale 0 is unset.
    if (const auto v = optional_number("beta_fast"); v && *v != 0.0)
      yarn.beta_fast = positive("beta_fast", *v);
    if (const auto v = optional_number("beta_slow"); v && *v != 0.0)
      yarn.beta_slow = positive("beta_slow", *v);
    if (yarn.beta_fast < yarn.beta_slow) {
      in.fail(key("beta_fast"), "must be >= beta_slow, got " + std::to_string(yarn.beta_fast) +
                                    " < " + std::to_string(yarn.beta_slow));
    }
    if (const auto v = optional_number("attention_factor"))
      yarn.attention_factor = positive("attention_factor", *v);
    yarn.mscale = optional_number("mscale").value_or(0.0);
    yarn.mscale_all_dim = optional_number("mscale_all_dim").value_or(0.0);
    if (const json* t = in.get(*dict, "truncate")) {
      if (!t->is_boolean()) in.fail(key("truncate"), "must be true or false, got " + in.kind(*t));
      yarn.truncate = t->get<bool>();
    }
    scaling_out = RopeScaling::yarn(factor, l0, yarn);
  } else if (rope_type == "longrope") {
    const Index l0 = original_context();
    LongRopeOptions longrope;
    longrope.short_factor = in.numbers(required("short_factor"), key("short_factor"));
    longrope.long_factor = in.numbers(required("long_factor"), key("long_factor"));
    for (const char* name : {"short_factor", "long_factor"}) {
      const auto& factors =
          std::string(name) == "short_factor" ? longrope.short_factor : longrope.long_factor;
      if (static_cast<Index>(factors.size()) != rotary_dim / 2) {
        in.fail(key(name), "has " + std::to_string(factors.size()) +
                               " entries but the rotary width " + std::to_string(rotary_dim) +
                               " has " + std::to_string(rotary_dim / 2) + " pairs");
      }
      for (const double f : factors) positive(name, f);
    }
    double factor = 0.0;
    if (const json* f = in.get(*dict, "factor")) {
      factor = positive("factor", in.number(*f, key("factor")));
    } else {  // HF: max_position_embeddings / original_max_position_embeddings
      factor = static_cast<double>(require_max_positions("by longrope without a factor")) /
               static_cast<double>(l0);
    }
    if (const json* a = in.get(*dict, "attention_factor")) {
      longrope.attention_factor =
          positive("attention_factor", in.number(*a, key("attention_factor")));
    }
    if (l0 < 2) in.fail(key("original_max_position_embeddings"), "must be >= 2 for longrope");
    scaling_out = RopeScaling::longrope(factor, l0, options.sequence_length, std::move(longrope));
  } else if (rope_type == "llama3") {
    const double factor = positive("factor", in.number(required("factor"), key("factor")));
    const double low =
        positive("low_freq_factor", in.number(required("low_freq_factor"), key("low_freq_factor")));
    const double high = positive("high_freq_factor",
                                 in.number(required("high_freq_factor"), key("high_freq_factor")));
    if (!(high > low)) {
      in.fail(key("high_freq_factor"), "must be > low_freq_factor, got " + std::to_string(high) +
                                           " <= " + std::to_string(low));
    }
    scaling_out = RopeScaling::llama3(factor, original_context(), low, high);
  } else {
    in.fail(key(in.get(*dict, "rope_type") != nullptr ? "rope_type" : "type"),
            "names an unknown RoPE type '" + rope_type +
                "' (known: default, linear, dynamic, yarn, longrope, llama3)");
  }
  try {  // the remaining domain checks of RopeScaling, reported against this file
    (void)posenc::detail::rope_frequencies(base, rotary_dim, scaling_out);
  } catch (const std::invalid_argument& e) {
    in.fail(dict_name, std::string("gives an invalid RoPE: ") + e.what());
  }
  return out;
}

/// rope_config_from_hf on a config.json file; std::runtime_error when it cannot be read,
/// std::invalid_argument naming the file when it is not JSON.
inline RopeConfig rope_config_from_hf_file(const std::string& path,
                                           const RopeConfigOptions& options = {}) {
  std::ifstream stream(path);
  if (!stream) {
    throw std::runtime_error("posenc::io::rope_config_from_hf_file: '" + path + "': cannot open");
  }
  nlohmann::json config;
  try {
    config = nlohmann::json::parse(stream);
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument("posenc::io::rope_config_from_hf_file: '" + path +
                                "': not valid JSON: " + e.what());
  }
  return rope_config_from_hf(config, options, path);
}

/// ggml's rope mode of a llama.cpp architecture (llama_model_rope_type): NORM pairs adjacent
/// channels (interleaved), NEOX pairs the halves. nullopt for architectures not listed here.
inline std::optional<RotaryPairing> gguf_rope_pairing(const std::string& architecture) {
  static const std::set<std::string> norm = {
      "llama",    "llama4",    "deci",      "baichuan", "starcoder",  "internlm2",
      "minicpm",  "xverse",    "command-r", "cohere2",  "olmo",       "arctic",
      "deepseek", "deepseek2", "chatglm",   "granite",  "granitemoe", "chameleon"};
  static const std::set<std::string> neox = {
      "falcon",  "grok",    "dbrx",      "bert",   "nomic-bert", "stablelm", "bitnet",
      "qwen",    "qwen2",   "qwen2moe",  "qwen3",  "qwen3moe",   "olmo2",    "olmoe",
      "phi2",    "phi3",    "phimoe",    "gemma",  "gemma2",     "gemma3",   "starcoder2",
      "openelm", "gptneox", "codeshell", "exaone", "minicpm3",   "nemotron"};
  if (norm.count(architecture) != 0) return RotaryPairing::interleaved;
  if (neox.count(architecture) != 0) return RotaryPairing::half;
  return std::nullopt;
}

/// RoPE settings from GGUF metadata, as llama.cpp reads them (README "Model configs"):
/// {arch}.rope.freq_base, .rope.dimension_count, .attention.key_length (or embedding_length /
/// attention.head_count), .context_length, .rope.scaling.type | factor | attn_factor |
/// original_context_length | yarn_*, and the tensors rope_factors_long/short.weight (LongRoPE)
/// and rope_freqs.weight (per-pair divisors, Llama 3.1). Errors name the file and the key.
inline RopeConfig rope_config_from_gguf(const GgufFile& file,
                                        const RopeConfigOptions& options = {}) {
  constexpr const char* fn = "posenc::io::rope_config_from_gguf";
  constexpr Index max_head_dim = Index{1} << 16;  // a sanity bound on head widths
  const std::string arch = file.string("general.architecture");
  const std::string p = arch + ".";
  auto positive_integer = [&](const std::string& key) {
    const std::uint64_t v = file.integer(key);
    if (v == 0 || v > (std::uint64_t{1} << 40))
      file.fail_key(key, "must be in [1, 2^40], got " + std::to_string(v), fn);
    return static_cast<Index>(v);
  };
  RopeConfig out;
  const double base = file.optional_number(p + "rope.freq_base").value_or(10000.0);
  if (!(std::isfinite(base) && base > 1.0)) file.fail_key(p + "rope.freq_base", "must be > 1", fn);

  if (file.contains(p + "attention.key_length")) {
    out.head_dim = positive_integer(p + "attention.key_length");
  } else {
    const std::string heads_key = p + "attention.head_count";
    const GgufValue* heads_value = file.find(heads_key);
    if (heads_value == nullptr)
      file.fail_key(heads_key, "is missing (needed for the head width)", fn);
    Index heads = 0;
    if (heads_value->is_array()) {  // per-layer head counts: RoPE needs one width
      const std::vector<double> counts = file.numbers(heads_key);
      for (const double c : counts) {
        if (c != counts.front()) file.fail_key(heads_key, "differs between layers", fn);
      }
      heads = counts.empty() ? 0 : static_cast<Index>(counts.front());
      if (heads < 1) file.fail_key(heads_key, "must be >= 1", fn);
    } else {
      heads = positive_integer(heads_key);
    }
    out.head_dim = positive_integer(p + "embedding_length") / heads;
  }
  Index rotary_dim = out.head_dim;
  if (file.contains(p + "rope.dimension_count"))
    rotary_dim = positive_integer(p + "rope.dimension_count");
  if (arch == "deepseek2") out.head_dim = rotary_dim;  // MLA: RoPE runs on q_pe/k_pe alone
  if (out.head_dim > max_head_dim) {
    file.fail_key(p + "attention.key_length",
                  "gives heads of " + std::to_string(out.head_dim) + " channels (at most " +
                      std::to_string(max_head_dim) + ")",
                  fn);
  }
  if (rotary_dim % 2 != 0 || rotary_dim < 2 || rotary_dim > out.head_dim) {
    file.fail_key(p + "rope.dimension_count",
                  "gives a rotary width of " + std::to_string(rotary_dim) + " for heads of " +
                      std::to_string(out.head_dim) + " (must be even, >= 2 and <= the head width)",
                  fn);
  }
  out.options.base = base;
  out.options.rotary_dim = rotary_dim;
  if (options.pairing) {
    out.options.pairing = *options.pairing;
  } else if (const auto pairing = gguf_rope_pairing(arch)) {
    out.options.pairing = *pairing;
  } else {
    file.fail_key(
        "general.architecture",
        "'" + arch + "' has no known ggml rope mode here; pass RopeConfigOptions::pairing", fn);
  }
  if (file.contains(p + "context_length"))
    out.max_position_embeddings = positive_integer(p + "context_length");

  // llama.cpp: the type defaults to linear, the factor to rope.scale_linear, 0 means 1.
  std::string type = "linear";
  if (file.contains(p + "rope.scaling.type")) type = file.string(p + "rope.scaling.type");
  double factor = 0.0;
  if (file.contains(p + "rope.scaling.factor")) {
    factor = file.number(p + "rope.scaling.factor");
  } else if (file.contains(p + "rope.scale_linear")) {
    factor = file.number(p + "rope.scale_linear");
  }
  if (factor == 0.0) factor = 1.0;
  const std::string factor_key = p + "rope.scaling.factor";
  if (!(std::isfinite(factor) && factor > 0.0)) file.fail_key(factor_key, "must be > 0", fn);
  Index l0 = out.max_position_embeddings;
  if (file.contains(p + "rope.scaling.original_context_length"))
    l0 = positive_integer(p + "rope.scaling.original_context_length");
  const double attn_factor = file.optional_number(p + "rope.scaling.attn_factor").value_or(1.0);
  if (!(std::isfinite(attn_factor) && attn_factor > 0.0))
    file.fail_key(p + "rope.scaling.attn_factor", "must be > 0", fn);
  auto need_l0 = [&](const char* why) {
    if (l0 < 2)
      file.fail_key(p + "rope.scaling.original_context_length",
                    std::string("is missing (as is ") + p + "context_length), needed by " + why,
                    fn);
    return l0;
  };
  auto factor_table = [&](const std::string& name) {
    std::vector<double> values = file.tensor_values(name);
    if (static_cast<Index>(values.size()) != rotary_dim / 2) {
      throw std::invalid_argument(std::string(fn) + ": '" + file.path() + "': tensor '" + name +
                                  "' has " + std::to_string(values.size()) +
                                  " values but the rotary width " + std::to_string(rotary_dim) +
                                  " has " + std::to_string(rotary_dim / 2) + " pairs");
    }
    for (const double v : values) {
      if (!(std::isfinite(v) && v > 0.0)) {
        throw std::invalid_argument(
            std::string(fn) + ": '" + file.path() + "': tensor '" + name +
            "' holds a value that is not finite and positive: " + std::to_string(v));
      }
    }
    return values;
  };
  const bool has_long = file.find_tensor("rope_factors_long.weight") != nullptr;
  const bool has_short = file.find_tensor("rope_factors_short.weight") != nullptr;
  const bool has_freqs = file.find_tensor("rope_freqs.weight") != nullptr;
  const bool plain = type == "none" || (type == "linear" && factor == 1.0);

  RopeScaling& scaling = out.options.scaling;
  if (has_long || has_short || type == "longrope") {
    if (!has_long || !has_short) {
      throw std::invalid_argument(
          std::string(fn) + ": '" + file.path() +
          "': LongRoPE needs tensors 'rope_factors_long.weight' and 'rope_factors_short.weight', "
          "missing '" +
          std::string(has_long ? "rope_factors_short.weight" : "rope_factors_long.weight") + "'");
    }
    if (!plain && type != "longrope")
      file.fail_key(p + "rope.scaling.type",
                    "is '" + type + "' but the file has LongRoPE factor tensors", fn);
    LongRopeOptions longrope{factor_table("rope_factors_short.weight"),
                             factor_table("rope_factors_long.weight"), attn_factor};
    const Index context = need_l0("LongRoPE");
    const double s =
        out.max_position_embeddings > 0
            ? static_cast<double>(out.max_position_embeddings) / static_cast<double>(context)
            : 1.0;
    scaling = RopeScaling::longrope(s, context, options.sequence_length, std::move(longrope));
    out.rope_type = "longrope";
  } else if (has_freqs) {
    if (!plain)
      file.fail_key(p + "rope.scaling.type",
                    "is '" + type + "' with factor " + std::to_string(factor) +
                        " on top of the rope_freqs tensor (not supported)",
                    fn);
    std::vector<double> divisors = factor_table("rope_freqs.weight");
    scaling = RopeScaling::longrope(1.0, std::max<Index>(l0, 2), 0, {divisors, divisors, 1.0});
    out.rope_type = "rope_freqs";
  } else if (type == "none" || type == "linear") {
    scaling = factor == 1.0 ? RopeScaling::none() : RopeScaling::linear(factor);
    out.rope_type = type;
  } else if (type == "yarn") {
    const std::optional<double> ext = file.optional_number(p + "rope.scaling.yarn_ext_factor");
    if (ext && *ext != 1.0)
      file.fail_key(p + "rope.scaling.yarn_ext_factor",
                    "is " + std::to_string(*ext) + "; posenc's YaRN is ext_factor 1", fn);
    if (!(factor >= 1.0)) file.fail_key(factor_key, "must be >= 1 for yarn", fn);
    YarnOptions yarn;
    yarn.beta_fast = file.optional_number(p + "rope.scaling.yarn_beta_fast").value_or(32.0);
    yarn.beta_slow = file.optional_number(p + "rope.scaling.yarn_beta_slow").value_or(1.0);
    if (!(yarn.beta_slow > 0.0 && yarn.beta_fast >= yarn.beta_slow))
      file.fail_key(p + "rope.scaling.yarn_beta_fast", "must be >= yarn_beta_slow > 0", fn);
    // llama.cpp (since PR 17945): magnitude = HF's attention factor × rope.scaling.attn_factor.
    double magnitude = posenc::detail::yarn_magnitude(factor, 1.0);
    if (file.contains(p + "rope.scaling.yarn_log_multiplier")) {
      if (options.yarn_attention_factor) {
        magnitude = *options.yarn_attention_factor;
      } else if (arch == "deepseek2") {
        magnitude = 1.0;  // llama.cpp sets mscale = mscale_all_dim for DeepSeek-V2: g/g = 1
      } else {
        file.fail_key(p + "rope.scaling.yarn_log_multiplier",
                      "is set on '" + arch +
                          "', where llama.cpp's reading of it depends on the model; pass "
                          "RopeConfigOptions::yarn_attention_factor",
                      fn);
      }
    }
    yarn.attention_factor = magnitude * attn_factor;
    scaling = RopeScaling::yarn(factor, need_l0("YaRN"), yarn);
    out.rope_type = "yarn";
  } else {
    file.fail_key(p + "rope.scaling.type",
                  "names an unknown scaling '" + type + "' (known: none, linear, yarn, longrope)",
                  fn);
  }
  try {
    (void)posenc::detail::rope_frequencies(base, rotary_dim, scaling);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string(fn) + ": '" + file.path() +
                                "': the rope keys give an invalid RoPE: " + e.what());
  }
  return out;
}

inline RopeConfig rope_config_from_gguf_file(const std::string& path,
                                             const RopeConfigOptions& options = {}) {
  return rope_config_from_gguf(GgufFile::open(path), options);
}

}  // namespace posenc::io
