#include <moka/Error.hpp>
#include <moka/Log.hpp>
#include <moka/Runtime.hpp>

#include <Kokkos_Core.hpp>

#ifdef MOKA_HAVE_HDF5
#include <hdf5.h>
#endif
#ifdef KOKKOS_ENABLE_CUDA
#include <cuda_runtime_api.h>
#endif

#include <cstdlib>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>

namespace moka {

namespace {

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
  {
    MPI_Comm node;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, m_rank, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, &m_local_rank);
    MPI_Comm_size(node, &m_local_size);
    MPI_Comm_free(&node);
  }
  log::set_comm(MPI_COMM_WORLD);

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
    Kokkos::initialize(argc, argv);
    m_owns_kokkos = true;
  }

#ifdef MOKA_HAVE_NCCL
  if (options.init_nccl) {
    // NCCL needs a GPU of its own for every rank of a communicator; where
    // ranks share GPUs (tests oversubscribing a node) it is left out, the
    // same way on every rank.
    int enough = visible_cuda_devices() >= m_local_size ? 1 : 0, all_enough = 0;
    MPI_Allreduce(&enough, &all_enough, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (all_enough) {
      m_nccl = std::make_unique<NcclContext>(MPI_COMM_WORLD);
    } else {
      log::warn("NCCL not initialised: ", m_local_size, " ranks on a node share ", visible_cuda_devices(),
                " GPU(s), and NCCL needs one GPU per rank");
    }
  }
#else
  (void)options;
#endif
}

Runtime::~Runtime() {
  // Reverse order of start-up: NCCL needs the device, Kokkos needs nothing
  // but itself, MPI goes last.
  m_nccl.reset();
  if (m_owns_kokkos && Kokkos::is_initialized()) Kokkos::finalize();
  int fin = 0;
  MPI_Finalized(&fin);
  if (m_owns_mpi && !fin) MPI_Finalize();
}

NcclContext& Runtime::nccl() const {
  if (!m_nccl) {
    impl::fail(MOKA_FUNCTION, NcclContext::available()
                                  ? "NCCL was not initialised (RuntimeOptions::init_nccl = false)"
                                  : "MoKA was built without NCCL");
  }
  return *m_nccl;
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
      << Kokkos::DefaultHostExecutionSpace::concurrency() << ")\n";
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
  if (m_nccl) {
    out << "NCCL " << m_nccl->version() << ": communicator over " << m_nccl->size() << " ranks\n";
  } else {
    out << "NCCL: " << (NcclContext::available() ? "built, not initialised" : "not built") << "\n";
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

}  // namespace moka
