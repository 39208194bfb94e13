#pragma once
// A plain double-precision reference of the MoE layer: per-token loops, no
// Kokkos, written from the definitions (not from the library's kernels).

#include <moka/moe/MoEConfig.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace moka_test {

struct RefParams {
  std::vector<double> wg, w1, b1, w2, b2;  // [d,E] [E,d,dffin] [E,dffin] [E,dff,d] [E,d]
  std::vector<double> wn;                  // [d,E] noisy gate
};

/// The random draws of one forward (taken from the layer) and the mode.
struct RefRandom {
  bool training = true;
  std::vector<double> noise;     // [T,E] noisy gate
  std::vector<double> jitter;    // [T,d] switch gate (empty: none)
  std::vector<double> rr;        // [T]   gshard random routing
  std::vector<double> sel_bias;  // [E]   bias balancing (empty: none)
  std::vector<long> trace_counts;  // per expert, already scaled to T k (trace gate)
};

inline double ref_cv2(const std::vector<double>& v) {
  const double n = double(v.size());
  double mean = 0, var = 0;
  for (double x : v) mean += x / n;
  for (double x : v) var += (x - mean) * (x - mean) / (n - 1);
  return var / (mean * mean + 1e-10);
}

struct RefRouting {
  std::vector<int> idx;       // [T,k]
  std::vector<double> score;  // [T,k]
  std::vector<char> kept;     // [T,k]
  std::vector<int> route;     // [T,k], -1 where random routing dropped
  double aux = 0;             // weighted balance loss + z-loss
};

inline double ref_act(moka::Activation a, double x) {
  switch (a) {
    case moka::Activation::gelu_erf: return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0)));
    case moka::Activation::gelu_tanh:
      return 0.5 * x * (1 + std::tanh(std::sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
    case moka::Activation::relu: return x > 0 ? x : 0;
    case moka::Activation::silu:
    case moka::Activation::swiglu: return x / (1 + std::exp(-x));
  }
  return x;
}

