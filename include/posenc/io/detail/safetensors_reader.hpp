// SPDX-License-Identifier: MIT
// SafetensorsFile: a validated, memory-mapped safetensors file whose tensors load, by name, as
// Eigen matrices or flat vectors of the scalar the caller asks for.
// IWYU pragma: private, include "posenc/io/safetensors.hpp"
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "posenc/io/detail/float_bits.hpp"
#include "posenc/io/detail/mapped_file.hpp"
#include "posenc/io/detail/safetensors_header.hpp"
#include "posenc/tensor.hpp"

namespace posenc::io {

namespace detail {

/// Whether the integer `value` is a value of T (bool: 0 or 1).
template <class T, class Integer>
bool fits(Integer value) {
  if constexpr (std::is_same_v<T, bool>) {
    return value == 0 || value == 1;
  } else {
    return std::in_range<T>(value);
  }
}

/// One element of a floating-point tensor, exactly (F64 as stored, the others widened).
inline double load_float(const unsigned char* element, Dtype dtype) {
  switch (dtype) {
    case Dtype::F64:
      return std::bit_cast<double>(load_le(element, 8));
    case Dtype::F32:
      return std::bit_cast<float>(static_cast<std::uint32_t>(load_le(element, 4)));
    case Dtype::F16:
      return widen(static_cast<std::uint32_t>(load_le(element, 2)), binary16);
    default:
      return bfloat16_to_float(static_cast<std::uint16_t>(load_le(element, 2)));
  }
}

/// Converts the `count` elements of `bytes` (dtype `info.dtype`) to T, writing sink[i]. Floating
/// tensors load as float or double only; integer and BOOL tensors load as any scalar, each
/// value checked against T's range when T is an integer type.
template <class T, class Sink>
void convert(std::span<const unsigned char> bytes, const TensorInfo& info, Sink& sink,
             const char* function, std::string_view source, std::string_view name) {
  static_assert(loadable_scalar<T>, "safetensors tensors load as float, double, bool or integers");
  const Dtype dtype = info.dtype;
  const std::size_t size = dtype_size(dtype);
  const std::size_t count = bytes.size() / size;
  const unsigned char* data = bytes.data();
  const bool floating =
      dtype == Dtype::F64 || dtype == Dtype::F32 || dtype == Dtype::F16 || dtype == Dtype::BF16;
  if (dtype == Dtype::F8_E5M2 || dtype == Dtype::F8_E4M3)
    throw_format_error(function, source, tensor_label(name), "dtype ", dtype_name(dtype),
                       " is validated but not converted (F64, F32, F16, BF16 and the integer "
                       "types are); its bytes are available through raw()");
  if (floating) {
    if constexpr (std::is_floating_point_v<T>) {
      for (std::size_t i = 0; i < count; ++i)
        sink[i] = static_cast<T>(load_float(data + i * size, dtype));
      return;
    } else {
      throw_format_error(function, source, tensor_label(name), "a ", dtype_name(dtype),
                         " tensor loads as float or double, not as an integer type");
    }
  }
  const bool is_signed =
      dtype == Dtype::I8 || dtype == Dtype::I16 || dtype == Dtype::I32 || dtype == Dtype::I64;
  for (std::size_t i = 0; i < count; ++i) {
    const std::uint64_t bits = load_le(data + i * size, size);
    if (dtype == Dtype::BOOL && bits > 1)
      throw_format_error(function, source, tensor_label(name), "BOOL element ", i, " is byte ",
                         bits, ", not 0 or 1");
    if (is_signed) {
      // Sign-extend the `size`-byte two's complement value.
      const unsigned shift = 64 - 8 * static_cast<unsigned>(size);
      const auto value = static_cast<std::int64_t>(bits << shift) >> shift;
      if constexpr (!std::is_floating_point_v<T>) {
        if (!fits<T>(value))
          throw_format_error(function, source, tensor_label(name), dtype_name(dtype), " element ",
                             i, " is ", value, ", outside the range of the requested type");
      }
      sink[i] = static_cast<T>(value);
    } else {
      if constexpr (!std::is_floating_point_v<T>) {
        if (!fits<T>(bits))
          throw_format_error(function, source, tensor_label(name), dtype_name(dtype), " element ",
                             i, " is ", bits, ", outside the range of the requested type");
      }
      sink[i] = static_cast<T>(bits);
    }
  }
}

}  // namespace detail

/// A safetensors file, opened and validated as a whole (parse_safetensors lists the checks) and
/// then read by tensor name. Memory-mapped on POSIX systems (`memory_mapped()`), read into memory
/// otherwise. Move-only; const member functions may be called from several threads. While a
/// mapped file is open it must not be truncated by another process (POSIX raises SIGBUS).
///
///   auto file = posenc::io::SafetensorsFile::open("model.safetensors");
///   posenc::Matrix<float> wpe = file.matrix<float>("wpe.weight");      // [n_positions, d]
///   std::vector<double> slopes = file.values<double>("alibi.slopes");  // any rank, row-major
///
/// Conversions: F64, F32, F16 and BF16 load as float or double (exactly, except F64 → float,
/// rounded to nearest even); integer and BOOL tensors load as float, double, bool or any integer
/// type (I64/U64 beyond 2^53 round when loaded as double; integer targets reject out-of-range
/// values). Loading a floating tensor as an integer type, or an F8 tensor at all, is an error.
class SafetensorsFile {
 public:
  /// Maps the file at `path` and validates it. std::runtime_error when it cannot be opened or
  /// read; std::invalid_argument naming the file and the tensor when it is malformed.
  static SafetensorsFile open(const std::filesystem::path& path) {
    constexpr const char* function = "posenc::io::SafetensorsFile::open";
    return SafetensorsFile(detail::MappedFile::open(path.string(), function), path.string(),
                           function);
  }

