#pragma once
// Helpers shared by the MoE layer tests: moving data between Views and
// std::vector<double>, running forward + backward, finite differences of
// the double-precision reference.

#include <moka/moe/MoELayer.hpp>

#include <gtest/gtest.h>

#include "MoEReference.hpp"
#include "TestHelpers.hpp"

#include <random>
#include <string>
#include <vector>

namespace moka_test {


template <class View>
inline std::vector<double> to_vec(const View& v) {
  auto h = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), v);
  std::vector<double> out(h.size());
  for (std::size_t i = 0; i < h.size(); ++i) out[i] = static_cast<double>(h.data()[i]);
  return out;
}

template <class View>
void from_vec(const View& v, const std::vector<double>& src) {
  auto h = Kokkos::create_mirror_view(Kokkos::HostSpace(), v);
  for (std::size_t i = 0; i < h.size(); ++i) h.data()[i] = static_cast<typename View::non_const_value_type>(src[i]);
  Kokkos::deep_copy(v, h);
}

template <class Layer>
RefParams params_of(const Layer& L) {
  const auto& p = L.params();
  return RefParams{to_vec(p.gate_w), to_vec(p.w1), to_vec(p.b1), to_vec(p.w2), to_vec(p.b2), to_vec(p.noise_w)};
}

template <class Layer>
void set_params(Layer& L, const RefParams& r) {
  auto& p = L.params();
  from_vec(p.gate_w, r.wg);
  from_vec(p.w1, r.w1);
  from_vec(p.b1, r.b1);
  from_vec(p.w2, r.w2);
  from_vec(p.b2, r.b2);
}

inline std::vector<double> random_vec(std::size_t n, std::mt19937_64& rng, double scale = 1.0) {
  std::uniform_real_distribution<double> u(-scale, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = u(rng);
  return v;
}

inline double max_rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::fabs(a[i] - b[i]));
    den = std::max(den, std::fabs(b[i]));
  }
  return num / std::max(den, 1e-300);
}

// Runs forward + backward of a layer<S> on (x, G) and returns y and all gradients.
template <class Layer>
struct Run {
  std::vector<double> y, dx, dwg, dwn, dw1, db1, dw2, db2;
  RefRouting routing;
  std::vector<int> counts;
  moka_test::RefRandom random;  // the draws the forward used
};

template <class Layer>
Run<Layer> run_layer(Layer& L, int T, const std::vector<double>& x, const std::vector<double>& G) {
  using matrix = typename Layer::matrix;
  const int d = L.config().d_model;
  typename Layer::execution_space space;
  matrix X("x", T, d), Y("y", T, d), DY("dy", T, d), DX("dx", T, d);
  from_vec(X, x);
  from_vec(DY, G);
  L.zero_grad(space);
  L.forward(space, X, Y);
  L.backward(space, DY, DX);
  space.fence();
  Run<Layer> r;
  r.y = to_vec(Y);
  r.dx = to_vec(DX);
  const auto& g = L.grads();
  r.dwg = to_vec(g.gate_w);
  r.dwn = to_vec(g.noise_w);
  r.dw1 = to_vec(g.w1);
  r.db1 = to_vec(g.b1);
  r.dw2 = to_vec(g.w2);
  r.db2 = to_vec(g.b2);
  auto idx = to_vec(L.expert_index());
  auto slot = to_vec(L.slots());
  r.routing.idx.assign(idx.begin(), idx.end());
  r.routing.score = to_vec(L.scores());
  for (double s : slot) r.routing.kept.push_back(s >= 0 ? 1 : 0);
  auto c = to_vec(L.expert_counts());
  r.counts.assign(c.begin(), c.end());
  auto route = to_vec(L.routed_index());
  r.routing.route.assign(route.begin(), route.end());
  r.routing.aux = L.aux_loss();
  r.random.training = L.training();
  r.random.noise = to_vec(L.gate_noise());
  r.random.jitter = to_vec(L.gate_jitter());
  r.random.rr = to_vec(L.routing_uniforms());
  return r;
}

inline double loss(const std::vector<double>& y, const std::vector<double>& G) {
  double s = 0;
  for (std::size_t i = 0; i < y.size(); ++i) s += y[i] * G[i];
  return s;
}

// Central differences of the reference loss sum(y * G) with respect to one
// input vector: x itself, or one parameter tensor.
enum class Wrt { x, wg, wn, w1, b1, w2, b2 };
inline std::vector<double> fd_grad(const moka::MoEConfig& cfg, int T, std::vector<double> x, RefParams p,
                            const std::vector<double>& G, Wrt wrt, const moka_test::RefRandom* rnd = nullptr) {
  const double h = 1e-6;
  std::vector<double>* v = nullptr;
  switch (wrt) {
    case Wrt::x: v = &x; break;
    case Wrt::wg: v = &p.wg; break;
    case Wrt::wn: v = &p.wn; break;
    case Wrt::w1: v = &p.w1; break;
    case Wrt::b1: v = &p.b1; break;
    case Wrt::w2: v = &p.w2; break;
    case Wrt::b2: v = &p.b2; break;
  }
  std::vector<double> g(v->size());
  for (std::size_t i = 0; i < v->size(); ++i) {
    const double save = (*v)[i];
    // loss = sum(y G) + the gate's auxiliary losses
    RefRouting r;
    (*v)[i] = save + h;
    double lp = loss(moka_test::ref_forward(cfg, T, x, p, &r, rnd), G) + r.aux;
    (*v)[i] = save - h;
    double lm = loss(moka_test::ref_forward(cfg, T, x, p, &r, rnd), G) + r.aux;
    (*v)[i] = save;
    g[i] = (lp - lm) / (2 * h);
  }
  return g;
}

inline void expect_close(const std::vector<double>& got, const std::vector<double>& want, double atol, double rtol,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (std::size_t i = 0; i < got.size(); ++i) {
    ASSERT_NEAR(got[i], want[i], atol + rtol * std::fabs(want[i])) << what << " element " << i;
  }
}


}  // namespace moka_test
