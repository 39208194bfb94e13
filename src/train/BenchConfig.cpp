#include <moka/train/BenchConfig.hpp>
#include <moka/moe/MoEConfig.hpp>
#include <moka/parallel/ProcessGroups.hpp>
#include <moka/train/RunConfig.hpp>

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
  s.add("bench.breakdown", DeckType::boolean).set_default("false")
      .set_doc("Also time each stage of the layer (fences after every stage; slower overall).");
  s.add("bench.iters", DeckType::integer).set_default("10").set_min(1).set_doc("Timed iterations (median).");
  s.add("bench.mode", DeckType::string).set_default("layer").set_choices({"layer", "exchange"})
      .set_doc("layer: forward+backward of one layer on each rank (one rank's layer, no exchange); exchange: the "
               "layer's token exchange with EP = all ranks, against the communicator's own equal-count "
               "all-to-all at the same bytes per rank.");
  s.add("bench.exchange_mb_min", DeckType::real).set_default("4").set_min(0.001)
      .set_doc("Exchange mode: smallest payload per rank (MB of dispatched rows); doubled up to the largest.");
  s.add("bench.exchange_mb_max", DeckType::real).set_default("1024").set_min(0.001)
      .set_doc("Exchange mode: largest payload per rank (MB).");
  s.merge(ParallelConfig::schema());
  return s;
}

}  // namespace moka
