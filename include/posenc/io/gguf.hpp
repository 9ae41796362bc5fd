// SPDX-License-Identifier: MIT
// A small read-only reader of GGUF metadata (ggml / llama.cpp model files, versions 2 and 3): the
// header, every key-value pair (all GGUF value types, arrays included, nested too), the tensor
// infos, and the values of small float tensors (RoPE factor tables). Every count, length and
// offset is checked against the file before use; malformed input throws std::invalid_argument
// naming the file, the key or tensor, and the byte offset, never reads out of bounds.
//
//   GgufFile::open(path)                  maps a file and parses its metadata
//   GgufFile::parse(bytes, name)          the same on bytes in memory
//   file.find(key), file.number(key), file.integer(key), file.string(key), file.numbers(key)
//   file.find_tensor(name), file.tensor_values(name)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <variant>
#include <vector>

#include "posenc/io/detail/mapped_file.hpp"

namespace posenc::io {

/// GGUF value types (the GGUF specification, ggml's gguf_type).
enum class GgufType : std::uint32_t {
  uint8 = 0,
  int8 = 1,
  uint16 = 2,
  int16 = 3,
  uint32 = 4,
  int32 = 5,
  float32 = 6,
  boolean = 7,
  string = 8,
  array = 9,
  uint64 = 10,
  int64 = 11,
  float64 = 12,
};

inline const char* gguf_type_name(GgufType type) {
  static constexpr const char* names[] = {"uint8",  "int8",    "uint16", "int16",  "uint32",
                                          "int32",  "float32", "bool",   "string", "array",
                                          "uint64", "int64",   "float64"};
  const auto index = static_cast<std::uint32_t>(type);
  return index < 13 ? names[index] : "unknown";
}

/// One metadata value: a scalar (integers widened to 64 bits, floats to double), a string, or an
/// array of values of one element type.
struct GgufValue {
  GgufType type = GgufType::uint8;
  std::variant<std::uint64_t, std::int64_t, double, bool, std::string> scalar = std::uint64_t{0};
  GgufType element_type = GgufType::uint8;  // arrays only
  std::vector<GgufValue> elements;          // arrays only

  bool is_array() const { return type == GgufType::array; }
  bool is_string() const { return type == GgufType::string; }
  bool is_integer() const {
    return std::holds_alternative<std::uint64_t>(scalar) ||
           std::holds_alternative<std::int64_t>(scalar);
  }
  bool is_number() const {
    return !is_array() && (is_integer() || std::holds_alternative<double>(scalar));
  }
  /// A number as double (integers converted exactly up to 2^53).
  double to_double() const {
    if (const auto* u = std::get_if<std::uint64_t>(&scalar)) return static_cast<double>(*u);
    if (const auto* i = std::get_if<std::int64_t>(&scalar)) return static_cast<double>(*i);
    return std::get<double>(scalar);
  }
};

/// A tensor's entry in the GGUF header. `shape` is ggml's ne (ne[0] varies fastest); `offset` is
/// relative to the data section, `data_offset` absolute in the file.
struct GgufTensorInfo {
  std::string name;
  std::vector<std::uint64_t> shape;
  std::uint32_t ggml_type = 0;
  std::uint64_t offset = 0;
  std::uint64_t data_offset = 0;
  std::uint64_t byte_size = 0;
  std::uint64_t elements() const {
    std::uint64_t n = 1;
    for (const auto d : shape) n *= d;
    return n;
  }
};

namespace detail {

/// Bytes per block and elements per block of a ggml type, {0, 0} when unknown (ggml.c
/// type_traits: F32 0, F16 1, Q4_0 2, Q4_1 3, Q5_0 6, Q5_1 7, Q8_0 8, Q8_1 9, Q2_K..Q8_K 10-15,
/// IQ* 16-23 and 29, I8..I64 24-27, F64 28, BF16 30, TQ1_0 34, TQ2_0 35, MXFP4 39).
inline std::pair<std::uint64_t, std::uint64_t> ggml_type_block(std::uint32_t type) {
  switch (type) {
    case 0:
      return {4, 1};  // F32
    case 1:
      return {2, 1};  // F16
    case 2:
      return {18, 32};  // Q4_0
    case 3:
      return {20, 32};  // Q4_1
    case 6:
      return {22, 32};  // Q5_0
    case 7:
      return {24, 32};  // Q5_1
    case 8:
      return {34, 32};  // Q8_0
    case 9:
      return {36, 32};  // Q8_1
    case 10:
      return {84, 256};  // Q2_K
    case 11:
      return {110, 256};  // Q3_K
    case 12:
      return {144, 256};  // Q4_K
    case 13:
      return {176, 256};  // Q5_K
    case 14:
      return {210, 256};  // Q6_K
    case 15:
      return {292, 256};  // Q8_K
    case 16:
      return {66, 256};  // IQ2_XXS
    case 17:
      return {74, 256};  // IQ2_XS
    case 18:
      return {98, 256};  // IQ3_XXS
    case 19:
      return {50, 256};  // IQ1_S
    case 20:
      return {18, 32};  // IQ4_NL
    case 21:
      return {110, 256};  // IQ3_S
    case 22:
      return {82, 256};  // IQ2_S
    case 23:
      return {136, 256};  // IQ4_XS
    case 24:
      return {1, 1};  // I8
    case 25:
      return {2, 1};  // I16
    case 26:
      return {4, 1};  // I32
    case 27:
      return {8, 1};  // I64
    case 28:
      return {8, 1};  // F64
    case 29:
      return {56, 256};  // IQ1_M
    case 30:
      return {2, 1};  // BF16
    case 34:
      return {54, 256};  // TQ1_0
    case 35:
      return {66, 256};  // TQ2_0
    case 39:
      return {17, 32};  // MXFP4
    default:
      return {0, 0};
  }
}

/// IEEE half and bfloat16 to float.
inline double half_to_double(std::uint16_t h) {
  const int exponent = (h >> 10) & 0x1f;
  const double mantissa = h & 0x3ff;
  const double sign = (h & 0x8000) != 0 ? -1.0 : 1.0;
  if (exponent == 0) return sign * std::ldexp(mantissa, -24);
  if (exponent == 31) {
    return mantissa == 0 ? sign * std::numeric_limits<double>::infinity()
                         : std::numeric_limits<double>::quiet_NaN();
  }
  return sign * std::ldexp(1024.0 + mantissa, exponent - 25);
}

/// Little-endian cursor over the file's bytes; every read checks the remaining length.
class GgufCursor {
 public:
  GgufCursor(std::span<const unsigned char> bytes, const std::string& file)
      : bytes_(bytes), file_(file) {}

