#include <moka/Comm.hpp>
#include <moka/Profiling.hpp>

#ifdef MOKA_HAVE_NCCL
#include <cuda_runtime.h>
#include <nccl.h>
#endif

#include <climits>
#include <cstdlib>
#include <cstring>
#include <exception>

namespace moka {

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

namespace {

void check_mpi(int err, const char* what) {
  if (err == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(err, msg, &len);
  throw Error(std::string("moka::Communicator: ") + what + " failed: " + std::string(msg, len));
}

MPI_Datatype mpi_type(DataType t) {
  switch (t) {
    case DataType::f32: return MPI_FLOAT;
    case DataType::f64: return MPI_DOUBLE;
    case DataType::bf16: return MPI_UINT16_T;  // moved as bits; never reduced over MPI
    case DataType::i32: return MPI_INT;
    case DataType::i64: return MPI_LONG;
  }
  return MPI_BYTE;
}

int to_int(long v, const char* what) {
  MOKA_REQUIRE(v >= 0 && v <= INT_MAX, "moka::Communicator: ", what, " = ", v,
               " elements does not fit MPI's int counts; split the exchange or use comm.backend = nccl");
  return static_cast<int>(v);
}

void require_reducible(DataType t, const char* op) {
  MOKA_REQUIRE(t != DataType::bf16, "moka::Communicator::", op,
               ": bf16 is not reduced by MoKA's communicators (reduce fp32 gradients)");
}

#ifdef KOKKOS_ENABLE_CUDA
using staging_space = Kokkos::CudaHostPinnedSpace;
#else
using staging_space = Kokkos::HostSpace;
#endif
using bytes_host = Kokkos::View<char*, Kokkos::HostSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;

/// Copies \p n bytes between host and device memory (fenced).
void copy_bytes(void* dst, MemoryKind dst_kind, const void* src, MemoryKind src_kind, std::size_t n) {
  if (n == 0) return;
  if (dst_kind == MemoryKind::host && src_kind == MemoryKind::host) {
    std::memcpy(dst, src, n);
    return;
  }
#ifdef KOKKOS_ENABLE_CUDA
  using bytes_dev = Kokkos::View<char*, Kokkos::CudaSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  char* d       = static_cast<char*>(dst);
  char* s       = const_cast<char*>(static_cast<const char*>(src));
  if (dst_kind == MemoryKind::host && src_kind == MemoryKind::device) Kokkos::deep_copy(bytes_host(d, n), bytes_dev(s, n));
  else if (dst_kind == MemoryKind::device && src_kind == MemoryKind::host) Kokkos::deep_copy(bytes_dev(d, n), bytes_host(s, n));
  else Kokkos::deep_copy(bytes_dev(d, n), bytes_dev(s, n));
#else
  (void)dst;
  (void)src;
  throw Error("moka::Communicator: device memory in a build without a device backend");
#endif
}

// ----------------------------------------------------------- MPI backend
class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm) : Communicator(comm) {
    const char* env = std::getenv("MOKA_MPI_CUDA_AWARE");
    m_cuda_aware    = env != nullptr && std::string(env) == "1";
  }
  CommBackend backend() const override { return CommBackend::mpi; }

  void alltoallv(const CommStream& space, const void* send, const std::vector<long>& sc,
                 const std::vector<long>& sd, void* recv, const std::vector<long>& rc, const std::vector<long>& rd,
                 DataType type, MemoryKind mem) override {
    check_counts(sc, sd, rc, rd);
    std::vector<int> isc(m_size), isd(m_size), irc(m_size), ird(m_size);
    long send_end = 0, recv_end = 0;
    for (int p = 0; p < m_size; ++p) {
      isc[p]   = to_int(sc[p], "send count");
      isd[p]   = to_int(sd[p], "send displacement");
      irc[p]   = to_int(rc[p], "receive count");
      ird[p]   = to_int(rd[p], "receive displacement");
      send_end = std::max(send_end, sd[p] + sc[p]);
      recv_end = std::max(recv_end, rd[p] + rc[p]);
    }
    const std::size_t es = size_of(type);
    if (staged(mem)) {
      space.fence();
      char* hs = stage(0, send_end * es);
      char* hr = stage(1, recv_end * es);
      copy_bytes(hs, MemoryKind::host, send, mem, send_end * es);
      check_mpi(MPI_Alltoallv(hs, isc.data(), isd.data(), mpi_type(type), hr, irc.data(), ird.data(), mpi_type(type),
                              m_comm),
                "MPI_Alltoallv");
      copy_bytes(recv, mem, hr, MemoryKind::host, recv_end * es);
      return;
    }
    space.fence();
    check_mpi(MPI_Alltoallv(send, isc.data(), isd.data(), mpi_type(type), recv, irc.data(), ird.data(),
                            mpi_type(type), m_comm),
              "MPI_Alltoallv");
  }

