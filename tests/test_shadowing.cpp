// Dynamic shadowing in the layer (MoELayer shadow slots, balance.shadowing)
// at 1, 2 and 4 ranks: training with the hottest experts shadowed every
// step against the same training without shadowing.
//  - outputs, input gradients, and after every optimizer step the weights
//    and Adam's moments equal within round-off (relative 1e-12 in double:
//    an expert's weight-gradient sums are split by rank), with capacity
//    drops (gshard, factor 1) and two micro-batches per step;
//  - a shadowed expert's rows stay on their rank (rows the experts of each
//    rank process equal the rows of its own tokens for shadowed experts);
//  - a bad rule (too many experts, one twice, one outside) is named.
#include "LayerTrainingUtils.hpp"
#include "TestHelpers.hpp"

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <numeric>
#include <random>

namespace {

using moka_test::world_rank;
using moka_test::world_size;

moka::MoEConfig config(int shadow) {
  moka::MoEConfig c = moka_test::small_gshard_config();
  c.shadow_slots    = shadow;
  return c;
}

/// The \p m experts with the most rows over the EP group (ties: the lower).
moka::MoELayer<double, moka::memory_space>::ShadowRule hottest(int m) {
  return [m](const std::vector<std::vector<double>>& per_source, const moka::Placement&) {
    const int E = static_cast<int>(per_source[0].size());
    std::vector<double> total(E, 0.0);
    for (const auto& r : per_source)
      for (int e = 0; e < E; ++e) total[e] += r[e];
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return total[a] > total[b]; });
    order.resize(m);
    return order;
  };
}

template <class M>
using Run = moka_test::AdamLayerRun<M>;
using moka_test::by_expert;

struct Trace {
  std::vector<std::vector<double>> y, dx;
  long shadowed = 0;
  bool local_rows = true;
};

template <class M>
Trace train(Run<M>& run, int steps) {
  using matrix = typename Run<M>::Layer::matrix;
  typename Run<M>::Layer::execution_space space;
  const int d = run.layer.config().d_model, T = 13;
  Trace tr;
  for (int s = 0; s < steps; ++s) {
    run.layer.zero_grad(space);
    for (int mb = 0; mb < 2; ++mb) {
      std::mt19937_64 rng(100 * s + 10 * mb + world_rank());
      matrix X("x", T, d), Y("y", T, d), DY("dy", T, d), DX("dx", T, d);
      moka_test::from_vec(X, moka_test::random_vec(std::size_t(T) * d, rng));
      moka_test::from_vec(DY, moka_test::random_vec(std::size_t(T) * d, rng));
      run.layer.forward(space, X, Y);
      run.layer.backward(space, DY, DX);
      tr.y.push_back(moka_test::to_vec(Y));
      tr.dx.push_back(moka_test::to_vec(DX));
      tr.shadowed += static_cast<long>(run.layer.shadowed().size());
      // Rows processed here = rows of the experts held here + this rank's
      // own rows of the shadowed experts.
      if (!run.layer.shadowed().empty()) {
        auto counts = moka_test::to_vec(run.layer.expert_counts());  // this rank's kept rows; summed over the EP group
        MPI_Allreduce(MPI_IN_PLACE, counts.data(), int(counts.size()), MPI_DOUBLE, MPI_SUM,
                      run.layer.groups()->ep().mpi_comm());
        const auto idx    = moka_test::to_vec(run.layer.slots());
        const auto route  = moka_test::to_vec(run.layer.routed_index());
        long want         = 0;
        const auto& sh    = run.layer.shadowed();
        for (std::size_t i = 0; i < idx.size(); ++i)
          if (idx[i] >= 0 && std::find(sh.begin(), sh.end(), int(route[i])) != sh.end()) ++want;
        std::vector<long> held(counts.size(), 0);
        for (int l = 0; l < run.layer.local_experts(); ++l) held[run.layer.local_expert(l)] = 1;
        // The held, unshadowed experts' rows come from every rank: count them over the group.
        long from_all = 0;
        for (std::size_t e = 0; e < counts.size(); ++e)
          if (held[e] && std::find(sh.begin(), sh.end(), int(e)) == sh.end()) from_all += long(counts[e]);
        tr.local_rows = tr.local_rows && run.layer.expert_rows() == want + from_all;
      }
    }
    run.sync.sync(space);
    run.opt.step(space, run.sync.global_norm(space));
    space.fence();
  }
  return tr;
}

