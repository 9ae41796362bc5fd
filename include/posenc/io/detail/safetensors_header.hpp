// SPDX-License-Identifier: MIT
// The safetensors header: dtypes, tensor entries, and the strict validator that checks every
// byte of a header (and the layout of the data buffer it describes) before anything uses it.
// IWYU pragma: private, include "posenc/io/safetensors.hpp"
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "posenc/detail/check.hpp"
#include "posenc/tensor.hpp"

namespace posenc::io {

/// The element types of the format, in the order of the reference implementation's `Dtype`
/// (huggingface/safetensors, safetensors/src/tensor.rs), which its writer, and ours, sort by.
/// The reader validates files holding any of them; `values`/`matrix` convert all but the F8 ones.
enum class Dtype {
  BOOL,
  U8,
  I8,
  F8_E5M2,
  F8_E4M3,
  I16,
  U16,
  F16,
  BF16,
  I32,
  U32,
  F32,
  F64,
  I64,
  U64
};

inline constexpr std::array<std::string_view, 15> dtype_names{
    "BOOL", "U8",  "I8",  "F8_E5M2", "F8_E4M3", "I16", "U16", "F16",
    "BF16", "I32", "U32", "F32",     "F64",     "I64", "U64"};

/// The header's name of `dtype`, e.g. "BF16".
inline std::string_view dtype_name(Dtype dtype) { return dtype_names[static_cast<int>(dtype)]; }

/// Bytes per element.
inline std::size_t dtype_size(Dtype dtype) {
  constexpr std::array<std::size_t, 15> sizes{1, 1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 4, 8, 8, 8};
  return sizes[static_cast<int>(dtype)];
}

/// The dtype named `name` in a header, or nothing for a name the format does not define.
inline std::optional<Dtype> parse_dtype(std::string_view name) {
  for (std::size_t i = 0; i < dtype_names.size(); ++i)
    if (dtype_names[i] == name) return static_cast<Dtype>(i);
  return std::nullopt;
}

/// The largest header accepted: 100 000 000 bytes, the limit of the reference implementation
/// (its MAX_HEADER_SIZE). Real headers are a few MB at most.
inline constexpr std::uint64_t safetensors_max_header_bytes = 100'000'000;

/// One tensor of a file: its dtype, its shape (outermost first: row-major) and its byte range
/// [begin, end) relative to the start of the data buffer (the header's `data_offsets`).
struct TensorInfo {
  Dtype dtype = Dtype::F32;
  std::vector<Index> shape;
  std::uint64_t begin = 0;
  std::uint64_t end = 0;

