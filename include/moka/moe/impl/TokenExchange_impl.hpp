#pragma once
// Template bodies of moka::TokenExchange: the plan (counts, blocks,
// pieces, the direct exchange's puts and symmetric windows) and the moves
// there and back (included by TokenExchange.hpp).

#include <moka/core/Log.hpp>
#include <moka/core/Profiling.hpp>

#include <algorithm>
#include <numeric>
#include <string>
#include <vector>

namespace moka {

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
TokenExchange<Scalar, MemorySpace>::TokenExchange(std::shared_ptr<ProcessGroups> groups, int d_model,
                                                  int local_slots, index_vector segments)
    : m_groups(std::move(groups)), m_d(d_model), m_L(local_slots), m_segments(std::move(segments)) {
  m_active = m_groups && (m_groups->ep_size() > 1 || m_groups->slice_size() > 1);
}

template <class Scalar, class MemorySpace>
typename TokenExchange<Scalar, MemorySpace>::matrix& TokenExchange<Scalar, MemorySpace>::buffer(Buffer b) {
  switch (b) {
    case Buffer::expert_in: return m_expert_in;
    case Buffer::expert_grad: return m_expert_grad;
    case Buffer::dispatch_out: return m_dispatch_out;
    case Buffer::dispatch_grad: break;
  }
  return m_dispatch_grad;
}

template <class Scalar, class MemorySpace>
bool TokenExchange<Scalar, MemorySpace>::decide_direct() {
  if (m_direct >= 0) return m_direct == 1;
  // The same on every rank: the deck, the layout, the build and the
  // communicator's collective answer.
  const std::string& mode = m_groups->config().exchange_direct;
  std::string why;
  if (mode == "off") why = "off";
  else if (memory_kind_of<MemorySpace>() != MemoryKind::device) why = "the layer's rows are in host memory";
  else if (m_groups->ep().backend() != CommBackend::nccl) why = "the EP group's comm.backend is mpi";
  else if (wants_schedule())
    why = "smart scheduling (comm.schedule_degree > 1) sends the exchange as messages in peer groups";
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
void TokenExchange<Scalar, MemorySpace>::plan_direct(const std::vector<long>& cnt,
                                                     const std::vector<int>& slot_offsets) {
  // Every rank's rows per slot: all[q N + s] (rank q's rows for slot s, on
  // EP rank s / L as its local slot s % L; N = P L slots). With them each rank knows where its rows land on every peer,
  // both ways.
  const int P = m_groups->ep_size(), L = m_L, E = P * m_L, me = m_groups->ep_rank();
  const long d = m_d;
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
      m_put_there.push_back({q, long(slot_offsets[q * L + l]) * d, at[me * L + l] * d, cnt[q * L + l] * d});
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
  const long ep_parts = m_groups->slice_size() > 1 ? 1 : 2;
  m_expert_in = m_expert_grad = m_dispatch_out = m_dispatch_grad = m_ep_land = matrix();
  m_window.reset();
  m_window = m_groups->ep().make_window(std::size_t((ep_parts * m_win_ep + 2 * m_win_rows) * d) * sizeof(Scalar));
  Scalar* base = static_cast<Scalar*>(m_window->data());
  if (m_groups->slice_size() > 1) {
    m_ep_land = matrix(base, m_win_ep, d);
  } else {
    m_expert_in   = matrix(base, m_win_ep, d);
    m_expert_grad = matrix(base + m_win_ep * d, m_win_ep, d);
  }
  m_dispatch_out  = matrix(base + ep_parts * m_win_ep * d, m_win_rows, d);
  m_dispatch_grad = matrix(base + (ep_parts * m_win_ep + m_win_rows) * d, m_win_rows, d);
}

template <class Scalar, class MemorySpace>
void TokenExchange<Scalar, MemorySpace>::direct_put(const execution_space& space,
                                               const std::vector<Communicator::Put>& puts, const matrix& from,
                                               const matrix& to) {
  // \p to is one of the window's four parts, at the same offset on every rank.
  const long base = static_cast<long>(to.data() - static_cast<Scalar*>(m_window->data()));
  m_put_now       = puts;
  for (auto& p : m_put_now) p.dst += base;
  m_groups->ep().put(space, *m_window, from.data(), m_put_now, data_type_of<Scalar>());
}

template <class Scalar, class MemorySpace>
void TokenExchange<Scalar, MemorySpace>::align_for_timing(const execution_space& space) const {
  // Only when regions fence (stage breakdowns, the exchange benchmark): all
  // ranks enter the exchange together, so its timer holds the exchange and
  // not the wait for slower ranks.
  if (!fence_regions() || !m_groups) return;
  space.fence();
  MPI_Barrier(m_groups->world().mpi_comm());
}

template <class Scalar, class MemorySpace>
void TokenExchange<Scalar, MemorySpace>::plan(const std::vector<int>& slot_offsets, int* segments_host) {
  const int L = m_L;
  const long d = m_d;
  // Dispatch rows per slot (slot p L + l: EP rank p's local slot l).
  const int P = m_groups ? m_groups->ep_size() : 1;
  MOKA_REQUIRE(slot_offsets.size() == std::size_t(P) * L + 1, "moka::TokenExchange::plan: ",
               slot_offsets.size(), " slot offsets for ", P, " x ", L, " slots");
  m_rows = slot_offsets.back();
  std::vector<long> cnt(std::size_t(P) * L);
  for (std::size_t s = 0; s < cnt.size(); ++s) cnt[s] = slot_offsets[s + 1] - slot_offsets[s];
  // EP stage: counts per (peer, local slot) received; the rows of peer p's
  // slot l land at (local slot l, source rank p).
  m_ep_counts.assign(std::size_t(P) * L, 0);
  m_coalesce = false;
  if (P > 1 && decide_direct()) {
    plan_direct(cnt, slot_offsets);
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
    m_coalesce = L > 1 && double(most) * d * sizeof(Scalar) <= limit && !wants_schedule();
  } else {
    m_ep_counts = cnt;
  }
  std::vector<long> ep_at;
  impl::expert_major(m_ep_counts, P, L, m_ep_off, ep_at);
  m_rows_ep = m_ep_off[L];
  m_sched   = wants_schedule() && m_direct != 1 ? std::min(m_groups->config().schedule_degree, P) : 1;
  m_ep_at   = ep_at;
  m_ep_send.clear();
  m_ep_recv.clear();
  if (m_direct == 1) {
    // The puts were made by plan_direct.
  } else if (m_coalesce) {
    // Peer p's rows are contiguous on the sending side ((destination rank,
    // local expert) order); they land in the staging buffer at srow.
    int* seg  = segments_host;
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
      m_ep_send.push_back({p, long(slot_offsets[p * L]) * d, sent * d});
      m_ep_recv.push_back({p, srow * d, got * d});
      srow += got;
    }
  } else {
    for (int p = 0; p < P; ++p)
      for (int l = 0; l < L; ++l) {
        m_ep_send.push_back({p, long(slot_offsets[p * L + l]) * d, cnt[p * L + l] * d});
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
}

template <class Scalar, class MemorySpace>
bool TokenExchange<Scalar, MemorySpace>::wants_schedule() const {
  return m_sched_ok && m_groups && m_groups->ep_size() > 1 && m_groups->slice_size() == 1 &&
         m_groups->config().schedule_degree > 1;
}

template <class Scalar, class MemorySpace>
int TokenExchange<Scalar, MemorySpace>::phase_of(int distance) const {
  return static_cast<int>(long(distance) * m_sched / m_groups->ep_size());
}

template <class Scalar, class MemorySpace>
std::vector<Communicator::Block> TokenExchange<Scalar, MemorySpace>::in_phase(
    const std::vector<Communicator::Block>& list, int g, bool sending) const {
  // Sending to p: distance p - rank; receiving from p: rank - p (mod P).
  const int P = m_groups->ep_size(), me = m_groups->ep_rank();
  std::vector<Communicator::Block> out;
  for (const auto& b : list) {
    const int dist = sending ? (b.peer - me + P) % P : (me - b.peer + P) % P;
    if (phase_of(dist) == g) out.push_back(b);
  }
  return out;
}

template <class Scalar, class MemorySpace>
typename TokenExchange<Scalar, MemorySpace>::matrix TokenExchange<Scalar, MemorySpace>::prepare(Buffer b, long rows) {
  matrix& m = buffer(b);
  const bool expert_side = b == Buffer::expert_in || b == Buffer::expert_grad;
  impl::grow_rows(m, rows, m_d, expert_side ? "expert_rows" : "dispatch_rows");
  return m;
}

template <class Scalar, class MemorySpace>
std::unique_ptr<Communicator::Pending> TokenExchange<Scalar, MemorySpace>::start_there(const execution_space& space,
                                                                                       const matrix& dispatch,
                                                                                       const matrix& to, int g) {
  ScopedRegion region("moka::MoELayer::exchange");
  return m_groups->ep().start_blocks(space, dispatch.data(), in_phase(m_ep_send, g, true), to.data(),
                                     in_phase(m_ep_recv, g, false), data_type_of<Scalar>(),
                                     memory_kind_of<MemorySpace>(), g);
}

template <class Scalar, class MemorySpace>
std::unique_ptr<Communicator::Pending> TokenExchange<Scalar, MemorySpace>::start_back(const execution_space& space,
                                                                                      const matrix& expert,
                                                                                      const matrix& to, int g) {
  // The rows that came from phase g's sources go back to them; this rank's
  // rows return from the peers it sent them to in phase g.
  ScopedRegion region("moka::MoELayer::exchange_back");
  return m_groups->ep().start_blocks(space, expert.data(), in_phase(m_ep_recv, g, false), to.data(),
                                     in_phase(m_ep_send, g, true), data_type_of<Scalar>(),
                                     memory_kind_of<MemorySpace>(), 500 + g);
}

template <class Scalar, class MemorySpace>
std::vector<typename TokenExchange<Scalar, MemorySpace>::Rows> TokenExchange<Scalar, MemorySpace>::phase_rows(
    int g) const {
  const int P = m_groups->ep_size(), me = m_groups->ep_rank(), L = m_L;
  std::vector<Rows> out;
  for (int l = 0; l < L; ++l)
    for (int p = 0; p < P; ++p) {
      const long n = m_ep_counts[std::size_t(p) * L + l];
      if (n > 0 && phase_of((me - p + P) % P) == g) out.push_back({l, m_ep_at[std::size_t(p) * L + l], n});
    }
  return out;
}

template <class Scalar, class MemorySpace>
typename TokenExchange<Scalar, MemorySpace>::matrix TokenExchange<Scalar, MemorySpace>::forward(
    const execution_space& space, const matrix& dispatch, Buffer to) {
  if (!m_active) return dispatch;
  matrix& buf = buffer(to);
  align_for_timing(space);
  ScopedRegion region("moka::MoELayer::exchange");
  const int d = m_d;
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
typename TokenExchange<Scalar, MemorySpace>::matrix TokenExchange<Scalar, MemorySpace>::reverse(
    const execution_space& space, const matrix& expert, Buffer to) {
  if (!m_active) return expert;
  matrix& buf = buffer(to);
  align_for_timing(space);
  ScopedRegion region("moka::MoELayer::exchange_back");
  const int d = m_d;
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

}  // namespace moka
