#include <moka/core/Config.hpp>
#include <moka/core/Error.hpp>
#include <moka/io/CheckpointFile.hpp>

#include <cstdio>
#include <numeric>

#ifdef MOKA_HAVE_HDF5
#include <hdf5.h>
#endif

namespace moka {

std::uint64_t checksum64(const void* data, std::size_t bytes) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  std::uint64_t h        = 0xcbf29ce484222325ull;  // FNV-1a 64 offset basis
  for (std::size_t i = 0; i < bytes; ++i) {
    h ^= p[i];
    h *= 0x100000001b3ull;  // FNV prime
  }
  return h;
}

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

template <class T>
hid_t mem_type();
template <>
hid_t mem_type<double>() { return H5T_NATIVE_DOUBLE; }
template <>
hid_t mem_type<float>() { return H5T_NATIVE_FLOAT; }
template <>
hid_t mem_type<std::int64_t>() { return H5T_NATIVE_INT64; }

template <class T>
const char* type_name();
template <>
const char* type_name<double>() { return "float64"; }
template <>
const char* type_name<float>() { return "float32"; }
template <>
const char* type_name<std::int64_t>() { return "int64"; }

}  // namespace

struct CheckpointWriter::Impl {
  hid_t file = -1;
};
struct CheckpointReader::Impl {
  hid_t file = -1;
};

