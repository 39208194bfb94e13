#pragma once
/// \file Gemm.hpp
/// \brief Dense matrix products behind one interface: cuBLAS on the
/// instance's stream for device Views of a CUDA build, Kokkos Kernels
/// elsewhere. Internal (moka::impl): the layers above call it.

#include <moka/core/Core.hpp>
#include <moka/core/impl/Math.hpp>
#include <moka/linalg/impl/CublasGemm.hpp>

#include <KokkosBlas1_scal.hpp>
#include <KokkosBlas3_gemm.hpp>

#include <algorithm>
#include <type_traits>

namespace moka {
namespace impl {

/// C = alpha op(A) op(B) + beta C through Kokkos Kernels (cuBLAS on CUDA).
/// Skips empty products (an expert with no rows), where beta still applies.
/// \note Kokkos Kernels 3.4's gemm has no execution-space argument: it runs
/// on the default instance; the overload below takes the caller's.
template <class S, class M>
void gemm(const char* ta, const char* tb, S alpha, const mat<S, M>& A, const mat<S, M>& B, S beta,
          const mat<S, M>& C) {
  if (C.extent(0) == 0 || C.extent(1) == 0) return;
  const std::size_t inner = (ta[0] == 'N') ? A.extent(1) : A.extent(0);
  if (inner == 0) {
    if (beta == S(0)) Kokkos::deep_copy(C, S(0));
    else if (beta != S(1)) KokkosBlas::scal(C, beta, C);
    return;
  }
  KokkosBlas::gemm(ta, tb, alpha, A, B, beta, C);
}

/// The same on \p space: device views of a CUDA build go to cuBLAS on the
/// instance's stream (fp32 / fp64 compute, no fence); the rest to Kokkos
/// Kernels above, with the fences its missing instance argument needs.
template <class Exec, class S, class M>
void gemm(const Exec& space, const char* ta, const char* tb, S alpha, const mat<S, M>& A, const mat<S, M>& B, S beta,
          const mat<S, M>& C) {
#ifdef KOKKOS_ENABLE_CUDA
  if constexpr (std::is_same<Exec, Kokkos::Cuda>::value && std::is_same<M, Kokkos::CudaSpace>::value &&
                (std::is_same<S, float>::value || std::is_same<S, double>::value)) {
    if (C.extent(0) == 0 || C.extent(1) == 0) return;
    const bool at = ta[0] == 'T', bt = tb[0] == 'T';
    const long inner = static_cast<long>(at ? A.extent(0) : A.extent(1));
    if (inner == 0) {  // an expert with no rows: C = beta C
      const long n = static_cast<long>(C.extent(1));
      Kokkos::parallel_for(
          "moka::gemm_scale", Kokkos::RangePolicy<Exec>(space, 0, long(C.extent(0)) * n), KOKKOS_LAMBDA(long i) {
            C(i / n, i % n) = beta == S(0) ? S(0) : beta * C(i / n, i % n);
          });
      return;
    }
    auto ld = [](const mat<S, M>& v) { return static_cast<int>(std::max<std::size_t>(v.stride(0), v.extent(1))); };
    gemm_real(space, at, bt, static_cast<int>(C.extent(0)), static_cast<int>(C.extent(1)), static_cast<int>(inner),
              alpha, A.data(), ld(A), B.data(), ld(B), beta, C.data(), ld(C));
    return;
  }
#endif
  space.fence();
  gemm(ta, tb, alpha, A, B, beta, C);
  Exec().fence();
}

}  // namespace impl
}  // namespace moka
