// SPDX-License-Identifier: MIT
// The lab's decoder-only byte-level language model, generic over the encoding (encodings.hpp):
// token embedding; L pre-norm blocks x += attn(RMSNorm(x)), x += MLP(RMSNorm(x)) with causal
// multi-head attention under the encoding and a GELU MLP; a final RMSNorm; the output head tied to
// the embedding; cross-entropy. Forward and backward by hand, layer by layer (layers.hpp).
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include <posenc/io/safetensors.hpp>

#include "encodings.hpp"
#include "layers.hpp"
#include "parameters.hpp"

namespace lab {

template <Encoding EncodingT>
class Model {
 public:
  using Adapter = EncodingT;
  using Scalar = typename Adapter::Scalar;
  using Encoder = typename Adapter::Encoder;
  using EncoderGradient = posenc::encoder_gradient_t<Encoder>;
  using S = Scalar;

  /// A model of `config`, initialised from `seed`: GPT-2's N(0, 0.02) for the embedding and the
  /// projections (the two output projections of a block scaled by 1/√(2L)), ones for the norms.
  /// The weights do not depend on the encoding; the encoder's own parameters are drawn from a
  /// separate stream of the same seed.
  Model(ModelConfig config, std::uint64_t seed) : config_(config) {
    config_.validate();
    const Index C = config_.width, V = config_.vocab, F = config_.hidden();
    wte_ = layout_.add({"wte.weight", {V, C}, true, false});
    for (Index l = 0; l < config_.layers; ++l) {
      const std::string p = "h." + std::to_string(l) + ".";
      LayerTensors t;
      t.ln_1 = layout_.add({p + "ln_1.weight", {C}, false, false});
      t.c_attn = layout_.add({p + "attn.c_attn.weight", {C, 3 * C}, true, false});
      t.attn_proj = layout_.add({p + "attn.c_proj.weight", {C, C}, true, false});
      t.ln_2 = layout_.add({p + "ln_2.weight", {C}, false, false});
      t.c_fc = layout_.add({p + "mlp.c_fc.weight", {C, F}, true, false});
      t.mlp_proj = layout_.add({p + "mlp.c_proj.weight", {F, C}, true, false});
      t.encoder_first = static_cast<Index>(layout_.specs().size());
      for (TensorSpec spec : Adapter::parameters(config_)) {
        spec.name = p + "attn." + spec.name;
        spec.encoder = true;
        layout_.add(std::move(spec));
      }
      t.encoder_count = static_cast<Index>(layout_.specs().size()) - t.encoder_first;
      layers_.push_back(t);
    }
    ln_f_ = layout_.add({"ln_f.weight", {C}, false, false});
    params_.setZero(layout_.total());
    grads_.setZero(layout_.total());

    NormalDraws weights(seed);
    NormalDraws encoder_draws(seed ^ 0x9e3779b97f4a7c15ull);
    const double residual_scale = 1.0 / std::sqrt(2.0 * static_cast<double>(config_.layers));
    for (const TensorSpec& spec : layout_.specs()) {
      if (spec.encoder) continue;
      auto values = params_.segment(spec.offset, spec.size());
      if (spec.shape.size() == 1) {
        values.setOnes();  // the norms
        continue;
      }
      const bool output = spec.name.ends_with("c_proj.weight");
      const double stddev = config_.init_stddev * (output ? residual_scale : 1.0);
      for (Index i = 0; i < values.size(); ++i) values[i] = static_cast<S>(stddev * weights());
    }
    for (const LayerTensors& t : layers_)
      Adapter::initialize(config_, encoder_draws, encoder_values(t));
  }

  const ModelConfig& config() const { return config_; }
  const ParameterLayout& layout() const { return layout_; }
  /// Every parameter, flat in layout() order; call parameters_changed() after writing to it.
  posenc::Vector<S>& parameters() { return params_; }
  const posenc::Vector<S>& parameters() const { return params_; }
  /// ∂loss/∂parameters after backward(), flat in layout() order.
  const posenc::Vector<S>& gradients() const { return grads_; }
  /// The per-token losses (B·T, nats) of the last forward.
  std::span<const S> token_losses() const {
    return {losses_.data(), static_cast<std::size_t>(B_ * T_)};
  }
  /// The encoder of layer l as the last forward used it.
  const Encoder& encoder(Index l) const { return encoders_[static_cast<std::size_t>(l)]; }

  /// Marks the parameters as changed (by the optimiser or a test): learned encoders are rebuilt
  /// at the next forward.
  void parameters_changed() { parameters_dirty_ = true; }

