// SPDX-License-Identifier: MIT
// SafetensorsWriter: collects named tensors (Eigen matrices or flat values with a shape) and
// metadata, and writes them as the reference implementation does, so that the Python
// `safetensors` package and every other reader load the file.
// IWYU pragma: private, include "posenc/io/safetensors.hpp"
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <string>
#include <system_error>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "posenc/detail/check.hpp"
#include "posenc/io/detail/float_bits.hpp"
#include "posenc/io/detail/mapped_file.hpp"
#include "posenc/io/detail/safetensors_header.hpp"
#include "posenc/tensor.hpp"

namespace posenc::io {

namespace detail {

/// The dtype a scalar is written as by default: float F32, double F64, bool BOOL, integers the
/// dtype of their width and signedness.
template <class T>
constexpr Dtype default_dtype() {
  if constexpr (std::is_same_v<T, float>)
    return Dtype::F32;
  else if constexpr (std::is_same_v<T, double>)
    return Dtype::F64;
  else if constexpr (std::is_same_v<T, bool>)
    return Dtype::BOOL;
  else if constexpr (sizeof(T) == 1)
    return std::is_signed_v<T> ? Dtype::I8 : Dtype::U8;
  else if constexpr (sizeof(T) == 2)
    return std::is_signed_v<T> ? Dtype::I16 : Dtype::U16;
  else if constexpr (sizeof(T) == 4)
    return std::is_signed_v<T> ? Dtype::I32 : Dtype::U32;
  else
    return std::is_signed_v<T> ? Dtype::I64 : Dtype::U64;
}

/// Whether `value` lies in the range of integer dtype `dtype`.
template <class Integer>
bool in_dtype_range(Integer value, Dtype dtype) {
  switch (dtype) {
    case Dtype::BOOL:
      return value == 0 || value == 1;
    case Dtype::U8:
      return std::in_range<std::uint8_t>(value);
    case Dtype::I8:
      return std::in_range<std::int8_t>(value);
    case Dtype::I16:
      return std::in_range<std::int16_t>(value);
    case Dtype::U16:
      return std::in_range<std::uint16_t>(value);
    case Dtype::I32:
      return std::in_range<std::int32_t>(value);
    case Dtype::U32:
      return std::in_range<std::uint32_t>(value);
    case Dtype::I64:
      return std::in_range<std::int64_t>(value);
    default:
      return std::in_range<std::uint64_t>(value);
  }
}

}  // namespace detail

/// Builds a safetensors file. Tensors are encoded when added (so the sources may go away);
/// `bytes()` or `write()` lay them out as the reference implementation (huggingface/safetensors,
/// `serialize`) does: data sorted by dtype, widest first (the order of Dtype, descending), then by
/// name, which with the header padded by spaces to a multiple of 8 bytes aligns every tensor to
/// its element size; the header compact JSON with `__metadata__` first (keys sorted), then the
/// tensors in data order. Floating sources are written as F64, F32, F16 or BF16, rounded to
/// nearest even (in one step from double); integer and bool sources as integer dtypes or BOOL,
/// each value checked to fit.
///
///   posenc::io::SafetensorsWriter writer;
///   writer.add("wpe.weight", table)                      // [rows, cols], F32 for float
///         .add("slopes", slopes, posenc::io::Dtype::BF16)  // compile-time vector: [n]
///         .add_metadata("format", "pt");
///   writer.write("positions.safetensors");
class SafetensorsWriter {
 public:
  /// Adds an Eigen matrix as shape [rows, cols], or a compile-time vector (posenc::Vector, a
  /// row vector) as shape [size]. `dtype` defaults to the scalar's (F32 for float, F64 for
  /// double, …).
  template <class Derived>
  SafetensorsWriter& add(std::string name, const Eigen::DenseBase<Derived>& tensor,
                         std::optional<Dtype> dtype = std::nullopt) {
    using Scalar = typename Derived::Scalar;
    const Matrix<Scalar> row_major = tensor.derived();
    std::vector<Index> shape;
    if constexpr (Derived::IsVectorAtCompileTime) {
      shape = {row_major.size()};
    } else {
      shape = {row_major.rows(), row_major.cols()};
    }
    return add_elements<Scalar>(std::move(name), row_major.data(), row_major.size(),
                                std::move(shape), dtype);
  }

