// The topology-aware gate (gate.max_offnode_share) on a fake multi-node
// layout: parallel.ranks_per_node = world / 2 makes two nodes of 4 ranks
// (at 2 ranks, two nodes of one). Checked against a host reference of the
// rule in double precision (which choices move, where to, their scores),
// the cap itself, the choices it must leave alone, and the backward of the
// capped gate by central differences of the loss over all ranks.
#include <moka/moe/MoELayer.hpp>
#include <moka/parallel/ProcessGroups.hpp>

#include <gtest/gtest.h>

#include "MoETestUtils.hpp"
#include "TestHelpers.hpp"

#include <cmath>
#include <random>

namespace {

using moka_test::world_rank;
using moka_test::world_size;

using Layer  = moka::MoELayer<double, Kokkos::HostSpace>;
using matrix = Layer::matrix;

moka::MoEConfig config(double share, moka::GateType gate = moka::GateType::topk) {
  moka::MoEConfig c;
  c.d_model = 16, c.d_ff = 32, c.num_experts = 8, c.top_k = gate == moka::GateType::switch_top1 ? 1 : 2;
  c.gate = gate, c.dropless = true, c.balance_weight = 0.01, c.jitter_eps = 0;
  c.max_offnode_share = share;
  c.validate();
  return c;
}

std::shared_ptr<moka::ProcessGroups> groups(const moka::MoEConfig& c) {
  moka::ParallelConfig pc;
  pc.expert_parallel = world_size();
  pc.ranks_per_node  = std::max(1, world_size() / 2);
  return std::make_shared<moka::ProcessGroups>(MPI_COMM_WORLD, pc, c.num_experts, c.d_ff, false);
}

matrix input(int T, int d) {
  std::mt19937_64 rng(1000 + world_rank());
  matrix x("x", T, d);
  std::normal_distribution<double> n(0, 1);
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < d; ++j) x(t, j) = n(rng);
  return x;
}

TEST(TopologyGate, CapsOffNodeChoicesAsTheRuleSays) {
  const int T = 64, P = world_size();
  for (auto gate : {moka::GateType::topk, moka::GateType::softmax, moka::GateType::switch_top1})
    for (double share : {0.0, 0.1, 0.25, 0.6}) {
      SCOPED_TRACE(std::string(moka::to_string(gate)) + ", share " + std::to_string(share));
      const moka::MoEConfig free_cfg = config(1.0, gate), cap_cfg = config(share, gate);
      Layer A(free_cfg, groups(free_cfg)), B(cap_cfg, groups(cap_cfg));
      A.init_parameters(7);
      B.init_parameters(7);
      const int d = 16, E = 8, k = free_cfg.top_k, L = E / P;
      matrix x = input(T, d), ya("ya", T, d), yb("yb", T, d);
      A.forward(Kokkos::DefaultHostExecutionSpace(), x, ya);
      B.forward(Kokkos::DefaultHostExecutionSpace(), x, yb);
      EXPECT_FALSE(A.topology_gate());
      EXPECT_EQ(A.offnode_choices(), -1);
      // Nodes: EP rank r (= world rank) on node r / (P / 2); expert e on EP rank e / L.
      const int rpn = std::max(1, P / 2), my_node = world_rank() / rpn;
      std::vector<int> on(E);
      for (int e = 0; e < E; ++e) on[e] = (e / L) / rpn == my_node;
      if (P == 1) {
        EXPECT_FALSE(B.topology_gate());  // one node: nothing to cap
        continue;
      }
      ASSERT_TRUE(B.topology_gate());
      auto on_dev = Kokkos::create_mirror_view_and_copy(Kokkos::HostSpace(), B.experts_on_node());
      for (int e = 0; e < E; ++e) EXPECT_EQ(on_dev(e), on[e]) << e;
      // Host reference: logits in double, the rule applied to A's choices.
      const auto& W = B.params().gate_w;
      std::vector<double> logit(std::size_t(T) * E, 0.0);
      for (int t = 0; t < T; ++t)
        for (int e = 0; e < E; ++e)
          for (int j = 0; j < d; ++j) logit[t * E + e] += x(t, j) * W(j, e);
      const long limit = long(std::floor(share * T * k + 1e-9));
      long n = 0, off_after = 0;
      for (int t = 0; t < T; ++t) {
        std::vector<int> want(k);
        for (int j = 0; j < k; ++j) want[j] = A.expert_index()(t, j);
        for (int j = 0; j < k; ++j) {
          if (on[want[j]]) continue;
          if (n++ < limit) continue;
          int best = -1;
          for (int e = 0; e < E; ++e) {
            if (!on[e] || std::find(want.begin(), want.end(), e) != want.end()) continue;
            if (best < 0 || logit[t * E + e] > logit[t * E + best]) best = e;
          }
          if (best >= 0) want[j] = best;
        }
        // Scores as the gate defines them, from the reference logits.
        double mx = -1e300, z = 0, zall = 0;
        for (int e = 0; e < E; ++e) mx = std::max(mx, logit[t * E + e]);
        for (int e = 0; e < E; ++e) zall += std::exp(logit[t * E + e] - mx);
        for (int j = 0; j < k; ++j) z += std::exp(logit[t * E + want[j]] - mx);
        for (int j = 0; j < k; ++j) {
          EXPECT_EQ(B.expert_index()(t, j), want[j]) << "token " << t << " choice " << j;
          const double p = std::exp(logit[t * E + want[j]] - mx);
          const double s = gate == moka::GateType::topk ? p / z : p / zall;
          EXPECT_NEAR(B.scores()(t, j), s, 1e-12) << "token " << t << " choice " << j;
          off_after += on[want[j]] ? 0 : 1;
        }
      }
      EXPECT_EQ(B.offnode_choices(), off_after);
      // With 4 on-node experts per node and k <= 2 an alternative always exists: the cap holds.
      EXPECT_LE(off_after, limit);
    }
}

