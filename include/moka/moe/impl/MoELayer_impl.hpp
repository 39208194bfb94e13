#pragma once
// Template bodies of moka::MoELayer (included by MoELayer.hpp).

#include <moka/core/Log.hpp>
#include <moka/io/RoutingTrace.hpp>
#include <moka/linalg/impl/CublasGemm.hpp>
#include <moka/moe/impl/GateKernels.hpp>
#include <moka/core/impl/Init.hpp>

#include <algorithm>
#include <cmath>
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
  MOKA_REQUIRE(p.single_slot(), "moka::MoELayer: the placement gives some experts several slots (",
               p.num_slots(), " slots for ", p.num_experts(), " experts); replicated experts are not supported by "
               "the layer yet");
  return p;
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
      m_L(config.num_experts / (m_groups ? m_groups->ep_size() : 1)),
      m_dffl(config.d_ff / m_S),
      m_dfil(config.d_ff_in() / m_S),
      m_ep_rank(m_groups ? m_groups->ep_rank() : 0),
      m_place(impl::resolved_placement(config, m_groups, std::move(placement))),
      m_params(config, "moka::moe::", m_L, m_S),
      m_grads(config, "moka::moe::grad_", m_L, m_S) {
  m_exchange = m_groups && (m_groups->ep_size() > 1 || m_groups->slice_size() > 1);
  m_identity = m_place.is_contiguous();
  if (!m_identity) {
    m_expert_slot = index_vector("moka::moe::expert_slot", config.num_experts);
    m_slot_counts = index_vector("moka::moe::slot_counts", config.num_experts);
    auto h        = Kokkos::create_mirror_view(m_expert_slot);
    for (int e = 0; e < config.num_experts; ++e) {
      const Placement::Slot s = m_place.slots_of(e).front();
      h(e)                    = s.rank * m_L + s.local;
    }
    Kokkos::deep_copy(m_expert_slot, h);
  }
  {
    // The expert-side offsets, the bias-sum chunk starts and the coalesced
    // exchange's segments share one allocation, so each forward uploads its
    // plan in one copy (stream-ordered, from a kept host mirror: no fence).
    const int P   = m_groups ? m_groups->ep_size() : 1;
    m_plan_dev    = index_vector("moka::moe::exchange_plan", 2 * (m_L + 1) + 3 * P * m_L);
    m_plan_host   = Kokkos::create_mirror_view(m_plan_dev);
    m_e_offsets   = Kokkos::subview(m_plan_dev, std::make_pair(0, m_L + 1));
    m_chunk_start = Kokkos::subview(m_plan_dev, std::make_pair(m_L + 1, 2 * (m_L + 1)));
    m_segments    = Kokkos::subview(m_plan_dev, std::make_pair(2 * (m_L + 1), 2 * (m_L + 1) + 3 * P * m_L));
  }
  m_counts    = index_vector("moka::moe::counts", config.num_experts);
  m_offsets   = index_vector("moka::moe::offsets", config.num_experts + 1);
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
  }
  if (config.gate == GateType::trace) m_trace_counts = read_trace_gate_counts(config);
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
  for (int l = 0; l < m_L; ++l) local[local_expert(l)] = l;
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
  m_counter = 0;
  Kokkos::deep_copy(m_sel_bias, Scalar(0));
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

namespace impl {
/// Grows \p m to at least \p rows x \p cols (contents not kept); spare rows
/// avoid a reallocation for every small change of the row count.
template <class V>
void grow_rows(V& m, long rows, long cols, const char* label) {
  if (m.data() != nullptr && static_cast<long>(m.extent(0)) >= rows && static_cast<long>(m.extent(1)) == cols) return;
  m = V(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("moka::moe::") + label), rows + rows / 8 + 1, cols);
}
}  // namespace impl

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
  m_probs  = alloc("probs", T, E);
  m_rr     = Kokkos::View<Scalar*, MemorySpace>("moka::moe::routing_uniforms", T);
  m_score  = alloc("score", T, k);
  m_dscore = alloc("dscore", T, k);
  m_idx    = index_matrix("moka::moe::expert_index", T, k);
  m_route  = index_matrix("moka::moe::routed_index", T, k);
  m_slot   = index_matrix("moka::moe::slot", T, k);
  m_xs   = alloc("xs", N, d);
  m_T    = T;
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
  impl::grow_rows(m_ye_buf, rows, d, "ye");
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

namespace impl {
/// For counts[g L + l] (rows of group g for local expert l): the offsets of
/// each expert's rows in (expert, group) order, off[L + 1], and where block
/// (g, l) starts in that order, at[g L + l].
inline void expert_major(const std::vector<long>& counts, int G, int L, std::vector<long>& off,
                         std::vector<long>& at) {
  off.assign(L + 1, 0);
  at.assign(std::size_t(G) * L, 0);
  for (int l = 0; l < L; ++l) {
    long pos = off[l];
    for (int g = 0; g < G; ++g) {
      at[g * L + l] = pos;
      pos += counts[g * L + l];
    }
    off[l + 1] = pos;
  }
}
}  // namespace impl

namespace impl {
/// Blocks of more than \p cap elements as consecutive pieces of nearly
/// equal size, each at most \p cap (a 64 MB cap cutting 66 MB into 64 + 2
/// made NCCL's grouped exchange 35% slower on 4 x H200; 33 + 33 does not).
/// An empty block stays one empty block.
inline void split_blocks(std::vector<Communicator::Block>& blocks, long cap) {
  // The usual case (every forward, default cap): nothing to cut, no copy.
  if (std::none_of(blocks.begin(), blocks.end(), [cap](const Communicator::Block& b) { return b.count > cap; }))
    return;
  std::vector<Communicator::Block> out;
  out.reserve(blocks.size());
  for (const auto& b : blocks) {
    const long pieces = std::max(1L, (b.count + cap - 1) / cap);
    long at = b.offset;
    for (long i = 0; i < pieces; ++i) {
      // Piece i: elements [i count / pieces, (i + 1) count / pieces).
      const long n = (i + 1) * b.count / pieces - i * b.count / pieces;
      out.push_back({b.peer, at, n});
      at += n;
    }
  }
  blocks.swap(out);
}
}  // namespace impl

