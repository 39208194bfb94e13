// cuBLAS and cuBLASLt behind moka::impl::gemm_*: one handle of each per
// device, bound to the stream of the execution-space instance of each call.
#include <moka/core/Error.hpp>
#include <moka/linalg/impl/CublasGemm.hpp>

#ifdef KOKKOS_ENABLE_CUDA
#include <cublasLt.h>
#include <cublas_v2.h>

#include <array>
#include <cuda_runtime_api.h>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace moka {
namespace impl {

namespace {
/// One library handle per device and stream slot (0: every stream but a
/// StreamFan's; 1, 2, ...: the fan's streams, which run at the same time and
/// so must not share a handle's workspace), made on first use (cublasCreate
/// or cublasLtCreate) and kept until Kokkos finalizes: a hook destroys them
/// while the device is still up (kept to the process's end, each handle's
/// workspace showed as a leak in compute-sanitizer's memcheck).
template <class Handle, class Create, class Destroy>
Handle handle_for(int device, Create create, Destroy destroy, const char* what, int slot = 0) {
  static std::mutex mutex;
  static std::map<std::pair<int, int>, Handle> handles;
  static bool hooked = false;
  std::lock_guard<std::mutex> lock(mutex);
  Handle& h = handles[{device, slot}];
  if (!h) {
    if (create(&h) != CUBLAS_STATUS_SUCCESS)
      throw Error(std::string("moka::impl::cublas: ") + what + " failed on device " + std::to_string(device));
    if (!hooked) {
      hooked = true;
      Kokkos::push_finalize_hook([destroy]() {
        std::lock_guard<std::mutex> l(mutex);
        for (auto& kv : handles)
          if (kv.second) destroy(kv.second);
        handles.clear();
        hooked = false;
      });
    }
  }
  return h;
}

/// The handle slot of a stream: a StreamFan's streams are registered here.
std::mutex g_fan_mutex;
std::map<cudaStream_t, int> g_fan_slot;
int slot_of(cudaStream_t s) {
  std::lock_guard<std::mutex> lock(g_fan_mutex);
  const auto it = g_fan_slot.find(s);
  return it == g_fan_slot.end() ? 0 : it->second;
}

void check_cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw Error(std::string("moka::impl::StreamFan: ") + what + " failed: " + cudaGetErrorString(e));
}

void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw Error(std::string("moka::impl::cublas: ") + what + " failed with status " + std::to_string(int(s)));
}

/// Row-major C = alpha op(A) op(B) + beta C through cublasGemmEx on the
/// instance's stream; alpha and beta point to scalars of the compute type.
void gemm(const Kokkos::Cuda& space, bool ta, bool tb, int m, int n, int k, const void* alpha, const void* A, int lda,
          const void* B, int ldb, const void* beta, void* C, int ldc, cudaDataType ab_type, cudaDataType c_type,
          cublasComputeType_t compute) {
  if (m == 0 || n == 0) return;
  cublasHandle_t h = handle_for<cublasHandle_t>(space.cuda_device(), cublasCreate, cublasDestroy, "cublasCreate",
                                                slot_of(space.cuda_stream()));
  check(cublasSetStream(h, space.cuda_stream()), "cublasSetStream");
  // Row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T.
  check(cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, alpha, B, ab_type,
                     ldb, A, ab_type, lda, beta, C, c_type, ldc, compute, CUBLAS_GEMM_DEFAULT),
        "cublasGemmEx");
}
/// Largest power of two up to 256 dividing the address (cuBLASLt's
/// heuristic assumes 256-byte alignment unless told otherwise).
std::uint32_t alignment_of(const void* p) {
  const auto a = reinterpret_cast<std::uintptr_t>(p);
  std::uint32_t al = 256;
  while (al > 1 && a % al != 0) al /= 2;
  return al;
}

/// cuBLASLt descriptors, destroyed with the object (after cublasLtMatmul
/// has been enqueued: it reads them at the call).
struct LtDescriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  ~LtDescriptors() {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    if (d) cublasLtMatrixLayoutDestroy(d);
    if (b) cublasLtMatrixLayoutDestroy(b);
    if (a) cublasLtMatrixLayoutDestroy(a);
    if (op) cublasLtMatmulDescDestroy(op);
  }
};

template <class T>
void set_desc(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const T& value, const char* what) {
  check(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(T)), what);
}

cublasLtEpilogue_t epilogue_of(const GemmEpilogue& ep) {
  const bool bias = ep.bias != nullptr;
  if (!ep.forward && bias) throw Error("moka::impl::gemm_bf16_epilogue: no bias gradient in the backward epilogue");
  if (ep.forward) return bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
  return CUBLASLT_EPILOGUE_DGELU;
}
}  // namespace

