#pragma once
/// \file Planner.hpp
/// \brief moka-plan's core: every layout of a run over a number of ranks
/// (EP x slicing x EDP, slots per rank, placement policy, exchange path),
/// refused with a reason where it cannot run or fit, else predicted by the
/// cost model over a routing workload and ranked (docs/cost-model.md).

#include <moka/plan/CostModel.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace moka {

/// \brief Routing to plan for: each step's share of the assignments per
/// expert (each row sums to 1).
struct Workload {
  std::string what;                         ///< "zipf 1.2", "trace <file> layer 0 (10 steps)"
  std::vector<std::vector<double>> shares;  ///< [steps][experts]
};
/// \brief Every expert alike.
Workload uniform_workload(int num_experts);
/// \brief Zipf's law with exponent \p s: the i-th hottest expert gets a share
/// proportional to 1 / i^s; which expert is i-th is a fixed shuffle by \p seed.
Workload zipf_workload(int num_experts, double s, std::uint64_t seed);
/// \brief Each iteration row of a routing trace's layer \p layer (HDF5,
/// shared/traces format); throws moka::Error when its expert count is not
/// \p num_experts.
Workload trace_workload(const std::string& path, int layer, int num_experts);

/// \brief What bounds the enumeration.
struct PlanOptions {
  int ranks = 1;                 ///< ranks of the run
  double memory_per_rank = 0;    ///< bytes (0: no limit)
  int max_extra_slots = 2;       ///< spare slots per rank tried (replicas)
  int optimizer_moments = 2;     ///< Adam 2, SGD 1
  std::vector<std::string> policies{"static", "smartmoe", "moka"};  ///< placement policies tried
  int max_shadowed = 2;          ///< dynamic shadowing tried with this many shadow slots (0: not tried)
  bool try_schedule = true;      ///< smart scheduling tried at degree EP (EP > 1, no slicing, fp32 / fp64)
};

/// \brief One layout: its choices, where the experts go, what is predicted
/// (each term the mean over the workload's steps), or why it was refused.
struct PlanCandidate {
  LayoutChoice layout;
  std::string policy = "static";  ///< balance.policy that places the experts: static, smartmoe, moka
  RankExperts experts_at;          ///< experts per EP rank by slot (predicted placement)
  StepPrediction predicted;
  double memory = 0;               ///< bytes per rank (device memory)
  std::string refused;             ///< empty when it can run
};

/// \brief Enumerates, checks and predicts the layouts of \p shape (tokens
/// per rank) over \p options.ranks ranks; runnable ones first, fastest
/// predicted step first; refused ones after, with their reasons. The
/// exchange paths tried are the profile's.
std::vector<PlanCandidate> plan_layouts(const MachineProfile& profile, const StepShape& shape, const Workload& workload,
                                        const PlanOptions& options);

/// \brief The deck keys that select \p c (parallel.*, balance.*, comm.*),
/// with a header naming the prediction: what moka-train includes.
std::string deck_fragment(const PlanCandidate& c, const MoEConfig& moe, const std::string& header);

}  // namespace moka