  /// The number of elements, the product of the shape (1 for a scalar of shape []).
  Index elements() const {
    Index count = 1;
    for (Index extent : shape) count *= extent;
    return count;
  }
};

/// A validated header: the tensors by name, their names in data order, the `__metadata__` map,
/// and where the data buffer starts in the file (8 + header length).
struct SafetensorsHeader {
  std::map<std::string, TensorInfo, std::less<>> tensors;
  std::vector<std::string> names;
  std::map<std::string, std::string> metadata;
  std::uint64_t data_start = 0;
};

namespace detail {

/// The scalars a tensor loads as: float, double, bool and the integer types (not the char types).
template <class T>
inline constexpr bool loadable_scalar =
    std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, bool> ||
    (std::is_integral_v<T> && !std::is_same_v<T, char> && !std::is_same_v<T, wchar_t> &&
     !std::is_same_v<T, char8_t> && !std::is_same_v<T, char16_t> && !std::is_same_v<T, char32_t>);

/// Throws std::invalid_argument("<function>: '<source>': <parts...>").
template <class... Parts>
[[noreturn]] void throw_format_error(const char* function, std::string_view source,
                                     Parts&&... parts) {
  posenc::detail::throw_invalid_argument(function, "'", source,
                                         "': ", std::forward<Parts>(parts)...);
}

/// "tensor \"name\": ", the prefix of every message about one tensor.
inline std::string tensor_label(std::string_view name) {
  return "tensor \"" + std::string(name) + "\": ";
}

template <class Values>
std::string bracketed(const Values& values) {
  std::ostringstream out;
  out << '[';
  bool first = true;
  for (const auto& value : values) {
    out << (first ? "" : ", ") << value;
    first = false;
  }
  out << ']';
  return out.str();
}

/// `value` as compact JSON, cut to 60 characters (headers may hold huge values).
inline std::string brief(const nlohmann::json& value) {
  std::string text = value.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return text;
}

/// "JSON <type> <value>", for messages about a value of the wrong kind.
inline std::string json_kind(const nlohmann::json& value) {
  return std::string("JSON ") + value.type_name() + " " + brief(value);
}

/// The value of a header number that must be a non-negative integer, or nothing.
inline std::optional<std::uint64_t> non_negative_integer(const nlohmann::json& value) {
  if (value.is_number_unsigned()) return value.get<std::uint64_t>();
  return std::nullopt;
}

/// Parses the JSON text of a header, rejecting what nlohmann would accept silently: a key twice
/// in one object (nlohmann keeps the last) and nesting deeper than a header has (the root object,
/// an entry, its shape or data_offsets array), which also bounds the parser's memory.
inline nlohmann::json parse_header_json(std::span<const unsigned char> text, const char* function,
                                        std::string_view source) {
  std::vector<std::set<std::string, std::less<>>> keys;  // of the objects being parsed
  std::string entry;                                     // the top-level key being parsed
  const auto callback = [&](int depth, nlohmann::json::parse_event_t event,
                            nlohmann::json& parsed) {
    using Event = nlohmann::json::parse_event_t;
    if (event == Event::object_start || event == Event::array_start) {
      if (depth > 2)
        throw_format_error(function, source, tensor_label(entry),
                           "the entry nests deeper than a safetensors header can (its shape and "
                           "data_offsets are flat arrays of integers)");
      if (event == Event::object_start) keys.emplace_back();
    } else if (event == Event::object_end) {
      keys.pop_back();
    } else if (event == Event::key) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (depth == 1) entry = key;
      if (!keys.back().insert(key).second) {
        if (depth == 1 && key == "__metadata__")
          throw_format_error(function, source, "the header holds __metadata__ twice");
        if (depth == 1)
          throw_format_error(function, source, tensor_label(key), "named twice in the header");
        throw_format_error(
            function, source,
            entry == "__metadata__" ? std::string("__metadata__: ") : tensor_label(entry), "key \"",
            key, "\" appears twice");
      }
    }
    return true;
  };
  // nlohmann stops at a NUL byte as at the end of the input, so check for one first (JSON has
  // none outside strings, and inside them a NUL is escaped).
  const auto nul = std::find(text.begin(), text.end(), static_cast<unsigned char>(0));
  if (nul != text.end())
    throw_format_error(function, source, "the ", text.size(),
                       "-byte header is not valid JSON: a NUL byte at header offset ",
                       nul - text.begin());
  try {
    return nlohmann::json::parse(text.begin(), text.end(), callback);
  } catch (const nlohmann::json::exception& error) {
    throw_format_error(function, source, "the ", text.size(),
                       "-byte header is not valid JSON: ", error.what());
  }
}

/// Reads one tensor entry {"dtype": …, "shape": […], "data_offsets": [begin, end]}.
inline TensorInfo parse_entry(const std::string& name, const nlohmann::json& entry,
                              std::uint64_t buffer_size, const char* function,
                              std::string_view source) {
  const std::string label = tensor_label(name);
  if (!entry.is_object())
    throw_format_error(function, source, label, "the entry is a ", json_kind(entry),
                       ", not an object with dtype, shape and data_offsets");
  for (const char* key : {"dtype", "shape", "data_offsets"})
    if (!entry.contains(key))
      throw_format_error(function, source, label, "the entry lacks \"", key, "\"");
  for (const auto& item : entry.items())
    if (item.key() != "dtype" && item.key() != "shape" && item.key() != "data_offsets")
      throw_format_error(function, source, label, "unknown key \"", item.key(),
                         "\" (an entry holds dtype, shape and data_offsets only)");
  TensorInfo info;
  const auto& dtype = entry["dtype"];
  if (!dtype.is_string())
    throw_format_error(function, source, label, "dtype is a ", json_kind(dtype), ", not a string");
  const auto parsed = parse_dtype(dtype.get_ref<const std::string&>());
  if (!parsed)
    throw_format_error(function, source, label, "unknown dtype \"",
                       dtype.get_ref<const std::string&>(), "\" (the format defines ",
                       bracketed(dtype_names), ")");
  info.dtype = *parsed;

  const auto& shape = entry["shape"];
  if (!shape.is_array())
    throw_format_error(function, source, label, "shape is a ", json_kind(shape), ", not an array");
  // Bytes (and so elements, and every partial product) checked to stay within Index before each
  // product, so that no later arithmetic on the shape can overflow (a file cannot hold more).
  constexpr auto limit = static_cast<std::uint64_t>(std::numeric_limits<Index>::max());
  std::uint64_t bytes = dtype_size(info.dtype);
  bool overflow = false;
  for (std::size_t axis = 0; axis < shape.size(); ++axis) {
    const auto extent = non_negative_integer(shape[axis]);
    if (!extent)
      throw_format_error(function, source, label, "shape[", axis, "] is ", brief(shape[axis]),
                         ", not a non-negative integer below 2^64");
    if (*extent > limit || (*extent != 0 && bytes > limit / *extent)) overflow = true;
    if (!overflow) bytes *= *extent;
    info.shape.push_back(static_cast<Index>(std::min(*extent, limit)));
  }
  if (overflow)
    throw_format_error(function, source, label, "shape ", brief(shape), " of ",
                       dtype_name(info.dtype), " overflows a signed 64-bit byte count");

  const auto& offsets = entry["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2 || !non_negative_integer(offsets[0]) ||
      !non_negative_integer(offsets[1]))
    throw_format_error(function, source, label, "data_offsets is ", brief(offsets),
                       ", not [begin, end] with non-negative integers");
  info.begin = offsets[0].get<std::uint64_t>();
  info.end = offsets[1].get<std::uint64_t>();
  if (info.begin > info.end)
    throw_format_error(function, source, label, "data_offsets [", info.begin, ", ", info.end,
                       "] are reversed (begin > end)");
  if (info.end > buffer_size)
    throw_format_error(function, source, label, "data_offsets [", info.begin, ", ", info.end,
                       "] run past the end of the ", buffer_size, "-byte data buffer");
  if (info.end - info.begin != bytes)
    throw_format_error(function, source, label, "data_offsets [", info.begin, ", ", info.end,
                       "] span ", info.end - info.begin, " bytes but shape ", brief(shape), " of ",
                       dtype_name(info.dtype), " needs ", bytes);
  return info;
}

inline std::uint64_t load_le(const unsigned char* bytes, std::size_t size) {
  std::uint64_t value = 0;
  for (std::size_t i = 0; i < size; ++i) value |= std::uint64_t{bytes[i]} << (8 * i);
  return value;
}

inline void store_le(std::uint64_t value, std::size_t size, unsigned char* bytes) {
  for (std::size_t i = 0; i < size; ++i) bytes[i] = static_cast<unsigned char>(value >> (8 * i));
}

/// Parses and validates a whole file held in `file`. See parse_safetensors.
inline SafetensorsHeader parse(std::span<const unsigned char> file, const char* function,
                               std::string_view source) {
  if (file.size() < 8)
    throw_format_error(function, source, "the file is ", file.size(),
                       " bytes, shorter than the 8-byte header length that starts the format");
  const std::uint64_t header_size = load_le(file.data(), 8);
  if (header_size > safetensors_max_header_bytes)
    throw_format_error(function, source, "header length ", header_size, " exceeds the limit of ",
                       safetensors_max_header_bytes,
                       " bytes (posenc::io::safetensors_max_header_bytes)");
  if (header_size > file.size() - 8)
    throw_format_error(function, source, "header length ", header_size,
                       " runs past the end of the file: ", file.size() - 8,
                       " bytes follow the 8-byte length");
  const nlohmann::json root = parse_header_json(file.subspan(8, header_size), function, source);
  if (!root.is_object())
    throw_format_error(function, source, "the header is a ", json_kind(root),
                       ", not a JSON object of tensor entries");

  SafetensorsHeader header;
  header.data_start = 8 + header_size;
  const std::uint64_t buffer_size = file.size() - header.data_start;
  for (const auto& [name, entry] : root.items()) {
    if (name == "__metadata__") {
      if (entry.is_null()) continue;  // as the reference implementation reads it: no metadata
      if (!entry.is_object())
        throw_format_error(function, source, "__metadata__ is a ", json_kind(entry),
                           ", not an object mapping strings to strings");
      for (const auto& [key, value] : entry.items()) {
        if (!value.is_string())
          throw_format_error(function, source, "__metadata__ key \"", key, "\" holds a ",
                             json_kind(value), ", not a string");
        header.metadata.emplace(key, value.get<std::string>());
      }
      continue;
    }
    header.tensors.emplace(name, parse_entry(name, entry, buffer_size, function, source));
  }

  // In data order the byte ranges must tile [0, buffer_size): no gap, no overlap, nothing left.
  std::vector<const std::pair<const std::string, TensorInfo>*> order;
  for (const auto& item : header.tensors) order.push_back(&item);
  std::stable_sort(order.begin(), order.end(), [](const auto* a, const auto* b) {
    return std::pair(a->second.begin, a->second.end) < std::pair(b->second.begin, b->second.end);
  });
  std::uint64_t covered = 0;
  const std::pair<const std::string, TensorInfo>* previous = nullptr;
  for (const auto* item : order) {
    const TensorInfo& info = item->second;
    const std::string label = tensor_label(item->first);
    if (info.begin > covered) {
      if (previous == nullptr)
        throw_format_error(function, source, label, "data_offsets [", info.begin, ", ", info.end,
                           "] leave bytes [0, ", info.begin,
                           ") of the data buffer unused (the tensors must cover it without gaps)");
      throw_format_error(function, source, label, "data_offsets [", info.begin, ", ", info.end,
                         "] leave bytes [", covered, ", ", info.begin, ") unused after tensor \"",
                         previous->first, "\" (the tensors must cover the buffer without gaps)");
    }
    if (info.begin < covered)
      throw_format_error(function, source, label, "data_offsets [", info.begin, ", ", info.end,
                         "] overlap tensor \"", previous->first, "\" at [", previous->second.begin,
                         ", ", previous->second.end, ")");
    covered = info.end;
    previous = item;
    header.names.push_back(item->first);
  }
  if (covered != buffer_size)
    throw_format_error(function, source, "the data buffer has ", buffer_size,
                       " bytes but the tensors cover only the first ", covered, " (",
                       buffer_size - covered, " trailing bytes)");
  return header;
}

}  // namespace detail

/// Parses and validates a whole safetensors file held in memory (`source` names it in messages).
/// Every violation is a std::invalid_argument naming "posenc::io::parse_safetensors", the source,
/// the tensor and the sizes: a file under 8 bytes; a header length over
/// safetensors_max_header_bytes or past the end of the file; a header that is not a JSON object
/// (invalid UTF-8 included), names a key twice in any object, or nests deeper than a header;
/// an entry that is not exactly {dtype, shape, data_offsets}; an unknown dtype; a shape entry that
/// is not a non-negative integer, or whose byte count overflows a signed 64-bit integer;
/// data_offsets that are not two non-negative integers with begin ≤ end within the data buffer, or
/// whose extent is not shape × dtype size; byte ranges that, sorted by offset, leave a gap, overlap
/// or leave trailing bytes; `__metadata__` that is not an object of strings (null is read as
/// absent).
inline SafetensorsHeader parse_safetensors(std::span<const unsigned char> file,
                                           std::string_view source = "<memory>") {
  return detail::parse(file, "posenc::io::parse_safetensors", source);
}

}  // namespace posenc::io
