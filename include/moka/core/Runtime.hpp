#pragma once
/// \file Runtime.hpp
/// \brief moka::Runtime, the scope guard that starts and stops MPI and
/// Kokkos in the right order (NCCL communicators are made by
/// moka::make_communicator and die before the guard).
///
/// \code
/// int main(int argc, char* argv[]) {
///   moka::Runtime runtime(argc, argv);   // MPI, then Kokkos
///   ...                                  // Views and communicators die before runtime
/// }                                      // Kokkos, then MPI
/// \endcode
///
/// Embedding: if MPI or Kokkos are already initialised by the host code, the
/// Runtime uses them and leaves finalisation to their owner.
///
/// GPU selection: on CUDA builds, each rank takes the GPU number
/// (node-local rank mod GPUs per node), unless the user passes
/// --kokkos-device-id or sets KOKKOS_DEVICE_ID.
///
/// Host threads: where neither OMP_NUM_THREADS nor a --kokkos-threads /
/// --kokkos-num-threads argument sets them, each rank of an OpenMP build
/// takes the cores of its node divided by the ranks on the node (at least
/// one); a warning names ranks x threads where they exceed the cores.
///
/// Host threads: where neither OMP_NUM_THREADS nor a --kokkos-threads /
/// --kokkos-num-threads argument sets them, each rank of an OpenMP build
/// takes the cores of its node divided by the ranks on the node (at least
/// one); a warning names ranks x threads where they exceed the cores.

#include <moka/core/Config.hpp>

#include <mpi.h>

#include <exception>
#include <memory>
#include <ostream>
#include <string>

namespace moka {

/// \brief What moka::Runtime starts.
struct RuntimeOptions {
  /// Thread level asked of MPI when MoKA initialises it.
  int mpi_thread_level = MPI_THREAD_FUNNELED;
};

/// \brief Scope guard for MPI, Kokkos and NCCL.
class Runtime {
 public:
  /// \brief Initialises MPI (unless already) and Kokkos (unless already).
  /// Kokkos' own arguments (--kokkos-*) are removed from argc/argv.
  /// \note Collective over MPI_COMM_WORLD.
  Runtime(int& argc, char**& argv, RuntimeOptions options = RuntimeOptions());
  /// \brief Finalises what this guard initialised: Kokkos, then MPI.
  ~Runtime();
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  /// \brief MPI_COMM_WORLD.
  MPI_Comm comm() const { return MPI_COMM_WORLD; }
  /// \brief Rank in MPI_COMM_WORLD.
  int rank() const { return m_rank; }
  /// \brief Size of MPI_COMM_WORLD.
  int size() const { return m_size; }
  /// \brief Rank among the processes of this node.
  int local_rank() const { return m_local_rank; }
  /// \brief Whether this guard called MPI_Init (and will call MPI_Finalize).
  bool owns_mpi() const { return m_owns_mpi; }
  /// \brief Whether this guard called Kokkos::initialize.
  bool owns_kokkos() const { return m_owns_kokkos; }
  /// \brief Number of processes on this node.
  int local_size() const { return m_local_size; }
  /// \brief Host threads per rank Kokkos runs with, and whether the runtime
  /// chose them (nothing set them and Kokkos was started here).
  int host_threads() const { return m_host_threads; }
  bool chose_host_threads() const { return m_chose_threads; }

  /// \brief Writes MoKA, MPI, Kokkos, NCCL (library version) and HDF5 configuration to \p os
  /// (call on every rank; only rank 0 writes).
  void print_configuration(std::ostream& os) const;

  /// \brief Prints "[rank r] <program>: error: <what>" to stderr and calls
  /// MPI_Abort, so one failing rank never leaves the others waiting.
  [[noreturn]] static void abort(const std::string& program, const std::exception& e,
                                 int code = 1);

  /// \brief What this rank computes on: the CUDA device's name ("NVIDIA
  /// H200"), or "cpu: <model name> (<N> cores)" from /proc/cpuinfo.
  static std::string device_name();

 private:
  bool m_owns_mpi    = false;
  bool m_owns_kokkos = false;
  int m_rank         = 0;
  int m_size         = 1;
  int m_local_rank   = 0;
  int m_local_size   = 1;
  int m_host_threads  = 1;
  bool m_chose_threads = false;
};

}  // namespace moka
