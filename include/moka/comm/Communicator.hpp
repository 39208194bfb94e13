#pragma once
/// \file Comm.hpp
/// \brief moka::Communicator: one interface for the collectives MoKA needs,
/// with an MPI backend (host memory; device memory staged through pinned
/// host buffers, or handed to MPI directly when MOKA_MPI_CUDA_AWARE=1 says
/// the MPI is CUDA-aware) and an NCCL backend (device memory, enqueued on the
/// stream of the execution-space instance).
///
/// Operations: variable-count all-to-all of rows (per peer, or per block),
/// equal-count all-to-all, all-to-all / all-gather of
/// counts (host, over MPI in both backends: they size the buffers), in-place
/// all-reduce, broadcast, reduce, point-to-point send/recv, sub-communicators,
/// and, where the ranks' GPUs can store into each other's memory (NCCL 2.28's
/// symmetric memory over NVLink), symmetric windows and puts into them.
///
/// Completion: the MPI backend fences \p space and completes every operation
/// before it returns; the NCCL backend
/// enqueues on \p space's stream and returns, so later kernels on the same
/// instance see the results and the host must fence \p space before it
/// reads them. Every communicator carries an MPI communicator over the same
/// ranks for control (counts, errors).
///
/// \code
/// auto world = moka::make_communicator(MPI_COMM_WORLD, moka::CommBackend::nccl);
/// auto half  = world->split(world->rank() % 2, world->rank());
/// moka::allreduce_sum(*half, space, grads);   // a View: memory kind and type deduced
/// \endcode

#include <moka/core/Core.hpp>

#include <mpi.h>

#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

namespace moka {

/// \brief Which library moves the data.
enum class CommBackend { mpi, nccl };
/// \brief "mpi" / "nccl".
std::string to_string(CommBackend b);
/// \brief Parses "mpi", "nccl" or "auto" (NCCL on CUDA builds with NCCL and
/// one GPU per rank, MPI otherwise); throws moka::Error otherwise.
CommBackend comm_backend_from_string(const std::string& s);

/// \brief Element types the communicators move.
enum class DataType { f32, f64, bf16, i32, i64 };
/// \brief Bytes of one element.
std::size_t size_of(DataType t);
/// \brief The DataType of a C++ type.
template <class T>
constexpr DataType data_type_of() {
  using U = std::remove_cv_t<T>;
  static_assert(std::is_same<U, float>::value || std::is_same<U, double>::value || std::is_same<U, bf16>::value ||
                    std::is_same<U, int>::value || std::is_same<U, long>::value,
                "moka::Communicator moves float, double, bf16, int and long");
  return std::is_same<U, float>::value    ? DataType::f32
         : std::is_same<U, double>::value ? DataType::f64
         : std::is_same<U, bf16>::value   ? DataType::bf16
         : std::is_same<U, int>::value    ? DataType::i32
                                          : DataType::i64;
}

/// \brief Where a buffer lives.
enum class MemoryKind { host, device };
/// \brief The MemoryKind of a Kokkos memory space.
template <class MemorySpace>
constexpr MemoryKind memory_kind_of() {
  return Kokkos::SpaceAccessibility<Kokkos::HostSpace, MemorySpace>::accessible ? MemoryKind::host
                                                                                : MemoryKind::device;
}

/// \brief The execution-space instance a communication is ordered with:
/// its fence, and its CUDA stream where it is a Kokkos::Cuda instance.
/// Converts implicitly from any execution-space instance.
class CommStream {
 public:
  template <class Exec, class = std::enable_if_t<Kokkos::is_execution_space<Exec>::value>>
  CommStream(const Exec& space)  // NOLINT: implicit on purpose
      : m_fence([space]() { space.fence(); }) {
#ifdef KOKKOS_ENABLE_CUDA
    if constexpr (std::is_same<Exec, Kokkos::Cuda>::value) {
      m_cuda   = true;
      m_stream = static_cast<void*>(space.cuda_stream());
    }
#endif
  }
  /// \brief Waits for the instance's work.
  void fence() const { m_fence(); }
  /// \brief Whether the instance is a Kokkos::Cuda one.
  bool is_cuda() const { return m_cuda; }
  /// \brief Its cudaStream_t (the default instance's may be the null stream, 0).
  void* cuda_stream() const { return m_stream; }

