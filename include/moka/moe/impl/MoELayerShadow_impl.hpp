#pragma once
// Template bodies of moka::MoELayer's dynamic shadowing (FasterMoE;
// included by MoELayer_impl.hpp): which experts a step shadows and where
// their rows go, the broadcast of their parameters into the shadow slots,
// and the reduction of the shadow slots' gradients to the owners.

#include <moka/comm/Communicator.hpp>

#include <algorithm>
#include <vector>

namespace moka {

namespace impl {
/// Slot \p l of a slot-major tensor [slots, ...], as one flat View.
template <class V>
Kokkos::View<typename V::value_type*, typename V::memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>> slot_of(
    const V& t, int l) {
  using flat            = Kokkos::View<typename V::value_type*, typename V::memory_space,
                                       Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  const std::size_t per = t.extent(0) ? t.size() / t.extent(0) : 0;
  return flat(t.data() + per * std::size_t(l), per);
}
/// dst(i) += src(i), i < n (a function of its own: nvcc takes no device
/// lambda inside a generic one).
template <class Exec, class Dst, class Src>
void add_into(const Exec& space, const Dst& dst, const Src& src, long n) {
  Kokkos::parallel_for(
      "moka::shadow_grad_add", Kokkos::RangePolicy<Exec>(space, 0, n), KOKKOS_LAMBDA(long i) { dst(i) += src(i); });
}
}  // namespace impl

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::shadow_route(const execution_space& space, const std::vector<long>& all) {
  const int E = m_cfg.num_experts, P = m_groups->ep_size(), me = m_ep_rank;
  std::vector<int> pick;
  if (m_shadow_rule) {
    std::vector<std::vector<double>> per_source(P, std::vector<double>(E));
    for (int q = 0; q < P; ++q)
      for (int e = 0; e < E; ++e) per_source[q][e] = double(all[std::size_t(q) * E + e]);
    pick = m_shadow_rule(per_source, m_place);
    MOKA_REQUIRE(static_cast<int>(pick.size()) <= m_M, "moka::MoELayer: the shadow rule picked ", pick.size(),
                 " experts, the layer has ", m_M, " shadow slots (balance.max_shadowed)");
    std::vector<char> seen(E, 0);
    for (int e : pick) {
      MOKA_REQUIRE(e >= 0 && e < E && !seen[e], "moka::MoELayer: the shadow rule picked expert ", e,
                   (e >= 0 && e < E ? " twice" : " (outside the layer's experts)"));
      seen[e] = 1;
    }
  }
  m_shadowed = std::move(pick);
  // Each expert's slot this step: its owner's, or this rank's shadow slot.
  auto ht = m_shadow_target_host;
  for (int e = 0; e < E; ++e) {
    const Placement::Slot s = m_place.slots_of(e).front();
    ht(e)                   = s.rank * m_L + s.local;
  }
  for (std::size_t j = 0; j < m_shadowed.size(); ++j) ht(m_shadowed[j]) = me * m_L + m_Lo + int(j);
  Kokkos::deep_copy(space, m_shadow_target, ht);
  {
    auto rows = m_expert_row, r = m_route, sr = m_slot_route;
    auto tgt  = m_shadow_target;
    Kokkos::parallel_for(
        "moka::shadow_route", impl::row_major_2d(space, long(r.extent(0)), long(r.extent(1))),
        KOKKOS_LAMBDA(long t, long j) { sr(t, j) = rows(t, j) < 0 ? -1 : tgt(r(t, j)); });
  }
  // Kept rows, placed by slot (dropless: capacity was applied per expert).
  m_rows = impl::assign_slots(space, DropPolicy::position, std::numeric_limits<long>::max() / 2,
                              Kokkos::View<long*, MemorySpace>(), m_slot_route, m_score, m_slot_counts, m_offsets,
                              m_slot, m_slot_work2, m_h_offsets);
  m_shadow_bytes = 0;
  if (!m_shadowed.empty()) shadow_weights(space);
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::shadow_weights(const execution_space& space) {
  ScopedRegion region("moka::MoELayer::shadow_weights");
  Communicator& ep = m_groups->ep();
  // bf16 weights kept by the optimizer: their copies are what the GEMMs
  // read (half the bytes); otherwise the fp32 weights (converted in forward).
  const bool bf16_w = m_cfg.bf16_compute && m_bf16_managed;
  for (std::size_t j = 0; j < m_shadowed.size(); ++j) {
    const Placement::Slot o = m_place.slots_of(m_shadowed[j]).front();
    const int ls            = m_Lo + int(j);
    auto bcast = [&](const auto& t) {
      if (t.size() == 0) return;
      auto dst = impl::slot_of(t, ls);
      if (o.rank == m_ep_rank) Kokkos::deep_copy(space, dst, impl::slot_of(t, o.local));
      broadcast(ep, space, dst, o.rank);
      if (o.rank != m_ep_rank) m_shadow_bytes += long(dst.size() * sizeof(typename decltype(dst)::value_type));
    };
    if (bf16_w) {
      bcast(m_w1_b);
      bcast(m_w2_b);
    } else {
      bcast(m_params.w1);
      bcast(m_params.w2);
    }
    bcast(m_params.b1);
    bcast(m_params.b2);
  }
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::shadow_reduce_grads(const execution_space& space) {
  ScopedRegion region("moka::MoELayer::shadow_reduce");
  Communicator& ep = m_groups->ep();
  for (std::size_t j = 0; j < m_shadowed.size(); ++j) {
    const Placement::Slot o = m_place.slots_of(m_shadowed[j]).front();
    const int ls            = m_Lo + int(j);
    auto reduce = [&](const auto& g) {
      if (g.size() == 0) return;
      auto src = impl::slot_of(g, ls);
      const long n = static_cast<long>(src.size());
      if (static_cast<long>(m_shadow_stage.extent(0)) < n)
        m_shadow_stage = Kokkos::View<Scalar*, MemorySpace>(
            Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("moka::moe::shadow_stage")), n);
      auto stage = m_shadow_stage;
      ep.reduce_sum(space, src.data(), stage.data(), n, data_type_of<Scalar>(), o.rank, memory_kind_of<MemorySpace>());
      if (o.rank == m_ep_rank) {
        impl::add_into(space, impl::slot_of(g, o.local), stage, n);
      } else {
        m_shadow_bytes += n * long(sizeof(Scalar));
      }
      Kokkos::deep_copy(space, src, Scalar(0));
    };
    reduce(m_grads.w1);
    reduce(m_grads.b1);
    reduce(m_grads.w2);
    reduce(m_grads.b2);
  }
}

}  // namespace moka