TEST(TopologyGate, ShareOneAndOneNodeChangeNothing) {
  const int T = 32, d = 16;
  moka::MoEConfig c = config(1.0);
  Layer A(c, groups(c));
  A.init_parameters(3);
  matrix x = input(T, d), y("y", T, d), y2("y2", T, d);
  A.forward(Kokkos::DefaultHostExecutionSpace(), x, y);
  // Every rank on one node: the gate has nothing to cap.
  moka::MoEConfig c2 = config(0.0);
  moka::ParallelConfig pc;
  pc.expert_parallel = world_size();
  pc.ranks_per_node  = world_size();
  Layer B(c2, std::make_shared<moka::ProcessGroups>(MPI_COMM_WORLD, pc, c2.num_experts, c2.d_ff, false));
  B.init_parameters(3);
  B.forward(Kokkos::DefaultHostExecutionSpace(), x, y2);
  EXPECT_FALSE(B.topology_gate());
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < d; ++j) ASSERT_EQ(y(t, j), y2(t, j));
}

TEST(TopologyGate, BackwardByCentralDifferences) {
  if (world_size() == 1) GTEST_SKIP() << "one rank is one node: the cap does not act";
  const int T = 24, d = 16;
  const moka::MoEConfig c = config(0.2);
  Layer L(c, groups(c));
  L.init_parameters(11);
  L.set_training(false);
  matrix x = input(T, d), y("y", T, d), dy("dy", T, d), dx("dx", T, d);
  std::mt19937_64 rng(77 + world_rank());
  std::uniform_real_distribution<double> u(-1, 1);
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < d; ++j) dy(t, j) = u(rng);
  auto loss = [&] {
    L.forward(Kokkos::DefaultHostExecutionSpace(), x, y);
    double s = 0;
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < d; ++j) s += y(t, j) * dy(t, j);
    s += L.aux_loss() / world_size();  // every rank holds the whole batch's aux loss
    MPI_Allreduce(MPI_IN_PLACE, &s, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    return s;
  };
  L.zero_grad(Kokkos::DefaultHostExecutionSpace());
  L.forward(Kokkos::DefaultHostExecutionSpace(), x, y);
  ASSERT_GT(L.offnode_choices(), -1);
  L.backward(Kokkos::DefaultHostExecutionSpace(), dy, dx);
  auto gw = L.grads().gate_w;
  std::vector<double> g(gw.data(), gw.data() + gw.size());
  MPI_Allreduce(MPI_IN_PLACE, g.data(), int(g.size()), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  auto W       = L.params().gate_w;
  const double h = 1e-6;
  for (int i : {0, 5, 17, 40, 77, 120}) {
    const double w0 = W.data()[i];
    W.data()[i]     = w0 + h;
    const double lp = loss();
    W.data()[i]     = w0 - h;
    const double lm = loss();
    W.data()[i]     = w0;
    EXPECT_NEAR(g[i], (lp - lm) / (2 * h), 1e-6 * std::max(1.0, std::abs(g[i]))) << "gate_w[" << i << "]";
  }
  // dx of token 3 of each rank in turn (only that rank moves its input).
  std::vector<double> fd(d);
  for (int q = 0; q < world_size(); ++q)
    for (int j = 0; j < d; ++j) {
      const double x0 = x(3, j), step = world_rank() == q ? h : 0.0;
      x(3, j)         = x0 + step;
      const double lp = loss();
      x(3, j)         = x0 - step;
      const double lm = loss();
      x(3, j)         = x0;
      if (world_rank() == q) fd[j] = (lp - lm) / (2 * h);
    }
  for (int j = 0; j < d; ++j) EXPECT_NEAR(dx(3, j), fd[j], 1e-6 * std::max(1.0, std::abs(fd[j]))) << j;
}

}  // namespace
