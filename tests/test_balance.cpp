// The balancer's host parts: load prediction, the replica split, the
// policies (static, smartmoe, moka) and placements made from layouts.
#include "TestHelpers.hpp"

#include <moka/balance/BalanceConfig.hpp>
#include <moka/balance/LoadMonitor.hpp>
#include <moka/balance/Policy.hpp>
#include <moka/parallel/ReplicaSplit.hpp>

#include <gtest/gtest.h>

#include <numeric>

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
