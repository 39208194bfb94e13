// Optional extra tests on the full shared GPT-MoE routing trace
// (../shared/traces beside the checkout, or MOKA_SHARED_DIR). A user's
// clone does not have it: then every test here says it was skipped, and
// ctest reports test_shared_traces as skipped, not passed.
#include <moka/io/RoutingTrace.hpp>

#include <gtest/gtest.h>

#include "TestHelpers.hpp"

#include <fstream>
#include <numeric>
#include <string>

namespace {

std::string shared_trace() { return moka_test::shared_dir() + "/traces/gpt_moe_32e_layers00-11.h5"; }

#define MOKA_NEED_SHARED_TRACE()                                                                  \
  if (!std::ifstream(shared_trace()).good())                                                     \
  GTEST_SKIP() << "the shared trace " << shared_trace() << " is not here (set MOKA_SHARED_DIR); " \
               << "the tests on tests/data/gpt_moe_32e_cut.h5 ran instead"

TEST(SharedTraces, FullTraceReads) {
  MOKA_NEED_SHARED_TRACE();
  const moka::RoutingTrace t = moka::read_routing_trace(shared_trace());
  EXPECT_EQ(t.n_iter, 501);
  EXPECT_EQ(t.n_ranks, 16);
  EXPECT_EQ(t.n_layers, 12);
  EXPECT_EQ(t.n_micro, 4);
  EXPECT_EQ(t.n_experts, 32);
  EXPECT_EQ(t.top_k, 2);
  for (long l = 0; l < t.n_layers; ++l) {
    const auto c = t.expert_counts(-1, l);
    EXPECT_EQ(std::accumulate(c.begin(), c.end(), 0L), 16L * 4 * 4096) << "layer " << l;
  }
}

TEST(SharedTraces, FixtureIsACutOfTheSharedTrace) {
  MOKA_NEED_SHARED_TRACE();
  const moka::RoutingTrace full = moka::read_routing_trace(shared_trace());
  const moka::RoutingTrace cut  = moka::read_routing_trace(moka_test::data_file("gpt_moe_32e_cut.h5"));
  const long rows[]   = {0, 100, 200, 300, 400, 496, 497, 498, 499, 500};
  const long layers[] = {0, 3};
  ASSERT_EQ(cut.n_iter, 10);
  ASSERT_EQ(cut.n_layers, 2);
  for (long i = 0; i < cut.n_iter; ++i) {
    EXPECT_EQ(cut.iterations[i], full.iterations[rows[i]]) << "row " << i;
    for (long l = 0; l < 2; ++l)
      EXPECT_EQ(cut.expert_counts(i, l), full.expert_counts(rows[i], layers[l])) << "row " << i << " layer " << l;
  }
}

}  // namespace
