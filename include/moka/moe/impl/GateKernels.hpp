#pragma once
/// \file GateKernels.hpp
/// \brief Kernels of the gates: random streams, top-k selection and scores
/// for every gate type, and the backward of scores, balance losses and
/// z-loss into the logits. Internal: use moka::MoELayer.

#include <moka/core/Core.hpp>
#include <moka/moe/MoEConfig.hpp>
#include <moka/core/impl/Math.hpp>

#include <cstdint>
#include <vector>

namespace moka {
namespace impl {

template <class S, class M>
using gmat = Kokkos::View<S**, Kokkos::LayoutRight, M>;
template <class M>
using imat = Kokkos::View<int**, Kokkos::LayoutRight, M>;

/// Lanes (4 to 32, powers of two) for a CUDA row pass whose threads each
/// walk a row of \p packs loads: doubled while every lane keeps at least
/// \p packs_per_lane of them. Teams of 128 / lanes threads.
inline int row_lanes(long packs, long packs_per_lane) {
  int lanes = 4;
  while (lanes < 32 && packs / (2 * lanes) >= packs_per_lane) lanes *= 2;
  return lanes;
}

// ------------------------------------------------------------ randomness
/// A counter-based generator: the same (seed, counter) gives the same
/// number on every backend and thread count. Uniform in (0, 1).
KOKKOS_INLINE_FUNCTION double hash_uniform(std::uint64_t seed, std::uint64_t counter) {
  std::uint64_t z = seed + 0x9e3779b97f4a7c15ull * (counter + 1);
  z               = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z               = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z               = z ^ (z >> 31);
  return (static_cast<double>(z >> 11) + 0.5) * 0x1.0p-53;
}

/// Standard normal from two counter-based uniforms (Box-Muller).
KOKKOS_INLINE_FUNCTION double hash_normal(std::uint64_t seed, std::uint64_t counter) {
  const double u1 = hash_uniform(seed, 2 * counter), u2 = hash_uniform(seed, 2 * counter + 1);
  return impl::sqrt(-2.0 * impl::log(u1)) * impl::cos(6.283185307179586477 * u2);
}

KOKKOS_INLINE_FUNCTION double normal_cdf(double z) { return 0.5 * (1.0 + impl::erf(z * 0.70710678118654752440)); }
KOKKOS_INLINE_FUNCTION double normal_pdf(double z) { return 0.39894228040143267794 * impl::exp(-0.5 * z * z); }

template <class S>
KOKKOS_INLINE_FUNCTION S softplus(S x) {
  return x > S(20) ? x : impl::log(S(1) + impl::exp(x));
}

/// What the selection kernel needs to know about the gate.
struct GateArgs {
  GateType type;
  bool renormalize;
  bool random_routing;  // gshard, in training
  bool use_bias;        // selection bias (bias balancing)
  std::uint64_t seed;   // random-routing stream
  std::uint64_t counter;
  std::uint64_t tokens_global;  // tokens of the whole batch over all ranks (the stream's period)
  std::uint64_t token_offset;   // global index of this rank's first token
};

/// probs = softmax(logits) over experts; selection of the top k by
/// logits + bias into idx; scores per gate type; route = idx, except -1
/// for a second GShard choice dropped by random routing (u[t] is recorded). For the noisy gate,
/// thr_idx(t, 0 / 1) are the experts whose logits are the (k+1)-th and
/// k-th largest (the load thresholds "if in" / "if out"). Ties go to the
/// lower expert index.
template <class Exec, class S, class M>
void gate_select(const Exec& space, const GateArgs a, const gmat<S, M>& logits,
                 const Kokkos::View<S*, M>& bias, const gmat<S, M>& probs, const imat<M>& idx,
                 const gmat<S, M>& score, const imat<M>& route, const imat<M>& thr_idx,
                 const Kokkos::View<S*, M>& rr_u) {
  const int T = static_cast<int>(logits.extent(0));
  const int E = static_cast<int>(logits.extent(1));
  const int k = static_cast<int>(idx.extent(1));
  Kokkos::parallel_for(
      "moka::gate_select", Kokkos::RangePolicy<Exec>(space, 0, T), KOKKOS_LAMBDA(int t) {
        // softmax over all experts (scores of softmax/gshard/switch, z-loss, balance).
        S m = logits(t, 0);
        for (int e = 1; e < E; ++e) m = logits(t, e) > m ? logits(t, e) : m;
        S sum = 0;
        for (int e = 0; e < E; ++e) {
          probs(t, e) = impl::exp(logits(t, e) - m);
          sum += probs(t, e);
        }
        for (int e = 0; e < E; ++e) probs(t, e) /= sum;
        if (a.type == GateType::zero) {
          for (int j = 0; j < k; ++j) {
            idx(t, j)   = 0;
            route(t, j) = 0;
            score(t, j) = S(1) / S(k);
          }
          return;
        }
        // k passes (k+1 for the noisy gate's threshold) over the experts.
        const int K = a.type == GateType::noisy ? k + 1 : k;
        int chosen_extra = -1;
        for (int j = 0; j < K; ++j) {
          int best   = -1;
          S best_val = 0;
          for (int e = 0; e < E; ++e) {
            bool taken = false;
            for (int i = 0; i < j && i < k; ++i) taken = taken || idx(t, i) == e;
            if (taken) continue;
            const S v = logits(t, e) + (a.use_bias ? bias(e) : S(0));
            if (best < 0 || v > best_val) {
              best     = e;
              best_val = v;
            }
          }
          if (j < k) {
            idx(t, j)   = best;
            route(t, j) = best;
          } else {
            chosen_extra = best;
          }
        }
        if (a.type == GateType::noisy) {
          thr_idx(t, 0) = chosen_extra;  // (k+1)-th largest: threshold if in
          thr_idx(t, 1) = idx(t, k - 1); // k-th largest: threshold if out
        }
        if (a.type == GateType::topk || a.type == GateType::noisy) {
          // softmax over the selected (unbiased) logits
          S mm = logits(t, idx(t, 0));
          for (int j = 1; j < k; ++j) mm = logits(t, idx(t, j)) > mm ? logits(t, idx(t, j)) : mm;
          S s = 0;
          for (int j = 0; j < k; ++j) s += impl::exp(logits(t, idx(t, j)) - mm);
          for (int j = 0; j < k; ++j) score(t, j) = impl::exp(logits(t, idx(t, j)) - mm) / s;
          return;
        }
        S sel = 0;
        for (int j = 0; j < k; ++j) sel += probs(t, idx(t, j));
        const bool renorm = a.renormalize || a.type == GateType::gshard;
        for (int j = 0; j < k; ++j) score(t, j) = renorm ? probs(t, idx(t, j)) / sel : probs(t, idx(t, j));
        if (a.type == GateType::gshard && a.random_routing) {
          const S u = S(hash_uniform(a.seed, a.counter * a.tokens_global + a.token_offset + std::uint64_t(t)));
          rr_u(t)   = u;
          if (S(2) * score(t, 1) < u) route(t, 1) = -1;
        }
      });
}

/// Topology-aware gate (FasterMoE): of this rank's choices of experts that
/// no slot on its node holds (on_node(e) == 0), numbered in (token, choice)
/// order, those numbered \p limit or more go to the best expert (logit +
/// bias) on the node that the token has not chosen; without one the choice
/// stays. Scores of a changed token are computed again as gate_select does
/// (topk: softmax over the chosen logits; softmax, switch: their
/// probabilities, renormalised when asked). \p off_base: [T] workspace.
template <class Exec, class S, class M>
void cap_offnode(const Exec& space, GateType type, bool renormalize, bool use_bias, long limit,
                 const gmat<S, M>& logits, const Kokkos::View<S*, M>& bias, const gmat<S, M>& probs,
                 const Kokkos::View<int*, M>& on_node, const imat<M>& idx, const gmat<S, M>& score, const imat<M>& route,
                 const Kokkos::View<long*, M>& off_base) {
  const int T = static_cast<int>(idx.extent(0));
  const int E = static_cast<int>(logits.extent(1));
  const int k = static_cast<int>(idx.extent(1));
  Kokkos::parallel_scan(
      "moka::gate_offnode_scan", Kokkos::RangePolicy<Exec>(space, 0, T),
      KOKKOS_LAMBDA(int t, long& acc, const bool final) {
        if (final) off_base(t) = acc;
        for (int j = 0; j < k; ++j) acc += on_node(idx(t, j)) == 0 ? 1 : 0;
      });
  Kokkos::parallel_for(
      "moka::gate_offnode_cap", Kokkos::RangePolicy<Exec>(space, 0, T), KOKKOS_LAMBDA(int t) {
        long n       = off_base(t);
        bool changed = false;
        for (int j = 0; j < k; ++j) {
          if (on_node(idx(t, j))) continue;
          if (n++ < limit) continue;
          int best   = -1;
          S best_val = 0;
          for (int e = 0; e < E; ++e) {
            if (!on_node(e)) continue;
            bool taken = false;
            for (int i = 0; i < k; ++i) taken = taken || idx(t, i) == e;
            if (taken) continue;
            const S v = logits(t, e) + (use_bias ? bias(e) : S(0));
            if (best < 0 || v > best_val) best = e, best_val = v;
          }
          if (best >= 0) {
            idx(t, j)   = best;
            route(t, j) = best;
            changed     = true;
          }
        }
        if (!changed) return;
        if (type == GateType::topk) {
          S mm = logits(t, idx(t, 0));
          for (int j = 1; j < k; ++j) mm = logits(t, idx(t, j)) > mm ? logits(t, idx(t, j)) : mm;
          S sum = 0;
          for (int j = 0; j < k; ++j) sum += impl::exp(logits(t, idx(t, j)) - mm);
          for (int j = 0; j < k; ++j) score(t, j) = impl::exp(logits(t, idx(t, j)) - mm) / sum;
          return;
        }
        S sel = 0;
        for (int j = 0; j < k; ++j) sel += probs(t, idx(t, j));
        for (int j = 0; j < k; ++j) score(t, j) = renormalize ? probs(t, idx(t, j)) / sel : probs(t, idx(t, j));
      });
}

/// dlogits = d(loss)/d(logits) from the score gradients dscore, the
/// per-(token, expert) gradient reaching the softmax probabilities dprob
/// (balance losses; may be empty), and the z-loss of weight wz (lse of
/// each token recomputed). Overwrites dlogits.
template <class Exec, class S, class M>
void gate_backward(const Exec& space, GateType type, bool renormalize, const gmat<S, M>& logits,
                   const gmat<S, M>& probs, const imat<M>& idx, const gmat<S, M>& score,
                   const gmat<S, M>& dscore, const gmat<S, M>& dprob, S wz, long tokens_global,
                   const gmat<S, M>& dlogits) {
  const int T = static_cast<int>(dlogits.extent(0));
  const int E = static_cast<int>(dlogits.extent(1));
  const int k = static_cast<int>(idx.extent(1));
  const bool has_dprob = dprob.extent(0) > 0;
  Kokkos::parallel_for(
      "moka::gate_backward", Kokkos::RangePolicy<Exec>(space, 0, T), KOKKOS_LAMBDA(int t) {
        // dp: gradient at the softmax probabilities (used by the gates that
        // score from them, and by the balance losses).
        for (int e = 0; e < E; ++e) dlogits(t, e) = has_dprob ? dprob(t, e) : S(0);
        if (type == GateType::topk || type == GateType::noisy) {
          // softmax over the selected logits: dl_j = s_j (ds_j - sum_i s_i ds_i)
          S dot = 0;
          for (int j = 0; j < k; ++j) dot += score(t, j) * dscore(t, j);
          // first turn dp into dlogits (through the full softmax), then add the selected part
          S pd = 0;
          for (int e = 0; e < E; ++e) pd += probs(t, e) * dlogits(t, e);
          for (int e = 0; e < E; ++e) dlogits(t, e) = probs(t, e) * (dlogits(t, e) - pd);
          for (int j = 0; j < k; ++j) dlogits(t, idx(t, j)) += score(t, j) * (dscore(t, j) - dot);
        } else if (type == GateType::softmax || type == GateType::gshard || type == GateType::switch_top1) {
          // A GShard second choice dropped by random routing still sets the
          // normalisation; its dscore is zero.
          const bool renorm = renormalize || type == GateType::gshard;
          S sel = 0, dot_sel = 0;
          for (int j = 0; j < k; ++j) {
            sel += probs(t, idx(t, j));
            dot_sel += dscore(t, j) * score(t, j);
          }
          for (int j = 0; j < k; ++j)
            dlogits(t, idx(t, j)) += renorm ? (dscore(t, j) - dot_sel) / sel : dscore(t, j);
          S pd = 0;
          for (int e = 0; e < E; ++e) pd += probs(t, e) * dlogits(t, e);
          for (int e = 0; e < E; ++e) dlogits(t, e) = probs(t, e) * (dlogits(t, e) - pd);
        } else {  // zero and trace gates: scores do not depend on the logits
          S pd = 0;
          for (int e = 0; e < E; ++e) pd += probs(t, e) * dlogits(t, e);
          for (int e = 0; e < E; ++e) dlogits(t, e) = probs(t, e) * (dlogits(t, e) - pd);
        }
        if (wz != S(0)) {
          // z-loss wz / T sum_t lse_t^2 (T over all ranks): d/dlogit = 2 wz lse p / T
          S m = logits(t, 0);
          for (int e = 1; e < E; ++e) m = logits(t, e) > m ? logits(t, e) : m;
          S s = 0;
          for (int e = 0; e < E; ++e) s += impl::exp(logits(t, e) - m);
          const S lse = m + impl::log(s);
          for (int e = 0; e < E; ++e) dlogits(t, e) += S(2) * wz * lse * probs(t, e) / S(tokens_global);
        }
      });
}

/// Host helper: cv^2 = var / (mean^2 + 1e-10), var with Bessel's correction
/// (as torch.var, which FastMoE's noisy gate uses), and its gradient.
inline double cv_squared(const std::vector<double>& v, std::vector<double>* grad) {
  const double n = double(v.size());
  if (v.size() < 2) {
    if (grad) grad->assign(v.size(), 0.0);
    return 0.0;
  }
  double mean = 0;
  for (double x : v) mean += x / n;
  double var = 0;
  for (double x : v) var += (x - mean) * (x - mean) / (n - 1);
  const double den = mean * mean + 1e-10;
  if (grad) {
    grad->resize(v.size());
    for (std::size_t e = 0; e < v.size(); ++e)
      (*grad)[e] = 2 * (v[e] - mean) / (n - 1) / den - var * 2 * mean / (den * den) / n;
  }
  return var / den;
}

// ------------------------------------------------ logits of small gates
/// Most experts of the gate kernels below (gate_logits, and the gate's part
/// of dx summed in the undispatch pass): with more, each token's E dot
/// products cost more than cuBLAS's GEMMs, which then run instead.
constexpr int gate_small_experts = 16;

/// N running sums, the value of gate_logits' vector reductions (TPT
/// tokens x EM experts).
template <class S, int N>
struct GateSums {
  S v[N];
  KOKKOS_INLINE_FUNCTION GateSums() {
    for (int i = 0; i < N; ++i) v[i] = S(0);
  }
  KOKKOS_INLINE_FUNCTION GateSums& operator+=(const GateSums& o) {
    for (int i = 0; i < N; ++i) v[i] += o.v[i];
    return *this;
  }
  KOKKOS_INLINE_FUNCTION void operator+=(const volatile GateSums& o) volatile {
    for (int i = 0; i < N; ++i) v[i] += o.v[i];
  }
};

}  // namespace impl
}  // namespace moka

