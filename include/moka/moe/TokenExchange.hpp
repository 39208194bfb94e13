#pragma once
/// \file TokenExchange.hpp
/// \brief moka::TokenExchange: moves an MoE layer's dispatch rows to the
/// ranks holding their experts' slots and the expert outputs back, over the
/// EP group and then the expert-slicing group of moka::ProcessGroups.
///
/// Sides: the dispatch side holds this rank's rows in slot order ((EP rank,
/// local slot) of the moka::Placement, token order within a slot); the
/// expert side holds the rows the local slots process, ordered by (local
/// slot, slice peer, EP source rank, position). One plan per forward
/// (plan()) serves the four moves of a step: dispatch rows there
/// (forward), expert outputs back (reverse), and the same two for the
/// gradients in backward.
///
/// Three ways over the EP group, chosen per forward and the same on every
/// rank: direct puts into NCCL symmetric windows (comm.exchange_direct),
/// one message per peer through a staging buffer (coalesced, small
/// exchanges), or one block per (peer, slot). Messages above
/// comm.exchange_max_message_mb travel in pieces. Internal to MoELayer,
/// which owns one; usable alone by code that keeps the same conventions.

#include <moka/core/Core.hpp>
#include <moka/comm/Communicator.hpp>
#include <moka/moe/impl/MoEKernels.hpp>
#include <moka/parallel/ProcessGroups.hpp>

#include <memory>
#include <vector>

namespace moka {

template <class Scalar, class MemorySpace = memory_space>
class TokenExchange {
 public:
  using execution_space = typename MemorySpace::execution_space;
  using matrix          = Kokkos::View<Scalar**, Kokkos::LayoutRight, MemorySpace>;
  using index_vector    = Kokkos::View<int*, MemorySpace>;

  /// \brief Where a move's result lands (each kept across steps; with the
  /// direct exchange the four are parts of one symmetric window).
  enum class Buffer {
    expert_in,      ///< forward: dispatch rows on the expert side (xe)
    expert_grad,    ///< backward: output gradients on the expert side (dye)
    dispatch_out,   ///< forward: expert outputs back on the dispatch side (ys)
    dispatch_grad   ///< backward: input gradients back on the dispatch side (dxs)
  };

  TokenExchange() = default;
  /// \brief For rows of \p d_model columns and \p local_slots slots per EP
  /// rank. \p segments: a device view of at least 3 x EP x local_slots ints
  /// into which the caller uploads what plan() writes to its host side.
  TokenExchange(std::shared_ptr<ProcessGroups> groups, int d_model, int local_slots, index_vector segments);

  /// \brief Whether rows move at all (EP > 1 or slicing); when not, every
  /// move returns its input.
  bool active() const { return m_active; }
  /// \brief Plans one forward. \p slot_offsets [EP x L + 1]: where each
  /// slot's rows start on the dispatch side. \p segments_host: 3 x EP x L
  /// ints written here for the coalesced exchange (the caller uploads them
  /// to the device view given at construction before the first move).
  void plan(const std::vector<int>& slot_offsets, int* segments_host);
  /// \brief Expert-side offsets of the local slots [L + 1] and rows in all.
  const std::vector<long>& expert_offsets() const { return m_e_off; }
  long expert_rows() const { return m_rows_e; }
  /// \brief Dispatch rows to the expert side (\p to: expert_in or expert_grad).
  matrix forward(const execution_space& space, const matrix& dispatch, Buffer to);
  /// \brief Expert rows back to the dispatch side (\p to: dispatch_out or
  /// dispatch_grad); with slicing the slice peers' partial results are summed.
  matrix reverse(const execution_space& space, const matrix& expert, Buffer to);
  /// \brief Whether the last plan sends one message per peer through the staging buffer.
  bool coalesced() const { return m_coalesce; }
  /// \brief Whether the EP stage stores rows straight into the peers'
  /// buffers (known after the first plan).
  bool direct() const { return m_direct == 1; }
  /// \brief When regions fence (stage timings): a barrier, so a timed stage
  /// holds its own work and not the wait for slower ranks.
  void align_for_timing(const execution_space& space) const;