 private:
  std::function<void()> m_fence;
  bool m_cuda    = false;
  void* m_stream = nullptr;
};

/// \brief Device memory of the same size on every rank of a communicator that
/// every rank's kernels can store into (Communicator::make_window). Freed
/// when destroyed: collective, like its creation.
class SymmetricWindow {
 public:
  virtual ~SymmetricWindow();
  SymmetricWindow(const SymmetricWindow&) = delete;
  SymmetricWindow& operator=(const SymmetricWindow&) = delete;
  /// \brief This rank's part (device memory).
  void* data() const { return m_data; }
  std::size_t bytes() const { return m_bytes; }

 protected:
  SymmetricWindow(void* data, std::size_t bytes) : m_data(data), m_bytes(bytes) {}
  void* m_data        = nullptr;
  std::size_t m_bytes = 0;
};

/// \brief A group of ranks and the collectives over them. Counts and
/// displacements are in elements. Collective calls must be made by every
/// rank of the communicator in the same order.
class Communicator {
 public:
  virtual ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  int rank() const { return m_rank; }
  int size() const { return m_size; }
  /// \brief The MPI communicator over the same ranks (owned; for control).
  MPI_Comm mpi_comm() const { return m_comm; }
  virtual CommBackend backend() const = 0;

  /// \brief Variable-count all-to-all: to peer p, send_counts[p] elements
  /// from send + send_displs[p]; from peer p, recv_counts[p] elements into
  /// recv + recv_displs[p]. Send ranges may overlap (an all-gather).
  virtual void alltoallv(const CommStream& space, const void* send, const std::vector<long>& send_counts,
                         const std::vector<long>& send_displs, void* recv, const std::vector<long>& recv_counts,
                         const std::vector<long>& recv_displs, DataType type, MemoryKind mem) = 0;
  /// \brief One contiguous run of elements exchanged with a peer.
  struct Block {
    int peer;
    long offset, count;  ///< in elements of the buffer
  };
  /// \brief All-to-all of blocks: each send block goes to its peer and lands
  /// in the receive block that the peer lists for this rank at the same
  /// position among its blocks for this rank (blocks of a pair match in
  /// list order; both sides skip or list empty blocks alike). Lets a
  /// receiver place rows straight where they belong (the token exchange's
  /// (local expert, source rank) order) without a reordering pass.
  virtual void alltoallv_blocks(const CommStream& space, const void* send, const std::vector<Block>& sends,
                                void* recv, const std::vector<Block>& recvs, DataType type, MemoryKind mem) = 0;
  /// \brief An exchange of blocks that start_blocks began: progress() lets
  /// it move (call it between pieces of other work), wait() completes it
  /// (the received blocks are in place after wait()).
  class Pending {
   public:
    virtual ~Pending() = default;
    virtual void progress() {}
    virtual void wait() {}
  };
  /// \brief alltoallv_blocks begun, to complete later (smart scheduling:
  /// the next peer group's rows move while the arrived ones are computed).
  /// \p send and \p recv must stay valid until wait(). The base version
  /// runs the whole exchange now (stream-ordered backends: NCCL already
  /// returns before the rows move); MPI on host memory posts the messages
  /// and returns. Exchanges pending at once need different \p tag values
  /// (0 to 999), the same on both sides of a pair.
  virtual std::unique_ptr<Pending> start_blocks(const CommStream& space, const void* send,
                                                const std::vector<Block>& sends, void* recv,
                                                const std::vector<Block>& recvs, DataType type, MemoryKind mem,
                                                int tag = 0) {
    (void)tag;
    alltoallv_blocks(space, send, sends, recv, recvs, type, mem);
    return std::make_unique<Pending>();
  }
  /// \brief Equal-count all-to-all: \p count elements to and from every peer,
  /// peer p's block at p * count (the library's own all-to-all: the
  /// reference the exchange benchmark measures against).
  virtual void alltoall(const CommStream& space, const void* send, void* recv, long count, DataType type,
                        MemoryKind mem) = 0;
  /// \brief In-place sum over the ranks.
  virtual void allreduce_sum(const CommStream& space, void* data, long count, DataType type,
                             MemoryKind mem) = 0;
  /// \brief Root's \p count elements to every rank.
  virtual void broadcast(const CommStream& space, void* data, long count, DataType type, int root,
                         MemoryKind mem) = 0;
  /// \brief Sum of every rank's \p send into root's \p recv (recv unused elsewhere).
  virtual void reduce_sum(const CommStream& space, const void* send, void* recv, long count, DataType type,
                          int root, MemoryKind mem) = 0;
  /// \brief Point-to-point; a send must be matched by a recv of the same count on the peer.
  virtual void send(const CommStream& space, const void* data, long count, DataType type, int peer,
                    MemoryKind mem) = 0;
  virtual void recv(const CommStream& space, void* data, long count, DataType type, int peer,
                    MemoryKind mem) = 0;
  /// \name Symmetric windows: kernels store straight into peers' memory.
  /// @{
  /// \brief Whether make_window and put work over this communicator: the
  /// NCCL backend built with NCCL's device API (2.28 or later), and every
  /// rank load/store accessible to every other (one node's GPUs over NVLink
  /// or P2P PCIe). The same answer on every rank. Collective the first time.
  virtual bool windows_usable() { return false; }
  /// \brief A window of \p bytes on every rank (every rank passes the same
  /// size). Collective; moka::Error where windows are not usable.
  virtual std::unique_ptr<SymmetricWindow> make_window(std::size_t bytes);
  /// \brief \p count elements from send + \p src into \p peer's part of a
  /// window at element \p dst.
  struct Put {
    int peer;
    long src, dst, count;
  };
  /// \brief Collective and stream-ordered on \p space: waits until every
  /// rank has reached this call on its stream (so that no rank still reads
  /// its part of the window), stores every put, then waits until every
  /// rank's puts have landed. Later work on \p space sees this rank's part
  /// of \p window holding what the peers put. Ranks may pass different
  /// numbers of puts (none too).
  virtual void put(const CommStream& space, const SymmetricWindow& window, const void* send,
                   const std::vector<Put>& puts, DataType type);
  /// @}

