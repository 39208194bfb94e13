#pragma once
/// \file MoELayer.hpp
/// \brief moka::MoELayer: gate, capacity, dispatch, expert FFNs, combine,
/// and the backward of all of them, on one rank or distributed over the
/// process groups of moka::ProcessGroups (EP x EDP x expert slicing).
///
/// Data flow of forward (T tokens of width d, E experts, top-k):
///   logits[T,E] = x Wg;  gate -> idx[T,k], score[T,k]
///   capacity / drop -> slot[T,k] (row in the expert-ordered buffer, or -1)
///   dispatch: xs[slot[t,j]] = x[t]                 (rows ordered by destination expert)
///   exchange: counts, then rows, to the experts' EP ranks; received rows
///             ordered by (local expert, source rank, source position);
///             with slicing, gathered over the slice group (one rank: nothing moves)
///   experts:  h = act(xs_e W1_e + b1_e), ys_e = h W2_e + b2_e    (one GEMM pair per expert)
///   exchange back (slicing: partial outputs summed over the slice group)
///   combine:  y[t] = sum_j score[t,j] ys[slot[t,j]]
/// With comm.schedule_degree > 1 (smart scheduling) the exchange and the
/// experts run in peer groups, each group's rows computed while the next
/// group's move; with shadow slots (dynamic shadowing) a shadowed expert's
/// rows stay on their rank, in a shadow slot holding the owner's weights.
/// Rows of an expert keep token order, so results do not depend on where
/// an expert lives, and no floating-point atomics are used: the same inputs
/// give bitwise the same outputs on the same backend.
///
/// backward(dy) gives dx and accumulates (+=) the parameter gradients,
/// including those of the gate's auxiliary losses (aux_loss(): balance
/// loss + z-loss, to be added to the model's loss); zero_grad() clears them.
///
/// Distributed (a ProcessGroups given): each rank passes its own tokens; the
/// batch is the concatenation of all ranks' tokens in world-rank order.
/// Gate statistics (balance losses, z-loss, bias-balancing loads, random
/// streams, trace assignment) are over that whole batch, so outputs equal a
/// single-rank run of the whole batch. Gradients are this rank's share:
/// summing them over the group of each parameter's tag (moka::GradSync)
/// gives the gradient of the whole batch; the caller scales dy so that the
/// sum over ranks is the gradient of its loss.
///
/// Training mode (the default) turns on the random parts of the gates
/// (noise, jitter, random routing), the training capacity factor and the
/// bias-balancing updates. Random numbers come from a counter-based stream
/// of (seed, forward count, position): reproducible on every backend.

#include <moka/core/Core.hpp>
#include <moka/moe/MoEConfig.hpp>
#include <moka/moe/TokenExchange.hpp>
#include <moka/moe/impl/MoEKernels.hpp>
#include <moka/parallel/GradSync.hpp>
#include <moka/parallel/Placement.hpp>
#include <moka/parallel/ReplicaGroups.hpp>
#include <moka/parallel/ProcessGroups.hpp>
#include <moka/core/Profiling.hpp>
#include <moka/linalg/impl/CublasGemm.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace moka {

/// \brief The trainable tensors of an MoE layer (or their gradients).
template <class Scalar, class MemorySpace>
struct MoEParams {
  using matrix  = Kokkos::View<Scalar**, Kokkos::LayoutRight, MemorySpace>;
  using tensor3 = Kokkos::View<Scalar***, Kokkos::LayoutRight, MemorySpace>;
  matrix gate_w;  ///< Wg [d, E]
  matrix noise_w; ///< noise weights Wn [d, E] (noisy gate; 0 x 0 otherwise)
  tensor3 w1;     ///< W1 [L, d, d_ff_in / S] of the L = E / EP local experts (slice of d_ff)
  matrix b1;      ///< b1 [L, d_ff_in / S] (extent 0 rows without biases)
  tensor3 w2;     ///< W2 [L, d_ff / S, d]
  matrix b2;      ///< b2 [L, d] (the same on every slice rank)

