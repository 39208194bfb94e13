#include <moka/core/Config.hpp>
#include <moka/core/Error.hpp>
#include <moka/io/CheckpointFile.hpp>

#include <Kokkos_Core.hpp>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <numeric>

#ifdef MOKA_HAVE_HDF5
#include <hdf5.h>
#endif

namespace moka {

const char* to_string(CheckpointType t) {
  switch (t) {
    case CheckpointType::float64: return "float64";
    case CheckpointType::float32: return "float32";
    case CheckpointType::int64: return "int64";
  }
  return "?";
}

namespace {

inline std::uint64_t mix64(std::uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

template <class T>
std::uint64_t bits_of(const T& v) {
  if constexpr (sizeof(T) == 4) {
    std::uint32_t b;
    std::memcpy(&b, &v, 4);
    return b;
  } else {
    std::uint64_t b;
    std::memcpy(&b, &v, 8);
    return b;
  }
}

template <class T>
constexpr CheckpointType type_of();
template <>
constexpr CheckpointType type_of<double>() { return CheckpointType::float64; }
template <>
constexpr CheckpointType type_of<float>() { return CheckpointType::float32; }
template <>
constexpr CheckpointType type_of<std::int64_t>() { return CheckpointType::int64; }

long product(const std::vector<long>& v) {
  long n = 1;
  for (long x : v) n *= x;
  return n;
}

}  // namespace

template <class T>
std::uint64_t checksum_part(const T* data, long n, long first_index) {
  // One SplitMix64 finaliser per element of (bits ^ index * golden ratio):
  // a bijection of the bits for a given index, so one changed bit changes
  // the term, and the index makes the sum see two values swapped. A sum of
  // integers modulo 2^64: the same in any order, so the host threads share
  // it (where Kokkos is up; moka-inspect runs without it).
  const std::uint64_t k  = 0x9e3779b97f4a7c15ull;
  const std::uint64_t i0 = static_cast<std::uint64_t>(first_index) * k;
  std::uint64_t s        = 0;
  if (n >= (1L << 16) && Kokkos::is_initialized()) {
    Kokkos::parallel_reduce(
        "moka::checksum", Kokkos::RangePolicy<Kokkos::DefaultHostExecutionSpace>(0, n),
        [=](long i, std::uint64_t& acc) { acc += mix64(bits_of(data[i]) ^ (i0 + std::uint64_t(i) * k)); }, s);
    return s;
  }
  for (long i = 0; i < n; ++i) s += mix64(bits_of(data[i]) ^ (i0 + std::uint64_t(i) * k));
  return s;
}
template std::uint64_t checksum_part<double>(const double*, long, long);
template std::uint64_t checksum_part<float>(const float*, long, long);
template std::uint64_t checksum_part<std::int64_t>(const std::int64_t*, long, long);

namespace {

/// The checksum part of a block (\p offset, \p count: row-major values at
/// \p data) of a dataset of \p shape: each run along the last extent
/// keyed by its flat index in the dataset.
template <class T>
std::uint64_t block_checksum(const std::vector<long>& shape, const std::vector<long>& offset,
                             const std::vector<long>& count, const T* data) {
  const int R = static_cast<int>(count.size());
  long n      = 1;
  for (long c : count) n *= c;
  if (n == 0) return 0;
  std::vector<long> stride(R, 1);
  for (int i = R - 2; i >= 0; --i) stride[i] = stride[i + 1] * shape[i + 1];
  const long run = count[R - 1];
  std::vector<long> idx(R, 0);
  std::uint64_t sum = 0;
  for (long done = 0; done < n; done += run) {
    long flat = offset[R - 1];
    for (int i = 0; i < R - 1; ++i) flat += (offset[i] + idx[i]) * stride[i];
    sum += checksum_part(data + done, run, flat);
    for (int i = R - 2; i >= 0; --i) {
      if (++idx[i] < count[i]) break;
      idx[i] = 0;
    }
  }
  return sum;
}

}  // namespace

#ifdef MOKA_HAVE_HDF5
namespace {

/// Closes an HDF5 handle at scope end.
struct Handle {
  hid_t id = -1;
  herr_t (*close)(hid_t) = nullptr;
  Handle(hid_t i, herr_t (*c)(hid_t)) : id(i), close(c) {}
  Handle(const Handle&) = delete;
  ~Handle() {
    if (id >= 0 && close) close(id);
  }
};

/// HDF5's own error printing off for the calls of this file (their
/// failures become moka::Error with names).
struct Quiet {
  H5E_auto2_t fn = nullptr;
  void* data     = nullptr;
  Quiet() {
    H5Eget_auto2(H5E_DEFAULT, &fn, &data);
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
  ~Quiet() { H5Eset_auto2(H5E_DEFAULT, fn, data); }
};

hid_t mem_type(CheckpointType t) {
  switch (t) {
    case CheckpointType::float64: return H5T_NATIVE_DOUBLE;
    case CheckpointType::float32: return H5T_NATIVE_FLOAT;
    case CheckpointType::int64: return H5T_NATIVE_INT64;
  }
  return H5T_NATIVE_DOUBLE;
}
template <class T>
hid_t mem_type() { return mem_type(type_of<T>()); }

/// Selects the block (offset, count) of \p space; checks it lies inside.
void select_block(hid_t space, const std::string& path, const std::string& name, const std::vector<long>& offset,
                  const std::vector<long>& count) {
  const int rank = H5Sget_simple_extent_ndims(space);
  MOKA_REQUIRE(rank == static_cast<int>(offset.size()) && rank == static_cast<int>(count.size()), "checkpoint '",
               path, "': a block of ", offset.size(), " dimensions for dataset '", name, "' of ", rank);
  std::vector<hsize_t> dims(static_cast<std::size_t>(rank));
  H5Sget_simple_extent_dims(space, dims.data(), nullptr);
  std::vector<hsize_t> o(offset.begin(), offset.end()), c(count.begin(), count.end());
  for (int i = 0; i < rank; ++i)
    MOKA_REQUIRE(offset[i] >= 0 && count[i] >= 0 && hsize_t(offset[i] + count[i]) <= dims[i], "checkpoint '", path,
                 "': block [", offset[i], ", ", offset[i] + count[i], ") of dimension ", i, " outside dataset '",
                 name, "' (extent ", dims[i], ")");
  H5Sselect_hyperslab(space, H5S_SELECT_SET, o.data(), nullptr, c.data(), nullptr);
}

hid_t open_read(const std::string& path) {
  Quiet q;
  std::FILE* f = std::fopen(path.c_str(), "rb");
  MOKA_REQUIRE(f != nullptr, "checkpoint '", path, "': cannot open it (no such file or no permission)");
  std::fclose(f);
  const hid_t file = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  MOKA_REQUIRE(file >= 0, "checkpoint '", path, "': not a readable HDF5 file (truncated or damaged?)");
  return file;
}

}  // namespace

struct CheckpointWriter::Impl {
  struct Set {
    hid_t id = -1;
    CheckpointType type = CheckpointType::float64;
    std::vector<long> shape;
    std::uint64_t part = 0;  // checksum part of the blocks this rank wrote
  };
  hid_t file    = -1;
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0, size = 1;
  std::map<std::string, Set> sets;
  std::vector<std::string> order;  // creation order (the same on every rank)
  std::string error;               // parallel mode: the first failed block write, raised at commit()