  [[noreturn]] void fail(const std::string& what) const {
    std::ostringstream message;
    message << "posenc::io::GgufFile: '" << file_ << "': " << what << " (at byte " << position_
            << " of " << bytes_.size() << ")";
    throw std::invalid_argument(message.str());
  }
  std::uint64_t position() const { return position_; }
  std::uint64_t remaining() const { return bytes_.size() - position_; }
  void need(std::uint64_t count, const std::string& what) const {
    if (count > remaining()) {
      fail(what + " needs " + std::to_string(count) + " bytes but " + std::to_string(remaining()) +
           " remain");
    }
  }
  template <class T>
  T read(const std::string& what) {
    need(sizeof(T), what);
    T value = 0;
    // GGUF is little-endian; so are the machines this library targets.
    std::memcpy(&value, bytes_.data() + position_, sizeof(T));
    position_ += sizeof(T);
    return value;
  }
  std::string read_string(const std::string& what) {
    const auto length = read<std::uint64_t>(what + " (string length)");
    need(length, what + " (string of " + std::to_string(length) + " bytes)");
    std::string text(reinterpret_cast<const char*>(bytes_.data() + position_),
                     static_cast<std::size_t>(length));
    position_ += length;
    return text;
  }

 private:
  std::span<const unsigned char> bytes_;
  const std::string& file_;
  std::uint64_t position_ = 0;
};

inline constexpr int gguf_max_array_depth = 8;

inline GgufValue read_gguf_value(GgufCursor& in, GgufType type, const std::string& key, int depth) {
  GgufValue value;
  value.type = type;
  const std::string what = "value of key '" + key + "'";
  switch (type) {
    case GgufType::uint8:
      value.scalar = std::uint64_t{in.read<std::uint8_t>(what)};
      break;
    case GgufType::int8:
      value.scalar = std::int64_t{in.read<std::int8_t>(what)};
      break;
    case GgufType::uint16:
      value.scalar = std::uint64_t{in.read<std::uint16_t>(what)};
      break;
    case GgufType::int16:
      value.scalar = std::int64_t{in.read<std::int16_t>(what)};
      break;
    case GgufType::uint32:
      value.scalar = std::uint64_t{in.read<std::uint32_t>(what)};
      break;
    case GgufType::int32:
      value.scalar = std::int64_t{in.read<std::int32_t>(what)};
      break;
    case GgufType::uint64:
      value.scalar = in.read<std::uint64_t>(what);
      break;
    case GgufType::int64:
      value.scalar = in.read<std::int64_t>(what);
      break;
    case GgufType::float32:
      value.scalar = double{in.read<float>(what)};
      break;
    case GgufType::float64:
      value.scalar = in.read<double>(what);
      break;
    case GgufType::boolean: {
      const auto b = in.read<std::uint8_t>(what);
      if (b > 1) in.fail("key '" + key + "': bool value " + std::to_string(b) + " is not 0 or 1");
      value.scalar = b == 1;
      break;
    }
    case GgufType::string:
      value.scalar = in.read_string(what);
      break;
    case GgufType::array: {
      if (depth >= gguf_max_array_depth) {
        in.fail("key '" + key + "': arrays nested deeper than " +
                std::to_string(gguf_max_array_depth));
      }
      const auto raw_type = in.read<std::uint32_t>(what + " (array element type)");
      if (raw_type > 12) {
        in.fail("key '" + key + "': unknown array element type " + std::to_string(raw_type));
      }
      value.element_type = static_cast<GgufType>(raw_type);
      const auto count = in.read<std::uint64_t>(what + " (array length)");
      // Smallest encoding of one element: 1 byte, 8 for a string's length, 12 for an array's
      // type and length. Checked before reserving, so a forged count cannot allocate.
      std::uint64_t smallest = 1;
      if (value.element_type == GgufType::string) smallest = 8;
      if (value.element_type == GgufType::array) smallest = 12;
      if (count > in.remaining() / smallest) {
        in.fail("key '" + key + "': array of " + std::to_string(count) + " " +
                gguf_type_name(value.element_type) + " elements does not fit in the " +
                std::to_string(in.remaining()) + " remaining bytes");
      }
      value.elements.reserve(static_cast<std::size_t>(count));
      for (std::uint64_t i = 0; i < count; ++i) {
        value.elements.push_back(read_gguf_value(in, value.element_type, key, depth + 1));
      }
      break;
    }
    default:
      in.fail("key '" + key + "': unknown value type " +
              std::to_string(static_cast<std::uint32_t>(type)));
  }
  return value;
}

}  // namespace detail

/// A parsed GGUF file: metadata in file order, tensor infos, and the bytes (mapped) for reading
/// small tensors. Move-only.
class GgufFile {
 public:
  static GgufFile open(const std::string& path) {
    return GgufFile(io::detail::MappedFile::open(path, "posenc::io::GgufFile::open"), path);
  }
  /// Parses bytes in memory; `name` stands for the file in error messages.
  static GgufFile parse(std::vector<unsigned char> bytes, const std::string& name = "<memory>") {
    return GgufFile(io::detail::MappedFile::from_bytes(std::move(bytes)), name);
  }

