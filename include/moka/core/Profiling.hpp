#pragma once
/// \file Profiling.hpp
/// \brief Timing regions that Kokkos tools see, and a wall-clock table.
///
/// `moka::ScopedRegion r("moka::MoELayer::forward");` pushes a Kokkos
/// profiling region (visible to Kokkos tools such as the space-time stack or
/// nvtx connector) for its lifetime and adds its host wall time to a
/// process-wide table, which moka::TimerTable::report() prints on rank 0 with
/// min / mean / max over ranks.
///
/// The timer measures host time between construction and destruction; work
/// launched asynchronously on a device is counted only where the code inside
/// the region fences its execution-space instance before the region ends.

#include <mpi.h>

#include <Kokkos_Core.hpp>

#include <chrono>
#include <map>
#include <mutex>
#include <ostream>
#include <string>
#include <vector>

namespace moka {

/// \brief Accumulated wall time and call count of one named region.
struct TimerStats {
  double seconds = 0.0;  ///< total seconds
  long calls     = 0;    ///< number of completed regions
};

/// \brief Process-wide table of region timings.
class TimerTable {
 public:
  /// \brief The one table of this process.
  static TimerTable& instance();
  /// \brief Adds \p seconds to region \p name.
  void add(const std::string& name, double seconds);
  /// \brief A copy of the table.
  std::map<std::string, TimerStats> snapshot() const;
  /// \brief Forgets all regions.
  void clear();
  /// \brief Prints the table on rank 0 of \p comm: calls, min/mean/max seconds over ranks.
  /// \note Collective over \p comm. Every rank must have the same region names.
  void report(MPI_Comm comm, std::ostream& os) const;

 private:
  mutable std::mutex m_mutex;
  std::map<std::string, TimerStats> m_table;
};

/// \brief With \p on, every ScopedRegion fences all execution spaces when it
/// ends, so the timer table holds device time per region (for breakdowns
/// such as `moka-bench bench.breakdown=true`; it serialises the work).
void set_fence_regions(bool on);
/// \brief Whether regions fence (see set_fence_regions).
bool fence_regions();

/// \brief Starts (\p on) or stops the device profiler's capture: on CUDA
/// builds cudaProfilerStart / cudaProfilerStop, which `ncu
/// --profile-from-start off` and `nsys profile --capture-range=cudaProfilerApi`
/// follow, recording only the work launched in between (run without a
/// profiler, the calls do nothing); nothing on host builds. Fences all
/// execution spaces first, so that a range holds exactly the work launched
/// inside it. Throws moka::Error when the CUDA call fails.
void profiler_capture(bool on);

/// \brief RAII profiling region: a Kokkos region plus a wall-clock timer.
class ScopedRegion {
 public:
  /// \brief Opens region \p name.
  explicit ScopedRegion(std::string name);
  ScopedRegion(const ScopedRegion&) = delete;
  ScopedRegion& operator=(const ScopedRegion&) = delete;
  /// \brief Closes the region and records its time.
  ~ScopedRegion();

 private:
  std::string m_name;
  std::chrono::steady_clock::time_point m_start;
};

}  // namespace moka
