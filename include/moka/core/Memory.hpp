#pragma once
/// \file Memory.hpp
/// \brief What a run will allocate, estimated from its settings before
/// anything is allocated, and what the machine has: a run that cannot fit
/// is refused with the keys and the bytes that make it large, instead of
/// failing inside an allocation named after an internal buffer.
///
/// The estimates are sums of the tensors a run allocates (see the
/// functions that fill them, moe_layer_memory and the drivers' checks);
/// workspaces that depend on routing are taken at their balanced size.

#include <string>
#include <vector>

namespace moka {

/// \brief A list of allocations, each with the deck keys that size it.
class MemoryEstimate {
 public:
  struct Item {
    std::string what;  ///< "expert weights, gradients and optimizer state"
    std::string keys;  ///< "moe.num_experts, moe.d_model, moe.d_ff, model.blocks"
    double bytes = 0;  ///< on one rank
    bool device  = true;  ///< in the device's memory (false: the host's)
  };
  /// \brief Adds \p bytes (any size: estimates are doubles, never overflow).
  void add(std::string what, std::string keys, double bytes, bool device = true) {
    m_items.push_back({std::move(what), std::move(keys), bytes, device});
  }
  const std::vector<Item>& items() const { return m_items; }
  /// \brief Bytes on one rank in the device's (\p device) or the host's memory.
  double total(bool device) const {
    double t = 0;
    for (const auto& i : m_items)
      if (i.device == device) t += i.bytes;
    return t;
  }

 private:
  std::vector<Item> m_items;
};

/// \brief "1.5 GiB", "312 MiB", "4.0 TiB".
std::string format_bytes(double bytes);

/// \brief Bytes the host can still give (MemAvailable of /proc/meminfo,
/// else the physical memory), for the whole node.
double host_memory_available();
/// \brief Bytes free on this rank's device (CUDA builds), or the host's
/// available memory where the default memory space is host memory.
double device_memory_available();

/// \brief Throws moka::Error when \p estimate does not fit: the device part
/// in this rank's device (device builds), the host part times
/// \p ranks_on_node in the node's memory. The message names the total, what
/// is available, and the items largest first with their keys.
/// \p what_runs: "the run", "the benchmark".
void check_memory_fits(const MemoryEstimate& estimate, int ranks_on_node, const std::string& what_runs);

}  // namespace moka
