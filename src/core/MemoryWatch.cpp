#include <moka/core/Error.hpp>
#include <moka/core/MemoryWatch.hpp>

#include <Kokkos_Core.hpp>

#include <algorithm>
#include <map>
#include <mutex>
#include <unordered_map>

namespace moka {

namespace {

namespace kt = Kokkos::Tools::Experimental;

struct Held {
  std::string space, label;
  long bytes = 0;
};

struct State {
  std::mutex mutex;
  bool active = false;
  kt::EventSet previous;
  std::unordered_map<const void*, Held> held;
  std::map<std::string, long> live, peak;
  // Per space: the live bytes of each label now, and as they were at the peak.
  std::map<std::string, std::map<std::string, long>> by_label, at_peak;
};

State& state() {
  static State s;
  return s;
}

void on_allocate(const Kokkos_Profiling_SpaceHandle handle, const char* label, const void* ptr, const uint64_t size) {
  State& s = state();
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    const std::string space(handle.name);
    const std::string name(label ? label : "");
    s.held[ptr] = Held{space, name, static_cast<long>(size)};
    s.by_label[space][name] += static_cast<long>(size);
    long& l = s.live[space];
    l += static_cast<long>(size);
    long& p = s.peak[space];
    if (l > p) {
      p              = l;
      s.at_peak[space] = s.by_label[space];
    }
  }
  if (s.previous.allocate_data) s.previous.allocate_data(handle, label, ptr, size);
}

void on_deallocate(const Kokkos_Profiling_SpaceHandle handle, const char* label, const void* ptr,
                   const uint64_t size) {
  State& s = state();
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    const auto it = s.held.find(ptr);
    if (it != s.held.end()) {
      s.live[it->second.space] -= it->second.bytes;
      auto& labels = s.by_label[it->second.space];
      if ((labels[it->second.label] -= it->second.bytes) == 0) labels.erase(it->second.label);
      s.held.erase(it);
    }
  }
  if (s.previous.deallocate_data) s.previous.deallocate_data(handle, label, ptr, size);
}

}  // namespace

MemoryWatch::MemoryWatch() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  MOKA_REQUIRE(!s.active, "moka::MemoryWatch: another watch is active in this process");
  MOKA_REQUIRE(Kokkos::is_initialized(), "moka::MemoryWatch: Kokkos is not initialized");
  s.active   = true;
  s.previous = kt::get_callbacks();
  s.held.clear();
  s.live.clear();
  s.peak.clear();
  s.by_label.clear();
  s.at_peak.clear();
  kt::set_allocate_data_callback(&on_allocate);
  kt::set_deallocate_data_callback(&on_deallocate);
}

MemoryWatch::~MemoryWatch() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  if (Kokkos::is_initialized()) {
    kt::set_allocate_data_callback(s.previous.allocate_data);
    kt::set_deallocate_data_callback(s.previous.deallocate_data);
  }
  s.active = false;
}

long MemoryWatch::live(const std::string& space) const {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  const auto it = s.live.find(space);
  return it == s.live.end() ? 0 : it->second;
}

long MemoryWatch::peak(const std::string& space) const {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  const auto it = s.peak.find(space);
  return it == s.peak.end() ? 0 : it->second;
}

void MemoryWatch::reset_peak() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  for (auto& [space, p] : s.peak) {
    p            = s.live[space];
    s.at_peak[space] = s.by_label[space];
  }
}

std::vector<std::pair<std::string, long>> MemoryWatch::peak_by_label(const std::string& space) const {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  std::vector<std::pair<std::string, long>> out;
  const auto it = s.at_peak.find(space);
  if (it != s.at_peak.end())
    for (const auto& [label, bytes] : it->second)
      if (bytes > 0) out.emplace_back(label, bytes);
  std::stable_sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.second > b.second; });
  return out;
}

}  // namespace moka