  /// Threads for the attention calls and the row-parallel layers (Eigen's products use
  /// Eigen::nbThreads()).
  void set_threads(int threads) { threads_ = threads < 1 ? 1 : threads; }

  /// Forward pass of B sequences of T tokens: inputs and targets are (B, T) bytes. Returns the
  /// mean cross-entropy (nats per token); token_losses() holds each token's.
  double forward(const int* inputs, const int* targets, Index B, Index T) {
    resize(B, T);
    build_encoders(T);
    const Index BT = B * T, C = config_.width, H = config_.heads, F = config_.hidden();
    inputs_ = inputs;
    targets_ = targets;
    embedding_forward<S>(act(residual_[0], BT, C), inputs, param(wte_));
    for (Index l = 0; l < config_.layers; ++l) {
      const LayerTensors& t = layers_[static_cast<std::size_t>(l)];
      LayerActivations& a = acts_[static_cast<std::size_t>(l)];
      rmsnorm_forward<S>(act(a.ln_1, BT, C), a.rstd_1.data(), cact(residual_[l], BT, C),
                         vparam(t.ln_1));
      matmul_forward<S>(act(a.qkv, BT, 3 * C), cact(a.ln_1, BT, C), param(t.c_attn), threads_);
      attention_forward(a.att.data(), a.lse, a.qkv.data(), B, T, C, H,
                        encoders_[static_cast<std::size_t>(l)], threads_);
      // residual_mid = residual_l + att · W_o
      matmul_forward<S>(act(a.residual_mid, BT, C), cact(a.att, BT, C), param(t.attn_proj),
                        threads_);
      act(a.residual_mid, BT, C) += cact(residual_[l], BT, C);
      rmsnorm_forward<S>(act(a.ln_2, BT, C), a.rstd_2.data(), cact(a.residual_mid, BT, C),
                         vparam(t.ln_2));
      matmul_forward<S>(act(a.fc, BT, F), cact(a.ln_2, BT, C), param(t.c_fc), threads_);
      gelu_forward<S>(act(a.gelu, BT, F), cact(a.fc, BT, F));
      // residual_{l+1} = residual_mid + gelu · W_proj
      matmul_forward<S>(act(residual_[l + 1], BT, C), cact(a.gelu, BT, F), param(t.mlp_proj),
                        threads_);
      act(residual_[l + 1], BT, C) += cact(a.residual_mid, BT, C);
    }
    rmsnorm_forward<S>(act(ln_f_out_, BT, C), rstd_f_.data(),
                       cact(residual_[config_.layers], BT, C), vparam(ln_f_));
    // logits = ln_f · wteᵀ (tied head)
    product_by_rows(act(logits_, BT, config_.vocab), cact(ln_f_out_, BT, C),
                    param(wte_).transpose(), false, threads_);
    const double total =
        crossentropy_forward<S>(losses_.data(), act(probs_, BT, config_.vocab),
                                cact(logits_, BT, config_.vocab), targets, threads_);
    return total / static_cast<double>(BT);
  }

