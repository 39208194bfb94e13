#pragma once
// A plain double-precision reference of the MoE layer: per-token loops, no
// Kokkos, written from the definitions (not from the library's kernels).

#include <moka/MoEConfig.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace moka_test {

struct RefParams {
  std::vector<double> wg, w1, b1, w2, b2;  // [d,E] [E,d,dffin] [E,dffin] [E,dff,d] [E,d]
};

struct RefRouting {
  std::vector<int> idx;       // [T,k]
  std::vector<double> score;  // [T,k]
  std::vector<char> kept;     // [T,k]
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
                                       const RefParams& p, RefRouting* routing = nullptr) {
  const int d = c.d_model, E = c.num_experts, k = c.top_k, dff = c.d_ff, dffin = c.d_ff_in();
  std::vector<int> idx(T * k);
  std::vector<double> score(T * k);
  for (int t = 0; t < T; ++t) {
    std::vector<double> l(E, 0.0);
    for (int e = 0; e < E; ++e)
      for (int i = 0; i < d; ++i) l[e] += x[t * d + i] * p.wg[i * E + e];
    if (c.gate == moka::GateType::zero) {
      for (int j = 0; j < k; ++j) {
        idx[t * k + j]   = 0;
        score[t * k + j] = 1.0 / k;
      }
      continue;
    }
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return l[a] > l[b]; });
    if (c.gate == moka::GateType::topk) {
      double m = l[order[0]], s = 0;
      for (int j = 0; j < k; ++j) s += std::exp(l[order[j]] - m);
      for (int j = 0; j < k; ++j) {
        idx[t * k + j]   = order[j];
        score[t * k + j] = std::exp(l[order[j]] - m) / s;
      }
    } else {
      const double m = *std::max_element(l.begin(), l.end());
      double s = 0, sel = 0;
      for (int e = 0; e < E; ++e) s += std::exp(l[e] - m);
      for (int j = 0; j < k; ++j) sel += std::exp(l[order[j]] - m) / s;
      for (int j = 0; j < k; ++j) {
        idx[t * k + j]   = order[j];
        const double pe  = std::exp(l[order[j]] - m) / s;
        score[t * k + j] = c.renormalize ? pe / sel : pe;
      }
    }
  }
  // Capacity: per expert, the assignments in token order; keep by position or score.
  const long cap = c.capacity(T);
  std::vector<char> kept(T * k, 0);
  for (int e = 0; e < E; ++e) {
    std::vector<int> mine;
    for (int i = 0; i < T * k; ++i)
      if (idx[i] == e) mine.push_back(i);
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
  if (routing) *routing = RefRouting{idx, score, kept};
  return y;
}

}  // namespace moka_test
