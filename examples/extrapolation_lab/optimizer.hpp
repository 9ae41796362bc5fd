// SPDX-License-Identifier: MIT
// AdamW (Loshchilov & Hutter 2019, arXiv 1711.05101) over the model's flat parameter vector, with
// linear warm-up then cosine or linear decay, and clipping of the gradient by its global norm
// (Pascanu et al. 2013). Weight decay applies to the tensors the layout marks (the matrices).
#pragma once

#include <algorithm>
#include <cmath>
#include <numbers>
#include <vector>

#include "parameters.hpp"

namespace lab {

/// How the learning rate falls after warm-up, down to min_lr_fraction · learning_rate.
enum class Decay { cosine, linear };

/// An aggregate: `{.learning_rate = 3e-3, .total_steps = 300}`.
struct AdamWOptions {
  double learning_rate = 2e-3;
  double min_lr_fraction = 0.1;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  double clip_norm = 1.0;  // ≤ 0: no clipping
  Index warmup_steps = 10;
  Index total_steps = 100;
  Decay decay = Decay::cosine;
};

/// The learning rate at step t (0-based): learning_rate·(t + 1)/warmup during warm-up, then
/// from learning_rate down to min_lr_fraction·learning_rate at the last step.
inline double learning_rate_at(const AdamWOptions& o, Index step) {
  if (step < o.warmup_steps) {
    return o.learning_rate * static_cast<double>(step + 1) / static_cast<double>(o.warmup_steps);
  }
  const Index span = std::max<Index>(o.total_steps - o.warmup_steps - 1, 1);
  const double progress =
      std::clamp(static_cast<double>(step - o.warmup_steps) / static_cast<double>(span), 0.0, 1.0);
  const double shape = o.decay == Decay::cosine
                           ? 0.5 * (1.0 + std::cos(std::numbers::pi * progress))
                           : 1.0 - progress;
  const double min_lr = o.min_lr_fraction * o.learning_rate;
  return min_lr + (o.learning_rate - min_lr) * shape;
}

/// What one step did.
struct StepStats {
  double learning_rate;
  double gradient_norm;  // before clipping
};

template <class S>
class AdamW {
 public:
  AdamW(const ParameterLayout& layout, AdamWOptions options) : options_(options) {
    m_.setZero(layout.total());
    v_.setZero(layout.total());
    decay_.setZero(layout.total());
    for (const TensorSpec& spec : layout.specs()) {
      if (spec.decay) decay_.segment(spec.offset, spec.size()).setOnes();
    }
  }

  /// One update of `params` (P) from `grads` (P): clip by the global norm, then AdamW with the
  /// scheduled learning rate. Element-wise after the norm (summed in order, in double), so the
  /// result does not depend on the thread count.
  StepStats step(posenc::Vector<S>& params, const posenc::Vector<S>& grads) {
    double squares = 0.0;
    for (Index i = 0; i < grads.size(); ++i) {
      squares += static_cast<double>(grads[i]) * static_cast<double>(grads[i]);
    }
    const double norm = std::sqrt(squares);
    const double clip =
        options_.clip_norm > 0.0 && norm > options_.clip_norm ? options_.clip_norm / norm : 1.0;
    const double lr = learning_rate_at(options_, t_);
    ++t_;
    const double correction1 = 1.0 - std::pow(options_.beta1, static_cast<double>(t_));
    const double correction2 = 1.0 - std::pow(options_.beta2, static_cast<double>(t_));
    const S b1 = static_cast<S>(options_.beta1), b2 = static_cast<S>(options_.beta2);
    const S c = static_cast<S>(clip);
    m_.array() = b1 * m_.array() + (S(1) - b1) * c * grads.array();
    v_.array() = b2 * v_.array() + (S(1) - b2) * (c * grads.array()).square();
    const S step_size = static_cast<S>(lr / correction1);
    const S root_correction2 = static_cast<S>(std::sqrt(correction2));
    const S decay = static_cast<S>(lr * options_.weight_decay);
    params.array() -= decay * decay_.array() * params.array() +
                      step_size * m_.array() /
                          (v_.array().sqrt() / root_correction2 + static_cast<S>(options_.eps));
    return {lr, norm};
  }

  const AdamWOptions& options() const { return options_; }

 private:
  AdamWOptions options_;
  posenc::Vector<S> m_, v_, decay_;
  Index t_ = 0;
};

}  // namespace lab
