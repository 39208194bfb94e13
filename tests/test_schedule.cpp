// Smart scheduling (comm.schedule_degree; FasterMoE) at 1, 2 and 4 ranks:
// the EP exchange in peer groups with each group's rows computed as they
// arrive, in forward and backward, against the unscheduled layer.
//  - outputs and input gradients within 1e-13 (each row's GEMMs and
//    activation, on row blocks of other sizes), weight gradients within
//    round-off (an expert's row sums are split by peer group), weights and
//    Adam's moments within round-off after 4 training steps of two
//    micro-batches; at every degree from 2 to EP, with capacity drops, with
//    replicas in spare slots and with shadowing;
//  - the scheduled path ran (in the number of groups asked, capped at EP);
//  - bad values are named.
#include "LayerTrainingUtils.hpp"
#include "TestHelpers.hpp"

#include <moka/model/Optimizer.hpp>
#include <moka/parallel/GradSync.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <numeric>
#include <random>

namespace {

using moka_test::world_rank;
using moka_test::world_size;

moka::MoEConfig config(moka::Activation act = moka::Activation::gelu_erf, int shadow = 0) {
  moka::MoEConfig c = moka_test::small_gshard_config();
  c.activation      = act;
  c.shadow_slots    = shadow;
  return c;
}

template <class M>
std::shared_ptr<moka::ProcessGroups> groups(int ep, int degree) {
  moka::ParallelConfig pc;
  pc.expert_parallel = ep;
  pc.backend         = "auto";
  pc.schedule_degree = degree;
  return std::make_shared<moka::ProcessGroups>(MPI_COMM_WORLD, pc, 8, 12,
                                               !Kokkos::SpaceAccessibility<Kokkos::HostSpace, M>::accessible);
}

template <class M>
using LayerRun = moka_test::AdamLayerRun<M>;

struct Trace {
  std::vector<std::vector<double>> y, dx, grads;
  int phases = 1;
  bool scheduled = true;
};

template <class M>
Trace train(LayerRun<M>& run, int steps) {
  using Layer = typename LayerRun<M>::Layer;
  typename Layer::execution_space space;
  const int d = 8, T = 13;
  Trace tr;
  for (int s = 0; s < steps; ++s) {
    run.layer.zero_grad(space);
    for (int mb = 0; mb < 2; ++mb) {
      std::mt19937_64 rng(1000 * s + 10 * mb + world_rank());
      typename Layer::matrix X("x", T, d), Y("y", T, d), DY("dy", T, d), DX("dx", T, d);
      moka_test::from_vec(X, moka_test::random_vec(std::size_t(T) * d, rng));
      moka_test::from_vec(DY, moka_test::random_vec(std::size_t(T) * d, rng));
      run.layer.forward(space, X, Y);
      run.layer.backward(space, DY, DX);
      tr.y.push_back(moka_test::to_vec(Y));
      tr.dx.push_back(moka_test::to_vec(DX));
      tr.scheduled = tr.scheduled && run.layer.exchange_scheduled();
      tr.phases    = run.layer.schedule_phases();
    }
    for (const auto& p : run.layer.parameters()) tr.grads.push_back(moka_test::to_vec(p.grad));
    run.sync.sync(space);
    run.opt.step(space, run.sync.global_norm(space));
  }
  return tr;
}

template <class M>
void compare(int ep, int degree, const moka::Placement& place, int shadow, moka::Activation act) {
  const std::string at = "EP " + std::to_string(ep) + " of " + std::to_string(world_size()) + ", degree " +
                         std::to_string(degree) + (place.empty() ? "" : ", replicas") +
                         (shadow ? ", shadowing" : "") + (act == moka::Activation::swiglu ? ", swiglu" : "");
  LayerRun<M> a(config(act, shadow), groups<M>(ep, 1), place, 11), b(config(act, shadow), groups<M>(ep, degree), place, 11);
  if (shadow) {
    auto rule = [](const std::vector<std::vector<double>>& src, const moka::Placement&) {
      std::vector<double> tot(src[0].size(), 0.0);
      for (const auto& r : src)
        for (std::size_t e = 0; e < r.size(); ++e) tot[e] += r[e];
      return std::vector<int>{int(std::max_element(tot.begin(), tot.end()) - tot.begin())};
    };
    a.layer.set_shadow_rule(rule);
    b.layer.set_shadow_rule(rule);
  }
  const int steps = 4;
  const Trace ta = train(a, steps), tb = train(b, steps);
  EXPECT_FALSE(ta.scheduled) << at;
  EXPECT_TRUE(tb.scheduled) << at << ": the scheduled path did not run";
  EXPECT_EQ(tb.phases, std::min(degree, ep)) << at;
  // Outputs and input gradients: each row's own GEMMs, on row blocks of
  // another size (the host GEMM need not round a row alike in every block).
  double worst = 0, worst_y = 0;
  long bitwise = 0;
  for (std::size_t i = 0; i < ta.y.size(); ++i) {
    worst_y = std::max({worst_y, moka_test::max_rel_err(tb.y[i], ta.y[i]), moka_test::max_rel_err(tb.dx[i], ta.dx[i])});
    bitwise += tb.y[i] == ta.y[i] && tb.dx[i] == ta.dx[i];
  }
  MPI_Allreduce(MPI_IN_PLACE, &worst_y, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  EXPECT_LT(worst_y, 1e-13) << at << ": outputs or input gradients";
  for (std::size_t i = 0; i < ta.grads.size(); ++i) worst = std::max(worst, moka_test::max_rel_err(tb.grads[i], ta.grads[i]));
  const auto pa = a.layer.parameters(), pb = b.layer.parameters();
  for (std::size_t i = 0; i < pa.size(); ++i) {
    worst = std::max(worst, moka_test::max_rel_err(moka_test::to_vec(pb[i].param), moka_test::to_vec(pa[i].param)));
    const long ia = a.opt.find(pa[i].param.data()), ib = b.opt.find(pb[i].param.data());
    worst = std::max(worst, moka_test::max_rel_err(moka_test::to_vec(b.opt.second_moment(ib)),
                                                   moka_test::to_vec(a.opt.second_moment(ia))));
  }
  MPI_Allreduce(MPI_IN_PLACE, &worst, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  EXPECT_LT(worst, 1e-12) << at;
  if (world_rank() == 0)
    std::cout << at << ": outputs within " << worst_y << " (" << bitwise << " of " << ta.y.size()
              << " micro-batches bitwise on rank 0); gradients, weights and moments within " << worst << "\n";
}

template <class M>
void all_cases() {
  const int W = world_size();
  if (W == 1) {
    // One EP rank: nothing moves, nothing to schedule.
    LayerRun<M> b(config(), groups<M>(1, 4), moka::Placement(), 11);
    const Trace t = train(b, 1);
    EXPECT_FALSE(t.scheduled);
    return;
  }
  std::vector<int> eps{W};
  if (W == 4) eps.push_back(2);
  for (int ep : eps) {
    for (int degree = 2; degree <= ep + 1; ++degree)
      compare<M>(ep, degree, moka::Placement(), 0, moka::Activation::gelu_erf);
    compare<M>(ep, ep, moka::Placement(), 0, moka::Activation::swiglu);
    // One spare slot per rank holding the next rank's first expert (replicas).
    const int L = 8 / ep;
    std::vector<int> slots;
    for (int r = 0; r < ep; ++r) {
      for (int l = 0; l < L; ++l) slots.push_back(r * L + l);
      slots.push_back(((r + 1) % ep) * L);
    }
    compare<M>(ep, ep, moka::Placement::from_slots(8, ep, slots), 0, moka::Activation::gelu_erf);
    compare<M>(ep, ep, moka::Placement(), 2, moka::Activation::gelu_erf);
    if (moka_test::any_rank_failed()) return;
  }
}

TEST(Schedule, HostLayerEqualsTheUnscheduledLayer) { all_cases<Kokkos::HostSpace>(); }

#ifdef KOKKOS_ENABLE_CUDA
TEST(Schedule, DeviceLayerEqualsTheUnscheduledLayer) { all_cases<moka::memory_space>(); }
#endif

TEST(Schedule, BadValuesAreNamed) {
  moka::ParallelConfig pc;
  pc.schedule_degree = 0;
  EXPECT_NE(moka_test::error_of([&] { pc.validate(1, 8, 12); }).find("comm.schedule_degree = 0 must be at least 1"),
            std::string::npos);
  pc.schedule_degree = 2;
  pc.exchange_direct = "on";
  EXPECT_NE(moka_test::error_of([&] { pc.validate(1, 8, 12); }).find("comm.exchange_direct = on"), std::string::npos);
}

}  // namespace