  /// \name Smart scheduling (comm.schedule_degree = G > 1; EP > 1, no
  /// slicing, messages). Peers are grouped by ring distance: phase g holds
  /// the peers at distances d with floor(d G' / P) = g (G' = min(G, P)),
  /// sending to rank + d and receiving from rank - d, so both ends of every
  /// pair are in the same phase. Each move of a phase is begun with
  /// start_*() and completed by the returned handle's wait().
  /// @{
  /// Whether the owner can compute in phases (MoELayer: fp32 / fp64
  /// layers); without it comm.schedule_degree is ignored. Before the first plan.
  void allow_schedule(bool on) { m_sched_ok = on; }
  /// Whether the last plan is scheduled, and its phases.
  bool scheduled() const { return m_sched > 1; }
  int phases() const { return m_sched; }
  /// A result buffer grown to \p rows rows (the scheduled moves write into it piece by piece).
  matrix prepare(Buffer b, long rows);
  /// Phase \p g's dispatch rows to their experts' side, into \p to.
  std::unique_ptr<Communicator::Pending> start_there(const execution_space& space, const matrix& dispatch,
                                                     const matrix& to, int g);
  /// Phase \p g's expert-side rows (from the phase's sources) back to them, into \p to.
  std::unique_ptr<Communicator::Pending> start_back(const execution_space& space, const matrix& expert,
                                                    const matrix& to, int g);
  /// The expert-side rows that phase \p g brings: (local slot, first row, rows), by slot.
  struct Rows {
    int slot;
    long first, count;
  };
  std::vector<Rows> phase_rows(int g) const;
  /// @}

  /// \name Implementation (public for nvcc's device lambdas).
  /// @{
  bool decide_direct();
  void plan_direct(const std::vector<long>& cnt, const std::vector<int>& slot_offsets);
  void direct_put(const execution_space& space, const std::vector<Communicator::Put>& puts, const matrix& from,
                  const matrix& to);
  matrix& buffer(Buffer b);
  /// @}

 private:
  std::shared_ptr<ProcessGroups> m_groups;
  bool m_active = false;
  int m_d = 0, m_L = 0;
  long m_rows = 0;                // dispatch-side rows of this plan
  std::vector<long> m_ep_counts;  // [P * L]: rows from EP peer p for local slot l
  std::vector<long> m_sl_counts;  // [S * L]: rows of slice peer s for local slot l
  // Blocks (elements) of the exchanges: EP there (send, recv; back swaps
  // them), slice gather (send, recv; back sends recv's blocks) and the
  // slice partials' landing places.
  std::vector<Communicator::Block> m_ep_send, m_ep_recv, m_sl_send, m_sl_recv, m_sl_back;
  // Coalesced EP exchange: one message per peer through m_stage (rows in
  // (source rank, local slot) order), moved to (local slot, source rank)
  // order by the segments [3 P L]: (staging row, expert-side row, rows).
  bool m_coalesce = false;
  matrix m_stage, m_buf_b, m_buf_c;
  index_vector m_segments;
  // The four result buffers (grow-only).
  matrix m_expert_in, m_expert_grad, m_dispatch_out, m_dispatch_grad;
  // Direct EP exchange (comm.exchange_direct): the EP stage's receive
  // buffers are parts of one symmetric window, the same size on every EP
  // rank: with S = 1 expert_in and expert_grad (up to m_win_ep rows), with
  // S > 1 the one landing part m_ep_land (the slice stage gathers from it),
  // then dispatch_out and dispatch_grad (up to m_win_rows); the puts there
  // and back, with element offsets within a part.
  int m_direct = -1;  // -1 not decided yet, 0 no, 1 yes
  std::unique_ptr<SymmetricWindow> m_window;
  matrix m_ep_land;
  long m_win_ep = 0, m_win_rows = 0;
  std::vector<Communicator::Put> m_put_there, m_put_back, m_put_now;
  std::vector<long> m_ep_off;  // [L + 1]: slot offsets after the EP stage
  std::vector<long> m_e_off;   // [L + 1]: expert-side offsets (after slicing)
  long m_rows_ep = 0, m_rows_e = 0;
  // Smart scheduling: phases of this plan (1: not scheduled), where each
  // (source rank, local slot) block lands on the expert side, and the
  // phase of a peer by its distance.
  int m_sched = 1;
  bool m_sched_ok = false;
  bool wants_schedule() const;
  std::vector<long> m_ep_at;
  int phase_of(int distance) const;
  std::vector<Communicator::Block> in_phase(const std::vector<Communicator::Block>& list, int g, bool sending) const;
};

}  // namespace moka

#include <moka/moe/impl/TokenExchange_impl.hpp>
