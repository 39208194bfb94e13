#pragma once
// Template bodies of moka::MoELayer (included by MoELayer.hpp): the step
// (construction, initialisation, forward, backward, workspace). The token
// exchange, the experts and the gate are in the three files included at
// the end.

#include <moka/core/Log.hpp>
#include <moka/io/RoutingTrace.hpp>
#include <moka/parallel/ReplicaSplit.hpp>
#include <moka/linalg/impl/CublasGemm.hpp>
#include <moka/moe/impl/GateKernels.hpp>
#include <moka/core/impl/Init.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace moka {

template <class Scalar, class MemorySpace>
MoEParams<Scalar, MemorySpace>::MoEParams(const MoEConfig& cfg, const std::string& prefix, int local_experts,
                                          int slices)
    : gate_w(prefix + "gate_w", cfg.d_model, cfg.num_experts),
      noise_w(prefix + "noise_w", cfg.gate == GateType::noisy ? cfg.d_model : 0,
              cfg.gate == GateType::noisy ? cfg.num_experts : 0),
      w1(prefix + "w1", local_experts, cfg.d_model, cfg.d_ff_in() / slices),
      b1(prefix + "b1", cfg.expert_bias ? local_experts : 0, cfg.d_ff_in() / slices),
      w2(prefix + "w2", local_experts, cfg.d_ff / slices, cfg.d_model),
      b2(prefix + "b2", cfg.expert_bias ? local_experts : 0, cfg.d_model) {}

namespace impl {

/// The rows [b, e) of a row-major matrix, as the same View type.
template <class S, class M>
mat<S, M> rows_of(const mat<S, M>& a, long b, long e) {
  return Kokkos::subview(a, std::make_pair(b, e), Kokkos::ALL);
}

/// Expert e's matrix of a [E, m, n] tensor.
template <class S, class M>
mat<S, M> expert_of(const Kokkos::View<S***, Kokkos::LayoutRight, M>& w, int e) {
  return Kokkos::subview(w, e, Kokkos::ALL, Kokkos::ALL);
}

}  // namespace impl

namespace impl {
/// Checks the layout against the layer's shape; returns the slice count S.
/// \p p, or the contiguous placement where it is empty; checked against the
/// layer's experts and EP group.
inline Placement resolved_placement(const MoEConfig& cfg, const std::shared_ptr<ProcessGroups>& g, Placement p) {
  const int P = g ? g->ep_size() : 1;
  if (p.empty()) return Placement::contiguous(cfg.num_experts, P);
  MOKA_REQUIRE(p.num_experts() == cfg.num_experts, "moka::MoELayer: the placement has ", p.num_experts(),
               " experts, moe.num_experts = ", cfg.num_experts);
  MOKA_REQUIRE(p.ep_size() == P, "moka::MoELayer: the placement spans ", p.ep_size(), " ranks, the EP group ", P);
  for (int r = 0; r < P; ++r) {
    std::vector<int> seen(p.num_experts(), -1);
    for (int l = 0; l < p.slots_per_rank(); ++l) {
      const int e = p.expert_at(r, l);
      MOKA_REQUIRE(seen[e] < 0, "moka::MoELayer: the placement puts expert ", e, " twice on EP rank ", r,
                   " (local slots ", seen[e], " and ", l, "); replicas must be on different ranks");
      seen[e] = l;
    }
  }
  return p;
}

/// Shadow slots per rank: MoEConfig::shadow_slots where the EP group has
/// more than one rank (on one, every expert is local already).
inline int shadow_slots_of(const MoEConfig& cfg, const std::shared_ptr<ProcessGroups>& g) {
  return g && g->ep_size() > 1 ? cfg.shadow_slots : 0;
}

inline int validated_slices(const MoEConfig& cfg, const std::shared_ptr<ProcessGroups>& g) {
  if (!g) return 1;
  g->config().validate(g->world().size(), cfg.num_experts, cfg.d_ff);
  return g->slice_size();
}
}  // namespace impl