  void alltoallv_blocks(const CommStream& space, const void* send, const std::vector<Block>& sends, void* recv,
                        const std::vector<Block>& recvs, DataType type, MemoryKind mem) override {
    const std::size_t es = size_of(type);
    long send_end = 0, recv_end = 0;
    for (const auto& b : sends) send_end = std::max(send_end, b.offset + b.count);
    for (const auto& b : recvs) recv_end = std::max(recv_end, b.offset + b.count);
    space.fence();
    const char* sb = static_cast<const char*>(send);
    char* rb       = static_cast<char*>(recv);
    if (staged(mem)) {
      char* hs = stage(0, send_end * es);
      copy_bytes(hs, MemoryKind::host, send, mem, send_end * es);
      sb = hs;
      rb = stage(1, recv_end * es);
    }
    // Messages between a pair are non-overtaking: blocks match in list order.
    std::vector<MPI_Request> req;
    req.reserve(sends.size() + recvs.size());
    const bool receive = true;
    for (bool dir : {receive, !receive})
      for (const auto& b : dir == receive ? recvs : sends) {
        if (b.count == 0) continue;
        req.emplace_back();
        const int n = to_int(b.count, "block count");
        if (dir == receive)
          check_mpi(MPI_Irecv(rb + b.offset * es, n, mpi_type(type), b.peer, 7002, m_comm, &req.back()), "MPI_Irecv");
        else
          check_mpi(MPI_Isend(sb + b.offset * es, n, mpi_type(type), b.peer, 7002, m_comm, &req.back()), "MPI_Isend");
      }
    check_mpi(MPI_Waitall(static_cast<int>(req.size()), req.data(), MPI_STATUSES_IGNORE), "MPI_Waitall");
    if (staged(mem)) {
      // Only the received blocks: the rest of recv keeps its contents.
      for (const auto& b : recvs)
        copy_bytes(static_cast<char*>(recv) + b.offset * es, mem, rb + b.offset * es, MemoryKind::host, b.count * es);
    }
  }

  void alltoall(const CommStream& space, const void* send, void* recv, long count, DataType type,
                MemoryKind mem) override {
    const int n          = to_int(count, "all-to-all count");
    const std::size_t nb = std::size_t(count) * m_size * size_of(type);
    space.fence();
    if (staged(mem)) {
      char* hs = stage(0, nb);
      char* hr = stage(1, nb);
      copy_bytes(hs, MemoryKind::host, send, mem, nb);
      check_mpi(MPI_Alltoall(hs, n, mpi_type(type), hr, n, mpi_type(type), m_comm), "MPI_Alltoall");
      copy_bytes(recv, mem, hr, MemoryKind::host, nb);
      return;
    }
    check_mpi(MPI_Alltoall(send, n, mpi_type(type), recv, n, mpi_type(type), m_comm), "MPI_Alltoall");
  }

