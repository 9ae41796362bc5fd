// SPDX-License-Identifier: MIT
// The lab's measurement: held-out bits per byte at lengths 128, 256, …, over the same held-out
// text at every length (non-overlapping windows, every token counted), and the bits per byte of
// the last 128 tokens of each window (how well the model uses positions beyond training).
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <stdexcept>
#include <string>
#include <vector>

#include "parameters.hpp"

namespace lab {

/// The held-out result of one encoding at one length.
struct LengthResult {
  Index length = 0;
  Index windows = 0;
  Index tokens = 0;               // windows · length: every target byte of the evaluated text
  double bits_per_byte = 0.0;     // mean over every token
  double tail_bits_per_byte = 0;  // mean over the last `tail` tokens of each window
  double seconds = 0.0;
};

/// 128, 256, …, up to max_length (which must be train_length · 2^k).
inline std::vector<Index> evaluation_lengths(Index train_length, Index max_length) {
  std::vector<Index> lengths;
  for (Index length = train_length; length <= max_length; length *= 2) lengths.push_back(length);
  if (lengths.empty() || lengths.back() != max_length) {
    throw std::invalid_argument("--max-length " + std::to_string(max_length) + " must be " +
                                std::to_string(train_length) + " times a power of two");
  }
  return lengths;
}

/// The number of held-out target bytes every length evaluates: at most `budget` and what the
/// held-out text holds, rounded down to a multiple of the longest length (so every length covers
/// exactly the same bytes). Throws when the held-out text is shorter than one longest window.
inline Index evaluated_tokens(Index held_out_bytes, Index budget, Index max_length) {
  const Index tokens = (std::min(budget, held_out_bytes - 1) / max_length) * max_length;
  if (tokens <= 0) {
    throw std::invalid_argument("the held-out text (" + std::to_string(held_out_bytes) +
                                " bytes) is shorter than one window of " +
                                std::to_string(max_length) + " tokens (or --eval-bytes is)");
  }
  return tokens;
}

/// Evaluates `model` on text[0 … tokens] at each length: windows [w·L, (w + 1)·L) of inputs with
/// the next byte as target, each window from position 0, `tokens_per_batch` tokens a forward
/// (at least one window). Losses are summed in double, in window order.
template <class ModelT>
std::vector<LengthResult> evaluate_lengths(ModelT& model, const std::vector<std::uint8_t>& text,
                                           Index tokens, const std::vector<Index>& lengths,
                                           Index tail, Index tokens_per_batch) {
  std::vector<LengthResult> results;
  std::vector<int> inputs, targets;
  for (const Index length : lengths) {
    const auto start = std::chrono::steady_clock::now();
    const Index windows = tokens / length;
    const Index batch = std::max<Index>(1, tokens_per_batch / length);
    double sum = 0.0, tail_sum = 0.0;
    for (Index first = 0; first < windows; first += batch) {
      const Index count = std::min(batch, windows - first);
      inputs.resize(static_cast<std::size_t>(count * length));
      targets.resize(static_cast<std::size_t>(count * length));
      for (Index i = 0; i < count * length; ++i) {
        const auto at = static_cast<std::size_t>(first * length + i);
        inputs[static_cast<std::size_t>(i)] = text[at];
        targets[static_cast<std::size_t>(i)] = text[at + 1];
      }
      model.forward(inputs.data(), targets.data(), count, length);
      const auto losses = model.token_losses();
      for (Index w = 0; w < count; ++w) {
        for (Index t = 0; t < length; ++t) {
          const double loss = static_cast<double>(losses[static_cast<std::size_t>(w * length + t)]);
          sum += loss;
          if (t >= length - tail) tail_sum += loss;
        }
      }
    }
    const double nats_to_bits = 1.0 / std::numbers::ln2;
    LengthResult r;
    r.length = length;
    r.windows = windows;
    r.tokens = windows * length;
    r.bits_per_byte = sum / static_cast<double>(r.tokens) * nats_to_bits;
    r.tail_bits_per_byte =
        tail_sum / static_cast<double>(windows * std::min(tail, length)) * nats_to_bits;
    r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    results.push_back(r);
  }
  return results;
}

}  // namespace lab