  /// \brief Allocates zero-filled tensors for \p cfg with \p local_experts
  /// experts of d_ff / \p slices columns, labelled with \p prefix.
  MoEParams(const MoEConfig& cfg, const std::string& prefix, int local_experts, int slices);
  MoEParams() = default;
};

/// \brief One Mixture-of-Experts layer, templated on the scalar type
/// (double, float) and the memory space of its Views.
template <class Scalar, class MemorySpace = memory_space>
class MoELayer {
  static_assert(Kokkos::is_memory_space<MemorySpace>::value, "MoELayer needs a Kokkos memory space");

 public:
  using execution_space = typename MemorySpace::execution_space;
  using matrix          = Kokkos::View<Scalar**, Kokkos::LayoutRight, MemorySpace>;
  using index_matrix    = Kokkos::View<int**, Kokkos::LayoutRight, MemorySpace>;
  using index_vector    = Kokkos::View<int*, MemorySpace>;
  using params_type     = MoEParams<Scalar, MemorySpace>;
  using bmatrix         = Kokkos::View<bf16**, Kokkos::LayoutRight, MemorySpace>;
  using btensor3        = Kokkos::View<bf16***, Kokkos::LayoutRight, MemorySpace>;

  /// \brief Allocates parameters (zero) and gradients; throws moka::Error on
  /// a bad config. \p groups: the layout over ranks (nullptr: this rank
  /// alone). \p placement: which expert each slot of the EP group holds
  /// (empty: contiguous, expert e on EP rank e / L, L = E / EP); every EP
  /// group of the layout uses the same one. Spare slots (L > E / EP) hold
  /// replicas of experts, never two of one expert on one rank; a
  /// replicated expert's rows are split among its replicas (see
  /// set_placement) and its gradients summed among them by moka::GradSync.
  explicit MoELayer(const MoEConfig& config, std::shared_ptr<ProcessGroups> groups = nullptr,
                    Placement placement = Placement());

  /// \brief The configuration.
  const MoEConfig& config() const { return m_cfg; }
  /// \brief Parameters.
  params_type& params() { return m_params; }
  const params_type& params() const { return m_params; }
  /// \brief Accumulated gradients (clears the expert weight gradients now
  /// if zero_grad() deferred that and no backward has run since).
  params_type& grads() {
    settle_grads();
    return m_grads;
  }
  const params_type& grads() const {
    settle_grads();
    return m_grads;
  }

  /// \brief The layer's tensors with their gradients and gradient tags, for
  /// moka::Optimizer and moka::GradSync: the gate's (summed over the gate
  /// group), this rank's experts (summed over the EDP group), b2 (whole on
  /// every slice rank); W1 and W2 carry their bf16 copies with bf16_compute.
  /// Names are \p prefix + "gate_w", "w1", ...
  std::vector<ParamRef<Scalar, MemorySpace>> parameters(const std::string& prefix = "") {
    std::vector<ParamRef<Scalar, MemorySpace>> out;
    // Expert tensors: the owned slots only (shadow slots, after them, are
    // the layer's own workspace: neither updated nor synchronised).
    auto add = [&](const std::string& name, auto p, auto g, ParamTag tag, bf16* copy = nullptr) {
      using flat = typename ParamRef<Scalar, MemorySpace>::flat;
      const bool expert  = tag != ParamTag::gate;
      const std::size_t n = expert && m_L ? p.size() / m_L * m_Lo : p.size();
      auto shape          = extents_of(p);
      if (expert) shape[0] = m_Lo;
      out.push_back({prefix + name, flat(p.data(), n), flat(g.data(), n), tag, copy, nullptr, shape});
    };
    auto& G = grads();
    add("gate_w", m_params.gate_w, G.gate_w, ParamTag::gate);
    if (m_params.noise_w.size()) add("noise_w", m_params.noise_w, G.noise_w, ParamTag::gate);
    const std::size_t first_expert = out.size();
    add("w1", m_params.w1, G.w1, ParamTag::expert, m_cfg.bf16_compute ? m_w1_b.data() : nullptr);
    if (m_params.b1.size()) add("b1", m_params.b1, G.b1, ParamTag::expert);
    add("w2", m_params.w2, G.w2, ParamTag::expert, m_cfg.bf16_compute ? m_w2_b.data() : nullptr);
    if (m_params.b2.size()) add("b2", m_params.b2, G.b2, ParamTag::expert_replicated);
    for (std::size_t i = first_expert; i < out.size(); ++i) out[i].replicas = m_replicas;
    return out;
  }