  const std::string& path() const { return path_; }
  std::uint32_t version() const { return version_; }
  std::uint64_t alignment() const { return alignment_; }
  std::uint64_t data_section() const { return data_section_; }
  const std::vector<std::pair<std::string, GgufValue>>& metadata() const { return metadata_; }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }

  const GgufValue* find(std::string_view key) const {
    const auto it = key_index_.find(std::string(key));
    return it == key_index_.end() ? nullptr : &metadata_[it->second].second;
  }
  bool contains(std::string_view key) const { return find(key) != nullptr; }

  /// A numeric key (any integer or float type) as double; throws naming the file and key when
  /// it is missing or of another type.
  double number(std::string_view key) const {
    const GgufValue& value = require(key);
    if (!value.is_number()) wrong_type(key, value, "a number");
    return value.to_double();
  }
  std::optional<double> optional_number(std::string_view key) const {
    return contains(key) ? std::optional<double>(number(key)) : std::nullopt;
  }
  /// An integer key (any integer type, non-negative) as uint64.
  std::uint64_t integer(std::string_view key) const {
    const GgufValue& value = require(key);
    if (const auto* u = std::get_if<std::uint64_t>(&value.scalar); u && !value.is_array()) {
      return *u;
    }
    if (const auto* i = std::get_if<std::int64_t>(&value.scalar); i && !value.is_array()) {
      if (*i >= 0) return static_cast<std::uint64_t>(*i);
      fail_key(key, "must be >= 0, got " + std::to_string(*i));
    }
    wrong_type(key, value, "an integer");
  }
  std::string string(std::string_view key) const {
    const GgufValue& value = require(key);
    if (!value.is_string()) wrong_type(key, value, "a string");
    return std::get<std::string>(value.scalar);
  }
  /// A numeric array key as doubles.
  std::vector<double> numbers(std::string_view key) const {
    const GgufValue& value = require(key);
    if (!value.is_array()) wrong_type(key, value, "an array of numbers");
    std::vector<double> out;
    for (const GgufValue& element : value.elements) {
      if (!element.is_number()) wrong_type(key, value, "an array of numbers");
      out.push_back(element.to_double());
    }
    return out;
  }