  /// Backward pass of the last forward: gradients() = ∂(mean loss)/∂parameters (overwritten).
  void backward() {
    const Index B = B_, T = T_, BT = B * T, C = config_.width, H = config_.heads;
    const Index F = config_.hidden(), V = config_.vocab;
    grads_.setZero();
    dresidual_.resize(BT * C);
    dln_.resize(BT * C);
    dqkv_.resize(BT * 3 * C);
    datt_.resize(BT * C);
    dhidden_.resize(BT * F);
    dfc_.resize(BT * F);
    dlogits_.resize(BT * V);
    crossentropy_backward<S>(act(dlogits_, BT, V), cact(probs_, BT, V), targets_,
                             S(1) / static_cast<S>(BT));
    // logits = ln_f · wteᵀ: dln_f = dlogits · wte, dwte += dlogitsᵀ · ln_f
    product_by_rows(act(dln_, BT, C), cact(dlogits_, BT, V), param(wte_), false, threads_);
    // dwteᵀ (C, V) += ln_fᵀ · dlogits, split over the columns of dwteᵀ (the rows of dwte)
    accumulate_by_columns(grad(wte_).transpose(), cact(ln_f_out_, BT, C).transpose(),
                          cact(dlogits_, BT, V), threads_);
    act(dresidual_, BT, C).setZero();
    rmsnorm_backward<S>(act(dresidual_, BT, C), vgrad(ln_f_), cact(dln_, BT, C),
                        cact(residual_[config_.layers], BT, C), vparam(ln_f_), rstd_f_.data());
    for (Index l = config_.layers - 1; l >= 0; --l) {
      const LayerTensors& t = layers_[static_cast<std::size_t>(l)];
      LayerActivations& a = acts_[static_cast<std::size_t>(l)];
      // MLP: residual_{l+1} = residual_mid + gelu(ln_2 · W_fc) · W_proj
      matmul_backward<S>(act(dhidden_, BT, F), grad(t.mlp_proj), cact(dresidual_, BT, C),
                         cact(a.gelu, BT, F), param(t.mlp_proj), threads_);
      gelu_backward<S>(act(dfc_, BT, F), cact(a.fc, BT, F), cact(dhidden_, BT, F));
      matmul_backward<S>(act(dln_, BT, C), grad(t.c_fc), cact(dfc_, BT, F), cact(a.ln_2, BT, C),
                         param(t.c_fc), threads_);
      rmsnorm_backward<S>(act(dresidual_, BT, C), vgrad(t.ln_2), cact(dln_, BT, C),
                          cact(a.residual_mid, BT, C), vparam(t.ln_2), a.rstd_2.data());
      // Attention: residual_mid = residual_l + attention(ln_1 · W_qkv) · W_o
      matmul_backward<S>(act(datt_, BT, C), grad(t.attn_proj), cact(dresidual_, BT, C),
                         cact(a.att, BT, C), param(t.attn_proj), threads_);
      encoder_gradient_ = zero_encoder_gradient(l);
      attention_backward(dqkv_.data(), encoder_gradient_, attention_workspace_, datt_.data(),
                         a.qkv.data(), a.att.data(), a.lse, B, T, C, H,
                         encoders_[static_cast<std::size_t>(l)], threads_);
      Adapter::gradient(encoders_[static_cast<std::size_t>(l)], encoder_gradient_,
                        encoder_gradients(t));
      matmul_backward<S>(act(dln_, BT, C), grad(t.c_attn), cact(dqkv_, BT, 3 * C),
                         cact(a.ln_1, BT, C), param(t.c_attn), threads_);
      rmsnorm_backward<S>(act(dresidual_, BT, C), vgrad(t.ln_1), cact(dln_, BT, C),
                          cact(residual_[l], BT, C), vparam(t.ln_1), a.rstd_1.data());
    }
    embedding_backward<S>(grad(wte_), inputs_, cact(dresidual_, BT, C));
  }

  /// Writes the model's weights under their GPT-2 names ("wte.weight", "h.0.attn.c_attn.weight"
  /// stored [in, out] as GPT-2's Conv1D, …) and each layer's encoder through posenc::io::save
  /// under "h.<l>.attn." (e.g. KERPLE's "h.0.attn.rpe.bias_p"), with `metadata`.
  void save(const std::filesystem::path& path,
            const std::vector<std::pair<std::string, std::string>>& metadata) {
    build_encoders(config_.train_length);
    posenc::io::SafetensorsWriter writer;
    for (const TensorSpec& spec : layout_.specs()) {
      if (spec.encoder) continue;
      if (spec.shape.size() == 1) {
        writer.add(spec.name, posenc::Vector<S>(params_.segment(spec.offset, spec.size())));
      } else {
        writer.add(spec.name,
                   ConstMatrixMap<S>(params_.data() + spec.offset, spec.rows(), spec.cols()));
      }
    }
    for (Index l = 0; l < config_.layers; ++l) {
      Adapter::save(writer, encoders_[static_cast<std::size_t>(l)],
                    "h." + std::to_string(l) + ".attn.");
    }
    writer.add_metadata("format", "pt");
    writer.add_metadata("encoding", std::string(Adapter::name));
    for (const auto& [key, value] : metadata) writer.add_metadata(key, value);
    writer.write(path);
  }

 private:
  /// Indices (in layout_) of one block's tensors.
  struct LayerTensors {
    Index ln_1 = 0, c_attn = 0, attn_proj = 0, ln_2 = 0, c_fc = 0, mlp_proj = 0;
    Index encoder_first = 0, encoder_count = 0;  // the adapter's tensors, consecutive
  };
  /// One block's activations, (B·T, ·) row-major, kept for the backward.
  struct LayerActivations {
    Buffer<S> ln_1, rstd_1;  // (BT, C), (BT)
    Buffer<S> qkv;           // (BT, 3C)
    Buffer<S> att;           // (BT, C): the attention output before W_o
    Matrix<S> lse;           // (B·H, T)
    Buffer<S> residual_mid;  // (BT, C)
    Buffer<S> ln_2, rstd_2;  // (BT, C), (BT)
    Buffer<S> fc, gelu;      // (BT, 4C) each
  };

