#pragma once
/// \file BalanceConfig.hpp
/// \brief The balance.* keys of the input deck (docs/balance.md): which
/// policy re-plans expert placement, how often, with how many slots per
/// rank, how loads are predicted, and what the migration-aware policy
/// assumes until it has measured.

#include <moka/balance/LoadMonitor.hpp>
#include <moka/balance/Policy.hpp>

namespace moka {

class DeckSchema;
class InputDeck;

struct BalanceConfig {
  BalancePolicy policy = BalancePolicy::static_placement;  ///< balance.policy
  int interval         = 10;    ///< balance.interval: steps between re-plans
  int slots_per_rank   = 0;     ///< balance.slots_per_rank (0: E / EP, no spare slot)
  LoadPredictorConfig predictor;  ///< balance.predictor, balance.ema_decay, balance.window
  double sticky        = 0.05;  ///< balance.sticky
  double migration_gbs = 20;    ///< balance.migration_gbs: assumed until a migration is measured
  double row_ns        = 0;     ///< balance.row_ns: layer time per row of the busiest rank (0: from balance.tflops)
  double tflops        = 300;   ///< balance.tflops: expert GEMM rate for the row-time estimate
  double migration_buffer_mb = 64;  ///< balance.migration_buffer_mb: staging per rank and round
  bool shadowing       = false; ///< balance.shadowing: FasterMoE's dynamic shadowing, decided every step
  int max_shadowed     = 2;     ///< balance.max_shadowed: experts shadowed at most per step and layer
  double shadow_latency_us = 20;  ///< balance.shadow_latency_us: per broadcast or reduction, in the decision

  static DeckSchema schema();
  static BalanceConfig from_deck(const InputDeck& deck);
  /// \brief Slots per rank for \p num_experts on \p ep ranks; throws
  /// moka::Error naming the keys when they do not fit.
  int slots(int num_experts, int ep) const;
  /// \brief Seconds per busiest-rank row of a layer step (forward and
  /// backward), from balance.row_ns or from the expert GEMMs' flops.
  double row_seconds(int d_model, int d_ff_in, int d_ff) const;
};

/// \brief Every key moka-replay reads: replay.*, the moe.* and gate.* keys
/// (model size for the bytes moved) and balance.*.
DeckSchema replay_schema();

}  // namespace moka
