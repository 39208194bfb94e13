// moka::Placement: construction, validation (every bad placement named),
// and the one-rank layer with a non-contiguous placement.
#include <moka/moe/MoELayer.hpp>
#include <moka/parallel/Placement.hpp>

#include <gtest/gtest.h>

#include "MoETestUtils.hpp"
#include "TestHelpers.hpp"

#include <functional>
#include <random>
#include <string>
#include <vector>

namespace {

using moka::Placement;

using moka_test::error_of;

TEST(Placement, ContiguousPutsExpertsInOrder) {
  const Placement p = Placement::contiguous(8, 4);
  EXPECT_EQ(p.slots_per_rank(), 2);
  EXPECT_EQ(p.num_slots(), 8);
  EXPECT_TRUE(p.is_contiguous());
  EXPECT_TRUE(p.single_slot());
  for (int e = 0; e < 8; ++e) {
    ASSERT_EQ(p.slots_of(e).size(), 1u);
    EXPECT_EQ(p.slots_of(e)[0], (Placement::Slot{e / 2, e % 2}));
    EXPECT_EQ(p.expert_at(e / 2, e % 2), e);
  }
  EXPECT_EQ(p.describe(), "rank 0: 0 1 | rank 1: 2 3 | rank 2: 4 5 | rank 3: 6 7");
}

TEST(Placement, PermutationAndReplicas) {
  const Placement p = Placement::from_slots(4, 2, {3, 0, 1, 2});
  EXPECT_FALSE(p.is_contiguous());
  EXPECT_EQ(p.slots_of(0)[0], (Placement::Slot{0, 1}));
  EXPECT_EQ(p.expert_at(1, 0), 1);
  // Expert 0 replicated into a spare slot of each rank: 6 slots for 4 experts.
  const Placement r = Placement::from_slots(4, 2, {0, 1, 0, 2, 3, 0});
  EXPECT_FALSE(r.single_slot());
  EXPECT_EQ(r.slots_of(0).size(), 3u);
  EXPECT_EQ(r.slots_of(3)[0], (Placement::Slot{1, 1}));
  // The two constructors agree.
  const Placement q = Placement::from_expert_slots(2, 3, {{{0, 0}, {0, 2}, {1, 2}}, {{0, 1}}, {{1, 0}}, {{1, 1}}});
  EXPECT_EQ(q, r);
  EXPECT_NE(q, p);
}

TEST(Placement, BadPlacementsAreNamed) {
  EXPECT_NE(error_of([] { Placement::contiguous(6, 4); }).find("6 experts do not split evenly over 4 ranks"),
            std::string::npos);
  EXPECT_NE(error_of([] { Placement::from_slots(4, 2, {0, 1, 2}); }).find("3 slots do not split evenly over 2 ranks"),
            std::string::npos);
  EXPECT_NE(error_of([] { Placement::from_slots(4, 2, {0, 1, 1, 2}); }).find("expert 3 has no slot"),
            std::string::npos);
  EXPECT_NE(error_of([] { Placement::from_slots(4, 2, {0, 1, 4, 2}); })
                .find("slot 2 (rank 1, local 0) holds expert 4, outside [0, 4)"),
            std::string::npos);
  EXPECT_NE(error_of([] { Placement::from_slots(4, 1, {0, 1}); }).find("2 slots for 4 experts"), std::string::npos);
  EXPECT_NE(error_of([] { Placement::from_expert_slots(2, 1, {{{0, 0}}, {{0, 0}}}); })
                .find("slot (rank 0, local 0) used twice (experts 0 and 1)"),
            std::string::npos);
  EXPECT_NE(error_of([] { Placement::from_expert_slots(2, 2, {{{0, 0}}, {{1, 1}}, {{0, 1}}}); })
                .find("slot (rank 1, local 0) holds no expert"),
            std::string::npos);
  EXPECT_NE(error_of([] { Placement::from_expert_slots(2, 1, {{{2, 0}}, {{0, 0}}}); })
                .find("expert 0 on slot (rank 2, local 0) outside 2 ranks x 1 slots"),
            std::string::npos);
}

TEST(Placement, LayerChecksItsPlacement) {
  moka::MoEConfig cfg;
  cfg.num_experts = 4;
  using Layer = moka::MoELayer<double, Kokkos::HostSpace>;
  EXPECT_NE(error_of([&] { Layer l(cfg, nullptr, Placement::contiguous(8, 1)); })
                .find("the placement has 8 experts, moe.num_experts = 4"),
            std::string::npos);
  EXPECT_NE(error_of([&] { Layer l(cfg, nullptr, Placement::contiguous(4, 2)); })
                .find("the placement spans 2 ranks, the EP group 1"),
            std::string::npos);
  EXPECT_NE(error_of([&] { Layer l(cfg, nullptr, Placement::from_slots(4, 1, {0, 1, 2, 3, 0})); })
                .find("puts expert 0 twice on EP rank 0"),
            std::string::npos);
}

TEST(Placement, OneRankLayerIsBitwiseTheSameUnderAPermutation) {
  // On one rank a placement only reorders the local slots: dispatch rows go
  // in slot order, W1[l] holds expert expert_at(0, l). Every expert sees
  // the same rows in the same order, so every result is bitwise the same.
  moka::MoEConfig cfg;
  cfg.d_model = 8;
  cfg.d_ff = 12;
  cfg.num_experts = 6;
  cfg.top_k = 2;
  cfg.gate = moka::GateType::gshard;
  cfg.dropless = false;
  cfg.capacity_factor = 0.8;
  using Layer = moka::MoELayer<double, Kokkos::HostSpace>;
  Layer a(cfg), b(cfg, nullptr, Placement::from_slots(6, 1, {4, 2, 0, 5, 3, 1}));
  a.init_parameters(3);
  b.init_parameters(3);
  EXPECT_EQ(b.local_expert(0), 4);
  std::mt19937_64 rng(5);
  const int T = 40;
  const auto x = moka_test::random_vec(T * cfg.d_model, rng), g = moka_test::random_vec(T * cfg.d_model, rng);
  for (int step = 0; step < 2; ++step) {
    const auto ra = moka_test::run_layer(a, T, x, g), rb = moka_test::run_layer(b, T, x, g);
    EXPECT_EQ(ra.y, rb.y);
    EXPECT_EQ(ra.dx, rb.dx);
    EXPECT_EQ(ra.dwg, rb.dwg);
    EXPECT_EQ(ra.counts, rb.counts);  // per logical expert
    EXPECT_EQ(ra.routing.kept, rb.routing.kept);
    // Expert gradients: slot l of b holds expert local_expert(l).
    const long d = cfg.d_model, dff = cfg.d_ff;
    for (int l = 0; l < 6; ++l) {
      const int e = b.local_expert(l);
      for (long i = 0; i < d * dff; ++i) ASSERT_EQ(rb.dw1[l * d * dff + i], ra.dw1[e * d * dff + i]) << l;
      for (long i = 0; i < dff * d; ++i) ASSERT_EQ(rb.dw2[l * dff * d + i], ra.dw2[e * dff * d + i]) << l;
      for (long i = 0; i < dff; ++i) ASSERT_EQ(rb.db1[l * dff + i], ra.db1[e * dff + i]) << l;
    }
  }
}

}  // namespace