template <class Scalar, class MemorySpace>
MoELayer<Scalar, MemorySpace>::MoELayer(const MoEConfig& config, std::shared_ptr<ProcessGroups> groups,
                                        Placement placement)
    : m_cfg((config.validate(), config)),
      m_groups(std::move(groups)),
      m_S(impl::validated_slices(config, m_groups)),
      m_L(0),  // the placement's slots per rank, set below
      m_dffl(config.d_ff / m_S),
      m_dfil(config.d_ff_in() / m_S),
      m_ep_rank(m_groups ? m_groups->ep_rank() : 0),
      m_place(impl::resolved_placement(config, m_groups, std::move(placement))),
      m_params(config, "moka::moe::", m_place.slots_per_rank() + impl::shadow_slots_of(config, m_groups), m_S),
      m_grads(config, "moka::moe::grad_", m_place.slots_per_rank() + impl::shadow_slots_of(config, m_groups), m_S) {
  m_Lo = m_place.slots_per_rank();
  m_M  = impl::shadow_slots_of(config, m_groups);
  m_L  = m_Lo + m_M;
  apply_placement();
  {
    // The expert-side offsets, the bias-sum chunk starts and the coalesced
    // exchange's segments share one allocation, so each forward uploads its
    // plan in one copy (stream-ordered, from a kept host mirror: no fence).
    const int P   = m_groups ? m_groups->ep_size() : 1;
    m_plan_dev    = index_vector("moka::moe::exchange_plan", 2 * (m_L + 1) + 3 * P * m_L);
    m_plan_host   = Kokkos::create_mirror_view(m_plan_dev);
    m_e_offsets   = Kokkos::subview(m_plan_dev, std::make_pair(0, m_L + 1));
    m_chunk_start = Kokkos::subview(m_plan_dev, std::make_pair(m_L + 1, 2 * (m_L + 1)));
    m_tx = TokenExchange<Scalar, MemorySpace>(
        m_groups, config.d_model, m_L,
        Kokkos::subview(m_plan_dev, std::make_pair(2 * (m_L + 1), 2 * (m_L + 1) + 3 * P * m_L)));
    // Smart scheduling computes the fp32 / fp64 experts in pieces; bf16
    // layers (CUDA) run unscheduled.
    m_tx.allow_schedule(!config.bf16_compute);
    static bool told = false;
    if (!told && m_groups && m_groups->config().schedule_degree > 1 && P > 1 &&
        (config.bf16_compute || m_groups->slice_size() > 1)) {
      told = true;
      log::warn("comm.schedule_degree = ", m_groups->config().schedule_degree, " is not applied: smart scheduling ",
                "takes fp32 / fp64 layers without expert slicing (this one: ",
                config.bf16_compute ? "bf16" : "parallel.expert_slicing > 1", "); the layer runs unscheduled");
    }
  }
  m_counts    = index_vector("moka::moe::counts", config.num_experts);
  m_sel_bias  = Kokkos::View<Scalar*, MemorySpace>("moka::moe::selection_bias", config.num_experts);
  m_bal_grad  = Kokkos::View<Scalar*, MemorySpace>("moka::moe::balance_grad", config.num_experts);
  m_imp_grad  = Kokkos::View<Scalar*, MemorySpace>("moka::moe::importance_grad", config.num_experts);
  m_load_grad = Kokkos::View<Scalar*, MemorySpace>("moka::moe::load_grad", config.num_experts);
  m_stat_a    = Kokkos::View<double*, MemorySpace>("moka::moe::gate_stat_a", config.num_experts);
  m_stat_b    = Kokkos::View<double*, MemorySpace>("moka::moe::gate_stat_b", config.num_experts);
  m_sel_count = Kokkos::View<long*, MemorySpace>("moka::moe::selections", config.num_experts);
  m_trace_cum = index_vector("moka::moe::trace_cum", config.num_experts + 1);
  if (config.bf16_compute) {
#ifdef KOKKOS_ENABLE_CUDA
    constexpr bool ok = std::is_same<Scalar, float>::value && std::is_same<MemorySpace, Kokkos::CudaSpace>::value;
#else
    constexpr bool ok = false;
#endif
    MOKA_REQUIRE(ok, "bf16 expert GEMMs (train.precision = bf16) need a CUDA build and a float layer in CudaSpace");
    m_w1_b = btensor3("moka::moe::w1_bf16", m_L, config.d_model, m_dfil);
    m_w2_b = btensor3("moka::moe::w2_bf16", m_L, m_dffl, config.d_model);
    // cuBLASLt's aux matrix needs a leading dimension divisible by 8. ReLU
    // is not fused: its mask epilogues (RELU_AUX_BIAS, DRELU) made the
    // layer slower on an H100 (14.7 ms against 12.7 ms with the kernels).
    // Experts without biases keep the kernels too: the bias-less epilogue
    // (GELU_AUX) has not been checked on a GPU.
    m_fused = config.gemm_epilogue && config.expert_bias && m_dffl % 8 == 0 &&
              config.activation == Activation::gelu_tanh;
    if (m_fused) {
      m_b1_b    = bmatrix("moka::moe::b1_bf16", m_L, m_dfil);
      m_lt_work = Kokkos::View<char*, MemorySpace>("moka::moe::cublaslt_workspace", std::size_t(32) << 20);
    }
#ifdef KOKKOS_ENABLE_CUDA
    // cuBLASLt's one workspace is not split between streams: the fused
    // epilogues keep the GEMMs on the layer's stream.
    m_streams_auto = config.gemm_streams == 0;
    const int streams = m_streams_auto ? (m_L >= auto_gemm_experts ? 4 : 1) : config.gemm_streams;
    if (streams > 1 && !m_fused && m_L > 1) m_fan = std::make_shared<impl::StreamFan>(std::min(streams, m_L));
    m_grouped = config.gemm_grouped;
#endif
  }
  m_batched = config.gemm_batched;
  if (config.gate == GateType::trace) {
    m_trace_rows = read_trace_gate_rows(config);
    const long n = static_cast<long>(m_trace_rows.size());
    m_trace_row0 = config.trace_iteration < 0 ? n - 1 : config.trace_iteration;
  }
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::set_placement(const Placement& p) {
  Placement q = impl::resolved_placement(m_cfg, m_groups, p);
  MOKA_REQUIRE(q.slots_per_rank() == m_Lo, "moka::MoELayer::set_placement: the placement has ", q.slots_per_rank(),
               " slots per rank, the layer ", m_Lo);
  m_place = std::move(q);
  apply_placement();
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::apply_placement() {
  const int E = m_cfg.num_experts, N = m_place.num_slots();
  const int NS = m_place.ep_size() * m_L;  // slots with the shadow slots
  // Slice peers are in different EP groups, which decide on their own
  // counts: their shadow slots could hold different experts.
  MOKA_REQUIRE(m_M == 0 || !m_groups || m_groups->slice_size() == 1, "balance.shadowing needs "
               "parallel.expert_slicing = 1 (it is ", m_groups ? m_groups->slice_size() : 1, ")");
  MOKA_REQUIRE(m_M == 0 || m_place.single_slot(), "balance.shadowing needs one slot per expert (the placement has ",
               m_place.slots_per_rank(), " slots per rank for ", E, " experts on ", m_place.ep_size(),
               " ranks): set balance.slots_per_rank = 0, or shadowing off");
  m_identity   = m_place.is_contiguous() && m_M == 0;
  m_replicated = !m_place.single_slot();
  if (!m_replicas) m_replicas = std::make_shared<ReplicaGroups>();
  m_replicas->rebuild(m_place, m_ep_rank);
  if (static_cast<int>(m_offsets.extent(0)) != NS + 1) m_offsets = index_vector("moka::moe::offsets", NS + 1);
  // Topology-aware gate: which experts have a slot on this rank's node.
  m_topology = false;
  if (m_cfg.max_offnode_share < 1 && m_groups) {
    if (m_on_node.extent(0) == 0) m_on_node = index_vector("moka::moe::expert_on_node", E);
    auto hn              = Kokkos::create_mirror_view(m_on_node);
    const auto& ep_nodes = m_groups->ep_nodes();
    for (int e = 0; e < E; ++e) {
      hn(e) = 0;
      for (const Placement::Slot& sl : m_place.slots_of(e)) hn(e) |= ep_nodes[sl.rank] == m_groups->node() ? 1 : 0;
      m_topology = m_topology || hn(e) == 0;
    }
    Kokkos::deep_copy(m_on_node, hn);
  }
  if (m_identity) return;
  if (m_expert_slot.extent(0) == 0) m_expert_slot = index_vector("moka::moe::expert_slot", E);
  if (static_cast<int>(m_slot_counts.extent(0)) != NS) m_slot_counts = index_vector("moka::moe::slot_counts", NS);
  auto h = Kokkos::create_mirror_view(m_expert_slot);
  for (int e = 0; e < E; ++e) {
    const Placement::Slot s = m_place.slots_of(e).front();
    h(e)                    = s.rank * m_L + s.local;
  }
  Kokkos::deep_copy(m_expert_slot, h);
  if (m_M > 0 && m_shadow_target.extent(0) == 0) {
    m_shadow_target      = index_vector("moka::moe::shadow_target", E);
    m_shadow_target_host = Kokkos::create_mirror_view(m_shadow_target);
    m_expert_offsets     = index_vector("moka::moe::expert_offsets", E + 1);
  }
  if (!m_replicated) return;
  // Each expert's slots by rank (the order the rows are split in).
  if (m_rep_start.extent(0) == 0) {
    m_rep_start      = index_vector("moka::moe::replica_start", E + 1);
    m_rep_slot       = index_vector("moka::moe::replica_slot", N);
    m_expert_offsets = index_vector("moka::moe::expert_offsets", E + 1);
    m_rep_base       = Kokkos::View<long*, MemorySpace>("moka::moe::replica_base", E + N);
  }
  auto hs = Kokkos::create_mirror_view(m_rep_start);
  auto hl = Kokkos::create_mirror_view(m_rep_slot);
  int at  = 0;
  for (int e = 0; e < E; ++e) {
    hs(e) = at;
    std::vector<Placement::Slot> slots = m_place.slots_of(e);
    std::sort(slots.begin(), slots.end(),
              [](const Placement::Slot& a, const Placement::Slot& b) { return a.rank < b.rank; });
    for (const auto& sl : slots) hl(at++) = sl.rank * m_L + sl.local;
  }
  hs(E) = at;
  m_rep_start_host.assign(hs.data(), hs.data() + E + 1);
  Kokkos::deep_copy(m_rep_start, hs);
  Kokkos::deep_copy(m_rep_slot, hl);
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::init_parameters(std::uint64_t seed) {
  // The single-rank stream, element by element; each rank keeps its part.
  impl::SplitMix64 rng{seed};
  const long d = m_cfg.d_model, E = m_cfg.num_experts, dff = m_cfg.d_ff, dfi = m_cfg.d_ff_in();
  const long dffl = m_dffl, dfil = m_dfil;
  const long s0 = m_groups ? m_groups->slice_rank() * dffl : 0;
  const bool swiglu = m_cfg.activation == Activation::swiglu;
  // Local slot of each expert held here (-1 elsewhere), from the placement.
  std::vector<long> local(E, -1);
  for (int l = 0; l < m_Lo; ++l) local[local_expert(l)] = l;
  impl::fill_uniform(m_params.gate_w, rng, 1.0 / std::sqrt(double(d)));
  if (m_params.noise_w.size()) impl::fill_uniform(m_params.noise_w, rng, 1.0 / std::sqrt(double(d)));
  // W1 [E, d, dfi]: local column of global column c (SwiGLU: both halves sliced alike).
  impl::fill_uniform_part(m_params.w1, rng, 1.0 / std::sqrt(double(d)), E * d * dfi, [=](long g) -> long {
    const long e = g / (d * dfi), i = (g / dfi) % d, c = g % dfi;
    if (local[e] < 0) return -1;
    const long half = swiglu && c >= dff ? 1 : 0, cc = c - half * dff;
    if (cc < s0 || cc >= s0 + dffl) return -1;
    return (local[e] * d + i) * dfil + half * dffl + (cc - s0);
  });
  impl::fill_uniform_part(m_params.w2, rng, 1.0 / std::sqrt(double(dff)), E * dff * d, [=](long g) -> long {
    const long e = g / (dff * d), r = (g / d) % dff, c = g % d;
    if (local[e] < 0 || r < s0 || r >= s0 + dffl) return -1;
    return (local[e] * dffl + (r - s0)) * d + c;
  });
  Kokkos::deep_copy(m_params.b1, Scalar(0));
  Kokkos::deep_copy(m_params.b2, Scalar(0));
  if (m_cfg.bf16_compute) {
    execution_space space;
    impl::convert_to_bf16(space, "moka::w1_to_bf16", m_params.w1.data(), m_w1_b.data(), m_w1_b.size());
    impl::convert_to_bf16(space, "moka::w2_to_bf16", m_params.w2.data(), m_w2_b.data(), m_w2_b.size());
    space.fence();
  }
  // The gates' random streams (noise, jitter, random routing) start here.
  m_seed    = rng.next();
  m_counter   = 0;
  m_trace_pos = 0;
  Kokkos::deep_copy(m_sel_bias, Scalar(0));
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::refresh_bf16_weights(const execution_space& space) {
  if (!m_cfg.bf16_compute) return;
  impl::convert_to_bf16(space, "moka::w1_to_bf16", m_params.w1.data(), m_w1_b.data(), m_w1_b.size());
  impl::convert_to_bf16(space, "moka::w2_to_bf16", m_params.w2.data(), m_w2_b.data(), m_w2_b.size());
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::zero_grad(const execution_space& space) {
  Kokkos::deep_copy(space, m_grads.gate_w, Scalar(0));
  Kokkos::deep_copy(space, m_grads.noise_w, Scalar(0));
  Kokkos::deep_copy(space, m_grads.b1, Scalar(0));
  Kokkos::deep_copy(space, m_grads.b2, Scalar(0));
  m_wgrad_zero = true;  // W1 and W2: the next backward overwrites them
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::settle_grads() const {
  if (!m_wgrad_zero) return;
  Kokkos::deep_copy(m_grads.w1, Scalar(0));
  Kokkos::deep_copy(m_grads.w2, Scalar(0));
  m_wgrad_zero = false;
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::ensure_workspace(int T) {
  if (T == m_T) return;
  const int E = m_cfg.num_experts, k = m_cfg.top_k, d = m_cfg.d_model;
  const long N = long(T) * k;
  auto alloc = [](const char* label, long m, long n) {
    return matrix(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("moka::moe::") + label), m, n);
  };
  const bool noisy = m_cfg.gate == GateType::noisy;
  m_clean  = alloc("clean_logits", T, E);
  m_logits = noisy ? alloc("logits", T, E) : m_clean;
  m_raw    = noisy ? alloc("noise_raw", T, E) : matrix();
  m_std    = noisy ? alloc("noise_std", T, E) : matrix();
  m_noise  = noisy ? matrix("moka::moe::noise", T, E) : matrix();
  m_thr    = noisy ? index_matrix("moka::moe::thresholds", T, 2) : index_matrix();
  m_jitter = m_cfg.gate == GateType::switch_top1 ? alloc("jitter", T, d) : matrix();
  m_gate_in = m_cfg.gate == GateType::switch_top1 ? alloc("gate_in", T, d) : matrix();
  // Gate backward workspace (kept: a device allocation per step costs a
  // synchronising free).
  const bool balance = m_cfg.gate == GateType::gshard || m_cfg.gate == GateType::switch_top1;
  m_dprob   = balance ? alloc("dprob", T, E) : matrix();
  m_dlogits = alloc("dlogits", T, E);
  m_dclean  = noisy ? alloc("dclean", T, E) : matrix();
  m_draw    = noisy ? alloc("draw", T, E) : matrix();
  m_gate_wt = E <= impl::gate_small_experts ? alloc("gate_weights_transposed", E, d) : matrix();
  m_probs  = alloc("probs", T, E);
  m_rr     = Kokkos::View<Scalar*, MemorySpace>("moka::moe::routing_uniforms", T);
  m_score  = alloc("score", T, k);
  m_dscore = alloc("dscore", T, k);
  m_idx    = index_matrix("moka::moe::expert_index", T, k);
  m_route  = index_matrix("moka::moe::routed_index", T, k);
  m_slot   = index_matrix("moka::moe::slot", T, k);
  // The dispatch-ordered rows in fp32: not with bf16 on one rank, whose
  // rows are gathered into the GEMMs' bf16 operand directly.
  m_xs = rows_bf16() ? matrix() : alloc("xs", N, d);
  m_T  = T;
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::ensure_expert_workspace(long rows) {
  const int d = m_cfg.d_model;
  if (m_cfg.bf16_compute) {
    impl::grow_rows(m_hpre_b, rows, m_dfil, "hpre_bf16");
    impl::grow_rows(m_h_b, rows, m_dffl, "h_bf16");
    impl::grow_rows(m_xs_b, rows, d, "xs_bf16");
  } else {
    impl::grow_rows(m_hpre, rows, m_dfil, "hpre");
    impl::grow_rows(m_h, rows, m_dffl, "h");
  }
  if (rows_bf16()) impl::grow_rows(m_ye_b, rows, d, "ye_bf16");
  else impl::grow_rows(m_ye_buf, rows, d, "ye");
  if (m_row_expert.extent(0) < static_cast<std::size_t>(rows))
    m_row_expert = index_vector(Kokkos::view_alloc(Kokkos::WithoutInitializing, "moka::moe::row_expert"), rows + rows / 8 + 1);
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::global_batch(int T) {
  m_T_global = T;
  m_tok0     = 0;
  if (!m_groups || m_groups->gate().size() == 1) return;
  // One all-gather of the token counts gives both this rank's offset and the total.
  const Communicator& g = m_groups->gate();
  std::vector<long> counts(g.size());
  const long mine = T;
  g.allgather_counts(&mine, counts.data(), 1);
  m_tok0     = std::accumulate(counts.begin(), counts.begin() + g.rank(), 0L);
  m_T_global = std::accumulate(counts.begin(), counts.end(), 0L);
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::forward(const execution_space& space, const matrix& x, const matrix& y) {
  ScopedRegion region("moka::MoELayer::forward");
  const std::string where = "moka::MoELayer::forward";
  require_extent(where, x, 1, m_cfg.d_model, "columns");
  require_extent(where, y, 0, x.extent(0), "rows");
  require_extent(where, y, 1, m_cfg.d_model, "columns");
  const int T = static_cast<int>(x.extent(0));
  ensure_workspace(T);
  global_batch(T);
  m_x = x;

  {
    ScopedRegion r("moka::MoELayer::gate");
    gate_forward(space, x);
  }

  // Capacity, slots and the dispatch-ordered rows.
  {
    ScopedRegion r("moka::MoELayer::dispatch");
    route_to_slots(space);
    pad_expert_rows(space);
    {
      if (m_tx.active()) m_tx.align_for_timing(space);
      ScopedRegion plan("moka::MoELayer::exchange_plan");
      plan_exchange(space);
    }
    // Expert-side workspace and the expert of each row (not part of the
    // exchange: one rank needs them too).
    ensure_expert_workspace(m_rows_e);
    impl::row_experts(space, m_e_offsets, m_row_expert, m_rows_e);
    // bf16 on one rank: the rows go straight to the GEMMs' bf16 operand.
    if (m_pad > 0 && !rows_bf16()) impl::grow_rows(m_xs, m_rows_e, m_cfg.d_model, "xs");
    // (Padded layout: the padding rows keep what they held, finite values
    // whose products never reach a gradient: see the backward.)
    if (m_cfg.bf16_compute && !m_tx.active()) impl::gather_rows(space, x, m_slot, m_xs_b);
    else impl::gather_rows(space, x, m_slot, m_xs);
  }
  if (m_tx.scheduled()) {
    // Smart scheduling: each peer group's rows computed as they arrive.
    scheduled_forward(space);
  } else {
    m_xe = m_tx.forward(space, m_xs, TokenExchange<Scalar, MemorySpace>::Buffer::expert_in);
    // Experts: hpre = xs W1 (+ b1), h = act(hpre), ys = h W2 (+ b2).
    if (m_cfg.bf16_compute) {
      ScopedRegion r("moka::MoELayer::to_bf16");
      prepare_bf16_forward(space);
    }
    m_ye = rows_bf16() ? matrix() : m_ye_buf;  // bf16 on one rank: m_ye_b
    expert_gemm(space, Stage::up);
    if (!m_fused) {  // fused: b1 and the activation ran in the up-projection's epilogue
      ScopedRegion region_act("moka::MoELayer::activation");
      if (m_cfg.bf16_compute)
        impl::activation_bf16(space, m_cfg.activation, m_cfg.expert_bias, m_rows_e, m_dffl, m_row_expert, m_hpre_b,
                              m_params.b1, m_h_b);
      else
        activation_rows(space, 0, m_rows_e);
    }
    expert_gemm(space, Stage::down);
    if (!rows_bf16()) expert_bias_add(space);  // bf16 on one rank: b2 in the combine
    m_ys = m_tx.reverse(space, m_ye, TokenExchange<Scalar, MemorySpace>::Buffer::dispatch_out);
  }

  // Combine.
  ScopedRegion region_combine("moka::MoELayer::combine");
  if (rows_bf16())
    impl::combine_rows(space, m_ye_b, m_slot, m_score, y, m_cfg.expert_bias ? m_params.b2 : matrix(), m_row_expert);
  else
    impl::combine_rows(space, m_ys, m_slot, m_score, y);
  m_saved = true;
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::backward(const execution_space& space, const matrix& dy, const matrix& dx) {
  ScopedRegion region("moka::MoELayer::backward");
  const std::string where = "moka::MoELayer::backward";
  MOKA_REQUIRE(m_T >= 0 && m_x.data() != nullptr, "call forward before backward");
  require_extent(where, dy, 0, m_T, "rows");
  require_extent(where, dy, 1, m_cfg.d_model, "columns");
  require_extent(where, dx, 0, m_T, "rows");
  require_extent(where, dx, 1, m_cfg.d_model, "columns");
  const int T = m_T, k = m_cfg.top_k, d = m_cfg.d_model;
  const int dff = m_dffl, dff_in = m_dfil;
  const long rows_e = m_rows_e;
  const Activation act = m_cfg.activation;
  const bool bf16 = m_cfg.bf16_compute;
  auto dscore = m_dscore;
  // Row buffers live across steps (grow-only): allocating them per call
  // would cost a device allocation and a synchronising free every step.
  // bf16 on one rank: the combine backward writes the expert rows'
  // gradient straight into the GEMMs' bf16 operand (no fp32 copy).
  const bool dys_bf16 = rows_bf16();
  if (!dys_bf16) {
    impl::grow_rows(m_dys, std::max(long(T) * k, m_pad > 0 ? rows_e : 0L), d, "dys");
    impl::grow_rows(m_dxe, rows_e, d, "dxe");
  }
  MOKA_REQUIRE(!bf16 || m_saved,
               "MoELayer::backward: the bf16 backward writes its gradients into the buffers of the forward's "
               "activations, so each backward needs its own forward (call forward again before another backward)");
  if (bf16) {
    // Each bf16 gradient goes into the buffer of a forward value that is
    // dead by the time it is written, so the backward allocates no row
    // buffer: dh into h's (the dW2 GEMMs, the last readers of h, finish
    // before the dh GEMMs start), the pre-activation gradient into the
    // pre-activation's (the activation backward runs in place: each
    // element is read before it is written, by the same thread), and with
    // the fused epilogues (which read the pre-activation as their aux
    // input while writing dhpre) into h's.
    if (m_fused) {
      m_dhpre_b = m_h_b;
    } else {
      m_dh_b    = m_h_b;
      m_dhpre_b = m_hpre_b;
    }
    m_saved = false;
  } else {
    impl::grow_rows(m_dh, rows_e, dff, "dh");
    impl::grow_rows(m_dhpre, rows_e, dff_in, "dhpre");
  }
  if (dys_bf16) {
    // And on one rank the expert rows' gradient into the expert outputs'
    // buffer (the combine backward reads each output element before it
    // writes that element's gradient, in the same thread), then the
    // gradient of the rows' inputs into the same buffer (the expert rows'
    // gradient is dead once the down-projection's backward is done).
    m_dys_b = m_ye_b;
    m_dxe_b = m_ye_b;
  }
  auto dys = dys_bf16 ? matrix() : m_dys;

  // Combine backward: dscore and the gradient reaching each expert row in
  // one pass (and its bf16 copy for the GEMMs when the rows do not move).
  std::optional<ScopedRegion> stage;
  stage.emplace("moka::MoELayer::combine_backward");
  if (dys_bf16)  // the bf16 expert outputs, b2 added here as in the combine
    impl::combine_backward(space, dy, m_ye_b, m_slot, m_score, m_dscore, matrix(), m_dys_b,
                           m_cfg.expert_bias ? m_params.b2 : matrix(), m_row_expert);
  else
    impl::combine_backward(space, dy, m_ys, m_slot, m_score, m_dscore, dys, bmatrix());
  // Padded layout: the padding rows' gradient is zeroed (their inputs and
  // outputs hold stale or bias-only values, finite, since every row buffer
  // is zero-filled when it grows), so dh, the pre-activation gradient and
  // every weight and bias gradient get exact zeros from them.
  if (dys_bf16) zero_padding_rows(space, m_dys_b);
  else zero_padding_rows(space, dys);
  stage.reset();
  matrix dxs;
  if (m_tx.scheduled()) {
    // Smart scheduling: each peer group's gradients computed as they
    // arrive; the bias gradients over all rows after (the unscheduled sums).
    dxs = scheduled_backward(space);
    if (m_cfg.expert_bias) {
      expert_bias_grad(space, m_dye, m_grads.b2);
      expert_bias_grad(space, m_dhpre, m_grads.b1);
    }
  } else {
    const matrix dye = m_tx.forward(space, dys, TokenExchange<Scalar, MemorySpace>::Buffer::expert_grad);
    m_dye = dye;
    stage.emplace("moka::MoELayer::combine_backward");

    // Expert backward. Bias gradients are column sums over each expert's
    // rows (in chunks, a fixed order: deterministic).
    const long chunks = m_chunks;
    if (m_cfg.expert_bias) {
      if (dys_bf16) expert_bias_grad(space, m_dys_b, m_grads.b2);  // the bf16 rows the GEMMs read
      else expert_bias_grad(space, dye, m_grads.b2);
    }
    stage.reset();
    // Fused: the dh GEMM's epilogue writes the pre-activation gradient; the
    // b1 gradient is its column sums.
    expert_gemm(space, Stage::down_backward);
    stage.emplace("moka::MoELayer::activation_backward");
    if (m_fused) {
      expert_bias_grad(space, m_dhpre_b, m_grads.b1);
    } else if (bf16) {
      // With biases fused with the first pass of the b1 gradient (the same
      // chunks and order as expert_column_sums); without, by rows.
      if (m_cfg.expert_bias) {
        impl::activation_backward_bf16(space, act, true, chunks, bias_chunk, dff, m_chunk_start, m_e_offsets, m_dh_b,
                                       m_hpre_b, m_params.b1, m_dhpre_b, m_colsum_work);
        impl::expert_column_sums_finish(space, m_chunk_start, m_colsum_work, m_grads.b1);
      } else {
        impl::activation_backward_bf16_rows(space, act, rows_e, dff, m_dh_b, m_hpre_b, m_dhpre_b);
      }
    } else {
      activation_backward_rows(space, 0, rows_e);
    }
    if (m_cfg.expert_bias && !bf16) expert_bias_grad(space, m_dhpre, m_grads.b1);
    stage.reset();
    expert_gemm(space, Stage::up_backward);
    dxs = m_tx.reverse(space, m_dxe, TokenExchange<Scalar, MemorySpace>::Buffer::dispatch_grad);
  }
  if (m_wgrad_zero) {
    // Overwritten by the GEMMs above, except where an expert had no rows.
    for (int e = 0; e < m_L; ++e)
      if (m_e_off[e + 1] == m_e_off[e]) {
        Kokkos::deep_copy(space, Kokkos::subview(m_grads.w1, e, Kokkos::ALL, Kokkos::ALL), Scalar(0));
        Kokkos::deep_copy(space, Kokkos::subview(m_grads.w2, e, Kokkos::ALL, Kokkos::ALL), Scalar(0));
      }
    m_wgrad_zero = false;
  }
  if (!m_shadowed.empty()) shadow_reduce_grads(space);

  // Gate backward (into dx, or its part of dx left to the undispatch), then
  // the expert rows of each token.
  const bool gate_dx = gate_backward(space, dscore, dx);
  stage.emplace("moka::MoELayer::undispatch");
  const matrix gd = gate_dx ? matrix() : m_dlogits, gwt = gate_dx ? matrix() : m_gate_wt;
  if (dys_bf16) impl::scatter_add_rows(space, m_dxe_b, m_slot, dx, gd, gwt);
  else impl::scatter_add_rows(space, dxs, m_slot, dx, gd, gwt);
  if (bf16) {
    // Drop the aliases: a later forward that grows the row buffers must
    // not find the old allocations still held through them.
    m_dh_b = m_dhpre_b = bmatrix();
    if (dys_bf16) m_dys_b = m_dxe_b = bmatrix();
  }
}

}  // namespace moka

#include <moka/moe/impl/MoELayerExperts_impl.hpp>
#include <moka/moe/impl/MoELayerGate_impl.hpp>
#include <moka/moe/impl/MoELayerShadow_impl.hpp>
#include <moka/moe/impl/MoELayerSchedule_impl.hpp>

namespace moka {

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::route_to_slots(const execution_space& space) {
  const int T = m_T, E = m_cfg.num_experts;
  const bool global = m_cfg.global_capacity() && !m_cfg.dropless && m_groups && m_groups->gate().size() > 1;
  m_capacity = m_cfg.capacity(global ? m_T_global : T, m_training);
  if (!m_identity &&
      (m_slot_route.extent(0) != m_route.extent(0) || m_slot_route.extent(1) != m_route.extent(1)))
    m_slot_route = index_matrix("moka::moe::slot_route", m_route.extent(0), m_route.extent(1));
  // Capacity is per logical expert. One slot per expert: the gate's
  // experts as slots before the slot assignment (capacity per slot is
  // capacity per expert), rows in slot order from there. Replicas: the
  // assignment by expert first, then the kept rows split among the
  // replicas and placed by slot in a second, dropless pass.
  index_matrix route = m_route;
  const bool shadowing = m_M > 0;  // two passes, as with replicas, the second to this step's slots
  if (!m_identity && !m_replicated && !shadowing) {
    auto r = m_route, sr = m_slot_route;
    auto es = m_expert_slot;
    Kokkos::parallel_for(
        "moka::route_to_slots", impl::row_major_2d(space, long(r.extent(0)), long(r.extent(1))),
        KOKKOS_LAMBDA(long t, long j) {
          const int e = r(t, j);
          sr(t, j)    = e < 0 ? -1 : es(e);
        });
    route = m_slot_route;
  }
  Kokkos::View<long*, MemorySpace> base;
  if (global) {
    // Assignments to each expert on lower ranks come first in global order.
    if (m_cap_base.extent(0) == 0) m_cap_base = Kokkos::View<long*, MemorySpace>("moka::moe::capacity_base", E);
    if (m_routed.extent(0) == 0) m_routed = Kokkos::View<long*, MemorySpace>("moka::moe::routed", E);
    impl::count_routed(space, route, m_routed);
    auto hr = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), m_routed);
    auto hb = Kokkos::create_mirror_view(m_cap_base);
    m_groups->gate().exscan_host(hr.data(), hb.data(), E);
    Kokkos::deep_copy(m_cap_base, hb);
    base = m_cap_base;
  }
  if (!m_replicated && !shadowing) {
    m_rows = impl::assign_slots(space, m_cfg.drop_policy, m_capacity, base, route, m_score,
                                m_identity ? m_counts : m_slot_counts, m_offsets, m_slot, m_slot_work,
                                m_h_offsets);
    if (!m_identity) {
      auto counts = m_counts, sc = m_slot_counts, es = m_expert_slot;
      Kokkos::parallel_for(
          "moka::slot_counts_to_experts", Kokkos::RangePolicy<execution_space>(space, 0, E),
          KOKKOS_LAMBDA(int e) { counts(e) = sc(es(e)); });
    }
    return;
  }
  if (m_expert_row.extent(0) != m_route.extent(0) || m_expert_row.extent(1) != m_route.extent(1))
    m_expert_row = index_matrix("moka::moe::expert_row", m_route.extent(0), m_route.extent(1));
  impl::assign_slots(space, m_cfg.drop_policy, m_capacity, base, m_route, m_score, m_counts, m_expert_offsets,
                     m_expert_row, m_slot_work, m_h_expert_offsets);
  // Where this rank's kept rows of each expert start in the EP group's
  // order, and how many rows each replica takes (moka::split_replica_rows
  // over the group's counts: the ranks' loads as even as the replicas
  // allow). Replica j (by rank) of expert e takes the group's rows
  // [first_j, first_j+1) of e, in global order.
  const int P = m_groups ? m_groups->ep_size() : 1, me = m_ep_rank;
  std::vector<long> mine(E), all(std::size_t(P) * E);
  for (int e = 0; e < E; ++e) mine[e] = m_h_expert_offsets[e + 1] - m_h_expert_offsets[e];
  if (P > 1) m_groups->ep().allgather_counts(mine.data(), all.data(), E);
  else all = mine;
  if (shadowing) {
    shadow_route(space, all);
    return;
  }
  std::vector<double> total(E, 0.0);
  if (m_rep_base_host.extent(0) != m_rep_base.extent(0)) m_rep_base_host = Kokkos::create_mirror_view(m_rep_base);
  auto hb = m_rep_base_host;
  for (int e = 0; e < E; ++e) {
    long before = 0;
    for (int q = 0; q < P; ++q) {
      if (q < me) before += all[std::size_t(q) * E + e];
      total[e] += double(all[std::size_t(q) * E + e]);
    }
    hb(e) = before;
  }
  {
    std::vector<std::vector<int>> layout(P);
    for (int q = 0; q < P; ++q)
      for (int l = 0; l < m_L; ++l) layout[q].push_back(m_place.expert_at(q, l));
    const auto share = split_replica_rows(layout, total, true);
    // Slots of each expert in rank order (m_rep_slot's order): first row of each.
    std::vector<long> next(E, 0);
    for (int q = 0; q < P; ++q)
      for (int l = 0; l < m_L; ++l) {
        const int e = layout[q][l];
        // The j-th holder of e by rank is at m_rep_start[e] + j; ranks hold one slot of e each.
        int j = 0;
        for (const auto& s : m_place.slots_of(e)) j += s.rank < q ? 1 : 0;
        hb(E + m_rep_start_host[e] + j) = next[e];
        next[e] += std::lround(share[q][l]);
      }
  }
  Kokkos::deep_copy(space, m_rep_base, hb);
  {
    auto rows = m_expert_row, r = m_route, sr = m_slot_route;
    auto off = m_expert_offsets, rs = m_rep_start, rl = m_rep_slot;
    auto rb  = m_rep_base;
    Kokkos::parallel_for(
        "moka::split_replicas", impl::row_major_2d(space, long(r.extent(0)), long(r.extent(1))),
        KOKKOS_LAMBDA(long t, long j) {
          const int row = rows(t, j);
          if (row < 0) {
            sr(t, j) = -1;
            return;
          }
          const int e  = r(t, j);
          const int R  = rs(e + 1) - rs(e);
          const long g = rb(e) + (row - off(e));
          int rep      = 0;
          while (rep + 1 < R && g >= rb(E + rs(e) + rep + 1)) ++rep;
          sr(t, j) = rl(rs(e) + rep);
        });
  }
  space.fence();  // hb's host copy
  m_rows = impl::assign_slots(space, DropPolicy::position, std::numeric_limits<long>::max() / 2,
                              Kokkos::View<long*, MemorySpace>(), m_slot_route, m_score, m_slot_counts, m_offsets,
                              m_slot, m_slot_work2, m_h_offsets);
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::pad_expert_rows(const execution_space& space) {
  m_pad = 0;
  // One rank's own rows only: the exchange, replicas and shadows lay rows
  // out by source rank, and the fused epilogues' GEMMs are per expert.
  const int L = m_L;
  if (m_batched == GemmChoice::off || m_tx.active() || m_replicated || m_M > 0 || m_fused ||
      static_cast<int>(m_h_offsets.size()) != L + 1)
    return;
  long most = 0, least = std::numeric_limits<long>::max();
  for (int s = 0; s < L; ++s) {
    const long c = m_h_offsets[s + 1] - m_h_offsets[s];
    most         = std::max(most, c);
    least        = std::min(least, c);
  }
  const long rows = m_h_offsets[L];
  if (rows == 0) return;
  const long pad = (most + 7) / 8 * 8;
  if (m_batched == GemmChoice::automatic) {
    bool use = false;
#ifdef KOKKOS_ENABLE_CUDA
    // Where strided-batched GEMMs beat one GEMM per expert (or grouped
    // GEMMs) on an H200 (docs/performance.md): with many experts, and
    // padding of at most 1/8, or of at most 1/2 when the experts average
    // fewer than auto_gemm_rows rows (there the alternatives run at a
    // quarter to a third of the dense rate).
    const bool small = rows < auto_gemm_rows * L;
    use = m_cfg.bf16_compute && L >= auto_gemm_experts && pad * L * 8 <= rows * (small ? 12 : 9);
#endif
    if (!use) return;
  }
  MOKA_REQUIRE(pad * L <= std::numeric_limits<int>::max(), "moka::MoELayer: ", L, " experts padded to ", pad,
               " rows overflow the int row indices; set expert.gemm_batched = false");
  impl::pad_slot_rows(space, m_slot, m_offsets, L, pad);
  for (int s = 0; s <= L; ++s) m_h_offsets[s] = static_cast<int>(s * pad);
  m_pad           = pad;
  m_pad_min_count = least;
}

template <class Scalar, class MemorySpace>
template <class T>
void MoELayer<Scalar, MemorySpace>::zero_padding_rows(const execution_space& space,
                                                      const Kokkos::View<T**, Kokkos::LayoutRight, MemorySpace>& rows) {
  if (m_pad > 0) impl::zero_padding_rows(space, rows, m_offsets, m_L, m_pad, m_pad_min_count);
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::plan_exchange(const execution_space& space) {
  // Host copy of the plan: expert-side offsets [L + 1], bias-sum chunk
  // starts [L + 1], then the exchange's segments. Reusing it is safe: a
  // copy from pageable host memory has read its source when deep_copy returns.
  const int L = m_L;
  auto plan   = m_plan_host;
  m_tx.plan(m_h_offsets, plan.data() + 2 * (L + 1));
  m_e_off  = m_tx.expert_offsets();
  m_rows_e = m_tx.expert_rows();
  // Bias gradients are column sums over chunks of bias_chunk rows, each
  // expert's chunks consecutive.
  long chunks = 0;
  for (int l = 0; l <= L; ++l) {
    plan(l)         = static_cast<int>(m_e_off[l]);
    plan(L + 1 + l) = static_cast<int>(chunks);
    if (l < L) chunks += (m_e_off[l + 1] - m_e_off[l] + bias_chunk - 1) / bias_chunk;
  }
  m_chunks = chunks;
  Kokkos::deep_copy(space, m_plan_dev, plan);
}

// The common instantiations live in the library (src/moe/MoELayer.cpp).
extern template class MoELayer<double, Kokkos::HostSpace>;
extern template class MoELayer<float, Kokkos::HostSpace>;
#ifdef KOKKOS_ENABLE_CUDA
extern template class MoELayer<double, Kokkos::CudaSpace>;
extern template class MoELayer<float, Kokkos::CudaSpace>;
#endif

}  // namespace moka
