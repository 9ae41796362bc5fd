// SPDX-License-Identifier: MIT
// The encodings the lab compares, one small adapter each: which posenc encoder a layer's
// attention gets, which of its parameters are learned (as named tensors of the model's flat
// parameter vector), how to build the encoder from them and return its gradient, and how a
// checkpoint stores it (posenc::io::save). The model and the driver never name an encoder.
#pragma once

#include <cmath>
#include <concepts>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <posenc/encoders/alibi.hpp>
#include <posenc/encoders/kerple.hpp>
#include <posenc/encoders/rope.hpp>
#include <posenc/encoders/t5_bias.hpp>
#include <posenc/io/checkpoint.hpp>

#include "parameters.hpp"

namespace lab {

/// What an adapter is told when it builds a layer's encoder: the training length and the length
/// of the sequences the encoder is about to serve (equal while training). Inference-time
/// extensions (RoPE with YaRN or PI at evaluation) read both.
struct EncoderContext {
  Index train_length;
  Index sequence_length;
};

/// The adapter contract (one per encoding; Scalar is the model's):
///   using Scalar; using Encoder;                     the posenc encoder of one layer
///   static constexpr std::string_view name;          --only name, table row, file name
///   parameters(config) -> std::vector<TensorSpec>    one layer's learned tensors (names under the
///                                                    layer's prefix), empty for fixed encoders
///   initialize(config, draws, values)                their initial values (values: flat, in the
///                                                    order of parameters())
///   make(config, values, context) -> Encoder         one layer's encoder from its values
///   gradient(encoder, grad, out)                     writes Encoder::Gradient into out, flat
///   save(writer, encoder, prefix)                    the checkpoint tensors (posenc::io::save)
template <class A>
concept Encoding = requires(const ModelConfig& config, NormalDraws& draws,
                            std::span<typename A::Scalar> values,
                            std::span<const typename A::Scalar> const_values,
                            const EncoderContext& context, const typename A::Encoder& encoder,
                            posenc::io::SafetensorsWriter& writer) {
  typename A::Scalar;
  typename A::Encoder;
  { A::name } -> std::convertible_to<std::string_view>;
  { A::parameters(config) } -> std::same_as<std::vector<TensorSpec>>;
  A::initialize(config, draws, values);
  { A::make(config, const_values, context) } -> std::same_as<typename A::Encoder>;
  A::gradient(encoder, std::declval<const posenc::encoder_gradient_t<typename A::Encoder>&>(),
              values);
  A::save(writer, encoder, std::string());
};

/// The defaults of an encoding without learned parameters.
template <class S>
struct FixedEncoding {
  using Scalar = S;
  static std::vector<TensorSpec> parameters(const ModelConfig&) { return {}; }
  static void initialize(const ModelConfig&, NormalDraws&, std::span<S>) {}
  template <class Encoder>
  static void gradient(const Encoder&, const posenc::NoGradient&, std::span<S>) {}
};

/// NoPE: no positional information; causal masking alone tells positions apart.
template <class S>
struct Nope : FixedEncoding<S> {
  using Encoder = posenc::NoPositionalEncoding;
  static constexpr std::string_view name = "nope";
  static Encoder make(const ModelConfig&, std::span<const S>, const EncoderContext&) { return {}; }
  static void save(posenc::io::SafetensorsWriter&, const Encoder&, const std::string&) {}
};

/// RoPE (Su et al. 2021, arXiv 2104.09864): base 10000, every channel rotated, half pairing.
template <class S>
struct Rope : FixedEncoding<S> {
  using Encoder = posenc::RotaryEncoding<S>;
  static constexpr std::string_view name = "rope";
  static Encoder make(const ModelConfig& config, std::span<const S>, const EncoderContext&) {
    return Encoder(config.head_dim(), posenc::RotaryOptions{.base = 10000.0});
  }
  static void save(posenc::io::SafetensorsWriter&, const Encoder&, const std::string&) {}
};

/// ALiBi (Press et al. 2022, arXiv 2108.12409): the reference slopes, causal form.
template <class S>
struct Alibi : FixedEncoding<S> {
  using Encoder = posenc::Alibi<S>;
  static constexpr std::string_view name = "alibi";
  static Encoder make(const ModelConfig& config, std::span<const S>, const EncoderContext&) {
    return Encoder(config.heads);
  }
  static void save(posenc::io::SafetensorsWriter& writer, const Encoder& encoder,
                   const std::string& prefix) {
    posenc::io::save(writer, encoder, prefix + "alibi.");
  }
};

/// KERPLE-log (Chi et al. 2022, arXiv 2205.09921): B = −r1·log(1 + r2·δ), r1 and r2 learned per
/// head and per layer, initialised as the reference (r1 ~ U[0, 2), r2 ~ U[0, 1)); checkpoint
/// names bias_p (r1) and bias_a (r2) under "h.<l>.attn.rpe.", as chijames/KERPLE.
template <class S>
struct KerpleLog {
  using Scalar = S;
  using Encoder = posenc::Kerple<S>;
  static constexpr std::string_view name = "kerple";
  static std::vector<TensorSpec> parameters(const ModelConfig& config) {
    return {{"rpe.bias_p", {config.heads}, false, true},
            {"rpe.bias_a", {config.heads}, false, true}};
  }
  static void initialize(const ModelConfig& config, NormalDraws& draws, std::span<S> values) {
    const Encoder init = Encoder::random(posenc::KerpleKernel::log, config.heads, draws.engine());
    for (Index h = 0; h < config.heads; ++h) {
      values[static_cast<std::size_t>(h)] = static_cast<S>(init.raw_r1()[h]);
      values[static_cast<std::size_t>(config.heads + h)] = static_cast<S>(init.raw_r2()[h]);
    }
  }
  static Encoder make(const ModelConfig& config, std::span<const S> values, const EncoderContext&) {
    posenc::Vector<double> r1(config.heads), r2(config.heads);
    for (Index h = 0; h < config.heads; ++h) {
      r1[h] = static_cast<double>(values[static_cast<std::size_t>(h)]);
      r2[h] = static_cast<double>(values[static_cast<std::size_t>(config.heads + h)]);
    }
    return Encoder(posenc::KerpleKernel::log, std::move(r1), std::move(r2));
  }
  static void gradient(const Encoder& encoder, const typename Encoder::Gradient& grad,
                       std::span<S> out) {
    const Index heads = encoder.heads();
    for (Index h = 0; h < heads; ++h) {
      out[static_cast<std::size_t>(h)] = static_cast<S>(grad.r1[h]);
      out[static_cast<std::size_t>(heads + h)] = static_cast<S>(grad.r2[h]);
    }
  }
  static void save(posenc::io::SafetensorsWriter& writer, const Encoder& encoder,
                   const std::string& prefix) {
    posenc::io::save(writer, encoder, prefix + "rpe.");
  }
};

/// T5's relative bias (Raffel et al. 2020, arXiv 1910.10683): a learned table of 32 causal
/// buckets (max_distance 128) × heads per layer, initialised N(0, 1/C) as HF; checkpoint name
/// "h.<l>.attn.relative_attention_bias.weight". Scaled by 1/√D like every encoding here.
template <class S>
struct T5 {
  using Scalar = S;
  using Encoder = posenc::T5RelativeBias<S>;
  static constexpr std::string_view name = "t5";
  static constexpr posenc::T5BucketOptions buckets{
      .num_buckets = 32, .max_distance = 128, .bidirectional = false};
  static std::vector<TensorSpec> parameters(const ModelConfig& config) {
    return {{"relative_attention_bias.weight", {buckets.num_buckets, config.heads}, false, true}};
  }
  static void initialize(const ModelConfig& config, NormalDraws& draws, std::span<S> values) {
    const double stddev = 1.0 / std::sqrt(static_cast<double>(config.width));
    for (S& value : values) value = static_cast<S>(stddev * draws());
  }
  static Encoder make(const ModelConfig& config, std::span<const S> values, const EncoderContext&) {
    return Encoder(ConstMatrixMap(values.data(), buckets.num_buckets, config.heads), buckets);
  }
  static void gradient(const Encoder&, const typename Encoder::Gradient& grad, std::span<S> out) {
    MatrixMap(out.data(), grad.table.rows(), grad.table.cols()) = grad.table;
  }
  static void save(posenc::io::SafetensorsWriter& writer, const Encoder& encoder,
                   const std::string& prefix) {
    posenc::io::save(writer, encoder, prefix);
  }

