#pragma once
/// \file RunConfig.hpp
/// \brief The `run.*` keys of a deck: what every driver reads first.

#include <moka/deck/DeckSchema.hpp>
#include <moka/deck/InputDeck.hpp>
#include <moka/core/Log.hpp>

#include <string>

namespace moka {

/// \brief Run-level settings read from the deck.
struct RunConfig {
  std::string name = "moka";         ///< run.name: label of the run
  long seed        = 1234;           ///< run.seed: seed of every random stream
  log::Level log_level = log::Level::info;  ///< run.log_level
  bool comm_check  = true;           ///< run.comm_check: check MPI/NCCL all-reduce at start

  /// \brief Declares the run.* keys.
  static DeckSchema schema();
  /// \brief Reads the run.* keys from a validated deck.
  static RunConfig from_deck(const InputDeck& deck);
};

}  // namespace moka
