#pragma once
/// \file BenchConfig.hpp
/// \brief The keys moka-bench reads: run.*, the MoE layer's, and bench.*.

#include <moka/core/Memory.hpp>
#include <moka/deck/DeckSchema.hpp>
#include <moka/deck/InputDeck.hpp>

namespace moka {

/// \brief Schema of moka-bench decks (input_decks/bench_*.deck).
DeckSchema bench_schema();

/// \brief What a moka-bench run of \p deck allocates on one rank.
MemoryEstimate bench_memory(const InputDeck& deck, int world_size);

/// \brief Checks a validated moka-bench deck on \p world_size ranks the same
/// way on every rank: the layer's values, bf16 on this build, the payload
/// range of the exchange mode, parallel.* keys the mode cannot honour
/// (layer mode runs one layer per rank with no exchange; exchange mode uses
/// EP = every rank, no slicing), and the memory (moka::check_memory_fits).
/// Run it under moka::agree_on_failure.
void check_bench_deck(const InputDeck& deck, int world_size, int ranks_on_node);

}  // namespace moka
