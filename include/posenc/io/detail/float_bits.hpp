// SPDX-License-Identifier: MIT
// The bit patterns of IEEE binary16 ("F16"), bfloat16 ("BF16") and binary32 to and from double:
// exact widening, and narrowing in one round-to-nearest-even step (subnormals, overflow to ±inf,
// the sign of zeros and NaNs kept), as the safetensors reader and writer need them.
// IWYU pragma: private, include "posenc/io/safetensors.hpp"
#pragma once

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

namespace posenc::io::detail {

/// An IEEE-754 binary format: 1 sign bit, `exponent_bits`, then `mantissa_bits` stored fraction
/// bits (at most 31 bits in all).
struct BinaryFormat {
  int exponent_bits;
  int mantissa_bits;
};
inline constexpr BinaryFormat binary16{5, 10};
inline constexpr BinaryFormat bfloat16{8, 7};
inline constexpr BinaryFormat binary32{8, 23};

/// The value of the low 1 + E + M bits of `bits` in `format`, exactly (every such value is a
/// double). A NaN widens to a NaN of the same sign.
inline double widen(std::uint32_t bits, BinaryFormat format) {
  const int e = format.exponent_bits;
  const int m = format.mantissa_bits;
  const int bias = (1 << (e - 1)) - 1;
  const std::uint32_t mantissa = bits & ((std::uint32_t{1} << m) - 1);
  const std::uint32_t exponent = (bits >> m) & ((std::uint32_t{1} << e) - 1);
  const bool negative = ((bits >> (m + e)) & 1U) != 0;
  double magnitude = 0;
  if (exponent == (std::uint32_t{1} << e) - 1) {
    magnitude = mantissa == 0 ? std::numeric_limits<double>::infinity()
                              : std::numeric_limits<double>::quiet_NaN();
  } else if (exponent == 0) {
    magnitude = std::ldexp(static_cast<double>(mantissa), 1 - bias - m);
  } else {
    magnitude = std::ldexp(static_cast<double>(mantissa | (std::uint32_t{1} << m)),
                           static_cast<int>(exponent) - bias - m);
  }
  return std::copysign(magnitude, negative ? -1.0 : 1.0);
}

/// The bits of `value` rounded to `format` to nearest, ties to even, in a single step (no double
/// rounding through float). Values past the largest finite number become ±inf; NaN stays NaN
/// (quiet, same sign, leading payload bits kept).
inline std::uint32_t narrow(double value, BinaryFormat format) {
  const int e = format.exponent_bits;
  const int m = format.mantissa_bits;
  const int bias = (1 << (e - 1)) - 1;
  const auto raw = std::bit_cast<std::uint64_t>(value);
  const std::uint32_t sign = static_cast<std::uint32_t>(raw >> 63) << (m + e);
  const std::uint32_t infinity = ((std::uint32_t{1} << e) - 1) << m;
  const int exponent = static_cast<int>((raw >> 52) & 0x7ff);
  const std::uint64_t fraction = raw & ((std::uint64_t{1} << 52) - 1);
  if (exponent == 0x7ff) {
    if (fraction == 0) return sign | infinity;
    return sign | infinity | (std::uint32_t{1} << (m - 1)) |
           static_cast<std::uint32_t>(fraction >> (52 - m));
  }
  // Zeros and double subnormals (< 2^−1022) lie below half the least subnormal of every format
  // here, so they round to ±0.
  if (exponent == 0) return sign;
  // value = significand · 2^(unbiased − 52). Keep the bits down to the target's last place:
  // 2^(unbiased − m) for a normal result, 2^(1 − bias − m) for a subnormal one.
  const std::uint64_t significand = fraction | (std::uint64_t{1} << 52);
  const int unbiased = exponent - 1023;
  const int least_normal = 1 - bias;
  const bool subnormal = unbiased < least_normal;
  const int shift = 52 - m + (subnormal ? least_normal - unbiased : 0);
  if (shift > 53) return sign;  // below half the least subnormal
  std::uint64_t kept = significand >> shift;
  const std::uint64_t rest = significand & ((std::uint64_t{1} << shift) - 1);
  const std::uint64_t half = std::uint64_t{1} << (shift - 1);
  if (rest > half || (rest == half && (kept & 1U) != 0)) ++kept;
  // A subnormal that rounds up to 2^m lands on the least normal number: bit m is exponent 1.
  if (subnormal) return sign | static_cast<std::uint32_t>(kept);
  int biased = unbiased + bias;
  if ((kept >> (m + 1)) != 0) {  // rounding carried into a new binade
    kept >>= 1;
    ++biased;
  }
  if (biased >= (1 << e) - 1) return sign | infinity;
  return sign | (static_cast<std::uint32_t>(biased) << m) |
         static_cast<std::uint32_t>(kept & ((std::uint64_t{1} << m) - 1));
}

/// bfloat16 bits to float: the upper half of a binary32 pattern, exact for every value.
inline float bfloat16_to_float(std::uint16_t bits) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}

}  // namespace posenc::io::detail