template <class Scalar, class MemorySpace>
bool MoELayer<Scalar, MemorySpace>::decide_direct() {
  if (m_direct >= 0) return m_direct == 1;
  // The same on every rank: the deck, the layout, the build and the
  // communicator's collective answer.
  const std::string& mode = m_groups->config().exchange_direct;
  std::string why;
  if (mode == "off") why = "off";
  else if (memory_kind_of<MemorySpace>() != MemoryKind::device) why = "the layer's rows are in host memory";
  else if (m_groups->ep().backend() != CommBackend::nccl) why = "the EP group's comm.backend is mpi";
  else if (!m_groups->ep().windows_usable())
    why = "the EP ranks' GPUs cannot store into each other's memory through NCCL symmetric windows (they need "
          "NCCL 2.28 or later and one node's GPUs linked by NVLink or P2P)";
  MOKA_REQUIRE(mode != "on" || why.empty(), "comm.exchange_direct = on, but ", why);
  m_direct = why.empty() ? 1 : 0;
  static bool told = false;  // once per process (and scalar type), not per layer
  if (!told) {
    told = true;
    if (m_direct == 1) log::info("token exchange: direct puts into NCCL symmetric windows (comm.exchange_direct)");
    else if (mode == "auto")
      log::info("token exchange: ", to_string(m_groups->ep().backend()), " messages (direct puts not possible: ", why,
                ")");
  }
  return m_direct == 1;
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::plan_direct(const std::vector<long>& cnt) {
  // Every rank's rows per slot: all[q E + s] (rank q's rows for slot s, on
  // EP rank s / L as its local slot s % L; the placement put an expert
  // there). With them each rank knows where its rows land on every peer,
  // both ways.
  const int P = m_groups->ep_size(), L = m_L, E = m_cfg.num_experts, me = m_groups->ep_rank();
  const long d = m_cfg.d_model;
  std::vector<long> all(std::size_t(P) * E);
  m_groups->ep().allgather_counts(cnt.data(), all.data(), E);
  auto received_by = [&](int q) {  // [P L]: rows from rank p for rank q's local expert l
    std::vector<long> c(std::size_t(P) * L);
    for (int p = 0; p < P; ++p)
      for (int l = 0; l < L; ++l) c[p * L + l] = all[std::size_t(p) * E + q * L + l];
    return c;
  };
  m_ep_counts = received_by(me);
  std::vector<long> off, at, mine_at;
  impl::expert_major(m_ep_counts, P, L, off, mine_at);
  long most_ep = 0, most_rows = 0;
  m_put_there.clear();
  m_put_back.clear();
  for (int q = 0; q < P; ++q) {
    impl::expert_major(received_by(q), P, L, off, at);
    most_ep = std::max(most_ep, off[L]);
    const long* cq = all.data() + std::size_t(q) * E;
    most_rows      = std::max(most_rows, std::accumulate(cq, cq + E, 0L));
    long hq        = std::accumulate(cq, cq + me * L, 0L);  // rank q's dispatch row of expert me L
    for (int l = 0; l < L; ++l) {
      // There: this rank's rows for q's expert l land at (l, this rank).
      m_put_there.push_back({q, long(m_h_offsets[q * L + l]) * d, at[me * L + l] * d, cnt[q * L + l] * d});
      // Back: this rank's expert l's rows from q return to q's dispatch order.
      m_put_back.push_back({q, mine_at[q * L + l] * d, hq * d, m_ep_counts[q * L + l] * d});
      hq += cq[me * L + l];
    }
  }
  if (m_window && most_ep <= m_win_ep && most_rows <= m_win_rows) return;
  // A larger window (every rank decides alike: the same counts), with spare
  // rows as grow_rows keeps. The old one is free: this rank fenced for the
  // counts, and every put into it ended with a barrier of all ranks.
  m_win_ep   = std::max(m_win_ep, most_ep + most_ep / 8 + 1);
  m_win_rows = std::max(m_win_rows, most_rows + most_rows / 8 + 1);
  // With S = 1 the EP stage lands in xe (forward) and dye (backward); with
  // S > 1 in one landing part, gathered over the slice group from there.
  const long ep_parts = m_S > 1 ? 1 : 2;
  m_xe_buf = m_dye_buf = m_ys_buf = m_dxs_buf = m_ep_land = matrix();
  m_xe = m_ys = m_dye = matrix();
  m_window.reset();
  m_window = m_groups->ep().make_window(std::size_t((ep_parts * m_win_ep + 2 * m_win_rows) * d) * sizeof(Scalar));
  Scalar* base = static_cast<Scalar*>(m_window->data());
  if (m_S > 1) {
    m_ep_land = matrix(base, m_win_ep, d);
  } else {
    m_xe_buf  = matrix(base, m_win_ep, d);
    m_dye_buf = matrix(base + m_win_ep * d, m_win_ep, d);
  }
  m_ys_buf  = matrix(base + ep_parts * m_win_ep * d, m_win_rows, d);
  m_dxs_buf = matrix(base + (ep_parts * m_win_ep + m_win_rows) * d, m_win_rows, d);
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::direct_put(const execution_space& space,
                                               const std::vector<Communicator::Put>& puts, const matrix& from,
                                               const matrix& to) {
  // \p to is one of the window's four parts, at the same offset on every rank.
  const long base = static_cast<long>(to.data() - static_cast<Scalar*>(m_window->data()));
  m_put_now       = puts;
  for (auto& p : m_put_now) p.dst += base;
  m_groups->ep().put(space, *m_window, from.data(), m_put_now, data_type_of<Scalar>());
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::align_for_timing(const execution_space& space) {
  // Only when regions fence (stage breakdowns, the exchange benchmark): all
  // ranks enter the exchange together, so its timer holds the exchange and
  // not the wait for slower ranks.
  if (!fence_regions() || !m_groups) return;
  space.fence();
  MPI_Barrier(m_groups->world().mpi_comm());
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::plan_exchange(const execution_space& space) {
  const int L = m_L;
  const long d = m_cfg.d_model;
  // Dispatch rows per slot (slot p L + l: EP rank p's local slot l).
  std::vector<long> cnt(m_cfg.num_experts);
  for (int e = 0; e < m_cfg.num_experts; ++e) cnt[e] = m_h_offsets[e + 1] - m_h_offsets[e];
  // EP stage: counts per (peer, local expert) received; the rows of peer p's
  // expert l land at (local expert l, source rank p).
  const int P = m_groups ? m_groups->ep_size() : 1;
  m_ep_counts.assign(std::size_t(P) * L, 0);
  m_coalesce = false;
  if (P > 1 && decide_direct()) {
    plan_direct(cnt);
  } else if (P > 1) {
    // With the L counts each peer also gets this rank's total, so every
    // rank sees every rank's total and all decide alike on coalescing.
    std::vector<long> out(std::size_t(P) * (L + 1)), in(std::size_t(P) * (L + 1));
    const long total = std::accumulate(cnt.begin(), cnt.end(), 0L);
    for (int p = 0; p < P; ++p) {
      std::copy(cnt.begin() + p * L, cnt.begin() + (p + 1) * L, out.begin() + p * (L + 1));
      out[p * (L + 1) + L] = total;
    }
    m_groups->ep().alltoall_counts(out.data(), in.data(), L + 1);
    long most = 0;
    for (int p = 0; p < P; ++p) {
      std::copy(in.begin() + p * (L + 1), in.begin() + p * (L + 1) + L, m_ep_counts.begin() + p * L);
      most = std::max(most, in[p * (L + 1) + L]);
    }
    // Blocks cost a fixed time per extra message to a peer (L - 1 of
    // them), the staging pass a time per byte: coalesce up to
    // (L - 1) x comm.exchange_coalesce_mb. One block per peer already when L = 1.
    double mb = m_groups->config().exchange_coalesce_mb;
    if (mb < 0) mb = m_groups->ep().backend() == CommBackend::nccl ? 8.0 : 0.0;
    const double limit = (L - 1) * mb * 1048576.0;
    m_coalesce = L > 1 && double(most) * d * sizeof(Scalar) <= limit;
  } else {
    m_ep_counts = cnt;
  }
  std::vector<long> ep_at;
  impl::expert_major(m_ep_counts, P, L, m_ep_off, ep_at);
  m_rows_ep = m_ep_off[L];
  m_ep_send.clear();
  m_ep_recv.clear();
  // Host copy of the plan: expert-side offsets [L + 1], bias-sum chunk
  // starts [L + 1], then segments. Reusing it is safe: a copy from pageable
  // host memory has read its source when deep_copy returns.
  auto plan = m_plan_host;
  if (m_direct == 1) {
    // The puts were made by plan_direct.
  } else if (m_coalesce) {
    // Peer p's rows are contiguous on the sending side ((destination rank,
    // local expert) order); they land in the staging buffer at srow.
    int* seg  = plan.data() + 2 * (L + 1);
    long srow = 0;
    for (int p = 0; p < P; ++p) {
      long sent = 0, got = 0;
      for (int l = 0; l < L; ++l) {
        const long n = m_ep_counts[p * L + l];
        seg[3 * (p * L + l)]     = static_cast<int>(srow + got);
        seg[3 * (p * L + l) + 1] = static_cast<int>(ep_at[p * L + l]);
        seg[3 * (p * L + l) + 2] = static_cast<int>(n);
        sent += cnt[p * L + l];
        got += n;
      }
      m_ep_send.push_back({p, long(m_h_offsets[p * L]) * d, sent * d});
      m_ep_recv.push_back({p, srow * d, got * d});
      srow += got;
    }
  } else {
    for (int p = 0; p < P; ++p)
      for (int l = 0; l < L; ++l) {
        m_ep_send.push_back({p, m_h_offsets[p * L + l] * d, cnt[p * L + l] * d});
        m_ep_recv.push_back({p, ep_at[p * L + l] * d, m_ep_counts[p * L + l] * d});
      }
  }
  // Slice stage: every slice peer's rows per local expert, gathered at
  // (local expert, slice peer); partial outputs come back to
  // (slice peer, this rank's rows).
  const int S = m_groups ? m_groups->slice_size() : 1;
  std::vector<long> mine(L);
  for (int l = 0; l < L; ++l) mine[l] = m_ep_off[l + 1] - m_ep_off[l];
  m_sl_counts.assign(std::size_t(S) * L, 0);
  if (S > 1) m_groups->slice().allgather_counts(mine.data(), m_sl_counts.data(), L);
  else m_sl_counts = mine;
  std::vector<long> sl_at;
  impl::expert_major(m_sl_counts, S, L, m_e_off, sl_at);
  m_rows_e = m_e_off[L];
  m_sl_send.clear();
  m_sl_recv.clear();
  m_sl_back.clear();
  for (int s = 0; s < S; ++s)
    for (int l = 0; l < L; ++l) {
      m_sl_send.push_back({s, m_ep_off[l] * d, mine[l] * d});
      m_sl_recv.push_back({s, sl_at[s * L + l] * d, m_sl_counts[s * L + l] * d});
      m_sl_back.push_back({s, (s * m_rows_ep + m_ep_off[l]) * d, mine[l] * d});
    }
  // Messages above comm.exchange_max_message_mb in pieces (a pair's
  // matching blocks have equal counts, so both sides cut them alike).
  const double cap_mb = m_groups ? m_groups->config().exchange_max_message_mb : 0;
  if (cap_mb > 0) {
    const long cap = std::max(1L, static_cast<long>(cap_mb * 1048576.0 / sizeof(Scalar)));
    for (auto* list : {&m_ep_send, &m_ep_recv, &m_sl_send, &m_sl_recv, &m_sl_back}) impl::split_blocks(*list, cap);
  }
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

template <class Scalar, class MemorySpace>
typename MoELayer<Scalar, MemorySpace>::matrix MoELayer<Scalar, MemorySpace>::exchange_forward(
    const execution_space& space, const matrix& dispatch, matrix& buf) {
  if (!m_exchange) return dispatch;
  align_for_timing(space);
  ScopedRegion region("moka::MoELayer::exchange");
  const int d = m_cfg.d_model;
  const int P = m_groups->ep_size(), S = m_groups->slice_size();
  const MemoryKind mem = memory_kind_of<MemorySpace>();
  const DataType type  = data_type_of<Scalar>();
  matrix ep_rows = dispatch;  // rows of the local experts, (local expert, source rank, position)
  if (P > 1 && m_direct == 1) {
    matrix& land = S > 1 ? m_ep_land : buf;
    direct_put(space, m_put_there, dispatch, land);
    ep_rows = land;
  } else if (P > 1) {
    matrix& out = S > 1 ? m_buf_b : buf;
    impl::grow_rows(out, m_rows_ep, d, S > 1 ? "exchange_b" : "expert_rows");
    if (m_coalesce) {
      impl::grow_rows(m_stage, m_rows_ep, d, "exchange_stage");
      m_groups->ep().alltoallv_blocks(space, dispatch.data(), m_ep_send, m_stage.data(), m_ep_recv, type, mem);
      impl::move_segments(space, true, m_rows_ep, m_segments, P * m_L, m_stage, out);
    } else {
      m_groups->ep().alltoallv_blocks(space, dispatch.data(), m_ep_send, out.data(), m_ep_recv, type, mem);
    }
    ep_rows = out;
  }
  if (S == 1) return ep_rows;
  // Slicing: every slice rank gets the rows of all slice peers.
  impl::grow_rows(buf, m_rows_e, d, "expert_rows");
  m_groups->slice().alltoallv_blocks(space, ep_rows.data(), m_sl_send, buf.data(), m_sl_recv, type, mem);
  return buf;
}

template <class Scalar, class MemorySpace>
typename MoELayer<Scalar, MemorySpace>::matrix MoELayer<Scalar, MemorySpace>::exchange_reverse(
    const execution_space& space, const matrix& expert, matrix& buf) {
  if (!m_exchange) return expert;
  align_for_timing(space);
  ScopedRegion region("moka::MoELayer::exchange_back");
  const int d = m_cfg.d_model;
  const int P = m_groups->ep_size(), S = m_groups->slice_size();
  const MemoryKind mem = memory_kind_of<MemorySpace>();
  const DataType type  = data_type_of<Scalar>();
  matrix ep_rows = expert;
  if (S > 1) {
    // Each slice peer gets the partial results of its rows; the S partials
    // are summed in slice order.
    impl::grow_rows(m_buf_b, long(S) * m_rows_ep, d, "exchange_b");
    m_groups->slice().alltoallv_blocks(space, expert.data(), m_sl_recv, m_buf_b.data(), m_sl_back, type, mem);
    matrix& sum = P > 1 ? m_buf_c : buf;
    impl::grow_rows(sum, m_rows_ep, d, P > 1 ? "exchange_c" : "dispatch_rows");
    impl::sum_parts(space, m_buf_b, sum, m_rows_ep, S);
    ep_rows = sum;
  }
  if (P == 1) return ep_rows;
  if (m_direct == 1) {  // from the slice sum (S > 1) or the experts' rows
    direct_put(space, m_put_back, ep_rows, buf);
    return buf;
  }
  // (local expert, source rank) blocks back to their ranks, in dispatch
  // order (coalesced: gathered per peer into the staging buffer first).
  impl::grow_rows(buf, m_rows, d, "dispatch_rows");
  if (m_coalesce) {
    impl::grow_rows(m_stage, m_rows_ep, d, "exchange_stage");
    impl::move_segments(space, false, m_rows_ep, m_segments, P * m_L, m_stage, ep_rows);
    m_groups->ep().alltoallv_blocks(space, m_stage.data(), m_ep_recv, buf.data(), m_ep_send, type, mem);
  } else {
    m_groups->ep().alltoallv_blocks(space, ep_rows.data(), m_ep_recv, buf.data(), m_ep_send, type, mem);
  }
  return buf;
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::forward(const execution_space& space, const matrix& x, const matrix& y) {
  ScopedRegion region("moka::MoELayer::forward");
  const std::string where = "moka::MoELayer::forward";
  require_extent(where, x, 1, m_cfg.d_model, "columns");
  require_extent(where, y, 0, x.extent(0), "rows");
  require_extent(where, y, 1, m_cfg.d_model, "columns");
  const int T = static_cast<int>(x.extent(0));
  const int E = m_cfg.num_experts;
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
    const bool global = m_cfg.global_capacity() && !m_cfg.dropless && m_groups && m_groups->gate().size() > 1;
    m_capacity = m_cfg.capacity(global ? m_T_global : T, m_training);
    // The gate's experts as slots of the placement (one slot per expert, so
    // capacity per slot is capacity per expert); from here on rows are in
    // slot order.
    index_matrix slot_route = m_route;
    if (!m_identity) {
      if (m_slot_route.extent(0) != m_route.extent(0) || m_slot_route.extent(1) != m_route.extent(1))
        m_slot_route = index_matrix("moka::moe::slot_route", m_route.extent(0), m_route.extent(1));
      auto route = m_route, sr = m_slot_route;
      auto es    = m_expert_slot;
      Kokkos::parallel_for(
          "moka::route_to_slots", impl::row_major_2d(space, long(route.extent(0)), long(route.extent(1))),
          KOKKOS_LAMBDA(long t, long j) {
            const int e = route(t, j);
            sr(t, j)    = e < 0 ? -1 : es(e);
          });
      slot_route = m_slot_route;
    }
    Kokkos::View<long*, MemorySpace> base;
    if (global) {
      // Assignments to each expert on lower ranks come first in global order.
      if (m_cap_base.extent(0) == 0) m_cap_base = Kokkos::View<long*, MemorySpace>("moka::moe::capacity_base", E);
      if (m_routed.extent(0) == 0) m_routed = Kokkos::View<long*, MemorySpace>("moka::moe::routed", E);
      auto routed = m_routed;
      auto route = slot_route;
      const int k = m_cfg.top_k;
      Kokkos::parallel_for(
          "moka::routed_counts", Kokkos::RangePolicy<execution_space>(space, 0, E), KOKKOS_LAMBDA(int e) {
            long c = 0;
            for (int t = 0; t < T; ++t)
              for (int j = 0; j < k; ++j) c += route(t, j) == e ? 1 : 0;
            routed(e) = c;
          });
      auto hr = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), routed);
      auto hb = Kokkos::create_mirror_view(m_cap_base);
      m_groups->gate().exscan_host(hr.data(), hb.data(), E);
      Kokkos::deep_copy(m_cap_base, hb);
      base = m_cap_base;
    }
    m_rows = impl::assign_slots(space, m_cfg.drop_policy, m_capacity, base, slot_route, m_score,
                                m_identity ? m_counts : m_slot_counts, m_offsets, m_slot, m_slot_work, m_row_token,
                                m_row_choice, m_h_offsets);
    if (!m_identity) {
      auto counts = m_counts, sc = m_slot_counts, es = m_expert_slot;
      Kokkos::parallel_for(
          "moka::slot_counts_to_experts", Kokkos::RangePolicy<execution_space>(space, 0, E),
          KOKKOS_LAMBDA(int e) { counts(e) = sc(es(e)); });
    }
    {
      if (m_exchange) align_for_timing(space);
      ScopedRegion plan("moka::MoELayer::exchange_plan");
      plan_exchange(space);
    }
    // Expert-side workspace and the expert of each row (not part of the
    // exchange: one rank needs them too).
    ensure_expert_workspace(m_rows_e);
    impl::row_experts(space, m_e_offsets, m_row_expert, m_rows_e);
    // bf16 on one rank: the rows go straight to the GEMMs' bf16 operand.
    if (m_cfg.bf16_compute && !m_exchange) impl::gather_rows(space, m_rows, x, m_row_token, m_xs_b);
    else impl::gather_rows(space, m_rows, x, m_row_token, m_xs);
  }
  m_xe = exchange_forward(space, m_xs, m_xe_buf);

  // Experts: hpre = xs W1 (+ b1), h = act(hpre), ys = h W2 (+ b2).
  const int dff = m_dffl;
  const Activation act = m_cfg.activation;
  const bool bias = m_cfg.expert_bias, bf16 = m_cfg.bf16_compute;
  if (bf16) {
    ScopedRegion r("moka::MoELayer::to_bf16");
    prepare_bf16_forward(space);
  }
  m_ye = m_ye_buf;
  expert_gemm(space, Stage::up);
  if (!m_fused) {  // fused: b1 and the activation ran in the up-projection's epilogue
    ScopedRegion region_act("moka::MoELayer::activation");
    auto b1 = m_params.b1;
    if (bf16) {
      impl::activation_bf16(space, act, bias, m_rows_e, dff, m_row_expert, m_hpre_b, b1, m_h_b);
    } else {
      auto hpre = m_hpre;
      auto h    = m_h;
      auto rexp = m_row_expert;
      Kokkos::parallel_for(
          "moka::expert_activation", impl::row_major_2d(space, m_rows_e, long(dff)),
          KOKKOS_LAMBDA(long r, long c) {
            const int e = rexp(r);
            if (bias) {
              hpre(r, c) += b1(e, c);
              if (act == Activation::swiglu) hpre(r, dff + c) += b1(e, dff + c);
            }
            const Scalar a = impl::activate(act, hpre(r, c));
            h(r, c) = act == Activation::swiglu ? a * hpre(r, dff + c) : a;
          });
    }
  }
  expert_gemm(space, Stage::down);
  expert_bias_add(space);
  m_ys = exchange_reverse(space, m_ye, m_ys_buf);

  // Combine.
  ScopedRegion region_combine("moka::MoELayer::combine");
  impl::combine_rows(space, m_ys, m_slot, m_score, y);
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::expert_bias_add(const execution_space& space) {
  // b2 once per row: with slicing only the first slice rank adds it to its
  // partial output (the partials are summed).
  if (!m_cfg.expert_bias || (m_groups && m_groups->slice_rank() != 0)) return;
  impl::add_row_bias(space, m_rows_e, m_ye, m_params.b2, m_row_expert);
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
  const long rows = m_rows, rows_e = m_rows_e;
  const Activation act = m_cfg.activation;
  const bool bf16 = m_cfg.bf16_compute;
  auto dscore = m_dscore;
  // Row buffers live across steps (grow-only): allocating them per call
  // would cost a device allocation and a synchronising free every step.
  impl::grow_rows(m_dys, long(T) * k, d, "dys");
  impl::grow_rows(m_dxe, rows_e, d, "dxe");
  if (bf16) {
    if (!m_fused) impl::grow_rows(m_dh_b, rows_e, dff, "dh_bf16");
    impl::grow_rows(m_dhpre_b, rows_e, dff_in, "dhpre_b");
  } else {
    impl::grow_rows(m_dh, rows_e, dff, "dh");
    impl::grow_rows(m_dhpre, rows_e, dff_in, "dhpre");
  }
  auto dys = m_dys;

  // Combine backward: dscore and the gradient reaching each expert row in
  // one pass (and its bf16 copy for the GEMMs when the rows do not move).
  std::optional<ScopedRegion> stage;
  stage.emplace("moka::MoELayer::combine_backward");
  const bool dys_bf16 = bf16 && !m_exchange;
  if (dys_bf16) impl::grow_rows(m_dys_b, rows, d, "dys_bf16");
  impl::combine_backward(space, dy, m_ys, m_slot, m_score, m_dscore, dys, dys_bf16 ? m_dys_b : bmatrix());
  stage.reset();
  const matrix dye = exchange_forward(space, dys, m_dye_buf);
  m_dye = dye;
  stage.emplace("moka::MoELayer::combine_backward");

  // Expert backward. Bias gradients are column sums over each expert's
  // rows (in chunks, a fixed order: deterministic).
  const long chunks = m_chunks;
  if (m_cfg.expert_bias) {
    impl::grow_rows(m_colsum_work, chunks, std::max(d, dff_in), "colsum_work");
    impl::expert_column_sums(space, dye, m_e_offsets, m_chunk_start, chunks, bias_chunk, m_colsum_work, m_grads.b2);
  }
  stage.reset();
  // Fused: the dh GEMM's epilogue writes the pre-activation gradient; the
  // b1 gradient is its column sums.
  expert_gemm(space, Stage::down_backward);
  stage.emplace("moka::MoELayer::activation_backward");
  if (m_fused) {
    impl::expert_column_sums_bf16(space, m_dhpre_b, m_e_offsets, m_chunk_start, chunks, bias_chunk, m_colsum_work,
                                  m_grads.b1);
  } else if (bf16) {
    // Fused with the first pass of the b1 gradient (the same chunks and
    // order as expert_column_sums).
    const bool bias = m_cfg.expert_bias;
    impl::activation_backward_bf16(space, act, bias, chunks, bias_chunk, dff, m_chunk_start, m_e_offsets, m_dh_b,
                                   m_hpre_b, m_params.b1, m_dhpre_b, m_colsum_work);
    if (bias) impl::expert_column_sums_finish(space, m_chunk_start, m_colsum_work, m_grads.b1);
  } else {
    auto dh    = m_dh;
    auto hpre  = m_hpre;
    auto dhpre = m_dhpre;
    Kokkos::parallel_for(
        "moka::expert_activation_backward", impl::row_major_2d(space, rows_e, long(dff)),
        KOKKOS_LAMBDA(long r, long c) {
          if (act == Activation::swiglu) {
            const Scalar a = hpre(r, c), u = hpre(r, dff + c);
            dhpre(r, c)       = dh(r, c) * u * impl::activate_grad(act, a);
            dhpre(r, dff + c) = dh(r, c) * impl::activate(act, a);
          } else {
            dhpre(r, c) = dh(r, c) * impl::activate_grad(act, hpre(r, c));
          }
        });
  }
  if (m_cfg.expert_bias && !bf16)
    impl::expert_column_sums(space, m_dhpre, m_e_offsets, m_chunk_start, chunks, bias_chunk, m_colsum_work,
                             m_grads.b1);
  stage.reset();
  expert_gemm(space, Stage::up_backward);
  if (m_wgrad_zero) {
    // Overwritten by the GEMMs above, except where an expert had no rows.
    for (int e = 0; e < m_L; ++e)
      if (m_e_off[e + 1] == m_e_off[e]) {
        Kokkos::deep_copy(space, Kokkos::subview(m_grads.w1, e, Kokkos::ALL, Kokkos::ALL), Scalar(0));
        Kokkos::deep_copy(space, Kokkos::subview(m_grads.w2, e, Kokkos::ALL, Kokkos::ALL), Scalar(0));
      }
    m_wgrad_zero = false;
  }
  const matrix dxs = exchange_reverse(space, m_dxe, m_dxs_buf);

  // Gate backward (into dx), then the expert rows of each token.
  gate_backward(space, dscore, dx);
  stage.emplace("moka::MoELayer::undispatch");
  impl::scatter_add_rows(space, dxs, m_slot, dx);
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::expert_gemm(const execution_space& space, Stage stage) {
  static const char* names[] = {"moka::MoELayer::expert_up", "moka::MoELayer::expert_down",
                                "moka::MoELayer::expert_down_backward", "moka::MoELayer::expert_up_backward"};
  ScopedRegion region(names[static_cast<int>(stage)]);
  if (m_cfg.bf16_compute) {
    expert_gemm_bf16(space, stage);
    return;
  }
  const matrix& dye = m_dye;
  const Scalar beta_w = m_wgrad_zero ? Scalar(0) : Scalar(1);  // after zero_grad: overwrite
  const Scalar one(1), zero(0);
  for (int e = 0; e < m_L; ++e) {
    const long b = m_e_off[e], n = m_e_off[e + 1] - b;
    if (n == 0) continue;
    auto rows = [&](const matrix& m) { return impl::rows_of(m, b, b + n); };
    switch (stage) {
      case Stage::up:
        impl::gemm(space, "N", "N", one, rows(m_xe), impl::expert_of(m_params.w1, e), zero, rows(m_hpre));
        break;
      case Stage::down:
        impl::gemm(space, "N", "N", one, rows(m_h), impl::expert_of(m_params.w2, e), zero, rows(m_ye));
        break;
      case Stage::down_backward:
        impl::gemm(space, "T", "N", one, rows(m_h), rows(dye), beta_w, impl::expert_of(m_grads.w2, e));
        impl::gemm(space, "N", "T", one, rows(dye), impl::expert_of(m_params.w2, e), zero, rows(m_dh));
        break;
      case Stage::up_backward:
        impl::gemm(space, "T", "N", one, rows(m_xe), rows(m_dhpre), beta_w, impl::expert_of(m_grads.w1, e));
        impl::gemm(space, "N", "T", one, rows(m_dhpre), impl::expert_of(m_params.w1, e), zero, rows(m_dxe));
        break;
    }
  }
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::prepare_bf16_forward(const execution_space& space) {
  // bf16 copies of the fp32 master weights (they change every optimizer
  // step; skipped when the optimizer writes them: bf16_weights_managed) and
  // of the expert-side rows (gathered in bf16 directly on one rank).
  if (!m_bf16_managed) {
    impl::convert_to_bf16(space, "moka::w1_to_bf16", m_params.w1.data(), m_w1_b.data(), m_w1_b.size());
    impl::convert_to_bf16(space, "moka::w2_to_bf16", m_params.w2.data(), m_w2_b.data(), m_w2_b.size());
  }
  if (m_fused)
    impl::convert_to_bf16(space, "moka::b1_to_bf16", m_params.b1.data(), m_b1_b.data(), m_b1_b.size());
  if (m_exchange)
    impl::convert_to_bf16(space, "moka::xs_to_bf16", m_xe.data(), m_xs_b.data(),
                          std::size_t(m_rows_e) * m_cfg.d_model);
}

#ifdef KOKKOS_ENABLE_CUDA
template <class Scalar, class MemorySpace>
impl::GemmEpilogue MoELayer<Scalar, MemorySpace>::epilogue(bool forward, int e, long row0) const {
  impl::GemmEpilogue ep;
  ep.forward = forward;
  if (forward) ep.bias = m_b1_b.data() + std::size_t(e) * m_dfil;
  ep.aux    = m_hpre_b.data() + row0 * m_dfil;
  ep.aux_ld = m_dfil;
  return ep;
}
#endif

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::expert_gemm_bf16(const execution_space& space, Stage stage) {
#ifdef KOKKOS_ENABLE_CUDA
  if constexpr (std::is_same<Scalar, float>::value && std::is_same<MemorySpace, Kokkos::CudaSpace>::value) {
    const int d = m_cfg.d_model, dff = m_dffl, dfi = m_dfil;
    const float beta_w = m_wgrad_zero ? 0.f : 1.f;  // after zero_grad: overwrite
    if (stage == Stage::down_backward && m_exchange) {  // else written by the combine backward
      impl::grow_rows(m_dys_b, m_rows_e, d, "dys_bf16");
      impl::convert_to_bf16(space, "moka::dys_to_bf16", m_dye.data(), m_dys_b.data(), std::size_t(m_rows_e) * d);
    }
    for (int e = 0; e < m_L; ++e) {
      const long b = m_e_off[e];
      const int n  = static_cast<int>(m_e_off[e + 1] - b);
      if (n == 0) continue;
      const bf16* w1 = m_w1_b.data() + std::size_t(e) * d * dfi;
      const bf16* w2 = m_w2_b.data() + std::size_t(e) * dff * d;
      switch (stage) {
        case Stage::up:
          if (m_fused) {
            impl::gemm_bf16_epilogue(space, epilogue(true, e, b), false, false, n, dff, d, m_xs_b.data() + b * d, d,
                                     w1, dfi, m_h_b.data() + b * dff, dff, m_lt_work.data(), m_lt_work.size());
          } else {
            impl::gemm_bf16_bf16(space, false, false, n, dfi, d, 1.f, m_xs_b.data() + b * d, d, w1, dfi, 0.f,
                                 m_hpre_b.data() + b * dfi, dfi);
          }
          break;
        case Stage::down:
          impl::gemm_bf16_f32(space, false, false, n, d, dff, 1.f, m_h_b.data() + b * dff, dff, w2, d, 0.f,
                              m_ye.data() + b * d, d);
          break;
        case Stage::down_backward:
          impl::gemm_bf16_f32(space, true, false, dff, d, n, 1.f, m_h_b.data() + b * dff, dff, m_dys_b.data() + b * d,
                              d, beta_w, m_grads.w2.data() + std::size_t(e) * dff * d, d);
          if (m_fused) {
            impl::gemm_bf16_epilogue(space, epilogue(false, e, b), false, true, n, dff, d, m_dys_b.data() + b * d, d,
                                     w2, d, m_dhpre_b.data() + b * dff, dff, m_lt_work.data(), m_lt_work.size());
          } else {
            impl::gemm_bf16_bf16(space, false, true, n, dff, d, 1.f, m_dys_b.data() + b * d, d, w2, d, 0.f,
                                 m_dh_b.data() + b * dff, dff);
          }
          break;
        case Stage::up_backward:
          impl::gemm_bf16_f32(space, true, false, d, dfi, n, 1.f, m_xs_b.data() + b * d, d,
                              m_dhpre_b.data() + b * dfi, dfi, beta_w, m_grads.w1.data() + std::size_t(e) * d * dfi,
                              dfi);
          impl::gemm_bf16_f32(space, false, true, n, d, dfi, 1.f, m_dhpre_b.data() + b * dfi, dfi, w1, dfi, 0.f,
                              m_dxe.data() + b * d, d);
          break;
      }
    }
    return;
  }
#endif
  (void)space;
  (void)stage;
  impl::fail(MOKA_FUNCTION, "bf16 expert GEMMs need a CUDA build and a float layer in CudaSpace");
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::gate_forward(const execution_space& space, const matrix& x) {
  const int T = static_cast<int>(x.extent(0)), E = m_cfg.num_experts, k = m_cfg.top_k, d = m_cfg.d_model;
  const bool training = m_training;
  const std::uint64_t seed = m_seed, counter = m_counter;
  // Random streams are indexed by the token's place in the whole batch, so
  // every layout draws the numbers of the single-rank run.
  const std::uint64_t TG = static_cast<std::uint64_t>(m_T_global), t0 = static_cast<std::uint64_t>(m_tok0);
  const double tg = static_cast<double>(m_T_global);
  if (training) ++m_counter;
  const GateType type = m_cfg.gate;
  const Communicator* gate_group = m_groups && m_groups->gate().size() > 1 ? &m_groups->gate() : nullptr;

  // Gate input: x, or x times the Switch jitter U(1-eps, 1+eps) in training.
  m_gin = x;
  if (type == GateType::switch_top1 && training && m_cfg.jitter_eps > 0) {
    auto jit = m_jitter;
    matrix gin = m_gate_in;
    const Scalar eps = Scalar(m_cfg.jitter_eps);
    Kokkos::parallel_for(
        "moka::gate_jitter", impl::row_major_2d(space, T, d),
        KOKKOS_LAMBDA(int t, int c) {
          const double u = impl::hash_uniform(seed ^ 0x6a09e667f3bcc909ull, (counter * TG + t0 + t) * d + c);
          jit(t, c)      = Scalar(1) + eps * Scalar(2 * u - 1);
          gin(t, c)      = x(t, c) * jit(t, c);
        });
    m_gin = gin;
  } else if (m_jitter.extent(0) > 0) {
    Kokkos::deep_copy(space, m_jitter, Scalar(1));
  }

  // Logits (noisy gate: clean + N(0,1) * (softplus(x Wn) + 0.01) in training).
  impl::gemm(space, "N", "N", Scalar(1), m_gin, m_params.gate_w, Scalar(0), m_clean);
  if (type == GateType::noisy) impl::gemm(space, "N", "N", Scalar(1), m_gin, m_params.noise_w, Scalar(0), m_raw);
  if (type == GateType::noisy) {
    auto clean = m_clean;
    auto raw = m_raw;
    auto sd = m_std;
    auto noise = m_noise;
    auto logits = m_logits;
    Kokkos::parallel_for(
        "moka::gate_noise", impl::row_major_2d(space, T, E),
        KOKKOS_LAMBDA(int t, int e) {
          sd(t, e)     = impl::softplus(raw(t, e)) + Scalar(1e-2);
          noise(t, e)  = training ? Scalar(impl::hash_normal(seed ^ 0xbb67ae8584caa73bull, (counter * TG + t0 + t) * E + e))
                                  : Scalar(0);
          logits(t, e) = clean(t, e) + noise(t, e) * sd(t, e);
        });
  }

  // Selection and scores.
  if (type == GateType::trace) {
    const std::vector<long> scaled = scale_counts(m_trace_counts, long(TG) * k);
    auto h = Kokkos::create_mirror_view(m_trace_cum);
    h(0)   = 0;
    for (int e = 0; e < E; ++e) h(e + 1) = h(e) + static_cast<int>(scaled[e]);
    Kokkos::deep_copy(m_trace_cum, h);
  }
  impl::GateArgs args{type, m_cfg.renormalize, training && m_cfg.random_routing, m_cfg.bias_balance, seed ^ 0x3c6ef372fe94f82bull,
                      counter, TG, t0};
  impl::gate_select(space, args, m_logits, m_sel_bias, m_probs, m_idx, m_score, m_route, m_thr, m_rr);
  if (type == GateType::trace) {
    // Assignment j T + t (T, t over the whole batch) goes to the expert whose
    // share of [0, T k) holds it.
    auto idx = m_idx;
    auto route = m_route;
    auto score = m_score;
    auto cum = m_trace_cum;
    Kokkos::parallel_for(
        "moka::gate_trace", Kokkos::RangePolicy<execution_space>(space, 0, T * k), KOKKOS_LAMBDA(int i) {
          const int j = i / T, t = i % T;
          const long g = long(j) * long(TG) + long(t0) + t;
          int e        = 0;
          while (e + 1 < E && cum(e + 1) <= g) ++e;
          idx(t, j)   = e;
          route(t, j) = e;
          score(t, j) = Scalar(1) / Scalar(k);
        });
  }

  // Auxiliary losses, and the per-expert factors of their gradients.
  m_balance_loss = 0;
  m_z_loss       = 0;
  auto probs = m_probs;
  auto logits = m_logits;
  auto score = m_score;
  auto idx = m_idx;
  auto route = m_route;
  if (m_cfg.z_loss_weight > 0) {
    double zsum = 0;
    Kokkos::parallel_reduce(
        "moka::z_loss", Kokkos::RangePolicy<execution_space>(space, 0, T),
        KOKKOS_LAMBDA(int t, double& acc) {
          Scalar m = logits(t, 0);
          for (int e = 1; e < E; ++e) m = logits(t, e) > m ? logits(t, e) : m;
          Scalar s = 0;
          for (int e = 0; e < E; ++e) s += impl::exp(logits(t, e) - m);
          const double lse = double(m + impl::log(s));
          acc += lse * lse;
        },
        zsum);
    if (gate_group) gate_group->allreduce_host(&zsum, 1);
    m_z_loss = m_cfg.z_loss_weight * zsum / tg;
  }
  const double w = m_cfg.balance_weight;
  if (w > 0 && (type == GateType::gshard || type == GateType::switch_top1)) {
    // E * sum_e f_e m_e: f_e fraction of tokens whose first choice is e,
    // m_e mean gate probability (1 at perfect balance; FastMoE scales the
    // mean over experts by E^2, which is the same number).
    auto f = m_stat_a, mp = m_stat_b;  // first-choice counts, summed probabilities
    Kokkos::parallel_for(
        "moka::balance_stats", Kokkos::RangePolicy<execution_space>(space, 0, E), KOKKOS_LAMBDA(int e) {
          double cnt = 0, p = 0;
          for (int t = 0; t < T; ++t) {
            cnt += idx(t, 0) == e ? 1.0 : 0.0;
            p += double(probs(t, e));
          }
          f(e)  = cnt;
          mp(e) = p;
        });
    auto hf = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), f);
    auto hm = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), mp);
    auto hg = Kokkos::create_mirror_view(m_bal_grad);
    if (gate_group) {
      gate_group->allreduce_host(hf.data(), E);
      gate_group->allreduce_host(hm.data(), E);
    }
    for (int e = 0; e < E; ++e) {
      hf(e) /= tg;
      hm(e) /= tg;
    }
    double l = 0;
    for (int e = 0; e < E; ++e) {
      l += hf(e) * hm(e);
      hg(e) = Scalar(w * E * hf(e) / tg);  // d loss / d p(t, e)
    }
    m_balance_loss = w * E * l;
    Kokkos::deep_copy(m_bal_grad, hg);
  }
  if (w > 0 && type == GateType::noisy) {
    // cv^2(importance) + cv^2(load): importance = summed scores per expert;
    // load = expected selections under the noise (Shazeer et al.), or the
    // selection counts when there is no noise (evaluation).
    auto imp = m_stat_a, load = m_stat_b;
    auto clean = m_clean;
    auto sd = m_std;
    auto thr = m_thr;
    Kokkos::parallel_for(
        "moka::noisy_stats", Kokkos::RangePolicy<execution_space>(space, 0, E), KOKKOS_LAMBDA(int e) {
          double im = 0, ld = 0;
          for (int t = 0; t < T; ++t) {
            bool in = false;
            for (int j = 0; j < k; ++j)
              if (idx(t, j) == e) {
                im += double(score(t, j));
                in = true;
              }
            if (training) {
              const Scalar th = logits(t, in ? thr(t, 0) : thr(t, 1));
              ld += impl::normal_cdf(double((clean(t, e) - th) / sd(t, e)));
            } else {
              ld += in ? 1.0 : 0.0;
            }
          }
          imp(e)  = im;
          load(e) = ld;
        });
    auto hi = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), imp);
    auto hl = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), load);
    if (gate_group) {
      gate_group->allreduce_host(hi.data(), E);
      gate_group->allreduce_host(hl.data(), E);
    }
    std::vector<double> vi(hi.data(), hi.data() + E), vl(hl.data(), hl.data() + E), gi, gl;
    m_balance_loss = w * (impl::cv_squared(vi, &gi) + impl::cv_squared(vl, &gl));
    auto hgi = Kokkos::create_mirror_view(m_imp_grad);
    auto hgl = Kokkos::create_mirror_view(m_load_grad);
    for (int e = 0; e < E; ++e) {
      hgi(e) = Scalar(w * gi[e]);
      hgl(e) = training ? Scalar(w * gl[e]) : Scalar(0);
    }
    Kokkos::deep_copy(m_imp_grad, hgi);
    Kokkos::deep_copy(m_load_grad, hgl);
  }

  // Auxiliary-loss-free balancing (DeepSeek-V3): after routing, move each
  // expert's selection bias toward the mean load.
  if (training && m_cfg.bias_balance) {
    auto sel = m_sel_count;
    Kokkos::parallel_for(
        "moka::bias_load", Kokkos::RangePolicy<execution_space>(space, 0, E), KOKKOS_LAMBDA(int e) {
          long c = 0;
          for (int t = 0; t < T; ++t)
            for (int j = 0; j < k; ++j) c += route(t, j) == e ? 1 : 0;
          sel(e) = c;
        });
    auto hs = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), sel);
    if (gate_group) gate_group->allreduce_host(hs.data(), E);
    auto hb = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), m_sel_bias);
    double mean = 0;
    for (int e = 0; e < E; ++e) mean += double(hs(e)) / E;
    for (int e = 0; e < E; ++e) {
      const double err = mean - double(hs(e));
      hb(e) += Scalar(m_cfg.bias_update_rate * (err > 0 ? 1.0 : (err < 0 ? -1.0 : 0.0)));
    }
    Kokkos::deep_copy(m_sel_bias, hb);
  }
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::gate_backward(const execution_space& space, const matrix& dscore,
                                                  const matrix& dx) {
  ScopedRegion region("moka::MoELayer::gate_backward");
  const int T = m_T, E = m_cfg.num_experts, k = m_cfg.top_k, d = m_cfg.d_model;
  const GateType type = m_cfg.gate;
  const double w = m_cfg.balance_weight;
  auto idx = m_idx;
  // Importance part of the noisy gate's loss acts on the scores.
  if (w > 0 && type == GateType::noisy) {
    auto gi = m_imp_grad;
    Kokkos::parallel_for(
        "moka::importance_backward", Kokkos::RangePolicy<execution_space>(space, 0, T), KOKKOS_LAMBDA(int t) {
          for (int j = 0; j < k; ++j) dscore(t, j) += gi(idx(t, j));
        });
  }
  // Balance loss of GShard / Switch acts on the probabilities.
  matrix dprob;
  if (w > 0 && (type == GateType::gshard || type == GateType::switch_top1)) {
    dprob   = m_dprob;
    auto bg = m_bal_grad;
    Kokkos::parallel_for(
        "moka::balance_backward", impl::row_major_2d(space, T, E),
        KOKKOS_LAMBDA(int t, int e) { dprob(t, e) = bg(e); });
  }
  matrix dlogits = m_dlogits;
  impl::gate_backward(space, type, m_cfg.renormalize, m_logits, m_probs, idx, m_score, dscore, dprob,
                      Scalar(m_cfg.z_loss_weight), m_T_global, dlogits);

  matrix dclean = dlogits;
  matrix draw;
  if (type == GateType::noisy) {
    // logits = clean + noise * std, std = softplus(raw) + 0.01; the load
    // loss adds through Phi((clean - threshold) / std).
    dclean = m_dclean;
    draw   = m_draw;
    auto clean = m_clean;
    auto raw = m_raw;
    auto sd = m_std;
    auto noise = m_noise;
    auto logits = m_logits;
    auto thr = m_thr;
    auto gl  = m_load_grad;
    const bool load_grad = w > 0 && m_training;
    Kokkos::parallel_for(
        "moka::noisy_backward", Kokkos::RangePolicy<execution_space>(space, 0, T), KOKKOS_LAMBDA(int t) {
          Scalar d_in = 0, d_out = 0;
          for (int e = 0; e < E; ++e) {
            dclean(t, e) = 0;
            draw(t, e)   = 0;  // holds the direct d/dstd of the load term for now
            if (!load_grad) continue;
            bool in = false;
            for (int j = 0; j < k; ++j) in = in || idx(t, j) == e;
            const Scalar th = logits(t, in ? thr(t, 0) : thr(t, 1));
            const Scalar z  = (clean(t, e) - th) / sd(t, e);
            const Scalar g  = gl(e) * Scalar(impl::normal_pdf(double(z)));
            dclean(t, e) = g / sd(t, e);
            draw(t, e)   = -g * z / sd(t, e);
            if (in) d_in -= g / sd(t, e);
            else d_out -= g / sd(t, e);
          }
          if (load_grad) {
            dlogits(t, thr(t, 0)) += d_in;
            dlogits(t, thr(t, 1)) += d_out;
          }
          for (int e = 0; e < E; ++e) {
            dclean(t, e) += dlogits(t, e);
            const Scalar dstd = dlogits(t, e) * noise(t, e) + draw(t, e);
            draw(t, e)        = dstd * impl::sigmoid(raw(t, e));
          }
        });
  }
  impl::gemm(space, "T", "N", Scalar(1), m_gin, dclean, Scalar(1), m_grads.gate_w);
  impl::gemm(space, "N", "T", Scalar(1), dclean, m_params.gate_w, Scalar(0), dx);
  if (type == GateType::noisy) {
    impl::gemm(space, "T", "N", Scalar(1), m_gin, draw, Scalar(1), m_grads.noise_w);
    impl::gemm(space, "N", "T", Scalar(1), draw, m_params.noise_w, Scalar(1), dx);
  }
  if (type == GateType::switch_top1) {
    auto jit = m_jitter;
    Kokkos::parallel_for(
        "moka::jitter_backward", impl::row_major_2d(space, T, d),
        KOKKOS_LAMBDA(int t, int c) { dx(t, c) *= jit(t, c); });
  }
}

// The common instantiations live in the library (src/MoELayer.cpp).
extern template class MoELayer<double, Kokkos::HostSpace>;
extern template class MoELayer<float, Kokkos::HostSpace>;
#ifdef KOKKOS_ENABLE_CUDA
extern template class MoELayer<double, Kokkos::CudaSpace>;
extern template class MoELayer<float, Kokkos::CudaSpace>;
#endif

}  // namespace moka
