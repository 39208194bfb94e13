// The runtime guard, logging, timers and the communication check, at 1, 2
// and 4 ranks.
#include <moka/comm/CommCheck.hpp>
#include <moka/core/Log.hpp>
#include <moka/core/Profiling.hpp>
#include <moka/core/Runtime.hpp>

#include "TestHelpers.hpp"

#include <gtest/gtest.h>

#include <sstream>
#include <string>
#include <vector>

using moka_test::world_rank;
using moka_test::world_size;

TEST(Runtime, KokkosAndMpiAreUp) {
  int init = 0;
  MPI_Initialized(&init);
  EXPECT_TRUE(init);
  EXPECT_TRUE(Kokkos::is_initialized());
  EXPECT_EQ(moka::log::rank(), world_rank());
}

TEST(Runtime, NestedGuardDoesNotReinitialise) {
  // An embedding code that already started MPI and Kokkos can still make a
  // Runtime; it must neither re-initialise nor finalise them.
  {
    auto inner_ptr = moka_test::nested_runtime();
    const moka::Runtime& inner = *inner_ptr;
    EXPECT_FALSE(inner.owns_mpi());
    EXPECT_FALSE(inner.owns_kokkos());
    EXPECT_EQ(inner.rank(), world_rank());
    EXPECT_EQ(inner.size(), world_size());
  }
  EXPECT_TRUE(Kokkos::is_initialized());
  int fin = 0;
  MPI_Finalized(&fin);
  EXPECT_FALSE(fin);
}

TEST(Runtime, CommCheckMpi) {
  auto world = moka::make_communicator(MPI_COMM_WORLD, moka::CommBackend::mpi);
  const auto r = moka::check_communication(*world, 1024);
  EXPECT_TRUE(r.mpi_ok);
  EXPECT_FALSE(r.nccl_ran);
  EXPECT_NE(r.summary().find("MPI all-reduce ok"), std::string::npos);
}

TEST(Runtime, ConfigurationNamesTheBackends) {
  auto rt = moka_test::nested_runtime();
  std::ostringstream os;
  rt->print_configuration(os);
  if (world_rank() == 0) {
    const std::string s = os.str();
    EXPECT_NE(s.find("MoKA " MOKA_VERSION_STRING), std::string::npos) << s;
    EXPECT_NE(s.find("MPI: " + std::to_string(world_size()) + " rank"), std::string::npos) << s;
    EXPECT_NE(s.find(Kokkos::DefaultExecutionSpace::name()), std::string::npos) << s;
    EXPECT_NE(s.find("HDF5"), std::string::npos) << s;
    EXPECT_NE(s.find("host threads per rank: " + std::to_string(rt->host_threads())), std::string::npos) << s;
  } else {
    EXPECT_TRUE(os.str().empty());
  }
}

TEST(Timers, RegionsAccumulateAndReportOverRanks) {
  moka::TimerTable::instance().clear();
  for (int i = 0; i < 3; ++i) {
    moka::ScopedRegion r("test::region");
  }
  { moka::ScopedRegion r("test::other"); }
  auto snap = moka::TimerTable::instance().snapshot();
  ASSERT_EQ(snap.count("test::region"), 1u);
  EXPECT_EQ(snap["test::region"].calls, 3);
  EXPECT_GE(snap["test::region"].seconds, 0.0);
  std::ostringstream os;
  moka::TimerTable::instance().report(MPI_COMM_WORLD, os);
  if (world_rank() == 0) {
    EXPECT_NE(os.str().find("test::region"), std::string::npos) << os.str();
    EXPECT_NE(os.str().find(std::to_string(world_size()) + " rank"), std::string::npos) << os.str();
  } else {
    EXPECT_TRUE(os.str().empty());
  }
  moka::TimerTable::instance().clear();
}

TEST(Log, OnlyRankZeroPrintsInfo) {
  testing::internal::CaptureStdout();
  moka::log::info("hello from ", world_rank());
  const std::string out = testing::internal::GetCapturedStdout();
  if (world_rank() == 0) {
    EXPECT_EQ(out, "hello from 0\n");
  } else {
    EXPECT_TRUE(out.empty()) << out;
  }
  EXPECT_THROW(moka::log::level_from_string("verbose"), moka::Error);
  const auto old = moka::log::level();
  moka::log::set_level(moka::log::Level::error);
  testing::internal::CaptureStdout();
  moka::log::info("suppressed");
  EXPECT_TRUE(testing::internal::GetCapturedStdout().empty());
  moka::log::set_level(old);
}

namespace {
std::vector<std::string> g_regions;
int g_pops = 0;
void record_push(const char* name) { g_regions.emplace_back(name); }
void record_pop() { ++g_pops; }
}  // namespace

TEST(Timers, RegionsAreVisibleToKokkosTools) {
  // A Kokkos tool sees MoKA's regions through the profiling callbacks.
  g_regions.clear();
  g_pops = 0;
  Kokkos::Tools::Experimental::set_push_region_callback(record_push);
  Kokkos::Tools::Experimental::set_pop_region_callback(record_pop);
  {
    moka::ScopedRegion outer("moka::test::outer");
    moka::ScopedRegion inner("moka::test::inner");
  }
  Kokkos::Tools::Experimental::set_push_region_callback(nullptr);
  Kokkos::Tools::Experimental::set_pop_region_callback(nullptr);
  ASSERT_EQ(g_regions.size(), 2u);
  EXPECT_EQ(g_regions[0], "moka::test::outer");
  EXPECT_EQ(g_regions[1], "moka::test::inner");
  EXPECT_EQ(g_pops, 2);
  moka::TimerTable::instance().clear();
}
