#pragma once
// Template body of moka::migrate_experts (included by Migration.hpp).

#include <moka/core/Profiling.hpp>
#include <moka/moe/impl/MoEKernels.hpp>
#include <moka/parallel/GradSync.hpp>

#include <chrono>
#include <string>
#include <vector>

namespace moka {

namespace impl {
/// One per-slot field of an expert tensor: the tensor (slot-major, L slots).
template <class Scalar, class MemorySpace>
struct SlotField {
  Kokkos::View<Scalar*, MemorySpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>> data;
  long per_slot = 0;
};
}  // namespace impl

template <class Scalar, class MemorySpace>
MigrationStats migrate_experts(const typename MemorySpace::execution_space& space,
                               MoELayer<Scalar, MemorySpace>& layer, Optimizer<Scalar, MemorySpace>* optimizer,
                               const Placement& to, double staging_mb) {
  ScopedRegion region("moka::migrate_experts");
  using flat   = Kokkos::View<Scalar*, MemorySpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  using buffer = Kokkos::View<Scalar*, MemorySpace>;
  MOKA_REQUIRE(staging_mb > 0, "balance.migration_buffer_mb = ", staging_mb, " must be positive");
  const auto start = std::chrono::steady_clock::now();
  MigrationStats st;
  const Placement from = layer.placement();
  const int L          = layer.local_experts();
  // Every field an expert slot owns: parameter, gradient, moments, per
  // expert tensor (the gradients settled: a deferred zero_grad clears them first).
  std::vector<impl::SlotField<Scalar, MemorySpace>> fields;
  for (const auto& p : layer.parameters()) {
    if (p.tag != ParamTag::expert && p.tag != ParamTag::expert_replicated) continue;
    const long n = static_cast<long>(p.param.extent(0)) / L;
    fields.push_back({p.param, n});
    fields.push_back({p.grad, n});
    if (!optimizer) continue;
    const long i = optimizer->find(p.param.data());
    MOKA_REQUIRE(i >= 0, "moka::migrate_experts: the optimizer does not update the layer's '", p.name,
                 "' (register the layer's parameters() with it, or pass no optimizer)");
    const flat m = optimizer->first_moment(i), v = optimizer->second_moment(i);
    if (m.extent(0)) fields.push_back({m, n});
    if (v.extent(0)) fields.push_back({v, n});
  }
  long slot_elems = 0;
  for (const auto& f : fields) slot_elems += f.per_slot;
  const long budget = static_cast<long>(staging_mb * 1048576.0 / sizeof(Scalar));
  const MigrationPlan plan = MigrationPlan::make(from, to, slot_elems, budget);
  st.moves        = static_cast<long>(plan.moves.size());
  st.remote_moves = plan.remote_moves();
  st.bytes        = st.remote_moves * slot_elems * static_cast<long>(sizeof(Scalar));
  st.rounds       = plan.rounds;
  st.over_budget  = plan.over_budget;
  {
    std::vector<long> out(from.ep_size(), 0), in(from.ep_size(), 0);
    for (const auto& m : plan.moves)
      if (m.from.rank != m.to.rank) {
        out[m.from.rank] += slot_elems;
        in[m.to.rank] += slot_elems;
      }
    for (int r = 0; r < from.ep_size(); ++r)
      st.max_rank_bytes = std::max(st.max_rank_bytes, std::max(out[r], in[r]) * long(sizeof(Scalar)));
  }
  const ProcessGroups* groups = layer.groups();
  const int me                = groups ? groups->ep_rank() : 0;
  // Gradients being accumulated: while replicas hold parts of an expert's
  // gradient (before GradSync sums them), the parts are summed first, so
  // every replica holds the whole and any of them can be the source; after
  // the move only each expert's first holder keeps it (below), so the sum
  // over the new replicas is the expert's gradient again.
  std::vector<flat> grads;
  for (const auto& p : layer.parameters())
    if (p.tag == ParamTag::expert || p.tag == ParamTag::expert_replicated) grads.push_back(p.grad);
  if (!plan.moves.empty() && !from.single_slot() && groups && groups->ep_size() > 1) {
    Kokkos::View<Scalar*, MemorySpace> send_buf, recv_buf;
    Kokkos::View<long*, MemorySpace> table;
    impl::sum_over_replicas(space, groups->ep(), *layer.replica_groups(), grads, send_buf, recv_buf, table);
  }
  buffer send, recv;
  for (int round = 0; round < plan.rounds; ++round) {
    std::vector<Communicator::Block> sends, recvs;
    std::vector<std::pair<long, Placement::Slot>> packs, unpacks;  // (buffer offset, slot)
    long s_off = 0, r_off = 0;
    for (const auto& m : plan.moves) {
      if (m.round != round) continue;
      if (m.from.rank == me) {
        sends.push_back({m.to.rank, s_off, slot_elems});
        packs.push_back({s_off, m.from});
        s_off += slot_elems;
      }
      if (m.to.rank == me) {
        recvs.push_back({m.from.rank, r_off, slot_elems});
        unpacks.push_back({r_off, m.to});
        r_off += slot_elems;
      }
    }
    if (static_cast<long>(send.extent(0)) < s_off)
      send = buffer(Kokkos::view_alloc(Kokkos::WithoutInitializing, "moka::migration_send"), s_off);
    if (static_cast<long>(recv.extent(0)) < r_off)
      recv = buffer(Kokkos::view_alloc(Kokkos::WithoutInitializing, "moka::migration_recv"), r_off);
    for (const auto& pk : packs) {
      long at = pk.first;
      for (const auto& f : fields) {
        const long b = pk.second.local * f.per_slot;
        Kokkos::deep_copy(space, Kokkos::subview(send, std::make_pair(at, at + f.per_slot)),
                          Kokkos::subview(f.data, std::make_pair(b, b + f.per_slot)));
        at += f.per_slot;
      }
    }
    if (groups && groups->ep_size() > 1) {
      groups->ep().alltoallv_blocks(space, send.data(), sends, recv.data(), recvs, data_type_of<Scalar>(),
                                    memory_kind_of<MemorySpace>());
    } else if (s_off > 0) {  // one rank: the moves are local, sent and received in the same order
      Kokkos::deep_copy(space, Kokkos::subview(recv, std::make_pair(0L, r_off)),
                        Kokkos::subview(send, std::make_pair(0L, s_off)));
    }
    for (const auto& up : unpacks) {
      long at = up.first;
      for (const auto& f : fields) {
        const long b = up.second.local * f.per_slot;
        Kokkos::deep_copy(space, Kokkos::subview(f.data, std::make_pair(b, b + f.per_slot)),
                          Kokkos::subview(recv, std::make_pair(at, at + f.per_slot)));
        at += f.per_slot;
      }
    }
  }
  layer.set_placement(to);
  if (!plan.moves.empty() && !to.single_slot()) {
    const ReplicaGroups& rg = *layer.replica_groups();
    for (int l = 0; l < L; ++l)
      if (!rg.counted[l])
        for (const auto& g : grads) {
          const long n = static_cast<long>(g.extent(0)) / L;
          Kokkos::deep_copy(space, Kokkos::subview(g, std::make_pair(l * n, (l + 1) * n)), Scalar(0));
        }
  }
  if (layer.config().bf16_compute && st.moves > 0) {
    // bf16(master) is what the optimizer writes: the moved copies, bit for bit.
    impl::convert_to_bf16(space, "moka::w1_to_bf16", layer.params().w1.data(), layer.bf16_w1().data(),
                          layer.bf16_w1().size());
    impl::convert_to_bf16(space, "moka::w2_to_bf16", layer.params().w2.data(), layer.bf16_w2().data(),
                          layer.bf16_w2().size());
  }
  space.fence();
  st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return st;
}

}  // namespace moka
