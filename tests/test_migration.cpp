// Expert migration (moka::migrate_experts) at 1, 2 and 4 ranks: training
// with placement changes at random steps against training without them.
//  - no replication: bitwise the same outputs, weights and optimizer moments;
//  - with replicas added and dropped: the same within round-off (replica
//    gradients are summed in another order: relative 1e-12 in double), and
//    every replica of an expert bitwise equal to the others at every step;
//  - a migration between two backward calls of one accumulation window
//    loses nothing (bitwise).
#include "LayerTrainingUtils.hpp"
#include "TestHelpers.hpp"

#include <moka/balance/Migration.hpp>
#include <moka/parallel/GradSync.hpp>
#include <moka/train/Trainer.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <sstream>

namespace {

using moka::Placement;
using moka_test::world_rank;
using moka_test::world_size;

using moka_test::small_gshard_config;

/// A random placement of E experts on P ranks with L slots each; slots past
/// E / P hold replicas (never two of one expert on a rank). Drawn from
/// \p rng, the same on every rank.
Placement random_placement(int E, int P, int L, std::mt19937_64& rng) {
  std::vector<int> experts(E);
  for (int e = 0; e < E; ++e) experts[e] = e;
  std::shuffle(experts.begin(), experts.end(), rng);
  const int base = E / P;
  std::vector<int> slots(std::size_t(P) * L);
  for (int r = 0; r < P; ++r) {
    for (int l = 0; l < base; ++l) slots[r * L + l] = experts[r * base + l];
    for (int l = base; l < L; ++l) {
      int e;
      do {
        e = static_cast<int>(rng() % E);
      } while (std::find(slots.begin() + r * L, slots.begin() + r * L + l, e) != slots.begin() + r * L + l);
      slots[r * L + l] = e;
    }
    std::shuffle(slots.begin() + r * L, slots.begin() + (r + 1) * L, rng);
  }
  return Placement::from_slots(E, P, slots);
}

template <class M>
using Run = moka_test::AdamLayerRun<M>;
using moka_test::by_expert;

/// Whether every replica of every expert holds bitwise the same values of
/// \p v (max and min over the holders agree).
template <class Layer, class View>
bool replicas_identical(const Layer& layer, const View& v) {
  const int L = layer.local_experts(), E = layer.config().num_experts;
  const auto h = moka_test::to_vec(v);
  const long n = static_cast<long>(h.size()) / L;
  std::vector<double> hi(std::size_t(E) * n, -std::numeric_limits<double>::infinity());
  std::vector<double> lo(std::size_t(E) * n, std::numeric_limits<double>::infinity());
  for (int l = 0; l < L; ++l)
    for (long i = 0; i < n; ++i) {
      const std::size_t at = std::size_t(layer.local_expert(l)) * n + i;
      hi[at] = h[l * n + i];
      lo[at] = h[l * n + i];
    }
  MPI_Comm c = layer.groups()->ep().mpi_comm();
  MPI_Allreduce(MPI_IN_PLACE, hi.data(), int(hi.size()), MPI_DOUBLE, MPI_MAX, c);
  MPI_Allreduce(MPI_IN_PLACE, lo.data(), int(lo.size()), MPI_DOUBLE, MPI_MIN, c);
  return hi == lo;
}

/// Trains \p steps steps of 2 micro-batches each; before the micro-batch
/// (step, mb) listed in \p moves, migrates to the placement drawn there.
/// Returns each step's outputs (this rank's rows).
template <class M>
std::vector<std::vector<double>> train(Run<M>& run, int steps, int spare, const std::vector<std::pair<int, int>>& moves,
                                       std::mt19937_64& placements) {
  using matrix = typename Run<M>::Layer::matrix;
  typename Run<M>::Layer::execution_space space;
  const auto& cfg = run.layer.config();
  const int d = cfg.d_model, T = 11;
  const int P = run.groups->ep_size();
  std::vector<std::vector<double>> ys;
  for (int s = 0; s < steps; ++s) {
    run.layer.zero_grad(space);
    for (int mb = 0; mb < 2; ++mb) {
      if (std::find(moves.begin(), moves.end(), std::make_pair(s, mb)) != moves.end()) {
        const Placement p = random_placement(cfg.num_experts, P, cfg.num_experts / P + spare, placements);
        moka::migrate_experts(space, run.layer, &run.opt, p, 1e-3);  // a tiny budget: several rounds
      }
      std::mt19937_64 rng(100 * s + 10 * mb + world_rank());
      matrix X("x", T, d), Y("y", T, d), DY("dy", T, d), DX("dx", T, d);
      moka_test::from_vec(X, moka_test::random_vec(std::size_t(T) * d, rng));
      moka_test::from_vec(DY, moka_test::random_vec(std::size_t(T) * d, rng));
      run.layer.forward(space, X, Y);
      run.layer.backward(space, DY, DX);
      ys.push_back(moka_test::to_vec(Y));
    }
    run.sync.sync(space);
    run.opt.step(space, run.sync.global_norm(space));
    space.fence();
  }
  return ys;
}

template <class M>
void compare_runs(int ep, int spare, bool exact, const std::vector<std::pair<int, int>>& moves) {
  moka::ParallelConfig pc;
  pc.expert_parallel = ep;
  pc.backend         = "auto";
  const moka::MoEConfig cfg = small_gshard_config();
  const bool device = !Kokkos::SpaceAccessibility<Kokkos::HostSpace, M>::accessible;
  auto groups = std::make_shared<moka::ProcessGroups>(MPI_COMM_WORLD, pc, cfg.num_experts, cfg.d_ff, device);
  const int L = cfg.num_experts / ep;
  std::mt19937_64 placements(42);
  Run<M> a(cfg, groups, Placement(), 7);
  Run<M> b(cfg, groups, random_placement(cfg.num_experts, ep, L + spare, placements), 7);
  const int steps = 6;
  std::mt19937_64 none(1);
  const auto ya = train(a, steps, 0, {}, none);
  const auto yb = train(b, steps, spare, moves, placements);
  const std::string at = "EP " + std::to_string(ep) + ", " + std::to_string(spare) + " spare slot(s) per rank";
  double worst = 0;
  for (std::size_t i = 0; i < ya.size(); ++i) {
    if (exact) EXPECT_EQ(yb[i], ya[i]) << at << ": outputs of micro-batch " << i;
    worst = std::max(worst, moka_test::max_rel_err(yb[i], ya[i]));
  }
  auto check = [&](const char* what, auto va, auto vb) {
    const auto ea = by_expert(a.layer, va), eb = by_expert(b.layer, vb);
    if (exact) EXPECT_EQ(eb, ea) << at << ": " << what;
    worst = std::max(worst, moka_test::max_rel_err(eb, ea));
    if (spare > 0) EXPECT_TRUE(replicas_identical(b.layer, vb)) << at << ": replicas of " << what << " differ";
  };
  check("W1", a.layer.params().w1, b.layer.params().w1);
  check("W2", a.layer.params().w2, b.layer.params().w2);
  check("b1", a.layer.params().b1, b.layer.params().b1);
  check("b2", a.layer.params().b2, b.layer.params().b2);
  // Adam's moments of W1 moved with the experts too.
  const long ia = a.opt.find(a.layer.params().w1.data()), ib = b.opt.find(b.layer.params().w1.data());
  check("W1's second moment", a.opt.second_moment(ia), b.opt.second_moment(ib));
  if (!exact) EXPECT_LT(worst, 1e-12) << at;
  if (world_rank() == 0) std::cout << at << ": largest relative difference " << worst << "\n";
}

template <class M>
void all_cases() {
  const int W = world_size();
  std::vector<int> eps{W};
  if (W == 4) eps.push_back(2);
  // Placement changes before random micro-batches, including the second
  // micro-batch of a step (between two backward calls of one window).
  const std::vector<std::pair<int, int>> moves{{1, 0}, {2, 1}, {3, 0}, {3, 1}, {5, 1}};
  for (int ep : eps) {
    compare_runs<M>(ep, 0, true, moves);
    if (ep > 1) compare_runs<M>(ep, 1, false, {});
    if (ep > 1) compare_runs<M>(ep, 1, false, moves);  // replicas added, moved and dropped
    if (moka_test::any_rank_failed()) return;
  }
}

TEST(Migration, PlanIsOrderedAndBounded) {
  // A cycle (rank 0 <-> rank 1) and a chain; every slot read before it is overwritten.
  const Placement from = Placement::from_slots(4, 2, {0, 1, 2, 3});
  const Placement to   = Placement::from_slots(4, 2, {2, 0, 1, 3});
  const auto plan      = moka::MigrationPlan::make(from, to, 10, 10);
  ASSERT_EQ(plan.moves.size(), 3u);
  for (const auto& m : plan.moves)
    for (const auto& w : plan.moves)
      if (w.to == m.from) EXPECT_LE(m.round, w.round) << "slot (" << m.from.rank << ", " << m.from.local << ")";
  EXPECT_EQ(plan.remote_moves(), 2);  // experts 2 and 1 change ranks; expert 0 moves within rank 0
  EXPECT_EQ(plan.moved_experts, 2);
  // A budget of one slot per rank and round takes more than one round.
  EXPECT_GE(plan.rounds, 1);
  // Shapes must agree.
  EXPECT_NE(moka_test::error_of([&] { moka::MigrationPlan::make(from, Placement::contiguous(4, 1), 1, 1); })
                .find("placements of different shapes"),
            std::string::npos);
}

TEST(Migration, HostTrainingWithMigrationsEqualsWithout) { all_cases<Kokkos::HostSpace>(); }

#ifdef KOKKOS_ENABLE_CUDA
TEST(Migration, DeviceTrainingWithMigrationsEqualsWithout) { all_cases<moka::memory_space>(); }
#endif

}  // namespace