namespace Kokkos {
template <class S, int N>
struct reduction_identity<moka::impl::GateSums<S, N>> {
  KOKKOS_FORCEINLINE_FUNCTION static moka::impl::GateSums<S, N> sum() { return moka::impl::GateSums<S, N>(); }
};
}  // namespace Kokkos

namespace moka {
namespace impl {

/// wt(e, c) = w(c, e): the gate weights [d, E] transposed, so that the
/// kernels below read E rows of consecutive columns (coalesced) instead of
/// E-element rows at a stride.
template <class Exec, class S, class M>
void transpose_gate_weights(const Exec& space, const gmat<S, M>& w, const gmat<S, M>& wt) {
  Kokkos::parallel_for(
      "moka::gate_weights_transposed", row_major_2d(space, long(wt.extent(0)), long(wt.extent(1))),
      KOKKOS_LAMBDA(long e, long c) { wt(e, c) = w(c, e); });
}

/// out(t, e) = x(t, :) . wt(e, :), E <= EM, TPT tokens per thread, the
/// columns in packs of W (one 16-byte load each where the rows allow): on
/// CUDA a thread is a group of lanes (vector length 4 to 32) that take the
/// packs (x read once, coalesced; wt from cache, reused by the TPT tokens),
/// and one reduction over the lanes (shuffles) sums its TPT x EM dot
/// products; 128 lanes a team. The lanes are as many as give each about 32
/// packs: the reduction costs TPT EM log2(lanes) shuffles per lane, which
/// 32 lanes on 8 packs each paid more for than the loads (H200, ncu: D's
/// 32768 x 1024 x 16 took 121 us at 32 lanes and 2 tokens, 87 at 8 lanes
/// and 8 tokens; A's 16384 x 2048 x 8, 4 tokens, 67 at 32 lanes, 58 at 16,
/// 80 at 8). Host backends: a thread per TPT tokens.
template <int TPT, int EM, int W, class Exec, class S, class M>
void gate_logits_teams(const Exec& space, const gmat<S, M>& x, const gmat<S, M>& wt, const gmat<S, M>& out) {
  using team_policy = Kokkos::TeamPolicy<Exec>;
  using sums        = GateSums<S, TPT * EM>;
  const int T = static_cast<int>(x.extent(0)), d = static_cast<int>(x.extent(1));
  const int E = static_cast<int>(wt.extent(0));
  const long lx = static_cast<long>(x.stride(0)), lw = static_cast<long>(wt.stride(0));
  const S* X  = x.data();
  const S* WT = wt.data();
  int team = 1, lanes = 1;
#ifdef KOKKOS_ENABLE_CUDA
  if (std::is_same<Exec, Kokkos::Cuda>::value) {
    lanes = row_lanes(d / W, 32);
    team  = 128 / lanes;
  }
#endif
  const int per_team = TPT * team;
  Kokkos::parallel_for(
      "moka::gate_logits", team_policy(space, (T + per_team - 1) / per_team, team, lanes),
      KOKKOS_LAMBDA(const typename team_policy::member_type& m) {
        const int t0 = (m.league_rank() * m.team_size() + m.team_rank()) * TPT;
        if (t0 >= T) return;  // a whole thread (all its lanes)
        const int nt = T - t0 < TPT ? T - t0 : TPT;
        sums acc;
        Kokkos::parallel_reduce(
            Kokkos::ThreadVectorRange(m, d / W),
            [&](int cw, sums& a) {
              // The TPT tokens' packs held, each expert's weights loaded once
              // for all of them (registers: TPT W + TPT EM + W).
              Pack<S, W> xv[TPT];
              for (int i = 0; i < TPT; ++i) xv[i] = load_pack<W>(X + long(i < nt ? t0 + i : t0) * lx + long(cw) * W);
              for (int e = 0; e < EM; ++e) {
                const auto w = load_pack<W>(WT + (e < E ? e : E - 1) * lw + long(cw) * W);
                for (int i = 0; i < TPT; ++i)
                  for (int q = 0; q < W; ++q) a.v[i * EM + e] += xv[i].v[q] * w.v[q];
              }
            },
            acc);
        Kokkos::parallel_for(Kokkos::ThreadVectorRange(m, nt * E),
                             [&](int q) { out(t0 + q / E, q % E) = acc.v[(q / E) * EM + q % E]; });
      });
}

/// out = x w for gates of at most gate_small_experts experts, given wt =
/// w^T (transpose_gate_weights), in one pass over x; false (nothing done)
/// for more experts. On an H200, for 16384 x 2048 x 8: 67 us (and 3 us for
/// the transpose) against 122 us of cuBLAS's SGEMM and its split-K pass.
template <class Exec, class S, class M>
bool gate_logits(const Exec& space, const gmat<S, M>& x, const gmat<S, M>& wt, const gmat<S, M>& out) {
  const int E = static_cast<int>(wt.extent(0));
  if (E > gate_small_experts) return false;
  // 16-byte packs where the rows allow: one float per lane and load left
  // too few bytes in flight (99 us for 16384 x 2048 x 8 on an H200, a third
  // of its memory bandwidth; 67 us in packs).
  constexpr int W = 16 / sizeof(S) > 1 ? int(16 / sizeof(S)) : 1;
  const long d    = static_cast<long>(x.extent(1));
  const bool pk   = packs_fit(x, d, W) && packs_fit(wt, d, W);
  if (E <= 8) {
    if (pk) gate_logits_teams<4, 8, W>(space, x, wt, out);
    else gate_logits_teams<4, 8, 1>(space, x, wt, out);
  } else {  // 8 tokens a thread (2: 149 us for D at 8 lanes, 4: 113, 8: 87)
    if (pk) gate_logits_teams<8, gate_small_experts, W>(space, x, wt, out);
    else gate_logits_teams<8, gate_small_experts, 1>(space, x, wt, out);
  }
  return true;
}

}  // namespace impl
}  // namespace moka