  void close_all() {
    for (auto& kv : sets)
      if (kv.second.id >= 0) H5Dclose(kv.second.id), kv.second.id = -1;
    if (file >= 0) H5Fclose(file), file = -1;
  }
  Set& find(const std::string& path, const std::string& name) {
    auto it = sets.find(name);
    MOKA_REQUIRE(it != sets.end(), "checkpoint '", path, "': no dataset '", name, "' was created");
    return it->second;
  }
};

struct CheckpointReader::Impl {
  hid_t file = -1;
};

bool CheckpointWriter::parallel_available() {
#ifdef H5_HAVE_PARALLEL
  return true;
#else
  return false;
#endif
}

CheckpointWriter::CheckpointWriter(const std::string& path) : m_path(path), m_impl(std::make_unique<Impl>()) {
  Quiet q;
  m_impl->file = H5Fcreate(temp_path().c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  MOKA_REQUIRE(m_impl->file >= 0, "checkpoint '", path, "': cannot create '", temp_path(),
               "' (does the directory exist and can it be written?)");
}

CheckpointWriter::CheckpointWriter(const std::string& path, MPI_Comm comm)
    : m_path(path), m_impl(std::make_unique<Impl>()) {
#ifdef H5_HAVE_PARALLEL
  Quiet q;
  m_impl->comm = comm;
  MPI_Comm_rank(comm, &m_impl->rank);
  MPI_Comm_size(comm, &m_impl->size);
  Handle fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  H5Pset_fapl_mpio(fapl.id, comm, MPI_INFO_NULL);
  m_impl->file = H5Fcreate(temp_path().c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.id);
  int ok = m_impl->file >= 0, all = 0;
  MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_MIN, comm);
  if (!all) {
    if (m_impl->file >= 0) H5Fclose(m_impl->file), m_impl->file = -1;
    throw Error("checkpoint '" + path + "': cannot create '" + temp_path() +
                "' through MPI-IO (does the directory exist and can it be written?)");
  }
#else
  (void)comm;
  throw Error("checkpoint '" + path + "': this MoKA's HDF5 is not built for MPI-IO (use io.checkpoint_io = gather)");
#endif
}

CheckpointWriter::~CheckpointWriter() {
  if (m_impl && m_impl->file >= 0) {
    m_impl->close_all();
    if (m_impl->rank == 0) std::remove(temp_path().c_str());
  }
}

template <class T>
void CheckpointWriter::create(const std::string& name, const std::vector<long>& shape) {
  Quiet q;
  MOKA_REQUIRE(m_impl->file >= 0, "checkpoint '", m_path, "': dataset '", name, "' created after commit()");
  MOKA_REQUIRE(!shape.empty(), "checkpoint '", m_path, "': dataset '", name, "' has no shape");
  for (long s : shape)
    MOKA_REQUIRE(s >= 0, "checkpoint '", m_path, "': dataset '", name, "' has a negative extent");
  MOKA_REQUIRE(!m_impl->sets.count(name), "checkpoint '", m_path, "': dataset '", name, "' created twice");
  std::vector<hsize_t> dims(shape.begin(), shape.end());
  Handle space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
  Handle lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
  H5Pset_create_intermediate_group(lcpl.id, 1);
  Handle dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
  H5Pset_fill_time(dcpl.id, H5D_FILL_TIME_NEVER);  // every element is written
  Impl::Set s;
  s.type  = type_of<T>();
  s.shape = shape;
  s.id    = H5Dcreate2(m_impl->file, name.c_str(), mem_type<T>(), space.id, lcpl.id, dcpl.id, H5P_DEFAULT);
  MOKA_REQUIRE(s.id >= 0, "checkpoint '", m_path, "': cannot create dataset '", name, "'");
  m_impl->sets[name] = s;
  m_impl->order.push_back(name);
}

template <class T>
void CheckpointWriter::write_block(const std::string& name, const std::vector<long>& offset,
                                   const std::vector<long>& count, const T* data) {
  Quiet q;
  try {
    Impl::Set& s = m_impl->find(m_path, name);
    MOKA_REQUIRE(s.type == type_of<T>(), "checkpoint '", m_path, "': a block of ", to_string(type_of<T>()),
                 " for dataset '", name, "' of ", to_string(s.type));
    const long n = product(count);
    if (n == 0) return;
    Handle fspace(H5Dget_space(s.id), H5Sclose);
    select_block(fspace.id, m_path, name, offset, count);
    const hsize_t mn = static_cast<hsize_t>(n);
    Handle mspace(H5Screate_simple(1, &mn, nullptr), H5Sclose);
    MOKA_REQUIRE(H5Dwrite(s.id, mem_type<T>(), mspace.id, fspace.id, H5P_DEFAULT, data) >= 0, "checkpoint '",
                 m_path, "': writing a block of dataset '", name, "' failed (disk full?)");
    s.part += block_checksum(s.shape, offset, count, data);
  } catch (const Error& e) {
    if (m_impl->comm == MPI_COMM_NULL) throw;
    if (m_impl->error.empty()) m_impl->error = e.what();
  }
}

template <class T>
void CheckpointWriter::write_blocks(const std::string& name, const std::vector<CheckpointBlock<T>>& blocks) {
  if (m_impl->comm == MPI_COMM_NULL) {
    for (const auto& b : blocks) write_block<T>(name, b.offset, b.count, b.data);
    return;
  }
#ifdef H5_HAVE_PARALLEL
  Quiet q;
  long mine = static_cast<long>(blocks.size()), most = 0;
  MPI_Allreduce(&mine, &most, 1, MPI_LONG, MPI_MAX, m_impl->comm);
  Impl::Set* s = nullptr;
  try {
    s = &m_impl->find(m_path, name);
  } catch (const Error& e) {
    if (m_impl->error.empty()) m_impl->error = e.what();
  }
  if (!s) return;  // the same on every rank: the dataset was created collectively
  Handle xfer(H5Pcreate(H5P_DATASET_XFER), H5Pclose);
  H5Pset_dxpl_mpio(xfer.id, H5FD_MPIO_COLLECTIVE);
  const T dummy{};
  for (long i = 0; i < most; ++i) {
    Handle fspace(H5Dget_space(s->id), H5Sclose);
    const hsize_t one = 1;
    Handle mspace(H5Screate_simple(1, &one, nullptr), H5Sclose);
    const T* data = &dummy;
    long n        = 0;
    bool ok       = true;
    if (i < mine && m_impl->error.empty()) {
      const auto& b = blocks[static_cast<std::size_t>(i)];
      try {
        MOKA_REQUIRE(s->type == type_of<T>(), "checkpoint '", m_path, "': a block of ", to_string(type_of<T>()),
                     " for dataset '", name, "' of ", to_string(s->type));
        select_block(fspace.id, m_path, name, b.offset, b.count);
        n = product(b.count);
      } catch (const Error& e) {
        if (m_impl->error.empty()) m_impl->error = e.what();
        ok = false;
      }
      if (ok && n > 0) {
        const hsize_t mn = static_cast<hsize_t>(n);
        H5Sset_extent_simple(mspace.id, 1, &mn, nullptr);
        data = b.data;
      }
    }
    if (n == 0) {
      H5Sselect_none(fspace.id);
      H5Sselect_none(mspace.id);
    }
    if (H5Dwrite(s->id, mem_type<T>(), mspace.id, fspace.id, xfer.id, data) < 0 && m_impl->error.empty())
      m_impl->error = "checkpoint '" + m_path + "': writing a block of dataset '" + name + "' failed (disk full?)";
    if (n > 0) {
      const auto& b = blocks[static_cast<std::size_t>(i)];
      s->part += block_checksum(s->shape, b.offset, b.count, b.data);
    }
  }
#else
  (void)blocks;
  throw Error("checkpoint '" + m_path + "': parallel writes need an HDF5 built for MPI-IO");
#endif
}

template <class T>
void CheckpointWriter::write(const std::string& name, const std::vector<T>& data, const std::vector<long>& shape) {
  if (m_impl->rank == 0)
    MOKA_REQUIRE(product(shape) == static_cast<long>(data.size()), "checkpoint '", m_path, "': dataset '", name,
                 "' has ", data.size(), " values for a shape of ", product(shape));
  create<T>(name, shape);
  std::vector<CheckpointBlock<T>> b;
  if (m_impl->rank == 0) b.push_back({std::vector<long>(shape.size(), 0), shape, data.data()});
  write_blocks<T>(name, b);
}

void CheckpointWriter::attribute(const std::string& name, const std::string& value) {
  Quiet q;
  Handle type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type.id, std::max<std::size_t>(1, value.size()));
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  Handle attr(H5Acreate2(m_impl->file, name.c_str(), type.id, space.id, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  const std::string v = value.empty() ? std::string(1, '\0') : value;
  MOKA_REQUIRE(attr.id >= 0 && H5Awrite(attr.id, type.id, v.data()) >= 0, "checkpoint '", m_path,
               "': writing attribute '", name, "' failed");
}

void CheckpointWriter::commit() {
  Quiet q;
  MOKA_REQUIRE(m_impl->file >= 0, "checkpoint '", m_path, "': committed twice");
  Impl& I         = *m_impl;
  const bool par  = I.comm != MPI_COMM_NULL;
  std::vector<std::uint64_t> sums;
  for (const std::string& n : I.order) sums.push_back(I.sets[n].part);
  if (par) {
    int bad = !I.error.empty(), any = 0;
    MPI_Allreduce(&bad, &any, 1, MPI_INT, MPI_MAX, I.comm);
    if (any) {
      I.close_all();
      if (I.rank == 0) std::remove(temp_path().c_str());
      throw Error(bad ? I.error : "checkpoint '" + m_path + "': writing failed on another rank");
    }
    MPI_Allreduce(MPI_IN_PLACE, sums.data(), static_cast<int>(sums.size()), MPI_UINT64_T, MPI_SUM, I.comm);
  }
  for (std::size_t i = 0; i < I.order.size(); ++i) {
    Impl::Set& s = I.sets[I.order[i]];
    Handle aspace(H5Screate(H5S_SCALAR), H5Sclose);
    Handle attr(H5Acreate2(s.id, "checksum", H5T_NATIVE_UINT64, aspace.id, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
    MOKA_REQUIRE(attr.id >= 0 && H5Awrite(attr.id, H5T_NATIVE_UINT64, &sums[i]) >= 0, "checkpoint '", m_path,
                 "': writing the checksum of '", I.order[i], "' failed");
  }
  I.close_all();
  // Read back: every dataset against its checksum (each rank a share of the rows).
  std::string failure;
  try {
    CheckpointReader r(temp_path());
    std::vector<std::uint64_t> got;
    for (const std::string& n : I.order) {
      const long rows = I.sets[n].shape[0];
      const long r0 = rows * I.rank / I.size, r1 = rows * (I.rank + 1) / I.size;
      got.push_back(r.checksum_rows(n, r0, r1 - r0));
    }
    if (par) MPI_Allreduce(MPI_IN_PLACE, got.data(), static_cast<int>(got.size()), MPI_UINT64_T, MPI_SUM, I.comm);
    for (std::size_t i = 0; i < got.size() && failure.empty(); ++i)
      if (got[i] != sums[i])
        failure = "checkpoint '" + m_path + "': dataset '" + I.order[i] + "' read back from '" + temp_path() +
                  "' does not match what was written";
  } catch (const Error& e) {
    failure = e.what();
  }
  int bad = !failure.empty();
  if (par) MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_MAX, I.comm);
  if (bad) {
    if (I.rank == 0) std::remove(temp_path().c_str());
    throw Error(failure.empty() ? "checkpoint '" + m_path + "': verification failed on another rank" : failure);
  }
  int renamed = 1;
  if (I.rank == 0) renamed = std::rename(temp_path().c_str(), m_path.c_str()) == 0;
  if (par) MPI_Bcast(&renamed, 1, MPI_INT, 0, I.comm);
  MOKA_REQUIRE(renamed, "checkpoint '", m_path, "': renaming '", temp_path(), "' to it failed");
}


// ------------------------------------------------------------------ reader

namespace {

hid_t open_set(hid_t file, const std::string& path, const std::string& name) {
  MOKA_REQUIRE(H5Lexists(file, name.c_str(), H5P_DEFAULT) > 0, "checkpoint '", path, "': no dataset '", name, "'");
  const hid_t set = H5Dopen2(file, name.c_str(), H5P_DEFAULT);
  MOKA_REQUIRE(set >= 0, "checkpoint '", path, "': '", name, "' is not a dataset");
  return set;
}

CheckpointType set_type(hid_t set, const std::string& path, const std::string& name) {
  Handle type(H5Dget_type(set), H5Tclose);
  Handle native(H5Tget_native_type(type.id, H5T_DIR_ASCEND), H5Tclose);
  for (CheckpointType t : {CheckpointType::float64, CheckpointType::float32, CheckpointType::int64})
    if (H5Tequal(native.id, mem_type(t)) > 0) return t;
  throw Error("checkpoint '" + path + "': dataset '" + name + "' is none of float64, float32, int64");
}

std::vector<long> set_shape(hid_t set, const std::string& path, const std::string& name) {
  Handle space(H5Dget_space(set), H5Sclose);
  const int rank = H5Sget_simple_extent_ndims(space.id);
  MOKA_REQUIRE(rank >= 0, "checkpoint '", path, "': dataset '", name, "' has no readable shape");
  std::vector<hsize_t> dims(static_cast<std::size_t>(rank));
  H5Sget_simple_extent_dims(space.id, dims.data(), nullptr);
  return std::vector<long>(dims.begin(), dims.end());
}

herr_t collect_dataset(hid_t group, const char* name, const H5L_info_t*, void* data) {
  const hid_t set = H5Dopen2(group, name, H5P_DEFAULT);
  if (set >= 0) {
    static_cast<std::vector<std::string>*>(data)->push_back(name);
    H5Dclose(set);
  }
  return 0;
}

}  // namespace

CheckpointReader::CheckpointReader(const std::string& path) : m_path(path), m_impl(std::make_unique<Impl>()) {
  m_impl->file = open_read(path);
}

CheckpointReader::~CheckpointReader() {
  if (m_impl && m_impl->file >= 0) H5Fclose(m_impl->file);
}

bool CheckpointReader::has(const std::string& name) const {
  Quiet q;
  // Every prefix must exist for H5Lexists on the full path.
  for (std::size_t at = name.find('/'); at != std::string::npos; at = name.find('/', at + 1))
    if (H5Lexists(m_impl->file, name.substr(0, at).c_str(), H5P_DEFAULT) <= 0) return false;
  if (H5Lexists(m_impl->file, name.c_str(), H5P_DEFAULT) <= 0) return false;
  const hid_t set = H5Dopen2(m_impl->file, name.c_str(), H5P_DEFAULT);
  if (set < 0) return false;
  H5Dclose(set);
  return true;
}

std::vector<long> CheckpointReader::shape(const std::string& name) const {
  Quiet q;
  MOKA_REQUIRE(has(name), "checkpoint '", m_path, "': no dataset '", name, "'");
  Handle set(open_set(m_impl->file, m_path, name), H5Dclose);
  return set_shape(set.id, m_path, name);
}

CheckpointType CheckpointReader::type(const std::string& name) const {
  Quiet q;
  MOKA_REQUIRE(has(name), "checkpoint '", m_path, "': no dataset '", name, "'");
  Handle set(open_set(m_impl->file, m_path, name), H5Dclose);
  return set_type(set.id, m_path, name);
}

std::vector<std::string> CheckpointReader::datasets() const {
  Quiet q;
  std::vector<std::string> out;
  H5Lvisit(m_impl->file, H5_INDEX_NAME, H5_ITER_INC, collect_dataset, &out);
  std::sort(out.begin(), out.end());
  return out;
}

template <class T>
std::vector<T> CheckpointReader::read(const std::string& name) const {
  Quiet q;
  MOKA_REQUIRE(has(name), "checkpoint '", m_path, "': no dataset '", name, "'");
  Handle set(open_set(m_impl->file, m_path, name), H5Dclose);
  const CheckpointType t = set_type(set.id, m_path, name);
  MOKA_REQUIRE(t == type_of<T>(), "checkpoint '", m_path, "': dataset '", name, "' is ", to_string(t), ", not ",
               to_string(type_of<T>()));
  const std::vector<long> shape = set_shape(set.id, m_path, name);
  std::vector<T> out(shape.empty() ? 0 : static_cast<std::size_t>(product(shape)));
  if (!out.empty()) read_block_into<T>(name, std::vector<long>(shape.size(), 0), shape, out.data());
  MOKA_REQUIRE(checksum_part(out.data(), long(out.size()), 0) == stored_checksum(name), "checkpoint '", m_path,
               "': dataset '", name, "' does not match its checksum (the file is damaged)");
  return out;
}

template <class T>
void CheckpointReader::read_block_into(const std::string& name, const std::vector<long>& offset,
                                       const std::vector<long>& count, T* out) const {
  Quiet q;
  MOKA_REQUIRE(has(name), "checkpoint '", m_path, "': no dataset '", name, "'");
  Handle set(open_set(m_impl->file, m_path, name), H5Dclose);
  const CheckpointType t = set_type(set.id, m_path, name);
  MOKA_REQUIRE((t == CheckpointType::int64) == (type_of<T>() == CheckpointType::int64), "checkpoint '", m_path,
               "': dataset '", name, "' is ", to_string(t), ", read as ", to_string(type_of<T>()));
  const long n = product(count);
  if (n == 0) return;
  Handle fspace(H5Dget_space(set.id), H5Sclose);
  select_block(fspace.id, m_path, name, offset, count);
  const hsize_t mn = static_cast<hsize_t>(n);
  Handle mspace(H5Screate_simple(1, &mn, nullptr), H5Sclose);
  MOKA_REQUIRE(H5Dread(set.id, mem_type<T>(), mspace.id, fspace.id, H5P_DEFAULT, out) >= 0, "checkpoint '",
               m_path, "': reading dataset '", name, "' failed (a truncated or damaged file?)");
}

template <class T>
std::vector<T> CheckpointReader::read_block(const std::string& name, const std::vector<long>& offset,
                                            const std::vector<long>& count) const {
  std::vector<T> out(static_cast<std::size_t>(product(count)));
  read_block_into(name, offset, count, out.data());
  return out;
}

std::uint64_t CheckpointReader::stored_checksum(const std::string& name) const {
  Quiet q;
  Handle set(open_set(m_impl->file, m_path, name), H5Dclose);
  MOKA_REQUIRE(H5Aexists(set.id, "checksum") > 0, "checkpoint '", m_path, "': dataset '", name, "' has no checksum");
  Handle attr(H5Aopen(set.id, "checksum", H5P_DEFAULT), H5Aclose);
  std::uint64_t want = 0;
  MOKA_REQUIRE(attr.id >= 0 && H5Aread(attr.id, H5T_NATIVE_UINT64, &want) >= 0, "checkpoint '", m_path,
               "': the checksum of '", name, "' cannot be read");
  return want;
}

std::uint64_t CheckpointReader::checksum_rows(const std::string& name, long row0, long rows) const {
  Quiet q;
  Handle set(open_set(m_impl->file, m_path, name), H5Dclose);
  const CheckpointType t        = set_type(set.id, m_path, name);
  const std::vector<long> shape = set_shape(set.id, m_path, name);
  if (shape.empty() || rows <= 0) return 0;
  const long row = product(shape) / std::max(1L, shape[0]);
  // In pieces of at most 32 MB, through one buffer.
  const long per = std::max(1L, (32L << 20) / std::max(1L, row * 8));
  std::vector<std::uint64_t> buf(static_cast<std::size_t>(std::min(rows, per) * row));
  std::uint64_t s = 0;
  for (long r = row0; r < row0 + rows; r += per) {
    const long n = std::min(per, row0 + rows - r);
    std::vector<long> offset(shape.size(), 0), count = shape;
    offset[0] = r;
    count[0]  = n;
    if (t == CheckpointType::float64) {
      auto* p = reinterpret_cast<double*>(buf.data());
      read_block_into(name, offset, count, p);
      s += checksum_part(p, n * row, r * row);
    } else if (t == CheckpointType::float32) {
      auto* p = reinterpret_cast<float*>(buf.data());
      read_block_into(name, offset, count, p);
      s += checksum_part(p, n * row, r * row);
    } else {
      auto* p = reinterpret_cast<std::int64_t*>(buf.data());
      read_block_into(name, offset, count, p);
      s += checksum_part(p, n * row, r * row);
    }
  }
  return s;
}

bool CheckpointReader::has_attribute(const std::string& name) const {
  Quiet q;
  return H5Aexists(m_impl->file, name.c_str()) > 0;
}

std::string CheckpointReader::attribute(const std::string& name) const {
  Quiet q;
  MOKA_REQUIRE(H5Aexists(m_impl->file, name.c_str()) > 0, "checkpoint '", m_path, "': no attribute '", name, "'");
  Handle attr(H5Aopen(m_impl->file, name.c_str(), H5P_DEFAULT), H5Aclose);
  Handle type(H5Aget_type(attr.id), H5Tclose);
  MOKA_REQUIRE(H5Tget_class(type.id) == H5T_STRING, "checkpoint '", m_path, "': attribute '", name,
               "' is not a string");
  if (H5Tis_variable_str(type.id) > 0) {
    // Written by another tool (h5py's default): a pointer HDF5 allocates.
    char* p = nullptr;
    Handle mt(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(mt.id, H5T_VARIABLE);
    MOKA_REQUIRE(H5Aread(attr.id, mt.id, &p) >= 0, "checkpoint '", m_path, "': reading attribute '", name, "' failed");
    std::string v = p ? p : "";
    H5free_memory(p);
    return v;
  }
  std::string v(H5Tget_size(type.id), '\0');
  MOKA_REQUIRE(H5Aread(attr.id, type.id, &v[0]) >= 0, "checkpoint '", m_path, "': reading attribute '", name,
               "' failed");
  while (!v.empty() && v.back() == '\0') v.pop_back();
  return v;
}

#else  // no HDF5

struct CheckpointWriter::Impl {};
struct CheckpointReader::Impl {};
namespace {
[[noreturn]] void no_hdf5(const std::string& path) {
  throw Error("checkpoint '" + path + "': this MoKA was built without HDF5 (MOKA_ENABLE_HDF5=OFF)");
}
}  // namespace
bool CheckpointWriter::parallel_available() { return false; }
CheckpointWriter::CheckpointWriter(const std::string& path) : m_path(path) { no_hdf5(path); }
CheckpointWriter::CheckpointWriter(const std::string& path, MPI_Comm) : m_path(path) { no_hdf5(path); }
CheckpointWriter::~CheckpointWriter() = default;
template <class T>
void CheckpointWriter::create(const std::string&, const std::vector<long>&) { no_hdf5(m_path); }
template <class T>
void CheckpointWriter::write_block(const std::string&, const std::vector<long>&, const std::vector<long>&,
                                   const T*) { no_hdf5(m_path); }
template <class T>
void CheckpointWriter::write(const std::string&, const std::vector<T>&, const std::vector<long>&) { no_hdf5(m_path); }
template <class T>
void CheckpointWriter::write_blocks(const std::string&, const std::vector<CheckpointBlock<T>>&) { no_hdf5(m_path); }
void CheckpointWriter::attribute(const std::string&, const std::string&) { no_hdf5(m_path); }
void CheckpointWriter::commit() { no_hdf5(m_path); }
CheckpointReader::CheckpointReader(const std::string& path) : m_path(path) { no_hdf5(path); }
CheckpointReader::~CheckpointReader() = default;
bool CheckpointReader::has(const std::string&) const { return false; }
std::vector<long> CheckpointReader::shape(const std::string&) const { return {}; }
CheckpointType CheckpointReader::type(const std::string&) const { no_hdf5(m_path); }
std::vector<std::string> CheckpointReader::datasets() const { return {}; }
template <class T>
std::vector<T> CheckpointReader::read(const std::string&) const { no_hdf5(m_path); }
template <class T>
std::vector<T> CheckpointReader::read_block(const std::string&, const std::vector<long>&,
                                            const std::vector<long>&) const { no_hdf5(m_path); }
template <class T>
void CheckpointReader::read_block_into(const std::string&, const std::vector<long>&, const std::vector<long>&,
                                       T*) const { no_hdf5(m_path); }
std::uint64_t CheckpointReader::stored_checksum(const std::string&) const { no_hdf5(m_path); }
std::uint64_t CheckpointReader::checksum_rows(const std::string&, long, long) const { no_hdf5(m_path); }
bool CheckpointReader::has_attribute(const std::string&) const { return false; }
std::string CheckpointReader::attribute(const std::string&) const { no_hdf5(m_path); }

#endif

// Every member template, for each element type (the HDF5 bodies or the stubs above).
#define MOKA_CHECKPOINT_INSTANTIATE(T)                                                                          \
  template void CheckpointWriter::create<T>(const std::string&, const std::vector<long>&);                      \
  template void CheckpointWriter::write_block<T>(const std::string&, const std::vector<long>&,                  \
                                                 const std::vector<long>&, const T*);                           \
  template void CheckpointWriter::write_blocks<T>(const std::string&, const std::vector<CheckpointBlock<T>>&);   \
  template void CheckpointWriter::write<T>(const std::string&, const std::vector<T>&, const std::vector<long>&); \
  template void CheckpointReader::read_block_into<T>(const std::string&, const std::vector<long>&,              \
                                                     const std::vector<long>&, T*) const;                       \
  template std::vector<T> CheckpointReader::read<T>(const std::string&) const;                                 \
  template std::vector<T> CheckpointReader::read_block<T>(const std::string&, const std::vector<long>&,          \
                                                          const std::vector<long>&) const;
MOKA_CHECKPOINT_INSTANTIATE(double)
MOKA_CHECKPOINT_INSTANTIATE(float)
MOKA_CHECKPOINT_INSTANTIATE(std::int64_t)
#undef MOKA_CHECKPOINT_INSTANTIATE

}  // namespace moka
