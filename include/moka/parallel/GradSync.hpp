#pragma once
/// \file GradSync.hpp
/// \brief Gradient synchronisation by tag: each parameter carries the group
/// its gradient is summed over; gradients are summed in coalesced buckets
/// (one all-reduce per bucket), and the global gradient norm counts every
/// expert once.
///
/// Convention: after backward every rank holds its share of the gradient of
/// the whole batch's loss (MoELayer's gradients are shares; the loss's dy is
/// scaled by the whole batch's size), so synchronisation is a plain sum.

#include <moka/core/Core.hpp>
#include <moka/parallel/ParamTag.hpp>
#include <moka/parallel/ProcessGroups.hpp>
#include <moka/parallel/ReplicaGroups.hpp>
#include <moka/core/Profiling.hpp>
#include <moka/core/impl/Math.hpp>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

namespace moka {

namespace impl {
/// Sums each replicated slot of every tensor of \p grads (each [L slots,
/// ...], slot-major, the experts of one layer) over the expert's replicas
/// in the EP group \p ep: every holder sends its parts to the other holders
/// in one exchange (the slots' parts of all tensors packed together; a
/// pair's blocks ordered by expert), then adds the parts in rank order, so
/// every replica holds bitwise the same sum. Collective over \p ep; the
/// staging buffers grow as needed.
template <class Exec, class Scalar, class MemorySpace, class GradView>
void sum_over_replicas(const Exec& space, Communicator& ep, const ReplicaGroups& r, const std::vector<GradView>& grads,
                       Kokkos::View<Scalar*, MemorySpace>& send_buf, Kokkos::View<Scalar*, MemorySpace>& recv_buf,
                       Kokkos::View<long*, MemorySpace>& table_buf) {
  ScopedRegion region("moka::GradSync::replicas");
  const int me = ep.rank();
  const int L  = r.slots_per_rank;
  std::vector<long> n(grads.size()), at(grads.size() + 1, 0);  // per tensor: elements per slot, offset in a chunk
  for (std::size_t p = 0; p < grads.size(); ++p) {
    n[p]      = static_cast<long>(grads[p].extent(0)) / L;
    at[p + 1] = at[p] + n[p];
  }
  const long chunk = at.back();
  std::vector<int> order;
  for (int l = 0; l < L; ++l)
    if (r.holders[l].size() > 1) order.push_back(l);
  std::sort(order.begin(), order.end(), [&](int a, int b) { return r.expert[a] < r.expert[b]; });
  // Send: one chunk per replicated slot (sent to each other holder);
  // receive: one chunk per (slot, other holder). Table per replicated slot:
  // slot, holders H, then H sources (-1: own, else a chunk offset in the
  // receive buffer), in rank order.
  std::vector<Communicator::Block> sends, recvs;
  std::vector<long> table;
  long sent = 0, got = 0;
  for (int l : order) {
    table.push_back(l);
    table.push_back(static_cast<long>(r.holders[l].size()));
    for (const auto& h : r.holders[l]) {
      if (h.rank == me) {
        table.push_back(-1);
        continue;
      }
      sends.push_back({h.rank, sent, chunk});
      recvs.push_back({h.rank, got, chunk});
      table.push_back(got);
      got += chunk;
    }
    sent += chunk;
  }
  auto grow = [](Kokkos::View<Scalar*, MemorySpace>& v, long size, const char* label) {
    if (static_cast<long>(v.extent(0)) < size)
      v = Kokkos::View<Scalar*, MemorySpace>(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string(label)), size);
  };
  grow(send_buf, sent, "moka::replica_grad_send");
  grow(recv_buf, got, "moka::replica_grad_recv");
  for (std::size_t k = 0, s = 0; k < table.size(); k += 2 + table[k + 1], ++s) {
    const long l = table[k];
    for (std::size_t p = 0; p < grads.size(); ++p)
      Kokkos::deep_copy(space, Kokkos::subview(send_buf, std::make_pair(long(s) * chunk + at[p], long(s) * chunk + at[p + 1])),
                        Kokkos::subview(grads[p], std::make_pair(l * n[p], (l + 1) * n[p])));
  }
  ep.alltoallv_blocks(space, send_buf.data(), sends, recv_buf.data(), recvs, data_type_of<Scalar>(),
                      memory_kind_of<MemorySpace>());
  if (table.empty()) return;
  if (table_buf.extent(0) < table.size())
    table_buf = Kokkos::View<long*, MemorySpace>(
        Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("moka::replica_table")), table.size());
  auto dev = table_buf;
  Kokkos::View<const long*, Kokkos::HostSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>> host(table.data(),
                                                                                              table.size());
  Kokkos::deep_copy(space, Kokkos::subview(dev, std::make_pair(std::size_t(0), table.size())), host);
  auto stage = recv_buf;
  for (std::size_t p = 0; p < grads.size(); ++p) {
    auto g           = grads[p];
    const long np    = n[p], off = at[p];
    for (std::size_t k = 0; k < table.size(); k += 2 + table[k + 1]) {
      const long base = table[k] * np, first = static_cast<long>(k) + 2, H = table[k + 1];
      Kokkos::parallel_for(
          "moka::replica_sum", Kokkos::RangePolicy<Exec>(space, 0, np), KOKKOS_LAMBDA(long i) {
            Scalar acc = 0;
            for (long h = 0; h < H; ++h) {
              const long src = dev(first + h);
              acc += src < 0 ? g(base + i) : stage(src + off + i);
            }
            g(base + i) = acc;
          });
    }
  }
  space.fence();  // the table's host copy goes out of scope
}
}  // namespace impl

