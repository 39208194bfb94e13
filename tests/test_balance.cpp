// The balancer's host parts: load prediction, the replica split, the
// policies (static, smartmoe, moka) and placements made from layouts.
#include "TestHelpers.hpp"

#include <moka/balance/BalanceConfig.hpp>
#include <moka/balance/LoadMonitor.hpp>
#include <moka/balance/Policy.hpp>
#include <moka/parallel/ReplicaSplit.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>

namespace {

using moka::RankExperts;
using moka_test::error_of;

TEST(LoadMonitor, PredictorsAndState) {
  moka::LoadPredictorConfig c;
  c.ema_decay = 0.5;
  c.window    = 2;
  moka::LoadMonitor m(2, 3, c);
  m.record(0, {4, 0, 2});
  m.record(0, {0, 4, 2});
  m.record(0, {2, 2, 8});
  // ema: 4 -> 2 -> 2 ; 0 -> 2 -> 2 ; 2 -> 2 -> 5
  EXPECT_EQ(m.predicted(0), (std::vector<double>{2, 2, 5}));
  EXPECT_EQ(m.predicted(1), (std::vector<double>{0, 0, 0}));  // nothing recorded
  EXPECT_EQ(m.history(0).size(), 2u);                          // the window
  EXPECT_EQ(m.steps(0), 3);
  moka::LoadPredictorConfig w = c;
  w.predictor = "window";
  moka::LoadMonitor mw(1, 3, w);
  for (auto v : {std::vector<double>{4, 0, 2}, {0, 4, 2}, {2, 2, 8}}) mw.record(0, v);
  EXPECT_EQ(mw.predicted(0), (std::vector<double>{1, 3, 5}));  // mean of the last two
  // The state round-trips exactly.
  moka::LoadMonitor back(2, 3, c);
  back.set_state(m.state());
  EXPECT_EQ(back.predicted(0), m.predicted(0));
  EXPECT_EQ(back.state(), m.state());
  EXPECT_NE(error_of([&] { moka::LoadMonitor(1, 4, c).set_state(m.state()); }).find("this monitor 1 x 4"),
            std::string::npos);
  EXPECT_NE(error_of([&] { m.record(0, {1, 2}); }).find("2 counts for 3 experts"), std::string::npos);
  moka::LoadPredictorConfig bad;
  bad.predictor = "oracle";
  EXPECT_NE(error_of([&] { bad.validate(); }).find("balance.predictor = 'oracle'"), std::string::npos);
}

TEST(ReplicaSplit, WaterFillsWholeRows) {
  // Rank 0 holds expert 0 (10 rows) and a replica of 2; rank 1 holds
  // expert 1 (2 rows) and the other replica of 2 (20 rows): 2's rows fill
  // rank 1 first, then both to a common level: (10 + 2 + 20) / 2 = 16.
  const RankExperts layout{{0, 2}, {1, 2}};
  const auto s = moka::split_replica_rows(layout, {10, 2, 20}, true);
  EXPECT_EQ(s[0][1] + s[1][1], 20);
  EXPECT_EQ(s[0][0] + s[0][1], 16);
  EXPECT_EQ(s[1][0] + s[1][1], 16);
  // Whole rows with an odd total: shares sum to the count.
  const auto t = moka::split_replica_rows({{2}, {2}, {2}}, {0, 0, 7}, true);
  EXPECT_EQ(t[0][0] + t[1][0] + t[2][0], 7);
  for (const auto& r : t) EXPECT_EQ(r[0], std::floor(r[0]));
}

TEST(Policy, StaticSmartmoeAndMoka) {
  // 8 experts on 4 ranks, 2 slots each; experts 0 and 1 (both on rank 0) are hot.
  const std::vector<double> load{40, 30, 5, 5, 5, 5, 5, 5};
  const RankExperts cur = moka::contiguous_layout(8, 4);
  moka::PlanCost cost;
  cost.row_seconds = 1e-6;
  cost.slot_bytes  = 1e6;
  cost.bandwidth   = 1e12;
  const auto st = moka::plan_placement(moka::BalancePolicy::static_placement, load, cur, 2, cost);
  EXPECT_FALSE(st.changed);
  EXPECT_EQ(st.layout, cur);
  EXPECT_DOUBLE_EQ(moka::imbalance(load, cur), 70.0 / 25.0);
  const auto sm = moka::plan_placement(moka::BalancePolicy::smartmoe, load, cur, 2, cost);
  ASSERT_TRUE(sm.changed);
  EXPECT_LT(sm.busiest_after, sm.busiest_before);
  EXPECT_DOUBLE_EQ(sm.busiest_after, 45.0);  // 40 + 5: one slot per expert cannot do better
  for (const auto& r : sm.layout) EXPECT_EQ(r.size(), 2u);
  // moka with one spare slot per rank (3 slots): replicas of the hot
  // experts, the busiest rank near the mean.
  const RankExperts cur3{{0, 1, 2}, {3, 4, 5}, {6, 7, 0}, {1, 2, 3}};
  const auto mk = moka::plan_placement(moka::BalancePolicy::moka, load, cur3, 3, cost);
  ASSERT_TRUE(mk.changed);
  EXPECT_GT(mk.replicated, 0);
  EXPECT_LE(mk.busiest_after, 25.0 * 1.1);  // the mean is 25; one slot per expert gives 45
  for (const auto& r : mk.layout) {
    EXPECT_EQ(r.size(), 3u);
    std::vector<int> sorted = r;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_EQ(std::adjacent_find(sorted.begin(), sorted.end()), sorted.end()) << "an expert twice on a rank";
  }
  // Migration-aware: when moving costs more than the horizon saves, stay.
  moka::PlanCost slow = cost;
  slow.bandwidth      = 1.0;  // 1 byte/s
  const auto stay     = moka::plan_placement(moka::BalancePolicy::moka, load, cur3, 3, slow);
  EXPECT_FALSE(stay.changed);
  EXPECT_EQ(stay.layout, cur3);
}

TEST(Policy, BandwidthEstimateIsNotOneMeasurement) {
  // A slow first measurement (one-time costs) moves the estimate halfway
  // in logarithm: 20 GB/s assumed, 0.2 GB/s measured -> 2 GB/s.
  const double first = moka::update_bandwidth(20e9, 2e6, 1e-2);
  EXPECT_NEAR(first, 2e9, 1e-6 * 2e9);
  // Repeated measurements at 1 GB/s converge to it.
  double bw = first;
  for (int i = 0; i < 40; ++i) bw = moka::update_bandwidth(bw, 1e6, 1e-3);
  EXPECT_NEAR(bw, 1e9, 1e-6 * 1e9);
  // Nothing moved: the estimate stays; a bad estimate is refused.
  EXPECT_EQ(moka::update_bandwidth(3e9, 0, 1e-3), 3e9);
  EXPECT_EQ(moka::update_bandwidth(3e9, 1e6, 0), 3e9);
  EXPECT_NE(error_of([] { moka::update_bandwidth(0, 1e6, 1e-3); }).find("must be positive"), std::string::npos);
}

TEST(Policy, PlacementKeepsSlotsOfExpertsThatStay) {
  const moka::Placement cur = moka::Placement::from_slots(4, 2, {0, 1, 2, 3});
  // Expert 1 stays on rank 0 (in its slot 1), expert 2 comes to rank 0.
  const moka::Placement p = moka::placement_of({{2, 1}, {0, 3}}, cur, 4);
  EXPECT_EQ(p.expert_at(0, 1), 1);
  EXPECT_EQ(p.expert_at(0, 0), 2);
  EXPECT_EQ(p.expert_at(1, 1), 3);
  EXPECT_EQ(moka::moved_slots(moka::layout_of(cur), moka::layout_of(p)), 2);
  EXPECT_NE(error_of([&] { moka::placement_of({{2}, {0, 3, 1}}, cur, 4); }).find("rank 0 holds 1 experts for 2 slots"),
            std::string::npos);
}

TEST(BalanceConfig, SlotsAreChecked) {
  moka::BalanceConfig c;
  EXPECT_EQ(c.slots(8, 4), 2);
  c.slots_per_rank = 3;
  EXPECT_NE(error_of([&] { c.slots(8, 4); }).find("only balance.policy = moka fills"), std::string::npos);
  c.policy = moka::BalancePolicy::moka;
  EXPECT_EQ(c.slots(8, 4), 3);
  c.slots_per_rank = 1;
  EXPECT_NE(error_of([&] { c.slots(8, 4); }).find("fewer than the 2 experts"), std::string::npos);
  c.slots_per_rank = 3;
  EXPECT_NE(error_of([&] { c.slots(2, 1); }).find("replicas need another rank"), std::string::npos);
}

}  // namespace

