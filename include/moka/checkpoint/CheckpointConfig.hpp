#pragma once
/// \file CheckpointConfig.hpp
/// \brief Checkpoint settings (the io.checkpoint_* and io.restart keys),
/// checkpoint file names, finding the latest, pruning old ones, comparing
/// a checkpoint's deck with the run's, verifying a file over ranks, and
/// describing one (moka-inspect). See docs/checkpoints.md.

#include <moka/deck/InputDeck.hpp>
#include <moka/io/CheckpointFile.hpp>

#include <mpi.h>

#include <string>
#include <utility>
#include <vector>

namespace moka {

/// \brief How a checkpoint is written: every rank through MPI-IO
/// (parallel HDF5), or gathered by blocks to rank 0 which writes alone.
enum class CheckpointIO { automatic, parallel, gather };
std::string to_string(CheckpointIO io);

/// \brief The io.checkpoint_* and io.restart keys.
struct CheckpointConfig {
  std::string dir;        ///< io.checkpoint_dir ("" : checkpoints/ beside the metrics file)
  long every = 0;         ///< io.checkpoint_every: steps between checkpoints (0: none on the way)
  bool at_end = false;    ///< one after the last step: io.checkpoint_final, or io.checkpoint_every > 0
  long keep = 3;          ///< io.checkpoint_keep: newest kept (0: all)
  CheckpointIO io = CheckpointIO::automatic;  ///< io.checkpoint_io
  std::string restart;    ///< io.restart: a file, "latest", or "" (a fresh run)

  static DeckSchema schema();
  /// \brief The keys of \p deck; the directory defaults to `checkpoints`
  /// in the directory of \p metrics_file (the working directory without one).
  static CheckpointConfig from_deck(const InputDeck& deck, const std::string& metrics_file);
  /// \brief The path the checkpoint taken after \p step steps of run
  /// \p run_name gets: <dir>/<name>.step<8 digits>.h5 (characters other
  /// than letters, digits, '.', '-' and '_' in the name become '_').
  std::string file_for(const std::string& run_name, long step) const;
  /// \brief Whether this build writes with MPI-IO for this setting.
  bool parallel_io() const;
};

/// \brief Checkpoints of \p run_name in \p dir (complete ones: no .tmp),
/// (step, path), oldest first.
std::vector<std::pair<long, std::string>> list_checkpoints(const std::string& dir, const std::string& run_name);
/// \brief The newest of list_checkpoints; moka::Error naming the
/// directory and the run when there is none.
std::string latest_checkpoint(const std::string& dir, const std::string& run_name);
/// \brief Removes all but the newest \p keep checkpoints (keep 0: none
/// removed), and temporary files older runs left behind. Returns the removed.
std::vector<std::string> prune_checkpoints(const std::string& dir, const std::string& run_name, long keep);

/// \brief Keys of the run's resolved deck that must equal the checkpoint's
/// (the model's and the task's shape, the optimizer type, the seed): one
/// line per key that differs, "key = A in the checkpoint, B here".
std::vector<std::string> deck_differences(const std::string& checkpoint_deck, const std::string& run_deck);

/// \brief Verifies every dataset of \p path against its checksum, each
/// rank of \p comm a share of the rows (MPI_COMM_NULL: this process
/// alone). moka::Error names the file and the first dataset that fails,
/// on every rank. Collective.
void verify_checkpoint(const std::string& path, MPI_Comm comm);

/// \brief What moka-inspect prints: attributes, counters, placement,
/// every dataset with its shape, type and checksum state. Throws
/// moka::Error when the file cannot be read or a checksum fails (after
/// printing what it could into \p out).
void describe_checkpoint(const std::string& path, std::ostream& out, bool show_deck);

/// \brief The build a checkpoint records (backend, precision types, HDF5).
std::string build_description();

}  // namespace moka
