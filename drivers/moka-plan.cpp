// moka-plan: ranks the layouts of a training run over a number of ranks by
// the cost model's predicted step time, and writes the best as a deck
// fragment that moka-train includes (docs/cost-model.md).
//
//   moka-plan input_decks/plan_cpu.deck plan.profile=cpu-np4.profile plan.ranks=4
//   moka-train my.deck            (with the line: include "plan.deck")

#include <moka/core/Memory.hpp>
#include <moka/core/Runtime.hpp>
#include <moka/deck/InputDeck.hpp>
#include <moka/model/MoEModel.hpp>
#include <moka/model/Optimizer.hpp>
#include <moka/plan/Planner.hpp>
#include <moka/train/RegimeTask.hpp>
#include <moka/train/PlanConfig.hpp>
#include <moka/train/Trainer.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

namespace {

std::string fmt_ms(double s) {
  char b[32];
  std::snprintf(b, sizeof b, "%.3f", s * 1e3);
  return b;
}

}  // namespace

int main(int argc, char* argv[]) {
  moka::Runtime runtime(argc, argv);
  std::vector<std::string> args(argv + 1, argv + argc);
  const bool root = runtime.rank() == 0;
  if (args.empty() || args[0] == "-h" || args[0] == "--help") {
    if (root) std::cout << "usage: moka-plan <deck> [key=value ...]\n       moka-plan --deck-reference\n";
    return args.empty() ? 2 : 0;
  }
  if (args[0] == "--deck-reference") {
    if (root) std::cout << moka::plan_schema().markdown();
    return 0;
  }
  try {
    moka::InputDeck deck =
        moka::InputDeck::load(runtime.comm(), args[0], std::vector<std::string>(args.begin() + 1, args.end()));
    deck.validate(moka::plan_schema());
    const int P = deck.get<int>("plan.ranks");
    MOKA_REQUIRE(P > 0, "plan.ranks is not set: give the number of ranks to plan for (plan.ranks=N)");
    const std::string pf = deck.get<std::string>("plan.profile");
    MOKA_REQUIRE(!pf.empty(), "plan.profile is not set: give a machine profile (moka-bench <deck> "
                 "bench.mode=calibrate writes one)");
    const moka::MachineProfile prof = moka::MachineProfile::read(pf);
    const moka::ModelConfig model   = moka::ModelConfig::from_deck(deck);
    const moka::TrainerConfig tc    = moka::TrainerConfig::from_deck(deck);
    const moka::OptimizerConfig oc  = moka::OptimizerConfig::from_deck(deck);
    const moka::RegimeTaskConfig task = moka::RegimeTaskConfig::from_deck(deck);
    if (prof.precision != tc.precision && root)
      std::cout << "moka-plan: note: the profile was measured in " << prof.precision << ", the run trains in "
                << tc.precision << "\n";
    moka::StepShape shape;
    shape.moe              = model.moe;
    shape.moe.bf16_compute = tc.precision == "bf16";
    long T = deck.get<long>("plan.tokens_per_rank");
    if (T == 0) {
      MOKA_REQUIRE(tc.batch_size % P == 0, "train.batch_size = ", tc.batch_size, " is not divisible by plan.ranks = ",
                   P, " (or set plan.tokens_per_rank)");
      T = tc.batch_size / P;
    }
    shape.tokens       = double(T);
    shape.layers       = model.blocks;
    shape.scalar_bytes = tc.precision == "fp64" ? 8 : 4;
    shape.bucket_mb    = deck.get<double>("comm.bucket_mb");
    const double d = model.moe.d_model, din = task.input_dim, dout = moka::RegimeTaskConfig::output_dim;
    shape.dense_params = din * d + d + d * dout + dout + 4.0 * d * model.blocks;
    // The workload.
    std::string wl = deck.get<std::string>("plan.workload");
    std::string trace = deck.get<std::string>("plan.trace_file");
    if (trace.empty()) trace = model.moe.trace_file;
    if (wl == "auto") wl = trace.empty() ? "uniform" : "trace";
    moka::Workload work;
    if (wl == "trace") {
      MOKA_REQUIRE(!trace.empty(), "plan.workload = trace needs plan.trace_file (or gate.trace_file)");
      int layer = deck.get<int>("plan.trace_layer");
      if (layer < 0) layer = model.moe.trace_layer;
      work = moka::trace_workload(trace, layer, model.moe.num_experts);
    } else if (wl == "zipf") {
      work = moka::zipf_workload(model.moe.num_experts, deck.get<double>("plan.zipf_exponent"),
                                 static_cast<std::uint64_t>(deck.get<long>("run.seed")));
    } else {
      work = moka::uniform_workload(model.moe.num_experts);
    }
    moka::PlanOptions opt;
    opt.ranks           = P;
    opt.max_extra_slots = deck.get<int>("plan.max_extra_slots");
    opt.max_shadowed    = deck.get<int>("plan.max_shadowed");
    opt.try_schedule    = deck.get<bool>("plan.schedule");
    opt.optimizer_moments = oc.type == moka::OptimizerType::sgd ? 1 : 2;
    {
      std::istringstream is(deck.get<std::string>("plan.policies"));
      opt.policies.clear();
      for (std::string w; is >> w;) opt.policies.push_back(w);
      MOKA_REQUIRE(!opt.policies.empty(), "plan.policies is empty");
    }
    opt.memory_per_rank = deck.get<double>("plan.memory_per_rank_gb") * 1073741824.0;
    if (opt.memory_per_rank == 0) {
#ifdef KOKKOS_ENABLE_CUDA
      opt.memory_per_rank = moka::device_memory_available();
#else
      opt.memory_per_rank = moka::host_memory_available() / std::max(1, std::min(P, prof.ranks_per_node));
#endif
    }
    const auto plans = moka::plan_layouts(prof, shape, work, opt);
    if (!root) return 0;
    std::printf("moka-plan: %d ranks; profile %s (%s, %s, %s, %d rank(s) per node); workload %s\n", P, pf.c_str(),
                prof.card.c_str(), prof.backend.c_str(), prof.precision.c_str(), prof.ranks_per_node,
                work.what.c_str());
    std::printf("  model: %d MoE layer(s), d=%d, d_ff=%d, E=%d, top-%d; %ld tokens per rank; %s per rank allowed\n",
                model.blocks, model.moe.d_model, model.moe.d_ff, model.moe.num_experts, model.moe.top_k, T,
                moka::format_bytes(opt.memory_per_rank).c_str());
    if (P > prof.ranks_per_node)
      std::printf("  note: %d ranks span nodes; the profile's links were measured on one node of %d rank(s)\n", P,
                  prof.ranks_per_node);
    std::printf("  predicted step = MoE layers' forward+backward + gradient sums + optimizer; the dense layers' "
                "work is the same in every layout and not included\n");
    std::printf("  %4s %3s %3s %4s %5s %-8s %-9s %6s %5s %10s %10s %9s %9s %9s %9s %10s\n", "rank", "EP", "S", "EDP",
                "slots", "exchange", "policy", "shadow", "sched", "step ms", "layer ms", "experts", "exchange", "slicing",
                "sync", "memory");
    const int show = deck.get<int>("plan.show");
    int n = 0, runnable = 0;
    for (const auto& c : plans) {
      if (!c.refused.empty()) continue;
      ++runnable;
      if (n >= show) continue;
      ++n;
      const auto& p = c.predicted;
      const std::string shadow = c.layout.shadowing > 0 ? std::to_string(c.layout.shadowing) : "-";
      std::printf("  %4d %3d %3d %4d %5d %-8s %-9s %6s %5d %10s %10s %9s %9s %9s %9s %10s\n", n, c.layout.ep,
                  c.layout.slices, c.layout.edp, c.layout.slots_per_rank(model.moe.num_experts),
                  c.layout.exchange.c_str(), c.policy.c_str(), shadow.c_str(), c.layout.schedule,
                  fmt_ms(p.step).c_str(), fmt_ms(p.layer).c_str(), fmt_ms(p.experts).c_str(),
                  fmt_ms(p.exchange).c_str(), fmt_ms(p.slicing).c_str(), fmt_ms(p.grad_sync).c_str(),
                  moka::format_bytes(c.memory).c_str());
    }
    bool any_refused = false;
    for (const auto& c : plans) {
      if (c.refused.empty()) continue;
      if (!any_refused) std::printf("  refused:\n");
      any_refused = true;
      std::printf("    %s, %s: %s\n", c.layout.describe(model.moe.num_experts).c_str(), c.policy.c_str(),
                  c.refused.c_str());
    }
    if (runnable == 0) {
      std::cerr << "moka-plan: error: no layout of " << P << " ranks can run (reasons above)\n";
      return 1;
    }
    const auto& best = plans.front();
    std::ostringstream head;
    head << "# moka-plan: the fastest of " << runnable << " layouts of " << P << " ranks for " << args[0]
         << "\n# predicted step " << fmt_ms(best.predicted.step) << " ms (" << best.layout.describe(model.moe.num_experts)
         << ", balance.policy " << best.policy << ") with " << pf << ", workload " << work.what
         << "\n# include it in a moka-train deck that does not set these keys itself: include \"<this file>\"\n";
    const std::string out = deck.get<std::string>("plan.out");
    std::ofstream os(out);
    os << moka::deck_fragment(best, model.moe, head.str());
    os.close();
    MOKA_REQUIRE(os.good(), "cannot write '", out, "'");
    std::printf("  wrote %s: %s, balance.policy = %s\n", out.c_str(),
                best.layout.describe(model.moe.num_experts).c_str(), best.policy.c_str());
    return 0;
  } catch (const std::exception& e) {
    if (root) std::cerr << "moka-plan: error: " << e.what() << std::endl;
    return 2;
  }
}