/// \brief A parameter tensor and its gradient, flattened, with its tag.
template <class Scalar, class MemorySpace>
struct ParamRef {
  using flat = Kokkos::View<Scalar*, MemorySpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  std::string name;
  flat param, grad;
  ParamTag tag = ParamTag::dense;
  bf16* bf16_copy = nullptr;  ///< a bf16 copy of param the optimizer keeps equal (mixed precision), or nullptr
  /// Expert tensors ([slots, ...], slot-major): the replicas of the experts
  /// on this rank's slots (nullptr: no replicas). Their gradients are
  /// summed among the replicas after the EDP sum, and the norm counts each
  /// logical expert once.
  std::shared_ptr<const ReplicaGroups> replicas;
  /// Extents of the tensor on this rank (expert tensors: [slots, ...] of
  /// this rank's part), for checkpoints.
  std::vector<long> shape;
};

/// \brief The extents of View \p v, as a vector.
template <class V>
std::vector<long> extents_of(const V& v) {
  std::vector<long> s;
  for (unsigned r = 0; r < V::rank; ++r) s.push_back(static_cast<long>(v.extent(r)));
  return s;
}

/// \brief Sums gradients over their tags' groups and computes the global norm.
template <class Scalar, class MemorySpace = memory_space>
class GradSync {
 public:
  using execution_space = typename MemorySpace::execution_space;
  using flat            = Kokkos::View<Scalar*, MemorySpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;

  /// \brief Plans the buckets: parameters of a group in order, a bucket
  /// closed when it would pass \p bucket_mb (a larger tensor is a bucket of
  /// its own, reduced in place). \p groups may be nullptr (one rank).
  GradSync(std::shared_ptr<ProcessGroups> groups, std::vector<ParamRef<Scalar, MemorySpace>> params,
           double bucket_mb)
      : m_groups(std::move(groups)), m_params(std::move(params)) {
    MOKA_REQUIRE(bucket_mb > 0, "comm.bucket_mb = ", bucket_mb, " must be positive");
    const std::size_t limit = static_cast<std::size_t>(bucket_mb * 1024 * 1024 / sizeof(Scalar)) + 1;
    for (int g = 0; g < 3; ++g) {
      Bucket cur;
      cur.group = g;
      for (std::size_t i = 0; i < m_params.size(); ++i) {
        if (group_of(m_params[i].tag) != g) continue;
        const std::size_t n = m_params[i].grad.extent(0);
        if (!cur.members.empty() && cur.size + n > limit) {
          m_buckets.push_back(cur);
          cur = Bucket{};
          cur.group = g;
        }
        cur.members.push_back(i);
        cur.size += n;
      }
      if (!cur.members.empty()) m_buckets.push_back(cur);
    }
    for (auto& b : m_buckets)
      if (b.members.size() > 1)
        b.buffer = Kokkos::View<Scalar*, MemorySpace>(
            Kokkos::view_alloc(Kokkos::WithoutInitializing, "moka::grad_bucket"), b.size);
  }

