// SPDX-License-Identifier: MIT
// Loading and saving stochastic positional encoding by the names of aliutkus/spe
// (src/pytorch/spe/spe.py): SineSPE's `freqs`, `offsets`, `gains` [H, D, K], ConvSPE's
// `conv_q.weight` / `conv_k.weight` [H·D, 1, ks], SPEFilter's `gate` [H, D]. The draws are not
// parameters (the reference samples them at every forward), so a loaded encoder takes them from
// a seed or explicitly.
// IWYU pragma: private, include "posenc/io/checkpoint.hpp"
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "posenc/encoders/conv_spe.hpp"
#include "posenc/encoders/sine_spe.hpp"
#include "posenc/encoders/spe_gate.hpp"
#include "posenc/io/detail/checkpoint_common.hpp"
#include "posenc/io/safetensors.hpp"
#include "posenc/tensor.hpp"

namespace posenc::io {

/// Reads SineSPE's `<prefix>freqs`, `<prefix>offsets`, `<prefix>gains`, [H, D, K] each (raw, as
/// the module stores them). Prefix: the SineSPE module's, e.g. "transformer_decoder.spe.0." in
/// the reference's groove decoder ("transformer_decoder.spe." when shared by the layers).
template <class Real>
SineSpeParameters<Real> load_sine_spe_parameters(const SafetensorsFile& file,
                                                 std::string_view prefix) {
  constexpr const char* fn = "posenc::io::load_sine_spe_parameters";
  namespace ck = detail::checkpoint;
  const std::string f_name = ck::join(prefix, "freqs");
  const TensorInfo& f = ck::float_tensor(file, f_name, fn);
  ck::require_shape(f.shape.size() == 3 && f.shape[0] >= 1 && f.shape[1] >= 1 && f.shape[2] >= 1,
                    file, f_name, f, fn, "[num_heads, in_features, num_sines]");
  const auto read = [&](const char* local) {
    const std::string name = ck::join(prefix, local);
    const TensorInfo& info = ck::float_tensor(file, name, fn);
    ck::require_shape(info.shape == f.shape, file, name, info, fn,
                      io::detail::bracketed(f.shape) + " (the shape of \"" + f_name + "\")");
    return ck::read_heads<Real>(file, name, f.shape[0], f.shape[1], f.shape[2]);
  };
  return {read("freqs"), read("offsets"), read("gains")};
}

/// Reads SPEFilter's `<filter_prefix>gate` [heads, dim] (raw; σ = sigmoid(gate)).
template <class Real>
Matrix<Real> load_spe_gate(const SafetensorsFile& file, std::string_view filter_prefix, Index heads,
                           Index dim) {
  constexpr const char* fn = "posenc::io::load_spe_gate";
  namespace ck = detail::checkpoint;
  const std::string name = ck::join(filter_prefix, "gate");
  const TensorInfo& info = ck::float_tensor(file, name, fn);
  std::string expected = "[";  // appended: GCC 12 -O3 warns falsely on operator+ chains
  expected.append(std::to_string(heads)).append(", ").append(std::to_string(dim));
  expected.append("] (code_shape = (num_heads, in_features))");
  ck::require_shape(ck::shape_is(info.shape, {heads, dim}), file, name, info, fn, expected);
  return ck::read_matrix<Real>(file, name, heads, dim);
}

/// Reads ConvSPE's `<prefix>conv_q.weight` and `<prefix>conv_k.weight`, depthwise Conv1d weights
/// [H·D, 1, ks], as ConvSpeParameters::from_torch (which swaps the roles as the reference's
/// forward does). `heads` splits the H·D channels (the file does not say how).
template <class Real>
ConvSpeParameters<Real> load_conv_spe_parameters(const SafetensorsFile& file,
                                                 std::string_view prefix, Index heads) {
  constexpr const char* fn = "posenc::io::load_conv_spe_parameters";
  namespace ck = detail::checkpoint;
  posenc::detail::require(heads >= 1, fn, "heads must be >= 1, got ", heads);
  const std::string q_name = ck::join(prefix, "conv_q.weight");
  const std::string k_name = ck::join(prefix, "conv_k.weight");
  const TensorInfo& q = ck::float_tensor(file, q_name, fn);
  ck::require_shape(q.shape.size() == 3 && q.shape[0] >= 1 && q.shape[0] % heads == 0 &&
                        q.shape[1] == 1 && q.shape[2] >= 1,
                    file, q_name, q, fn,
                    "[num_heads·in_features, 1, kernel_size] (a depthwise Conv1d weight) with "
                    "channels divisible by heads = " +
                        std::to_string(heads));
  const TensorInfo& k = ck::float_tensor(file, k_name, fn);
  ck::require_shape(k.shape == q.shape, file, k_name, k, fn,
                    io::detail::bracketed(q.shape) + " (the shape of \"" + q_name + "\")");
  const Index dim = q.shape[0] / heads;
  return ConvSpeParameters<Real>::from_torch(
      ck::read_heads<Real>(file, q_name, heads, dim, q.shape[2]),
      ck::read_heads<Real>(file, k_name, heads, dim, k.shape[2]));
}

/// SineSpe from a checkpoint with a fresh draw of R realizations from `seed` (SineSpe's seeded
/// constructor), gated when `filter_prefix` is given (then `<filter_prefix>gate` must exist).
template <class Real>
SineSpe<Real> load_sine_spe(const SafetensorsFile& file, std::string_view prefix,
                            Index realizations, std::uint64_t seed,
                            std::optional<std::string_view> filter_prefix = std::nullopt) {
  constexpr const char* fn = "posenc::io::load_sine_spe";
  namespace ck = detail::checkpoint;
  SineSpeParameters<Real> parameters = load_sine_spe_parameters<Real>(file, prefix);
  std::optional<Matrix<Real>> gate;
  if (filter_prefix) {
    gate = load_spe_gate<Real>(file, *filter_prefix, parameters.frequencies.heads(),
                               parameters.frequencies.rows());
  }
  return ck::construct(
      fn, file, "under \"" + std::string(prefix) + "\" (freqs, offsets, gains)",
      [&] { return SineSpe<Real>(std::move(parameters), realizations, seed, gate); });
}

/// ConvSpe from a checkpoint with noise generated from `seed` (ConvSpe's seeded constructor),
/// gated when `filter_prefix` is given.
template <class Real>
ConvSpe<Real> load_conv_spe(const SafetensorsFile& file, std::string_view prefix, Index heads,
                            Index realizations, std::uint64_t seed,
                            std::optional<std::string_view> filter_prefix = std::nullopt) {
  constexpr const char* fn = "posenc::io::load_conv_spe";
  namespace ck = detail::checkpoint;
  ConvSpeParameters<Real> parameters = load_conv_spe_parameters<Real>(file, prefix, heads);
  std::optional<Matrix<Real>> gate;
  if (filter_prefix) {
    gate = load_spe_gate<Real>(file, *filter_prefix, heads, parameters.query_filter.rows());
  }
  return ck::construct(fn, file, "under \"" + std::string(prefix) + "\" (conv_q, conv_k)", [&] {
    return ConvSpe<Real>(std::move(parameters), realizations, seed, gate);
  });
}

/// Writes SineSPE's freqs, offsets, gains [H, D, K] under `prefix` and, when gated, SPEFilter's
/// gate [H, D] under `filter_prefix`. The draw is not written (the reference never stores one).
template <class Real>
void save(SafetensorsWriter& writer, const SineSpe<Real>& spe, std::string_view prefix,
          std::string_view filter_prefix, std::optional<Dtype> dtype = std::nullopt) {
  namespace ck = detail::checkpoint;
  const Dtype type = ck::save_dtype<Real>(dtype, "posenc::io::save(SineSpe)");
  const SineSpeParameters<Real>& p = spe.parameters();
  const std::vector<Index> shape{p.frequencies.heads(), p.frequencies.rows(), p.frequencies.dim()};
  const Index count = p.frequencies.flat().size();
  ck::put(writer, ck::join(prefix, "freqs"), p.frequencies.data(), count, shape, type);
  ck::put(writer, ck::join(prefix, "offsets"), p.offsets.data(), count, shape, type);
  ck::put(writer, ck::join(prefix, "gains"), p.gains.data(), count, shape, type);
  if (const SpeGate<Real>* gate = spe.gate()) {
    writer.add(ck::join(filter_prefix, "gate"), gate->gate(), type);
  }
}

/// As above with the gate (if any) under `prefix` too.
template <class Real>
void save(SafetensorsWriter& writer, const SineSpe<Real>& spe, std::string_view prefix,
          std::optional<Dtype> dtype = std::nullopt) {
  save(writer, spe, prefix, prefix, dtype);
}

/// Writes ConvSPE's conv_q.weight and conv_k.weight [H·D, 1, ks] under `prefix` (conv_q is
/// the key filter and conv_k the query filter, as the reference's forward uses them) and, when
/// gated, the gate [H, D] under `filter_prefix`.
template <class Real>
void save(SafetensorsWriter& writer, const ConvSpe<Real>& spe, std::string_view prefix,
          std::string_view filter_prefix, std::optional<Dtype> dtype = std::nullopt) {
  namespace ck = detail::checkpoint;
  const Dtype type = ck::save_dtype<Real>(dtype, "posenc::io::save(ConvSpe)");
  const ConvSpeParameters<Real>& p = spe.parameters();
  const std::vector<Index> shape{spe.heads() * spe.dim(), 1, spe.kernel_size()};
  const Index count = p.key_filter.flat().size();
  ck::put(writer, ck::join(prefix, "conv_q.weight"), p.key_filter.data(), count, shape, type);
  ck::put(writer, ck::join(prefix, "conv_k.weight"), p.query_filter.data(), count, shape, type);
  if (const SpeGate<Real>* gate = spe.gate()) {
    writer.add(ck::join(filter_prefix, "gate"), gate->gate(), type);
  }
}

/// As above with the gate (if any) under `prefix` too.
template <class Real>
void save(SafetensorsWriter& writer, const ConvSpe<Real>& spe, std::string_view prefix,
          std::optional<Dtype> dtype = std::nullopt) {
  save(writer, spe, prefix, prefix, dtype);
}

}  // namespace posenc::io
