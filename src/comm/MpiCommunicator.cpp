// The MPI backend of moka::Communicator: host memory; device memory staged
// through pinned host buffers, or handed to MPI directly when
// MOKA_MPI_CUDA_AWARE=1 says the MPI is CUDA-aware.
#include "CommImpl.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace moka {
namespace comm_impl {
namespace {

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

  /// Host memory: the messages posted, completed by wait() (MPI_Testall in
  /// progress() drives them). Staged device memory shares the staging
  /// buffers: the exchange runs now.
  class MpiPending final : public Pending {
   public:
    std::vector<MPI_Request> req;
    void progress() override {
      int done = 0;
      if (!req.empty()) check_mpi(MPI_Testall(int(req.size()), req.data(), &done, MPI_STATUSES_IGNORE), "MPI_Testall");
    }
    void wait() override {
      if (!req.empty()) check_mpi(MPI_Waitall(int(req.size()), req.data(), MPI_STATUSES_IGNORE), "MPI_Waitall");
      req.clear();
    }
    ~MpiPending() override {
      // A pending exchange dropped by an exception: complete it, so no
      // message lands in freed memory (errors here cannot be thrown).
      if (!req.empty()) MPI_Waitall(int(req.size()), req.data(), MPI_STATUSES_IGNORE);
    }
  };

  std::unique_ptr<Pending> start_blocks(const CommStream& space, const void* send, const std::vector<Block>& sends,
                                        void* recv, const std::vector<Block>& recvs, DataType type,
                                        MemoryKind mem, int tag) override {
    if (staged(mem)) return Communicator::start_blocks(space, send, sends, recv, recvs, type, mem, tag);
    MOKA_REQUIRE(tag >= 0 && tag < 1000, "moka::Communicator::start_blocks: tag ", tag, " outside [0, 1000)");
    const std::size_t es = size_of(type);
    space.fence();
    auto p = std::make_unique<MpiPending>();
    p->req.reserve(sends.size() + recvs.size());
    for (const auto& b : recvs) {
      if (b.count == 0) continue;
      p->req.emplace_back();
      check_mpi(MPI_Irecv(static_cast<char*>(recv) + b.offset * es, to_int(b.count, "block count"), mpi_type(type),
                          b.peer, 8000 + tag, m_comm, &p->req.back()),
                "MPI_Irecv");
    }
    for (const auto& b : sends) {
      if (b.count == 0) continue;
      p->req.emplace_back();
      check_mpi(MPI_Isend(static_cast<const char*>(send) + b.offset * es, to_int(b.count, "block count"),
                          mpi_type(type), b.peer, 8000 + tag, m_comm, &p->req.back()),
                "MPI_Isend");
    }
    return p;
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

  std::unique_ptr<Communicator> make_on(MPI_Comm sub) const override { return make_mpi_communicator(sub); }

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

std::unique_ptr<Communicator> make_mpi_communicator(MPI_Comm comm) {
  return std::unique_ptr<Communicator>(new MpiCommunicator(comm));
}

}  // namespace comm_impl
}  // namespace moka
