#include <moka/train/PlanConfig.hpp>

#include <moka/train/Trainer.hpp>

namespace moka {

DeckSchema plan_schema() {
  DeckSchema s = train_schema();
  s.add("plan.profile", DeckType::string).set_default("")
      .set_doc("Machine profile to predict with (moka-bench bench.mode = calibrate writes one).");
  s.add("plan.ranks", DeckType::integer).set_default("0").set_min(0)
      .set_doc("Ranks of the run to plan (required).");
  s.add("plan.memory_per_rank_gb", DeckType::real).set_default("0").set_min(0)
      .set_doc("Memory one rank may use, GiB (0: this machine's: the device's free memory on CUDA builds, else the "
               "host's available memory over the profile's ranks per node).");
  s.add("plan.workload", DeckType::string).set_default("auto").set_choices({"auto", "trace", "zipf", "uniform"})
      .set_doc("Routing to plan for: trace (plan.trace_file, each iteration a step), zipf (plan.zipf_exponent), "
               "uniform; auto: trace when plan.trace_file or gate.trace_file is set, else uniform.");
  s.add("plan.trace_file", DeckType::string).set_default("").set_doc("Routing trace (default: gate.trace_file).");
  s.add("plan.trace_layer", DeckType::integer).set_default("-1").set_min(-1)
      .set_doc("Layer of the trace (-1: gate.trace_layer).");
  s.add("plan.zipf_exponent", DeckType::real).set_default("1.0").set_min(0).set_doc("Zipf workload: exponent.");
  s.add("plan.tokens_per_rank", DeckType::integer).set_default("0").set_min(0)
      .set_doc("Tokens per rank per step (0: train.batch_size / plan.ranks).");
  s.add("plan.max_extra_slots", DeckType::integer).set_default("2").set_min(0)
      .set_doc("Spare expert slots per rank tried (replicas of hot experts, balance.policy = moka).");
  s.add("plan.policies", DeckType::string).set_default("static smartmoe moka")
      .set_doc("Placement policies tried, space-separated: static (contiguous), smartmoe (balanced, one slot per "
               "expert), moka (spare slots hold replicas).");
  s.add("plan.max_shadowed", DeckType::integer).set_default("2").set_min(0)
      .set_doc("Dynamic shadowing tried (balance.shadowing) with this many experts shadowed at most per step, on "
               "the layouts with one slot per expert and EP > 1; 0: not tried.");
  s.add("plan.schedule", DeckType::boolean).set_default("true")
      .set_doc("Smart scheduling tried (comm.schedule_degree = EP) on the layouts with EP > 1 and no slicing, for "
               "fp32 / fp64 runs; its gain is the profile's schedule_overlap.");
  s.add("plan.out", DeckType::string).set_default("plan.deck").set_doc("Deck fragment written with the best layout.");
  s.add("plan.show", DeckType::integer).set_default("20").set_min(1).set_doc("Layouts printed.");
  return s;
}

}  // namespace moka