template <class M>
void compare(int ep) {
  moka::ParallelConfig pc;
  pc.expert_parallel = ep;
  pc.backend         = "auto";
  const bool device  = !Kokkos::SpaceAccessibility<Kokkos::HostSpace, M>::accessible;
  auto groups = std::make_shared<moka::ProcessGroups>(MPI_COMM_WORLD, pc, 8, 12, device);
  Run<M> a(config(0), groups, moka::Placement(), 7), b(config(2), groups, moka::Placement(), 7);
  b.layer.set_shadow_rule(hottest(2));
  const std::string at = "EP " + std::to_string(ep) + " of " + std::to_string(world_size()) + " ranks";
  const int steps = 5;
  const Trace ta = train(a, steps), tb = train(b, steps);
  if (ep == 1) {
    EXPECT_EQ(b.layer.shadow_slots(), 0) << at << ": one EP rank has nothing to shadow";
    EXPECT_EQ(tb.y, ta.y) << at;
    return;
  }
  EXPECT_EQ(tb.shadowed, 2L * 2 * steps) << at << ": two experts shadowed in every forward";
  EXPECT_TRUE(tb.local_rows) << at << ": a shadowed expert's rows left their rank";
  EXPECT_EQ(b.layer.local_experts(), 8 / ep) << at;
  double worst = 0;
  for (std::size_t i = 0; i < ta.y.size(); ++i) {
    worst = std::max(worst, moka_test::max_rel_err(tb.y[i], ta.y[i]));
    worst = std::max(worst, moka_test::max_rel_err(tb.dx[i], ta.dx[i]));
  }
  const auto pa = a.layer.parameters(), pb = b.layer.parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (std::size_t i = 0; i < pa.size(); ++i) {
    ASSERT_EQ(pa[i].param.size(), pb[i].param.size()) << at << ": " << pa[i].name << " registered with shadow slots";
    const bool expert = pa[i].tag != moka::ParamTag::gate;
    const auto va = expert ? by_expert(a.layer, pa[i].param) : moka_test::to_vec(pa[i].param);
    const auto vb = expert ? by_expert(b.layer, pb[i].param) : moka_test::to_vec(pb[i].param);
    const double e = moka_test::max_rel_err(vb, va);
    EXPECT_LT(e, 1e-12) << at << ": " << pa[i].name;
    worst = std::max(worst, e);
    const long ia = a.opt.find(pa[i].param.data()), ib = b.opt.find(pb[i].param.data());
    const auto ma = expert ? by_expert(a.layer, a.opt.second_moment(ia)) : moka_test::to_vec(a.opt.second_moment(ia));
    const auto mb = expert ? by_expert(b.layer, b.opt.second_moment(ib)) : moka_test::to_vec(b.opt.second_moment(ib));
    EXPECT_LT(moka_test::max_rel_err(mb, ma), 1e-12) << at << ": Adam's second moment of " << pa[i].name;
  }
  EXPECT_LT(worst, 1e-12) << at;
  EXPECT_GT(worst, 0.0) << at << ": bitwise equal: were the gradients split at all?";
  if (world_rank() == 0) std::cout << at << ": largest relative difference " << worst << "\n";
}

template <class M>
void all_eps() {
  const int W = world_size();
  compare<M>(W);
  if (W == 4) compare<M>(2);  // two EP groups (EDP 2): each shadows on its own counts
}

TEST(Shadowing, HostTrainingWithShadowingEqualsWithout) { all_eps<Kokkos::HostSpace>(); }

#ifdef KOKKOS_ENABLE_CUDA
TEST(Shadowing, DeviceTrainingWithShadowingEqualsWithout) { all_eps<moka::memory_space>(); }
#endif

TEST(Shadowing, BadRulesAreNamed) {
  const int W = world_size();
  if (W == 1) GTEST_SKIP() << "one EP rank: no shadow slots";
  moka::ParallelConfig pc;
  pc.expert_parallel = W;
  auto groups = std::make_shared<moka::ProcessGroups>(MPI_COMM_WORLD, pc, 8, 12, false);
  using Layer = moka::MoELayer<double, Kokkos::HostSpace>;
  using matrix = Layer::matrix;
  Kokkos::DefaultHostExecutionSpace space;
  auto expect_error = [&](Layer::ShadowRule rule, const std::string& what) {
    Layer layer(config(2), groups);
    layer.init_parameters(3);
    layer.set_shadow_rule(std::move(rule));
    matrix X("x", 5, 8), Y("y", 5, 8);
    try {
      layer.forward(space, X, Y);
      ADD_FAILURE() << "no error for " << what;
    } catch (const moka::Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  expect_error([](const auto&, const auto&) { return std::vector<int>{0, 1, 2}; }, "3 experts, the layer has 2 shadow slots");
  expect_error([](const auto&, const auto&) { return std::vector<int>{4, 4}; }, "expert 4 twice");
  expect_error([](const auto&, const auto&) { return std::vector<int>{9}; }, "expert 9 (outside");
  // Slicing and shadowing do not mix: named at construction.
  if (W == 4) {
    moka::ParallelConfig ps;
    ps.expert_parallel = 2, ps.expert_slicing = 2;
    auto gs = std::make_shared<moka::ProcessGroups>(MPI_COMM_WORLD, ps, 8, 12, false);
    try {
      Layer layer(config(2), gs);
      ADD_FAILURE() << "no error for shadowing with slicing";
    } catch (const moka::Error& e) {
      EXPECT_NE(std::string(e.what()).find("parallel.expert_slicing = 1"), std::string::npos) << e.what();
    }
  }
  // Replicas and shadowing do not mix: named at construction.
  std::vector<int> slots;
  for (int r = 0; r < W; ++r)
    for (int l = 0; l < 8 / W + 1; ++l) slots.push_back(l < 8 / W ? r * (8 / W) + l : (r * (8 / W) + 8 / W) % 8);
  try {
    Layer layer(config(2), groups, moka::Placement::from_slots(8, W, slots));
    ADD_FAILURE() << "no error for shadowing with replicas";
  } catch (const moka::Error& e) {
    EXPECT_NE(std::string(e.what()).find("balance.shadowing needs one slot per expert"), std::string::npos) << e.what();
  }
}

}  // namespace