  /// Adds row-major `values` of any rank with the given `shape` (its product must be
  /// values.size(); [] is a scalar).
  template <class T>
  SafetensorsWriter& add(std::string name, const std::vector<T>& values, std::vector<Index> shape,
                         std::optional<Dtype> dtype = std::nullopt) {
    return add_elements<T>(std::move(name), values, static_cast<Index>(values.size()),
                           std::move(shape), dtype);
  }

  /// Sets `__metadata__[key] = value` (a later call with the same key replaces the value).
  SafetensorsWriter& add_metadata(std::string key, std::string value) {
    require_utf8(key, "metadata key");
    require_utf8(value, "metadata value");
    metadata_[std::move(key)] = std::move(value);
    return *this;
  }

  /// The whole file.
  std::vector<unsigned char> bytes() const {
    const auto order = data_order();
    const std::string header = header_text(order);
    // Sized once and filled by memcpy (GCC 12 at -O3 warns falsely, -Warray-bounds, on
    // vector::insert into the 8-byte prefix).
    std::size_t total = 8 + header.size();
    for (const Entry* entry : order) total += entry->data.size();
    std::vector<unsigned char> file(total);
    detail::store_le(header.size(), 8, file.data());
    std::memcpy(file.data() + 8, header.data(), header.size());
    std::size_t at = 8 + header.size();
    for (const Entry* entry : order) {
      if (!entry->data.empty())
        std::memcpy(file.data() + at, entry->data.data(), entry->data.size());
      at += entry->data.size();
    }
    return file;
  }

  /// Writes the file to `path` (through `<path>.tmp`, renamed over `path` once complete).
  /// std::runtime_error naming the path when it cannot be written.
  void write(const std::filesystem::path& path) const {
    constexpr const char* function = "posenc::io::SafetensorsWriter::write";
    const auto order = data_order();
    const std::string header = header_text(order);
    std::filesystem::path temporary = path;
    temporary += ".tmp";
    {
      std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
      if (!out) detail::throw_file_error(function, temporary.string(), "cannot create");
      unsigned char length[8];
      detail::store_le(header.size(), 8, length);
      out.write(reinterpret_cast<const char*>(length), 8);
      out.write(header.data(), static_cast<std::streamsize>(header.size()));
      for (const Entry* entry : order)
        out.write(reinterpret_cast<const char*>(entry->data.data()),
                  static_cast<std::streamsize>(entry->data.size()));
      out.close();
      if (!out) {
        std::error_code ignored;
        std::filesystem::remove(temporary, ignored);
        detail::throw_file_error(function, temporary.string(), "cannot write");
      }
    }
    std::error_code error;
    std::filesystem::rename(temporary, path, error);
    if (error) {
      std::error_code ignored;
      std::filesystem::remove(temporary, ignored);
      detail::throw_file_error(function, path.string(),
                               "cannot rename the written file onto it: " + error.message());
    }
  }

 private:
  struct Entry {
    std::string name;
    Dtype dtype;
    std::vector<Index> shape;
    std::vector<unsigned char> data;
  };

  static constexpr const char* add_function = "posenc::io::SafetensorsWriter::add";

  static void require_utf8(const std::string& text, const char* what) {
    try {
      (void)nlohmann::json(text).dump();
    } catch (const nlohmann::json::exception&) {
      posenc::detail::throw_invalid_argument(add_function, what, " \"", text,
                                             "\" is not valid UTF-8");
    }
  }

