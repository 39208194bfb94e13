// The NCCL backend of moka::Communicator (built only with NCCL): device
// memory, enqueued on the stream of the execution-space instance; symmetric
// windows and direct puts through NCCL's device API (NcclWindow.cpp) where
// NCCL is 2.28 or later.
#include "CommImpl.hpp"

#include <cuda_runtime.h>
#include <nccl.h>
#ifdef MOKA_HAVE_NCCL_DEVICE_API
#include "NcclWindow.hpp"
#endif

#include <algorithm>
#include <exception>

namespace moka {

namespace comm_impl {
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

  std::unique_ptr<Communicator> make_on(MPI_Comm sub) const override { return make_nccl_communicator(sub); }

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

std::unique_ptr<Communicator> make_nccl_communicator(MPI_Comm comm) {
  return std::unique_ptr<Communicator>(new NcclCommunicator(comm));
}

}  // namespace comm_impl

bool nccl_usable(MPI_Comm comm) {
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
}

}  // namespace moka
