// The cost model: machine profiles (round trip, every bad file named), the
// calibration fits, and predict_step against the same sums worked by hand
// in double precision.
#include <moka/plan/Calibration.hpp>
#include <moka/plan/CostModel.hpp>
#include <moka/plan/MachineProfile.hpp>

#include <gtest/gtest.h>

#include "TestHelpers.hpp"

#include <cmath>
#include <cstdio>
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <mpi.h>
#include <string>
#include <unistd.h>
#include <vector>

namespace {

using moka::MachineProfile;
using moka_test::error_of;

MachineProfile sample_profile() {
  MachineProfile p;
  p.card = "test card", p.backend = "Serial", p.precision = "fp32", p.ranks_per_node = 4, p.comm = "mpi";
  p.concurrent_ranks = 4;
  p.created     = "2026-12-02T00:00:00Z";
  p.layer_fixed = 1e-4, p.gate_flop = 2e-12, p.gate_elem = 3e-9, p.token_elem = 4e-11;
  p.exchange_fixed = 5e-5, p.optimizer_elem = 2e-9, p.expert_shared = 1e-5;
  p.experts.push_back({64, 256, {32, 64, 128}, {1e-4, 1.5e-4, 2.5e-4}});
  p.experts.push_back({64, 128, {32, 128}, {6e-5, 1.4e-4}});
  p.exchange.push_back({"mpi", 2e-5, 1e9});
  p.allreduce = {"allreduce", 1e-5, 2e9};
  return p;
}

std::string text_of(const MachineProfile& p) {
  const std::string path = "profile_roundtrip.tmp";
  p.write(path);
  std::ifstream is(path);
  std::string s((std::istreambuf_iterator<char>(is)), std::istreambuf_iterator<char>());
  std::remove(path.c_str());
  return s;
}

TEST(MachineProfile, WritesAndReadsBack) {
  const MachineProfile p = sample_profile();
  p.write("profile_rt.profile");
  const MachineProfile q = MachineProfile::read("profile_rt.profile");
  EXPECT_EQ(q.card, p.card);
  EXPECT_EQ(q.backend, p.backend);
  EXPECT_EQ(q.precision, p.precision);
  EXPECT_EQ(q.ranks_per_node, 4);
  EXPECT_EQ(q.concurrent_ranks, 4);
  EXPECT_EQ(q.comm, "mpi");
  EXPECT_DOUBLE_EQ(q.layer_fixed, 1e-4);
  EXPECT_DOUBLE_EQ(q.gate_flop, 2e-12);
  EXPECT_DOUBLE_EQ(q.token_elem, 4e-11);
  EXPECT_DOUBLE_EQ(q.exchange_fixed, 5e-5);
  EXPECT_DOUBLE_EQ(q.expert_shared, 1e-5);
  ASSERT_EQ(q.experts.size(), 2u);
  ASSERT_NE(q.link("mpi"), nullptr);
  EXPECT_DOUBLE_EQ(q.link("mpi")->bandwidth, 1e9);
  EXPECT_EQ(q.link("nccl"), nullptr);
  EXPECT_DOUBLE_EQ(q.allreduce.latency, 1e-5);
  for (double r : {10.0, 32.0, 50.0, 128.0, 400.0})
    EXPECT_DOUBLE_EQ(q.expert_seconds(64, 256, r), p.expert_seconds(64, 256, r)) << r;
  EXPECT_EQ(q.source, "profile_rt.profile");
}

TEST(MachineProfile, ExpertCurveInterpolatesAndScales) {
  const MachineProfile p = sample_profile();
  EXPECT_DOUBLE_EQ(p.expert_seconds(64, 256, 64), 1.5e-4);
  EXPECT_NEAR(p.expert_seconds(64, 256, 96), 2e-4, 1e-15);                // between points
  EXPECT_NEAR(p.expert_seconds(64, 256, 256), 2.5e-4 + 128 * 1e-4 / 64, 1e-15);  // past the last: last slope
  EXPECT_NEAR(p.expert_seconds(64, 256, 16), std::max(1e-4 * 0.5, 1e-4 - 16 * 5e-5 / 32), 1e-15);
  EXPECT_EQ(p.expert_seconds(64, 256, 0), 0.0);
  EXPECT_TRUE(p.has_expert_shape(64, 128));
  EXPECT_FALSE(p.has_expert_shape(128, 256));
  // Not measured: the nearest shape, scaled by d x d_ff.
  EXPECT_NEAR(p.expert_seconds(128, 256, 64), 2 * 1.5e-4, 1e-15);
  EXPECT_NEAR(p.expert_seconds(64, 512, 64), 2 * 1.5e-4, 1e-15);
  MachineProfile empty;
  EXPECT_NE(error_of([&] { empty.expert_seconds(64, 64, 10); }).find("no expert curve"), std::string::npos);
}

TEST(MachineProfile, BadFilesAreNamed) {
  const std::string good = text_of(sample_profile());
  auto parse_error = [&](const std::string& text) {
    return error_of([&] { MachineProfile::parse(text, "bad.profile"); });
  };
  auto replace = [&](const std::string& from, const std::string& to) {
    std::string t = good;
    const auto at = t.find(from);
    EXPECT_NE(at, std::string::npos) << from;
    return t.replace(at, from.size(), to);
  };
  EXPECT_EQ(parse_error(good), "no error");
  std::string e = parse_error(good + "gate_flops = 1\n");
  EXPECT_NE(e.find("bad.profile"), std::string::npos) << e;
  EXPECT_NE(e.find("unknown key 'gate_flops'"), std::string::npos) << e;
  EXPECT_NE(e.find("line "), std::string::npos) << e;
  e = parse_error(replace("moka_profile     = 1", "moka_profile     = 7"));
  EXPECT_NE(e.find("format version 7"), std::string::npos) << e;
  e = parse_error(replace("token_elem_s     = 4e-11", "token_elem_s     = 4e-1x"));
  EXPECT_NE(e.find("'4e-1x' is not a number"), std::string::npos) << e;
  e = parse_error(replace("token_elem_s     = 4e-11", "token_elem_s     = -4e-11"));
  EXPECT_NE(e.find("negative"), std::string::npos) << e;
  e = parse_error(replace("token_elem_s     = 4e-11\n", ""));
  EXPECT_NE(e.find("'token_elem_s' is missing"), std::string::npos) << e;
  e = parse_error(replace("concurrent_ranks = 4", "concurrent_ranks = 5"));
  EXPECT_NE(e.find("exceeds ranks_per_node = 4"), std::string::npos) << e;
  e = parse_error(good + "card = again\n");
  EXPECT_NE(e.find("'card' given twice"), std::string::npos) << e;
  e = parse_error(good + "exchange = carrier 1 1\n");
  EXPECT_NE(e.find("exchange path 'carrier'"), std::string::npos) << e;
  e = parse_error(good + "exchange = mpi 1 1\n");
  EXPECT_NE(e.find("'mpi' given twice"), std::string::npos) << e;
  e = parse_error(good + "expert = 64 256 64 1\n");
  EXPECT_NE(e.find("rows 64 given twice"), std::string::npos) << e;
  e = parse_error(good + "expert = 64 256\n");
  EXPECT_NE(e.find("expert takes"), std::string::npos) << e;
  e = parse_error(good + "this is not a key value line\n");
  EXPECT_NE(e.find("expected 'key = value'"), std::string::npos) << e;
  e = error_of([] { MachineProfile::read("no/such/file.profile"); });
  EXPECT_NE(e.find("cannot open the machine profile 'no/such/file.profile'"), std::string::npos) << e;
  // No expert lines at all.
  std::string t = good;
  for (std::size_t at; (at = t.find("expert           =")) != std::string::npos;) t.erase(at, t.find('\n', at) - at + 1);
  e = parse_error(t);
  EXPECT_NE(e.find("no 'expert' line"), std::string::npos) << e;
}

TEST(Calibration, FitsRecoverCoefficients) {
  // y = 3e-9 a + 5e-6 b, features of very different sizes.
  std::vector<std::vector<double>> X;
  std::vector<double> y;
  for (double a : {1e5, 4e5, 9e5})
    for (double b : {10.0, 70.0}) {
      X.push_back({a, b});
      y.push_back(3e-9 * a + 5e-6 * b);
    }
  auto c = moka::fit_nonnegative(X, y);
  EXPECT_NEAR(c[0], 3e-9, 1e-15);
  EXPECT_NEAR(c[1], 5e-6, 1e-12);
  // A feature that would come out negative is dropped.
  for (std::size_t i = 0; i < y.size(); ++i) y[i] = 3e-9 * X[i][0] - 1e-7 * X[i][1];
  c = moka::fit_nonnegative(X, y);
  EXPECT_EQ(c[1], 0.0);
  EXPECT_GT(c[0], 0.0);
  EXPECT_NE(error_of([] { moka::fit_nonnegative({{1.0, 2.0}}, {1.0}); }).find("cannot fit 2"), std::string::npos);
  // Links: 4 transfers of latency 2e-5 + bytes / 1e9.
  std::vector<double> bytes{1e5, 1e6, 8e6}, secs;
  for (double b : bytes) secs.push_back(4 * (2e-5 + b / 1e9));
  const auto l = moka::fit_link("mpi", bytes, secs, 4);
  EXPECT_EQ(l.path, "mpi");
  EXPECT_NEAR(l.latency, 2e-5, 1e-12);
  EXPECT_NEAR(l.bandwidth, 1e9, 1e3);
  const std::string e = error_of([] { moka::fit_link("mpi", {1e5, 1e6}, {1e-3, 1e-3}, 1); });
  EXPECT_NE(e.find("do not grow with the bytes"), std::string::npos) << e;
  EXPECT_EQ(moka::median_of({3, 1, 2}), 2);
}

moka::StepShape shape_of(double T) {
  moka::StepShape s;
  s.moe.d_model = 64, s.moe.d_ff = 256, s.moe.num_experts = 4, s.moe.top_k = 2, s.moe.expert_bias = true;
  s.tokens = T, s.scalar_bytes = 4, s.bucket_mb = 32;
  return s;
}

TEST(CostModel, OneRankByHand) {
  const MachineProfile p   = sample_profile();
  const moka::StepShape sh = shape_of(100);
  moka::LayoutChoice lay;  // EP 1
  const std::vector<double> counts{80, 60, 40, 20};  // 200 = T k
  const auto pr = moka::predict_step(p, sh, lay, counts);
  const double d = 64, E = 4, k = 2, T = 100;
  double experts = 0;
  for (double c : counts) experts += p.expert_seconds(64, 256, c);
  experts -= 3 * 1e-5;  // four experts share what one expert's time holds once
  EXPECT_DOUBLE_EQ(pr.fixed, 1e-4);
  EXPECT_DOUBLE_EQ(pr.gate, T * d * E * 2e-12 + T * E * 3e-9);
  EXPECT_DOUBLE_EQ(pr.tokens, T * k * d * 4e-11);
  EXPECT_DOUBLE_EQ(pr.experts, experts);
  EXPECT_EQ(pr.exchange, 0.0);
  EXPECT_EQ(pr.slicing, 0.0);
  EXPECT_EQ(pr.grad_sync, 0.0);  // one rank: nothing to sum
  const double params = d * E + 4 * (d * 256 + 256 * d + 256 + d);
  EXPECT_DOUBLE_EQ(moka::parameters_per_rank(sh, lay), params);
  EXPECT_DOUBLE_EQ(pr.optimizer, params * 2e-9);
  EXPECT_DOUBLE_EQ(pr.layer, 1e-4 + pr.gate + pr.tokens + experts);
  EXPECT_DOUBLE_EQ(pr.step, pr.layer + pr.optimizer);
}

TEST(CostModel, ExpertParallelByHand) {
  const MachineProfile p   = sample_profile();
  const moka::StepShape sh = shape_of(100);  // per rank; 2 ranks: 400 rows in all
  moka::LayoutChoice lay;
  lay.ep = 2, lay.exchange = "mpi";
  const std::vector<double> counts{150, 100, 100, 50};
  const auto pr = moka::predict_step(p, sh, lay, counts);
  // Rank 0 holds experts 0, 1 (250 rows), rank 1 experts 2, 3 (150 rows).
  const double e0 = p.expert_seconds(64, 256, 150) + p.expert_seconds(64, 256, 100) - 1e-5;
  const double e1 = p.expert_seconds(64, 256, 100) + p.expert_seconds(64, 256, 50) - 1e-5;
  EXPECT_DOUBLE_EQ(pr.experts, std::max(e0, e1));
  EXPECT_DOUBLE_EQ(pr.busiest_rows, 250);
  EXPECT_DOUBLE_EQ(pr.mean_rows, 200);
  // Rank 0 sends 200 (1 - 250/400) = 75 rows and receives 250 / 2 = 125;
  // rank 1 sends 200 (1 - 150/400) = 125 and receives 75: busiest 125 rows.
  EXPECT_DOUBLE_EQ(pr.exchange, 4 * (2e-5 + 125 * 64 * 4 / 1e9));
  EXPECT_DOUBLE_EQ(pr.fixed, 1e-4 + 5e-5);
  // Gradient sums: the gate (64 x 4 values) over the world, in one bucket.
  EXPECT_DOUBLE_EQ(pr.grad_sync, 1e-5 + 64 * 4 * 4 / 2e9);
  // Moving an expert: a replica of expert 0 on rank 1 (3 slots each) evens the rows.
  moka::LayoutChoice rep = lay;
  rep.slots              = 3;
  const moka::RankExperts at{{0, 1, 3}, {2, 0, 3}};
  EXPECT_NE(error_of([&] { moka::predict_step(p, sh, rep, counts, {{0, 1}, {2, 3}, {0}}); }).find("EP = 2"),
            std::string::npos);
  EXPECT_NE(error_of([&] { moka::predict_step(p, sh, rep, counts, {{0, 1, 9}, {2, 0, 1}}); }).find("holds expert 9"),
            std::string::npos);
  EXPECT_NE(error_of([&] { moka::predict_step(p, sh, rep, counts, {{0, 1, 0}, {2, 0, 1}}); }).find("expert 3 has no slot"),
            std::string::npos);
  const auto pr2 = moka::predict_step(p, sh, rep, counts, at);
  EXPECT_LT(pr2.busiest_rows, pr.busiest_rows);
  EXPECT_GT(pr2.grad_sync, pr.grad_sync);  // the replicas' gradients are summed too
  // A path the profile has not measured is refused by name.
  lay.exchange = "nccl";
  const std::string e = error_of([&] { moka::predict_step(p, sh, lay, counts); });
  EXPECT_NE(e.find("no figures for the exchange path 'nccl'"), std::string::npos) << e;
}

TEST(CostModel, SlicingAndDataParallel) {
  const MachineProfile p   = sample_profile();
  const moka::StepShape sh = shape_of(100);
  moka::LayoutChoice lay;
  lay.slices = 2, lay.edp = 2;
  const std::vector<double> counts{100, 100, 100, 100};  // the two slice ranks' tokens
  const auto pr = moka::predict_step(p, sh, lay, counts);
  EXPECT_DOUBLE_EQ(pr.experts, 4 * p.expert_seconds(64, 128, 100) - 3e-5);  // d_ff / 2 columns per rank
  EXPECT_DOUBLE_EQ(pr.slicing, 4 * (2e-5 + 400 * 64 * 4 * 0.5 / 1e9));
  EXPECT_EQ(pr.exchange, 0.0);
  const double slot = 64 * 128 + 128 * 64 + 128 + 64;
  const double expect_sync = (1e-5 + 64 * 4 * 4 / 2e9) + (1e-5 + 4 * slot * 4 / 2e9) + (1e-5 + 4 * 64 * 4 / 2e9);
  EXPECT_NEAR(pr.grad_sync, expect_sync, 1e-18);
  // More ranks than one without all-reduce figures: refused, not guessed.
  MachineProfile q = p;
  q.allreduce      = {"allreduce", 0, 0};
  EXPECT_NE(error_of([&] { moka::predict_step(q, sh, lay, counts); }).find("no all-reduce figures"),
            std::string::npos);
}

TEST(CostModel, RanksThatShareCores) {
  MachineProfile p = sample_profile();  // 4 ranks per node
  const std::vector<double> t{4.0, 2.0, 1.0, 1.0};  // seconds with every rank busy
  EXPECT_DOUBLE_EQ(moka::shared_node_seconds(p, t, 1), 4.0);  // a device per rank: the busiest
  p.concurrent_ranks = 2;  // 4 ranks on 2 cores: alone, a rank runs twice as fast
  // Full-speed work 2, 1, 0.5, 0.5: four share 2 cores (rate 1/2) until
  // 0.5 is done at t = 1; two left run at full speed: 1 at t = 1.5, 2 at t = 2.5.
  EXPECT_DOUBLE_EQ(moka::shared_node_seconds(p, t, 1), 2.5);
  // Equal work: no one finishes early, the times as measured.
  EXPECT_DOUBLE_EQ(moka::shared_node_seconds(p, {3.0, 3.0}, 2), 3.0);
  // Two EP ranks, two copies each (EDP 2): the node's four ranks.
  EXPECT_DOUBLE_EQ(moka::shared_node_seconds(p, {2.0, 1.0}, 2), 0.5 * 2 + 0.5);
}

TEST(CostModel, ShadowingCostsFromTheProfile) {
  const MachineProfile p   = sample_profile();
  const moka::StepShape sh = shape_of(100);
  moka::LayoutChoice lay;
  lay.ep = 2, lay.exchange = "mpi";
  const moka::ShadowCost c = moka::shadow_cost(p, sh, lay, 64, 3);
  // The curve's slope between 64 and 128 rows: (2.5e-4 - 1.5e-4) / 64.
  EXPECT_DOUBLE_EQ(c.row_seconds, (2.5e-4 - 1.5e-4) / 64);
  EXPECT_DOUBLE_EQ(c.expert_bytes, (64.0 * 256 + 256 * 64 + 256 + 64) * 4);
  EXPECT_DOUBLE_EQ(c.bandwidth, 2e9);
  EXPECT_DOUBLE_EQ(c.latency, 1e-5);
  EXPECT_EQ(c.max_shadowed, 3);
  // The decision with these costs: a hot expert's rows against its transfers.
  const std::vector<std::vector<double>> src{{3000, 50, 50, 0}, {3000, 50, 0, 50}};
  const auto d = moka::choose_shadowed(src, moka::contiguous_layout(4, 2), c);
  ASSERT_FALSE(d.experts.empty());
  EXPECT_EQ(d.experts[0], 0);
  MachineProfile one = p;
  one.allreduce      = {"allreduce", 0, 0};
  EXPECT_NE(error_of([&] { moka::shadow_cost(one, sh, lay, 64, 3); }).find("no all-reduce figures"), std::string::npos);
}

TEST(CostModel, ShadowingInThePrediction) {
  const MachineProfile p   = sample_profile();
  const moka::StepShape sh = shape_of(100);  // 2 ranks: 400 rows in all
  moka::LayoutChoice lay;
  lay.ep = 2, lay.exchange = "mpi";
  const std::vector<double> counts{300, 50, 30, 20};  // expert 0 hot, on rank 0
  const auto plain = moka::predict_step(p, sh, lay, counts);
  lay.shadowing    = 1;
  const auto pr    = moka::predict_step(p, sh, lay, counts);
  // The decision the model makes (each rank holds half of every expert's tokens).
  const moka::ShadowCost c = moka::shadow_cost(p, sh, lay, 100, 1);
  const auto d = moka::choose_shadowed({{150, 25, 15, 10}, {150, 25, 15, 10}}, moka::contiguous_layout(4, 2), c);
  ASSERT_EQ(d.experts, std::vector<int>{0});
  EXPECT_DOUBLE_EQ(pr.shadowed, 1);
  EXPECT_DOUBLE_EQ(pr.shadowing, c.per_expert());
  // Rank 0: expert 1 (50) + its half of expert 0 (150); rank 1: 30 + 20 + 150.
  EXPECT_DOUBLE_EQ(pr.busiest_rows, 200);
  const double e0 = p.expert_seconds(64, 256, 50) + p.expert_seconds(64, 256, 150) - 1e-5;
  const double e1 = p.expert_seconds(64, 256, 30) + p.expert_seconds(64, 256, 20) + p.expert_seconds(64, 256, 150) -
                    2 * 1e-5;
  EXPECT_DOUBLE_EQ(pr.experts, std::max(e0, e1));
  // Only the other experts' rows move: 100 in all; rank 0 holds 50 of
  // them, sends 50 (1 - 50/100) = 25 and receives 25; rank 1 the same.
  EXPECT_DOUBLE_EQ(pr.exchange, 4 * (2e-5 + 25 * 64 * 4 / 1e9));
  EXPECT_DOUBLE_EQ(pr.layer, pr.fixed + pr.gate + pr.tokens + pr.experts + pr.exchange + pr.slicing + pr.shadowing);
  EXPECT_LT(pr.busiest_rows, plain.busiest_rows);
  // Shadowing with replicas is not a layout.
  lay.slots = 3;
  EXPECT_NE(error_of([&] { moka::predict_step(p, sh, lay, counts, {{0, 1, 2}, {2, 3, 0}}); })
                .find("shadowing needs one slot per expert"),
            std::string::npos);
  // Nor with slicing.
  {
    moka::LayoutChoice sl = lay;
    sl.slots = 0, sl.slices = 2;
    EXPECT_NE(error_of([&] { moka::predict_step(p, sh, sl, counts); }).find("shadowing needs no expert slicing"),
              std::string::npos);
  }
  // Its memory: the shadow slots' parameters and gradients.
  lay.slots = 0;
  moka::LayoutChoice off = lay;
  off.shadowing = 0;
  EXPECT_GT(moka::layout_memory(sh, lay, 2).total(true), moka::layout_memory(sh, off, 2).total(true));
}

TEST(CostModel, SmartSchedulingInThePrediction) {
  MachineProfile p         = sample_profile();
  const moka::StepShape sh = shape_of(100);
  moka::LayoutChoice lay;
  lay.ep = 2, lay.exchange = "mpi";
  const std::vector<double> counts{150, 100, 100, 50};
  const auto plain = moka::predict_step(p, sh, lay, counts);
  lay.schedule = 4;  // capped at EP = 2
  // Nothing measured to hide: the same step.
  auto pr = moka::predict_step(p, sh, lay, counts);
  EXPECT_DOUBLE_EQ(pr.exchange, plain.exchange);
  EXPECT_DOUBLE_EQ(pr.overlap, 0);
  EXPECT_DOUBLE_EQ(pr.step, plain.step);
  p.schedule_overlap = 0.5;
  pr                 = moka::predict_step(p, sh, lay, counts);
  EXPECT_DOUBLE_EQ(pr.overlap, 0.5 * 0.5 * std::min(pr.experts, pr.exchange));
  EXPECT_LT(pr.step, plain.step);
  p.schedule_overlap = -0.2;  // scheduling that costs
  EXPECT_GT(moka::predict_step(p, sh, lay, counts).step, plain.step);
  p.schedule_overlap = 0.5;
  EXPECT_DOUBLE_EQ(pr.layer, pr.fixed + pr.gate + pr.tokens + pr.experts + pr.exchange + pr.slicing + pr.shadowing -
                                 pr.overlap);
  // Slicing: not scheduled.
  moka::LayoutChoice sl = lay;
  sl.slices = 2, sl.ep = 2;
  EXPECT_DOUBLE_EQ(moka::predict_step(p, sh, sl, counts).overlap, 0);
  // The profile keeps it, and names a bad one.
  const std::string t = text_of(p);
  EXPECT_NE(t.find("schedule_overlap = 0.5"), std::string::npos) << t;
  {
    std::ofstream os("overlap_bad.profile");
    std::string bad = t;
    bad.replace(bad.find("schedule_overlap = 0.5"), 22, "schedule_overlap = 1.5");
    os << bad;
  }
  EXPECT_NE(error_of([] { MachineProfile::read("overlap_bad.profile"); }).find("schedule_overlap must be in [-1, 1]"),
            std::string::npos);
  std::remove("overlap_bad.profile");
}

TEST(CostModel, MemoryOfALayout) {
  moka::StepShape sh = shape_of(1024);
  moka::LayoutChoice one, four;
  four.ep = 4;
  const double m1 = moka::layout_memory(sh, one, 2).total(true);
  const double m4 = moka::layout_memory(sh, four, 2).total(true);
  EXPECT_GT(m1, m4);  // a quarter of the experts per rank
  EXPECT_GT(m4, 0.0);
}

}  // namespace

