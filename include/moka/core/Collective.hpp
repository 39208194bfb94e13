#pragma once
/// \file Collective.hpp
/// \brief Errors found by every rank alike (a deck value that is wrong, a
/// layout that does not fit the rank count, a run too large for memory)
/// reported once, with the deck-error exit status, instead of once per rank
/// followed by MPI_Abort.
///
/// \code
/// try {
///   moka::agree_on_failure(comm, [&] { moka::check_training_deck(comm, deck); });
/// } catch (const moka::CollectiveError& e) {
///   if (rank == 0) std::cerr << "moka-train: error: " << e.what() << "\n";
///   return 2;    // every rank leaves cleanly: they all know
/// }
/// \endcode

#include <moka/core/Error.hpp>

#include <mpi.h>

#include <functional>
#include <string>

namespace moka {

/// \brief A failure every rank of a communicator knows of, with the same
/// message on every rank: print it on one rank, leave on all.
class CollectiveError : public Error {
 public:
  using Error::Error;
};

/// \brief Runs \p f on every rank of \p comm. Where it threw on any rank,
/// every rank throws moka::CollectiveError with one message: rank 0's when
/// rank 0 failed (a setting that is wrong everywhere says so once), else
/// the lowest failing rank's, prefixed "[rank r] " (a file one node cannot
/// read, memory one node lacks).
/// \note Collective over \p comm.
void agree_on_failure(MPI_Comm comm, const std::function<void()>& f);

}  // namespace moka
