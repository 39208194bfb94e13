#include <moka/core/Config.hpp>
#include <moka/core/Error.hpp>
#include <moka/io/RoutingTrace.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>

#ifdef MOKA_HAVE_HDF5
#include <hdf5.h>
#endif

namespace moka {

std::vector<long> RoutingTrace::expert_counts(long iteration_row, long layer) const {
  const long row = iteration_row < 0 ? n_iter - 1 : iteration_row;
  MOKA_REQUIRE(row >= 0 && row < n_iter, "gate.trace_iteration: row ", iteration_row, " outside [0, ", n_iter,
               ") of ", path);
  MOKA_REQUIRE(layer >= 0 && layer < n_layers, "gate.trace_layer: layer ", layer, " outside [0, ", n_layers, ") of ",
               path);
  std::vector<long> out(n_experts, 0);
  for (long r = 0; r < n_ranks; ++r)
    for (long m = 0; m < n_micro; ++m) {
      const long base = (((row * n_ranks + r) * n_layers + layer) * n_micro + m) * n_experts;
      for (long e = 0; e < n_experts; ++e) out[e] += counts[base + e];
    }
  return out;
}

std::vector<std::vector<long>> RoutingTrace::source_counts(long iteration_row, long layer) const {
  const long row = iteration_row < 0 ? n_iter - 1 : iteration_row;
  MOKA_REQUIRE(row >= 0 && row < n_iter, "trace row ", iteration_row, " outside [0, ", n_iter, ") of ", path);
  MOKA_REQUIRE(layer >= 0 && layer < n_layers, "trace layer ", layer, " outside [0, ", n_layers, ") of ", path);
  std::vector<std::vector<long>> out(n_ranks, std::vector<long>(n_experts, 0));
  for (long r = 0; r < n_ranks; ++r)
    for (long m = 0; m < n_micro; ++m) {
      const long base = (((row * n_ranks + r) * n_layers + layer) * n_micro + m) * n_experts;
      for (long e = 0; e < n_experts; ++e) out[r][e] += counts[base + e];
    }
  return out;
}

std::vector<long> scale_counts(const std::vector<long>& counts, long total) {
  const double sum = std::accumulate(counts.begin(), counts.end(), 0.0);
  MOKA_REQUIRE(sum > 0, "moka::scale_counts: the counts sum to zero");
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
std::string shape_of(const hsize_t* dims) {
  std::string s;
  for (int i = 0; i < 5; ++i) s += "[" + std::to_string(static_cast<unsigned long long>(dims[i])) + "]";
  return s;
}
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
  const std::string where = "moka::read_routing_trace: '" + path + "'";
  H5Handle file{H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT), H5Fclose};
  if (file.id < 0) throw Error("moka::read_routing_trace: cannot open '" + path + "' as HDF5");
  if (H5Lexists(file.id, "counts", H5P_DEFAULT) <= 0) throw Error(where + " has no /counts dataset");
  H5O_info_t info;
#if H5_VERSION_GE(1, 12, 0)
  const herr_t got_info = H5Oget_info_by_name3(file.id, "counts", &info, H5O_INFO_BASIC, H5P_DEFAULT);
#else
  const herr_t got_info = H5Oget_info_by_name(file.id, "counts", &info, H5P_DEFAULT);
#endif
  if (got_info < 0 || info.type != H5O_TYPE_DATASET) throw Error(where + ": /counts is not a dataset (a group?)");
  H5Handle ds{H5Dopen2(file.id, "counts", H5P_DEFAULT), H5Dclose};
  if (ds.id < 0) throw Error(where + ": cannot open the dataset /counts");
  H5Handle space{H5Dget_space(ds.id), H5Sclose};
  const int rank = H5Sget_simple_extent_ndims(space.id);
  if (rank != 5)
    throw Error(where + ": /counts has " + std::to_string(rank) +
                " dimensions, expected 5 (iteration, rank, layer, micro-batch, expert)");
  hsize_t dims[5];
  H5Sget_simple_extent_dims(space.id, dims, nullptr);
  // The element count, checked before anything is allocated: a product
  // that overflows, or more elements than the file can hold (a corrupt or
  // forged header), is named instead of crashing or running out of memory.
  const char* axis[5] = {"iterations", "source ranks", "layers", "micro-batches", "experts"};
  std::uint64_t total = 1;
  for (int i = 0; i < 5; ++i) {
    if (dims[i] == 0) throw Error(where + ": /counts has no " + axis[i] + " (dimension " + std::to_string(i) + " is 0)");
    if (total > std::numeric_limits<std::uint64_t>::max() / 4 / dims[i])
      throw Error(where + ": /counts declares more elements than can be addressed (" + shape_of(dims) + ")");
    total *= dims[i];
  }
  const std::uint64_t bytes = total * sizeof(std::int32_t);
  hsize_t file_size = 0;
  H5Fget_filesize(file.id, &file_size);
  H5Handle dcpl{H5Dget_create_plist(ds.id), H5Pclose};
  const bool filtered = dcpl.id >= 0 && H5Pget_nfilters(dcpl.id) > 0;
  // Without compression the data must be in the file; with it, allow a
  // generous ratio and a fixed ceiling (traces are tens of MB).
  const std::uint64_t limit = filtered ? std::min<std::uint64_t>(std::uint64_t(file_size) * 1024, 8ull << 30)
                                       : std::uint64_t(file_size);
  if (bytes > limit)
    throw Error(where + ": /counts declares " + shape_of(dims) + " int32 values (" + std::to_string(bytes) +
                " bytes), more than a " + std::to_string(file_size) + "-byte file " +
                (filtered ? "can plausibly hold compressed" : "holds") + " (truncated or corrupt?)");
  t.n_iter = long(dims[0]);
  t.n_ranks = long(dims[1]);
  t.n_layers = long(dims[2]);
  t.n_micro = long(dims[3]);
  t.n_experts = long(dims[4]);
  t.counts.resize(total);
  if (H5Dread(ds.id, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.counts.data()) < 0)
    throw Error(where + ": cannot read /counts (corrupt file?)");
  for (auto c : t.counts)
    if (c < 0) throw Error(where + ": negative count in /counts");
  if (H5Lexists(file.id, "iterations", H5P_DEFAULT) > 0) {
    H5Handle it{H5Dopen2(file.id, "iterations", H5P_DEFAULT), H5Dclose};
    H5Handle its{it.id >= 0 ? H5Dget_space(it.id) : -1, H5Sclose};
    hsize_t n = 0;
    if (its.id < 0 || H5Sget_simple_extent_ndims(its.id) != 1 || (H5Sget_simple_extent_dims(its.id, &n, nullptr), n) !=
                                                                     dims[0])
      throw Error(where + ": /iterations is not one value per iteration row (" + std::to_string(dims[0]) + ")");
    t.iterations.resize(t.n_iter);
    if (H5Dread(it.id, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, t.iterations.data()) < 0)
      throw Error(where + ": cannot read /iterations");
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