  /// \brief bf16 copies of W1 and W2 used by the bf16 GEMMs (bf16_compute).
  const btensor3& bf16_w1() const { return m_w1_b; }
  const btensor3& bf16_w2() const { return m_w2_b; }
  /// \brief Whether the bf16 expert GEMMs run as grouped GEMMs
  /// (expert.gemm_grouped; not the fused epilogues' GEMMs), and which of the
  /// six kinds (up, down, dW2, dh, dW1, dx) cuBLAS refused so far and so
  /// loop over the experts: "" when none.
  GemmChoice gemm_grouped() const { return m_grouped; }
  /// \brief expert.gemm_batched, and the rows per local expert of the last
  /// forward's padded layout (0: not padded; then expert e's rows are its
  /// own count). Padded, expert_rows() is local experts x padded_rows() and
  /// slots() points into that layout.
  GemmChoice gemm_batched() const { return m_batched; }
  long padded_rows() const { return m_pad; }
  /// \brief expert.gemm_streams = 0: the layer chooses (see gemm_streams()).
  bool gemm_streams_auto() const { return m_streams_auto; }
  /// The automatic choices (expert.gemm_streams = 0, expert.gemm_grouped =
  /// auto) apply with at least this many local experts: 4 streams for
  /// stages of at least auto_gemm_rows rows per local expert on average,
  /// grouped GEMMs below (on an H200: docs/performance.md).
  static constexpr int auto_gemm_experts = 16;
  static constexpr long auto_gemm_rows   = 1024;
  /// \brief How the last bf16 expert stage ran its GEMMs: the streams its
  /// loop over experts used (1: the layer's stream) and whether it ran
  /// grouped GEMMs (kinds cuBLAS refused still loop).
  struct ExpertGemms {
    int streams  = 1;
    bool grouped = false;
    bool batched = false;  ///< one strided-batched GEMM per kind over the padded rows
  };
  ExpertGemms last_expert_gemms() const { return m_last_gemms; }
  std::string gemm_grouped_refused() const {
    static const char* names[] = {"up", "down", "dW2", "dh", "dW1", "dx"};
    std::string r;
    for (int i = 0; i < 6; ++i)
      if ((m_grouped_refused >> i) & 1) r += (r.empty() ? "" : " ") + std::string(names[i]);
    return r;
  }
  /// \brief Whether b1 and the activation (and the activation's gradient)
  /// run in cuBLASLt GEMM epilogues (bf16 on CUDA, gelu_tanh, expert
  /// biases, d_ff per rank divisible by 8, expert.gemm_epilogue).
  bool fused_epilogue() const { return m_fused; }
  /// \brief Whether the last forward's EP exchange sent one message per
  /// peer through the staging buffer (no rank sent more than (L - 1) x
  /// comm.exchange_coalesce_mb, L local experts).
  bool exchange_coalesced() const { return m_tx.coalesced(); }
  /// \brief Whether the EP exchange stores rows straight into the peers'
  /// receive buffers (comm.exchange_direct; known after the first forward).
  bool exchange_direct() const { return m_tx.direct(); }
  /// \brief Whether the last forward ran smart scheduling (comm.schedule_degree), in how many peer groups.
  bool exchange_scheduled() const { return m_tx.scheduled(); }
  int schedule_phases() const { return m_tx.phases(); }
  /// \brief With \p on, forward uses the bf16 copies as they are instead of
  /// converting W1 and W2 at every forward: whoever changes the weights
  /// keeps the copies equal to bf16(W) (moka::Optimizer does, fused into its
  /// update, for tensors registered with a bf16 copy; init_parameters does).
  /// Off by default.
  void set_bf16_weights_managed(bool on) { m_bf16_managed = on; }
  bool bf16_weights_managed() const { return m_bf16_managed; }
  /// \brief The process groups (nullptr: one rank).
  const ProcessGroups* groups() const { return m_groups.get(); }
  /// \brief Expert slots held here (L = E / EP, or the placement's), the
  /// logical expert on local slot \p l, and the d_ff columns of each held
  /// here (d_ff / S). Shadow slots are not counted.
  int local_experts() const { return m_Lo; }
  int local_expert(int l) const { return m_place.expert_at(m_ep_rank, l); }
  int local_d_ff() const { return m_dffl; }
  /// \brief Where the experts live (contiguous unless one was given).
  const Placement& placement() const { return m_place; }
  /// \brief Adopts \p p (same experts, EP size and slots per rank) for the
  /// next forward. Only the mapping changes: the slots' parameters,
  /// gradients and optimizer state stay where they are, so a caller that
  /// changes which expert a slot holds moves that state first
  /// (moka::migrate_experts does both). Rows of a replicated expert are
  /// split among its replicas by a rule that depends only on the routing:
  /// the expert's kept rows of the whole EP group, in global token order,
  /// are cut into one contiguous run per replica (in the order of its
  /// slots, by rank), sized by moka::split_replica_rows so that the ranks'
  /// rows come out as even as the replicas allow. Throws moka::Error naming what
  /// does not fit.
  void set_placement(const Placement& p);
  /// \brief The replicas of this rank's slots (what moka::GradSync reads;
  /// rebuilt in place by set_placement).
  std::shared_ptr<const ReplicaGroups> replica_groups() const { return m_replicas; }
  /// \name Dynamic shadowing (FasterMoE; docs/balance.md, balance.shadowing).
  /// With MoEConfig::shadow_slots = M > 0 (and an EP group of more than one
  /// rank, one slot per expert), every forward asks the shadow rule which
  /// experts to shadow this step, given the kept rows of every expert from
  /// every EP rank (per_source[rank][expert]) and the placement. A shadowed
  /// expert's parameters are broadcast from its owner into shadow slot j
  /// (j: its place in the rule's answer) on every EP rank; each rank's own
  /// rows of it go to that slot and never leave the rank; backward reduces
  /// the shadow slots' gradients to the owner's slot (added to it) and
  /// clears them. Results equal the unshadowed layer's within round-off
  /// (the sums over an expert's rows are split by rank). No rule: nothing
  /// is shadowed. The rule must answer alike on every rank of the EP group
  /// (it is given the same numbers there): at most M distinct experts.
  /// @{
  using ShadowRule =
      std::function<std::vector<int>(const std::vector<std::vector<double>>& per_source, const Placement& placement)>;
  void set_shadow_rule(ShadowRule rule) { m_shadow_rule = std::move(rule); }
  /// Shadow slots per rank (0: shadowing off).
  int shadow_slots() const { return m_M; }
  /// The experts the last forward shadowed (in shadow-slot order).
  const std::vector<int>& shadowed() const { return m_shadowed; }
  /// Bytes this rank received (weights) and sent (gradients) for shadowing in the last step.
  long shadow_bytes() const { return m_shadow_bytes; }
  /// @}

