#pragma once
// Template bodies of moka::MoELayer's gate: logits, scores and routing
// of every gate type, the auxiliary losses, bias balancing, the trace gate,
// and the backward of all of them (included by MoELayer_impl.hpp).

#include <moka/moe/impl/GateKernels.hpp>

#include <cmath>
#include <vector>

namespace moka {

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
  m_gin           = x;
  m_gate_jittered = type == GateType::switch_top1 && training && m_cfg.jitter_eps > 0;
  if (m_gate_jittered) {
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
  // Small gates: one pass over the tokens (impl::gate_logits), else the GEMM.
  bool logits_done = false;
  if (m_gate_wt.data()) {
    impl::transpose_gate_weights(space, m_params.gate_w, m_gate_wt);
    logits_done = impl::gate_logits(space, m_gin, m_gate_wt, m_clean);
  }
  if (!logits_done) impl::gemm(space, "N", "N", Scalar(1), m_gin, m_params.gate_w, Scalar(0), m_clean);
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
    const long n   = static_cast<long>(m_trace_rows.size());
    const long row = (m_trace_row0 + m_trace_pos * long(m_cfg.trace_stride)) % n;
    if (training) ++m_trace_pos;
    const std::vector<long> scaled = scale_counts(m_trace_rows[row], long(TG) * k);
    auto h = Kokkos::create_mirror_view(m_trace_cum);
    h(0)   = 0;
    for (int e = 0; e < E; ++e) h(e + 1) = h(e) + static_cast<int>(scaled[e]);
    Kokkos::deep_copy(m_trace_cum, h);
  }
  impl::GateArgs args{type, m_cfg.renormalize, training && m_cfg.random_routing, m_cfg.bias_balance, seed ^ 0x3c6ef372fe94f82bull,
                      counter, TG, t0};
  impl::gate_select(space, args, m_logits, m_sel_bias, m_probs, m_idx, m_score, m_route, m_thr, m_rr);
  m_capped = false;
  if (m_topology && type != GateType::trace) {
    if (static_cast<int>(m_off_base.extent(0)) < T) m_off_base = Kokkos::View<long*, MemorySpace>("moka::moe::offnode_base", T);
    const long limit = static_cast<long>(std::floor(m_cfg.max_offnode_share * double(T) * k + 1e-9));
    impl::cap_offnode(space, type, m_cfg.renormalize, m_cfg.bias_balance, limit, m_logits, m_sel_bias, m_probs,
                      m_on_node, m_idx, m_score, m_route, m_off_base);
    m_capped = true;
  }
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
    impl::count_routed(space, route, m_sel_count);
    auto hs = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), m_sel_count);
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
bool MoELayer<Scalar, MemorySpace>::gate_backward(const execution_space& space, const matrix& dscore,
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
  // The weights' gradient stays cuBLAS's: a chunked kernel of partial sums
  // (one thread per 128 tokens and column) took 134 us against 75 (A, H200);
  // one with a thread per 128 tokens and 8 columns, all experts in
  // registers, 112 us against 74 on A and 211 against 80 on D (eighth
  // session, docs/performance.md).
  impl::gemm(space, "T", "N", Scalar(1), m_gin, dclean, Scalar(1), m_grads.gate_w);
  if (m_gate_wt.data() && type != GateType::noisy && !m_gate_jittered) {
    // dx's gate part, dlogits W_gate^T, is summed by the undispatch pass
    // (with the weights transposed again: the forward's copy may be stale
    // if the weights were set in between).
    impl::transpose_gate_weights(space, m_params.gate_w, m_gate_wt);
    return false;
  }
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
  return true;
}

}  // namespace moka
