// GPU checks (label gpu): the CUDA device Kokkos runs on, and an NCCL
// all-reduce through the communicator moka::Runtime created. Skipped where
// MoKA was built without CUDA/NCCL.
#include <moka/CommCheck.hpp>
#include <moka/Runtime.hpp>

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
  auto rt_ptr = moka_test::nested_runtime(false);
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

TEST(GPU, NcclAllReduceThroughRuntime) {
#ifndef MOKA_HAVE_NCCL
  GTEST_SKIP() << "built without NCCL";
#else
  // A second NCCL communicator over the same ranks, made by a nested guard.
  auto rt_ptr = moka_test::nested_runtime(true);
  const moka::Runtime& rt = *rt_ptr;
  int ndev = 0;
  cudaGetDeviceCount(&ndev);
  if (ndev < rt.local_size()) {
    EXPECT_FALSE(rt.has_nccl());
    GTEST_SKIP() << rt.local_size() << " ranks share " << ndev << " GPUs: NCCL needs one per rank";
  }
  ASSERT_TRUE(rt.has_nccl());
  EXPECT_EQ(rt.nccl().size(), world_size());
  const auto r = moka::check_communication(rt, 1 << 22);
  EXPECT_TRUE(r.mpi_ok);
  EXPECT_TRUE(r.nccl_ran);
  EXPECT_TRUE(r.nccl_ok) << r.summary();
  EXPECT_EQ(r.nccl_bad, 0);
  if (rt.rank() == 0) std::cout << r.summary() << " on " << world_size() << " ranks\n";
#endif
}