void gemm_bf16_epilogue(const Kokkos::Cuda& space, const GemmEpilogue& ep, bool ta, bool tb, int m, int n, int k,
                        const bf16* A, int lda, const bf16* B, int ldb, bf16* C, int ldc, void* workspace,
                        std::size_t workspace_bytes) {
  if (m == 0 || n == 0) return;
  const int device = space.cuda_device();
  cublasLtHandle_t h = handle_for<cublasLtHandle_t>(device, cublasLtCreate, cublasLtDestroy, "cublasLtCreate");
  // cuBLASLt wants its workspace 256-byte aligned (a Kokkos allocation is
  // 128-byte aligned: status 7, invalid value, otherwise).
  {
    const auto p = reinterpret_cast<std::uintptr_t>(workspace), q = (p + 255) / 256 * 256;
    const std::size_t skip = static_cast<std::size_t>(q - p);
    workspace       = skip < workspace_bytes ? reinterpret_cast<void*>(q) : nullptr;
    workspace_bytes = skip < workspace_bytes ? workspace_bytes - skip : 0;
  }
  // Row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T: the
  // bias runs along C^T's rows (C's columns), the aux matrix is [m, aux_ld]
  // row-major, i.e. column-major with leading dimension aux_ld.
  LtDescriptors L;
  check(cublasLtMatmulDescCreate(&L.op, CUBLAS_COMPUTE_32F, CUDA_R_32F), "cublasLtMatmulDescCreate");
  const cublasOperation_t opa = tb ? CUBLAS_OP_T : CUBLAS_OP_N, opb = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  set_desc(L.op, CUBLASLT_MATMUL_DESC_TRANSA, opa, "set TRANSA");
  set_desc(L.op, CUBLASLT_MATMUL_DESC_TRANSB, opb, "set TRANSB");
  const cublasLtEpilogue_t epi = epilogue_of(ep);
  set_desc(L.op, CUBLASLT_MATMUL_DESC_EPILOGUE, epi, "set EPILOGUE");
  if (ep.bias) set_desc(L.op, CUBLASLT_MATMUL_DESC_BIAS_POINTER, ep.bias, "set BIAS_POINTER");
  set_desc(L.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, ep.aux, "set EPILOGUE_AUX_POINTER");
  const std::int64_t aux_ld = ep.aux_ld;
  set_desc(L.op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, aux_ld, "set EPILOGUE_AUX_LD");
  check(cublasLtMatrixLayoutCreate(&L.a, CUDA_R_16BF, tb ? k : n, tb ? n : k, ldb), "cublasLtMatrixLayoutCreate A");
  check(cublasLtMatrixLayoutCreate(&L.b, CUDA_R_16BF, ta ? m : k, ta ? k : m, lda), "cublasLtMatrixLayoutCreate B");
  check(cublasLtMatrixLayoutCreate(&L.d, CUDA_R_16BF, n, m, ldc), "cublasLtMatrixLayoutCreate D");

  // The algorithm of this problem: looked up once per shape, epilogue and
  // alignment (the heuristic costs host time; the expert row counts change
  // every step, so the table is bounded).
  const std::array<long, 17> key = {device, m, n, k, ta, tb, lda, ldb, ldc, long(epi), ep.aux_ld,
                                    alignment_of(A), alignment_of(B), alignment_of(C), alignment_of(ep.bias),
                                    alignment_of(ep.aux), long(workspace_bytes)};
  static std::mutex mutex;
  static std::map<std::array<long, 17>, cublasLtMatmulAlgo_t> algos;
  cublasLtMatmulAlgo_t algo;
  bool found = false;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = algos.find(key);
    if (it != algos.end()) {
      algo  = it->second;
      found = true;
    }
  }
  if (!found) {
    check(cublasLtMatmulPreferenceCreate(&L.pref), "cublasLtMatmulPreferenceCreate");
    const std::uint64_t ws = workspace_bytes;
    check(cublasLtMatmulPreferenceSetAttribute(L.pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
          "set MAX_WORKSPACE_BYTES");
    const std::uint32_t al_a = alignment_of(B), al_b = alignment_of(A), al_d = alignment_of(C);
    check(cublasLtMatmulPreferenceSetAttribute(L.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, 4),
          "set MIN_ALIGNMENT_A_BYTES");
    check(cublasLtMatmulPreferenceSetAttribute(L.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, 4),
          "set MIN_ALIGNMENT_B_BYTES");
    check(cublasLtMatmulPreferenceSetAttribute(L.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_d, 4),
          "set MIN_ALIGNMENT_C_BYTES");
    check(cublasLtMatmulPreferenceSetAttribute(L.pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_d, 4),
          "set MIN_ALIGNMENT_D_BYTES");
    cublasLtMatmulHeuristicResult_t result{};
    int returned = 0;
    check(cublasLtMatmulAlgoGetHeuristic(h, L.op, L.a, L.b, L.d, L.d, L.pref, 1, &result, &returned),
          "cublasLtMatmulAlgoGetHeuristic");
    if (returned == 0)
      throw Error("moka::impl::cublas: cuBLASLt has no algorithm for a bf16 GEMM with epilogue " +
                  std::to_string(int(epi)) + " (m=" + std::to_string(m) + ", n=" + std::to_string(n) +
                  ", k=" + std::to_string(k) + "); set expert.gemm_epilogue = false");
    algo = result.algo;
    std::lock_guard<std::mutex> lock(mutex);
    if (algos.size() >= 4096) algos.clear();
    algos.emplace(key, algo);
  }
  const float alpha = 1.f, beta = 0.f;
  const cublasStatus_t st = cublasLtMatmul(h, L.op, &alpha, B, L.a, A, L.b, &beta, C, L.d, C, L.d, &algo, workspace,
                                           workspace_bytes, space.cuda_stream());
  if (st != CUBLAS_STATUS_SUCCESS)
    throw Error("moka::impl::cublas: cublasLtMatmul failed with status " + std::to_string(int(st)) + " (epilogue " +
                std::to_string(int(epi)) + ", m=" + std::to_string(m) + ", n=" + std::to_string(n) + ", k=" +
                std::to_string(k) + ", ta=" + std::to_string(ta) + ", tb=" + std::to_string(tb) + ", lda=" +
                std::to_string(lda) + ", ldb=" + std::to_string(ldb) + ", ldc=" + std::to_string(ldc) + ", aux_ld=" +
                std::to_string(ep.aux_ld) + ", alignments A " + std::to_string(alignment_of(A)) + " B " +
                std::to_string(alignment_of(B)) + " C " + std::to_string(alignment_of(C)) + " bias " +
                std::to_string(alignment_of(ep.bias)) + " aux " + std::to_string(alignment_of(ep.aux)) +
                ", workspace " + std::to_string(workspace_bytes) + " bytes at " +
                std::to_string(reinterpret_cast<std::uintptr_t>(workspace)) + (found ? ", cached algorithm" : "") +
                ")");
}

