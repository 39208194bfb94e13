#pragma once
/// \file Log.hpp
/// \brief Logging: rank-0 messages for the run, per-rank messages for errors.
///
/// `moka::log::info("step ", s, " loss ", l);` prints on rank 0 of the
/// communicator given to moka::log::set_comm (MPI_COMM_WORLD by default).
/// `moka::log::all(...)` prints on every rank with a "[rank r] " prefix.
/// The level comes from moka::log::set_level or the environment variable
/// MOKA_LOG_LEVEL (error, warn, info, debug).

#include <moka/core/Error.hpp>

#include <mpi.h>

#include <iostream>
#include <string>

namespace moka {
namespace log {

/// \brief Verbosity levels, most severe first.
enum class Level { error = 0, warn = 1, info = 2, debug = 3 };

/// \brief Sets the verbosity.
void set_level(Level level);
/// \brief Current verbosity.
Level level();
/// \brief Parses "error", "warn", "info" or "debug"; throws moka::Error otherwise.
Level level_from_string(const std::string& s);
/// \brief Communicator whose rank 0 prints rank-0 messages.
void set_comm(MPI_Comm comm);
/// \brief Rank of this process in the logging communicator (0 before MPI is up).
int rank();

namespace impl {
void emit(Level lvl, bool every_rank, const std::string& message);
}

/// \brief Rank 0: informational message.
template <class... Args>
void info(Args&&... args) {
  if (level() >= Level::info) impl::emit(Level::info, false, moka::impl::concat(std::forward<Args>(args)...));
}
/// \brief Rank 0: warning.
template <class... Args>
void warn(Args&&... args) {
  if (level() >= Level::warn) impl::emit(Level::warn, false, moka::impl::concat(std::forward<Args>(args)...));
}
/// \brief Rank 0: debug detail.
template <class... Args>
void debug(Args&&... args) {
  if (level() >= Level::debug) impl::emit(Level::debug, false, moka::impl::concat(std::forward<Args>(args)...));
}
/// \brief Every rank, prefixed with the rank, to stderr: for errors that may happen on one rank only.
template <class... Args>
void all(Args&&... args) {
  impl::emit(Level::error, true, moka::impl::concat(std::forward<Args>(args)...));
}

}  // namespace log
}  // namespace moka
