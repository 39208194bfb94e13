#include <moka/comm/CommCheck.hpp>
#include <moka/core/Profiling.hpp>

#include <Kokkos_Core.hpp>

#include <chrono>
#include <sstream>

namespace moka {

std::string CommCheckResult::summary() const {
  std::ostringstream os;
  os << "comm check: MPI all-reduce " << (mpi_ok ? "ok" : "WRONG");
  if (nccl_ran) {
    os << "; NCCL all-reduce of " << nccl_count << " floats " << (nccl_ok ? "ok" : "WRONG") << " ("
       << nccl_seconds * 1e3 << " ms)";
  } else {
    os << "; NCCL not used";
  }
  return os.str();
}

CommCheckResult check_communication(Communicator& comm, long nccl_elements) {
  ScopedRegion region("moka::check_communication");
  CommCheckResult r;
  const long n = comm.size();
  long mine = comm.rank() + 1, sum = 0;
  MPI_Allreduce(&mine, &sum, 1, MPI_LONG, MPI_SUM, comm.mpi_comm());
  int ok = sum == n * (n + 1) / 2 ? 1 : 0, all_ok = 0;
  MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, comm.mpi_comm());
  r.mpi_ok = all_ok == 1;

#ifdef MOKA_HAVE_NCCL
  if (comm.backend() == CommBackend::nccl) {
    r.nccl_ran   = true;
    r.nccl_count = nccl_elements;
    Kokkos::Cuda space;
    Kokkos::View<float*, Kokkos::CudaSpace> data("moka::comm_check", static_cast<size_t>(nccl_elements));
    const float rank1 = static_cast<float>(comm.rank() + 1);
    auto fill = [=]() {
      Kokkos::parallel_for(
          "moka::comm_check_fill", Kokkos::RangePolicy<Kokkos::Cuda>(space, 0, nccl_elements),
          KOKKOS_LAMBDA(long i) { data(i) = rank1 * static_cast<float>(1 + (i % 7)); });
    };
    fill();
    allreduce_sum(comm, space, data);  // warm-up
    fill();
    space.fence();
    MPI_Barrier(comm.mpi_comm());
    const auto t0 = std::chrono::steady_clock::now();
    allreduce_sum(comm, space, data);
    space.fence();
    r.nccl_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const float total = static_cast<float>(n * (n + 1) / 2);
    long bad = 0;
    Kokkos::parallel_reduce(
        "moka::comm_check_verify", Kokkos::RangePolicy<Kokkos::Cuda>(space, 0, nccl_elements),
        KOKKOS_LAMBDA(long i, long& b) {
          if (data(i) != total * static_cast<float>(1 + (i % 7))) ++b;
        },
        bad);
    r.nccl_bad = bad;
    int nok = bad == 0 ? 1 : 0, all_nok = 0;
    MPI_Allreduce(&nok, &all_nok, 1, MPI_INT, MPI_MIN, comm.mpi_comm());
    r.nccl_ok = all_nok == 1;
  }
#else
  (void)nccl_elements;
#endif
  return r;
}

}  // namespace moka