  void resize(Index B, Index T) {
    if (B == B_ && T == T_) return;
    B_ = B;
    T_ = T;
    const Index BT = B * T, C = config_.width, F = config_.hidden(), V = config_.vocab;
    auto sized = [](Buffer<S>& x, Index n) { x.assign(static_cast<std::size_t>(n), S(0)); };
    residual_.resize(static_cast<std::size_t>(config_.layers + 1));
    for (auto& r : residual_) sized(r, BT * C);
    acts_.resize(static_cast<std::size_t>(config_.layers));
    for (LayerActivations& a : acts_) {
      sized(a.ln_1, BT * C);
      sized(a.rstd_1, BT);
      sized(a.qkv, BT * 3 * C);
      sized(a.att, BT * C);
      a.lse.setZero(B * config_.heads, T);
      sized(a.residual_mid, BT * C);
      sized(a.ln_2, BT * C);
      sized(a.rstd_2, BT);
      sized(a.fc, BT * F);
      sized(a.gelu, BT * F);
    }
    sized(ln_f_out_, BT * C);
    sized(rstd_f_, BT);
    sized(logits_, BT * V);
    sized(probs_, BT * V);
    sized(losses_, BT);
  }

  /// Builds each layer's encoder for sequences of `length` tokens: learned encoders whenever the
  /// parameters changed, fixed ones when the length changes (an extension may depend on it).
  void build_encoders(Index length) {
    const bool learned = !Adapter::parameters(config_).empty();
    if (encoder_length_ == length && !(learned && parameters_dirty_)) return;
    encoders_.clear();
    for (const LayerTensors& t : layers_) {
      const auto values = encoder_values(t);
      encoders_.push_back(Adapter::make(config_, std::span<const S>(values.data(), values.size()),
                                        {config_.train_length, length}));
    }
    encoder_length_ = length;
    parameters_dirty_ = false;
  }

  EncoderGradient zero_encoder_gradient(Index l) const {
    if constexpr (posenc::HasLearnableParameters<Encoder>) {
      return encoders_[static_cast<std::size_t>(l)].zero_gradient();
    } else {
      return {};
    }
  }

  std::span<S> encoder_values(const LayerTensors& t) { return encoder_span(params_, t); }
  std::span<S> encoder_gradients(const LayerTensors& t) { return encoder_span(grads_, t); }
  std::span<S> encoder_span(posenc::Vector<S>& flat, const LayerTensors& t) {
    if (t.encoder_count == 0) return {};
    const TensorSpec& first = layout_[t.encoder_first];
    const TensorSpec& last = layout_[t.encoder_first + t.encoder_count - 1];
    return {flat.data() + first.offset,
            static_cast<std::size_t>(last.offset + last.size() - first.offset)};
  }

  ConstMatrixMap<S> param(Index i) const {
    return ConstMatrixMap<S>(params_.data() + layout_[i].offset, layout_[i].rows(),
                             layout_[i].cols());
  }
  MatrixMap<S> grad(Index i) {
    return MatrixMap<S>(grads_.data() + layout_[i].offset, layout_[i].rows(), layout_[i].cols());
  }
  ConstVectorMap<S> vparam(Index i) const {
    return ConstVectorMap<S>(params_.data() + layout_[i].offset, layout_[i].size());
  }
  VectorMap<S> vgrad(Index i) {
    return VectorMap<S>(grads_.data() + layout_[i].offset, layout_[i].size());
  }
  static MatrixMap<S> act(Buffer<S>& x, Index rows, Index cols) {
    return MatrixMap<S>(x.data(), rows, cols);
  }
  static ConstMatrixMap<S> cact(const Buffer<S>& x, Index rows, Index cols) {
    return ConstMatrixMap<S>(x.data(), rows, cols);
  }

  ModelConfig config_;
  ParameterLayout layout_;
  Index wte_ = 0, ln_f_ = 0;
  std::vector<LayerTensors> layers_;
  posenc::Vector<S> params_, grads_;

  int threads_ = 1;
  Index B_ = 0, T_ = 0;
  const int* inputs_ = nullptr;
  const int* targets_ = nullptr;
  std::vector<Buffer<S>> residual_;  // L + 1 of (BT, C): the input of each block, and the last
  std::vector<LayerActivations> acts_;
  Buffer<S> ln_f_out_, rstd_f_, logits_, probs_, losses_;
  Buffer<S> dresidual_, dln_, dqkv_, datt_, dhidden_, dfc_, dlogits_;

  std::vector<Encoder> encoders_;
  Index encoder_length_ = -1;  // the length the encoders were built for; -1: not built
  bool parameters_dirty_ = true;
  EncoderGradient encoder_gradient_{};
  AttentionWorkspace<S, Encoder> attention_workspace_;
};

}  // namespace lab