  void allreduce_sum(const CommStream& space, void* data, long count, DataType type, MemoryKind mem) override {
    require_reducible(type, "allreduce_sum");
    const int n = to_int(count, "all-reduce count");
    space.fence();
    void* buf = host_view(0, data, count * size_of(type), mem);
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, buf, n, mpi_type(type), MPI_SUM, m_comm), "MPI_Allreduce");
    if (buf != data) copy_bytes(data, mem, buf, MemoryKind::host, count * size_of(type));
  }

  void broadcast(const CommStream& space, void* data, long count, DataType type, int root, MemoryKind mem) override {
    const int n = to_int(count, "broadcast count");
    space.fence();
    void* buf = host_view(0, data, count * size_of(type), mem);
    check_mpi(MPI_Bcast(buf, n, mpi_type(type), root, m_comm), "MPI_Bcast");
    if (buf != data) copy_bytes(data, mem, buf, MemoryKind::host, count * size_of(type));
  }

  void reduce_sum(const CommStream& space, const void* send, void* recv, long count, DataType type, int root,
                  MemoryKind mem) override {
    require_reducible(type, "reduce_sum");
    const int n = to_int(count, "reduce count");
    space.fence();
    const std::size_t nb = count * size_of(type);
    const void* s        = host_view(0, const_cast<void*>(send), nb, mem);
    void* r              = staged(mem) ? static_cast<void*>(stage(1, nb)) : recv;
    check_mpi(MPI_Reduce(s, m_rank == root ? r : nullptr, n, mpi_type(type), MPI_SUM, root, m_comm), "MPI_Reduce");
    if (m_rank == root && r != recv) copy_bytes(recv, mem, r, MemoryKind::host, nb);
  }

  void send(const CommStream& space, const void* data, long count, DataType type, int peer,
            MemoryKind mem) override {
    const int n = to_int(count, "send count");
    space.fence();
    const void* buf = host_view(0, const_cast<void*>(data), count * size_of(type), mem);
    check_mpi(MPI_Send(buf, n, mpi_type(type), peer, 7001, m_comm), "MPI_Send");
  }

  void recv(const CommStream& space, void* data, long count, DataType type, int peer, MemoryKind mem) override {
    const int n = to_int(count, "receive count");
    space.fence();
    void* buf = staged(mem) ? static_cast<void*>(stage(0, count * size_of(type))) : data;
    check_mpi(MPI_Recv(buf, n, mpi_type(type), peer, 7001, m_comm, MPI_STATUS_IGNORE), "MPI_Recv");
    if (buf != data) copy_bytes(data, mem, buf, MemoryKind::host, count * size_of(type));
  }

  std::unique_ptr<Communicator> split(int color, int key) const override {
    MPI_Comm sub;
    check_mpi(MPI_Comm_split(m_comm, color, key, &sub), "MPI_Comm_split");
    return std::unique_ptr<Communicator>(new MpiCommunicator(sub));
  }

 private:
  bool staged(MemoryKind mem) const { return mem == MemoryKind::device && !m_cuda_aware; }
  /// Staging buffer i (0: send, 1: receive) of at least n bytes.
  char* stage(int i, std::size_t n) {
    if (m_stage[i].extent(0) < n)
      m_stage[i] = Kokkos::View<char*, staging_space>(Kokkos::view_alloc(Kokkos::WithoutInitializing,
                                                                          "moka::comm::staging"),
                                                       n + n / 4);
    return m_stage[i].data();
  }
  /// \p data itself, or a host copy of it in staging buffer i.
  void* host_view(int i, void* data, std::size_t n, MemoryKind mem) {
    if (!staged(mem)) return data;
    char* h = stage(i, n);
    copy_bytes(h, MemoryKind::host, data, mem, n);
    return h;
  }
  void check_counts(const std::vector<long>& sc, const std::vector<long>& sd, const std::vector<long>& rc,
                    const std::vector<long>& rd) const {
    const std::size_t n = static_cast<std::size_t>(m_size);
    MOKA_REQUIRE(sc.size() == n && sd.size() == n && rc.size() == n && rd.size() == n,
                 "moka::Communicator::alltoallv: counts and displacements need one entry per rank (", m_size, ")");
  }
  bool m_cuda_aware = false;
  Kokkos::View<char*, staging_space> m_stage[2];
};

}  // namespace

