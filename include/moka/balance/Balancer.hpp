#pragma once
/// \file Balancer.hpp
/// \brief moka::Balancer: the adaptive expert placement of a model's MoE
/// layers during training (docs/balance.md). After every step it records
/// each layer's per-expert counts, summed over the gate group, in a
/// moka::LoadMonitor; every balance.interval steps it asks the policy for
/// each layer's next placement and, where the policy moves experts,
/// migrates their whole state (moka::migrate_experts). Every decision is
/// returned for the log and the metrics file.
///
/// \code
/// moka::Balancer<float, M> bal(cfg, layers, &optimizer);
/// for (long step = 0; ...; ++step) {
///   ... forward, backward, GradSync, optimizer step ...
///   bal.record(space);
///   for (const auto& ev : bal.rebalance(space, step + 1)) log(ev);
/// }
/// \endcode

#include <moka/balance/BalanceConfig.hpp>
#include <moka/balance/LoadMonitor.hpp>
#include <moka/balance/Migration.hpp>
#include <moka/balance/Policy.hpp>
#include <moka/model/Optimizer.hpp>
#include <moka/moe/MoELayer.hpp>
#include <moka/parallel/ReplicaSplit.hpp>

#include <mpi.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace moka {

/// \brief One re-plan of one layer.
struct BalanceEvent {
  long step  = 0;
  int layer  = 0;
  PlanDecision decision;  ///< what the policy predicted (busiest / mean before and after, moves, bytes, times)
  MigrationStats migration;  ///< what the move did (measured time)
};

template <class Scalar, class MemorySpace>
class Balancer {
 public:
  using execution_space = typename MemorySpace::execution_space;
  using layer_type      = MoELayer<Scalar, MemorySpace>;

  /// \brief For \p layers (all of one layout), whose tensors \p optimizer
  /// updates (nullptr: none).
  Balancer(const BalanceConfig& cfg, std::vector<layer_type*> layers, Optimizer<Scalar, MemorySpace>* optimizer)
      : m_cfg(cfg), m_layers(std::move(layers)), m_opt(optimizer) {
    const int E = m_layers.empty() ? 1 : m_layers.front()->config().num_experts;
    m_monitor   = LoadMonitor(static_cast<int>(m_layers.size()), E, cfg.predictor);
    m_bandwidth = cfg.migration_gbs * 1e9;
    m_imbalance.assign(m_layers.size(), 1.0);
    m_busiest_rows.assign(m_layers.size(), 0.0);
    if (cfg.shadowing)
      for (layer_type* L : m_layers) {
        MOKA_REQUIRE(L->config().shadow_slots >= cfg.max_shadowed || !L->groups() || L->groups()->ep_size() == 1,
                     "balance.shadowing: the layers were built with ", L->config().shadow_slots,
                     " shadow slots, balance.max_shadowed = ", cfg.max_shadowed);
        L->set_shadow_rule([this, L](const std::vector<std::vector<double>>& per_source, const Placement& p) {
          return choose_shadowed(per_source, layout_of(p), shadow_cost(*L)).experts;
        });
      }
  }

  /// \brief What shadowing one expert of \p L costs in the decision: the
  /// row time in use, one slot's parameters (broadcast; its gradients,
  /// reduced, are as many), the migration bandwidth in use and
  /// balance.shadow_latency_us per collective. The same on every rank (the
  /// row time and bandwidth are agreed over the gate group).
  ShadowCost shadow_cost(layer_type& L) const {
    ShadowCost c;
    c.row_seconds  = row_seconds(L.config());
    c.expert_bytes = double(slot_elements(L, false)) * sizeof(Scalar);
    c.bandwidth    = m_bandwidth;
    c.latency      = 4 * m_cfg.shadow_latency_us * 1e-6;  // W1, b1, W2, b2: one collective each
    c.max_shadowed = m_cfg.max_shadowed;
    return c;
  }