  template <class Scalar, class Values>
  SafetensorsWriter& add_elements(std::string name, const Values& values, Index count,
                                  std::vector<Index> shape, std::optional<Dtype> requested) {
    static_assert(detail::loadable_scalar<Scalar>,
                  "safetensors tensors are written from float, double, bool or integers");
    const Dtype dtype = requested.value_or(detail::default_dtype<Scalar>());
    const std::string label = detail::tensor_label(name);
    if (name.empty() || name == "__metadata__")
      posenc::detail::throw_invalid_argument(add_function, "tensor name \"", name,
                                             "\" is reserved or empty");
    require_utf8(name, "tensor name");
    for (const Entry& entry : entries_)
      if (entry.name == name)
        posenc::detail::throw_invalid_argument(add_function, label, "added twice");
    // The product of the shape, compared with `count` without overflowing.
    bool zero = false;
    bool exceeds = false;
    Index elements = 1;
    for (Index extent : shape) {
      posenc::detail::require(extent >= 0, add_function, label, "shape ", detail::bracketed(shape),
                              " has a negative extent");
      if (extent == 0)
        zero = true;
      else if (elements > count / extent)
        exceeds = true;
      else
        elements *= extent;
    }
    if (zero) elements = 0;
    posenc::detail::require((zero || !exceeds) && elements == count, add_function, label, "shape ",
                            detail::bracketed(shape), " does not hold the ", count,
                            " values given");
    const bool floating_dtype =
        dtype == Dtype::F64 || dtype == Dtype::F32 || dtype == Dtype::F16 || dtype == Dtype::BF16;
    if (dtype == Dtype::F8_E5M2 || dtype == Dtype::F8_E4M3)
      posenc::detail::throw_invalid_argument(add_function, label, "writing ", dtype_name(dtype),
                                             " is not supported");
    posenc::detail::require(floating_dtype == std::is_floating_point_v<Scalar>, add_function, label,
                            dtype_name(dtype), " needs ",
                            floating_dtype ? "a floating-point" : "an integer or bool",
                            " source; cast the values first");

    const std::size_t size = dtype_size(dtype);
    std::vector<unsigned char> data(static_cast<std::size_t>(count) * size);
    for (Index i = 0; i < count; ++i) {
      unsigned char* out = data.data() + static_cast<std::size_t>(i) * size;
      const Scalar value = values[static_cast<std::size_t>(i)];
      if constexpr (std::is_floating_point_v<Scalar>) {
        std::uint64_t bits = 0;
        if (dtype == Dtype::F64)
          bits = std::bit_cast<std::uint64_t>(static_cast<double>(value));
        else if (dtype == Dtype::F32)
          bits = std::bit_cast<std::uint32_t>(static_cast<float>(value));
        else
          bits = detail::narrow(value, dtype == Dtype::F16 ? detail::binary16 : detail::bfloat16);
        detail::store_le(bits, size, out);
      } else {
        using Wide = std::conditional_t<std::is_signed_v<Scalar>, std::int64_t, std::uint64_t>;
        const auto wide = static_cast<Wide>(value);
        if (!detail::in_dtype_range(wide, dtype))
          posenc::detail::throw_invalid_argument(add_function, label, "element ", i, " = ", wide,
                                                 " does not fit ", dtype_name(dtype));
        detail::store_le(static_cast<std::uint64_t>(wide), size, out);
      }
    }
    entries_.push_back(Entry{std::move(name), dtype, std::move(shape), std::move(data)});
    return *this;
  }

  /// The entries in data order: by dtype descending (widest first), then by name.
  std::vector<const Entry*> data_order() const {
    std::vector<const Entry*> order;
    for (const Entry& entry : entries_) order.push_back(&entry);
    std::sort(order.begin(), order.end(), [](const Entry* a, const Entry* b) {
      return std::tie(b->dtype, a->name) < std::tie(a->dtype, b->name);
    });
    return order;
  }

  /// The JSON header, padded with spaces to a multiple of 8 bytes.
  std::string header_text(const std::vector<const Entry*>& order) const {
    nlohmann::ordered_json header = nlohmann::ordered_json::object();
    if (!metadata_.empty()) header["__metadata__"] = metadata_;
    std::uint64_t offset = 0;
    for (const Entry* entry : order) {
      nlohmann::ordered_json shape = nlohmann::ordered_json::array();
      for (Index extent : entry->shape) shape.push_back(static_cast<std::uint64_t>(extent));
      const std::uint64_t end = offset + entry->data.size();
      header[entry->name] = {{"dtype", std::string(dtype_name(entry->dtype))},
                             {"shape", std::move(shape)},
                             {"data_offsets", {offset, end}}};
      offset = end;
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    return text;
  }

  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace posenc::io
