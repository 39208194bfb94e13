#include <moka/train/BenchConfig.hpp>
#include <moka/plan/MachineProfile.hpp>
#include <moka/moe/LayerMemory.hpp>
#include <moka/moe/MoEConfig.hpp>
#include <moka/parallel/ProcessGroups.hpp>
#include <moka/train/RunConfig.hpp>

#include <Kokkos_Core.hpp>

#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <sstream>
#include <string>

namespace moka {

DeckSchema bench_schema() {
  DeckSchema s = RunConfig::schema();
  s.merge(MoEConfig::schema());
  s.add("bench.tokens", DeckType::integer).set_default("16384").set_min(1).set_doc("Tokens T per step.");
  s.add("bench.precision", DeckType::string)
      .set_default("bf16")
      .set_choices({"fp32", "fp64", "bf16"})
      .set_doc("Layer precision; bf16 = bf16 GEMM operands, fp32 accumulation (CUDA).");
  s.add("bench.warmup", DeckType::integer).set_default("3").set_min(0).set_doc("Untimed iterations.");
  s.add("bench.step_optimizer", DeckType::boolean).set_default("true")
      .set_doc("step mode: run the gradient sums and the optimizer's update between the layer steps (false: the "
               "layer steps back to back, to see what the update costs the next layer step).");
  s.add("bench.breakdown", DeckType::boolean).set_default("false")
      .set_doc("Also time each stage of the layer (fences after every stage; slower overall).");
  s.add("bench.alternate", DeckType::boolean).set_default("false")
      .set_doc("Layer mode: false: the layer steps back to back, then the dense GEMMs, each in its own steady "
               "state (as a training loop runs, and as the PyTorch reference times its layers); true: one layer "
               "step and one dense step alternately, each starting at the clocks the other left (on an H200 under "
               "its power cap the layer steps ran 3-9% slower so; docs/performance.md).");
  s.add("bench.warmup_seconds", DeckType::real).set_default("1").set_min(0)
      .set_doc("Layer mode: untimed steps for at least this long before the layer's and the dense GEMMs' timed "
               "iterations, besides bench.warmup (an H200 reaches its power cap, and lower clocks, after a few "
               "tenths of a second of load).");
  s.add("bench.profile_step", DeckType::boolean).set_default("false")
      .set_doc("Layer mode: one more untimed layer step (zero_grad, forward, backward) after the first ones, inside "
               "moka::profiler_capture, so that `ncu --profile-from-start off` records that step only "
               "(scripts/gpu-kernels.sh).");
  s.add("bench.print_steps", DeckType::boolean).set_default("false")
      .set_doc("Layer mode: also print every timed iteration's layer and dense time in order (the spread behind "
               "the medians).");
  s.add("bench.batched", DeckType::boolean).set_default("false")
      .set_doc("Layer mode, bf16 on CUDA: also time the six GEMM kinds as one cuBLAS strided-batched GEMM each over "
               "the experts, every expert padded to the step's largest row count (what a padded row layout would "
               "cost), after the dense GEMMs and timed as they are.");
  s.add("bench.iters", DeckType::integer).set_default("10").set_min(1).set_doc("Timed iterations (median).");
  s.add("bench.mode", DeckType::string).set_default("layer").set_choices({"layer", "exchange", "calibrate", "step"})
      .set_doc("layer: forward+backward of one layer on each rank (one rank's layer, no exchange); exchange: the "
               "layer's token exchange with EP = all ranks, against the communicator's own equal-count "
               "all-to-all at the same bytes per rank; calibrate: measure this machine for the cost model and "
               "write bench.profile_out (run with as many ranks per node as the runs to plan); step: one layer "
               "laid out by parallel.* over the ranks, timed as a training step (forward, backward, gradient "
               "sums, AdamW) and, with bench.profile, predicted by the cost model (docs/cost-model.md).");
  s.add("bench.profile", DeckType::string).set_default("")
      .set_doc("Step mode: machine profile to predict the step with (empty: measure only).");
  s.add("bench.profile_out", DeckType::string).set_default("machine.profile")
      .set_doc("Calibrate mode: the machine profile file to write.");
  s.add("bench.calibrate_shapes", DeckType::string).set_default("")
      .set_doc("Calibrate mode: expert shapes to measure besides the deck's (d_model x d_ff / S for S = 1, 2, 4), "
               "as space-separated DxF, e.g. \"256x1024 512x512\" (F: d_ff per rank).");
  s.add("bench.calibrate_rows_max", DeckType::integer).set_default("0").set_min(0)
      .set_doc("Calibrate mode: most rows per expert measured (0: bench.tokens x moe.top_k); from 32, doubling.");
  s.add("bench.exchange_mb_min", DeckType::real).set_default("4").set_min(0.001)
      .set_doc("Exchange mode: smallest payload per rank (MB of dispatched rows); doubled up to the largest.");
  s.add("bench.exchange_mb_max", DeckType::real).set_default("1024").set_min(0.001)
      .set_doc("Exchange mode: largest payload per rank (MB).");
  s.merge(ParallelConfig::schema());
  return s;
}

namespace {
// Tokens per rank of the largest exchange-mode payload (its loop's last step).
double exchange_tokens(const InputDeck& deck, const MoEConfig& cfg, std::size_t s) {
  return std::max(1.0, deck.get<double>("bench.exchange_mb_max") * 1048576.0 / (double(cfg.d_model) * s * cfg.top_k));
}
}  // namespace

MemoryEstimate bench_memory(const InputDeck& deck, int world_size) {
  MoEConfig cfg          = MoEConfig::from_deck(deck);
  const std::string prec = deck.get<std::string>("bench.precision");
  cfg.bf16_compute       = prec == "bf16";
  const std::size_t s    = prec == "fp64" ? 8 : 4;
  const std::string mode = deck.get<std::string>("bench.mode");
  const bool exchange    = mode == "exchange";
  LayerMemoryShape shape;
  shape.tokens       = exchange ? exchange_tokens(deck, cfg, s) : double(deck.get<long>("bench.tokens"));
  shape.ep           = exchange ? std::max(1, world_size) : 1;
  if (mode == "step") {
    const ParallelConfig pc = ParallelConfig::from_deck(deck);
    shape.ep     = pc.expert_parallel;
    shape.slices = pc.expert_slicing;
  }
  shape.scalar_bytes = s;
  shape.moments      = 0;
  shape.tokens_key   = exchange ? "bench.exchange_mb_max" : "bench.tokens";
  shape.layers_key   = "";
  MemoryEstimate est;
  add_moe_layer_memory(est, cfg, shape);
  // The benchmark's x, y, dy, dx, and (layer mode) the dense reference's
  // operands of the same shapes as the experts' GEMMs.
  const double T = shape.tokens, d = cfg.d_model, rows = T * cfg.top_k, dfi = cfg.d_ff_in(), dff = cfg.d_ff;
  est.add("benchmark inputs and outputs", shape.tokens_key + ", moe.d_model", 4 * T * d * s);
  if (mode == "layer")
    est.add("dense reference operands", "bench.tokens, moe.top_k, moe.d_model, moe.d_ff",
            (rows * (3 * d + 2 * dfi + 2 * dff) + 2 * d * dfi + 2 * dff * d) * s);
  return est;
}

void check_bench_deck(const InputDeck& deck, int world_size, int ranks_on_node) {
  (void)RunConfig::from_deck(deck);
  const MoEConfig cfg = MoEConfig::from_deck(deck);
#ifndef KOKKOS_ENABLE_CUDA
  MOKA_REQUIRE(deck.get<std::string>("bench.precision") != "bf16", "bench.precision = bf16 needs a CUDA build (this "
               "one runs on ", Kokkos::DefaultExecutionSpace::name(), "); use bench.precision = fp32");
#endif
  const std::string mode = deck.get<std::string>("bench.mode");
  auto given = [&](const char* key) -> const DeckEntry* { return deck.find(key); };
  if (mode == "layer") {
    for (const char* key : {"parallel.expert_parallel", "parallel.expert_slicing", "parallel.expert_data_parallel"})
      if (const DeckEntry* e = given(key))
        MOKA_REQUIRE(deck.get<long>(key) == (std::string(key) == "parallel.expert_data_parallel" ? 0 : 1),
                     e->where(), ": ", key, " = ", deck.get<long>(key), " is not used by bench.mode = layer (one "
                     "layer per rank, no exchange); bench.mode = exchange runs EP = every rank");
  } else if (mode == "step") {
    const ParallelConfig pc = ParallelConfig::from_deck(deck);
    pc.validate(world_size, cfg.num_experts, cfg.d_ff);
    const std::string prof = deck.get<std::string>("bench.profile");
    if (!prof.empty()) (void)MachineProfile::read(prof);  // a bad profile is named now, not after the timing
  } else if (mode == "calibrate") {
    // The profile is written at the end: a directory it cannot be written
    // to is named before minutes of measuring.
    const std::filesystem::path out(deck.get<std::string>("bench.profile_out"));
    const std::filesystem::path dir = out.has_parent_path() ? out.parent_path() : std::filesystem::path(".");
    MOKA_REQUIRE(std::filesystem::is_directory(dir) && ::access(dir.c_str(), W_OK) == 0, "bench.profile_out = '",
                 out.string(), "': the directory '", dir.string(), "' does not exist or cannot be written");
    MOKA_REQUIRE(!std::filesystem::is_directory(out), "bench.profile_out = '", out.string(), "' is a directory");
    std::istringstream is(deck.get<std::string>("bench.calibrate_shapes"));
    const DeckEntry* e = given("bench.calibrate_shapes");
    for (std::string w; is >> w;) {
      const auto x = w.find('x');
      bool ok = x != std::string::npos && x > 0 && x + 1 < w.size() &&
                w.find_first_not_of("0123456789", 0) == x && w.find_first_not_of("0123456789", x + 1) == std::string::npos;
      MOKA_REQUIRE(ok, e ? e->where() + ": " : std::string(), "bench.calibrate_shapes: '", w,
                   "' is not DxF (d_model x d_ff per rank, e.g. 256x1024)");
      MOKA_REQUIRE(std::stol(w.substr(0, x)) > 0 && std::stol(w.substr(x + 1)) > 0, "bench.calibrate_shapes: '", w,
                   "' has a zero size");
    }
  } else {
    const double lo = deck.get<double>("bench.exchange_mb_min"), hi = deck.get<double>("bench.exchange_mb_max");
    MOKA_REQUIRE(lo <= hi, "bench.exchange_mb_min = ", lo, " exceeds bench.exchange_mb_max = ", hi,
                 ": no payload to measure");
    if (const DeckEntry* e = given("parallel.expert_parallel"))
      MOKA_REQUIRE(deck.get<long>("parallel.expert_parallel") == world_size, e->where(),
                   ": parallel.expert_parallel = ", deck.get<long>("parallel.expert_parallel"),
                   ", but bench.mode = exchange runs EP = every rank (", world_size, ")");
    if (const DeckEntry* e = given("parallel.expert_slicing"))
      MOKA_REQUIRE(deck.get<long>("parallel.expert_slicing") == 1, e->where(), ": parallel.expert_slicing = ",
                   deck.get<long>("parallel.expert_slicing"), " is not used by bench.mode = exchange (no slicing)");
    MOKA_REQUIRE(cfg.num_experts % world_size == 0, "moe.num_experts = ", cfg.num_experts,
                 " is not divisible by the ", world_size, " ranks that bench.mode = exchange uses as EP");
  }
  check_memory_fits(bench_memory(deck, world_size), ranks_on_node, "the benchmark");
}

}  // namespace moka
