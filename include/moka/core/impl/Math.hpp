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

#if defined(__CUDA_ARCH__)
/// 2^y and 1/y with the SFU's approximate instructions, denormal results
/// flushed to zero (`ex2.approx.ftz.f32`, `rcp.approx.ftz.f32`: 2 ulp). One
/// instruction each, where `__expf` and `__fdividef` without -ftz add a
/// range check and two multiplies around theirs (the project does not build
/// with fast math); the activations' kernels are bound by instruction issue.
KOKKOS_FORCEINLINE_FUNCTION float exp2_sfu(float y) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  return r;
}
KOKKOS_FORCEINLINE_FUNCTION float recip_sfu(float y) {
  float r;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(y));
  return r;
}
#endif

/// exp of a float for the host's elementwise kernels: 2^k e^r with k the
/// nearest integer to y log2(e) (rounded by adding 1.5 x 2^23), r reduced
/// with ln 2 in two parts, e^r by its Taylor polynomial of degree 6, 2^k
/// put into the exponent bits; y clamped to [-87, 88] (no denormals, no
/// infinity). Within 2.4e-7 relative. Device code uses the SFU's exp2 of
/// y log2(e) (within 2 + 1.2 |y| ulp; results below 2^-126 flushed to 0):
/// the activations' kernels are bound by instruction issue, not memory, on
/// an H200 (ncu: 80-85% of the SMs' issue rate, 39-47% of DRAM bandwidth).
KOKKOS_FORCEINLINE_FUNCTION float exp_fast(float y) {
#if defined(__CUDA_ARCH__)
  return exp2_sfu(y * 1.44269504088896340736f);
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

#if defined(__CUDA_ARCH__)
/// The device's normal CDF and density in float, sharing one exp2: with
/// z = |x| / sqrt 2, t = 1 / (1 + 0.3 z) and E = e^{-z^2} = e^{-x^2/2},
/// erfc(z) / 2 = t Q(t) E with Q of degree 8, a fit made for MoKA of
/// erfcx(z) / (2 t) (relative least squares on Chebyshev points of t over
/// z in [0, 9.5], weights iterated towards the minimax: within 2e-8
/// relative of double there, so float rounding dominates), and the
/// density E / sqrt(2 pi). Branch-free (the sign picks h or 1 - h), two
/// SFU instructions (the reciprocal and exp2), relative accuracy kept in
/// the negative tail, where 1 + erf(x / sqrt 2) cancels; E flushes to 0
/// beyond |x| = 13.2 (Phi(-13.2) = 5e-40). In float against double over
/// [-12, 12] (simulated, rounding every operation): x Phi within 3.8e-7,
/// Phi + x phi within 1.8e-7, Phi relative within 1.9e-6 on [-9, -2].
struct NormalTail {
  float h;  ///< Phi(-|x|) = erfc(|x| / sqrt 2) / 2
  float e;  ///< e^{-x^2/2}
};
KOKKOS_FORCEINLINE_FUNCTION NormalTail normal_tail_sfu(float x) {
  const float t = recip_sfu(fmaf(fabsf(x), 0.21213203435596425732f, 1.f));  // 0.3 / sqrt 2
  const float e = exp2_sfu(x * x * -0.72134752044448170368f);                // -log2(e) / 2
  float q       = -0.06473211199045181f;
  q             = fmaf(q, t, 0.24262718856334686f);
  q             = fmaf(q, t, -0.25578996539115906f);
  q             = fmaf(q, t, 0.2734178602695465f);
  q             = fmaf(q, t, -0.04698255658149719f);
  q             = fmaf(q, t, 0.10729668289422989f);
  q             = fmaf(q, t, 0.07421884685754776f);
  q             = fmaf(q, t, 0.08534948527812958f);
  q             = fmaf(q, t, 0.08459457010030746f);
  return {t * q * e, e};
}
#endif

/// The standard normal CDF Phi(x) = (1 + erf(x / sqrt 2)) / 2 in float, as
/// the erf GeLU uses it. Host: from erf_fast (within 2.2e-7 absolute; the
/// host's kernels vectorize it). Device: from normal_tail_sfu, about 16
/// instructions without a branch against about 45 for CUDA's erff with its
/// two paths taken by mixed warps, and with relative accuracy in the
/// negative tail (the GPU test checks the device's).
KOKKOS_FORCEINLINE_FUNCTION float normal_cdf_fast(float x) {
#if defined(__CUDA_ARCH__)
  const float h = normal_tail_sfu(x).h;
  return x < 0.f ? h : 1.f - h;
#else
  return 0.5f * (1.f + erf_fast(x * 0.70710678118654752440f));
#endif
}

/// Phi(x) and the density phi(x) = e^{-x^2/2} / sqrt(2 pi) together (the
/// erf GeLU's derivative Phi + x phi): one exp2 for both on the device.
KOKKOS_FORCEINLINE_FUNCTION void normal_cdf_pdf_fast(float x, float& cdf, float& pdf) {
#if defined(__CUDA_ARCH__)
  const NormalTail n = normal_tail_sfu(x);
  cdf                = x < 0.f ? n.h : 1.f - n.h;
  pdf                = 0.39894228040143267794f * n.e;
#else
  cdf = normal_cdf_fast(x);
  pdf = 0.39894228040143267794f * exp_fast(-0.5f * x * x);
#endif
}

/// Phi and exp as the activations use them: the fast forms for float, the
/// library's for double (the reference precision).
KOKKOS_FORCEINLINE_FUNCTION float act_cdf(float x) { return normal_cdf_fast(x); }
KOKKOS_FORCEINLINE_FUNCTION double act_cdf(double x) { return 0.5 * (1 + erf(x * 0.70710678118654752440)); }
KOKKOS_FORCEINLINE_FUNCTION void act_cdf_pdf(float x, float& cdf, float& pdf) { normal_cdf_pdf_fast(x, cdf, pdf); }
KOKKOS_FORCEINLINE_FUNCTION void act_cdf_pdf(double x, double& cdf, double& pdf) {
  cdf = act_cdf(x);
  pdf = 0.39894228040143267794 * exp(-0.5 * x * x);
}
KOKKOS_FORCEINLINE_FUNCTION float act_exp(float x) { return exp_fast(x); }
KOKKOS_FORCEINLINE_FUNCTION double act_exp(double x) { return exp(x); }
/// 1 / y for y >= 1 (the sigmoid's denominator): on the device the SFU's
/// reciprocal (2 ulp; 0 for y beyond 2^126, where the sigmoid is 0 to
/// float precision anyway) instead of IEEE division's sequence.
KOKKOS_FORCEINLINE_FUNCTION float act_recip(float y) {
#if defined(__CUDA_ARCH__)
  return recip_sfu(y);
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
/// warp reads 32 consecutive columns and a block has 128 threads. Arrays
/// of fewer than 128 columns (a token's k choices or E experts) get tiles
/// of several rows, still 128 threads: one-row tiles left all but n of a
/// block's threads idle (H200, ncu: D's pad_slot_rows over 32768 x 2 slots
/// took 23 us, 3.5 us in 64 x 2 tiles).
template <class Exec>
RowMajor2D<Exec> row_major_2d(const Exec& space, long m, long n) {
#ifdef KOKKOS_ENABLE_CUDA
  if (std::is_same<Exec, Kokkos::Cuda>::value) {
    long tn = 128;
    if (n < 128)
      for (tn = 1; tn < n;) tn *= 2;
    return RowMajor2D<Exec>(space, {0, 0}, {m, n}, {128 / tn, tn});
  }
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
