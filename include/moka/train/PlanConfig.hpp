#pragma once
/// \file PlanConfig.hpp
/// \brief The keys moka-plan reads: a moka-train deck's and plan.*
/// (docs/cost-model.md).

#include <moka/deck/DeckSchema.hpp>

namespace moka {

/// \brief Schema of moka-plan decks: moka-train's keys and plan.*.
DeckSchema plan_schema();

}  // namespace moka
