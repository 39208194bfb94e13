// moka::Communicator: the backend-independent part (host-side control over
// MPI, splitting, the factory). The backends: MpiCommunicator.cpp and, in
// builds with NCCL, NcclCommunicator.cpp.
#include "CommImpl.hpp"

#include <moka/core/Profiling.hpp>

namespace moka {

using comm_impl::check_mpi;

std::string to_string(CommBackend b) { return b == CommBackend::nccl ? "nccl" : "mpi"; }

std::size_t size_of(DataType t) {
  switch (t) {
    case DataType::f32: return 4;
    case DataType::f64: return 8;
    case DataType::bf16: return 2;
    case DataType::i32: return 4;
    case DataType::i64: return 8;
  }
  return 1;
}

Communicator::Communicator(MPI_Comm comm) : m_comm(comm) {
  MPI_Comm_rank(comm, &m_rank);
  MPI_Comm_size(comm, &m_size);
}

SymmetricWindow::~SymmetricWindow() = default;

std::unique_ptr<SymmetricWindow> Communicator::make_window(std::size_t) {
  throw Error("moka::Communicator (" + to_string(backend()) +
              "): symmetric windows need the NCCL backend, NCCL 2.28 or later and GPUs that reach each other's "
              "memory (windows_usable() is false)");
}

void Communicator::put(const CommStream&, const SymmetricWindow&, const void*, const std::vector<Put>&, DataType) {
  throw Error("moka::Communicator (" + to_string(backend()) +
              ")::put: symmetric windows are not usable over this communicator");
}

Communicator::~Communicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && m_comm != MPI_COMM_NULL) MPI_Comm_free(&m_comm);
}

void Communicator::alltoall_counts(const long* send, long* recv, int n) const {
  check_mpi(MPI_Alltoall(send, n, MPI_LONG, recv, n, MPI_LONG, m_comm), "MPI_Alltoall (counts)");
}
void Communicator::allgather_counts(const long* mine, long* recv, int n) const {
  check_mpi(MPI_Allgather(mine, n, MPI_LONG, recv, n, MPI_LONG, m_comm), "MPI_Allgather (counts)");
}
void Communicator::allreduce_host(double* data, int n) const {
  check_mpi(MPI_Allreduce(MPI_IN_PLACE, data, n, MPI_DOUBLE, MPI_SUM, m_comm), "MPI_Allreduce (host)");
}
void Communicator::allreduce_host(long* data, int n) const {
  check_mpi(MPI_Allreduce(MPI_IN_PLACE, data, n, MPI_LONG, MPI_SUM, m_comm), "MPI_Allreduce (host)");
}
void Communicator::exscan_host(const long* mine, long* out, int n) const {
  check_mpi(MPI_Exscan(mine, out, n, MPI_LONG, MPI_SUM, m_comm), "MPI_Exscan");
  if (m_rank == 0)
    for (int i = 0; i < n; ++i) out[i] = 0;  // MPI leaves rank 0's result undefined
}


std::unique_ptr<Communicator> Communicator::split(int color, int key) const {
  MPI_Comm sub;
  check_mpi(MPI_Comm_split(m_comm, color, key, &sub), "MPI_Comm_split");
  return make_on(sub);
}

CommBackend comm_backend_from_string(const std::string& s) {
  if (s == "mpi") return CommBackend::mpi;
  if (s == "nccl") return CommBackend::nccl;
  if (s == "auto") {
#ifdef MOKA_HAVE_NCCL
    return CommBackend::nccl;
#else
    return CommBackend::mpi;
#endif
  }
  throw Error("unknown communication backend '" + s + "' (expected mpi, nccl or auto)");
}

#ifndef MOKA_HAVE_NCCL
bool nccl_usable(MPI_Comm) { return false; }
#endif

std::unique_ptr<Communicator> make_communicator(MPI_Comm comm, CommBackend backend) {
  MPI_Comm dup;
  check_mpi(MPI_Comm_dup(comm, &dup), "MPI_Comm_dup");
  if (backend == CommBackend::mpi) return comm_impl::make_mpi_communicator(dup);
#ifdef MOKA_HAVE_NCCL
  return comm_impl::make_nccl_communicator(dup);
#else
  MPI_Comm_free(&dup);
  throw Error("comm.backend = nccl: MoKA was built without NCCL (use comm.backend = mpi)");
#endif
}


}  // namespace moka
