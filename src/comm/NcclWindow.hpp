#pragma once
// Internal to the NCCL backend (src/Comm.cpp): NCCL 2.28's device API for
// symmetric windows, behind plain functions so that nccl_device.h stays in
// src/NcclWindow.cpp. Built only with MOKA_HAVE_NCCL_DEVICE_API.

#include <cuda_runtime.h>
#include <nccl.h>

#include <memory>
#include <vector>

namespace moka {
namespace nccl_window {

/// A device communicator (ncclDevComm) with one LSA barrier per CTA of the
/// put kernel.
struct DeviceComm;

/// Whether every rank of \p comm is load/store accessible to this one, as
/// LSA rank == rank (so that window pointers index by communicator rank).
bool all_ranks_lsa(ncclComm_t comm, int rank, int size);

/// Creates the device communicator for a put kernel of \p grid CTAs
/// (collective over \p comm); nullptr and \p err set when NCCL refuses.
std::shared_ptr<DeviceComm> create(ncclComm_t comm, int grid, ncclResult_t& err);

/// Leaves \p dc to the communicator's abort (its destructor then frees nothing).
void abandon(DeviceComm& dc);

/// One contiguous run of bytes: from src (local) to byte dst of \p peer's
/// part of the window.
struct Task {
  int peer;
  long long src, dst, bytes;
};

/// Most tasks one put takes (they travel as kernel parameters).
int max_tasks();

/// Enqueues the put kernel on \p stream: barrier, every task (tiles spread
/// over the CTAs and the peers), barrier. Collective over the communicator.
void put(const DeviceComm& dc, ncclWindow_t window, const char* src, const std::vector<Task>& tasks,
         cudaStream_t stream);

}  // namespace nccl_window
}  // namespace moka
