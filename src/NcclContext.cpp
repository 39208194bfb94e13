#include <moka/Error.hpp>
#include <moka/NcclContext.hpp>

#ifdef MOKA_HAVE_NCCL
#include <nccl.h>
#endif

namespace moka {

#ifdef MOKA_HAVE_NCCL

namespace {
void check_nccl(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) {
    throw Error(std::string("moka::NcclContext: ") + what + " failed: " + ncclGetErrorString(r));
  }
}
}  // namespace

struct NcclContext::Impl {
  ncclComm_t comm = nullptr;
  int rank = 0;
  int size = 1;
};

NcclContext::NcclContext(MPI_Comm comm) : m_impl(std::make_unique<Impl>()) {
  MPI_Comm_rank(comm, &m_impl->rank);
  MPI_Comm_size(comm, &m_impl->size);
  ncclUniqueId id;
  int ok = 1;
  if (m_impl->rank == 0) ok = ncclGetUniqueId(&id) == ncclSuccess ? 1 : 0;
  MPI_Bcast(&ok, 1, MPI_INT, 0, comm);
  if (!ok) throw Error("moka::NcclContext: ncclGetUniqueId failed on rank 0");
  MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, comm);
  // Kokkos has already made its device current on this thread.
  check_nccl(ncclCommInitRank(&m_impl->comm, m_impl->size, id, m_impl->rank), "ncclCommInitRank");
}

NcclContext::~NcclContext() {
  if (m_impl && m_impl->comm) ncclCommDestroy(m_impl->comm);
}

int NcclContext::rank() const { return m_impl->rank; }
int NcclContext::size() const { return m_impl->size; }

std::string NcclContext::version() const {
  int v = 0;
  ncclGetVersion(&v);
  // NCCL >= 2.9 encodes major*10000 + minor*100 + patch.
  return std::to_string(v / 10000) + "." + std::to_string((v / 100) % 100) + "." + std::to_string(v % 100);
}

void NcclContext::allreduce_sum(const Kokkos::Cuda& space,
                                const Kokkos::View<float*, Kokkos::CudaSpace>& data) const {
  check_nccl(ncclAllReduce(data.data(), data.data(), data.extent(0), ncclFloat, ncclSum, m_impl->comm,
                           space.cuda_stream()),
             "ncclAllReduce");
}

#else  // !MOKA_HAVE_NCCL

struct NcclContext::Impl {};

NcclContext::NcclContext(MPI_Comm) {
  throw Error("moka::NcclContext::NcclContext: MoKA was built without NCCL");
}
NcclContext::~NcclContext() = default;
int NcclContext::rank() const { return 0; }
int NcclContext::size() const { return 0; }
std::string NcclContext::version() const { return "not built"; }

#endif

}  // namespace moka
