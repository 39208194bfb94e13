#pragma once
/// \file NcclContext.hpp
/// \brief An NCCL communicator over the ranks of an MPI communicator.
///
/// Created by moka::Runtime on CUDA builds with NCCL (one rank per GPU); the
/// unique id is made on rank 0 and broadcast over MPI. NCCL types stay
/// behind this interface: the rest of MoKA and its users never include
/// nccl.h. The full communicator interface (all-to-all, buckets, groups)
/// builds on this in moka::comm.

#include <moka/Config.hpp>

#include <mpi.h>

#include <Kokkos_Core.hpp>

#include <memory>
#include <string>

namespace moka {

/// \brief Owns one ncclComm_t spanning an MPI communicator.
class NcclContext {
 public:
  /// \brief Creates the NCCL communicator over \p comm on the current CUDA device.
  /// \note Collective over \p comm.
  explicit NcclContext(MPI_Comm comm);
  /// \brief Destroys the NCCL communicator (after finishing pending work).
  ~NcclContext();
  NcclContext(const NcclContext&) = delete;
  NcclContext& operator=(const NcclContext&) = delete;

  /// \brief Rank in the NCCL communicator (equals the MPI rank).
  int rank() const;
  /// \brief Number of ranks.
  int size() const;
  /// \brief Version of the NCCL library loaded at run time, "major.minor.patch".
  std::string version() const;
  /// \brief True where MoKA was built with NCCL.
  static constexpr bool available() {
#ifdef MOKA_HAVE_NCCL
    return true;
#else
    return false;
#endif
  }

#ifdef MOKA_HAVE_NCCL
  /// \brief In-place sum over all ranks of \p data, enqueued on \p space's stream.
  /// \note Collective over the communicator. Returns without fencing.
  void allreduce_sum(const Kokkos::Cuda& space,
                     const Kokkos::View<float*, Kokkos::CudaSpace>& data) const;
#endif

 private:
  struct Impl;
  std::unique_ptr<Impl> m_impl;
};

}  // namespace moka
