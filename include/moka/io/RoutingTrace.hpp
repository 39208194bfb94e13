#pragma once
/// \file RoutingTrace.hpp
/// \brief Expert-routing traces in HDF5 (the format of shared/traces):
/// `/counts` int32 [iterations][source ranks][layers][micro-batches][experts],
/// `/iterations` int32 [iterations], root attributes `top_k`, `num_experts`.
///
/// Reading uses the serial HDF5 API on each rank (read-only), so it works
/// with serial and parallel HDF5 builds alike.

#include <cstdint>
#include <string>
#include <vector>

namespace moka {

/// \brief One trace file in memory.
struct RoutingTrace {
  std::string path;
  std::vector<std::int32_t> counts;     ///< row-major over the five axes
  std::vector<std::int32_t> iterations; ///< training iteration of each row
  long n_iter = 0, n_ranks = 0, n_layers = 0, n_micro = 0, n_experts = 0;
  long top_k = 0;

  /// \brief Per-expert assignments of one iteration row and layer, summed
  /// over source ranks and micro-batches. \p iteration_row -1 means the last.
  std::vector<long> expert_counts(long iteration_row, long layer) const;
  /// \brief As expert_counts, per source rank: [n_ranks][experts].
  std::vector<std::vector<long>> source_counts(long iteration_row, long layer) const;
};

/// \brief Reads \p path; throws moka::Error naming the file and what is
/// wrong (missing file or dataset, wrong rank, inconsistent attributes).
RoutingTrace read_routing_trace(const std::string& path);

/// \brief Scales \p counts to sum to \p total by largest remainders (ties to
/// the lower expert), keeping proportions as closely as integers allow.
std::vector<long> scale_counts(const std::vector<long>& counts, long total);

}  // namespace moka