  /// \brief Sums every gradient over its tag's group (dense: world; gate:
  /// the gate group; expert: EDP group). Ordered on \p space (NCCL) or complete on return (MPI).
  void sync(const execution_space& space) {
    if (!m_groups) return;
    ScopedRegion region("moka::GradSync::sync");
    for (auto& b : m_buckets) {
      Communicator& comm = b.group == 0 ? m_groups->world() : (b.group == 1 ? m_groups->edp() : m_groups->gate());
      if (comm.size() == 1) continue;
      if (b.members.size() == 1) {
        allreduce_sum(comm, space, m_params[b.members[0]].grad);
        continue;
      }
      pack(space, b, true);
      allreduce_sum(comm, space, b.buffer);
      pack(space, b, false);
    }
    // Replicas: one exchange per layer (its expert tensors share one ReplicaGroups).
    std::vector<const ReplicaGroups*> done;
    for (const auto& p : m_params) {
      if (!p.replicas || !p.replicas->placement_replicated) continue;
      if (std::find(done.begin(), done.end(), p.replicas.get()) != done.end()) continue;
      done.push_back(p.replicas.get());
      std::vector<flat> grads;
      for (const auto& q : m_params)
        if (q.replicas.get() == p.replicas.get()) grads.push_back(q.grad);
      impl::sum_over_replicas(space, m_groups->ep(), *p.replicas, grads, m_replica_send, m_replica_recv, m_replica_table);
    }
  }

  /// \brief sqrt of the sum of squared gradients of the whole model, every
  /// expert counted once (expert norms summed over the MoE group, b2 from
  /// the first slice rank only); the same on every rank. Call after sync().
  double global_norm(const execution_space& space) const {
    double dense = 0, expert = 0;
    const bool first_slice = !m_groups || m_groups->slice_rank() == 0;
    for (const auto& p : m_params) {
      if (p.tag == ParamTag::expert_replicated && !first_slice) continue;
      double s = 0;
      if (p.replicas && p.replicas->any) {
        // A replicated expert counts at its first holder only.
        const ReplicaGroups& r = *p.replicas;
        const long n           = static_cast<long>(p.grad.extent(0)) / r.slots_per_rank;
        for (int l = 0; l < r.slots_per_rank; ++l)
          if (r.counted[l]) s += impl::sum_of_squares(space, Kokkos::subview(p.grad, std::make_pair(l * n, (l + 1) * n)));
      } else {
        s = impl::sum_of_squares(space, p.grad);
      }
      (p.tag == ParamTag::expert || p.tag == ParamTag::expert_replicated ? expert : dense) += s;
    }
    if (m_groups && m_groups->moe().size() > 1) m_groups->moe().allreduce_host(&expert, 1);
    return std::sqrt(dense + expert);
  }

  /// \brief Number of all-reduce buckets (per step, over both groups).
  std::size_t bucket_count() const { return m_buckets.size(); }

  /// \name Implementation (public for nvcc's device lambdas).
  /// @{
  struct Bucket {
    int group = 0;  // 0: dense (world), 1: expert (EDP), 2: gate (gate group)
    std::vector<std::size_t> members;
    std::size_t size = 0;
    Kokkos::View<Scalar*, MemorySpace> buffer;
  };
  void pack(const execution_space& space, const Bucket& b, bool into_buffer) {
    std::size_t off = 0;
    for (std::size_t i : b.members) {
      auto g          = m_params[i].grad;
      auto buf        = b.buffer;
      const long base = static_cast<long>(off);
      if (into_buffer)
        Kokkos::parallel_for(
            "moka::grad_pack", Kokkos::RangePolicy<execution_space>(space, 0, g.extent(0)),
            KOKKOS_LAMBDA(long j) { buf(base + j) = g(j); });
      else
        Kokkos::parallel_for(
            "moka::grad_unpack", Kokkos::RangePolicy<execution_space>(space, 0, g.extent(0)),
            KOKKOS_LAMBDA(long j) { g(j) = buf(base + j); });
      off += g.extent(0);
    }
  }
  static int group_of(ParamTag t) {
    switch (t) {
      case ParamTag::dense: return 0;
      case ParamTag::expert:
      case ParamTag::expert_replicated: return 1;
      case ParamTag::gate: return 2;
      case ParamTag::none: return -1;
    }
    return -1;
  }
  /// @}

 private:
  std::shared_ptr<ProcessGroups> m_groups;
  std::vector<ParamRef<Scalar, MemorySpace>> m_params;
  std::vector<Bucket> m_buckets;
  Kokkos::View<Scalar*, MemorySpace> m_replica_send, m_replica_recv;
  Kokkos::View<long*, MemorySpace> m_replica_table;
};

}  // namespace moka
