#pragma once
// Template bodies of moka::MoELayer (included by MoELayer.hpp).

#include <moka/impl/Init.hpp>

#include <cmath>
#include <string>
#include <vector>

namespace moka {

template <class Scalar, class MemorySpace>
MoEParams<Scalar, MemorySpace>::MoEParams(const MoEConfig& cfg, const std::string& prefix)
    : gate_w(prefix + "gate_w", cfg.d_model, cfg.num_experts),
      w1(prefix + "w1", cfg.num_experts, cfg.d_model, cfg.d_ff_in()),
      b1(prefix + "b1", cfg.expert_bias ? cfg.num_experts : 0, cfg.d_ff_in()),
      w2(prefix + "w2", cfg.num_experts, cfg.d_ff, cfg.d_model),
      b2(prefix + "b2", cfg.expert_bias ? cfg.num_experts : 0, cfg.d_model) {}

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

template <class Scalar, class MemorySpace>
MoELayer<Scalar, MemorySpace>::MoELayer(const MoEConfig& config)
    : m_cfg((config.validate(), config)), m_params(config, "moka::moe::"), m_grads(config, "moka::moe::grad_") {
  m_counts  = index_vector("moka::moe::counts", config.num_experts);
  m_offsets = index_vector("moka::moe::offsets", config.num_experts + 1);
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::init_parameters(std::uint64_t seed) {
  impl::SplitMix64 rng{seed};
  impl::fill_uniform(m_params.gate_w, rng, 1.0 / std::sqrt(double(m_cfg.d_model)));
  impl::fill_uniform(m_params.w1, rng, 1.0 / std::sqrt(double(m_cfg.d_model)));
  impl::fill_uniform(m_params.w2, rng, 1.0 / std::sqrt(double(m_cfg.d_ff)));
  Kokkos::deep_copy(m_params.b1, Scalar(0));
  Kokkos::deep_copy(m_params.b2, Scalar(0));
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::zero_grad(const execution_space& space) {
  Kokkos::deep_copy(space, m_grads.gate_w, Scalar(0));
  Kokkos::deep_copy(space, m_grads.w1, Scalar(0));
  Kokkos::deep_copy(space, m_grads.b1, Scalar(0));
  Kokkos::deep_copy(space, m_grads.w2, Scalar(0));
  Kokkos::deep_copy(space, m_grads.b2, Scalar(0));
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::ensure_workspace(int T) {
  if (T == m_T) return;
  const int E = m_cfg.num_experts, k = m_cfg.top_k, d = m_cfg.d_model;
  const long N = long(T) * k;
  auto alloc = [](const char* label, long m, long n) {
    return matrix(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("moka::moe::") + label), m, n);
  };
  m_logits = alloc("logits", T, E);
  m_probs  = m_cfg.gate == GateType::softmax ? alloc("probs", T, E) : matrix();
  m_score  = alloc("score", T, k);
  m_idx    = index_matrix("moka::moe::expert_index", T, k);
  m_slot   = index_matrix("moka::moe::slot", T, k);
  m_rank_tmp  = index_vector("moka::moe::rank", N);
  m_group_tmp = index_vector("moka::moe::group", N);
  m_xs   = alloc("xs", N, d);
  m_hpre = alloc("hpre", N, m_cfg.d_ff_in());
  m_h    = alloc("h", N, m_cfg.d_ff);
  m_ys   = alloc("ys", N, d);
  m_T    = T;
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
  m_x = x;

  // Gate.
  space.fence();
  impl::gemm("N", "N", Scalar(1), x, m_params.gate_w, Scalar(0), m_logits);
  execution_space().fence();
  impl::gate_forward(space, m_cfg.gate, m_cfg.renormalize, m_logits, m_idx, m_score, m_probs);

  // Capacity, slots and the expert-ordered buffer (the exchange step is a
  // local copy on one rank).
  m_capacity = m_cfg.capacity(T);
  m_rows = impl::assign_slots(space, m_cfg.drop_policy, m_capacity, m_idx, m_score, m_counts, m_offsets, m_slot,
                              m_rank_tmp, m_group_tmp, m_row_token, m_row_choice);
  {
    auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), m_offsets);
    m_h_offsets.assign(h.data(), h.data() + E + 1);
  }
  impl::gather_rows(space, m_rows, x, m_row_token, m_xs);

  // Experts: hpre = xs W1 (+ b1), h = act(hpre), ys = h W2 (+ b2).
  const int dff = m_cfg.d_ff, dff_in = m_cfg.d_ff_in(), d = m_cfg.d_model;
  const Activation act = m_cfg.activation;
  const bool bias = m_cfg.expert_bias;
  space.fence();
  for (int e = 0; e < E; ++e) {
    const long b = m_h_offsets[e], n = m_h_offsets[e + 1] - b;
    if (n == 0) continue;
    impl::gemm("N", "N", Scalar(1), impl::rows_of(m_xs, b, b + n), impl::expert_of(m_params.w1, e), Scalar(0),
               impl::rows_of(m_hpre, b, b + n));
  }
  execution_space().fence();
  auto hpre = m_hpre, h = m_h, ys = m_ys, b1 = m_params.b1, b2 = m_params.b2;
  auto idx = m_idx;
  auto rt = m_row_token, rc = m_row_choice;
  Kokkos::parallel_for(
      "moka::expert_activation", Kokkos::MDRangePolicy<execution_space, Kokkos::Rank<2>>(space, {0, 0}, {m_rows, long(dff)}),
      KOKKOS_LAMBDA(long r, long c) {
        const int e = idx(rt(r), rc(r));
        if (bias) {
          hpre(r, c) += b1(e, c);
          if (act == Activation::swiglu) hpre(r, dff + c) += b1(e, dff + c);
        }
        const Scalar a = impl::activate(act, hpre(r, c));
        h(r, c)        = act == Activation::swiglu ? a * hpre(r, dff + c) : a;
      });
  space.fence();
  for (int e = 0; e < E; ++e) {
    const long b = m_h_offsets[e], n = m_h_offsets[e + 1] - b;
    if (n == 0) continue;
    impl::gemm("N", "N", Scalar(1), impl::rows_of(m_h, b, b + n), impl::expert_of(m_params.w2, e), Scalar(0),
               impl::rows_of(m_ys, b, b + n));
  }
  execution_space().fence();
  if (bias) {
    Kokkos::parallel_for(
        "moka::expert_bias2", Kokkos::MDRangePolicy<execution_space, Kokkos::Rank<2>>(space, {0, 0}, {m_rows, long(d)}),
        KOKKOS_LAMBDA(long r, long c) { ys(r, c) += b2(idx(rt(r), rc(r)), c); });
  }
  (void)dff_in;

  // Combine.
  impl::combine_rows(space, m_ys, m_slot, m_score, y);
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
  const int T = m_T, E = m_cfg.num_experts, k = m_cfg.top_k, d = m_cfg.d_model;
  const int dff = m_cfg.d_ff, dff_in = m_cfg.d_ff_in();
  const long rows = m_rows;
  const Activation act = m_cfg.activation;
  auto alloc = [](const char* label, long m, long n) {
    return matrix(Kokkos::view_alloc(Kokkos::WithoutInitializing, std::string("moka::moe::") + label), m, n);
  };
  matrix dscore = alloc("dscore", T, k), dlogits = alloc("dlogits", T, E);
  matrix dys = alloc("dys", rows, d), dh = alloc("dh", rows, dff), dhpre = alloc("dhpre", rows, dff_in);
  matrix dxs = alloc("dxs", rows, d);
  auto slot = m_slot, score = m_score, ys = m_ys, hpre = m_hpre, idx = m_idx;
  auto rt = m_row_token, rc = m_row_choice;

  // Combine backward: dscore and the gradient reaching each expert row.
  Kokkos::parallel_for(
      "moka::combine_backward", Kokkos::RangePolicy<execution_space>(space, 0, T * k), KOKKOS_LAMBDA(int i) {
        const int t = i / k, j = i % k, r = slot(t, j);
        Scalar acc = 0;
        if (r >= 0)
          for (int c = 0; c < d; ++c) acc += dy(t, c) * ys(r, c);
        dscore(t, j) = acc;
      });
  Kokkos::parallel_for(
      "moka::expert_grad_out", Kokkos::MDRangePolicy<execution_space, Kokkos::Rank<2>>(space, {0, 0}, {rows, long(d)}),
      KOKKOS_LAMBDA(long r, long c) { dys(r, c) = score(rt(r), rc(r)) * dy(rt(r), c); });

  // Expert backward. Bias gradients are column sums over the expert's rows,
  // in row order (deterministic).
  index_vector offsets = m_offsets;
  if (m_cfg.expert_bias) {
    auto db2 = m_grads.b2;
    Kokkos::parallel_for(
        "moka::expert_db2", Kokkos::MDRangePolicy<execution_space, Kokkos::Rank<2>>(space, {0, 0}, {E, d}),
        KOKKOS_LAMBDA(int e, int c) {
          Scalar acc = 0;
          for (int r = offsets(e); r < offsets(e + 1); ++r) acc += dys(r, c);
          db2(e, c) += acc;
        });
  }
  space.fence();
  for (int e = 0; e < E; ++e) {
    const long b = m_h_offsets[e], n = m_h_offsets[e + 1] - b;
    if (n == 0) continue;
    impl::gemm("T", "N", Scalar(1), impl::rows_of(m_h, b, b + n), impl::rows_of(dys, b, b + n), Scalar(1),
               impl::expert_of(m_grads.w2, e));
    impl::gemm("N", "T", Scalar(1), impl::rows_of(dys, b, b + n), impl::expert_of(m_params.w2, e), Scalar(0),
               impl::rows_of(dh, b, b + n));
  }
  execution_space().fence();
  Kokkos::parallel_for(
      "moka::expert_activation_backward",
      Kokkos::MDRangePolicy<execution_space, Kokkos::Rank<2>>(space, {0, 0}, {rows, long(dff)}),
      KOKKOS_LAMBDA(long r, long c) {
        if (act == Activation::swiglu) {
          const Scalar a = hpre(r, c), g = hpre(r, dff + c);
          dhpre(r, c)       = dh(r, c) * g * impl::activate_grad(act, a);
          dhpre(r, dff + c) = dh(r, c) * impl::activate(act, a);
        } else {
          dhpre(r, c) = dh(r, c) * impl::activate_grad(act, hpre(r, c));
        }
      });
  if (m_cfg.expert_bias) {
    auto db1 = m_grads.b1;
    Kokkos::parallel_for(
        "moka::expert_db1", Kokkos::MDRangePolicy<execution_space, Kokkos::Rank<2>>(space, {0, 0}, {E, dff_in}),
        KOKKOS_LAMBDA(int e, int c) {
          Scalar acc = 0;
          for (int r = offsets(e); r < offsets(e + 1); ++r) acc += dhpre(r, c);
          db1(e, c) += acc;
        });
  }
  space.fence();
  for (int e = 0; e < E; ++e) {
    const long b = m_h_offsets[e], n = m_h_offsets[e + 1] - b;
    if (n == 0) continue;
    impl::gemm("T", "N", Scalar(1), impl::rows_of(m_xs, b, b + n), impl::rows_of(dhpre, b, b + n), Scalar(1),
               impl::expert_of(m_grads.w1, e));
    impl::gemm("N", "T", Scalar(1), impl::rows_of(dhpre, b, b + n), impl::expert_of(m_params.w1, e), Scalar(0),
               impl::rows_of(dxs, b, b + n));
  }
  execution_space().fence();

  // Gate backward, then dx = dlogits Wg^T + the expert rows of each token.
  impl::gate_backward(space, m_cfg.gate, m_cfg.renormalize, m_probs, idx, score, dscore, dlogits);
  space.fence();
  impl::gemm("N", "T", Scalar(1), dlogits, m_params.gate_w, Scalar(0), dx);
  impl::gemm("T", "N", Scalar(1), m_x, dlogits, Scalar(1), m_grads.gate_w);
  execution_space().fence();
  impl::scatter_add_rows(space, dxs, m_slot, dx);
}

// The common instantiations live in the library (src/MoELayer.cpp).
extern template class MoELayer<double, Kokkos::HostSpace>;
extern template class MoELayer<float, Kokkos::HostSpace>;
#ifdef KOKKOS_ENABLE_CUDA
extern template class MoELayer<double, Kokkos::CudaSpace>;
extern template class MoELayer<float, Kokkos::CudaSpace>;
#endif

}  // namespace moka