// ------------------------------------------------------------ base class
Communicator::Communicator(MPI_Comm comm) : m_comm(comm) {
  MPI_Comm_rank(comm, &m_rank);
  MPI_Comm_size(comm, &m_size);
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

// ---------------------------------------------------------- NCCL backend
#ifdef MOKA_HAVE_NCCL
namespace {

void check_nccl(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) throw Error(std::string("moka::Communicator (NCCL): ") + what + " failed: " + ncclGetErrorString(r));
}

ncclDataType_t nccl_type(DataType t) {
  switch (t) {
    case DataType::f32: return ncclFloat32;
    case DataType::f64: return ncclFloat64;
    case DataType::bf16: return ncclBfloat16;
    case DataType::i32: return ncclInt32;
    case DataType::i64: return ncclInt64;
  }
  return ncclUint8;
}

class NcclCommunicator final : public Communicator {
 public:
  explicit NcclCommunicator(MPI_Comm comm) : Communicator(comm) {
    ncclUniqueId id;
    int ok = 1;
    if (m_rank == 0) ok = ncclGetUniqueId(&id) == ncclSuccess ? 1 : 0;
    MPI_Bcast(&ok, 1, MPI_INT, 0, m_comm);
    MOKA_REQUIRE(ok == 1, "moka::Communicator (NCCL): ncclGetUniqueId failed on rank 0");
    MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, m_comm);
    check_nccl(ncclCommInitRank(&m_nccl, m_size, id, m_rank), "ncclCommInitRank");
  }
  ~NcclCommunicator() override {
    if (!m_nccl) return;
    // Unwinding from an error: the peers may be blocked in an operation
    // this rank will never join, and ncclCommDestroy would wait for them;
    // abort the communicator so the error reaches MPI_Abort (found on 2
    // H100s: the failure test hung in the destructor).
    if (std::uncaught_exceptions() > 0) ncclCommAbort(m_nccl);
    else ncclCommDestroy(m_nccl);
  }
  CommBackend backend() const override { return CommBackend::nccl; }

  void alltoallv(const CommStream& space, const void* send, const std::vector<long>& sc,
                 const std::vector<long>& sd, void* recv, const std::vector<long>& rc, const std::vector<long>& rd,
                 DataType type, MemoryKind mem) override {
    cudaStream_t s = stream(space, mem, "alltoallv");
    const std::size_t es = size_of(type);
    const char* sb = static_cast<const char*>(send);
    char* rb       = static_cast<char*>(recv);
    check_nccl(ncclGroupStart(), "ncclGroupStart");
    for (int p = 0; p < m_size; ++p) {
      if (sc[p] > 0) check_nccl(ncclSend(sb + sd[p] * es, sc[p], nccl_type(type), p, m_nccl, s), "ncclSend");
      if (rc[p] > 0) check_nccl(ncclRecv(rb + rd[p] * es, rc[p], nccl_type(type), p, m_nccl, s), "ncclRecv");
    }
    check_nccl(ncclGroupEnd(), "ncclGroupEnd");
  }

  void alltoallv_blocks(const CommStream& space, const void* send, const std::vector<Block>& sends, void* recv,
                        const std::vector<Block>& recvs, DataType type, MemoryKind mem) override {
    cudaStream_t s = stream(space, mem, "alltoallv_blocks");
    const std::size_t es = size_of(type);
    const char* sb = static_cast<const char*>(send);
    char* rb       = static_cast<char*>(recv);
    // Sends and receives of a pair match in issue order within the group.
    check_nccl(ncclGroupStart(), "ncclGroupStart");
    for (const auto& b : sends)
      if (b.count > 0) check_nccl(ncclSend(sb + b.offset * es, b.count, nccl_type(type), b.peer, m_nccl, s), "ncclSend");
    for (const auto& b : recvs)
      if (b.count > 0) check_nccl(ncclRecv(rb + b.offset * es, b.count, nccl_type(type), b.peer, m_nccl, s), "ncclRecv");
    check_nccl(ncclGroupEnd(), "ncclGroupEnd");
  }

  void alltoall(const CommStream& space, const void* send, void* recv, long count, DataType type,
                MemoryKind mem) override {
    cudaStream_t s = stream(space, mem, "alltoall");
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 28, 0)
    check_nccl(ncclAlltoAll(send, recv, count, nccl_type(type), m_nccl, s), "ncclAlltoAll");
#else
    // NCCL before 2.28 has no all-to-all collective: grouped send/recv.
    const std::size_t bytes = std::size_t(count) * size_of(type);
    check_nccl(ncclGroupStart(), "ncclGroupStart");
    for (int p = 0; p < m_size; ++p) {
      check_nccl(ncclSend(static_cast<const char*>(send) + p * bytes, count, nccl_type(type), p, m_nccl, s), "ncclSend");
      check_nccl(ncclRecv(static_cast<char*>(recv) + p * bytes, count, nccl_type(type), p, m_nccl, s), "ncclRecv");
    }
    check_nccl(ncclGroupEnd(), "ncclGroupEnd");
#endif
  }

  void allreduce_sum(const CommStream& space, void* data, long count, DataType type, MemoryKind mem) override {
    require_reducible(type, "allreduce_sum");
    check_nccl(ncclAllReduce(data, data, count, nccl_type(type), ncclSum, m_nccl, stream(space, mem, "allreduce_sum")),
               "ncclAllReduce");
  }

  void broadcast(const CommStream& space, void* data, long count, DataType type, int root, MemoryKind mem) override {
    check_nccl(ncclBroadcast(data, data, count, nccl_type(type), root, m_nccl, stream(space, mem, "broadcast")),
               "ncclBroadcast");
  }

  void reduce_sum(const CommStream& space, const void* send, void* recv, long count, DataType type, int root,
                  MemoryKind mem) override {
    require_reducible(type, "reduce_sum");
    check_nccl(ncclReduce(send, recv, count, nccl_type(type), ncclSum, root, m_nccl, stream(space, mem, "reduce_sum")),
               "ncclReduce");
  }

  void send(const CommStream& space, const void* data, long count, DataType type, int peer,
            MemoryKind mem) override {
    check_nccl(ncclSend(data, count, nccl_type(type), peer, m_nccl, stream(space, mem, "send")), "ncclSend");
  }

  void recv(const CommStream& space, void* data, long count, DataType type, int peer, MemoryKind mem) override {
    check_nccl(ncclRecv(data, count, nccl_type(type), peer, m_nccl, stream(space, mem, "recv")), "ncclRecv");
  }

  std::unique_ptr<Communicator> split(int color, int key) const override {
    MPI_Comm sub;
    check_mpi(MPI_Comm_split(m_comm, color, key, &sub), "MPI_Comm_split");
    return std::unique_ptr<Communicator>(new NcclCommunicator(sub));
  }

 private:
  static cudaStream_t stream(const CommStream& space, MemoryKind mem, const char* op) {
    MOKA_REQUIRE(mem == MemoryKind::device, "moka::Communicator (NCCL)::", op,
                 ": NCCL moves device memory only; use comm.backend = mpi for host data");
    MOKA_REQUIRE(space.is_cuda(), "moka::Communicator (NCCL)::", op,
                 ": needs a Kokkos::Cuda execution-space instance");
    return static_cast<cudaStream_t>(space.cuda_stream());
  }
  ncclComm_t m_nccl = nullptr;
};

}  // namespace
#endif

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

bool nccl_usable(MPI_Comm comm) {
#ifdef MOKA_HAVE_NCCL
  // Ranks of one node must not share a GPU (NCCL needs one rank per device).
  MPI_Comm node;
  MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
  int local = 1;
  MPI_Comm_size(node, &local);
  MPI_Comm_free(&node);
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
  int ok = local <= devices ? 1 : 0, all = 0;
  MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, comm);
  return all == 1;
#else
  (void)comm;
  return false;
#endif
}

std::unique_ptr<Communicator> make_communicator(MPI_Comm comm, CommBackend backend) {
  MPI_Comm dup;
  check_mpi(MPI_Comm_dup(comm, &dup), "MPI_Comm_dup");
  if (backend == CommBackend::mpi) return std::unique_ptr<Communicator>(new MpiCommunicator(dup));
#ifdef MOKA_HAVE_NCCL
  return std::unique_ptr<Communicator>(new NcclCommunicator(dup));
#else
  MPI_Comm_free(&dup);
  throw Error("comm.backend = nccl: MoKA was built without NCCL (use comm.backend = mpi)");
#endif
}

}  // namespace moka