// moka-plan's core: workloads, the enumeration, refusals and the ranking.
#include <moka/plan/Planner.hpp>
#include <moka/train/Trainer.hpp>
#include <moka/deck/InputDeck.hpp>

namespace {

TEST(Planner, Workloads) {
  const auto u = moka::uniform_workload(4);
  ASSERT_EQ(u.shares.size(), 1u);
  for (double s : u.shares[0]) EXPECT_DOUBLE_EQ(s, 0.25);
  const auto z = moka::zipf_workload(8, 1.2, 5);
  std::vector<double> s = z.shares[0];
  double total = 0;
  for (double v : s) total += v;
  EXPECT_NEAR(total, 1.0, 1e-12);
  std::sort(s.rbegin(), s.rend());
  for (int i = 1; i < 8; ++i) EXPECT_NEAR(s[i] / s[0], 1.0 / std::pow(i + 1.0, 1.2), 1e-12);
  EXPECT_EQ(moka::zipf_workload(8, 1.2, 5).shares, z.shares);  // the same shuffle for the same seed
  const auto flat = moka::zipf_workload(8, 0.0, 5);
  for (double v : flat.shares[0]) EXPECT_NEAR(v, 0.125, 1e-15);
  const std::string trace = std::string(MOKA_TEST_DATA_DIR) + "/gpt_moe_32e_cut.h5";
  const auto t = moka::trace_workload(trace, 1, 32);
  EXPECT_EQ(t.shares.size(), 10u);
  EXPECT_NE(t.what.find("layer 1 (10 steps)"), std::string::npos) << t.what;
  std::string e = error_of([&] { moka::trace_workload(trace, 0, 16); });
  EXPECT_NE(e.find("has 32 experts, moe.num_experts = 16"), std::string::npos) << e;
  e = error_of([&] { moka::trace_workload(trace, 2, 32); });
  EXPECT_NE(e.find("plan.trace_layer = 2"), std::string::npos) << e;
}

moka::StepShape plan_shape() {
  moka::StepShape sh;
  sh.moe.d_model = 64, sh.moe.d_ff = 256, sh.moe.num_experts = 8, sh.moe.top_k = 2;
  sh.tokens = 512, sh.layers = 2;
  return sh;
}

TEST(Planner, RanksByPredictedStepAndNamesRefusals) {
  MachineProfile p = sample_profile();
  moka::PlanOptions opt;
  opt.ranks = 4;
  const auto plans = moka::plan_layouts(p, plan_shape(), moka::zipf_workload(8, 1.0, 3), opt);
  ASSERT_FALSE(plans.empty());
  double last = 0;
  bool seen_refused = false, seen_replicas = false, seen_smartmoe = false;
  for (const auto& c : plans) {
    if (!c.refused.empty()) {
      seen_refused = true;
      continue;
    }
    EXPECT_FALSE(seen_refused) << "runnable layouts come first";
    EXPECT_GE(c.predicted.step, last);
    last = c.predicted.step;
    EXPECT_EQ(c.layout.world(), 4);
    seen_replicas |= c.layout.slots > 0;
    seen_smartmoe |= c.policy == "smartmoe";
    // The mean over the workload of the model's own prediction.
    const auto again = moka::predict_step(p, plan_shape(), c.layout,
                                          [&] {
                                            std::vector<double> cnt(8);
                                            const auto w = moka::zipf_workload(8, 1.0, 3).shares[0];
                                            for (int e = 0; e < 8; ++e)
                                              cnt[e] = w[e] * 512 * c.layout.ep * c.layout.slices * 2;
                                            return cnt;
                                          }(),
                                          c.experts_at);
    EXPECT_NEAR(again.step, c.predicted.step, 1e-12 * again.step);
  }
  EXPECT_TRUE(seen_replicas);
  EXPECT_TRUE(seen_smartmoe);
  // Smart scheduling is tried at degree EP on layouts with EP > 1 and no slicing.
  int scheduled = 0;
  for (const auto& c : plans)
    if (c.layout.schedule > 1) {
      ++scheduled;
      EXPECT_EQ(c.layout.schedule, c.layout.ep) << c.layout.describe(8);
      EXPECT_EQ(c.layout.slices, 1) << c.layout.describe(8);
    }
  EXPECT_GT(scheduled, 0);
  // Shadowing is tried on one-slot layouts with EP > 1, never with replicas, and not when asked not to.
  int shadowed = 0;
  for (const auto& c : plans)
    if (c.layout.shadowing > 0) {
      ++shadowed;
      EXPECT_EQ(c.layout.slots, 0) << c.layout.describe(8);
      EXPECT_GT(c.layout.ep, 1) << c.layout.describe(8);
      EXPECT_NE(c.policy, "moka");
      EXPECT_EQ(c.layout.slices, 1) << c.layout.describe(8);
    }
  EXPECT_GT(shadowed, 0);
  int shadowed_and_scheduled = 0;
  for (const auto& c : plans) shadowed_and_scheduled += c.layout.shadowing > 0 && c.layout.schedule > 1;
  {
    moka::PlanOptions none = opt;
    none.max_shadowed      = 0;
    none.try_schedule      = false;
    const auto fewer       = moka::plan_layouts(p, plan_shape(), moka::zipf_workload(8, 1.0, 3), none);
    EXPECT_EQ(fewer.size() + shadowed + scheduled, plans.size() + shadowed_and_scheduled);
    for (const auto& c : fewer) EXPECT_EQ(c.layout.shadowing + c.layout.schedule, 1);
  }
  // A memory limit below every layout's need: all refused, each saying so.
  opt.memory_per_rank = 1024;
  for (const auto& c : moka::plan_layouts(p, plan_shape(), moka::uniform_workload(8), opt)) {
    EXPECT_NE(c.refused.find("per rank, 1.0 KiB allowed"), std::string::npos) << c.refused;
  }
  // Without exchange figures, layouts with EP > 1 are refused by name.
  p.exchange.clear();
  opt.memory_per_rank = 0;
  int ep_refused = 0;
  for (const auto& c : moka::plan_layouts(p, plan_shape(), moka::uniform_workload(8), opt))
    if (c.layout.ep > 1) {
      EXPECT_NE(c.refused.find("no figures for the exchange path"), std::string::npos) << c.refused;
      ++ep_refused;
    }
  EXPECT_GT(ep_refused, 0);
  // 3 ranks, 8 experts: EP 3 does not divide the experts.
  opt.ranks = 3;
  p         = sample_profile();
  bool ep3  = false;
  for (const auto& c : moka::plan_layouts(p, plan_shape(), moka::uniform_workload(8), opt))
    if (c.layout.ep == 3) {
      ep3 = true;
      EXPECT_NE(c.refused.find("num_experts"), std::string::npos) << c.refused;
    }
  EXPECT_TRUE(ep3);
}

TEST(Planner, ChoosesByTheCostsItIsGiven) {
  moka::PlanOptions opt;
  opt.ranks = 4;
  opt.max_extra_slots = 0;
  // Expert work dear, exchange free: split the experts (EP 4).
  MachineProfile cheap = sample_profile();
  cheap.exchange       = {{"mpi", 0, 1e30}};
  cheap.allreduce      = {"allreduce", 0, 1e30};
  EXPECT_EQ(moka::plan_layouts(cheap, plan_shape(), moka::uniform_workload(8), opt).front().layout.ep, 4);
  // Exchange very dear: keep every expert on every rank (EP 1, EDP 4).
  MachineProfile dear = sample_profile();
  dear.exchange       = {{"mpi", 1.0, 1e3}};
  const auto best     = moka::plan_layouts(dear, plan_shape(), moka::uniform_workload(8), opt).front();
  EXPECT_EQ(best.layout.ep, 1);
  EXPECT_EQ(best.layout.slices, 1);
  EXPECT_EQ(best.layout.edp, 4);
}

TEST(Planner, FragmentIsADeckMokaTrainReads) {
  const auto plans = moka::plan_layouts(sample_profile(), plan_shape(), moka::zipf_workload(8, 1.5, 1),
                                        [] {
                                          moka::PlanOptions o;
                                          o.ranks = 4;
                                          return o;
                                        }());
  const std::string frag = moka::deck_fragment(plans.front(), plan_shape().moe, "# test\n");
  // Written to a directory of its own, not to wherever the test is run from.
  const auto dir = std::filesystem::temp_directory_path() /
                   ("moka_fragment_" + std::to_string(static_cast<long>(::getpid())));
  std::filesystem::create_directories(dir);
  {
    std::ofstream os(dir / "fragment.deck");
    os << "moe.num_experts = 8\nmoe.d_model = 64\nmoe.d_ff = 256\ninclude \"fragment_keys.deck\"\n";
    std::ofstream ks(dir / "fragment_keys.deck");
    ks << frag;
  }
  moka::InputDeck deck = moka::InputDeck::load(MPI_COMM_WORLD, (dir / "fragment.deck").string(), {});
  std::filesystem::remove_all(dir);
  EXPECT_NO_THROW(deck.validate(moka::train_schema()));
  EXPECT_EQ(deck.get<long>("parallel.expert_parallel"), plans.front().layout.ep);
  EXPECT_EQ(deck.get<std::string>("balance.policy"), plans.front().policy);
  // A shadowing layout's fragment turns it on.
  for (const auto& c : plans)
    if (c.refused.empty() && c.layout.shadowing > 0) {
      const std::string f = moka::deck_fragment(c, plan_shape().moe, "");
      EXPECT_NE(f.find("balance.shadowing             = true"), std::string::npos) << f;
      EXPECT_NE(f.find("balance.max_shadowed          = 2"), std::string::npos) << f;
      break;
    }
  for (const auto& c : plans)
    if (c.refused.empty() && c.layout.schedule > 1) {
      const std::string f = moka::deck_fragment(c, plan_shape().moe, "");
      EXPECT_NE(f.find("comm.schedule_degree          = " + std::to_string(c.layout.ep)), std::string::npos) << f;
      break;
    }
  moka::PlanCandidate bad;
  bad.refused = "too big";
  EXPECT_NE(error_of([&] { moka::deck_fragment(bad, plan_shape().moe, ""); }).find("too big"), std::string::npos);
}

}  // namespace
