#pragma once
/// \file CommCheck.hpp
/// \brief A start-up check that a communicator works: one all-reduce over
/// its MPI communicator (host memory) and, where it is an NCCL one, one
/// through NCCL (device memory), each compared with the exact answer.

#include <moka/comm/Communicator.hpp>

#include <string>

namespace moka {

/// \brief Outcome of check_communication().
struct CommCheckResult {
  bool mpi_ok     = false;  ///< MPI all-reduce gave the exact sum
  bool nccl_ran   = false;  ///< an NCCL all-reduce was attempted
  bool nccl_ok    = false;  ///< and gave the exact sum in every element
  long nccl_count = 0;      ///< elements reduced over NCCL
  long nccl_bad   = 0;      ///< elements that came back wrong (on this rank)
  double nccl_seconds = 0;  ///< time of the NCCL all-reduce (after a warm-up)
  /// \brief One line for the log.
  std::string summary() const;
};

/// \brief Runs the check over \p comm (the run's world communicator: the
/// check uses the communicators the run itself uses, no second NCCL
/// bring-up). \p nccl_elements floats are reduced over NCCL.
/// \note Collective over \p comm.
CommCheckResult check_communication(Communicator& comm, long nccl_elements = 1 << 20);

}  // namespace moka