namespace {

template <class T>
void write_dataset(hid_t file, const std::string& path, const std::string& name, const std::vector<T>& data,
                   const std::vector<long>& shape) {
  Quiet q;
  long n = 1;
  for (long s : shape) {
    MOKA_REQUIRE(s >= 0, "checkpoint '", path, "': dataset '", name, "' has a negative extent");
    n *= s;
  }
  MOKA_REQUIRE(!shape.empty() && n == static_cast<long>(data.size()), "checkpoint '", path, "': dataset '", name,
               "' has ", data.size(), " values for a shape of ", n);
  std::vector<hsize_t> dims(shape.begin(), shape.end());
  Handle space(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
  Handle lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose);
  H5Pset_create_intermediate_group(lcpl.id, 1);
  Handle set(H5Dcreate2(file, name.c_str(), mem_type<T>(), space.id, lcpl.id, H5P_DEFAULT, H5P_DEFAULT), H5Dclose);
  MOKA_REQUIRE(set.id >= 0, "checkpoint '", path, "': cannot create dataset '", name, "' (a duplicate name?)");
  MOKA_REQUIRE(data.empty() || H5Dwrite(set.id, mem_type<T>(), H5S_ALL, H5S_ALL, H5P_DEFAULT, data.data()) >= 0,
               "checkpoint '", path, "': writing dataset '", name, "' failed");
  const std::uint64_t sum = checksum64(data.data(), data.size() * sizeof(T));
  Handle aspace(H5Screate(H5S_SCALAR), H5Sclose);
  Handle attr(H5Acreate2(set.id, "checksum", H5T_NATIVE_UINT64, aspace.id, H5P_DEFAULT, H5P_DEFAULT), H5Aclose);
  MOKA_REQUIRE(attr.id >= 0 && H5Awrite(attr.id, H5T_NATIVE_UINT64, &sum) >= 0, "checkpoint '", path,
               "': writing the checksum of '", name, "' failed");
}

template <class T>
std::vector<T> read_dataset(hid_t file, const std::string& path, const std::string& name) {
  Quiet q;
  MOKA_REQUIRE(H5Lexists(file, name.c_str(), H5P_DEFAULT) > 0, "checkpoint '", path, "': no dataset '", name, "'");
  Handle set(H5Dopen2(file, name.c_str(), H5P_DEFAULT), H5Dclose);
  MOKA_REQUIRE(set.id >= 0, "checkpoint '", path, "': '", name, "' is not a dataset");
  Handle type(H5Dget_type(set.id), H5Tclose);
  Handle native(H5Tget_native_type(type.id, H5T_DIR_ASCEND), H5Tclose);
  MOKA_REQUIRE(H5Tequal(native.id, mem_type<T>()) > 0, "checkpoint '", path, "': dataset '", name, "' is not ",
               type_name<T>());
  Handle space(H5Dget_space(set.id), H5Sclose);
  const hssize_t n = H5Sget_simple_extent_npoints(space.id);
  MOKA_REQUIRE(n >= 0, "checkpoint '", path, "': dataset '", name, "' has no readable extent");
  std::vector<T> out(static_cast<std::size_t>(n));
  MOKA_REQUIRE(out.empty() || H5Dread(set.id, mem_type<T>(), H5S_ALL, H5S_ALL, H5P_DEFAULT, out.data()) >= 0,
               "checkpoint '", path, "': reading dataset '", name, "' failed (a truncated or damaged file?)");
  std::uint64_t want = 0;
  MOKA_REQUIRE(H5Aexists(set.id, "checksum") > 0, "checkpoint '", path, "': dataset '", name, "' has no checksum");
  Handle attr(H5Aopen(set.id, "checksum", H5P_DEFAULT), H5Aclose);
  MOKA_REQUIRE(attr.id >= 0 && H5Aread(attr.id, H5T_NATIVE_UINT64, &want) >= 0, "checkpoint '", path,
               "': the checksum of '", name, "' cannot be read");
  MOKA_REQUIRE(checksum64(out.data(), out.size() * sizeof(T)) == want, "checkpoint '", path, "': dataset '", name,
               "' does not match its checksum (the file is damaged)");
  return out;
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

CheckpointWriter::CheckpointWriter(const std::string& path) : m_path(path), m_impl(std::make_unique<Impl>()) {
  Quiet q;
  m_impl->file = H5Fcreate(temp_path().c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  MOKA_REQUIRE(m_impl->file >= 0, "checkpoint '", path, "': cannot create '", temp_path(),
               "' (does the directory exist and can it be written?)");
}

CheckpointWriter::~CheckpointWriter() {
  if (m_impl && m_impl->file >= 0) {
    H5Fclose(m_impl->file);
    std::remove(temp_path().c_str());
  }
}

void CheckpointWriter::write(const std::string& name, const std::vector<double>& data,
                             const std::vector<long>& shape) {
  write_dataset(m_impl->file, m_path, name, data, shape);
  m_names.push_back(name + "\x01" "d");
}
void CheckpointWriter::write(const std::string& name, const std::vector<float>& data, const std::vector<long>& shape) {
  write_dataset(m_impl->file, m_path, name, data, shape);
  m_names.push_back(name + "\x01" "f");
}
void CheckpointWriter::write(const std::string& name, const std::vector<std::int64_t>& data,
                             const std::vector<long>& shape) {
  write_dataset(m_impl->file, m_path, name, data, shape);
  m_names.push_back(name + "\x01" "i");
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
  MOKA_REQUIRE(m_impl->file >= 0, "checkpoint '", m_path, "': committed twice");
  MOKA_REQUIRE(H5Fclose(m_impl->file) >= 0, "checkpoint '", m_path, "': closing '", temp_path(), "' failed");
  m_impl->file = -1;
  {
    // Read back: every dataset against its checksum.
    CheckpointReader r(temp_path());
    for (const std::string& n : m_names) {
      const std::string name = n.substr(0, n.size() - 2);
      const char kind        = n.back();
      if (kind == 'd') (void)r.read_double(name);
      else if (kind == 'f') (void)r.read_float(name);
      else (void)r.read_int64(name);
    }
  }
  MOKA_REQUIRE(std::rename(temp_path().c_str(), m_path.c_str()) == 0, "checkpoint '", m_path, "': renaming '",
               temp_path(), "' to it failed");
}

CheckpointReader::CheckpointReader(const std::string& path) : m_path(path), m_impl(std::make_unique<Impl>()) {
  m_impl->file = open_read(path);
}

CheckpointReader::~CheckpointReader() {
  if (m_impl && m_impl->file >= 0) H5Fclose(m_impl->file);
}

bool CheckpointReader::has(const std::string& name) const {
  Quiet q;
  return H5Lexists(m_impl->file, name.c_str(), H5P_DEFAULT) > 0;
}

std::vector<long> CheckpointReader::shape(const std::string& name) const {
  Quiet q;
  MOKA_REQUIRE(has(name), "checkpoint '", m_path, "': no dataset '", name, "'");
  Handle set(H5Dopen2(m_impl->file, name.c_str(), H5P_DEFAULT), H5Dclose);
  MOKA_REQUIRE(set.id >= 0, "checkpoint '", m_path, "': '", name, "' is not a dataset");
  Handle space(H5Dget_space(set.id), H5Sclose);
  const int rank = H5Sget_simple_extent_ndims(space.id);
  MOKA_REQUIRE(rank >= 0, "checkpoint '", m_path, "': dataset '", name, "' has no readable shape");
  std::vector<hsize_t> dims(static_cast<std::size_t>(rank));
  H5Sget_simple_extent_dims(space.id, dims.data(), nullptr);
  return std::vector<long>(dims.begin(), dims.end());
}

std::vector<double> CheckpointReader::read_double(const std::string& name) const {
  return read_dataset<double>(m_impl->file, m_path, name);
}
std::vector<float> CheckpointReader::read_float(const std::string& name) const {
  return read_dataset<float>(m_impl->file, m_path, name);
}
std::vector<std::int64_t> CheckpointReader::read_int64(const std::string& name) const {
  return read_dataset<std::int64_t>(m_impl->file, m_path, name);
}

std::string CheckpointReader::attribute(const std::string& name) const {
  Quiet q;
  MOKA_REQUIRE(H5Aexists(m_impl->file, name.c_str()) > 0, "checkpoint '", m_path, "': no attribute '", name, "'");
  Handle attr(H5Aopen(m_impl->file, name.c_str(), H5P_DEFAULT), H5Aclose);
  Handle type(H5Aget_type(attr.id), H5Tclose);
  MOKA_REQUIRE(H5Tget_class(type.id) == H5T_STRING, "checkpoint '", m_path, "': attribute '", name,
               "' is not a string");
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
CheckpointWriter::CheckpointWriter(const std::string& path) : m_path(path) { no_hdf5(path); }
CheckpointWriter::~CheckpointWriter() = default;
void CheckpointWriter::write(const std::string&, const std::vector<double>&, const std::vector<long>&) {}
void CheckpointWriter::write(const std::string&, const std::vector<float>&, const std::vector<long>&) {}
void CheckpointWriter::write(const std::string&, const std::vector<std::int64_t>&, const std::vector<long>&) {}
void CheckpointWriter::attribute(const std::string&, const std::string&) {}
void CheckpointWriter::commit() {}
CheckpointReader::CheckpointReader(const std::string& path) : m_path(path) { no_hdf5(path); }
CheckpointReader::~CheckpointReader() = default;
bool CheckpointReader::has(const std::string&) const { return false; }
std::vector<long> CheckpointReader::shape(const std::string&) const { return {}; }
std::vector<double> CheckpointReader::read_double(const std::string&) const { return {}; }
std::vector<float> CheckpointReader::read_float(const std::string&) const { return {}; }
std::vector<std::int64_t> CheckpointReader::read_int64(const std::string&) const { return {}; }
std::string CheckpointReader::attribute(const std::string&) const { return {}; }

#endif

}  // namespace moka