 private:
  using ConstMatrixMap = Eigen::Map<const posenc::Matrix<S>>;
  using MatrixMap = Eigen::Map<posenc::Matrix<S>>;
};

static_assert(Encoding<Nope<float>> && Encoding<Rope<float>> && Encoding<Alibi<float>> &&
              Encoding<KerpleLog<float>> && Encoding<T5<float>> && Encoding<KerpleLog<double>>);

/// Calls f.template operator()<Adapter>() for the adapter named `name` (one of encoding_names);
/// returns false for an unknown name. New encodings are added here and to encoding_names.
template <class S, class F>
bool with_encoding(std::string_view name, F&& f) {
  if (name == Nope<S>::name) return f.template operator()<Nope<S>>(), true;
  if (name == Rope<S>::name) return f.template operator()<Rope<S>>(), true;
  if (name == Alibi<S>::name) return f.template operator()<Alibi<S>>(), true;
  if (name == KerpleLog<S>::name) return f.template operator()<KerpleLog<S>>(), true;
  if (name == T5<S>::name) return f.template operator()<T5<S>>(), true;
  return false;
}

/// Every encoding of with_encoding, in the order of the default run and of the tables.
inline const std::vector<std::string>& encoding_names() {
  static const std::vector<std::string> names = {"nope", "rope", "alibi", "kerple", "t5"};
  return names;
}

}  // namespace lab
