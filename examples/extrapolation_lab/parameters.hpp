// SPDX-License-Identifier: MIT
// The model's size and its parameters as one flat vector of named tensors (as llm.c keeps them):
// the optimiser, gradient clipping, the finite-difference check and the checkpoint all walk the
// same list. The encoder's learnable parameters are tensors of that list like any other.
#pragma once

#include <cmath>
#include <cstdint>
#include <numbers>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <posenc/tensor.hpp>

namespace lab {

using posenc::Index;

/// The size of the decoder-only byte-level LM.
struct ModelConfig {
  Index vocab = 256;          // V: bytes
  Index layers = 2;           // L
  Index width = 128;          // C, the residual width
  Index heads = 4;            // H; head dim D = C / H
  Index mlp_ratio = 4;        // the MLP's hidden width is mlp_ratio · C
  Index train_length = 128;   // the sequence length the model is trained at
  double init_stddev = 0.02;  // GPT-2's initialisation

  Index head_dim() const { return width / heads; }
  Index hidden() const { return mlp_ratio * width; }

  /// Throws std::invalid_argument naming the bad setting.
  void validate() const {
    auto require = [](bool ok, const std::string& message) {
      if (!ok) throw std::invalid_argument("lab::ModelConfig: " + message);
    };
    require(vocab >= 2 && layers >= 1 && heads >= 1 && mlp_ratio >= 1 && train_length >= 2,
            "sizes must be positive");
    require(width % heads == 0, "width " + std::to_string(width) + " is not a multiple of heads " +
                                    std::to_string(heads));
    require(head_dim() % 2 == 0,
            "the head dim " + std::to_string(head_dim()) + " must be even (RoPE rotates pairs)");
  }
};

/// One named tensor of the flat parameter vector. `shape` is its checkpoint shape ({C} for a
/// norm's weight, {C, 3C} for a projection); `decay` marks the matrices AdamW decays; `encoder`
/// marks the encoder's parameters (saved by posenc::io::save under their reference names, not by
/// the model).
struct TensorSpec {
  std::string name;
  std::vector<Index> shape;
  bool decay = false;
  bool encoder = false;
  Index offset = 0;  // filled by ParameterLayout

  Index size() const {
    Index n = 1;
    for (const Index d : shape) n *= d;
    return n;
  }
  Index rows() const { return shape.size() == 2 ? shape[0] : 1; }
  Index cols() const { return shape.empty() ? 1 : shape.back(); }
};

/// The named tensors of a model, laid out one after the other in a flat vector.
class ParameterLayout {
 public:
  /// Appends `spec`; returns its index.
  Index add(TensorSpec spec) {
    spec.offset = total_;
    total_ += spec.size();
    specs_.push_back(std::move(spec));
    return static_cast<Index>(specs_.size()) - 1;
  }
  const std::vector<TensorSpec>& specs() const { return specs_; }
  const TensorSpec& operator[](Index i) const { return specs_[static_cast<std::size_t>(i)]; }
  Index total() const { return total_; }

 private:
  std::vector<TensorSpec> specs_;
  Index total_ = 0;
};

/// Standard normal draws by Box–Muller on 53-bit uniforms from mt19937_64 (std::normal_distribution
/// is not specified bit-for-bit, and a seed must give the same model with any standard library).
class NormalDraws {
 public:
  explicit NormalDraws(std::uint64_t seed) : rng_(seed) {}
  double operator()() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    const double u1 = (static_cast<double>(rng_() >> 11) + 1.0) * 0x1.0p-53;  // (0, 1]
    const double u2 = static_cast<double>(rng_() >> 11) * 0x1.0p-53;          // [0, 1)
    const double radius = std::sqrt(-2.0 * std::log(u1));
    spare_ = radius * std::sin(2.0 * std::numbers::pi * u2);
    has_spare_ = true;
    return radius * std::cos(2.0 * std::numbers::pi * u2);
  }
  std::mt19937_64& engine() { return rng_; }

 private:
  std::mt19937_64 rng_;
  double spare_ = 0.0;
  bool has_spare_ = false;
};

}  // namespace lab