namespace {

// moka-train's loop with the balancer: the trace gate walks the fixture
// trace (skewed routing), the moka policy re-plans every 3 steps. Without
// spare slots every migration is a move of whole experts: the losses are
// bitwise those of static placement. With a spare slot per rank, replicas
// come and go: the same within round-off (fp64).
TEST(Migration, TrainingUnderBalancerEqualsStatic) {
  const int W = world_size();
  if (W == 1) GTEST_SKIP() << "the balancer moves experts between ranks: 2 or 4 ranks";
  const std::string base =
      "run.name = balance_test\nio.metrics_file = none\ntask.train_size = 512\ntask.test_size = 96\n"
      "model.blocks = 2\nmoe.d_model = 8\nmoe.d_ff = 16\nmoe.num_experts = 32\nmoe.top_k = 2\n"
      "gate.type = trace\ngate.trace_file = " + moka_test::data_file("gpt_moe_32e_cut.h5") + "\n"
      "gate.trace_iteration = 0\ntrain.precision = fp64\ntrain.steps = 12\ntrain.batch_size = 64\n"
      "train.lr = 3e-3\nio.log_every = 100\nio.eval_every = 6\nparallel.expert_parallel = " + std::to_string(W) +
      "\nbalance.interval = 3\nbalance.migration_gbs = 1e6\nbalance.row_ns = 1000\n";
  auto run = [&](const std::string& extra) {
    auto deck = moka::InputDeck::parse_string(base + extra, "balance.deck");
    deck.validate(moka::train_schema());
    std::ostringstream log;
    const auto r = moka::train_regime_model(MPI_COMM_WORLD, deck, log);
    return std::make_pair(r, log.str());
  };
  const auto st  = run("balance.policy = static\n");
  const auto mk  = run("balance.policy = moka\n");
  const auto rep = run("balance.policy = moka\nbalance.slots_per_rank = " + std::to_string(32 / W + 1) + "\n");
  if (world_rank() == 0) {
    EXPECT_NE(mk.second.find("balance: step 3 layer 0 moka"), std::string::npos) << mk.second;
    EXPECT_NE(rep.second.find("experts replicated"), std::string::npos) << rep.second;
  }
  EXPECT_EQ(mk.first.final_train_loss, st.first.final_train_loss);
  EXPECT_EQ(mk.first.final_test_loss, st.first.final_test_loss);
  EXPECT_NEAR(rep.first.final_train_loss, st.first.final_train_loss, 1e-12 * st.first.final_train_loss);
  EXPECT_NEAR(rep.first.final_test_loss, st.first.final_test_loss, 1e-12 * st.first.final_test_loss);
}

}  // namespace
