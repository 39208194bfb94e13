// Bad routing-trace files (tried as a user would: forged dimensions, a
// huge declared size, all-zero counts, /counts as a group, wrong rank):
// each is a moka::Error naming the file and what is wrong, before any
// large allocation.
#include <moka/io/RoutingTrace.hpp>
#include <moka/moe/MoELayer.hpp>

#include <gtest/gtest.h>
#include <hdf5.h>

#include "TestHelpers.hpp"

#include <cstdio>
#include <functional>
#include <string>
#include <unistd.h>
#include <vector>

namespace {

std::string temp_path(const std::string& name) {
  return "/tmp/moka_trace_" + std::to_string(getpid()) + "_" + std::to_string(moka_test::world_rank()) + "_" + name;
}

/// A file whose /counts has \p dims (chunked, nothing written unless \p fill).
std::string write_counts(const std::string& name, std::vector<hsize_t> dims, bool fill = false, int value = 0) {
  const std::string path = temp_path(name);
  hid_t f  = H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  hid_t sp = H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr);
  hid_t pl = H5Pcreate(H5P_DATASET_CREATE);
  std::vector<hsize_t> chunk(dims.size(), 1);
  chunk.back() = dims.back();
  H5Pset_chunk(pl, static_cast<int>(chunk.size()), chunk.data());
  hid_t d = H5Dcreate2(f, "counts", H5T_STD_I32LE, sp, H5P_DEFAULT, pl, H5P_DEFAULT);
  EXPECT_GE(d, 0) << name;
  if (fill) {
    hsize_t n = 1;
    for (hsize_t v : dims) n *= v;
    std::vector<int> data(n, value);
    H5Dwrite(d, H5T_NATIVE_INT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data());
  }
  H5Dclose(d);
  H5Pclose(pl);
  H5Sclose(sp);
  H5Fclose(f);
  return path;
}

using moka_test::error_of;

TEST(TraceFiles, ForgedDimensionsThatOverflow) {
  const std::string p = write_counts("overflow.h5", {hsize_t(1) << 33, hsize_t(1) << 31, 1, 1, 4});
  const std::string e = error_of([&] { moka::read_routing_trace(p); });
  EXPECT_NE(e.find("'" + p + "': /counts declares more elements than can be addressed ([8589934592][2147483648][1][1][4])"),
            std::string::npos)
      << e;
  std::remove(p.c_str());
}

TEST(TraceFiles, DeclaredSizeBeyondTheFile) {
  const std::string p = write_counts("huge.h5", {1000, 1000, 100, 10, 32});  // 128 GB declared
  const std::string e = error_of([&] { moka::read_routing_trace(p); });
  EXPECT_NE(e.find("'" + p + "': /counts declares [1000][1000][100][10][32] int32 values (128000000000 bytes), more "
                   "than a"),
            std::string::npos)
      << e;
  std::remove(p.c_str());
}

TEST(TraceFiles, AllZeroCountsNameTheFile) {
  const std::string p = write_counts("zero.h5", {2, 2, 1, 1, 4}, true, 0);
  moka::MoEConfig cfg;
  cfg.num_experts = 4;
  cfg.gate = moka::GateType::trace;
  cfg.trace_file = p;
  const std::string e = error_of([&] { moka::MoELayer<double, Kokkos::HostSpace> L(cfg); });
  EXPECT_NE(e.find("gate.trace_file '" + p + "': layer 0, iteration row 0 of /counts holds no assignments"),
            std::string::npos)
      << e;
  // A readable row, but the layer index past the file's layers.
  cfg.trace_layer = 3;
  const std::string e2 = error_of([&] { moka::MoELayer<double, Kokkos::HostSpace> L(cfg); });
  EXPECT_NE(e2.find("gate.trace_file '" + p + "' has 1 layers; gate.trace_layer (plus the block index) = 3 is past them"),
            std::string::npos)
      << e2;
  std::remove(p.c_str());
}

TEST(TraceFiles, CountsAsAGroupOrOfTheWrongRank) {
  const std::string g = temp_path("group.h5");
  hid_t f  = H5Fcreate(g.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  hid_t gr = H5Gcreate2(f, "counts", H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  H5Gclose(gr);
  H5Fclose(f);
  std::string e = error_of([&] { moka::read_routing_trace(g); });
  EXPECT_NE(e.find("'" + g + "': /counts is not a dataset"), std::string::npos) << e;
  std::remove(g.c_str());
  const std::string r = write_counts("rank4.h5", {2, 2, 1, 4}, true, 1);
  e = error_of([&] { moka::read_routing_trace(r); });
  EXPECT_NE(e.find("'" + r + "': /counts has 4 dimensions, expected 5"), std::string::npos) << e;
  std::remove(r.c_str());
  const std::string z = write_counts("empty_axis.h5", {2, 0, 1, 1, 4});
  e = error_of([&] { moka::read_routing_trace(z); });
  EXPECT_NE(e.find("/counts has no source ranks (dimension 1 is 0)"), std::string::npos) << e;
  std::remove(z.c_str());
}

TEST(TraceFiles, GoodFixtureStillReads) {
  const moka::RoutingTrace t = moka::read_routing_trace(moka_test::data_file("gpt_moe_32e_cut.h5"));
  EXPECT_EQ(t.n_iter, 10);
  EXPECT_EQ(t.iterations.size(), 10u);
  EXPECT_EQ(t.iterations.back(), 5001);
}

}  // namespace
