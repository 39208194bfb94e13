#pragma once
// Template bodies of moka::MoELayer's smart scheduling (FasterMoE;
// comm.schedule_degree; included by MoELayer_impl.hpp): the EP exchange in
// peer groups, each group's rows computed while the next group's move,
// and each group's results sent back as soon as they are computed; and the
// fp32 / fp64 activation over a range of rows, which the unscheduled path
// runs over all rows.

#include <moka/comm/Communicator.hpp>

#include <memory>
#include <vector>

namespace moka {

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::activation_rows(const execution_space& space, long r0, long r1) {
  if (r1 <= r0) return;
  impl::with_activation(m_cfg.activation, m_cfg.expert_bias, [&](auto a, auto b) {
    constexpr Activation A = decltype(a)::value;
    constexpr bool Bias    = decltype(b)::value;
    if constexpr (Kokkos::SpaceAccessibility<Kokkos::HostSpace, MemorySpace>::accessible)
      impl::activation_rows_host<A, Bias>(space, r0, r1, m_dffl, m_row_expert, m_hpre, m_params.b1, m_h);
    else impl::activation_rows_2d<A, Bias>(space, r0, r1, m_dffl, m_row_expert, m_hpre, m_params.b1, m_h);
  });
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::activation_backward_rows(const execution_space& space, long r0, long r1) {
  if (r1 <= r0) return;
  impl::with_activation(m_cfg.activation, false, [&](auto a, auto) {
    constexpr Activation A = decltype(a)::value;
    if constexpr (Kokkos::SpaceAccessibility<Kokkos::HostSpace, MemorySpace>::accessible)
      impl::activation_backward_rows_host<A>(space, r0, r1, m_dffl, m_dh, m_hpre, m_dhpre);
    else impl::activation_backward_rows_2d<A>(space, r0, r1, m_dffl, m_dh, m_hpre, m_dhpre);
  });
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::scheduled_forward(const execution_space& space) {
  using Buffer = typename TokenExchange<Scalar, MemorySpace>::Buffer;
  using Pending = std::unique_ptr<Communicator::Pending>;
  const int G = m_tx.phases();
  const matrix xe = m_tx.prepare(Buffer::expert_in, m_rows_e);
  const matrix ys = m_tx.prepare(Buffer::dispatch_out, m_rows);
  m_xe = xe;
  m_ye = m_ye_buf;
  const bool bias = m_cfg.expert_bias;
  const Scalar one(1), zero(0);
  std::vector<Pending> back(G);
  Pending next = m_tx.start_there(space, m_xs, xe, 0);
  for (int g = 0; g < G; ++g) {
    Pending cur = std::move(next);
    cur->wait();
    if (g + 1 < G) next = m_tx.start_there(space, m_xs, xe, g + 1);
    ScopedRegion region("moka::MoELayer::scheduled_experts");
    for (const auto& seg : m_tx.phase_rows(g)) {
      const long b = seg.first, e = seg.first + seg.count;
      auto rows = [&](const matrix& m) { return impl::rows_of(m, b, e); };
      impl::gemm(space, "N", "N", one, rows(m_xe), impl::expert_of(m_params.w1, seg.slot), zero, rows(m_hpre));
      activation_rows(space, b, e);
      impl::gemm(space, "N", "N", one, rows(m_h), impl::expert_of(m_params.w2, seg.slot), zero, rows(m_ye));
      if (bias)
        impl::add_row_bias(space, seg.count, rows(m_ye), m_params.b2,
                           index_vector(Kokkos::subview(m_row_expert, std::make_pair(b, e))));
      if (next) next->progress();
    }
    back[g] = m_tx.start_back(space, m_ye, ys, g);
  }
  for (auto& p : back) p->wait();
  m_ys = ys;
}

template <class Scalar, class MemorySpace>
typename MoELayer<Scalar, MemorySpace>::matrix MoELayer<Scalar, MemorySpace>::scheduled_backward(
    const execution_space& space) {
  using Buffer = typename TokenExchange<Scalar, MemorySpace>::Buffer;
  using Pending = std::unique_ptr<Communicator::Pending>;
  const int G = m_tx.phases();
  const matrix dye = m_tx.prepare(Buffer::expert_grad, m_rows_e);
  const matrix dxs = m_tx.prepare(Buffer::dispatch_grad, m_rows);
  m_dye = dye;
  const Scalar one(1), zero(0);
  // An expert's weight gradients: its first rows of this backward overwrite
  // them after zero_grad (beta 0), the rest add (the unscheduled layer sums
  // all its rows in one GEMM: the same sum, in the order of the groups).
  std::vector<char> written(m_L, 0);
  std::vector<Pending> back(G);
  Pending next = m_tx.start_there(space, m_dys, dye, 0);
  for (int g = 0; g < G; ++g) {
    Pending cur = std::move(next);
    cur->wait();
    if (g + 1 < G) next = m_tx.start_there(space, m_dys, dye, g + 1);
    ScopedRegion region("moka::MoELayer::scheduled_experts_backward");
    for (const auto& seg : m_tx.phase_rows(g)) {
      const int l  = seg.slot;
      const long b = seg.first, e = seg.first + seg.count;
      auto rows = [&](const matrix& m) { return impl::rows_of(m, b, e); };
      const Scalar beta_w = m_wgrad_zero && !written[l] ? zero : one;
      written[l]          = 1;
      impl::gemm(space, "T", "N", one, rows(m_h), rows(m_dye), beta_w, impl::expert_of(m_grads.w2, l));
      impl::gemm(space, "N", "T", one, rows(m_dye), impl::expert_of(m_params.w2, l), zero, rows(m_dh));
      activation_backward_rows(space, b, e);
      impl::gemm(space, "T", "N", one, rows(m_xe), rows(m_dhpre), beta_w, impl::expert_of(m_grads.w1, l));
      impl::gemm(space, "N", "T", one, rows(m_dhpre), impl::expert_of(m_params.w1, l), zero, rows(m_dxe));
      if (next) next->progress();
    }
    back[g] = m_tx.start_back(space, m_dxe, dxs, g);
  }
  for (auto& p : back) p->wait();
  return dxs;
}

}  // namespace moka