void gemm_bf16_f32(const Kokkos::Cuda& space, bool ta, bool tb, int m, int n, int k, float alpha, const bf16* A,
                   int lda, const bf16* B, int ldb, float beta, float* C, int ldc) {
  gemm(space, ta, tb, m, n, k, &alpha, A, lda, B, ldb, &beta, C, ldc, CUDA_R_16BF, CUDA_R_32F, CUBLAS_COMPUTE_32F);
}

void gemm_bf16_bf16(const Kokkos::Cuda& space, bool ta, bool tb, int m, int n, int k, float alpha, const bf16* A,
                    int lda, const bf16* B, int ldb, float beta, bf16* C, int ldc) {
  gemm(space, ta, tb, m, n, k, &alpha, A, lda, B, ldb, &beta, C, ldc, CUDA_R_16BF, CUDA_R_16BF, CUBLAS_COMPUTE_32F);
}

void gemm_bf16_batched(const Kokkos::Cuda& space, bool ta, bool tb, int m, int n, int k, float alpha, const bf16* A,
                       int lda, long long stride_a, const bf16* B, int ldb, long long stride_b, float beta, void* C,
                       bool c_f32, int ldc, long long stride_c, int count) {
  if (m == 0 || n == 0 || count == 0) return;
  cublasHandle_t h = handle_for<cublasHandle_t>(space.cuda_device(), cublasCreate, cublasDestroy, "cublasCreate",
                                                slot_of(space.cuda_stream()));
  check(cublasSetStream(h, space.cuda_stream()), "cublasSetStream");
  check(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
  // Row-major C_i = op(A_i) op(B_i)  <=>  column-major C_i^T = op(B_i)^T op(A_i)^T.
  check(cublasGemmStridedBatchedEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, n, m, k, &alpha,
                                   B, CUDA_R_16BF, ldb, stride_b, A, CUDA_R_16BF, lda, stride_a, &beta, C,
                                   c_f32 ? CUDA_R_32F : CUDA_R_16BF, ldc, stride_c, count, CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT),
        "cublasGemmStridedBatchedEx");
}