  /// \brief Records the last step's counts of every layer (summed over the
  /// gate group) and the ranks' load ratio under the current placement.
  /// Collective over the layers' gate group.
  void record(const execution_space& space) {
    (void)space;
    for (std::size_t i = 0; i < m_layers.size(); ++i) {
      layer_type& L = *m_layers[i];
      auto hc       = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), L.expert_counts());
      std::vector<long> c(hc.extent(0));
      for (std::size_t e = 0; e < c.size(); ++e) c[e] = hc(e);
      if (L.groups() && L.groups()->gate().size() > 1) L.groups()->gate().allreduce_host(c.data(), int(c.size()));
      const std::vector<double> load(c.begin(), c.end());
      m_monitor.record(static_cast<int>(i), load);
      const auto rl  = rank_loads(load, layout_of(L.placement()));
      const double most = *std::max_element(rl.begin(), rl.end());
      const double mean = std::accumulate(rl.begin(), rl.end(), 0.0) / rl.size();
      m_imbalance[i] = mean > 0 ? most / mean : 1.0;
      // Rows of the busiest rank of one EP group (the counts are over all EDP groups).
      m_busiest_rows[i] = most / (L.groups() ? L.groups()->edp_size() : 1);
      if (L.shadow_slots() > 0) {
        // Shadowing moves rows by where their tokens are, which the counts
        // do not say: the rows each rank's experts took, over the run.
        double r[2] = {double(L.expert_rows()), double(L.expert_rows())};
        MPI_Comm g  = L.groups()->gate().mpi_comm();
        MPI_Allreduce(MPI_IN_PLACE, &r[0], 1, MPI_DOUBLE, MPI_MAX, g);
        MPI_Allreduce(MPI_IN_PLACE, &r[1], 1, MPI_DOUBLE, MPI_SUM, g);
        const double mean_rows = r[1] / L.groups()->gate().size();
        m_imbalance[i]    = mean_rows > 0 ? r[0] / mean_rows : 1.0;
        m_busiest_rows[i] = r[0];
        m_shadowed += static_cast<long>(L.shadowed().size());
      }
    }
  }

  /// \brief The wall time of the step just recorded: with balance.row_ns =
  /// 0 the time per busiest-rank row is measured from it (the whole step
  /// over the layers' busiest rows: an upper bound of the MoE part).
  /// Collective over the layers' gate group: every rank must decide alike,
  /// so the slowest rank's time is used everywhere.
  void observe_step_seconds(double seconds) {
    seconds = max_over_gate(seconds);
    const double rows = std::accumulate(m_busiest_rows.begin(), m_busiest_rows.end(), 0.0);
    if (m_cfg.row_ns > 0 || rows <= 0 || seconds <= 0) return;
    const double r = seconds / rows;
    m_row_seconds  = m_row_seconds > 0 ? 0.8 * m_row_seconds + 0.2 * r : r;
  }
  /// \brief Seconds per busiest-rank row in use.
  double row_seconds(const MoEConfig& mc) const {
    return m_row_seconds > 0 ? m_row_seconds : m_cfg.row_seconds(mc.d_model, mc.d_ff_in(), mc.d_ff);
  }

  /// \brief After step \p steps_done (counting from 1): every
  /// balance.interval steps, re-plans every layer and migrates where the
  /// policy moves experts. Collective over the layers' groups.
  std::vector<BalanceEvent> rebalance(const execution_space& space, long steps_done) {
    std::vector<BalanceEvent> out;
    if (m_cfg.policy == BalancePolicy::static_placement || steps_done % m_cfg.interval != 0) return out;
    for (std::size_t i = 0; i < m_layers.size(); ++i) {
      layer_type& L         = *m_layers[i];
      const MoEConfig& mc   = L.config();
      const Placement& cur  = L.placement();
      PlanCost cost;
      cost.row_seconds   = row_seconds(mc);
      cost.slot_bytes    = double(slot_elements(L)) * sizeof(Scalar);
      cost.bandwidth     = m_bandwidth;
      cost.horizon_steps = m_cfg.interval;
      cost.sticky        = m_cfg.sticky;
      const auto& hist   = m_monitor.history(static_cast<int>(i));
      BalanceEvent ev;
      ev.step     = steps_done;
      ev.layer    = static_cast<int>(i);
      ev.decision = plan_placement(m_cfg.policy, m_monitor.predicted(static_cast<int>(i)), layout_of(cur),
                                   cur.slots_per_rank(), cost,
                                   std::vector<std::vector<double>>(hist.begin(), hist.end()));
      if (!ev.decision.changed) continue;
      const Placement next = placement_of(ev.decision.layout, cur, mc.num_experts);
      ev.migration         = migrate_experts(space, L, m_opt, next, m_cfg.migration_buffer_mb);
      // The measured bandwidth (the slowest rank's, the same on every rank
      // of every EP group, which must keep deciding alike) moves the estimate.
      const double secs = max_over_gate(ev.migration.seconds);
      ev.migration.seconds = secs;
      m_bandwidth          = update_bandwidth(m_bandwidth, double(ev.migration.max_rank_bytes), secs);
      out.push_back(ev);
    }
    return out;
  }

  /// \brief Experts shadowed in the recorded steps' last forwards, summed over layers and steps.
  long shadowed_experts() const { return m_shadowed; }
  const LoadMonitor& monitor() const { return m_monitor; }
  LoadMonitor& monitor() { return m_monitor; }
  /// \brief Busiest / mean rank load of the last recorded step, per layer.
  const std::vector<double>& imbalance_per_layer() const { return m_imbalance; }
  /// \brief The migration bandwidth in use (bytes/s; measured after the first migration).
  double bandwidth() const { return m_bandwidth; }
  const BalanceConfig& config() const { return m_cfg; }
  /// \brief What a checkpoint keeps: the measured row time and migration
  /// bandwidth, then the load monitor's state; and its inverse, so that
  /// the first re-plan after a restart is the one the run would have made.
  std::vector<double> state() const {
    std::vector<double> s{m_row_seconds, m_bandwidth};
    const std::vector<double> m = m_monitor.state();
    s.insert(s.end(), m.begin(), m.end());
    return s;
  }
  void set_state(const std::vector<double>& s) {
    MOKA_REQUIRE(s.size() >= 2, "moka::Balancer::set_state: ", s.size(), " values");
    m_monitor.set_state(std::vector<double>(s.begin() + 2, s.end()));
    m_row_seconds = s[0];
    m_bandwidth   = s[1];
  }

 private:
  /// The largest \p v over the layers' gate group (every rank of the run).
  double max_over_gate(double v) const {
    if (m_layers.empty() || !m_layers.front()->groups() || m_layers.front()->groups()->gate().size() == 1) return v;
    MPI_Allreduce(MPI_IN_PLACE, &v, 1, MPI_DOUBLE, MPI_MAX, m_layers.front()->groups()->gate().mpi_comm());
    return v;
  }
  /// Elements one slot's state moves (parameters, gradients, moments; with
  /// \p state false: its parameters only).
  long slot_elements(layer_type& L, bool state = true) const {
    long n = 0;
    const int fields = !state ? 1 : 2 + (m_opt ? (m_opt->config().type == OptimizerType::sgd ? 1 : 2) : 0);
    for (const auto& p : L.parameters())
      if (p.tag == ParamTag::expert || p.tag == ParamTag::expert_replicated)
        n += static_cast<long>(p.param.extent(0)) / L.local_experts() * fields;
    return n;
  }

  BalanceConfig m_cfg;
  std::vector<layer_type*> m_layers;
  Optimizer<Scalar, MemorySpace>* m_opt = nullptr;
  LoadMonitor m_monitor;
  double m_bandwidth = 20e9, m_row_seconds = 0;
  std::vector<double> m_imbalance, m_busiest_rows;
  long m_shadowed = 0;
};

}  // namespace moka