/// y[T,d] for x[T,d]; fills the routing when \p routing is given.
inline std::vector<double> ref_forward(const moka::MoEConfig& c, int T, const std::vector<double>& x,
                                       const RefParams& p, RefRouting* routing = nullptr,
                                       const RefRandom* random = nullptr) {
  const int d = c.d_model, E = c.num_experts, k = c.top_k, dff = c.d_ff, dffin = c.d_ff_in();
  std::vector<int> idx(T * k), route(T * k);
  std::vector<double> score(T * k);
  const RefRandom rnd = random ? *random : RefRandom{};
  const bool training = rnd.training;
  std::vector<double> probs(T * E), logits_all(T * E), clean_all(T * E), std_all(T * E);
  std::vector<int> thr_in(T, -1), thr_out(T, -1);
  double zsum = 0;
  for (int t = 0; t < T; ++t) {
    std::vector<double> xg(d);
    for (int i = 0; i < d; ++i)
      xg[i] = x[t * d + i] * (rnd.jitter.empty() ? 1.0 : rnd.jitter[t * d + i]);
    std::vector<double> l(E, 0.0);
    for (int e = 0; e < E; ++e) {
      double cl = 0;
      for (int i = 0; i < d; ++i) cl += xg[i] * p.wg[i * E + e];
      clean_all[t * E + e] = cl;
      l[e] = cl;
      if (c.gate == moka::GateType::noisy) {
        double raw = 0;
        for (int i = 0; i < d; ++i) raw += xg[i] * p.wn[i * E + e];
        const double sd = std::log1p(std::exp(raw)) + 1e-2;
        std_all[t * E + e] = sd;
        if (training) l[e] = cl + rnd.noise[t * E + e] * sd;
      }
      logits_all[t * E + e] = l[e];
    }
    const double m = *std::max_element(l.begin(), l.end());
    double s = 0;
    for (int e = 0; e < E; ++e) s += std::exp(l[e] - m);
    for (int e = 0; e < E; ++e) probs[t * E + e] = std::exp(l[e] - m) / s;
    const double lse = m + std::log(s);
    zsum += lse * lse;
    if (c.gate == moka::GateType::zero) {
      for (int j = 0; j < k; ++j) {
        idx[t * k + j]   = 0;
        score[t * k + j] = 1.0 / k;
      }
      continue;
    }
    if (c.gate == moka::GateType::trace) continue;  // assigned below
    std::vector<double> sel(l);
    if (!rnd.sel_bias.empty())
      for (int e = 0; e < E; ++e) sel[e] += rnd.sel_bias[e];
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return sel[a] > sel[b]; });
    for (int j = 0; j < k; ++j) idx[t * k + j] = order[j];
    if (c.gate == moka::GateType::noisy) {
      thr_in[t]  = order[k];
      thr_out[t] = order[k - 1];
    }
    if (c.gate == moka::GateType::topk || c.gate == moka::GateType::noisy) {
      double mm = l[order[0]], ss = 0;
      for (int j = 1; j < k; ++j) mm = std::max(mm, l[order[j]]);
      for (int j = 0; j < k; ++j) ss += std::exp(l[order[j]] - mm);
      for (int j = 0; j < k; ++j) score[t * k + j] = std::exp(l[order[j]] - mm) / ss;
    } else {
      double selp = 0;
      for (int j = 0; j < k; ++j) selp += probs[t * E + order[j]];
      const bool renorm = c.renormalize || c.gate == moka::GateType::gshard;
      for (int j = 0; j < k; ++j) score[t * k + j] = probs[t * E + order[j]] / (renorm ? selp : 1.0);
    }
  }
  if (c.gate == moka::GateType::trace) {
    std::vector<long> cum(E + 1, 0);
    for (int e = 0; e < E; ++e) cum[e + 1] = cum[e] + rnd.trace_counts[e];
    for (int i = 0; i < T * k; ++i) {
      const int j = i / T, t = i % T;
      int e = 0;
      while (e + 1 < E && cum[e + 1] <= i) ++e;
      idx[t * k + j]   = e;
      score[t * k + j] = 1.0 / k;
    }
  }
  route = idx;
  if (c.gate == moka::GateType::gshard && training && c.random_routing)
    for (int t = 0; t < T; ++t)
      if (2 * score[t * k + 1] < rnd.rr[t]) route[t * k + 1] = -1;
  double aux = c.z_loss_weight * zsum / T;
  if (c.balance_weight > 0 && (c.gate == moka::GateType::gshard || c.gate == moka::GateType::switch_top1)) {
    double l = 0;
    for (int e = 0; e < E; ++e) {
      double f = 0, mp = 0;
      for (int t = 0; t < T; ++t) {
        f += idx[t * k] == e ? 1.0 / T : 0.0;
        mp += probs[t * E + e] / T;
      }
      l += f * mp;
    }
    aux += c.balance_weight * E * l;
  }
  if (c.balance_weight > 0 && c.gate == moka::GateType::noisy) {
    std::vector<double> imp(E, 0.0), load(E, 0.0);
    for (int t = 0; t < T; ++t)
      for (int e = 0; e < E; ++e) {
        bool in = false;
        for (int j = 0; j < k; ++j)
          if (idx[t * k + j] == e) {
            imp[e] += score[t * k + j];
            in = true;
          }
        if (training) {
          const double th = logits_all[t * E + (in ? thr_in[t] : thr_out[t])];
          const double z = (clean_all[t * E + e] - th) / std_all[t * E + e];
          load[e] += 0.5 * (1 + std::erf(z / std::sqrt(2.0)));
        } else {
          load[e] += in ? 1.0 : 0.0;
        }
      }
    aux += c.balance_weight * (ref_cv2(imp) + ref_cv2(load));
  }
  // Capacity: per expert, the assignments in token order; keep by position or score.
  const long cap = c.capacity(T, training);
  std::vector<char> kept(T * k, 0);
  for (int e = 0; e < E; ++e) {
    std::vector<int> mine;
    for (int i = 0; i < T * k; ++i)
      if (route[i] == e) mine.push_back(i);
    if (c.drop_policy == moka::DropPolicy::score)
      std::stable_sort(mine.begin(), mine.end(), [&](int a, int b) { return score[a] > score[b]; });
    for (std::size_t r = 0; r < mine.size() && long(r) < cap; ++r) kept[mine[r]] = 1;
  }
  std::vector<double> y(T * d, 0.0);
  for (int t = 0; t < T; ++t) {
    for (int j = 0; j < k; ++j) {
      const int i = t * k + j;
      if (!kept[i]) continue;
      const int e = idx[i];
      std::vector<double> hp(dffin, 0.0), h(dff, 0.0);
      for (int o = 0; o < dffin; ++o) {
        double a = c.expert_bias ? p.b1[e * dffin + o] : 0.0;
        for (int q = 0; q < d; ++q) a += x[t * d + q] * p.w1[(e * d + q) * dffin + o];
        hp[o] = a;
      }
      for (int o = 0; o < dff; ++o)
        h[o] = c.activation == moka::Activation::swiglu ? ref_act(c.activation, hp[o]) * hp[dff + o]
                                                         : ref_act(c.activation, hp[o]);
      for (int q = 0; q < d; ++q) {
        double a = c.expert_bias ? p.b2[e * d + q] : 0.0;
        for (int o = 0; o < dff; ++o) a += h[o] * p.w2[(e * dff + o) * d + q];
        y[t * d + q] += score[i] * a;
      }
    }
  }
  if (routing) *routing = RefRouting{idx, score, kept, route, aux};
  return y;
}

}  // namespace moka_test
