#include <moka/core/Core.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

namespace {
std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float float_of(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Reference: round-to-nearest-even in double arithmetic over the bf16 grid.
float reference_round(float f) {
  if (std::isnan(f) || std::isinf(f) || f == 0.0f) return f;
  const std::uint32_t u = bits_of(f);
  const float lo = float_of(u & 0xffff0000u);
  const float hi = float_of((u & 0xffff0000u) + 0x10000u);  // next toward larger magnitude
  // Past the largest bf16 the next grid point is 2^128 (which rounds to Inf).
  const double hi_d = std::isinf(hi) ? std::copysign(std::ldexp(1.0, 128), f) : static_cast<double>(hi);
  const double dl = std::fabs(static_cast<double>(f) - lo), dh = std::fabs(hi_d - f);
  if (dl < dh) return lo;
  if (dh < dl) return hi;
  return ((u >> 16) & 1u) ? hi : lo;  // tie: even mantissa
}
}  // namespace

// nvcc cannot compile device lambdas inside TEST bodies (private member
// functions), so each test body is a free function.
void bfloat16_ExactValuesRoundTrip() {
  for (float f : {0.0f, -0.0f, 1.0f, -2.0f, 0.5f, 3.0f, 1024.0f, -0.15625f}) {
    EXPECT_EQ(float(moka::bf16(f)), f);
  }
  EXPECT_TRUE(std::signbit(float(moka::bf16(-0.0f))));
}

void bfloat16_RoundsToNearestEven() {
  // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties to even -> 1.
  EXPECT_EQ(float(moka::bf16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  // 1 + 3*2^-8 lies halfway between 1+2^-7 (odd) and 1+2^-6 (even) -> 1+2^-6.
  EXPECT_EQ(float(moka::bf16(1.0f + 3 * std::ldexp(1.0f, -8))), 1.0f + std::ldexp(1.0f, -6));
  // Just above half way rounds up.
  EXPECT_EQ(float(moka::bf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20))), 1.0f + std::ldexp(1.0f, -7));
  // Sweep many values against the reference.
  std::uint32_t u = 0x3f800001u;
  for (int i = 0; i < 200000; ++i) {
    u = u * 1664525u + 1013904223u;
    const float f = float_of(u);
    if (std::isnan(f)) continue;
    const float got = float(moka::bf16(f));
    const float want = reference_round(f);
    if (std::isinf(want)) {
      EXPECT_TRUE(std::isinf(got)) << f;
    } else {
      ASSERT_EQ(bits_of(got), bits_of(want)) << "f=" << f;
    }
  }
}

void bfloat16_SpecialValues() {
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(float(moka::bf16(inf)), inf);
  EXPECT_EQ(float(moka::bf16(-inf)), -inf);
  EXPECT_TRUE(std::isnan(float(moka::bf16(std::numeric_limits<float>::quiet_NaN()))));
  // A NaN whose payload sits only in the low bits must not become Inf.
  EXPECT_TRUE(std::isnan(float(moka::bf16(float_of(0x7f800001u)))));
  // Largest float rounds to infinity (beyond the largest bf16).
  EXPECT_TRUE(std::isinf(float(moka::bf16(std::numeric_limits<float>::max()))));
  EXPECT_EQ(float(moka::bf16(1e-40f)), reference_round(1e-40f));  // subnormal
}

void bfloat16_DeviceMatchesHost() {
  // The same conversion in a kernel on the default execution space.
  const int n = 4096;
  Kokkos::View<float*> in("in", n);
  Kokkos::View<moka::bf16*> out("out", n);
  auto h_in = Kokkos::create_mirror_view(in);
  std::uint32_t u = 12345u;
  for (int i = 0; i < n; ++i) {
    u = u * 1664525u + 1013904223u;
    h_in(i) = float_of((u & 0x3fffffffu) | 0x30000000u) * ((i & 1) ? -1.0f : 1.0f);
  }
  // Ties (to even, both ways), just past a tie, subnormals, signed zero,
  // infinities and the overflow to infinity: on sm_80+ the device converts
  // with the hardware instruction, the host in software.
  const float specials[] = {1.0f + std::ldexp(1.0f, -8),
                            1.0f + 3 * std::ldexp(1.0f, -8),
                            -(1.0f + 3 * std::ldexp(1.0f, -8)),
                            1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20),
                            1e-40f,
                            -3e-39f,
                            float_of(0x00008000u),
                            float_of(0x00018000u),
                            -0.0f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::max(),
                            -std::numeric_limits<float>::max()};
  for (std::size_t i = 0; i < sizeof(specials) / sizeof(specials[0]); ++i) h_in(int(i)) = specials[i];
  Kokkos::deep_copy(in, h_in);
  Kokkos::parallel_for(
      "bf16_convert", Kokkos::RangePolicy<moka::execution_space>(0, n),
      KOKKOS_LAMBDA(int i) { out(i) = moka::bf16(in(i) * 1.0f); });
  auto h_out = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), out);
  for (int i = 0; i < n; ++i) {
    ASSERT_EQ(h_out(i).bits, moka::bf16(h_in(i)).bits) << i;
  }
}

TEST(BFloat16, ExactValuesRoundTrip) { bfloat16_ExactValuesRoundTrip(); }
TEST(BFloat16, RoundsToNearestEven) { bfloat16_RoundsToNearestEven(); }
TEST(BFloat16, SpecialValues) { bfloat16_SpecialValues(); }
TEST(BFloat16, DeviceMatchesHost) { bfloat16_DeviceMatchesHost(); }
