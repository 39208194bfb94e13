#pragma once
/// \file Migration.hpp
/// \brief Moving experts between slots: everything an expert owns travels
/// with it (parameters, i.e. the fp32 masters in mixed precision, the
/// gradients being accumulated, the optimizer's moments; the bf16 copies
/// are rewritten from the moved masters, which gives the same bits; the
/// step count is one per optimizer and the same for every expert), point
/// to point through the EP group's moka::Communicator (NCCL on GPUs, MPI on
/// hosts), many experts per exchange, through a staging buffer of bounded
/// size.
///
/// \code
/// moka::MigrationStats st = moka::migrate_experts(space, layer, &optimizer, new_placement, 64.0);
/// \endcode

#include <moka/model/Optimizer.hpp>
#include <moka/moe/MoELayer.hpp>
#include <moka/parallel/Placement.hpp>

#include <vector>

namespace moka {

/// \brief One slot's state going from one slot of the EP group to another.
struct SlotMove {
  int expert = 0;
  Placement::Slot from, to;
  int round = 0;  ///< exchange round it travels in
};

/// \brief What to move from \p from to \p to (the same experts, ranks and
/// slots per rank), in rounds: a slot that is a source is overwritten no
/// earlier than the round that reads it; a rank sends and receives at most
/// \p budget_elems elements per round where that can be kept (a round
/// holds at least one move, and a cycle of slots that read each other
/// travels in one round: over_budget then says so). Sources: a slot of the
/// same rank where the expert already is, else the old holder that has
/// been given the fewest sends so far (ties: lowest rank). The same on
/// every rank.
struct MigrationPlan {
  std::vector<SlotMove> moves;
  int rounds         = 0;
  bool over_budget   = false;
  long moved_experts = 0;  ///< distinct experts that gain a slot
  /// \brief Plans; throws moka::Error when the two placements differ in
  /// shape.
  static MigrationPlan make(const Placement& from, const Placement& to, long slot_elems, long budget_elems);
  /// \brief Moves between different ranks.
  long remote_moves() const;
};

/// \brief What a migration did (the same on every rank of the EP group).
struct MigrationStats {
  long moves        = 0;  ///< slots written
  long remote_moves = 0;  ///< of them, from another rank
  long bytes        = 0;  ///< bytes sent between ranks, over the EP group
  long max_rank_bytes = 0;  ///< the most one rank sent or received
  int rounds        = 0;
  bool over_budget  = false;
  double seconds    = 0;  ///< wall time of the move (this rank, fenced)
};

/// \brief Moves \p layer's experts to placement \p to and adopts it
/// (MoELayer::set_placement). \p optimizer: the one that updates the
/// layer's tensors (nullptr: only parameters and gradients move; its
/// tensors are found by their data). \p staging_mb: the staging budget per
/// rank and round. Collective over the layer's EP group. Call it between
/// steps (after the optimizer step, before the next zero_grad) or inside an
/// accumulation window before GradSync::sync: with replicas, the gradients
/// are taken as per-replica parts to be summed, so between GradSync::sync
/// and the optimizer step (when each replica already holds the sum) they
/// would be counted once per replica.
template <class Scalar, class MemorySpace>
MigrationStats migrate_experts(const typename MemorySpace::execution_space& space,
                               MoELayer<Scalar, MemorySpace>& layer, Optimizer<Scalar, MemorySpace>* optimizer,
                               const Placement& to, double staging_mb);

}  // namespace moka

#include <moka/balance/impl/Migration_impl.hpp>
