// SPDX-License-Identifier: MIT
// The SIMD packet of a scalar under the current compile flags (AVX-512, AVX2, SSE, NEON, or none)
// and the few packet helpers that both the attention kernel's micro-kernels and DAPE's network
// layers use.
#pragma once

#include <Eigen/Core>
#include <cstring>
#include <type_traits>

#include "posenc/tensor.hpp"

namespace posenc::detail {

/// The widest packet Eigen uses for Scalar with the current compile flags and its width.
template <class Scalar>
struct SimdPacket {
  using Packet = typename Eigen::internal::packet_traits<Scalar>::type;
  static constexpr Index width = Eigen::internal::unpacket_traits<Packet>::size;
  /// 32 vector registers (AVX-512) rather than 16 (AVX): register blocks may be twice as tall.
  static constexpr bool many_registers = EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS >= 32;
};

/// Rounds n up to a multiple of the packet width: the padded width of packed tiles.
template <class Scalar>
constexpr Index padded_width(Index n) {
  constexpr Index w = SimdPacket<Scalar>::width;
  return (n + w - 1) / w * w;
}

/// Writes the first `count` lanes of a packet to `to` (the edge of a tile narrower than a packet).
template <class Packet, class Scalar>
inline void store_lanes(Scalar* to, const Packet& from, Index count) {
  constexpr Index w = Eigen::internal::unpacket_traits<Packet>::size;
  if (count >= w) {
    Eigen::internal::pstoreu(to, from);
    return;
  }
  alignas(64) Scalar lanes[w];
  Eigen::internal::pstoreu(lanes, from);
  std::memcpy(to, lanes, static_cast<std::size_t>(count) * sizeof(Scalar));
}

/// Σ of the lanes of a packet.
template <class Packet>
typename Eigen::internal::unpacket_traits<Packet>::type sum_lanes(const Packet& packet) {
  using Scalar = typename Eigen::internal::unpacket_traits<Packet>::type;
  constexpr Index w = Eigen::internal::unpacket_traits<Packet>::size;
  if constexpr (std::is_same_v<Scalar, float>) {
    return Eigen::internal::predux(packet);
  } else {
    // Lanes summed through memory: GCC 12 raises a false -Wuninitialized inside its own
    // AVX-512 intrinsics for predux on 8-double packets.
    alignas(64) Scalar lanes[w];
    Eigen::internal::pstoreu(lanes, packet);
    Scalar total = 0;
    for (Index i = 0; i < w; ++i) total += lanes[i];
    return total;
  }
}

}  // namespace posenc::detail
