#include <moka/core/Error.hpp>
#include <moka/core/Log.hpp>
#include <moka/core/Runtime.hpp>
#include <moka/core/Profiling.hpp>

#include <Kokkos_Core.hpp>

#ifdef MOKA_HAVE_HDF5
#include <hdf5.h>
#endif
#ifdef KOKKOS_ENABLE_CUDA
#include <cuda_runtime_api.h>
#endif
#ifdef MOKA_HAVE_NCCL
#include <nccl.h>
#endif
#ifdef KOKKOS_ENABLE_OPENMP
#include <omp.h>
#endif
#include <dlfcn.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <thread>
#include <iostream>
#include <sstream>
#include <string>

namespace moka {

namespace {

/// The host BLAS when it is OpenBLAS (found by its own symbols in the
/// process, so that no build depends on it): its configuration line and
/// its threading (0: sequential, 1: its own pthreads, 2: OpenMP); an
/// empty line when the process has no OpenBLAS.
struct HostBlas {
  std::string config;
  int parallel = -1;
};
HostBlas host_blas() {
  HostBlas b;
  using config_fn   = char* (*)();
  using parallel_fn = int (*)();
  if (auto f = reinterpret_cast<config_fn>(dlsym(RTLD_DEFAULT, "openblas_get_config"))) b.config = f();
  if (auto f = reinterpret_cast<parallel_fn>(dlsym(RTLD_DEFAULT, "openblas_get_parallel"))) b.parallel = f();
  while (!b.config.empty() && b.config.back() == ' ') b.config.pop_back();
  return b;
}

[[maybe_unused]] bool has_arg_prefix(int argc, char** argv, const char* prefix) {
  for (int i = 1; i < argc; ++i) {
    if (argv[i] && std::strncmp(argv[i], prefix, std::strlen(prefix)) == 0) return true;
  }
  return false;
}

#ifdef KOKKOS_ENABLE_CUDA
// The one raw CUDA call of the runtime: Kokkos must be told which device to
// take before it starts, so the count cannot come from Kokkos.
int visible_cuda_devices() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}
#endif

// CPUs this process may run on (its affinity mask: what the launcher or
// SLURM gave it), and a fingerprint of which ones.
struct CpuSet {
  int count = 1;
  unsigned long hash = 0;
};
CpuSet usable_cpus() {
  CpuSet c;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    c.count = CPU_COUNT(&set);
    for (int i = 0; i < CPU_SETSIZE; ++i)
      if (CPU_ISSET(i, &set)) c.hash = c.hash * 1000003ul + static_cast<unsigned long>(i + 1);
  } else {
    const long n = sysconf(_SC_NPROCESSORS_ONLN);
    c.count = n > 0 ? static_cast<int>(n) : 1;
  }
  return c;
}

}  // namespace

