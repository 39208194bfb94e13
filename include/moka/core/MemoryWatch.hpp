#pragma once
/// \file MemoryWatch.hpp
/// \brief Live and peak bytes of Kokkos allocations per memory space.
///
/// `moka::MemoryWatch w;` listens to Kokkos Tools' allocate / deallocate
/// events for its lifetime (a tool library loaded through
/// KOKKOS_TOOLS_LIBS still receives them: the watch passes each event on)
/// and counts, per memory space name (`Kokkos::HostSpace::name()`,
/// `Kokkos::CudaSpace::name()`, ...), the bytes of the allocations made
/// while it watches that are still held, and their largest value since
/// the last reset_peak(). Allocations made before the watch are not seen.
/// One watch at a time per process (a second throws moka::Error).
/// `moka-bench` prints a layer step's peak device memory with it.

#include <string>
#include <utility>
#include <vector>

namespace moka {

class MemoryWatch {
 public:
  MemoryWatch();
  ~MemoryWatch();
  MemoryWatch(const MemoryWatch&) = delete;
  MemoryWatch& operator=(const MemoryWatch&) = delete;

  /// \brief Bytes held now in \p space (allocated while watching).
  long live(const std::string& space) const;
  /// \brief The largest live(space) since the watch began or reset_peak().
  long peak(const std::string& space) const;
  /// \brief Every space's peak becomes its live bytes.
  void reset_peak();
  /// \brief What \p space held at its peak, as (allocation label, bytes)
  /// summed over the allocations of each label, largest first: where the
  /// peak comes from.
  std::vector<std::pair<std::string, long>> peak_by_label(const std::string& space) const;
};

}  // namespace moka