  /// \brief The CUDA streams the bf16 expert GEMMs run on (expert.gemm_streams,
  /// at most the local experts; 1 where the GEMMs stay on the layer's stream).
  /// With expert.gemm_streams = 0 (gemm_streams_auto()) the most they run on
  /// (see auto_gemm_rows).
  int gemm_streams() const {
#ifdef KOKKOS_ENABLE_CUDA
    return m_fan ? m_fan->size() : 1;
#else
    return 1;
#endif
  }
  /// \brief Tokens of the whole batch over all ranks, and this rank's first (last forward).
  long tokens_global() const { return m_T_global; }
  long token_offset() const { return m_tok0; }
  /// \brief Rows the local experts processed in the last forward.
  long expert_rows() const { return m_rows_e; }

  /// \brief Deterministic initialisation from \p seed (the same numbers on
  /// every backend and layout: each rank keeps its part of the single-rank
  /// tensors): uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights, zero biases.
  void init_parameters(std::uint64_t seed);
  /// \brief Sets every gradient to zero. The expert weight gradients (W1
  /// and W2, the large ones) are cleared lazily: the next backward's
  /// weight-gradient GEMMs overwrite them (beta 0) instead of accumulating,
  /// which saves a pass over them and the GEMMs' reads; grads() clears them
  /// at once if asked for before that backward.
  void zero_grad(const execution_space& space);

