#pragma once
// Math functions usable in kernels with Kokkos 3.x (Kokkos::Experimental)
// and 4.x (Kokkos::), as moka::impl::exp etc.

#include <Kokkos_Core.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace moka {
namespace impl {
#if KOKKOS_VERSION >= 40000
using Kokkos::cos;
using Kokkos::erf;
using Kokkos::exp;
using Kokkos::log;
using Kokkos::sqrt;
using Kokkos::tanh;
#else
using Kokkos::Experimental::cos;
using Kokkos::Experimental::erf;
using Kokkos::Experimental::exp;
using Kokkos::Experimental::log;
using Kokkos::Experimental::sqrt;
using Kokkos::Experimental::tanh;
#endif
/// erf of a float for the host's elementwise kernels: x P(x^2) / Q(x^2) on
/// |x| <= 3.925 (erf = +-1 in float beyond), a rational fit of degree 5 / 5
/// in x^2 made for MoKA (least squares on 4000 Chebyshev points, weights
/// iterated); within 4.6e-7 of erf in float arithmetic. A few operations
/// that GCC vectorizes (with -fno-trapping-math, which the library's
/// targets carry) against a libm call per element (erff: 8-15 ns each on
/// the development machine's cores). Device code keeps CUDA's erff.
KOKKOS_FORCEINLINE_FUNCTION float erf_fast(float x) {
#if defined(__CUDA_ARCH__)
  return erf(x);
#else
  const float a = std::min(std::max(x, -3.925f), 3.925f);
  const float u = a * a;
  const float p = ((((2.044621999e-06f * u + 2.858691024e-04f) * u + 3.802976292e-03f) * u + 5.285973179e-02f) * u +
                   1.912576131e-01f) * u + 1.128379086e+00f;
  const float q = ((((3.808857486e-05f * u + 1.171976139e-03f) * u + 1.504210560e-02f) * u + 1.144601724e-01f) * u +
                   5.028298795e-01f) * u + 1.0f;
  return a * p / q;
#endif
}

/// exp of a float for the host's elementwise kernels: 2^k e^r with k the
/// nearest integer to y log2(e) (rounded by adding 1.5 x 2^23), r reduced
/// with ln 2 in two parts, e^r by its Taylor polynomial of degree 6, 2^k
/// put into the exponent bits; y clamped to [-87, 88] (no denormals, no
/// infinity). Within 2.4e-7 relative. Device code uses CUDA's __expf
/// (the SFU's exp2 and one multiply; within 2 + 1.2 |y| ulp): the
/// activations' kernels are bound by instruction issue, not memory, on an
/// H200 (ncu: 80-85% of the SMs' issue rate, 39-47% of DRAM bandwidth).
KOKKOS_FORCEINLINE_FUNCTION float exp_fast(float y) {
#if defined(__CUDA_ARCH__)
  return __expf(y);
#else
  y             = std::min(std::max(y, -87.f), 88.f);
  const float t = y * 1.44269504f + 12582912.f;
  std::int32_t tb;
  std::memcpy(&tb, &t, sizeof(tb));
  const std::int32_t k = tb - 0x4B400000;
  const float r        = (y - float(k) * 0.693145751953125f) - float(k) * 1.428606765e-06f;
  float p              = 1.f / 720;
  p                    = p * r + 1.f / 120;
  p                    = p * r + 1.f / 24;
  p                    = p * r + 1.f / 6;
  p                    = p * r + 0.5f;
  p                    = p * r + 1.f;
  p                    = p * r + 1.f;
  const std::int32_t bits = (k + 127) << 23;
  float s;
  std::memcpy(&s, &bits, sizeof(s));
  return p * s;
#endif
}

/// The standard normal CDF Phi(x) = (1 + erf(x / sqrt 2)) / 2 in float, as
/// the erf GeLU uses it. Host: from erf_fast. Device: 0.5 erfc(|x| / sqrt 2)
/// (or 1 less it for x > 0) with erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 +
/// z / 2), P of degree 9: the Chebyshev fit of Press et al., Numerical
/// Recipes (2nd ed., section 6.2, "erfcc"; fractional error below 1.2e-7
/// for every z >= 0), with the SFU's reciprocal and exp2. About 20
/// instructions without a branch, against about 45 for CUDA's erff with its
/// two paths taken by mixed warps, and relative accuracy kept in the
/// negative tail, where 1 + erf(x) cancels (within 1e-5 relative there,
/// 2.2e-7 absolute everywhere, in float on the host; the GPU test checks
/// the device's).
KOKKOS_FORCEINLINE_FUNCTION float normal_cdf_fast(float x) {
#if defined(__CUDA_ARCH__)
  const float z = fabsf(x) * 0.70710678118654752440f;
  const float t = __fdividef(1.f, 1.f + 0.5f * z);
  float p       = 0.17087277f;
  p             = p * t - 0.82215223f;
  p             = p * t + 1.48851587f;
  p             = p * t - 1.13520398f;
  p             = p * t + 0.27886807f;
  p             = p * t - 0.18628806f;
  p             = p * t + 0.09678418f;
  p             = p * t + 0.37409196f;
  p             = p * t + 1.00002368f;
  p             = p * t - 1.26551223f;
  const float h = 0.5f * t * __expf(p - z * z);  // erfc(z) / 2
  return x < 0.f ? h : 1.f - h;
#else
  return 0.5f * (1.f + erf_fast(x * 0.70710678118654752440f));
#endif
}

/// Phi and exp as the activations use them: the fast forms for float, the
/// library's for double (the reference precision).
KOKKOS_FORCEINLINE_FUNCTION float act_cdf(float x) { return normal_cdf_fast(x); }
KOKKOS_FORCEINLINE_FUNCTION double act_cdf(double x) { return 0.5 * (1 + erf(x * 0.70710678118654752440)); }
KOKKOS_FORCEINLINE_FUNCTION float act_exp(float x) { return exp_fast(x); }
KOKKOS_FORCEINLINE_FUNCTION double act_exp(double x) { return exp(x); }
/// 1 / y for y >= 1 (the sigmoid's denominator): on the device the SFU's
/// reciprocal (__fdividef: 2 ulp; 0 for y beyond 2^126, where the sigmoid
/// is 0 to float precision anyway) instead of IEEE division's sequence.
KOKKOS_FORCEINLINE_FUNCTION float act_recip(float y) {
#if defined(__CUDA_ARCH__)
  return __fdividef(1.f, y);
#else
  return 1.f / y;
#endif
}
KOKKOS_FORCEINLINE_FUNCTION double act_recip(double y) { return 1 / y; }

/// Row-major matrix and vector Views, the shapes of the kernels' operands.
template <class S, class M>
using mat = Kokkos::View<S**, Kokkos::LayoutRight, M>;
template <class S, class M>
using vec = Kokkos::View<S*, Kokkos::LayoutRight, M>;

/// 2D iteration over row-major (LayoutRight) data with the column index
/// moving fastest on every backend.
template <class Exec>
using RowMajor2D = Kokkos::MDRangePolicy<Exec, Kokkos::Rank<2, Kokkos::Iterate::Right, Kokkos::Iterate::Right>>;

/// The policy for an elementwise kernel over an m x n row-major array.
/// Tiles are one row by 128 columns: Kokkos 3.4's CUDA MDRange maps the
/// first index to threadIdx.x and its default tiles are 2 x 16 (32-thread
/// blocks, two rows per warp), which left the layer's elementwise kernels
/// at a fraction of the memory bandwidth on an H100. With one-row tiles a
/// warp reads 32 consecutive columns and a block has 128 threads.
template <class Exec>
RowMajor2D<Exec> row_major_2d(const Exec& space, long m, long n) {
#ifdef KOKKOS_ENABLE_CUDA
  if (std::is_same<Exec, Kokkos::Cuda>::value) return RowMajor2D<Exec>(space, {0, 0}, {m, n}, {1, 128});
#endif
  return RowMajor2D<Exec>(space, {0, 0}, {m, n});  // host backends: Kokkos' own tiles
}
/// W consecutive elements moved as one load or store (16 bytes for the
/// widths pack_width picks): one element per thread leaves too few bytes
/// in flight for an H100's memory bandwidth (about 0.65 TB/s measured for
/// the bf16 activation with one element per thread).
template <class T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

/// The W elements at \p p (aligned to W elements: see pack_width).
template <int W, class T>
KOKKOS_INLINE_FUNCTION Pack<T, W> load_pack(const T* p) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const Pack<T, W>*>(p);
#else
  Pack<T, W> x;
  for (int i = 0; i < W; ++i) x.v[i] = p[i];
  return x;
#endif
}

template <int W, class T>
KOKKOS_INLINE_FUNCTION void store_pack(T* p, const Pack<T, W>& x) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<Pack<T, W>*>(p) = x;
#else
  for (int i = 0; i < W; ++i) p[i] = x.v[i];
#endif
}

/// True when rows of \p n elements of a row-major View \p v can be read
/// in packs of \p w: the row length, the row pitch and the data pointer are
/// all multiples of w elements.
template <class View>
bool packs_fit(const View& v, long n, int w) {
  using T = typename View::value_type;
  return n % w == 0 && static_cast<long>(v.stride(0)) % w == 0 &&
         reinterpret_cast<std::uintptr_t>(v.data()) % (sizeof(T) * w) == 0;
}

/// Sum of squares of a rank-1 View, accumulated in double.
template <class Exec, class View>
double sum_of_squares(const Exec& space, const View& g) {
  double s = 0;
  Kokkos::parallel_reduce(
      "moka::grad_norm", Kokkos::RangePolicy<Exec>(space, 0, g.extent(0)),
      KOKKOS_LAMBDA(long i, double& acc) { acc += double(g(i)) * double(g(i)); }, s);
  return s;
}
}  // namespace impl
}  // namespace moka
