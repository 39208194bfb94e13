#pragma once
/// \file BFloat16.hpp
/// \brief moka::bf16: a 16-bit brain-float storage type with fp32 math,
/// usable in host and device code.
///
/// The bit layout is that of IEEE binary32 truncated to its upper 16 bits
/// (1 sign, 8 exponent, 7 mantissa bits), identical to CUDA's
/// __nv_bfloat16, so a View of bf16 can be handed to cuBLAS as CUDA_R_16BF.
/// Conversion from float rounds to nearest, ties to even; NaN stays NaN
/// (quiet; on the GPU the canonical NaN), infinities and signed zeros are
/// kept. Device code on sm_80+ converts with the hardware instruction.

#include <Kokkos_Core.hpp>

#include <cstdint>
#include <cstring>

namespace moka {

/// \brief Brain floating point storage type (fp32 exponent range, 8-bit significand).
struct bf16 {
  std::uint16_t bits;  ///< raw bit pattern

  bf16() = default;

  /// \brief Rounds \p f to the nearest bf16 (ties to even).
  KOKKOS_INLINE_FUNCTION explicit bf16(float f) : bits(from_float(f)) {}

  /// \brief Converts \p d through float (one rounding to fp32, then to bf16).
  KOKKOS_INLINE_FUNCTION explicit bf16(double d) : bits(from_float(static_cast<float>(d))) {}

  /// \brief Exact widening to float.
  KOKKOS_INLINE_FUNCTION operator float() const { return to_float(bits); }

  /// \brief The bf16 with bit pattern \p b.
  KOKKOS_INLINE_FUNCTION static bf16 from_bits(std::uint16_t b) {
    bf16 r;
    r.bits = b;
    return r;
  }

  KOKKOS_INLINE_FUNCTION static std::uint16_t from_float(float f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    // One conversion instruction on sm_80 and later (round to nearest
    // even, as below; a NaN becomes the canonical quiet NaN). The software
    // form costs about eight integer instructions per element, which the
    // bf16 elementwise kernels (up to 16 conversions per 16-byte pack)
    // cannot afford at the memory rate.
    std::uint16_t r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
#else
    std::uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u) {
      // NaN: keep the sign, force a quiet NaN so truncation cannot make it Inf.
      return static_cast<std::uint16_t>((u >> 16) | 0x0040u);
    }
    const std::uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;  // round to nearest, ties to even
    return static_cast<std::uint16_t>(u >> 16);
#endif
  }

  KOKKOS_INLINE_FUNCTION static float to_float(std::uint16_t b) {
    const std::uint32_t u = static_cast<std::uint32_t>(b) << 16;
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
};

static_assert(sizeof(bf16) == 2, "bf16 must be 2 bytes");
static_assert(std::is_trivially_copyable<bf16>::value, "bf16 must be trivially copyable");

KOKKOS_INLINE_FUNCTION bool operator==(bf16 a, bf16 b) { return float(a) == float(b); }
KOKKOS_INLINE_FUNCTION bool operator!=(bf16 a, bf16 b) { return !(a == b); }

}  // namespace moka
