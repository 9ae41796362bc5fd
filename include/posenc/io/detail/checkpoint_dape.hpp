// SPDX-License-Identifier: MIT
// Loading and saving DAPE and DAPE V2 by the names of chuanyang-Zheng/DAPE
// (megatron/model/positional_embeddings.py): the network is the module's `mlp2`, an
// nn.Sequential(Linear(C, W), LeakyReLU(), Linear(W, H)) for DAPE or of two Conv2d(·, ·, (1, k))
// for DAPE V2, beside the base bias's own parameters in the same module.
// IWYU pragma: private, include "posenc/io/checkpoint.hpp"
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "posenc/encoders/dape.hpp"
#include "posenc/encoders/dape_network.hpp"
#include "posenc/encoding.hpp"
#include "posenc/io/detail/checkpoint_biases.hpp"
#include "posenc/io/detail/checkpoint_common.hpp"
#include "posenc/io/safetensors.hpp"
#include "posenc/tensor.hpp"

namespace posenc::io {

/// A DAPE network read from a checkpoint: its weights (DapeWeights layout) and the convolution
/// kernel size k (1 for nn.Linear layers).
struct DapeNetworkWeights {
  DapeWeights weights;
  Index kernel = 1;
};

/// Reads `<prefix>mlp2.0.weight`, `mlp2.0.bias`, `mlp2.2.weight`, `mlp2.2.bias`: either nn.Linear
/// weights [W, C] and [H, W] (DAPE; kernel 1) or nn.Conv2d weights [W, C, 1, k] and [H, W, 1, k]
/// (DAPE V2), which are DapeWeights' w1 [W, C·k] and w2 [H, W·k] as stored (row-major). Biases
/// [W] and [H]. Throws naming the file and tensors for a missing tensor, a wrong dtype, or shapes
/// that are neither or do not agree.
inline DapeNetworkWeights load_dape_network(const SafetensorsFile& file, std::string_view prefix) {
  constexpr const char* fn = "posenc::io::load_dape_network";
  namespace ck = detail::checkpoint;
  const std::string w1_name = ck::join(prefix, "mlp2.0.weight");
  const std::string b1_name = ck::join(prefix, "mlp2.0.bias");
  const std::string w2_name = ck::join(prefix, "mlp2.2.weight");
  const std::string b2_name = ck::join(prefix, "mlp2.2.bias");
  const TensorInfo& w1 = ck::float_tensor(file, w1_name, fn);
  const bool linear = w1.shape.size() == 2;
  const bool conv = w1.shape.size() == 4 && w1.shape[2] == 1;
  ck::require_shape(
      (linear || conv) && w1.shape[0] >= 1 && w1.shape[1] >= 1 && (linear || w1.shape[3] >= 1),
      file, w1_name, w1, fn,
      "[mlp_width, channels] (nn.Linear) or [mlp_width, channels, 1, k] (nn.Conv2d)");
  const Index width = w1.shape[0];
  const Index channels = w1.shape[1];
  const Index kernel = linear ? 1 : w1.shape[3];
  const TensorInfo& b1 = ck::float_tensor(file, b1_name, fn);
  ck::require_shape(ck::shape_is(b1.shape, {width}), file, b1_name, b1, fn,
                    "[" + std::to_string(width) + "] (mlp_width of \"" + w1_name + "\")");
  const TensorInfo& w2 = ck::float_tensor(file, w2_name, fn);
  const bool w2_ok = linear ? w2.shape.size() == 2 && w2.shape[0] >= 1 && w2.shape[1] == width
                            : w2.shape.size() == 4 && w2.shape[0] >= 1 && w2.shape[1] == width &&
                                  w2.shape[2] == 1 && w2.shape[3] == kernel;
  ck::require_shape(
      w2_ok, file, w2_name, w2, fn,
      linear ? "[heads, " + std::to_string(width) + "] (nn.Linear, as \"" + w1_name + "\" is)"
             : "[heads, " + std::to_string(width) + ", 1, " + std::to_string(kernel) +
                   "] (nn.Conv2d, as \"" + w1_name + "\" is)");
  const Index heads = w2.shape[0];
  const TensorInfo& b2 = ck::float_tensor(file, b2_name, fn);
  ck::require_shape(ck::shape_is(b2.shape, {heads}), file, b2_name, b2, fn,
                    "[" + std::to_string(heads) + "] (heads of \"" + w2_name + "\")");
  DapeNetworkWeights out;
  out.kernel = kernel;
  out.weights.w1 = ck::read_matrix<double>(file, w1_name, width, channels * kernel);
  out.weights.b1 = ck::read_vector<double>(file, b1_name);
  out.weights.w2 = ck::read_matrix<double>(file, w2_name, heads, width * kernel);
  out.weights.b2 = ck::read_vector<double>(file, b2_name);
  return out;
}

namespace detail::checkpoint {

/// "under \"prefix\" (mlp2.0.weight [..], mlp2.2.weight [..])", what a DAPE loader read.
inline std::string describe_network(const SafetensorsFile& file, std::string_view prefix) {
  const std::string w1 = join(prefix, "mlp2.0.weight");
  const std::string w2 = join(prefix, "mlp2.2.weight");
  return describe(w1, file.info(w1)) + " and " + describe(w2, file.info(w2));
}

/// Throws unless the network read at `prefix` is of the kind `function` loads.
inline void require_network_kind(const SafetensorsFile& file, std::string_view prefix,
                                 bool want_conv, const char* function) {
  const std::string w1 = join(prefix, "mlp2.0.weight");
  const bool conv = file.info(w1).shape.size() == 4;
  if (conv != want_conv) {
    io::detail::throw_format_error(
        function, file.source(), io::detail::tensor_label(w1), "shape ",
        io::detail::bracketed(file.info(w1).shape),
        want_conv ? " is an nn.Linear weight: a DAPE (v1) network, load it with load_dape"
                  : " is an nn.Conv2d weight: a DAPE V2 network, load it with load_dape_v2");
  }
}

}  // namespace detail::checkpoint

/// DAPE over `bias` with the network at `prefix` (nn.Linear layers: `mlp2.0.weight` [W, 2H],
/// …). The base bias is passed in, typically loaded from the same prefix: load_kerple (DAPE's
/// ParallelKerpleLog_C, "attention.kerple_c."), load_fire (FIRE_C, "attention.fire_c.", with
/// FireOptions::dape()), load_alibi (AliBi_C, "attention.alibi_c_embed.").
template <class T, class Bias>
Dape<T, Bias> load_dape(const SafetensorsFile& file, std::string_view prefix, Bias bias) {
  constexpr const char* fn = "posenc::io::load_dape";
  namespace ck = detail::checkpoint;
  DapeNetworkWeights network = load_dape_network(file, prefix);
  ck::require_network_kind(file, prefix, false, fn);
  return ck::construct(fn, file, ck::describe_network(file, prefix),
                       [&] { return Dape<T, Bias>(std::move(bias), std::move(network.weights)); });
}

/// The bias-free DAPE A + f(A) (DAPE's Nope_C / DAPEV1: `mlp2.0.weight` [W, H]).
template <class T>
Dape<T> load_dape(const SafetensorsFile& file, std::string_view prefix) {
  constexpr const char* fn = "posenc::io::load_dape";
  namespace ck = detail::checkpoint;
  DapeNetworkWeights network = load_dape_network(file, prefix);
  ck::require_network_kind(file, prefix, false, fn);
  return ck::construct(fn, file, ck::describe_network(file, prefix),
                       [&] { return Dape<T>(std::move(network.weights)); });
}

/// DAPE V2 over `bias` with the Conv2d network at `prefix` (`mlp2.0.weight` [W, 2H, 1, k]; k from
/// the shape): DAPE's Kerple_DAPEV2 ("attention.kerple_dapev2."), FIRE_DAPEV2, Alibi_DAPEV2.
template <class T, class Bias>
DapeV2<T, Bias> load_dape_v2(const SafetensorsFile& file, std::string_view prefix, Bias bias) {
  constexpr const char* fn = "posenc::io::load_dape_v2";
  namespace ck = detail::checkpoint;
  DapeNetworkWeights network = load_dape_network(file, prefix);
  ck::require_network_kind(file, prefix, true, fn);
  return ck::construct(fn, file, ck::describe_network(file, prefix), [&] {
    return DapeV2<T, Bias>(std::move(bias), std::move(network.weights), network.kernel);
  });
}

/// The bias-free DAPE V2 (DAPE's Nope_C_FFN / DAPEV2 networks, `mlp2.0.weight` [W, H, 1, k]).
template <class T>
DapeV2<T> load_dape_v2(const SafetensorsFile& file, std::string_view prefix) {
  constexpr const char* fn = "posenc::io::load_dape_v2";
  namespace ck = detail::checkpoint;
  DapeNetworkWeights network = load_dape_network(file, prefix);
  ck::require_network_kind(file, prefix, true, fn);
  return ck::construct(fn, file, ck::describe_network(file, prefix),
                       [&] { return DapeV2<T>(std::move(network.weights), network.kernel); });
}

namespace detail::checkpoint {

/// Whether posenc::io has a save for a base bias of type Bias.
template <class Bias>
concept SavableBias = requires(SafetensorsWriter& writer, const Bias& bias) {
  io::save(writer, bias, std::string_view{}, std::optional<Dtype>{});
};

/// Writes a DAPE network's weights under `prefix` as mlp2.0.* / mlp2.2.*, nn.Linear shapes for
/// kernel 1 unless `conv`, nn.Conv2d shapes [out, in, 1, k] otherwise.
inline void put_network(SafetensorsWriter& writer, const DapeWeights& w, Index kernel, bool conv,
                        std::string_view prefix, Dtype type) {
  const Index width = w.w1.rows();
  const Index heads = w.w2.rows();
  const Index channels = w.w1.cols() / kernel;
  std::vector<Index> w1_shape{width, channels};
  std::vector<Index> w2_shape{heads, width};
  if (conv) {
    w1_shape = {width, channels, 1, kernel};
    w2_shape = {heads, width, 1, kernel};
  }
  put(writer, join(prefix, "mlp2.0.weight"), w.w1.data(), w.w1.size(), w1_shape, type);
  put(writer, join(prefix, "mlp2.0.bias"), w.b1.data(), w.b1.size(), {width}, type);
  put(writer, join(prefix, "mlp2.2.weight"), w.w2.data(), w.w2.size(), w2_shape, type);
  put(writer, join(prefix, "mlp2.2.bias"), w.b2.data(), w.b2.size(), {heads}, type);
}

}  // namespace detail::checkpoint

/// Writes the DAPE network under `prefix` (mlp2.0.weight [W, C], mlp2.0.bias, mlp2.2.weight
/// [H, W], mlp2.2.bias) and, when posenc::io can save it (Kerple, Fire, Alibi, T5, …), the base
/// bias under the same prefix, as DAPE's modules hold both.
template <class T, class Bias>
void save(SafetensorsWriter& writer, const Dape<T, Bias>& dape, std::string_view prefix,
          std::optional<Dtype> dtype = std::nullopt) {
  namespace ck = detail::checkpoint;
  const Dtype type = ck::save_dtype<T>(dtype, "posenc::io::save(Dape)");
  ck::put_network(writer, dape.weights(), 1, false, prefix, type);
  if constexpr (!std::is_same_v<Bias, NoPositionalEncoding> && ck::SavableBias<Bias>) {
    io::save(writer, dape.base_bias(), prefix, type);
  }
}

/// Writes the DAPE V2 network under `prefix` with nn.Conv2d shapes (mlp2.0.weight
/// [W, C, 1, k], mlp2.2.weight [H, W, 1, k]) and the base bias as save(Dape) does.
template <class T, class Bias>
void save(SafetensorsWriter& writer, const DapeV2<T, Bias>& dape, std::string_view prefix,
          std::optional<Dtype> dtype = std::nullopt) {
  namespace ck = detail::checkpoint;
  const Dtype type = ck::save_dtype<T>(dtype, "posenc::io::save(DapeV2)");
  ck::put_network(writer, dape.weights(), dape.kernel_size(), true, prefix, type);
  if constexpr (!std::is_same_v<Bias, NoPositionalEncoding> && ck::SavableBias<Bias>) {
    io::save(writer, dape.base_bias(), prefix, type);
  }
}

}  // namespace posenc::io
