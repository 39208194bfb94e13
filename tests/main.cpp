// Test main shared by all MoKA test programs: starts MPI, Kokkos and (on
// GPU builds) NCCL through moka::Runtime, runs GoogleTest on every rank,
// prints results on rank 0 only, and fails on every rank if any rank failed.

#include <moka/core/Runtime.hpp>

#include <gtest/gtest.h>

int main(int argc, char* argv[]) {
  moka::Runtime runtime(argc, argv);
  ::testing::InitGoogleTest(&argc, argv);
  if (runtime.rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  const int local = RUN_ALL_TESTS();
  int global      = 0;
  MPI_Allreduce(&local, &global, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (global != 0 && local == 0) {
    // This rank passed, another failed: say so, since only rank 0 prints.
    std::cerr << "[rank " << runtime.rank() << "] passed, but another rank failed" << std::endl;
  }
  return global;
}
