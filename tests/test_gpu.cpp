// GPU checks (label gpu): the CUDA device Kokkos runs on, and the start-up
// communication check through an NCCL world communicator. Skipped where
// MoKA was built without CUDA/NCCL.
#include <moka/comm/CommCheck.hpp>
#include <moka/core/Runtime.hpp>

#include "TestHelpers.hpp"

#include <gtest/gtest.h>

#ifdef MOKA_HAVE_CUDA
#include <cuda_runtime_api.h>
#endif

#include <sstream>

using moka_test::world_size;

TEST(GPU, KokkosRunsOnCuda) {
#ifndef MOKA_HAVE_CUDA
  GTEST_SKIP() << "built without CUDA";
#else
  EXPECT_STREQ(Kokkos::DefaultExecutionSpace::name(), "Cuda");
  auto rt_ptr = moka_test::nested_runtime();
  const moka::Runtime& rt = *rt_ptr;
  std::ostringstream os;
  rt.print_configuration(os);
  if (rt.rank() == 0) {
    std::cout << os.str();
    EXPECT_NE(os.str().find("CUDA device"), std::string::npos);
  }
  // Each rank on its own GPU where there are enough of them.
  const int dev = Kokkos::Cuda().cuda_device();
  int ndev = 0;
  cudaGetDeviceCount(&ndev);
  EXPECT_EQ(dev, rt.local_rank() % ndev);
#endif
}

TEST(GPU, NcclCommCheck) {
#ifndef MOKA_HAVE_NCCL
  GTEST_SKIP() << "built without NCCL";
#else
  if (!moka::nccl_usable(MPI_COMM_WORLD)) GTEST_SKIP() << "ranks share a GPU: NCCL needs one per rank";
  auto world = moka::make_communicator(MPI_COMM_WORLD, moka::CommBackend::nccl);
  EXPECT_EQ(world->size(), world_size());
  const auto r = moka::check_communication(*world, 1 << 22);
  EXPECT_TRUE(r.mpi_ok);
  EXPECT_TRUE(r.nccl_ran);
  EXPECT_TRUE(r.nccl_ok) << r.summary();
  EXPECT_EQ(r.nccl_bad, 0);
  if (world->rank() == 0) std::cout << r.summary() << " on " << world_size() << " ranks\n";
#endif
}
