// cuBLAS behind moka::impl::gemm_bf16_*: one handle per device, bound to the
// stream of the execution-space instance of each call.
#include <moka/Error.hpp>
#include <moka/impl/CublasGemm.hpp>

#ifdef KOKKOS_ENABLE_CUDA
#include <cublas_v2.h>

#include <mutex>
#include <string>
#include <vector>

namespace moka {
namespace impl {

namespace {
cublasHandle_t handle_for(int device) {
  static std::mutex mutex;
  static std::vector<cublasHandle_t> handles;
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= static_cast<int>(handles.size())) handles.resize(device + 1, nullptr);
  if (!handles[device]) {
    if (cublasCreate(&handles[device]) != CUBLAS_STATUS_SUCCESS)
      throw Error("moka::impl::cublas: cublasCreate failed on device " + std::to_string(device));
  }
  return handles[device];
}

void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw Error(std::string("moka::impl::cublas: ") + what + " failed with status " + std::to_string(int(s)));
}

void gemm(const Kokkos::Cuda& space, bool ta, bool tb, int m, int n, int k, float alpha, const void* A, int lda,
          const void* B, int ldb, float beta, void* C, cudaDataType ctype, int ldc) {
  if (m == 0 || n == 0) return;
  cublasHandle_t h = handle_for(space.cuda_device());
  check(cublasSetStream(h, space.cuda_stream()), "cublasSetStream");
  // Row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T.
  check(cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, &alpha, B,
                     CUDA_R_16BF, ldb, A, CUDA_R_16BF, lda, &beta, C, ctype, ldc, CUBLAS_COMPUTE_32F,
                     CUBLAS_GEMM_DEFAULT),
        "cublasGemmEx");
}
}  // namespace

void gemm_bf16_f32(const Kokkos::Cuda& space, bool ta, bool tb, int m, int n, int k, float alpha, const bf16* A,
                   int lda, const bf16* B, int ldb, float beta, float* C, int ldc) {
  gemm(space, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, CUDA_R_32F, ldc);
}

void gemm_bf16_bf16(const Kokkos::Cuda& space, bool ta, bool tb, int m, int n, int k, float alpha, const bf16* A,
                    int lda, const bf16* B, int ldb, float beta, bf16* C, int ldc) {
  gemm(space, ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, CUDA_R_16BF, ldc);
}

}  // namespace impl
}  // namespace moka
#endif
