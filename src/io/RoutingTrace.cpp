#include <moka/core/Config.hpp>
#include <moka/core/Error.hpp>
#include <moka/io/RoutingTrace.hpp>

#include <algorithm>
#include <numeric>

#ifdef MOKA_HAVE_HDF5
#include <hdf5.h>
#endif

namespace moka {

std::vector<long> RoutingTrace::expert_counts(long iteration_row, long layer) const {
  const long row = iteration_row < 0 ? n_iter - 1 : iteration_row;
  MOKA_REQUIRE(row >= 0 && row < n_iter, "iteration row ", iteration_row, " outside [0, ", n_iter, ") of ", path);
  MOKA_REQUIRE(layer >= 0 && layer < n_layers, "layer ", layer, " outside [0, ", n_layers, ") of ", path);
  std::vector<long> out(n_experts, 0);
  for (long r = 0; r < n_ranks; ++r)
    for (long m = 0; m < n_micro; ++m) {
      const long base = (((row * n_ranks + r) * n_layers + layer) * n_micro + m) * n_experts;
      for (long e = 0; e < n_experts; ++e) out[e] += counts[base + e];
    }
  return out;
}

std::vector<long> scale_counts(const std::vector<long>& counts, long total) {
  const double sum = std::accumulate(counts.begin(), counts.end(), 0.0);
  MOKA_REQUIRE(sum > 0, "the counts sum to zero");
  std::vector<long> out(counts.size());
  std::vector<std::pair<double, long>> rem;
  long assigned = 0;
  for (std::size_t e = 0; e < counts.size(); ++e) {
    const double exact = counts[e] * double(total) / sum;
    out[e] = static_cast<long>(exact);
    assigned += out[e];
    rem.push_back({exact - out[e], static_cast<long>(e)});
  }
  std::stable_sort(rem.begin(), rem.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  for (long i = 0; assigned < total; ++i, ++assigned) out[rem[i % rem.size()].second] += 1;
  return out;
}

#ifdef MOKA_HAVE_HDF5
namespace {
struct H5Handle {
  hid_t id;
  herr_t (*close)(hid_t);
  ~H5Handle() {
    if (id >= 0) close(id);
  }
};
long read_long_attribute(hid_t file, const char* name, const std::string& path) {
  if (H5Aexists(file, name) <= 0) return -1;
  H5Handle a{H5Aopen(file, name, H5P_DEFAULT), H5Aclose};
  long long v = 0;
  MOKA_REQUIRE(a.id >= 0 && H5Aread(a.id, H5T_NATIVE_LLONG, &v) >= 0, "cannot read attribute '", name, "' of ", path);
  return static_cast<long>(v);
}
}  // namespace

RoutingTrace read_routing_trace(const std::string& path) {
  H5E_auto2_t old_func;
  void* old_data;
  H5Eget_auto2(H5E_DEFAULT, &old_func, &old_data);
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);  // errors become moka::Error
  struct Restore {
    H5E_auto2_t f;
    void* d;
    ~Restore() { H5Eset_auto2(H5E_DEFAULT, f, d); }
  } restore{old_func, old_data};

  RoutingTrace t;
  t.path = path;
  H5Handle file{H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose};
  if (file.id < 0) throw Error("moka::read_routing_trace: cannot open '" + path + "' as HDF5");
  if (H5Lexists(file.id, "counts", H5P_DEFAULT) <= 0)
    throw Error("moka::read_routing_trace: '" + path + "' has no /counts dataset");
  H5Handle ds{H5Dopen2(file.id, "counts", H5P_DEFAULT), H5Dclose};
  H5Handle space{H5Dget_space(ds.id), H5Sclose};
  const int rank = H5Sget_simple_extent_ndims(space.id);
  if (rank != 5)
    throw Error("moka::read_routing_trace: /counts in '" + path + "' has " + std::to_string(rank) +
                " dimensions, expected 5 (iteration, rank, layer, micro-batch, expert)");
  hsize_t dims[5];
  H5Sget_simple_extent_dims(space.id, dims, nullptr);
  t.n_iter = long(dims[0]);
  t.n_ranks = long(dims[1]);
  t.n_layers = long(dims[2]);
  t.n_micro = long(dims[3]);
  t.n_experts = long(dims[4]);
  t.counts.resize(dims[0] * dims[1] * dims[2] * dims[3] * dims[4]);
  if (H5Dread(ds.id, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.counts.data()) < 0)
    throw Error("moka::read_routing_trace: cannot read /counts of '" + path + "' (corrupt file?)");
  for (auto c : t.counts)
    if (c < 0) throw Error("moka::read_routing_trace: negative count in /counts of '" + path + "'");
  if (H5Lexists(file.id, "iterations", H5P_DEFAULT) > 0) {
    H5Handle it{H5Dopen2(file.id, "iterations", H5P_DEFAULT), H5Dclose};
    t.iterations.resize(t.n_iter);
    if (H5Dread(it.id, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.iterations.data()) < 0)
      throw Error("moka::read_routing_trace: cannot read /iterations of '" + path + "'");
  }
  t.top_k = read_long_attribute(file.id, "top_k", path);
  const long e = read_long_attribute(file.id, "num_experts", path);
  if (e >= 0 && e != t.n_experts)
    throw Error("moka::read_routing_trace: attribute num_experts = " + std::to_string(e) + " but /counts has " +
                std::to_string(t.n_experts) + " experts in '" + path + "'");
  return t;
}
#else
RoutingTrace read_routing_trace(const std::string& path) {
  throw Error("moka::read_routing_trace: MoKA was built without HDF5, cannot read '" + path + "'");
}
#endif

}  // namespace moka
