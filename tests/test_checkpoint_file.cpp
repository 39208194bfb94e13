// The checkpoint file layer: datasets with checksums, attributes, written
// under a temporary name, verified, renamed; every damage named.
#include "TestHelpers.hpp"

#include <moka/io/CheckpointFile.hpp>

#include <gtest/gtest.h>
#include <hdf5.h>
#include <unistd.h>

#include <cmath>
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
  EXPECT_NE(error_of([&] { r.read_float("model/moe0/w1"); }).find("dataset 'model/moe0/w1' is float64, not float32"),
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
  EXPECT_NE(error_of([&] { w.write("a", std::vector<double>{1, 2}, {2}); }).find("dataset 'a' created twice"),
            std::string::npos);
  EXPECT_NE(error_of([&] { moka::CheckpointWriter bad("/no/such/dir/x.h5"); }).find("cannot create"),
            std::string::npos);
}

TEST(CheckpointFile, ChecksumPartsAddUp) {
  const std::vector<double> v{1, 2, 3, 4, 5, 6};
  const std::uint64_t whole = moka::checksum_part(v.data(), 6, 0);
  // Any split, in any order, gives the whole.
  EXPECT_EQ(moka::checksum_part(v.data() + 4, 2, 4) + moka::checksum_part(v.data(), 4, 0), whole);
  // An element's position counts: two values swapped change it; so does one bit.
  std::vector<double> s = v;
  std::swap(s[1], s[2]);
  EXPECT_NE(moka::checksum_part(s.data(), 6, 0), whole);
  std::vector<double> f = v;
  f[5] = std::nextafter(f[5], 7.0);
  EXPECT_NE(moka::checksum_part(f.data(), 6, 0), whole);
}

TEST(CheckpointFile, BlocksMakeTheDataset) {
  // A [3, 2, 4] dataset written as blocks (as ranks holding experts and
  // column slices do), read whole and in blocks; float read as double.
  const std::string p = scratch("blocks.h5");
  std::vector<float> all(24);
  for (int i = 0; i < 24; ++i) all[i] = 0.5f * i - 3;
  {
    moka::CheckpointWriter w(p);
    w.create<float>("e/w", {3, 2, 4});
    for (long e = 0; e < 3; ++e)
      for (long c0 : {0L, 2L}) {
        std::vector<float> b;
        for (long i = 0; i < 2; ++i)
          for (long c = c0; c < c0 + 2; ++c) b.push_back(all[(e * 2 + i) * 4 + c]);
        w.write_block<float>("e/w", {e, 0, c0}, {1, 2, 2}, b.data());
      }
    EXPECT_NE(error_of([&] { w.write_block<float>("e/w", {2, 0, 3}, {1, 2, 2}, all.data()); })
                  .find("block [3, 5) of dimension 2 outside dataset 'e/w' (extent 4)"),
              std::string::npos);
    EXPECT_NE(error_of([&] { w.write_block<double>("e/w", {0, 0, 0}, {1, 1, 1}, nullptr); })
                  .find("a block of float64 for dataset 'e/w' of float32"),
              std::string::npos);
    w.commit();
  }
  moka::CheckpointReader r(p);
  EXPECT_EQ(r.read<float>("e/w"), all);
  EXPECT_EQ(r.type("e/w"), moka::CheckpointType::float32);
  EXPECT_EQ(r.datasets(), (std::vector<std::string>{"e/w"}));
  const auto b = r.read_block<double>("e/w", {1, 1, 1}, {2, 1, 2});
  EXPECT_EQ(b, (std::vector<double>{all[13], all[14], all[21], all[22]}));
  EXPECT_EQ(r.checksum_rows("e/w", 0, 1) + r.checksum_rows("e/w", 1, 2), r.stored_checksum("e/w"));
  EXPECT_NE(error_of([&] { r.read_block<std::int64_t>("e/w", {0, 0, 0}, {1, 1, 1}); }).find("read as int64"),
            std::string::npos);
  std::remove(p.c_str());
}

}  // namespace
