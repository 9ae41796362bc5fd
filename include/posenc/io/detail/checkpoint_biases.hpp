// SPDX-License-Identifier: MIT
// Loading and saving the learned relative encoders by the names of their reference code: HF T5's
// relative_attention_bias, KERPLE's bias_p / bias_a (chijames/KERPLE), FIRE's mlp / c / init_L /
// L_multiplier (the FIRE listing, as in chuanyang-Zheng/DAPE), ALiBi's `slopes` buffer, and Shaw's
// relative position tables (tensor2tensor, OpenNMT-py).
// IWYU pragma: private, include "posenc/io/checkpoint.hpp"
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "posenc/encoders/alibi.hpp"
#include "posenc/encoders/fire.hpp"
#include "posenc/encoders/kerple.hpp"
#include "posenc/encoders/shaw.hpp"
#include "posenc/encoders/t5_bias.hpp"
#include "posenc/io/detail/checkpoint_common.hpp"
#include "posenc/io/safetensors.hpp"
#include "posenc/tensor.hpp"

namespace posenc::io {

// ---------------------------------------------------------------------------------------------
// T5 (huggingface/transformers, models/t5/modeling_t5.py: T5Attention.relative_attention_bias, an
// nn.Embedding(num_buckets, n_heads) in the first layer of each stack).

/// Which T5 stack a relative bias belongs to: the encoder's is bidirectional, the decoder's
/// self-attention causal (HF: `bidirectional=not self.is_decoder`).
enum class T5Stack { encoder, decoder };

/// The module prefix of a stack's relative bias in an HF T5 state dict:
/// "encoder.block.<block>.layer.0.SelfAttention." (T5 and mT5 hold it in block 0 only; UMT5 in
/// every block).
inline std::string t5_bias_prefix(T5Stack stack, Index block = 0) {
  return std::string(stack == T5Stack::encoder ? "encoder" : "decoder") + ".block." +
         std::to_string(block) + ".layer.0.SelfAttention.";
}

/// Loads tensor `<prefix>relative_attention_bias.weight`, [num_buckets, heads] (num_buckets from
/// the shape), as a T5RelativeBias with the given direction and max_distance (HF config
/// `relative_attention_max_distance`, 128 in every released T5). std::invalid_argument naming the
/// file and tensor when it is missing, not floating-point, not 2-D, or rejected by T5RelativeBias.
template <class T>
T5RelativeBias<T> load_t5_bias(const SafetensorsFile& file, std::string_view prefix,
                               bool bidirectional, Index max_distance = 128) {
  constexpr const char* fn = "posenc::io::load_t5_bias";
  namespace ck = detail::checkpoint;
  const std::string name = ck::join(prefix, "relative_attention_bias.weight");
  const TensorInfo& info = ck::float_tensor(file, name, fn);
  ck::require_shape(info.shape.size() == 2 && info.shape[0] >= 1 && info.shape[1] >= 1, file, name,
                    info, fn, "[num_buckets, heads] (nn.Embedding(num_buckets, n_heads))");
  Matrix<T> table = ck::read_matrix<T>(file, name, info.shape[0], info.shape[1]);
  const T5BucketOptions options{
      .num_buckets = info.shape[0], .max_distance = max_distance, .bidirectional = bidirectional};
  return ck::construct(fn, file, ck::describe(name, info),
                       [&] { return T5RelativeBias<T>(std::move(table), options); });
}

/// The relative bias of an HF T5 checkpoint's encoder (bidirectional) or decoder (causal)
/// self-attention: `<stack>.block.0.layer.0.SelfAttention.relative_attention_bias.weight`.
template <class T>
T5RelativeBias<T> load_t5_bias(const SafetensorsFile& file, T5Stack stack = T5Stack::encoder,
                               Index max_distance = 128) {
  return load_t5_bias<T>(file, t5_bias_prefix(stack), stack == T5Stack::encoder, max_distance);
}

/// Writes `<prefix>relative_attention_bias.weight` [num_buckets, heads] (the bucket options are
/// not stored: HF keeps them in config.json). dtype: F32 for float, F64 for double by default.
template <class T>
void save(SafetensorsWriter& writer, const T5RelativeBias<T>& t5, std::string_view prefix,
          std::optional<Dtype> dtype = std::nullopt) {
  namespace ck = detail::checkpoint;
  const Dtype type = ck::save_dtype<T>(dtype, "posenc::io::save(T5RelativeBias)");
  writer.add(ck::join(prefix, "relative_attention_bias.weight"), t5.table(), type);
}

// ---------------------------------------------------------------------------------------------
// KERPLE (chijames/KERPLE, megatron/mpu/layers.py: ParallelKerpleLog, ParallelKerplePower; the
// same names in chuanyang-Zheng/DAPE's ParallelKerpleLog(_C) and Kerple_DAPEV2).

namespace detail::checkpoint {

/// A KERPLE parameter [heads, 1, 1] (the reference's `[:, None, None]`), or [heads].
inline Vector<double> read_kerple_parameter(const SafetensorsFile& file, const std::string& name,
                                            const char* function) {
  const TensorInfo& info = float_tensor(file, name, function);
  const bool column = info.shape.size() == 3 && info.shape[1] == 1 && info.shape[2] == 1;
  require_shape((column || info.shape.size() == 1) && info.shape[0] >= 1, file, name, info,
                function, "[heads, 1, 1] (or [heads])");
  return read_vector<double>(file, name);
}

}  // namespace detail::checkpoint

/// Loads KERPLE from `<prefix>bias_p` and `<prefix>bias_a`, [heads, 1, 1] each (or [heads]). The
/// roles follow the reference: log kernel −bias_p·log(1 + bias_a·δ), so r1 = bias_p, r2 = bias_a;
/// power kernel −bias_a·δ^bias_p, so r1 = bias_a, r2 = bias_p. For the power kernel a missing
/// bias_p (or bias_a) is the reference's configuration without it (`kerple_power_a_`, ..._original:
/// exponent 1; `_p_`: factor 1); ParallelKerplePower's weight kernel (`wei_a`, `wei_p`) is not
/// modelled and is rejected. The kernel and form are not stored: KerpleKernel::log with
/// BiasForm::causal is the reference's `kerple_log` (the `tril(i − j)` distances). Values are
/// taken raw; Kerple clamps them as the reference does in place.
/// Prefixes: "attention.rpe." in a gpt-neox layer (chijames/KERPLE; a pipeline state dict adds
/// the layer index, "2.attention.rpe."), "attention.kerple." / "attention.kerple_c." in DAPE's.
template <class T>
Kerple<T> load_kerple(const SafetensorsFile& file, std::string_view prefix,
                      KerpleKernel kernel = KerpleKernel::log, BiasForm form = BiasForm::causal) {
  constexpr const char* fn = "posenc::io::load_kerple";
  namespace ck = detail::checkpoint;
  const std::string p_name = ck::join(prefix, "bias_p");
  const std::string a_name = ck::join(prefix, "bias_a");
  if (kernel == KerpleKernel::log) {
    const Vector<double> p = ck::read_kerple_parameter(file, p_name, fn);
    const Vector<double> a = ck::read_kerple_parameter(file, a_name, fn);
    const std::string read =
        ck::describe(p_name, file.info(p_name)) + " and " + ck::describe(a_name, file.info(a_name));
    if (p.size() != a.size()) {
      io::detail::throw_format_error(fn, file.source(), "tensors ", read,
                                     " must have one entry per head each");
    }
    return ck::construct(fn, file, read, [&] { return Kerple<T>(kernel, p, a, form); });
  }
  for (const char* weight : {"wei_a", "wei_p"}) {
    const std::string name = ck::join(prefix, weight);
    if (file.contains(name)) {
      io::detail::throw_format_error(
          fn, file.source(), io::detail::tensor_label(name),
          "ParallelKerplePower's weight kernel exp(−wei_a·δ^wei_p) is not supported by "
          "posenc::Kerple (only the bias kernel −bias_a·δ^bias_p is)");
    }
  }
  const bool has_p = file.contains(p_name);
  const bool has_a = file.contains(a_name);
  if (!has_p && !has_a) ck::throw_missing(file, a_name, fn);
  Vector<double> a = has_a ? ck::read_kerple_parameter(file, a_name, fn) : Vector<double>();
  Vector<double> p = has_p ? ck::read_kerple_parameter(file, p_name, fn) : Vector<double>();
  if (!has_a) a = Vector<double>::Ones(p.size());
  if (!has_p) p = Vector<double>::Ones(a.size());
  std::string read;
  if (has_p) read += ck::describe(p_name, file.info(p_name));
  if (has_a) read += (has_p ? " and " : "") + ck::describe(a_name, file.info(a_name));
  if (p.size() != a.size()) {
    io::detail::throw_format_error(fn, file.source(), "tensors ", read,
                                   " must have one entry per head each");
  }
  return ck::construct(fn, file, read, [&] { return Kerple<T>(kernel, a, p, form); });
}

/// Writes `<prefix>bias_p` and `<prefix>bias_a` [heads, 1, 1], the raw (unclamped) parameters in
/// the reference's roles (log: bias_p = r1, bias_a = r2; power: bias_a = r1, bias_p = r2).
template <class T>
void save(SafetensorsWriter& writer, const Kerple<T>& kerple, std::string_view prefix,
          std::optional<Dtype> dtype = std::nullopt) {
  namespace ck = detail::checkpoint;
  const Dtype type = ck::save_dtype<T>(dtype, "posenc::io::save(Kerple)");
  const bool log = kerple.kernel() == KerpleKernel::log;
  const Vector<double>& p = log ? kerple.raw_r1() : kerple.raw_r2();
  const Vector<double>& a = log ? kerple.raw_r2() : kerple.raw_r1();
  const Index heads = kerple.heads();
  ck::put(writer, ck::join(prefix, "bias_p"), p.data(), heads, {heads, 1, 1}, type);
  ck::put(writer, ck::join(prefix, "bias_a"), a.data(), heads, {heads, 1, 1}, type);
}

// ---------------------------------------------------------------------------------------------
// FIRE (the FIRE module of mcleish7/arithmetic cramming/architectures/embeddings.py and of
// chuanyang-Zheng/DAPE megatron/model/positional_embeddings.py: FIRE, FIRE_C, FIRE_DAPEV2).

/// Loads FIRE from `<prefix>mlp.0.weight` [W, 1], `mlp.0.bias` [W], `mlp.2.weight` [H, W],
/// `mlp.2.bias` [H] (nn.Sequential(Linear(1, W), act, Linear(W, H))), and the scalars `c`,
/// `init_L` and `L_multiplier` ([] or [1]), which replace options.c, options.threshold and
/// options.threshold_multiplier. `init_L` is the threshold the module uses: DAPE's modules store
/// init_L // 2 there already. What the checkpoint does not hold comes from `options`: the
/// activation (relu for FIRE, leaky_relu for FIRE_C / FIRE_DAPEV2), form, eps and
/// float32_distance (FireOptions::dape() for DAPE's modules).
/// Prefixes: "attention.fire." / "attention.fire_c." in DAPE's gpt-neox layers.
template <class T>
Fire<T> load_fire(const SafetensorsFile& file, std::string_view prefix, FireOptions options = {}) {
  constexpr const char* fn = "posenc::io::load_fire";
  namespace ck = detail::checkpoint;
  const std::string w1_name = ck::join(prefix, "mlp.0.weight");
  const std::string b1_name = ck::join(prefix, "mlp.0.bias");
  const std::string w2_name = ck::join(prefix, "mlp.2.weight");
  const std::string b2_name = ck::join(prefix, "mlp.2.bias");
  const TensorInfo& w1 = ck::float_tensor(file, w1_name, fn);
  ck::require_shape(w1.shape.size() == 2 && w1.shape[0] >= 1 && w1.shape[1] == 1, file, w1_name, w1,
                    fn, "[mlp_width, 1] (nn.Linear(1, mlp_width).weight)");
  const Index width = w1.shape[0];
  const TensorInfo& b1 = ck::float_tensor(file, b1_name, fn);
  ck::require_shape(ck::shape_is(b1.shape, {width}), file, b1_name, b1, fn,
                    "[" + std::to_string(width) + "] (mlp_width of \"" + w1_name + "\")");
  const TensorInfo& w2 = ck::float_tensor(file, w2_name, fn);
  ck::require_shape(w2.shape.size() == 2 && w2.shape[0] >= 1 && w2.shape[1] == width, file, w2_name,
                    w2, fn,
                    "[heads, " + std::to_string(width) + "] (nn.Linear(mlp_width, heads).weight)");
  const Index heads = w2.shape[0];
  const TensorInfo& b2 = ck::float_tensor(file, b2_name, fn);
  ck::require_shape(ck::shape_is(b2.shape, {heads}), file, b2_name, b2, fn,
                    "[" + std::to_string(heads) + "] (heads of \"" + w2_name + "\")");
  options.c = ck::read_scalar(file, ck::join(prefix, "c"), fn);
  options.threshold = ck::read_scalar(file, ck::join(prefix, "init_L"), fn);
  options.threshold_multiplier = ck::read_scalar(file, ck::join(prefix, "L_multiplier"), fn);
  Matrix<double> w1_value = ck::read_matrix<double>(file, w1_name, width, 1);
  Vector<double> b1_value = ck::read_vector<double>(file, b1_name);
  Matrix<double> w2_value = ck::read_matrix<double>(file, w2_name, heads, width);
  Vector<double> b2_value = ck::read_vector<double>(file, b2_name);
  return ck::construct(
      fn, file, "under \"" + std::string(prefix) + "\" (mlp.*, c, init_L, L_multiplier)", [&] {
        return Fire<T>(std::move(w1_value), std::move(b1_value), std::move(w2_value),
                       std::move(b2_value), options);
      });
}

/// Writes FIRE's seven tensors under `prefix` (mlp.0.weight [W, 1], mlp.0.bias [W], mlp.2.weight
/// [H, W], mlp.2.bias [H]; c, init_L = options().threshold, L_multiplier as scalars []).
template <class T>
void save(SafetensorsWriter& writer, const Fire<T>& fire, std::string_view prefix,
          std::optional<Dtype> dtype = std::nullopt) {
  namespace ck = detail::checkpoint;
  const Dtype type = ck::save_dtype<T>(dtype, "posenc::io::save(Fire)");
  const Index width = fire.mlp_width();
  const Index heads = fire.heads();
  ck::put(writer, ck::join(prefix, "mlp.0.weight"), fire.w1().data(), width, {width, 1}, type);
  ck::put(writer, ck::join(prefix, "mlp.0.bias"), fire.b1().data(), width, {width}, type);
  ck::put(writer, ck::join(prefix, "mlp.2.weight"), fire.w2().data(), heads * width, {heads, width},
          type);
  ck::put(writer, ck::join(prefix, "mlp.2.bias"), fire.b2().data(), heads, {heads}, type);
  const FireOptions& options = fire.options();
  ck::put(writer, ck::join(prefix, "c"), &options.c, 1, {}, type);
  ck::put(writer, ck::join(prefix, "init_L"), &options.threshold, 1, {}, type);
  ck::put(writer, ck::join(prefix, "L_multiplier"), &options.threshold_multiplier, 1, {}, type);
}

// ---------------------------------------------------------------------------------------------
// ALiBi: not learned, but its slopes are a persistent buffer of the reference modules (`slopes`
// in ofirpress/attention_with_linear_biases' fairseq and in DAPE's AliBi / AliBi_C), so a DAPE
// checkpoint over ALiBi carries them.

/// Loads `<prefix>slopes` [heads] as Alibi(slopes, form) (the stored values, e.g. the float32
/// rounding of DAPE's `torch.Tensor(slopes)`).
template <class T>
Alibi<T> load_alibi(const SafetensorsFile& file, std::string_view prefix,
                    BiasForm form = BiasForm::causal) {
  constexpr const char* fn = "posenc::io::load_alibi";
  namespace ck = detail::checkpoint;
  const std::string name = ck::join(prefix, "slopes");
  const TensorInfo& info = ck::float_tensor(file, name, fn);
  ck::require_shape(info.shape.size() == 1 && info.shape[0] >= 1, file, name, info, fn, "[heads]");
  Vector<double> slopes = ck::read_vector<double>(file, name);
  return ck::construct(fn, file, ck::describe(name, info),
                       [&] { return Alibi<T>(std::move(slopes), form); });
}

/// Writes `<prefix>slopes` [heads].
template <class T>
void save(SafetensorsWriter& writer, const Alibi<T>& alibi, std::string_view prefix,
          std::optional<Dtype> dtype = std::nullopt) {
  namespace ck = detail::checkpoint;
  const Dtype type = ck::save_dtype<T>(dtype, "posenc::io::save(Alibi)");
  ck::put(writer, ck::join(prefix, "slopes"), alibi.slopes().data(), alibi.heads(), {alibi.heads()},
          type);
}

// ---------------------------------------------------------------------------------------------
// Shaw et al.: separate key and value tables as tensor2tensor names its variables
// (common_attention.py, dot_product_attention_relative: variable scopes relative_positions_keys
// and relative_positions_values, each holding `embeddings` [2k + 1, depth]), or OpenNMT-py's one
// table for both (onmt/modules/multi_headed_attn.py: relative_positions_embeddings, an
// nn.Embedding(2k + 1, dim_per_head)).

/// Loads ShawRelative under `prefix`: `<prefix>relative_positions_embeddings.weight` when present
/// (OpenNMT-py, tied), else `<prefix>relative_positions_keys/embeddings` and, when present,
/// `<prefix>relative_positions_values/embeddings` (tensor2tensor; ShawValues::none without it).
/// k = max_relative_position from the 2k + 1 rows. t2t's prefix is its variable scope, e.g.
/// "transformer/body/encoder/layer_0/self_attention/multihead_attention/
/// dot_product_attention_relative/"; OpenNMT-py's "encoder.transformer.0.self_attn.".
template <class T>
ShawRelative<T> load_shaw(const SafetensorsFile& file, std::string_view prefix) {
  constexpr const char* fn = "posenc::io::load_shaw";
  namespace ck = detail::checkpoint;
  const auto table = [&](const std::string& name) {
    const TensorInfo& info = ck::float_tensor(file, name, fn);
    ck::require_shape(info.shape.size() == 2 && info.shape[0] % 2 == 1 && info.shape[1] >= 1, file,
                      name, info, fn,
                      "[2·max_relative_position + 1, depth] (an odd number of rows)");
    return ck::read_matrix<T>(file, name, info.shape[0], info.shape[1]);
  };
  const std::string tied = ck::join(prefix, "relative_positions_embeddings.weight");
  if (file.contains(tied)) {
    Matrix<T> both = table(tied);
    const Index k = (both.rows() - 1) / 2;
    return ck::construct(fn, file, ck::describe(tied, file.info(tied)),
                         [&] { return ShawRelative<T>::tied(k, std::move(both)); });
  }
  const std::string keys_name = ck::join(prefix, "relative_positions_keys/embeddings");
  const std::string values_name = ck::join(prefix, "relative_positions_values/embeddings");
  Matrix<T> keys = table(keys_name);
  const Index k = (keys.rows() - 1) / 2;
  std::string read = ck::describe(keys_name, file.info(keys_name));
  if (!file.contains(values_name)) {
    return ck::construct(fn, file, read, [&] { return ShawRelative<T>(k, std::move(keys)); });
  }
  Matrix<T> values = table(values_name);
  read += " and " + ck::describe(values_name, file.info(values_name));
  if (values.rows() != keys.rows()) {
    io::detail::throw_format_error(fn, file.source(), "tensors ", read,
                                   " must have the same 2k + 1 rows");
  }
  return ck::construct(fn, file, read,
                       [&] { return ShawRelative<T>(k, std::move(keys), std::move(values)); });
}

/// Writes ShawRelative under `prefix` by the names load_shaw reads: a tied table as OpenNMT-py's
/// relative_positions_embeddings.weight, otherwise t2t's relative_positions_keys/embeddings (and
/// relative_positions_values/embeddings when values are separate).
template <class T>
void save(SafetensorsWriter& writer, const ShawRelative<T>& shaw, std::string_view prefix,
          std::optional<Dtype> dtype = std::nullopt) {
  namespace ck = detail::checkpoint;
  const Dtype type = ck::save_dtype<T>(dtype, "posenc::io::save(ShawRelative)");
  if (shaw.values() == ShawValues::tied) {
    writer.add(ck::join(prefix, "relative_positions_embeddings.weight"), shaw.key_table(), type);
    return;
  }
  writer.add(ck::join(prefix, "relative_positions_keys/embeddings"), shaw.key_table(), type);
  if (shaw.values() == ShawValues::separate) {
    writer.add(ck::join(prefix, "relative_positions_values/embeddings"), shaw.value_table(), type);
  }
}

}  // namespace posenc::io