Runtime::Runtime(int& argc, char**& argv, RuntimeOptions options) {
  int mpi_init = 0;
  MPI_Initialized(&mpi_init);
  if (!mpi_init) {
    int provided = 0;
    MPI_Init_thread(&argc, &argv, options.mpi_thread_level, &provided);
    m_owns_mpi = true;
  }
  MPI_Comm_rank(MPI_COMM_WORLD, &m_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &m_size);
  // Host threads: the ranks of a node that share one set of CPUs share
  // them out; a rank bound to CPUs of its own (srun --cpus-per-task, or
  // mpirun's binding) takes those.
  const CpuSet cpus = usable_cpus();
  int node_cpus = cpus.count, same_set = 1;
  MPI_Comm node;
  {
    // The node communicator stays until the thread check below.
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, m_rank, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, &m_local_rank);
    MPI_Comm_size(node, &m_local_size);
    unsigned long lo = cpus.hash, hi = cpus.hash;
    MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_UNSIGNED_LONG, MPI_MIN, node);
    MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_UNSIGNED_LONG, MPI_MAX, node);
    same_set = lo == hi ? 1 : 0;
    const long online = sysconf(_SC_NPROCESSORS_ONLN);
    node_cpus = same_set ? cpus.count : std::max(cpus.count, static_cast<int>(online > 0 ? online : 1));
  }
  log::set_comm(MPI_COMM_WORLD);
  // MOKA_FENCE_REGIONS=1: every timed region fences, so the timer table a
  // driver prints at the end holds device time per stage (slower overall).
  if (const char* f = std::getenv("MOKA_FENCE_REGIONS")) set_fence_regions(std::string(f) == "1");

  if (!Kokkos::is_initialized()) {
#ifdef KOKKOS_ENABLE_CUDA
    // One GPU per rank on each node, unless the user chose one.
    if (!has_arg_prefix(argc, argv, "--kokkos-device") && !std::getenv("KOKKOS_DEVICE_ID")) {
      const int ndev = visible_cuda_devices();
      if (ndev > 0) {
        const std::string id = std::to_string(m_local_rank % ndev);
        setenv("KOKKOS_DEVICE_ID", id.c_str(), 0);
      }
    }
#endif
#ifdef KOKKOS_ENABLE_OPENMP
    // Unset, OpenMP would give every rank all the cores: 4 ranks on 2
    // cores ran the quick start 50x slower than with one thread each.
    if (!std::getenv("OMP_NUM_THREADS") && !has_arg_prefix(argc, argv, "--kokkos-threads") &&
        !has_arg_prefix(argc, argv, "--kokkos-num-threads")) {
      omp_set_num_threads(same_set ? std::max(1, cpus.count / m_local_size) : std::max(1, cpus.count));
      m_chose_threads = true;
    }
#endif
    Kokkos::initialize(argc, argv);
    m_owns_kokkos = true;
  }
  m_host_threads = Kokkos::DefaultHostExecutionSpace().concurrency();
  {
    // Ranks x threads beyond the CPUs: every parallel region waits for
    // threads that share a core (a warning from rank 0, about its node;
    // ranks alone beyond the CPUs, one thread each, are the launcher's
    // choice: tests oversubscribe on purpose).
    int node_threads = m_host_threads;
    MPI_Allreduce(MPI_IN_PLACE, &node_threads, 1, MPI_INT, MPI_SUM, node);
    MPI_Comm_free(&node);
    if (m_host_threads > 1 && node_threads > node_cpus)
      log::warn(m_local_size, " rank", m_local_size > 1 ? "s" : "", " x ", m_host_threads,
                " host threads exceed the ", node_cpus, " CPUs of the node (set OMP_NUM_THREADS to ",
                std::max(1, node_cpus / m_local_size), " or fewer, or leave it unset)");
    // OpenBLAS built with its own threads beside Kokkos's OpenMP threads:
    // two pools whose idle threads spin on each other's cores (1.4x slower
    // layer steps on 2 cores, docs/performance.md).
    if (m_host_threads > 1 && m_rank == 0 && host_blas().parallel == 1)
      log::warn("the host BLAS is OpenBLAS built with its own threads (", host_blas().config,
                "); beside Kokkos's OpenMP threads the two pools take each other's cores: link OpenBLAS's "
                "OpenMP build (Debian: libopenblas-openmp-dev; docs/building.md)");
  }

}

Runtime::~Runtime() {
  // Reverse order of start-up: Kokkos, then MPI.
  if (m_owns_kokkos && Kokkos::is_initialized()) Kokkos::finalize();
  int fin = 0;
  MPI_Finalized(&fin);
  if (m_owns_mpi && !fin) MPI_Finalize();
}

