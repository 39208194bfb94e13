#pragma once
/// \file CublasGemm.hpp
/// \brief The cuBLAS backend of MoKA's GEMMs (CUDA builds only): bf16
/// operands, fp32 accumulation and output, on the stream of an execution
/// space instance. Row-major views of the caller are mapped onto cuBLAS's
/// column-major convention here, so no caller sees cuBLAS types.

#include <moka/BFloat16.hpp>

#include <Kokkos_Core.hpp>

#ifdef KOKKOS_ENABLE_CUDA
namespace moka {
namespace impl {

/// \brief Row-major C[m,n] = alpha op(A) op(B) + beta C with A, B bf16 and C
/// fp32 (CUBLAS_COMPUTE_32F). lda/ldb/ldc are row strides (elements).
/// Throws moka::Error on a cuBLAS failure.
void gemm_bf16_f32(const Kokkos::Cuda& space, bool trans_a, bool trans_b, int m, int n, int k, float alpha,
                   const bf16* A, int lda, const bf16* B, int ldb, float beta, float* C, int ldc);

/// \brief The same with a bf16 output C (fp32 accumulation, rounded once).
void gemm_bf16_bf16(const Kokkos::Cuda& space, bool trans_a, bool trans_b, int m, int n, int k, float alpha,
                    const bf16* A, int lda, const bf16* B, int ldb, float beta, bf16* C, int ldc);

}  // namespace impl
}  // namespace moka
#endif
