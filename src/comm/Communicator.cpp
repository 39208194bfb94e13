#include <moka/comm/Communicator.hpp>
#include <moka/core/Profiling.hpp>

#ifdef MOKA_HAVE_NCCL
#include <cuda_runtime.h>
#include <nccl.h>
#endif
#ifdef MOKA_HAVE_NCCL_DEVICE_API
#include "NcclWindow.hpp"
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

/// The NCCL communicator and its device communicator; shared with the
/// windows made over it, so that it outlives them.
struct NcclHandle {
  ncclComm_t comm = nullptr;
#ifdef MOKA_HAVE_NCCL_DEVICE_API
  std::shared_ptr<nccl_window::DeviceComm> dev;
#endif
  ~NcclHandle() {
    if (!comm) return;
    // Unwinding from an error: the peers may be blocked in an operation
    // this rank will never join, and ncclCommDestroy would wait for them;
    // abort the communicator so the error reaches MPI_Abort (found on 2
    // H100s: the failure test hung in the destructor).
    const bool unwinding = std::uncaught_exceptions() > 0;
#ifdef MOKA_HAVE_NCCL_DEVICE_API
    if (dev && unwinding) nccl_window::abandon(*dev);  // not destroyed: the comm is aborted
    dev.reset();
#endif
    if (unwinding) ncclCommAbort(comm);
    else ncclCommDestroy(comm);
  }
};

#ifdef MOKA_HAVE_NCCL_DEVICE_API
class NcclWindow final : public SymmetricWindow {
 public:
  NcclWindow(std::shared_ptr<NcclHandle> h, void* data, std::size_t bytes, ncclWindow_t win)
      : SymmetricWindow(data, bytes), m_h(std::move(h)), m_win(win) {}
  ~NcclWindow() override {
    // Collective, like the registration; skipped while unwinding from an
    // error (the job is about to abort, and the peers may never join).
    if (std::uncaught_exceptions() > 0) return;
    cudaDeviceSynchronize();  // no queued kernel may still use it
    ncclCommWindowDeregister(m_h->comm, m_win);
    ncclMemFree(m_data);
  }
  ncclWindow_t window() const { return m_win; }

 private:
  std::shared_ptr<NcclHandle> m_h;
  ncclWindow_t m_win;
};
#endif

class NcclCommunicator final : public Communicator {
 public:
  explicit NcclCommunicator(MPI_Comm comm) : Communicator(comm), m_h(std::make_shared<NcclHandle>()) {
    ncclUniqueId id;
    int ok = 1;
    if (m_rank == 0) ok = ncclGetUniqueId(&id) == ncclSuccess ? 1 : 0;
    MPI_Bcast(&ok, 1, MPI_INT, 0, m_comm);
    MOKA_REQUIRE(ok == 1, "moka::Communicator (NCCL): ncclGetUniqueId failed on rank 0");
    MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, m_comm);
    check_nccl(ncclCommInitRank(&m_h->comm, m_size, id, m_rank), "ncclCommInitRank");
    m_nccl = m_h->comm;
  }
  CommBackend backend() const override { return CommBackend::nccl; }

