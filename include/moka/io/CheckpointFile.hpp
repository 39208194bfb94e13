#pragma once
/// \file CheckpointFile.hpp
/// \brief The file layer of checkpoints: named datasets of doubles, floats
/// or 64-bit integers (names with '/' make groups), written whole or in
/// blocks (hyperslabs), root string attributes, a checksum per dataset, and
/// writing that never leaves a half-written file under the final name: data
/// goes to `<path>.tmp`, is read back against the checksums, then renamed.
///
/// Two ways to write: one process (the caller gathers the blocks), or every
/// rank of a communicator at once through MPI-IO (parallel HDF5 builds:
/// CheckpointWriter::parallel_available()), each rank writing its own
/// blocks. The checksum of a dataset is a sum over its elements of a hash
/// of (flat index, bits), so partial sums of any blocks add up to it in any
/// order: ranks checksum what they wrote, and readers verify a dataset in
/// pieces (CheckpointReader::checksum_rows).
///
/// \code
/// moka::CheckpointWriter w("run.h5");
/// w.write("model/w1", w1_values, {E, d, d_ff});
/// w.attribute("deck", deck_text);
/// w.commit();                              // verified, then renamed
/// moka::CheckpointReader r("run.h5");
/// auto w1 = r.read<double>("model/w1");    // checksum checked
/// \endcode

#include <mpi.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace moka {

/// \brief Element types of checkpoint datasets.
enum class CheckpointType { float64, float32, int64 };
/// \brief "float64", "float32" or "int64".
const char* to_string(CheckpointType t);

/// \brief The checksum part of \p n elements whose flat indices in their
/// dataset start at \p first_index: a sum (mod 2^64) of one 64-bit hash of
/// (index, element bits) per element. Parts of disjoint blocks add up to the
/// dataset's checksum.
template <class T>
std::uint64_t checksum_part(const T* data, long n, long first_index);

/// \brief One block of a dataset: offset, extents, and prod(count) values.
template <class T>
struct CheckpointBlock {
  std::vector<long> offset, count;
  const T* data = nullptr;
};

/// \brief Writes one checkpoint file. Throws moka::Error naming the file
/// and dataset on any failure; a writer destroyed without commit() removes
/// its temporary file and leaves any file already at the final name as it was.
class CheckpointWriter {
 public:
  /// \brief One process writes everything.
  explicit CheckpointWriter(const std::string& path);
  /// \brief Every rank of \p comm writes through MPI-IO (collective; needs
  /// parallel_available()). create(), attribute() and commit() are
  /// collective, in the same order on every rank; write_block() is not.
  CheckpointWriter(const std::string& path, MPI_Comm comm);
  ~CheckpointWriter();
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;

  /// \brief Whether this build's HDF5 can write through MPI-IO.
  static bool parallel_available();

  /// \brief Creates dataset \p name of element type T and \p shape.
  template <class T>
  void create(const std::string& name, const std::vector<long>& shape);
  /// \brief Writes the block at \p offset of extents \p count (row-major,
  /// prod(count) values at \p data) into dataset \p name.
  template <class T>
  void write_block(const std::string& name, const std::vector<long>& offset, const std::vector<long>& count,
                   const T* data);
  /// \brief Every block this rank holds of dataset \p name. In parallel
  /// mode a collective call (every rank, any number of blocks, none too):
  /// the writes go through MPI-IO's collective transfer, each rank taking
  /// part in as many as the rank with the most blocks (empty ones where it
  /// has none left); one process: write_block for each.
  template <class T>
  void write_blocks(const std::string& name, const std::vector<CheckpointBlock<T>>& blocks);
  /// \brief create() and the whole dataset from \p data (in parallel mode
  /// the data of rank 0 is written; the others may pass an empty vector).
  template <class T>
  void write(const std::string& name, const std::vector<T>& data, const std::vector<long>& shape);
  /// \brief A string attribute of the file's root (the same on every rank).
  void attribute(const std::string& name, const std::string& value);
  /// \brief Stores the checksums, closes the temporary file, reads every
  /// dataset back against its checksum (in parallel mode each rank a share
  /// of the rows) and renames it to the final path.
  void commit();
  /// \brief The final path, and the temporary one written until commit().
  const std::string& path() const { return m_path; }
  std::string temp_path() const { return m_path + ".tmp"; }

  struct Impl;

 private:
  std::string m_path;
  std::unique_ptr<Impl> m_impl;
};

/// \brief Reads a checkpoint file (one process; any number of ranks may
/// read one file at once). Whole-dataset reads check the checksum;
/// moka::Error names the file and the dataset that is missing, of another
/// type or shape, or whose bytes do not match.
class CheckpointReader {
 public:
  explicit CheckpointReader(const std::string& path);
  ~CheckpointReader();
  CheckpointReader(const CheckpointReader&) = delete;
  CheckpointReader& operator=(const CheckpointReader&) = delete;

  bool has(const std::string& name) const;
  std::vector<long> shape(const std::string& name) const;
  CheckpointType type(const std::string& name) const;
  /// \brief Every dataset's name, sorted.
  std::vector<std::string> datasets() const;
  /// \brief Dataset \p name whole, of exactly type T, its checksum verified.
  template <class T>
  std::vector<T> read(const std::string& name) const;
  std::vector<double> read_double(const std::string& name) const { return read<double>(name); }
  std::vector<float> read_float(const std::string& name) const { return read<float>(name); }
  std::vector<std::int64_t> read_int64(const std::string& name) const { return read<std::int64_t>(name); }
  /// \brief The block at \p offset of extents \p count, converted to T
  /// (float and double convert into each other). Not verified: see
  /// checksum_rows.
  template <class T>
  std::vector<T> read_block(const std::string& name, const std::vector<long>& offset,
                            const std::vector<long>& count) const;
  /// \brief As read_block, into \p out (prod(count) values).
  template <class T>
  void read_block_into(const std::string& name, const std::vector<long>& offset, const std::vector<long>& count,
                       T* out) const;
  /// \brief The checksum stored with dataset \p name.
  std::uint64_t stored_checksum(const std::string& name) const;
  /// \brief The checksum part of rows [\p row0, \p row0 + \p rows) of the
  /// first extent of dataset \p name, computed from its bytes.
  std::uint64_t checksum_rows(const std::string& name, long row0, long rows) const;
  std::string attribute(const std::string& name) const;
  bool has_attribute(const std::string& name) const;
  const std::string& path() const { return m_path; }

  struct Impl;

 private:
  std::string m_path;
  std::unique_ptr<Impl> m_impl;
};

}  // namespace moka
