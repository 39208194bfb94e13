#pragma once
/// \file CommCheck.hpp
/// \brief A start-up check that the communicators work: one all-reduce over
/// MPI (host memory) and, where NCCL is up, one over NCCL (device memory),
/// each compared with the exact answer.

#include <moka/Runtime.hpp>

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

/// \brief Runs the check. \p nccl_elements floats are reduced over NCCL.
/// \note Collective over MPI_COMM_WORLD.
CommCheckResult check_communication(const Runtime& runtime, long nccl_elements = 1 << 20);

}  // namespace moka