  const GgufTensorInfo* find_tensor(std::string_view name) const {
    for (const GgufTensorInfo& info : tensors_) {
      if (info.name == name) return &info;
    }
    return nullptr;
  }
  /// The values of an F32, F16, BF16 or F64 tensor, in storage order.
  std::vector<double> tensor_values(std::string_view name) const {
    const GgufTensorInfo* info = find_tensor(name);
    if (info == nullptr) fail_tensor(name, "is not in the file");
    const unsigned char* data = file_.bytes().data() + info->data_offset;
    const std::uint64_t n = info->elements();
    std::vector<double> out(static_cast<std::size_t>(n));
    for (std::uint64_t i = 0; i < n; ++i) {
      switch (info->ggml_type) {
        case 0:
          out[i] = load<float>(data + 4 * i);
          break;
        case 28:
          out[i] = load<double>(data + 8 * i);
          break;
        case 1:
          out[i] = io::detail::half_to_double(load<std::uint16_t>(data + 2 * i));
          break;
        case 30: {
          const std::uint32_t bits = std::uint32_t{load<std::uint16_t>(data + 2 * i)} << 16;
          float f = 0;
          std::memcpy(&f, &bits, 4);
          out[i] = f;
          break;
        }
        default:
          fail_tensor(name, "has ggml type " + std::to_string(info->ggml_type) +
                                "; only F32 (0), F16 (1), F64 (28) and BF16 (30) are read");
      }
    }
    return out;
  }

  /// Throws std::invalid_argument("<function>: '<file>': key '<key>' <what>").
  [[noreturn]] void fail_key(std::string_view key, const std::string& what,
                             const char* function = "posenc::io::GgufFile") const {
    throw std::invalid_argument(std::string(function) + ": '" + path_ + "': key '" +
                                std::string(key) + "' " + what);
  }

 private:
  GgufFile(io::detail::MappedFile file, std::string path)
      : file_(std::move(file)), path_(std::move(path)) {
    parse_header();
  }

  template <class T>
  static T load(const unsigned char* p) {
    T value;
    std::memcpy(&value, p, sizeof(T));
    return value;
  }

  const GgufValue& require(std::string_view key) const {
    const GgufValue* value = find(key);
    if (value == nullptr) fail_key(key, "is missing");
    return *value;
  }
  [[noreturn]] void wrong_type(std::string_view key, const GgufValue& value,
                               const char* wanted) const {
    std::string got = gguf_type_name(value.type);
    if (value.is_array()) got += std::string(" of ") + gguf_type_name(value.element_type);
    fail_key(key, std::string("must be ") + wanted + ", got " + got);
  }
  [[noreturn]] void fail_tensor(std::string_view name, const std::string& what) const {
    throw std::invalid_argument("posenc::io::GgufFile: '" + path_ + "': tensor '" +
                                std::string(name) + "' " + what);
  }