// FasterMoE's dynamic shadowing: the rank loads with experts computed at
// their tokens' ranks, and the greedy decision against the time it models.
namespace {

double shadow_seconds(const std::vector<std::vector<double>>& src, const moka::RankExperts& layout,
                      const std::vector<int>& s, const moka::ShadowCost& c) {
  const auto l = moka::shadowed_rank_loads(src, layout, s);
  return *std::max_element(l.begin(), l.end()) * c.row_seconds + double(s.size()) * 2 * (c.latency + c.expert_bytes / c.bandwidth);
}

TEST(Shadowing, RankLoadsByHand) {
  const moka::RankExperts layout{{0, 1}, {2, 3}};
  const std::vector<std::vector<double>> src{{30, 5, 5, 0}, {30, 5, 0, 5}};
  EXPECT_EQ(moka::shadowed_rank_loads(src, layout, {}), (std::vector<double>{70, 10}));
  // Expert 0 computed where its tokens are: 30 rows stay on each rank.
  EXPECT_EQ(moka::shadowed_rank_loads(src, layout, {0}), (std::vector<double>{40, 40}));
  EXPECT_EQ(moka::shadowed_rank_loads(src, layout, {0, 1}), (std::vector<double>{35, 45}));
  // A replicated expert not shadowed splits its rows as the layer does.
  const moka::RankExperts rep{{0, 1, 2}, {0, 2, 3}};
  EXPECT_EQ(moka::shadowed_rank_loads(src, rep, {}), moka::rank_loads({60, 10, 5, 5}, rep));
  const std::string e = moka_test::error_of([&] { moka::shadowed_rank_loads(src, layout, {4}); });
  EXPECT_NE(e.find("shadowed expert 4 of 4"), std::string::npos) << e;
}

TEST(Shadowing, GreedyDecisionFollowsTheModel) {
  std::mt19937_64 rng(5);
  for (int trial = 0; trial < 20; ++trial) {
    const int P = 2 + trial % 3, L = 2, E = P * L;
    std::vector<std::vector<double>> src(P, std::vector<double>(E));
    std::gamma_distribution<double> skew(0.4, 1.0);  // a few hot experts
    for (int e = 0; e < E; ++e) {
      const double hot = 200 * skew(rng);
      for (int r = 0; r < P; ++r) src[r][e] = std::floor(hot * (0.5 + std::uniform_real_distribution<double>(0, 1)(rng)));
    }
    const moka::RankExperts layout = moka::contiguous_layout(E, P);
    moka::ShadowCost c;
    c.row_seconds  = 1e-6;
    c.expert_bytes = 4e6 * (trial % 4);  // free to dear
    c.bandwidth    = 1e11;
    c.latency      = 1e-6;
    c.max_shadowed = 1 + trial % 3;
    const auto d = moka::choose_shadowed(src, layout, c);
    EXPECT_LE(int(d.experts.size()), c.max_shadowed);
    EXPECT_DOUBLE_EQ(d.seconds_before, shadow_seconds(src, layout, {}, c));
    EXPECT_DOUBLE_EQ(d.seconds_after, shadow_seconds(src, layout, d.experts, c));
    // Every expert taken lowered the modelled time when it was added.
    std::vector<int> s;
    double t = d.seconds_before;
    for (int e : d.experts) {
      s.push_back(e);
      const double t2 = shadow_seconds(src, layout, s, c);
      EXPECT_LT(t2, t);
      t = t2;
    }
    // Stopped for a reason: the cap, or no further expert lowers the time.
    if (int(d.experts.size()) < c.max_shadowed)
      for (int e = 0; e < E; ++e) {
        if (std::find(s.begin(), s.end(), e) != s.end()) continue;
        auto s2 = s;
        s2.push_back(e);
        EXPECT_GE(shadow_seconds(src, layout, s2, c), d.seconds_after) << "expert " << e;
      }
  }
}

TEST(Shadowing, FreeShadowsTheHotExpertDearShadowsNone) {
  const moka::RankExperts layout{{0, 1}, {2, 3}};
  const std::vector<std::vector<double>> src{{300, 5, 5, 0}, {300, 5, 0, 5}};
  moka::ShadowCost c;
  c.row_seconds  = 1e-6;
  c.expert_bytes = 0;
  const auto free_d = moka::choose_shadowed(src, layout, c);
  ASSERT_FALSE(free_d.experts.empty());
  EXPECT_EQ(free_d.experts[0], 0);
  EXPECT_EQ(free_d.busiest_before, 610);
  EXPECT_LT(free_d.busiest_after, 320);
  c.expert_bytes = 1e9;  // 2 x 10 ms per expert against at most 0.3 ms saved
  c.bandwidth    = 1e11;
  const auto dear = moka::choose_shadowed(src, layout, c);
  EXPECT_TRUE(dear.experts.empty());
  EXPECT_EQ(dear.seconds_after, dear.seconds_before);
  c.expert_bytes = 0;
  c.max_shadowed = 0;
  EXPECT_TRUE(moka::choose_shadowed(src, layout, c).experts.empty());
}

}  // namespace
