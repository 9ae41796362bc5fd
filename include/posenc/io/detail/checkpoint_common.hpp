// SPDX-License-Identifier: MIT
// What every checkpoint loader and saver shares: finding a tensor by name (a missing one is
// reported with the tensors whose names end alike, i.e. the prefixes the file does use), checking
// its dtype and shape, reading it as a matrix, vector or scalar, and re-throwing an encoder's own
// argument errors with the file and tensors they came from.
// IWYU pragma: private, include "posenc/io/checkpoint.hpp"
#pragma once

#include <cstddef>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "posenc/detail/check.hpp"
#include "posenc/io/safetensors.hpp"
#include "posenc/tensor.hpp"

namespace posenc::io::detail::checkpoint {

/// `prefix` + `local`: a module's prefix ("encoder.block.0.layer.0.SelfAttention.") joined to a
/// parameter's own name ("relative_attention_bias.weight").
inline std::string join(std::string_view prefix, std::string_view local) {
  std::string name(prefix);
  name += local;
  return name;
}

/// The parameter's own name at the end of `name`: the part after the last '.' or '/', extended
/// backwards while it starts with a generic component ("weight", "bias" or a layer index), so
/// that "model.decoder.embed_positions.weight" gives "embed_positions.weight" and
/// "2.attention.kerple_c.mlp2.0.bias" gives "mlp2.0.bias".
inline std::string_view last_component(std::string_view name) {
  const auto generic = [](std::string_view component) {
    if (component == "weight" || component == "bias") return true;
    for (const char c : component) {
      if (c < '0' || c > '9') return false;
    }
    return true;  // a layer index (or an empty component)
  };
  std::size_t begin = name.size();
  std::size_t end = name.size();
  while (end > 0) {
    const std::size_t cut = name.find_last_of("./", end - 1);
    begin = cut == std::string_view::npos ? 0 : cut + 1;
    if (cut == std::string_view::npos || !generic(name.substr(begin, end - begin))) break;
    end = cut;
  }
  return name.substr(begin);
}

/// "\"name\" [d0, d1] F32", how messages show a tensor of the file.
inline std::string describe(std::string_view name, const TensorInfo& info) {
  // Appended piece by piece: GCC 12 at -O3 warns falsely (-Wrestrict) on chains of operator+.
  std::string text = "\"";
  text.append(name).append("\" ").append(io::detail::bracketed(info.shape)).append(" ");
  text.append(dtype_name(info.dtype));
  return text;
}

/// Throws: none of `names` (one name, or the alternatives a loader tried) is in the file. Lists
/// the file's tensors whose names end in the same component (a checkpoint of another layout or
/// prefix usually has them), else its first names.
[[noreturn]] inline void throw_missing(const SafetensorsFile& file,
                                       const std::vector<std::string>& names,
                                       const char* function) {
  std::string wanted;
  for (std::size_t i = 0; i < names.size(); ++i) {
    wanted += (i == 0 ? "\"" : i + 1 == names.size() ? " or \"" : ", \"") + names[i] + "\"";
  }
  const std::string_view tail = last_component(names.front());
  std::vector<std::string> alike;
  for (const std::string& other : file.names()) {
    if (last_component(other) == tail) alike.push_back("\"" + other + "\"");
  }
  constexpr std::size_t shown = 8;
  if (!alike.empty()) {
    if (alike.size() > shown) {
      alike.resize(shown);
      alike.emplace_back("...");
    }
    io::detail::throw_format_error(function, file.source(), "no tensor ", wanted,
                                   "; tensors ending in \"", tail,
                                   "\": ", io::detail::bracketed(alike), " (is the prefix right?)");
  }
  std::vector<std::string> some;
  for (const std::string& other : file.names()) {
    if (some.size() == shown) {
      some.emplace_back("...");
      break;
    }
    some.push_back("\"" + other + "\"");
  }
  io::detail::throw_format_error(function, file.source(), "no tensor ", wanted, " (the file holds ",
                                 file.names().size(), ": ", io::detail::bracketed(some), ")");
}

/// Throws: tensor `name` is not in the file (see above).
[[noreturn]] inline void throw_missing(const SafetensorsFile& file, std::string_view name,
                                       const char* function) {
  throw_missing(file, std::vector<std::string>{std::string(name)}, function);
}

/// Whether the dtype is one a floating-point parameter may be stored in.
inline bool is_floating(Dtype dtype) {
  return dtype == Dtype::F64 || dtype == Dtype::F32 || dtype == Dtype::F16 || dtype == Dtype::BF16;
}

/// The entry of tensor `name`, which must exist and be floating-point (F64, F32, F16, BF16).
inline const TensorInfo& float_tensor(const SafetensorsFile& file, std::string_view name,
                                      const char* function) {
  if (!file.contains(name)) throw_missing(file, name, function);
  const TensorInfo& info = file.info(name);
  if (!is_floating(info.dtype)) {
    io::detail::throw_format_error(function, file.source(), io::detail::tensor_label(name),
                                   "dtype ", dtype_name(info.dtype),
                                   ", expected a floating-point tensor (F64, F32, F16 or BF16)");
  }
  return info;
}

/// Throws "tensor \"name\": shape [...] , expected <expected>" unless `ok`.
inline void require_shape(bool ok, const SafetensorsFile& file, std::string_view name,
                          const TensorInfo& info, const char* function, std::string_view expected) {
  if (!ok) {
    io::detail::throw_format_error(function, file.source(), io::detail::tensor_label(name),
                                   "shape ", io::detail::bracketed(info.shape), ", expected ",
                                   expected);
  }
}

/// Whether `shape` is exactly `dims`.
inline bool shape_is(const std::vector<Index>& shape, const std::vector<Index>& dims) {
  return shape == dims;
}

/// The tensor's elements as a rows × cols matrix (row-major, as stored); the shape was checked.
template <class T>
Matrix<T> read_matrix(const SafetensorsFile& file, std::string_view name, Index rows, Index cols) {
  const std::vector<T> values = file.values<T>(name);
  return Eigen::Map<const Matrix<T>>(values.data(), rows, cols);
}

/// The tensor's elements, flattened row-major, as a vector.
template <class T>
Vector<T> read_vector(const SafetensorsFile& file, std::string_view name) {
  const std::vector<T> values = file.values<T>(name);
  return Eigen::Map<const Vector<T>>(values.data(), static_cast<Index>(values.size()));
}

/// The tensor's elements into a [heads, rows, dim] Heads (row-major order of the file).
template <class T>
Heads<T> read_heads(const SafetensorsFile& file, std::string_view name, Index heads, Index rows,
                    Index dim) {
  Heads<T> out(heads, rows, dim);
  out.flat() = read_vector<T>(file, name);
  return out;
}

/// A scalar parameter (torch.tensor(x): shape [], or [1]).
inline double read_scalar(const SafetensorsFile& file, std::string_view name,
                          const char* function) {
  const TensorInfo& info = float_tensor(file, name, function);
  require_shape(info.shape.empty() || shape_is(info.shape, {1}), file, name, info, function,
                "a scalar ([] or [1])");
  return file.values<double>(name)[0];
}

/// Runs `make` (an encoder's constructor) and re-throws its std::invalid_argument as one naming
/// `function`, the file and `tensors` (what was read), followed by the encoder's own message.
template <class Make>
auto construct(const char* function, const SafetensorsFile& file, const std::string& tensors,
               Make&& make) -> decltype(make()) {
  try {
    return make();
  } catch (const std::invalid_argument& error) {
    io::detail::throw_format_error(function, file.source(), "tensors ", tensors,
                                   " do not make a valid encoder: ", error.what());
  }
}

/// The dtype a save writes: `requested`, or by default the encoder's scalar (F32 for float, F64
/// for double). Only floating dtypes.
template <class T>
Dtype save_dtype(std::optional<Dtype> requested, const char* function) {
  const Dtype dtype = requested.value_or(io::detail::default_dtype<T>());
  posenc::detail::require(is_floating(dtype), function, "dtype ", dtype_name(dtype),
                          " cannot hold positional parameters; use F64, F32, F16 or BF16");
  return dtype;
}

/// Adds `count` row-major values at `data` as tensor `name` of the given shape.
template <class Scalar>
void put(SafetensorsWriter& writer, std::string name, const Scalar* data, Index count,
         std::vector<Index> shape, Dtype dtype) {
  writer.add(std::move(name), std::vector<Scalar>(data, data + count), std::move(shape), dtype);
}

}  // namespace posenc::io::detail::checkpoint