  /// Validates a whole file already in memory; `source` names it in messages.
  static SafetensorsFile from_bytes(std::vector<unsigned char> bytes,
                                    std::string source = "<memory>") {
    return SafetensorsFile(detail::MappedFile::from_bytes(std::move(bytes)), std::move(source),
                           "posenc::io::SafetensorsFile::from_bytes");
  }

  /// The path (or the `source` given to from_bytes).
  const std::string& source() const { return source_; }
  /// Whether the tensors are read from a memory mapping rather than a copy of the file.
  bool memory_mapped() const { return file_.mapped(); }
  /// The tensor names in data order (by offset).
  const std::vector<std::string>& names() const { return header_.names; }
  bool contains(std::string_view name) const { return header_.tensors.contains(name); }
  /// The dtype, shape and byte range of tensor `name`.
  const TensorInfo& info(std::string_view name) const {
    return find(name, "posenc::io::SafetensorsFile::info");
  }
  /// The header's `__metadata__` (empty when it has none).
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }

  /// The stored bytes of tensor `name`: row-major, little-endian, `info(name).dtype`.
  std::span<const unsigned char> raw(std::string_view name) const {
    return bytes_of(find(name, "posenc::io::SafetensorsFile::raw"));
  }

  /// The elements of tensor `name` (any rank) in row-major order, converted to T.
  template <class T>
  std::vector<T> values(std::string_view name) const {
    constexpr const char* function = "posenc::io::SafetensorsFile::values";
    const TensorInfo& info = find(name, function);
    std::vector<T> out(static_cast<std::size_t>(info.elements()));
    detail::convert<T>(bytes_of(info), info, out, function, source_, name);
    return out;
  }

  /// Tensor `name` as a rows × cols matrix, converted to T: shape [r, c] gives r × c, a 1-D
  /// tensor [n] an n × 1 column (as posenc::Vector), a scalar [] a 1 × 1 matrix. Higher ranks
  /// are an error (read them with values()).
  template <class T>
  Matrix<T> matrix(std::string_view name) const {
    constexpr const char* function = "posenc::io::SafetensorsFile::matrix";
    const TensorInfo& info = find(name, function);
    if (info.shape.size() > 2)
      detail::throw_format_error(function, source_, detail::tensor_label(name), "shape ",
                                 detail::bracketed(info.shape), " has rank ", info.shape.size(),
                                 "; matrix() reads ranks 0 to 2 (values() reads any rank)");
    const Index rows = info.shape.empty() ? 1 : info.shape[0];
    const Index cols = info.shape.size() == 2 ? info.shape[1] : 1;
    Matrix<T> out(rows, cols);
    T* data = out.data();
    detail::convert<T>(bytes_of(info), info, data, function, source_, name);
    return out;
  }

 private:
  SafetensorsFile(detail::MappedFile file, std::string source, const char* function)
      : file_(std::move(file)),
        source_(std::move(source)),
        header_(detail::parse(file_.bytes(), function, source_)) {}

  const TensorInfo& find(std::string_view name, const char* function) const {
    const auto found = header_.tensors.find(name);
    if (found == header_.tensors.end()) {
      constexpr std::size_t shown = 8;
      std::vector<std::string> some(header_.names.begin(),
                                    header_.names.begin() + static_cast<std::ptrdiff_t>(std::min(
                                                                shown, header_.names.size())));
      if (header_.names.size() > shown) some.emplace_back("...");
      detail::throw_format_error(function, source_, "no tensor \"", name, "\" (the file holds ",
                                 header_.names.size(), ": ", detail::bracketed(some), ")");
    }
    return found->second;
  }

  std::span<const unsigned char> bytes_of(const TensorInfo& info) const {
    return file_.bytes().subspan(static_cast<std::size_t>(header_.data_start + info.begin),
                                 static_cast<std::size_t>(info.end - info.begin));
  }

  detail::MappedFile file_;
  std::string source_;
  SafetensorsHeader header_;
};

}  // namespace posenc::io
