// cut_trace: writes a small routing-trace fixture cut from a full trace (the
// format of moka::RoutingTrace), so the tests run from a fresh clone without
// the shared traces. It made tests/data/gpt_moe_32e_cut.h5:
//
//   build/tests/cut_trace ../shared/traces/gpt_moe_32e_layers00-11.h5 \
//       tests/data/gpt_moe_32e_cut.h5 0,100,200,300,400,496,497,498,499,500 0,3
//
// Numbers are copied unchanged: every kept (iteration, rank, layer,
// micro-batch) row of experts is the recorded one; /iterations and /layers
// name which rows and layers of the source were kept.
#include <hdf5.h>

#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

namespace {
std::vector<long> parse_list(const char* s) {
  std::vector<long> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) out.push_back(std::stol(item));
  return out;
}
void die(const std::string& what) {
  std::fprintf(stderr, "cut_trace: %s\n", what.c_str());
  std::exit(1);
}
void write_attr(hid_t file, const char* name, long long v) {
  hid_t sp = H5Screate(H5S_SCALAR);
  hid_t a  = H5Acreate2(file, name, H5T_STD_I64LE, sp, H5P_DEFAULT, H5P_DEFAULT);
  H5Awrite(a, H5T_NATIVE_LLONG, &v);
  H5Aclose(a);
  H5Sclose(sp);
}
long long read_attr(hid_t file, const char* name) {
  long long v = -1;
  if (H5Aexists(file, name) <= 0) return v;
  hid_t a = H5Aopen(file, name, H5P_DEFAULT);
  H5Aread(a, H5T_NATIVE_LLONG, &v);
  H5Aclose(a);
  return v;
}
void write_ints(hid_t file, const char* name, const std::vector<int>& v, const std::vector<hsize_t>& dims) {
  hid_t sp = H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr);
  hid_t d  = H5Dcreate2(file, name, H5T_STD_I32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  if (d < 0 || H5Dwrite(d, H5T_NATIVE_INT, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()) < 0)
    die(std::string("cannot write ") + name);
  H5Dclose(d);
  H5Sclose(sp);
}
}  // namespace

int main(int argc, char* argv[]) {
  if (argc != 5) die("usage: cut_trace <in.h5> <out.h5> <iteration rows, comma-separated> <layers>");
  const std::vector<long> rows = parse_list(argv[3]), layers = parse_list(argv[4]);
  hid_t in = H5Fopen(argv[1], H5F_ACC_RDONLY, H5P_DEFAULT);
  if (in < 0) die(std::string("cannot open ") + argv[1]);
  hid_t ds = H5Dopen2(in, "counts", H5P_DEFAULT);
  hid_t sp = H5Dget_space(ds);
  hsize_t dims[5];
  if (H5Sget_simple_extent_ndims(sp) != 5) die("/counts is not 5-dimensional");
  H5Sget_simple_extent_dims(sp, dims, nullptr);
  std::vector<int> all(dims[0] * dims[1] * dims[2] * dims[3] * dims[4]);
  if (H5Dread(ds, H5T_NATIVE_INT, H5S_ALL, H5S_ALL, H5P_DEFAULT, all.data()) < 0) die("cannot read /counts");
  std::vector<int> its(dims[0]);
  hid_t di = H5Dopen2(in, "iterations", H5P_DEFAULT);
  if (di < 0 || H5Dread(di, H5T_NATIVE_INT, H5S_ALL, H5S_ALL, H5P_DEFAULT, its.data()) < 0) die("no /iterations");
  H5Dclose(di);
  const hsize_t R = dims[1], M = dims[3], E = dims[4];
  std::vector<int> out, out_its, out_layers;
  for (long row : rows) {
    if (row < 0 || hsize_t(row) >= dims[0]) die("row " + std::to_string(row) + " outside the trace");
    out_its.push_back(its[row]);
    for (hsize_t r = 0; r < R; ++r)
      for (long l : layers) {
        if (l < 0 || hsize_t(l) >= dims[2]) die("layer " + std::to_string(l) + " outside the trace");
        for (hsize_t m = 0; m < M; ++m)
          for (hsize_t e = 0; e < E; ++e) out.push_back(all[(((row * R + r) * dims[2] + l) * M + m) * E + e]);
      }
  }
  for (long l : layers) out_layers.push_back(static_cast<int>(l));
  hid_t f = H5Fcreate(argv[2], H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  if (f < 0) die(std::string("cannot create ") + argv[2]);
  write_ints(f, "counts", out, {rows.size(), R, layers.size(), M, E});
  write_ints(f, "iterations", out_its, {rows.size()});
  write_ints(f, "layers", out_layers, {layers.size()});
  write_attr(f, "top_k", read_attr(in, "top_k"));
  write_attr(f, "num_experts", static_cast<long long>(E));
  write_attr(f, "num_source_ranks", static_cast<long long>(R));
  write_attr(f, "assignments_per_micro_batch_per_rank", read_attr(in, "assignments_per_micro_batch_per_rank"));
  H5Fclose(f);
  H5Dclose(ds);
  H5Sclose(sp);
  H5Fclose(in);
  std::printf("cut_trace: %zu rows x %llu ranks x %zu layers x %llu micro-batches x %llu experts -> %s\n",
              rows.size(), (unsigned long long)R, layers.size(), (unsigned long long)M, (unsigned long long)E, argv[2]);
  return 0;
}