  /// \brief y = MoE(x). x and y are [T, d]; keeps what backward needs.
  void forward(const execution_space& space, const matrix& x, const matrix& y);
  /// \brief dx = dMoE/dx^T dy, and parameter gradients += their part.
  /// Needs the forward of the same x just before. With bf16_compute the
  /// backward writes its gradients into the buffers of the forward's
  /// activations (no row buffer of its own), so a second backward needs a
  /// new forward first (an error otherwise), as in frameworks that free
  /// the graph in backward.
  void backward(const execution_space& space, const matrix& dy, const matrix& dx);

  /// \brief The state of the gate's random streams and trace walk: (seed,
  /// training forwards so far, trace rows walked), the same on every rank;
  /// with selection_bias() what a checkpoint keeps besides the parameters.
  std::vector<std::uint64_t> stream_state() const { return {m_seed, m_counter, std::uint64_t(m_trace_pos)}; }
  void set_stream_state(const std::vector<std::uint64_t>& s) {
    MOKA_REQUIRE(s.size() == 3, "moka::MoELayer::set_stream_state: ", s.size(), " values, not 3");
    m_seed      = s[0];
    m_counter   = s[1];
    m_trace_pos = static_cast<long>(s[2]);
  }
  /// \brief Rewrites the bf16 copies of W1 and W2 from the parameters
  /// (bf16_compute; after the parameters were set from outside).
  void refresh_bf16_weights(const execution_space& space);

  /// \brief Whether the topology-aware gate acts (gate.max_offnode_share < 1
  /// and some expert has no slot on this rank's node), and each expert's
  /// place: 1 where a slot on this rank's node holds it.
  bool topology_gate() const { return m_topology; }
  const index_vector& experts_on_node() const { return m_on_node; }
  /// \brief This rank's choices in the last forward that go to experts off
  /// its node, after the topology-aware gate (-1 when it did not act).
  /// Counted when asked (a reduction and a wait on the default instance).
  long offnode_choices() const {
    if (!m_capped) return -1;
    auto idx = m_idx;
    auto on  = m_on_node;
    const int k = static_cast<int>(idx.extent(1));
    long off    = 0;
    Kokkos::parallel_reduce(
        "moka::gate_offnode_count", Kokkos::RangePolicy<execution_space>(0, static_cast<long>(m_T)),
        KOKKOS_LAMBDA(long t, long& acc) {
          for (int j = 0; j < k; ++j) acc += on(idx(t, j)) == 0 ? 1 : 0;
        },
        off);
    return off;
  }

  /// \brief Training (noise, jitter, random routing, bias updates) or evaluation.
  void set_training(bool training) { m_training = training; }
  bool training() const { return m_training; }
  /// \brief Gate balance loss + z-loss of the last forward (already weighted).
  double aux_loss() const { return m_balance_loss + m_z_loss; }
  /// \brief The weighted balance loss of the last forward.
  double balance_loss() const { return m_balance_loss; }
  /// \brief The weighted z-loss of the last forward.
  double z_loss() const { return m_z_loss; }

