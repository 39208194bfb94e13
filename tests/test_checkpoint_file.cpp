// The checkpoint file layer: datasets with checksums, attributes, written
// under a temporary name, verified, renamed; every damage named.
#include "TestHelpers.hpp"

#include <moka/io/CheckpointFile.hpp>

#include <gtest/gtest.h>
#include <hdf5.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

namespace {

using moka_test::error_of;

std::string scratch(const std::string& name) {
  return (std::filesystem::temp_directory_path() / ("moka_ckpt_" + std::to_string(getpid()) + "_" + name)).string();
}

void write_sample(const std::string& p) {
  moka::CheckpointWriter w(p);
  w.write("model/moe0/w1", std::vector<double>{1.5, -2.25, 3, 4, 5, 6}, {2, 3});
  w.write("optimizer/steps", std::vector<std::int64_t>{42}, {1});
  w.write("f", std::vector<float>{0.5f, 0.25f}, {2});
  w.attribute("deck", "moe.num_experts = 8\n");
  w.commit();
}

TEST(CheckpointFile, RoundTripThroughATemporaryName) {
  const std::string p = scratch("round.h5");
  write_sample(p);
  EXPECT_TRUE(std::filesystem::exists(p));
  EXPECT_FALSE(std::filesystem::exists(p + ".tmp"));
  moka::CheckpointReader r(p);
  EXPECT_EQ(r.read_double("model/moe0/w1"), (std::vector<double>{1.5, -2.25, 3, 4, 5, 6}));
  EXPECT_EQ(r.shape("model/moe0/w1"), (std::vector<long>{2, 3}));
  EXPECT_EQ(r.read_int64("optimizer/steps"), (std::vector<std::int64_t>{42}));
  EXPECT_EQ(r.read_float("f"), (std::vector<float>{0.5f, 0.25f}));
  EXPECT_EQ(r.attribute("deck"), "moe.num_experts = 8\n");
  EXPECT_TRUE(r.has("model/moe0/w1"));
  EXPECT_FALSE(r.has("model/moe1/w1"));
  std::remove(p.c_str());
}

TEST(CheckpointFile, AnUncommittedWriterLeavesTheOldFile) {
  const std::string p = scratch("keep.h5");
  write_sample(p);
  {
    moka::CheckpointWriter w(p);
    w.write("model/moe0/w1", std::vector<double>{9, 9}, {2});
    // no commit: as if the run died mid-write
  }
  EXPECT_FALSE(std::filesystem::exists(p + ".tmp"));
  moka::CheckpointReader r(p);
  EXPECT_EQ(r.read_double("model/moe0/w1").size(), 6u);
  std::remove(p.c_str());
}

TEST(CheckpointFile, DamageIsNamed) {
  const std::string p = scratch("damage.h5");
  write_sample(p);
  // Values changed behind the checksum's back (flipped bytes in a dataset).
  {
    hid_t f = H5Fopen(p.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    hid_t d = H5Dopen2(f, "model/moe0/w1", H5P_DEFAULT);
    const double v[6] = {1.5, -2.25, 3, 4, 5, 6.0000001};
    H5Dwrite(d, H5T_NATIVE_DOUBLE, H5S_ALL, H5S_ALL, H5P_DEFAULT, v);
    H5Dclose(d);
    H5Fclose(f);
  }
  moka::CheckpointReader r(p);
  EXPECT_NE(error_of([&] { r.read_double("model/moe0/w1"); })
                .find("dataset 'model/moe0/w1' does not match its checksum (the file is damaged)"),
            std::string::npos);
  EXPECT_NE(error_of([&] { r.read_double("model/moe0/w2"); }).find("no dataset 'model/moe0/w2'"), std::string::npos);
  EXPECT_NE(error_of([&] { r.read_float("model/moe0/w1"); }).find("dataset 'model/moe0/w1' is not float32"),
            std::string::npos);
  EXPECT_NE(error_of([&] { r.attribute("version"); }).find("no attribute 'version'"), std::string::npos);
  // A truncated file.
  const std::string t = scratch("truncated.h5");
  std::filesystem::copy_file(p, t, std::filesystem::copy_options::overwrite_existing);
  std::filesystem::resize_file(t, std::filesystem::file_size(t) / 2);
  const std::string e = error_of([&] {
    moka::CheckpointReader rt(t);
    rt.read_double("model/moe0/w1");
  });
  EXPECT_NE(e.find("checkpoint '" + t + "'"), std::string::npos) << e;
  EXPECT_NE(error_of([&] { moka::CheckpointReader rn(scratch("none.h5")); }).find("cannot open it"),
            std::string::npos);
  // Not HDF5 at all.
  const std::string x = scratch("text.h5");
  std::ofstream(x) << "not a checkpoint\n";
  EXPECT_NE(error_of([&] { moka::CheckpointReader rx(x); }).find("not a readable HDF5 file"), std::string::npos);
  for (const auto& f : {p, t, x}) std::remove(f.c_str());
}

TEST(CheckpointFile, BadWritesAreNamed) {
  const std::string p = scratch("bad.h5");
  moka::CheckpointWriter w(p);
  EXPECT_NE(error_of([&] { w.write("a", std::vector<double>{1, 2, 3}, {2, 2}); }).find("has 3 values for a shape of 4"),
            std::string::npos);
  w.write("a", std::vector<double>{1, 2}, {2});
  EXPECT_NE(error_of([&] { w.write("a", std::vector<double>{1, 2}, {2}); }).find("cannot create dataset 'a'"),
            std::string::npos);
  EXPECT_NE(error_of([&] { moka::CheckpointWriter bad("/no/such/dir/x.h5"); }).find("cannot create"),
            std::string::npos);
}

TEST(CheckpointFile, Checksum) {
  const char a[] = "abc";
  EXPECT_EQ(moka::checksum64(a, 3), 0xe71fa2190541574bull);  // FNV-1a 64 of "abc"
  EXPECT_NE(moka::checksum64(a, 3), moka::checksum64(a, 2));
}

}  // namespace