  void parse_header() {
    const auto bytes = file_.bytes();
    io::detail::GgufCursor in(bytes, path_);
    const auto magic = in.read<std::uint32_t>("magic");
    if (magic != 0x46554747u) in.fail("not a GGUF file (magic is not 'GGUF')");
    version_ = in.read<std::uint32_t>("version");
    if (version_ == 1) in.fail("GGUF version 1 (32-bit counts) is not supported");
    if (version_ != 2 && version_ != 3) {
      in.fail("unsupported GGUF version " + std::to_string(version_) +
              ((version_ & 0xffffu) == 0 ? " (a big-endian file?)" : ""));
    }
    const auto tensor_count = in.read<std::uint64_t>("tensor count");
    const auto kv_count = in.read<std::uint64_t>("metadata count");
    // A key-value pair takes >= 13 bytes (key length, type, one byte); a tensor info >= 24.
    if (kv_count > in.remaining() / 13) {
      in.fail("metadata count " + std::to_string(kv_count) + " does not fit in the file");
    }
    metadata_.reserve(static_cast<std::size_t>(kv_count));
    for (std::uint64_t i = 0; i < kv_count; ++i) {
      std::string key = in.read_string("key of metadata entry " + std::to_string(i));
      if (key.empty()) in.fail("metadata entry " + std::to_string(i) + " has an empty key");
      const auto raw_type = in.read<std::uint32_t>("type of key '" + key + "'");
      if (raw_type > 12) {
        in.fail("key '" + key + "' has unknown value type " + std::to_string(raw_type));
      }
      GgufValue value = io::detail::read_gguf_value(in, static_cast<GgufType>(raw_type), key, 0);
      if (!key_index_.emplace(key, metadata_.size()).second) {
        in.fail("duplicate key '" + key + "'");
      }
      metadata_.emplace_back(std::move(key), std::move(value));
    }
    if (const GgufValue* align = find("general.alignment")) {
      if (align->type != GgufType::uint32) {
        fail_key("general.alignment",
                 std::string("must be uint32, got ") + gguf_type_name(align->type));
      }
      alignment_ = std::get<std::uint64_t>(align->scalar);
      if (alignment_ == 0 || (alignment_ & (alignment_ - 1)) != 0) {
        fail_key("general.alignment", "must be a power of two, got " + std::to_string(alignment_));
      }
    }
    if (tensor_count > in.remaining() / 24) {
      in.fail("tensor count " + std::to_string(tensor_count) + " does not fit in the file");
    }
    tensors_.reserve(static_cast<std::size_t>(tensor_count));
    std::unordered_map<std::string, std::size_t> names;
    for (std::uint64_t t = 0; t < tensor_count; ++t) {
      GgufTensorInfo info;
      info.name = in.read_string("name of tensor " + std::to_string(t));
      const std::string what = "tensor '" + info.name + "'";
      if (!names.emplace(info.name, t).second) in.fail("duplicate " + what);
      const auto dims = in.read<std::uint32_t>(what + " dimension count");
      if (dims == 0 || dims > 4) {
        in.fail(what + " has " + std::to_string(dims) + " dimensions (1 to 4 allowed)");
      }
      std::uint64_t elements = 1;
      for (std::uint32_t d = 0; d < dims; ++d) {
        const auto extent = in.read<std::uint64_t>(what + " shape");
        if (extent != 0 && elements > (std::uint64_t{1} << 62) / extent) {
          in.fail(what + " has more than 2^62 elements");
        }
        elements *= extent;
        info.shape.push_back(extent);
      }
      info.ggml_type = in.read<std::uint32_t>(what + " type");
      const auto [block_bytes, block_elements] = io::detail::ggml_type_block(info.ggml_type);
      if (block_elements == 0) {
        in.fail(what + " has unknown ggml type " + std::to_string(info.ggml_type));
      }
      if (info.shape[0] % block_elements != 0) {
        in.fail(what + " row of " + std::to_string(info.shape[0]) +
                " elements is not a multiple of its block size " + std::to_string(block_elements));
      }
      info.byte_size = elements / block_elements * block_bytes;
      info.offset = in.read<std::uint64_t>(what + " offset");
      if (info.offset % alignment_ != 0) {
        in.fail(what + " offset " + std::to_string(info.offset) +
                " is not a multiple of the alignment " + std::to_string(alignment_));
      }
      tensors_.push_back(std::move(info));
    }
    if (tensor_count > 0) {
      const std::uint64_t end = in.position();
      data_section_ = end + (alignment_ - end % alignment_) % alignment_;
      if (data_section_ > bytes.size()) in.fail("the data section starts past the end of the file");
      const std::uint64_t data_size = bytes.size() - data_section_;
      std::vector<std::pair<std::uint64_t, std::uint64_t>> ranges;
      for (GgufTensorInfo& info : tensors_) {
        if (info.offset > data_size || info.byte_size > data_size - info.offset) {
          in.fail("tensor '" + info.name + "' bytes [" + std::to_string(info.offset) + ", +" +
                  std::to_string(info.byte_size) + ") exceed the data section of " +
                  std::to_string(data_size) + " bytes");
        }
        info.data_offset = data_section_ + info.offset;
        ranges.emplace_back(info.offset, info.offset + info.byte_size);
      }
      std::sort(ranges.begin(), ranges.end());
      for (std::size_t i = 1; i < ranges.size(); ++i) {
        if (ranges[i].first < ranges[i - 1].second) in.fail("tensor data ranges overlap");
      }
    }
  }

  io::detail::MappedFile file_;
  std::string path_;
  std::uint32_t version_ = 0;
  std::uint64_t alignment_ = 32;
  std::uint64_t data_section_ = 0;
  std::vector<std::pair<std::string, GgufValue>> metadata_;
  std::unordered_map<std::string, std::size_t> key_index_;
  std::vector<GgufTensorInfo> tensors_;
};

}  // namespace posenc::io
