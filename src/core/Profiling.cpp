#include <moka/core/Profiling.hpp>
#include <moka/core/Error.hpp>

#ifdef KOKKOS_ENABLE_CUDA
#include <cuda_profiler_api.h>
#endif

#include <algorithm>
#include <iomanip>
#include <sstream>

namespace moka {

TimerTable& TimerTable::instance() {
  static TimerTable table;
  return table;
}

void TimerTable::add(const std::string& name, double seconds) {
  std::lock_guard<std::mutex> lock(m_mutex);
  TimerStats& s = m_table[name];
  s.seconds += seconds;
  s.calls += 1;
}

std::map<std::string, TimerStats> TimerTable::snapshot() const {
  std::lock_guard<std::mutex> lock(m_mutex);
  return m_table;
}

void TimerTable::clear() {
  std::lock_guard<std::mutex> lock(m_mutex);
  m_table.clear();
}

void TimerTable::report(MPI_Comm comm, std::ostream& os) const {
  const auto table = snapshot();
  int rank = 0, size = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &size);
  // Every rank must hold the same names in the same (sorted) order.
  const int n = static_cast<int>(table.size());
  int nmin = 0, nmax = 0;
  MPI_Allreduce(&n, &nmin, 1, MPI_INT, MPI_MIN, comm);
  MPI_Allreduce(&n, &nmax, 1, MPI_INT, MPI_MAX, comm);
  if (nmin != nmax) {
    if (rank == 0) os << "timers: ranks recorded different regions (" << nmin << " to " << nmax << "); no table\n";
    return;
  }
  std::vector<double> t;
  for (const auto& kv : table) t.push_back(kv.second.seconds);
  std::vector<double> tmin(t.size()), tmax(t.size()), tsum(t.size());
  MPI_Reduce(t.data(), tmin.data(), n, MPI_DOUBLE, MPI_MIN, 0, comm);
  MPI_Reduce(t.data(), tmax.data(), n, MPI_DOUBLE, MPI_MAX, 0, comm);
  MPI_Reduce(t.data(), tsum.data(), n, MPI_DOUBLE, MPI_SUM, 0, comm);
  if (rank != 0) return;
  std::size_t w = 6;
  for (const auto& kv : table) w = std::max(w, kv.first.size());
  std::ostringstream out;
  out << "Timers (seconds over " << size << " rank" << (size > 1 ? "s" : "") << "):\n";
  out << "  " << std::left << std::setw(static_cast<int>(w)) << "region" << std::right << std::setw(8)
      << "calls" << std::setw(12) << "min" << std::setw(12) << "mean" << std::setw(12) << "max\n";
  int i = 0;
  for (const auto& kv : table) {
    out << "  " << std::left << std::setw(static_cast<int>(w)) << kv.first << std::right << std::setw(8)
        << kv.second.calls << std::fixed << std::setprecision(6) << std::setw(12) << tmin[i]
        << std::setw(12) << tsum[i] / size << std::setw(12) << tmax[i] << "\n";
    ++i;
  }
  os << out.str();
}

namespace {
bool g_fence_regions = false;
}
void set_fence_regions(bool on) { g_fence_regions = on; }
bool fence_regions() { return g_fence_regions; }

void profiler_capture(bool on) {
  Kokkos::fence();
#ifdef KOKKOS_ENABLE_CUDA
  const cudaError_t rc = on ? cudaProfilerStart() : cudaProfilerStop();
  if (rc != cudaSuccess) (void)cudaGetLastError();  // not left for the next CUDA call to report
  MOKA_REQUIRE(rc == cudaSuccess, on ? "cudaProfilerStart" : "cudaProfilerStop", " failed: ", cudaGetErrorString(rc));
#else
  (void)on;
#endif
}

ScopedRegion::ScopedRegion(std::string name)
    : m_name(std::move(name)), m_start() {
  if (g_fence_regions) Kokkos::fence();
  m_start = std::chrono::steady_clock::now();
  Kokkos::Profiling::pushRegion(m_name);
}

ScopedRegion::~ScopedRegion() {
  if (g_fence_regions) Kokkos::fence();
  Kokkos::Profiling::popRegion();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - m_start).count();
  TimerTable::instance().add(m_name, s);
}

}  // namespace moka