  /// \brief Expert of each (token, choice) of the last forward, [T, k].
  const index_matrix& expert_index() const { return m_idx; }
  /// \brief As expert_index(), with -1 where random routing dropped a choice.
  const index_matrix& routed_index() const { return m_route; }
  /// \brief Standard-normal noise of the noisy gate in the last forward, [T, E].
  const matrix& gate_noise() const { return m_noise; }
  /// \brief Switch jitter factors of the last forward, [T, d] (empty when off).
  const matrix& gate_jitter() const { return m_jitter; }
  /// \brief Uniforms of GShard random routing in the last forward, [T].
  const Kokkos::View<Scalar*, MemorySpace>& routing_uniforms() const { return m_rr; }
  /// \brief Per-expert selection bias (bias balancing), [E].
  const Kokkos::View<Scalar*, MemorySpace>& selection_bias() const { return m_sel_bias; }
  /// \brief Gate score of each (token, choice), [T, k].
  const matrix& scores() const { return m_score; }
  /// \brief Row of each (token, choice) in the expert buffer, or -1 if dropped, [T, k].
  const index_matrix& slots() const { return m_slot; }
  /// \brief Kept assignments per logical expert, [E].
  const index_vector& expert_counts() const { return m_counts; }
  /// \brief Capacity used by the last forward (T * k when dropless).
  long capacity() const { return m_capacity; }

  /// \name Implementation steps of forward / backward.
  /// Public only because nvcc cannot compile device lambdas inside private
  /// member functions; not part of the interface.
  /// @{
  void ensure_workspace(int T);
  void ensure_expert_workspace(long rows);
  void global_batch(int T);
  void plan_exchange(const execution_space& space);
  void route_to_slots(const execution_space& space);
  /// expert.gemm_batched: pads every local expert's rows to the largest
  /// count (m_pad), moving the slots and the slot offsets; no-op if not chosen.
  void pad_expert_rows(const execution_space& space);
  /// Zeroes the padding rows of \p rows (rows in the padded layout).
  template <class T>
  void zero_padding_rows(const execution_space& space, const Kokkos::View<T**, Kokkos::LayoutRight, MemorySpace>& rows);
  void shadow_route(const execution_space& space, const std::vector<long>& all);
  void shadow_weights(const execution_space& space);
  void shadow_reduce_grads(const execution_space& space);
  /// b1 and the activation (fp32 / fp64) of the expert-side rows [r0, r1).
  void activation_rows(const execution_space& space, long r0, long r1);
  /// The activation's backward (fp32 / fp64) of the rows [r0, r1).
  void activation_backward_rows(const execution_space& space, long r0, long r1);
  /// Smart scheduling: the EP exchange and the experts in peer groups.
  void scheduled_forward(const execution_space& space);
  matrix scheduled_backward(const execution_space& space);
  void expert_bias_add(const execution_space& space);
  /// \p out (b1's or b2's gradient) += the column sums of \p src (fp32 /
  /// fp64, or bf16) over each expert's rows, in chunks of bias_chunk rows.
  void expert_bias_grad(const execution_space& space, const matrix& src, const matrix& out);
  void expert_bias_grad(const execution_space& space, const bmatrix& src, const matrix& out);
  static constexpr int bias_chunk = 64;  ///< rows per partial sum of the bias gradients
  enum class Stage { up, down, down_backward, up_backward };
  void expert_gemm(const execution_space& space, Stage stage);
  void expert_gemm_bf16(const execution_space& space, Stage stage);
#ifdef KOKKOS_ENABLE_CUDA
  /// The fused epilogue of expert \p e's up GEMM (forward) or dh GEMM, whose rows start at \p row0.
  impl::GemmEpilogue epilogue(bool forward, int e, long row0) const;
#endif
  void prepare_bf16_forward(const execution_space& space);
  /// bf16 on one rank: the rows never leave the rank, so every row buffer
  /// between the dispatch and the combine is bf16 (no fp32 copies).
  bool rows_bf16() const { return m_cfg.bf16_compute && !m_tx.active(); }
  void gate_forward(const execution_space& space, const matrix& x);
  /// The gate's backward: weight gradients, and its part of dx, written
  /// into \p dx (true) or, for small gates (impl::gate_small_experts;
  /// neither noisy nor jittered), left to the undispatch pass, which sums
  /// m_dlogits m_gate_wt into dx with the expert rows (false).
  bool gate_backward(const execution_space& space, const matrix& dscore, const matrix& dx);
  /// @}

 private:

