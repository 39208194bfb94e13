#pragma once
/// \file CheckpointFile.hpp
/// \brief The file layer of checkpoints (issue 14, in progress): named
/// datasets of doubles, floats or 64-bit integers (names with '/' make
/// groups), root string attributes, a checksum per dataset (FNV-1a 64 of
/// its bytes, stored as the dataset's `checksum` attribute and verified on
/// every read), and writing that never leaves a half-written file under the
/// final name: data goes to `<path>.tmp`, is read back and verified, then
/// renamed. Serial HDF5 API, one process (the caller gathers).
///
/// \code
/// moka::CheckpointWriter w("run.h5");
/// w.write("model/w1", w1_values, {E, d, d_ff});
/// w.attribute("deck", deck_text);
/// w.commit();                              // verified, then renamed
/// moka::CheckpointReader r("run.h5");
/// auto w1 = r.read_double("model/w1");     // checksum checked
/// \endcode

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moka {

/// \brief FNV-1a 64 of \p bytes bytes.
std::uint64_t checksum64(const void* data, std::size_t bytes);

/// \brief Writes one checkpoint file. Throws moka::Error naming the file
/// and dataset on any failure; a writer destroyed without commit() removes
/// its temporary file and leaves any file already at the final name as it was.
class CheckpointWriter {
 public:
  explicit CheckpointWriter(const std::string& path);
  ~CheckpointWriter();
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;

  /// \brief Dataset \p name of \p shape (its product must equal the size).
  void write(const std::string& name, const std::vector<double>& data, const std::vector<long>& shape);
  void write(const std::string& name, const std::vector<float>& data, const std::vector<long>& shape);
  void write(const std::string& name, const std::vector<std::int64_t>& data, const std::vector<long>& shape);
  /// \brief A string attribute of the file's root.
  void attribute(const std::string& name, const std::string& value);
  /// \brief Closes the temporary file, reads every dataset back against its
  /// checksum, and renames it to the final path.
  void commit();
  /// \brief The final path, and the temporary one written until commit().
  const std::string& path() const { return m_path; }
  std::string temp_path() const { return m_path + ".tmp"; }

  struct Impl;

 private:
  std::string m_path;
  std::unique_ptr<Impl> m_impl;
  std::vector<std::string> m_names;
};

/// \brief Reads a checkpoint file. Every read checks the dataset's
/// checksum; moka::Error names the file and the dataset that is missing,
/// of another type or shape, or whose bytes do not match.
class CheckpointReader {
 public:
  explicit CheckpointReader(const std::string& path);
  ~CheckpointReader();
  CheckpointReader(const CheckpointReader&) = delete;
  CheckpointReader& operator=(const CheckpointReader&) = delete;

  bool has(const std::string& name) const;
  std::vector<long> shape(const std::string& name) const;
  std::vector<double> read_double(const std::string& name) const;
  std::vector<float> read_float(const std::string& name) const;
  std::vector<std::int64_t> read_int64(const std::string& name) const;
  std::string attribute(const std::string& name) const;
  const std::string& path() const { return m_path; }

  struct Impl;

 private:
  std::string m_path;
  std::unique_ptr<Impl> m_impl;
};

}  // namespace moka
