#pragma once
// Template bodies of moka::MoELayer's experts: the expert GEMMs (fp32 /
// fp64 through linalg, bf16 through cuBLAS / cuBLASLt with fused epilogues)
// and the expert biases (included by MoELayer_impl.hpp).

#include <moka/linalg/impl/CublasGemm.hpp>

namespace moka {

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::expert_bias_grad(const execution_space& space, const matrix& src,
                                                     const matrix& out) {
  // One work array for both bias gradients (d and d_ff_in / S columns).
  impl::grow_rows(m_colsum_work, m_chunks, std::max<long>(m_cfg.d_model, m_dfil), "colsum_work");
  impl::expert_column_sums(space, src, m_e_offsets, m_chunk_start, m_chunks, bias_chunk, m_colsum_work, out);
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::expert_bias_grad(const execution_space& space, const bmatrix& src,
                                                     const matrix& out) {
  impl::grow_rows(m_colsum_work, m_chunks, std::max<long>(m_cfg.d_model, m_dfil), "colsum_work");
  impl::expert_column_sums_bf16(space, src, m_e_offsets, m_chunk_start, m_chunks, bias_chunk, m_colsum_work, out);
}

template <class Scalar, class MemorySpace>
void MoELayer<Scalar, MemorySpace>::expert_bias_add(const execution_space& space) {
  // b2 once per row: with slicing only the first slice rank adds it to its
  // partial output (the partials are summed).
  if (!m_cfg.expert_bias || (m_groups && m_groups->slice_rank() != 0)) return;
  impl::add_row_bias(space, m_rows_e, m_ye, m_params.b2, m_row_expert);
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
  if (m_tx.active())
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
void MoELayer<Scalar, MemorySpace>::expert_gemm_bf16(const execution_space& this_space, Stage stage) {
#ifdef KOKKOS_ENABLE_CUDA
  if constexpr (std::is_same<Scalar, float>::value && std::is_same<MemorySpace, Kokkos::CudaSpace>::value) {
    const int d = m_cfg.d_model, dff = m_dffl, dfi = m_dfil, L = m_L;
    const float beta_w = m_wgrad_zero ? 0.f : 1.f;  // after zero_grad: overwrite
    if (stage == Stage::down_backward && m_tx.active()) {  // else written by the combine backward
      impl::grow_rows(m_dys_b, m_rows_e, d, "dys_bf16");
      impl::convert_to_bf16(this_space, "moka::dys_to_bf16", m_dye.data(), m_dys_b.data(),
                            std::size_t(m_rows_e) * d);
    }
    // The GEMMs of a stage, each over every local expert: expert e's rows
    // are [m_e_off[e], m_e_off[e + 1]) of the row buffers.
    enum Kind { up_h, down_y, grad_w2, down_dh, grad_w1, up_dx };
    std::vector<Kind> kinds;
    switch (stage) {
      case Stage::up: kinds = {up_h}; break;
      case Stage::down: kinds = {down_y}; break;
      case Stage::down_backward: kinds = {grad_w2, down_dh}; break;
      case Stage::up_backward: kinds = {grad_w1, up_dx}; break;
    }
    const bf16* w1b = m_w1_b.data();
    const bf16* w2b = m_w2_b.data();
    // The automatic choices (expert.gemm_streams = 0, expert.gemm_grouped =
    // auto) by the stage's rows per local expert.
    const long stage_rows = m_e_off[L] - m_e_off[0];
    const bool many       = L >= auto_gemm_experts, few_rows = stage_rows < auto_gemm_rows * L;
    const bool try_grouped = m_grouped == GemmChoice::on || (m_grouped == GemmChoice::automatic && many && few_rows);
    const int fan          = m_fan && (!m_streams_auto || !few_rows) ? m_fan->size() : 0;
    m_last_gemms           = ExpertGemms{};
    // expert.gemm_grouped: one cublasGemmGroupedBatchedEx per GEMM kind (the
    // fused epilogues excepted), the operands' addresses of every expert
    // formed on the device from the expert offsets.
    auto grouped = [&](Kind kind) -> bool {
      if (!try_grouped || (m_fused && (kind == up_h || kind == down_dh)) || (m_grouped_refused >> kind) & 1)
        return false;
      std::vector<int> rows(L), M, N, K;
      for (int e = 0; e < L; ++e) rows[e] = static_cast<int>(m_e_off[e + 1] - m_e_off[e]);
      auto fill = [L](int v) { return std::vector<int>(L, v); };
      impl::ExpertOperand a, b, c;
      bool ta = false, tb = false, f32 = true;
      int lda = 0, ldb = 0, ldc = 0;
      float beta = 0.f;
      switch (kind) {
        case up_h:  // hpre = xs W1_e
          M = rows, N = fill(dfi), K = fill(d), a = {m_xs_b.data(), d, 0}, lda = d, b = {w1b, 0, long(d) * dfi},
          ldb = dfi, c = {m_hpre_b.data(), dfi, 0}, ldc = dfi, f32 = false;
          break;
        case down_y:  // ye = h W2_e
          M = rows, N = fill(d), K = fill(dff), a = {m_h_b.data(), dff, 0}, lda = dff, b = {w2b, 0, long(dff) * d},
          ldb = d, ldc = d;
          if (rows_bf16()) c = {m_ye_b.data(), d, 0}, f32 = false;
          else c = {m_ye.data(), d, 0};
          break;
        case grad_w2:  // dW2_e (+)= h^T dys
          ta = true, M = fill(dff), N = fill(d), K = rows, a = {m_h_b.data(), dff, 0}, lda = dff,
          b = {m_dys_b.data(), d, 0}, ldb = d, c = {m_grads.w2.data(), 0, long(dff) * d}, ldc = d, beta = beta_w;
          break;
        case down_dh:  // dh = dys W2_e^T
          tb = true, M = rows, N = fill(dff), K = fill(d), a = {m_dys_b.data(), d, 0}, lda = d,
          b = {w2b, 0, long(dff) * d}, ldb = d, c = {m_dh_b.data(), dff, 0}, ldc = dff, f32 = false;
          break;
        case grad_w1:  // dW1_e (+)= xs^T dhpre
          ta = true, M = fill(d), N = fill(dfi), K = rows, a = {m_xs_b.data(), d, 0}, lda = d,
          b = {m_dhpre_b.data(), dfi, 0}, ldb = dfi, c = {m_grads.w1.data(), 0, long(d) * dfi}, ldc = dfi,
          beta = beta_w;
          break;
        case up_dx:  // dxe = dhpre W1_e^T
          tb = true, M = rows, N = fill(d), K = fill(dfi), a = {m_dhpre_b.data(), dfi, 0}, lda = dfi,
          b = {w1b, 0, long(d) * dfi}, ldb = dfi, ldc = d;
          if (rows_bf16()) c = {m_dxe_b.data(), d, 0}, f32 = false;
          else c = {m_dxe.data(), d, 0};
          break;
      }
      if (m_gptr.extent(0) < std::size_t(3 * L))
        m_gptr = Kokkos::View<std::uintptr_t*, MemorySpace>("moka::moe::grouped_gemm_pointers", 3 * L);
      impl::expert_operand_pointers(this_space, m_e_offsets, L, a, b, c, f32 ? sizeof(float) : sizeof(bf16), m_gptr);
      if (impl::gemm_bf16_grouped(this_space, ta, tb, L, M.data(), N.data(), K.data(), 1.f,
                                  reinterpret_cast<const void* const*>(m_gptr.data()), lda, ldb, beta, f32, ldc)) {
        m_last_gemms.grouped = true;
        return true;
      }
      m_grouped_refused |= 1u << kind;  // not offered by this cuBLAS: the loop from now on
      return false;
    };
    // The loop over experts. expert.gemm_streams: expert e's GEMMs on
    // stream e mod n of the fan, after everything queued on space so far;
    // space waits for all of them. (Each expert writes its own rows and its
    // own weight gradients.)
    auto loop = [&](Kind kind) {
      if (fan > 1) {
        m_fan->fork(this_space);
        m_last_gemms.streams = fan;
      }
      for (int e = 0; e < L; ++e) {
        const long b = m_e_off[e];
        const int n  = static_cast<int>(m_e_off[e + 1] - b);
        if (n == 0) continue;
        const Kokkos::Cuda& space = fan > 1 ? m_fan->instance(e % fan) : this_space;
        const bf16* w1 = w1b + std::size_t(e) * d * dfi;
        const bf16* w2 = w2b + std::size_t(e) * dff * d;
        switch (kind) {
          case up_h:
            if (m_fused)
              impl::gemm_bf16_epilogue(space, epilogue(true, e, b), false, false, n, dff, d, m_xs_b.data() + b * d,
                                       d, w1, dfi, m_h_b.data() + b * dff, dff, m_lt_work.data(), m_lt_work.size());
            else
              impl::gemm_bf16_bf16(space, false, false, n, dfi, d, 1.f, m_xs_b.data() + b * d, d, w1, dfi, 0.f,
                                   m_hpre_b.data() + b * dfi, dfi);
            break;
          case down_y:
            if (rows_bf16())
              impl::gemm_bf16_bf16(space, false, false, n, d, dff, 1.f, m_h_b.data() + b * dff, dff, w2, d, 0.f,
                                   m_ye_b.data() + b * d, d);
            else
              impl::gemm_bf16_f32(space, false, false, n, d, dff, 1.f, m_h_b.data() + b * dff, dff, w2, d, 0.f,
                                  m_ye.data() + b * d, d);
            break;
          case grad_w2:
            impl::gemm_bf16_f32(space, true, false, dff, d, n, 1.f, m_h_b.data() + b * dff, dff,
                                m_dys_b.data() + b * d, d, beta_w, m_grads.w2.data() + std::size_t(e) * dff * d, d);
            break;
          case down_dh:
            if (m_fused)
              impl::gemm_bf16_epilogue(space, epilogue(false, e, b), false, true, n, dff, d, m_dys_b.data() + b * d,
                                       d, w2, d, m_dhpre_b.data() + b * dff, dff, m_lt_work.data(), m_lt_work.size());
            else
              impl::gemm_bf16_bf16(space, false, true, n, dff, d, 1.f, m_dys_b.data() + b * d, d, w2, d, 0.f,
                                   m_dh_b.data() + b * dff, dff);
            break;
          case grad_w1:
            impl::gemm_bf16_f32(space, true, false, d, dfi, n, 1.f, m_xs_b.data() + b * d, d,
                                m_dhpre_b.data() + b * dfi, dfi, beta_w,
                                m_grads.w1.data() + std::size_t(e) * d * dfi, dfi);
            break;
          case up_dx:
            if (rows_bf16())
              impl::gemm_bf16_bf16(space, false, true, n, d, dfi, 1.f, m_dhpre_b.data() + b * dfi, dfi, w1, dfi, 0.f,
                                   m_dxe_b.data() + b * d, d);
            else
              impl::gemm_bf16_f32(space, false, true, n, d, dfi, 1.f, m_dhpre_b.data() + b * dfi, dfi, w1, dfi, 0.f,
                                  m_dxe.data() + b * d, d);
            break;
        }
      }
      if (fan > 1) m_fan->join(this_space);
    };
    // expert.gemm_batched: every expert padded to m_pad rows, so each kind
    // is one strided-batched GEMM over the experts (the padding rows are
    // zero where they enter a weight gradient: pad_expert_rows).
    auto batched = [&](Kind kind) {
      using impl::gemm_bf16_batched;
      const int p = static_cast<int>(m_pad);
      const long long P = p, sd = P * d, sff = P * dff, sfi = P * dfi, sw1 = (long long)d * dfi,
                      sw2 = (long long)dff * d;
      switch (kind) {
        case up_h:
          gemm_bf16_batched(this_space, false, false, p, dfi, d, 1.f, m_xs_b.data(), d, sd, w1b, dfi, sw1, 0.f,
                            m_hpre_b.data(), false, dfi, sfi, L);
          break;
        case down_y:
          gemm_bf16_batched(this_space, false, false, p, d, dff, 1.f, m_h_b.data(), dff, sff, w2b, d, sw2, 0.f,
                            rows_bf16() ? static_cast<void*>(m_ye_b.data()) : static_cast<void*>(m_ye.data()),
                            !rows_bf16(), d, sd, L);
          break;
        case grad_w2:
          gemm_bf16_batched(this_space, true, false, dff, d, p, 1.f, m_h_b.data(), dff, sff, m_dys_b.data(), d, sd,
                            beta_w, m_grads.w2.data(), true, d, sw2, L);
          break;
        case down_dh:
          gemm_bf16_batched(this_space, false, true, p, dff, d, 1.f, m_dys_b.data(), d, sd, w2b, d, sw2, 0.f,
                            m_dh_b.data(), false, dff, sff, L);
          break;
        case grad_w1:
          gemm_bf16_batched(this_space, true, false, d, dfi, p, 1.f, m_xs_b.data(), d, sd, m_dhpre_b.data(), dfi,
                            sfi, beta_w, m_grads.w1.data(), true, dfi, sw1, L);
          break;
        case up_dx:
          gemm_bf16_batched(this_space, false, true, p, d, dfi, 1.f, m_dhpre_b.data(), dfi, sfi, w1b, dfi, sw1, 0.f,
                            rows_bf16() ? static_cast<void*>(m_dxe_b.data()) : static_cast<void*>(m_dxe.data()),
                            !rows_bf16(), d, sd, L);
          break;
      }
    };
    if (m_pad > 0) {
      m_last_gemms.batched = true;
      for (const Kind kind : kinds) batched(kind);
      return;
    }
    for (const Kind kind : kinds)
      if (!grouped(kind)) loop(kind);
    return;
  }
#endif
  (void)this_space;
  (void)stage;
  impl::fail(MOKA_FUNCTION, "bf16 expert GEMMs need a CUDA build and a float layer in CudaSpace");
}

}  // namespace moka