  MoEConfig m_cfg;
  std::shared_ptr<ProcessGroups> m_groups;
  // slices, local expert slots (owned + shadow), owned slots, shadow slots, local d_ff, d_ff_in
  int m_S = 1, m_L = 0, m_Lo = 0, m_M = 0, m_dffl = 0, m_dfil = 0;
  int m_ep_rank = 0;
  // Where the experts live. Not contiguous: the gate's choices are mapped
  // to slots (m_slot_route) before the slot assignment, so dispatch rows
  // go in slot order ((EP rank, local slot)) and counts per slot
  // (m_slot_counts) are mapped back to experts for expert_counts().
  Placement m_place;
  bool m_identity = true, m_replicated = false;
  index_vector m_expert_slot, m_slot_counts;
  index_matrix m_slot_route;
  std::shared_ptr<ReplicaGroups> m_replicas;
  // Replicated placement: experts' slots (m_rep_slot from m_rep_start[e]),
  // the first pass's expert-ordered slots and offsets, the replica split's
  // bases and totals per expert, and the second pass's workspace.
  index_vector m_rep_start, m_rep_slot, m_expert_offsets;
  index_matrix m_expert_row;
  Kokkos::View<long*, MemorySpace> m_rep_base;
  typename Kokkos::View<long*, MemorySpace>::HostMirror m_rep_base_host;
  impl::SlotWork<MemorySpace> m_slot_work2;
  // Dynamic shadowing: the rule, this step's shadowed experts, each
  // expert's slot for this step (owner's, or the local shadow slot), the
  // gradient staging of one slot, and the bytes moved.
  ShadowRule m_shadow_rule;
  std::vector<int> m_shadowed;
  index_vector m_shadow_target;
  typename index_vector::HostMirror m_shadow_target_host;
  Kokkos::View<Scalar*, MemorySpace> m_shadow_stage;
  long m_shadow_bytes = 0;
  std::vector<int> m_h_expert_offsets;
  std::vector<int> m_rep_start_host;
  params_type m_params, m_grads;
  // zero_grad() left W1 and W2's gradients to the next backward (beta 0).
  mutable bool m_wgrad_zero = false;
  void settle_grads() const;
  // Device tables of m_place (expert -> first slot, replica slots) and the replica groups.
  void apply_placement();
  // Saved by forward for backward. Dispatch side (this rank's tokens, rows
  // ordered by destination expert): xs, ys, dys, dxs. Expert side (rows the
  // local experts process): xe, hpre, h, ye, dye, dh, dhpre, dxe; on one
  // rank without slicing the two sides are the same Views.
  matrix m_x, m_gin, m_jitter, m_clean, m_raw, m_std, m_noise, m_logits, m_probs, m_score, m_xs, m_ys;
  matrix m_xe, m_hpre, m_h, m_ye, m_dye, m_ye_buf;
  index_matrix m_idx, m_route, m_slot, m_thr;
  matrix m_dys, m_dh, m_dhpre, m_dxe, m_dscore;  // backward workspace
  // bf16 operands and intermediates (bf16_compute), expert side: the GEMMs
  // write the pre-activation (without b1) and dh in bf16, so the
  // elementwise kernels around them move half the bytes of fp32.
  bmatrix m_xs_b, m_hpre_b, m_h_b, m_dys_b, m_dh_b, m_dhpre_b;
  // bf16 on one rank (rows_bf16()): the expert outputs (without b2, which
  // the combine adds) and the gradient of the expert rows' inputs, in bf16.
  bmatrix m_ye_b, m_dxe_b;
  // bf16: the backward's gradients alias the forward's buffers (dh -> h,
  // dhpre -> hpre or h, dys and dxe -> ye on one rank) during backward
  // only; m_saved says the forward's values are still there.
  bool m_saved = false;
  btensor3 m_w1_b, m_w2_b;                     // bf16 copies of the expert weights
  // Fused epilogues (bf16, gelu_tanh, expert biases, expert.gemm_epilogue): b1 in bf16
  // and cuBLASLt's workspace; the GELU input (b1 included) is kept in
  // m_hpre_b.
  bool m_fused = false;
  bmatrix m_b1_b;
  Kokkos::View<char*, MemorySpace> m_lt_work;
#ifdef KOKKOS_ENABLE_CUDA
  // expert.gemm_streams > 1, or 0 with 16 or more local experts (bf16, no
  // fused epilogues): the streams the expert GEMMs of a stage are spread
  // over; with 0 (m_streams_auto) only for stages of enough rows per expert.
  std::shared_ptr<impl::StreamFan> m_fan;
#endif
  bool m_streams_auto = false;
  // expert.gemm_grouped (bf16): one grouped GEMM per kind of expert GEMM;
  // the kinds cuBLAS refused (bit per kind) loop over the experts instead.
  GemmChoice m_grouped = GemmChoice::off;
  unsigned m_grouped_refused = 0;
  // expert.gemm_batched: the padded layout of the last forward, m_pad rows
  // per local expert (0: none); the real counts' range, for the zeroing.
  GemmChoice m_batched = GemmChoice::off;
  long m_pad = 0, m_pad_min_count = 0;
  ExpertGemms m_last_gemms;
  Kokkos::View<std::uintptr_t*, MemorySpace> m_gptr;  // operand addresses
  Kokkos::View<Scalar*, MemorySpace> m_rr, m_sel_bias, m_bal_grad, m_imp_grad, m_load_grad;
  index_vector m_trace_cum;
  // Topology-aware gate: experts with a slot on this rank's node, the
  // off-node numbering workspace, and the choices moved in the last forward.
  bool m_topology = false;
  index_vector m_on_node;
  Kokkos::View<long*, MemorySpace> m_off_base;
  bool m_capped = false;  // the last forward's gate was capped
  // Trace gate: every row of its layer; forward i of training uses row
  // (m_trace_row0 + i stride) mod rows (m_trace_pos counts them).
  std::vector<std::vector<long>> m_trace_rows;
  long m_trace_row0 = 0, m_trace_pos = 0;
  bool m_training = true;
  bool m_bf16_managed = false;
  std::uint64_t m_seed = 0, m_counter = 0;
  double m_balance_loss = 0, m_z_loss = 0;
  index_vector m_counts, m_offsets;  // m_offsets: per slot
  impl::SlotWork<MemorySpace> m_slot_work;  // workspace of the slot assignment
  std::vector<int> m_h_offsets;  // host copy of the dispatch-side slot offsets [E + 1]
  long m_rows = 0, m_capacity = 0;
  int m_T = -1;
  long m_T_global = 0, m_tok0 = 0;
  // The token exchange (it owns its plan and buffers). Its segments, the
  // expert-side offsets and the bias-sum chunk starts share one device
  // allocation, m_plan_dev, uploaded from m_plan_host in one copy per forward.
  TokenExchange<Scalar, MemorySpace> m_tx;
  index_vector m_plan_dev;
  typename index_vector::HostMirror m_plan_host;
  std::vector<long> m_e_off;  // [L + 1]: expert-side offsets (host)
  long m_rows_e = 0;
  index_vector m_e_offsets, m_row_expert;  // expert-side offsets [L + 1] and expert of each row
  Kokkos::View<long*, MemorySpace> m_cap_base, m_routed;  // global capacity
  index_vector m_chunk_start;  // [L + 1]: first bias-sum chunk of each local expert
  long m_chunks = 0;           // bias-sum chunks in all
  matrix m_colsum_work;  // partial column sums of the bias gradients
  // Gate workspace kept across steps: jittered input, backward buffers,
  // per-expert statistics.
  matrix m_gate_in, m_dprob, m_dlogits, m_dclean, m_draw;
  matrix m_gate_wt;             // [E, d]: the gate weights transposed (small gates: impl::gate_logits)
  bool m_gate_jittered = false;  // the last forward's gate input was x times the Switch jitter
  Kokkos::View<double*, MemorySpace> m_stat_a, m_stat_b;
  Kokkos::View<long*, MemorySpace> m_sel_count;
};

}  // namespace moka

#include <moka/moe/impl/MoELayer_impl.hpp>
