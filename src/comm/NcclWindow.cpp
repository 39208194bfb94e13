// The NCCL backend's put kernel (NCCL 2.28 device API: symmetric windows,
// LSA barriers). Compiled as CUDA by Kokkos' nvcc_wrapper.
#include "NcclWindow.hpp"

#include <moka/core/Error.hpp>

#include <nccl_device.h>

#include <algorithm>
#include <cstdint>

namespace moka {
namespace nccl_window {

struct DeviceComm {
  ncclComm_t comm = nullptr;
  ncclDevComm dev{};
  int grid = 0;
  ~DeviceComm() {
    if (comm) ncclDevCommDestroy(comm, &dev);
  }
};

namespace {

constexpr int threads = 512;
// Tiles of 256 KB dealt round robin over the tasks (so every peer's link
// is busy at once), then over the CTAs. On 4 x H200 one task per peer at
// a time, all CTAs on it, reached 250 GB/s at 1 GB per rank; tiles spread
// over the peers 470 GB/s (NCCL's all-to-all: 440).
constexpr long long tile_bytes = 256 << 10;

template <int N>
struct TaskList {
  int n;
  long long max_tiles;  // tiles of the longest task
  Task t[N];
};

template <class V, int N>
__global__ void __launch_bounds__(threads) put_kernel(ncclDevComm dc, ncclWindow_t win, const char* src,
                                                       TaskList<N> list) {
  ncclLsaBarrierSession<ncclCoopCta> bar(ncclCoopCta(), dc, ncclTeamLsa(dc), dc.lsaBarrier, blockIdx.x);
  // Every rank has reached the put: its earlier reads of its part are done.
  bar.sync(ncclCoopCta(), cuda::memory_order_acq_rel);
  const long long tiles = list.max_tiles * list.n;
  for (long long t = blockIdx.x; t < tiles; t += gridDim.x) {
    const Task task     = list.t[t % list.n];
    const long long off = (t / list.n) * tile_bytes;
    if (off >= task.bytes) continue;
    const long long n = (task.bytes - off < tile_bytes ? task.bytes - off : tile_bytes) / sizeof(V);
    const V* s        = reinterpret_cast<const V*>(src + task.src + off);
    V* d              = reinterpret_cast<V*>(static_cast<char*>(ncclGetLsaPointer(win, task.dst + off, task.peer)));
    long long j       = threadIdx.x;
    // Four loads in flight per thread before the stores.
    for (; j + 3 * threads < n; j += 4 * threads) {
      const V a = s[j], b = s[j + threads], c = s[j + 2 * threads], e = s[j + 3 * threads];
      d[j]               = a;
      d[j + threads]     = b;
      d[j + 2 * threads] = c;
      d[j + 3 * threads] = e;
    }
    for (; j < n; j += threads) d[j] = s[j];
  }
  // Every rank's stores have landed before any rank's later work reads.
  bar.sync(ncclCoopCta(), cuda::memory_order_acq_rel);
}

template <class V, int N>
void launch(const DeviceComm& dc, ncclWindow_t win, const char* src, const std::vector<Task>& tasks,
            cudaStream_t stream) {
  static_assert(sizeof(ncclDevComm) + sizeof(ncclWindow_t) + sizeof(const char*) + sizeof(TaskList<N>) <= 32764,
                "the put kernel's parameters exceed CUDA's 32 KB");
  TaskList<N> list{};
  list.n         = 0;
  list.max_tiles = 0;
  for (const Task& t : tasks) {
    if (t.bytes <= 0) continue;
    list.t[list.n++] = t;
    list.max_tiles   = std::max(list.max_tiles, (t.bytes + tile_bytes - 1) / tile_bytes);
  }
  if (list.n == 0) list.n = 1;  // the barriers still run (max_tiles 0: no copies)
  put_kernel<V, N><<<dc.grid, threads, 0, stream>>>(dc.dev, win, src, list);
  const cudaError_t e = cudaGetLastError();
  MOKA_REQUIRE(e == cudaSuccess, "moka::Communicator (NCCL)::put: kernel launch failed: ", cudaGetErrorString(e));
}

template <class V>
void launch_sized(const DeviceComm& dc, ncclWindow_t win, const char* src, const std::vector<Task>& tasks,
                  cudaStream_t stream) {
  // The smallest parameter block that holds the tasks (up to 32 KB of
  // kernel parameters: CUDA 12.1 or later).
  if (tasks.size() <= 16) launch<V, 16>(dc, win, src, tasks, stream);
  else if (tasks.size() <= 128) launch<V, 128>(dc, win, src, tasks, stream);
  else launch<V, 960>(dc, win, src, tasks, stream);
}

}  // namespace

bool all_ranks_lsa(ncclComm_t comm, int rank, int size) {
  const ncclTeam_t lsa = ncclTeamLsa(comm);
  return lsa.nRanks == size && lsa.rank == rank;
}

std::shared_ptr<DeviceComm> create(ncclComm_t comm, int grid, ncclResult_t& err) {
  auto dc  = std::make_shared<DeviceComm>();
  dc->grid = grid;
  ncclDevCommRequirements req{};
  req.lsaBarrierCount = grid;
  err                 = ncclDevCommCreate(comm, &req, &dc->dev);
  if (err != ncclSuccess) return nullptr;
  dc->comm = comm;
  return dc;
}

void abandon(DeviceComm& dc) { dc.comm = nullptr; }

int max_tasks() { return 960; }

void put(const DeviceComm& dc, ncclWindow_t window, const char* src, const std::vector<Task>& tasks,
         cudaStream_t stream) {
  MOKA_REQUIRE(static_cast<int>(tasks.size()) <= max_tasks(), "moka::Communicator (NCCL)::put: ", tasks.size(),
               " puts in one call; at most ", max_tasks());
  // The widest access that every task's addresses and size allow.
  std::uintptr_t bits = 16;
  for (const Task& t : tasks)
    if (t.bytes > 0)
      bits |= reinterpret_cast<std::uintptr_t>(src + t.src) | static_cast<std::uintptr_t>(t.dst) |
              static_cast<std::uintptr_t>(t.bytes);
  const std::uintptr_t width = bits & (~bits + 1);  // lowest set bit, at most 16
  if (width >= 16) launch_sized<int4>(dc, window, src, tasks, stream);
  else if (width == 8) launch_sized<int2>(dc, window, src, tasks, stream);
  else if (width == 4) launch_sized<int>(dc, window, src, tasks, stream);
  else if (width == 2) launch_sized<short>(dc, window, src, tasks, stream);
  else launch_sized<char>(dc, window, src, tasks, stream);
}

}  // namespace nccl_window
}  // namespace moka
