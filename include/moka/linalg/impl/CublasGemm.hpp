#pragma once
/// \file CublasGemm.hpp
/// \brief The cuBLAS backend of MoKA's GEMMs (CUDA builds only): bf16
/// operands with fp32 accumulation, or fp32 / fp64 throughout, on the stream
/// of an execution space instance; plain GEMMs through cuBLAS, GEMMs with a
/// fused bias and GELU (or the GELU's gradient) through cuBLASLt epilogues.
/// Row-major views of the caller are mapped onto cuBLAS's column-major
/// convention here, so no caller sees cuBLAS types.

#include <moka/core/BFloat16.hpp>

#include <Kokkos_Core.hpp>

#include <cstddef>
#include <vector>

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

/// \brief Row-major C_i[m, n] = alpha op(A_i) op(B_i) + beta C_i for i <
/// count, all of one shape, A_i = A + i stride_a (elements; likewise B, C),
/// in one cublasGemmStridedBatchedEx: A_i, B_i bf16, C_i fp32 (\p c_f32) or
/// bf16, fp32 accumulation. lda/ldb/ldc are row strides (elements).
void gemm_bf16_batched(const Kokkos::Cuda& space, bool trans_a, bool trans_b, int m, int n, int k, float alpha,
                       const bf16* A, int lda, long long stride_a, const bf16* B, int ldb, long long stride_b,
                       float beta, void* C, bool c_f32, int ldc, long long stride_c, int count);

/// \brief Row-major C_i[m_i, n_i] = alpha op(A_i) op(B_i) + beta C_i for
/// i < count, in one cublasGemmGroupedBatchedEx (each problem a group of
/// one): A_i, B_i bf16, C_i fp32 (\p c_f32) or bf16, fp32 accumulation; the
/// same transposes and row strides for all. \p m, \p n, \p k are host
/// arrays of \p count; \p ptrs a device array of 3 count pointers (A_0 ..,
/// B_0 .., C_0 ..) written before on \p space's stream. Problems with a zero
/// dimension are allowed (C_i = beta C_i when k_i = 0). Returns false, having
/// queued nothing, when cuBLAS does not offer the type combination (the
/// caller loops over the problems instead); throws moka::Error on any
/// other failure.
bool gemm_bf16_grouped(const Kokkos::Cuda& space, bool trans_a, bool trans_b, int count, const int* m, const int* n,
                       const int* k, float alpha, const void* const* ptrs, int lda, int ldb, float beta, bool c_f32,
                       int ldc);

/// \brief Row-major fp32 or fp64 C[m,n] = alpha op(A) op(B) + beta C at full
/// precision (CUBLAS_COMPUTE_32F / 64F: no TF32), on the instance's stream.
void gemm_real(const Kokkos::Cuda& space, bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* A,
               int lda, const float* B, int ldb, float beta, float* C, int ldc);
void gemm_real(const Kokkos::Cuda& space, bool trans_a, bool trans_b, int m, int n, int k, double alpha,
               const double* A, int lda, const double* B, int ldb, double beta, double* C, int ldc);

/// \brief What a fused GEMM does after the product P = op(A) op(B) (row-major
/// [m, n], fp32 accumulator), with cuBLASLt's GELU (the tanh form,
/// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))).
struct GemmEpilogue {
  /// forward: C = gelu(P + bias), aux = the GELU input P + bias (bf16
  /// [m, aux_ld], aux_ld >= n and a multiple of 8).
  /// backward: C = P * gelu'(aux) with aux as written by the forward. (No
  /// bias gradient: cuBLASLt's DGELU_BGRAD ran 2.8x the plain GEMM's time
  /// on an H100 at 4096 x 8192 x 2048, DGELU 1.24x.)
  bool forward = true;
  const void* bias = nullptr;  ///< forward: bf16 [n], or null for no bias; backward: must be null
  void* aux  = nullptr;
  long aux_ld = 0;
};

/// \brief Row-major C[m,n] (bf16) = the epilogue applied to op(A) op(B)
/// (bf16 operands, fp32 accumulation) through cublasLtMatmul. The algorithm
/// of each shape, epilogue and pointer alignment is looked up once and kept.
/// \p workspace (device memory, \p workspace_bytes) is cuBLASLt's scratch.
/// Throws moka::Error when cuBLASLt fails or offers no algorithm.
void gemm_bf16_epilogue(const Kokkos::Cuda& space, const GemmEpilogue& ep, bool trans_a, bool trans_b, int m, int n,
                        int k, const bf16* A, int lda, const bf16* B, int ldb, bf16* C, int ldc, void* workspace,
                        std::size_t workspace_bytes);

/// \brief Independent GEMMs side by side: \p streams CUDA streams (each
/// with its own cuBLAS handle, made on first use) that fork from an
/// instance's stream and join back into it. Many small expert GEMMs (64
/// experts of 1536 rows fill about half of an H100's SMs one at a time)
/// then overlap. Made once and kept (stream and instance creation is not
/// cheap); destroy it before Kokkos finalizes.
class StreamFan {
 public:
  explicit StreamFan(int streams);
  ~StreamFan();
  StreamFan(const StreamFan&) = delete;
  StreamFan& operator=(const StreamFan&) = delete;
  int size() const { return static_cast<int>(m_instances.size()); }
  /// \brief Every stream of the fan waits for the work queued on \p space so far.
  void fork(const Kokkos::Cuda& space);
  /// \brief The execution-space instance of stream \p i (0 <= i < size()).
  const Kokkos::Cuda& instance(int i) const { return m_instances[static_cast<std::size_t>(i)]; }
  /// \brief Work queued on \p space from now on waits for the fan's work so far.
  void join(const Kokkos::Cuda& space);

 private:
  std::vector<void*> m_streams, m_events;  // cudaStream_t, cudaEvent_t
  void* m_fork_event = nullptr;
  std::vector<Kokkos::Cuda> m_instances;
};

}  // namespace impl
}  // namespace moka
#endif
