#pragma once
/// \file CostModel.hpp
/// \brief The time of one MoE layer's forward + backward and of a training
/// step on each rank of a layout, predicted from a machine profile
/// (moka::MachineProfile) and the routing (docs/cost-model.md).
///
/// Per layer step (forward + backward), on the critical path:
///   fixed    = layer_fixed (+ exchange_fixed with more than one rank)
///   gate     = T d E gate_flop + T E gate_elem         (T: tokens per rank)
///   tokens   = T k d token_elem                        (dispatch, combine and their backwards)
///   experts  = max over EP ranks of the sum over its slots of
///              expert_seconds(d, d_ff / S, rows of the slot), less
///              expert_shared per slot with rows beyond the first
///              (where ranks share cores, concurrent_ranks < ranks_per_node:
///              the node's processor sharing, shared_node_seconds)
///   exchange = 4 (latency + max over ranks of max(rows sent, rows received) x row bytes / bandwidth)
///              (there and back, forward and backward; EP > 1)
///   slicing  = 4 (latency + rows gathered x row bytes (S - 1) / S / bandwidth)   (S > 1)
/// Per step: layers x layer + gradient sums (per bucket of comm.bucket_mb:
/// allreduce latency + bytes / bandwidth, over the groups larger than one
/// rank) + optimizer (parameters held here x optimizer_elem).
/// The ranks wait for each other at every exchange, so the busiest rank
/// sets the experts term; the gate and token work is the same on every rank.

#include <moka/balance/Policy.hpp>
#include <moka/core/Memory.hpp>
#include <moka/moe/MoEConfig.hpp>
#include <moka/plan/MachineProfile.hpp>

#include <string>
#include <vector>

namespace moka {

/// \brief How a run's ranks are laid out (the choices moka-plan ranks).
struct LayoutChoice {
  int ep = 1, slices = 1, edp = 1;  ///< world = ep x slices x edp
  int slots = 0;                    ///< expert slots per EP rank (0: experts / EP; more: replicas)
  std::string exchange = "none";    ///< exchange path: none (EP 1), mpi, nccl, direct
  int shadowing = 0;                ///< dynamic shadowing: experts shadowed at most per step (0: off)
  int schedule = 1;                 ///< smart scheduling: peer groups of the EP exchange (1: off)
  int world() const { return ep * slices * edp; }
  int slots_per_rank(int num_experts) const { return slots > 0 ? slots : num_experts / ep; }
  /// \brief "EP 4 x S 1 x EDP 1, 2 slots, mpi" (", shadowing 2" when on).
  std::string describe(int num_experts) const;
};

/// \brief What is trained, per rank.
struct StepShape {
  MoEConfig moe;                 ///< the MoE layers' configuration
  double tokens = 0;             ///< tokens per rank per forward
  int layers = 1;                ///< MoE layers alike
  std::size_t scalar_bytes = 4;  ///< parameters' and exchanged rows' bytes per value
  double dense_params = 0;       ///< parameters outside the MoE layers (summed over the world)
  double bucket_mb = 32;         ///< comm.bucket_mb
};

/// \brief Predicted seconds; layer terms per layer forward + backward.
struct StepPrediction {
  double fixed = 0, gate = 0, tokens = 0, experts = 0, exchange = 0, slicing = 0;
  double shadowing = 0;  ///< shadowed experts' parameters broadcast and gradients reduced
  double shadowed  = 0;  ///< experts shadowed (per layer step)
  double overlap   = 0;  ///< smart scheduling: exchange hidden behind the experts (subtracted)
  double layer = 0;      ///< the sum of the above
  double grad_sync = 0;  ///< gradient sums of a step
  double optimizer = 0;  ///< the optimizer's update of a step
  double step = 0;       ///< layers x layer + grad_sync + optimizer
  double busiest_rows = 0, mean_rows = 0;  ///< expert rows per EP rank (slowest and mean)
  std::vector<double> rank_expert_seconds;  ///< experts term of each EP rank
  std::vector<double> rank_rows;            ///< expert rows of each EP rank
};

/// \brief Predicts one step of \p shape on \p layout. \p counts: kept
/// assignments per expert of one MoE group's batch (the tokens of its
/// ep x slices ranks, T ep slices k in all when nothing is dropped).
/// \p experts_at: each EP rank's experts by local slot (empty: contiguous;
/// replicas split their rows as MoELayer does). With layout.shadowing, the
/// experts moka::choose_shadowed picks (costs from moka::shadow_cost; each
/// EP rank's tokens taken as an equal share of every expert's) are computed
/// at their tokens' ranks: their rows leave the owner and the exchange, and
/// the step pays their broadcast and reduction. With layout.schedule = G > 1
/// (EP > 1, no slicing), G' = min(G, EP) peer groups hide
/// profile.schedule_overlap x (1 - 1/G') x min(experts, exchange) (the same
/// messages, sent in groups). Throws moka::Error when the
/// profile lacks what the layout needs (an exchange path, the all-reduce
/// figures for more than one rank).
StepPrediction predict_step(const MachineProfile& profile, const StepShape& shape, const LayoutChoice& layout,
                            const std::vector<double>& counts, const RankExperts& experts_at = {});

/// \brief When the last of a node's ranks finishes work that takes each
/// EP rank \p rank_seconds with every rank of the node busy (\p copies:
/// ranks with the same work, world / EP). With profile.concurrent_ranks =
/// ranks_per_node (a device per rank), the largest; with fewer (ranks share
/// cores), ranks that finish early leave their share to the others.
double shared_node_seconds(const MachineProfile& profile, const std::vector<double>& rank_seconds, int copies);

/// \brief Rows the busiest rank sends or receives in one transfer of the
/// EP exchange, given the rows each EP rank's experts process (\p rank_rows).
double exchange_busiest_rows(const StepShape& shape, const LayoutChoice& layout, const std::vector<double>& counts,
                             const std::vector<double>& rank_rows);

/// \brief Parameters one rank holds (for the optimizer term): gate, its
/// experts' slots, and its share of the dense parameters (all of them).
double parameters_per_rank(const StepShape& shape, const LayoutChoice& layout);

/// \brief Dynamic shadowing's costs (moka::choose_shadowed) from the
/// profile: the marginal expert time per row at \p rows_per_expert rows (the
/// curve's slope there), one expert slot's parameters in the run's scalar
/// bytes, and the all-reduce link for their broadcast and the gradients'
/// reduction. Throws moka::Error without all-reduce figures.
ShadowCost shadow_cost(const MachineProfile& profile, const StepShape& shape, const LayoutChoice& layout,
                       double rows_per_expert, int max_shadowed);

/// \brief The memory one rank needs for \p shape on \p layout (the
/// estimate the drivers check runs with).
MemoryEstimate layout_memory(const StepShape& shape, const LayoutChoice& layout, int optimizer_moments);

}  // namespace moka