void Runtime::print_configuration(std::ostream& os) const {
  std::ostringstream out;
  char mpi_version[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  MPI_Get_library_version(mpi_version, &len);
  std::string mpiv(mpi_version, static_cast<std::size_t>(len));
  if (auto nl = mpiv.find('\n'); nl != std::string::npos) mpiv = mpiv.substr(0, nl);
  while (!mpiv.empty() && (mpiv.back() == ',' || mpiv.back() == ' ' || mpiv.back() == '\0')) mpiv.pop_back();

  out << "MoKA " << MOKA_VERSION_STRING << "\n";
  out << "MPI: " << m_size << " rank" << (m_size > 1 ? "s" : "") << ", " << mpiv << "\n";
  out << "Kokkos " << KOKKOS_VERSION / 10000 << "." << (KOKKOS_VERSION / 100) % 100 << "."
      << KOKKOS_VERSION % 100 << ", default execution space "
      << Kokkos::DefaultExecutionSpace::name() << ", host space "
      << Kokkos::DefaultHostExecutionSpace::name() << " (concurrency "
      << Kokkos::DefaultHostExecutionSpace().concurrency() << ")\n";
  out << "host threads per rank: " << m_host_threads << (m_chose_threads ? " (chosen: the node's CPUs over its " : "")
      << (m_chose_threads ? std::to_string(m_local_size) + " rank" + (m_local_size > 1 ? "s" : "") + ")" : "")
      << "\n";
#ifdef KOKKOS_ENABLE_CUDA
  {
    cudaDeviceProp prop;
    const int dev = Kokkos::Cuda().cuda_device();
    if (cudaGetDeviceProperties(&prop, dev) == cudaSuccess) {
      out << "CUDA device " << dev << ": " << prop.name << ", compute capability " << prop.major << "."
          << prop.minor << ", " << prop.multiProcessorCount << " SMs, "
          << (prop.totalGlobalMem >> 20) << " MiB\n";
    }
  }
#endif
#ifdef MOKA_HAVE_NCCL
  {
    int v = 0;
    ncclGetVersion(&v);  // NCCL >= 2.9: major * 10000 + minor * 100 + patch
    out << "NCCL " << v / 10000 << "." << (v / 100) % 100 << "." << v % 100
        << " (communicators made per run by comm.backend)\n";
  }
#else
  out << "NCCL: not built\n";
#endif
  {
    const HostBlas b = host_blas();
    if (!b.config.empty())
      out << "host BLAS: " << b.config << " ("
          << (b.parallel == 2 ? "OpenMP threads" : b.parallel == 1 ? "its own pthreads" : "sequential") << ")\n";
  }
#ifdef MOKA_HAVE_HDF5
  unsigned maj = 0, min = 0, rel = 0;
  H5get_libversion(&maj, &min, &rel);
  out << "HDF5 " << maj << "." << min << "." << rel
#ifdef MOKA_HDF5_IS_PARALLEL
      << " (parallel)\n";
#else
      << " (serial)\n";
#endif
#else
  out << "HDF5: not built\n";
#endif
  if (m_rank == 0) {
    os << out.str();
    // Kokkos' own listing of its build options is long: debug level only.
    if (log::level() >= log::Level::debug) Kokkos::print_configuration(os, false);
    os << std::flush;
  }
}

void Runtime::abort(const std::string& program, const std::exception& e, int code) {
  int init = 0, fin = 0, rank = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  if (init && !fin) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  // One write of the whole line: std::cerr is unbuffered, and piece by
  // piece mpirun's abort banner could land inside the line (seen in about
  // 1 of 20 runs of driver_rank_failure_aborts on a loaded machine).
  const std::string line = "[rank " + std::to_string(rank) + "] " + program + ": error: " + e.what() + "\n";
  std::cerr << line << std::flush;
  if (init && !fin) MPI_Abort(MPI_COMM_WORLD, code);
  std::exit(code);
}

std::string Runtime::device_name() {
#ifdef KOKKOS_ENABLE_CUDA
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, Kokkos::Cuda().cuda_device()) == cudaSuccess) return prop.name;
#endif
  std::string model = "unknown";
  std::ifstream is("/proc/cpuinfo");
  for (std::string line; std::getline(is, line);)
    if (line.compare(0, 10, "model name") == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) model = line.substr(line.find_first_not_of(" \t", colon + 1));
      break;
    }
  return "cpu: " + model + " (" + std::to_string(std::thread::hardware_concurrency()) + " cores)";
}

}  // namespace moka
