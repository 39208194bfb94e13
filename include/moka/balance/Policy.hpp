#pragma once
/// \file Policy.hpp
/// \brief Placement policies of the adaptive balancer (docs/balance.md):
/// from the predicted per-expert loads and where the experts are now, where
/// they go next. Pure host functions, the same result on every rank.
///
/// A layout lists each rank's experts in local-slot order; a rank may hold
/// fewer experts than it has slots (a spare slot left empty: `static` and
/// `smartmoe` do not use spare slots; the replay driver models that, a
/// layer fills every slot). A replicated expert's load is split among its
/// replicas by moka::split_replica_rows, as MoELayer splits its rows.
///
/// - `static`: never moves.
/// - `smartmoe` (SmartMoE, ATC'23): experts by load, heaviest first, each to
///   the least-loaded rank with a free slot (on ties the rank it is on);
///   adopted only if the busiest rank's load drops. One slot per expert.
/// - `moka`: spare slots go to the hottest experts (each added replica to
///   the expert with the largest load per replica), replicas packed
///   heaviest first onto the least-loaded rank that does not hold the
///   expert yet; packed once strictly and once preferring an expert's
///   current rank when that costs at most balance.sticky of the mean rank
///   load; of those and the current layout, the one with the least
///   predicted time over the horizon to the next re-plan, migration
///   included (bytes over the migration bandwidth) is adopted.

#include <moka/parallel/Placement.hpp>

#include <string>
#include <vector>

namespace moka {

/// \brief Each rank's experts, in local-slot order.
using RankExperts = std::vector<std::vector<int>>;

/// \brief The policies.
enum class BalancePolicy { static_placement, smartmoe, moka };
/// \brief Parses "static", "smartmoe", "moka"; throws moka::Error otherwise.
BalancePolicy balance_policy_from_string(const std::string& s);
const char* to_string(BalancePolicy p);

/// \brief What the migration-aware policy weighs.
struct PlanCost {
  double row_seconds      = 1e-9;  ///< MoE-layer time per row of the busiest rank (per step)
  double slot_bytes       = 0;     ///< bytes an expert slot moves (state of one expert)
  double bandwidth        = 50e9;  ///< migration bytes per second between ranks
  double horizon_steps    = 10;    ///< steps until the next re-plan
  double sticky           = 0.05;  ///< moka: keep an expert on its rank when that costs at most this x the mean rank load
};

/// \brief The migration bandwidth to plan with after a migration moved
/// \p bytes (the busiest rank's) in \p seconds, given the \p estimate
/// in use: the geometric mean of the two (an average of the logarithms
/// with weight 1/2). One measurement alone is a poor estimate: the first
/// migration of a run carries one-time costs (measured on 4 CPU ranks: its
/// exchange took 4-5 ms against 0.7 ms for the next one of about the same
/// size), and ranks that arrive late add their wait; an outlier so moves
/// the estimate only halfway, while repeated measurements converge to
/// their own level. Returns \p estimate when nothing moved.
double update_bandwidth(double estimate, double bytes, double seconds);

/// \brief A policy's decision.
struct PlanDecision {
  RankExperts layout;          ///< where the experts go (the current one when not changed)
  bool changed = false;
  double busiest_before = 0;   ///< expected busiest rank load, current layout
  double busiest_after  = 0;   ///< expected busiest rank load, chosen layout
  double mean = 0;             ///< mean rank load
  long moved_slots = 0;        ///< slots that receive an expert from another rank
  long replicated  = 0;        ///< experts with more than one slot in the chosen layout
  double bytes = 0;            ///< bytes moved between ranks
  double migration_seconds = 0;  ///< estimated
  double saving_seconds = 0;     ///< estimated layer time saved over the horizon
};

/// \brief The layout of a placement.
RankExperts layout_of(const Placement& p);
/// \brief A full placement (every slot used) from \p want, keeping each
/// expert that stays on a rank in the local slot it has in \p current;
/// throws moka::Error where a rank of \p want does not have \p slots experts.
Placement placement_of(const RankExperts& want, const Placement& current, int num_experts);
/// \brief Per-rank load of \p layout under per-expert \p load.
std::vector<double> rank_loads(const std::vector<double>& load, const RankExperts& layout);
/// \brief Busiest rank load / mean rank load (1 when all are idle).
double imbalance(const std::vector<double>& load, const RankExperts& layout);
/// \brief Slots of \p to that receive an expert its rank did not hold in \p from.
long moved_slots(const RankExperts& from, const RankExperts& to);
/// \brief Contiguous layout: E / P experts per rank (spare slots empty).
RankExperts contiguous_layout(int num_experts, int ranks);

/// \brief Runs \p policy on the predicted per-expert \p load. \p slots:
/// slots per rank. \p recent: recent steps' loads (the monitor's
/// history); layouts are scored by the busiest rank load expected over the
/// prediction and these (each step's own routing decides how replicas
/// split), so a layout that only fits the average is not preferred.
/// Deterministic.
PlanDecision plan_placement(BalancePolicy policy, const std::vector<double>& load, const RankExperts& current,
                            int slots, const PlanCost& cost, const std::vector<std::vector<double>>& recent = {});

/// \brief What FasterMoE's dynamic shadowing weighs for one step.
struct ShadowCost {
  double row_seconds  = 1e-9;  ///< expert time per row on a rank (forward + backward)
  double expert_bytes = 0;     ///< one expert's parameters (broadcast), and again its gradients (reduced)
  double bandwidth    = 50e9;  ///< bytes per second of the broadcast and the reduction
  double latency      = 0;     ///< seconds per broadcast or reduction
  int max_shadowed    = 4;     ///< experts shadowed at most per step
  /// Seconds one shadowed expert adds: its parameters to every rank, its gradients back.
  double per_expert() const { return 2.0 * (latency + expert_bytes / bandwidth); }
};

/// \brief Which experts one step shadows, and what it gains.
struct ShadowDecision {
  std::vector<int> experts;   ///< shadowed, in the order chosen
  double busiest_before = 0;  ///< rows of the busiest rank without shadowing
  double busiest_after  = 0;  ///< with the chosen experts shadowed
  double seconds_before = 0;  ///< busiest x row_seconds
  double seconds_after  = 0;  ///< busiest x row_seconds + shadowing's own cost
};

/// \brief Rank loads (rows) when the experts in \p shadowed are computed
/// where their tokens are (rank r takes \p per_source[r][e] rows of each;
/// no row of theirs moves) and the others as \p layout places them
/// (replicas splitting their rows as MoELayer does). \p per_source: [ranks][experts].
std::vector<double> shadowed_rank_loads(const std::vector<std::vector<double>>& per_source, const RankExperts& layout,
                                        const std::vector<int>& shadowed);

/// \brief FasterMoE's dynamic shadowing decision for one step: greedily, the
/// expert whose shadowing lowers the step's predicted time (busiest rank's
/// rows x row_seconds, plus ShadowCost::per_expert for every shadowed
/// expert) the most, while one does and fewer than max_shadowed are taken.
/// Deterministic (ties: the lower expert).
ShadowDecision choose_shadowed(const std::vector<std::vector<double>>& per_source, const RankExperts& layout,
                               const ShadowCost& cost);

}  // namespace moka