bool gemm_bf16_grouped(const Kokkos::Cuda& space, bool ta, bool tb, int count, const int* m, const int* n,
                       const int* k, float alpha, const void* const* ptrs, int lda, int ldb, float beta, bool c_f32,
                       int ldc) {
  if (count == 0) return true;
  cublasHandle_t h = handle_for<cublasHandle_t>(space.cuda_device(), cublasCreate, cublasDestroy, "cublasCreate",
                                                slot_of(space.cuda_stream()));
  check(cublasSetStream(h, space.cuda_stream()), "cublasSetStream");
  check(cublasSetPointerMode(h, CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
  // Row-major C_i = op(A_i) op(B_i)  <=>  column-major C_i^T = op(B_i)^T op(A_i)^T:
  // cuBLAS's A array is ours B (ptrs + count), its B array ours A (ptrs).
  const std::vector<cublasOperation_t> opa(count, tb ? CUBLAS_OP_T : CUBLAS_OP_N),
      opb(count, ta ? CUBLAS_OP_T : CUBLAS_OP_N);
  const std::vector<float> alphas(count, alpha), betas(count, beta);
  const std::vector<int> ldas(count, ldb), ldbs(count, lda), ldcs(count, ldc), ones(count, 1);
  const cublasStatus_t st = cublasGemmGroupedBatchedEx(
      h, opa.data(), opb.data(), n, m, k, alphas.data(), ptrs + count, CUDA_R_16BF, ldas.data(), ptrs, CUDA_R_16BF,
      ldbs.data(), betas.data(), const_cast<void* const*>(ptrs + 2 * count), c_f32 ? CUDA_R_32F : CUDA_R_16BF,
      ldcs.data(), count, ones.data(), CUBLAS_COMPUTE_32F);
  if (st == CUBLAS_STATUS_NOT_SUPPORTED) return false;
  check(st, c_f32 ? "cublasGemmGroupedBatchedEx (bf16 x bf16 -> fp32)" : "cublasGemmGroupedBatchedEx (bf16 -> bf16)");
  return true;
}

void gemm_real(const Kokkos::Cuda& space, bool ta, bool tb, int m, int n, int k, float alpha, const float* A, int lda,
               const float* B, int ldb, float beta, float* C, int ldc) {
  gemm(space, ta, tb, m, n, k, &alpha, A, lda, B, ldb, &beta, C, ldc, CUDA_R_32F, CUDA_R_32F, CUBLAS_COMPUTE_32F);
}

void gemm_real(const Kokkos::Cuda& space, bool ta, bool tb, int m, int n, int k, double alpha, const double* A,
               int lda, const double* B, int ldb, double beta, double* C, int ldc) {
  gemm(space, ta, tb, m, n, k, &alpha, A, lda, B, ldb, &beta, C, ldc, CUDA_R_64F, CUDA_R_64F, CUBLAS_COMPUTE_64F);
}

StreamFan::StreamFan(int streams) {
  MOKA_REQUIRE(streams >= 1, "moka::impl::StreamFan: ", streams, " streams");
  check_cuda(cudaEventCreateWithFlags(reinterpret_cast<cudaEvent_t*>(&m_fork_event), cudaEventDisableTiming),
             "cudaEventCreate");
  for (int i = 0; i < streams; ++i) {
    cudaStream_t st = nullptr;
    cudaEvent_t ev  = nullptr;
    check_cuda(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "cudaStreamCreate");
    check_cuda(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreate");
    m_streams.push_back(st);
    m_events.push_back(ev);
    {
      std::lock_guard<std::mutex> lock(g_fan_mutex);
      // Stream i of every fan uses handle slot i + 1: fans fork from and
      // join into the stream they are given, so two fans' stream i never
      // run at once unless their callers' streams do.
      g_fan_slot[st] = i + 1;
    }
    m_instances.emplace_back(st);
  }
}

StreamFan::~StreamFan() {
  m_instances.clear();  // the instances before their streams
  for (std::size_t i = 0; i < m_streams.size(); ++i) {
    auto st = static_cast<cudaStream_t>(m_streams[i]);
    cudaStreamSynchronize(st);
    {
      std::lock_guard<std::mutex> lock(g_fan_mutex);
      g_fan_slot.erase(st);
    }
    cudaEventDestroy(static_cast<cudaEvent_t>(m_events[i]));
    cudaStreamDestroy(st);
  }
  if (m_fork_event) cudaEventDestroy(static_cast<cudaEvent_t>(m_fork_event));
}

void StreamFan::fork(const Kokkos::Cuda& space) {
  auto ev = static_cast<cudaEvent_t>(m_fork_event);
  check_cuda(cudaEventRecord(ev, space.cuda_stream()), "cudaEventRecord");
  for (void* st : m_streams) check_cuda(cudaStreamWaitEvent(static_cast<cudaStream_t>(st), ev, 0), "cudaStreamWaitEvent");
}

void StreamFan::join(const Kokkos::Cuda& space) {
  for (std::size_t i = 0; i < m_streams.size(); ++i) {
    auto ev = static_cast<cudaEvent_t>(m_events[i]);
    check_cuda(cudaEventRecord(ev, static_cast<cudaStream_t>(m_streams[i])), "cudaEventRecord");
    check_cuda(cudaStreamWaitEvent(space.cuda_stream(), ev, 0), "cudaStreamWaitEvent");
  }
}

}  // namespace impl
}  // namespace moka
#endif
