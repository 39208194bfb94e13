#include <moka/core/Error.hpp>
#include <moka/core/Memory.hpp>

#include <Kokkos_Core.hpp>

#ifdef KOKKOS_ENABLE_CUDA
#include <cuda_runtime_api.h>
#endif

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <unistd.h>

namespace moka {

std::string format_bytes(double bytes) {
  const char* unit[] = {"bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  while (bytes >= 1024 && u < 6) {
    bytes /= 1024;
    ++u;
  }
  char buf[64];
  if (u == 0) std::snprintf(buf, sizeof(buf), "%.0f %s", bytes, unit[u]);
  else std::snprintf(buf, sizeof(buf), bytes < 10 ? "%.1f %s" : "%.0f %s", bytes, unit[u]);
  return buf;
}

double host_memory_available() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  double kb = 0;
  std::string unit;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return kb * 1024.0;
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? double(pages) * double(page) : 0.0;
}

double device_memory_available() {
#ifdef KOKKOS_ENABLE_CUDA
  // The one question Kokkos 3.4 cannot answer portably: free device memory.
  std::size_t free_bytes = 0, total = 0;
  if (cudaMemGetInfo(&free_bytes, &total) == cudaSuccess) return double(free_bytes);
  (void)cudaGetLastError();
  return 0.0;
#else
  return host_memory_available();
#endif
}

void check_memory_fits(const MemoryEstimate& estimate, int ranks_on_node, const std::string& what_runs) {
  const bool device_build = !Kokkos::SpaceAccessibility<Kokkos::HostSpace, Kokkos::DefaultExecutionSpace::memory_space>::accessible;
  auto describe = [&](bool device, double need, double have, const std::string& where) {
    std::vector<MemoryEstimate::Item> items;
    for (const auto& i : estimate.items())
      if (i.device == device || !device_build) items.push_back(i);
    std::sort(items.begin(), items.end(), [](const auto& a, const auto& b) { return a.bytes > b.bytes; });
    std::ostringstream os;
    os << what_runs << " needs about " << format_bytes(need) << " " << where << ", more than the "
       << format_bytes(have) << " available:";
    for (const auto& i : items)
      if (i.bytes >= 0.01 * need) os << "\n  " << format_bytes(i.bytes) << " " << i.what << " (" << i.keys << ")";
    os << "\n  (an estimate from the deck; make the keys above smaller or spread the run over more ranks)";
    return os.str();
  };
  const int r = std::max(1, ranks_on_node);
  if (device_build) {
    const double need = estimate.total(true), have = device_memory_available();
    if (need > have) throw Error(describe(true, need, have, "of device memory per rank"));
    const double hneed = estimate.total(false) * r, hhave = host_memory_available();
    if (hneed > hhave)
      throw Error(describe(false, hneed, hhave, "of host memory on the node (" + std::to_string(r) + " ranks)"));
  } else {
    const double need = (estimate.total(true) + estimate.total(false)) * r, have = host_memory_available();
    if (need > have)
      throw Error(describe(true, need, have,
                           "of memory on the node (" + std::to_string(r) + " rank" + (r > 1 ? "s" : "") + ")"));
  }
}

}  // namespace moka