#ifdef MOKA_HAVE_NCCL_DEVICE_API
  bool windows_usable() override {
    if (m_windows >= 0) return m_windows == 1;
    // Every rank must reach every other by load/store, and NCCL must make
    // the device communicator everywhere (it needs CUDA's virtual memory
    // management, NCCL_CUMEM_ENABLE); the put kernel runs one CTA per SM
    // of the smallest GPU (its barriers need every CTA resident).
    int dev = 0, sms = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    int mine[2] = {nccl_window::all_ranks_lsa(m_nccl, m_rank, m_size) ? 1 : 0, sms}, all[2] = {0, 0};
    check_mpi(MPI_Allreduce(mine, all, 2, MPI_INT, MPI_MIN, m_comm), "MPI_Allreduce (windows)");
    m_windows = 0;
    if (all[0] == 1 && all[1] > 0) {
      ncclResult_t err = ncclSuccess;
      m_h->dev = nccl_window::create(m_nccl, all[1], err);
      int ok = m_h->dev ? 1 : 0, every = 0;
      check_mpi(MPI_Allreduce(&ok, &every, 1, MPI_INT, MPI_MIN, m_comm), "MPI_Allreduce (windows)");
      if (every == 1) m_windows = 1;
      else m_h->dev.reset();
    }
    return m_windows == 1;
  }

  std::unique_ptr<SymmetricWindow> make_window(std::size_t bytes) override {
    MOKA_REQUIRE(windows_usable(), "moka::Communicator (NCCL): symmetric windows are not usable over these ",
                 m_size, " ranks (they need NCCL 2.28's device communicator and GPUs that reach each other's "
                 "memory over NVLink or P2P)");
    long mine[2] = {static_cast<long>(bytes), -static_cast<long>(bytes)}, all[2] = {0, 0};
    check_mpi(MPI_Allreduce(mine, all, 2, MPI_LONG, MPI_MIN, m_comm), "MPI_Allreduce (window size)");
    MOKA_REQUIRE(all[0] == -all[1], "moka::Communicator (NCCL)::make_window: ranks asked for different sizes (",
                 all[0], " to ", -all[1], " bytes)");
    // NCCL wants windows in whole pages of its alignment.
    const std::size_t align = NCCL_WIN_REQUIRED_ALIGNMENT;
    const std::size_t size  = std::max<std::size_t>(align, (bytes + align - 1) / align * align);
    void* data = nullptr;
    check_nccl(ncclMemAlloc(&data, size), "ncclMemAlloc (window)");
    ncclWindow_t win = nullptr;
    const ncclResult_t r = ncclCommWindowRegister(m_nccl, data, size, &win, NCCL_WIN_COLL_SYMMETRIC);
    if (r != ncclSuccess) {
      ncclMemFree(data);
      check_nccl(r, "ncclCommWindowRegister");
    }
    return std::unique_ptr<SymmetricWindow>(new NcclWindow(m_h, data, size, win));
  }

  void put(const CommStream& space, const SymmetricWindow& window, const void* send, const std::vector<Put>& puts,
           DataType type) override {
    MOKA_REQUIRE(m_windows == 1, "moka::Communicator (NCCL)::put: symmetric windows are not usable here");
    const auto* win = dynamic_cast<const NcclWindow*>(&window);
    MOKA_REQUIRE(win != nullptr, "moka::Communicator (NCCL)::put: the window was not made by an NCCL communicator");
    cudaStream_t s       = stream(space, MemoryKind::device, "put");
    const std::size_t es = size_of(type);
    std::vector<nccl_window::Task> tasks;
    tasks.reserve(puts.size());
    for (const Put& p : puts) {
      MOKA_REQUIRE(p.peer >= 0 && p.peer < m_size && p.src >= 0 && p.dst >= 0 && p.count >= 0,
                   "moka::Communicator (NCCL)::put: bad put (peer ", p.peer, ", src ", p.src, ", dst ", p.dst,
                   ", count ", p.count, ")");
      MOKA_REQUIRE(std::size_t(p.dst + p.count) * es <= window.bytes(), "moka::Communicator (NCCL)::put: a put to ",
                   "rank ", p.peer, " ends at byte ", std::size_t(p.dst + p.count) * es, " of a ", window.bytes(),
                   "-byte window");
      if (p.count > 0)
        tasks.push_back({p.peer, static_cast<long long>(p.src * es), static_cast<long long>(p.dst * es),
                         static_cast<long long>(p.count * es)});
    }
    nccl_window::put(*m_h->dev, win->window(), static_cast<const char*>(send), tasks, s);
  }
#endif

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
  std::shared_ptr<NcclHandle> m_h;
  ncclComm_t m_nccl = nullptr;
  int m_windows     = -1;  // windows usable: -1 not asked yet, 0 no, 1 yes
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