  /// \brief A communicator over the ranks with the same \p color, ordered by
  /// \p key (then rank), with the same backend. Collective.
  std::unique_ptr<Communicator> split(int color, int key) const;

  /// \name Host-side control over MPI (both backends).
  /// @{
  /// \brief recv[p * n + i] = what peer p sent as send[rank * n + i]; n per peer.
  void alltoall_counts(const long* send, long* recv, int n) const;
  /// \brief recv[p * n + i] = peer p's mine[i].
  void allgather_counts(const long* mine, long* recv, int n) const;
  /// \brief In-place sum of host values.
  void allreduce_host(double* data, int n) const;
  void allreduce_host(long* data, int n) const;
  /// \brief Sum of the values of lower ranks (0 on rank 0), per element.
  void exscan_host(const long* mine, long* out, int n) const;
  /// @}

 protected:
  /// Takes ownership of \p comm (freed by the destructor).
  explicit Communicator(MPI_Comm comm);
  /// A communicator of this one's backend over \p sub (owned): split()'s last step.
  virtual std::unique_ptr<Communicator> make_on(MPI_Comm sub) const = 0;
  MPI_Comm m_comm = MPI_COMM_NULL;
  int m_rank = 0, m_size = 1;
};

/// \brief A communicator of the given backend over a duplicate of \p comm.
/// NCCL needs a build with NCCL, device memory for its data and one GPU per
/// rank; moka::Error otherwise. Collective over \p comm.
std::unique_ptr<Communicator> make_communicator(MPI_Comm comm, CommBackend backend);

/// \brief Whether the NCCL backend can run here: built with NCCL, and no two
/// ranks of \p comm on one node share a GPU. Collective over \p comm.
bool nccl_usable(MPI_Comm comm);

/// \name View front ends (type and memory kind deduced).
/// @{
template <class View>
void allreduce_sum(Communicator& c, const CommStream& space, const View& v) {
  MOKA_REQUIRE(v.span_is_contiguous(), "allreduce_sum: '", v.label(), "' is not contiguous");
  c.allreduce_sum(space, v.data(), static_cast<long>(v.size()), data_type_of<typename View::value_type>(),
                  memory_kind_of<typename View::memory_space>());
}
template <class View>
void broadcast(Communicator& c, const CommStream& space, const View& v, int root) {
  MOKA_REQUIRE(v.span_is_contiguous(), "broadcast: '", v.label(), "' is not contiguous");
  c.broadcast(space, v.data(), static_cast<long>(v.size()), data_type_of<typename View::value_type>(), root,
              memory_kind_of<typename View::memory_space>());
}
/// @}

}  // namespace moka
