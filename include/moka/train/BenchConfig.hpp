#pragma once
/// \file BenchConfig.hpp
/// \brief The keys moka-bench reads: run.*, the MoE layer's, and bench.*.

#include <moka/deck/DeckSchema.hpp>

namespace moka {

/// \brief Schema of moka-bench decks (input_decks/bench_*.deck).
DeckSchema bench_schema();

}  // namespace moka
