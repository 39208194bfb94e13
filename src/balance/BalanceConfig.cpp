#include <moka/balance/BalanceConfig.hpp>
#include <moka/core/Error.hpp>
#include <moka/deck/DeckSchema.hpp>
#include <moka/deck/InputDeck.hpp>
#include <moka/moe/MoEConfig.hpp>

namespace moka {

DeckSchema BalanceConfig::schema() {
  DeckSchema s;
  s.add("balance.policy", DeckType::string).set_default("static").set_choices({"static", "smartmoe", "moka"})
      .set_doc("Expert placement policy (docs/balance.md): static never moves; smartmoe: the published SmartMoE "
               "rule, one slot per expert; moka: replicas in spare slots, migration-aware.");
  s.add("balance.interval", DeckType::integer).set_default("10").set_min(1)
      .set_doc("Steps between re-plans of the expert placement.");
  s.add("balance.slots_per_rank", DeckType::integer).set_default("0").set_min(0)
      .set_doc("Expert slots per EP rank (0: experts / EP, no spare slot); spare slots hold replicas (moka policy).");
  s.add("balance.predictor", DeckType::string).set_default("ema").set_choices({"ema", "window", "last"})
      .set_doc("Load prediction from the history: exponential moving average, mean of the last balance.window "
               "steps, or the last step.");
  s.add("balance.ema_decay", DeckType::real).set_default("0.7").set_min(0).set_max(0.999999)
      .set_doc("ema: weight of the past (prediction = decay x prediction + (1 - decay) x newest).");
  s.add("balance.window", DeckType::integer).set_default("10").set_min(1)
      .set_doc("window: steps averaged; also the load history kept.");
  s.add("balance.sticky", DeckType::real).set_default("0.05").set_min(0)
      .set_doc("moka: keep an expert on its rank when that costs at most this fraction of the mean rank load.");
  s.add("balance.migration_gbs", DeckType::real).set_default("20").set_min(1e-6)
      .set_doc("moka: migration bandwidth (GB/s) assumed until a migration has been measured.");
  s.add("balance.row_ns", DeckType::real).set_default("0").set_min(0)
      .set_doc("moka: MoE-layer time per row of the busiest rank (ns, forward + backward); 0: from balance.tflops "
               "until measured.");
  s.add("balance.tflops", DeckType::real).set_default("300").set_min(1e-6)
      .set_doc("Expert GEMM rate (TFLOP/s) for the row-time estimate when balance.row_ns = 0.");
  s.add("balance.migration_buffer_mb", DeckType::real).set_default("64").set_min(1e-6)
      .set_doc("Migration staging buffer per rank and round (MB; at least one expert's state).");
  s.add("balance.shadowing", DeckType::boolean).set_default("false")
      .set_doc("FasterMoE's dynamic shadowing (docs/balance.md): every step, the experts whose broadcast to every "
               "EP rank shortens the step most (moka::choose_shadowed: busiest rank's rows x the row time, plus "
               "their parameters broadcast and gradients reduced at the migration bandwidth) are computed where "
               "their tokens are. Needs one slot per expert (balance.slots_per_rank = 0; any policy that keeps "
               "one: static, smartmoe) and no expert slicing.");
  s.add("balance.max_shadowed", DeckType::integer).set_default("2").set_min(1)
      .set_doc("Shadowing: experts shadowed at most per step and layer (each rank keeps this many extra expert "
               "slots for them).");
  s.add("balance.shadow_latency_us", DeckType::real).set_default("20").set_min(0)
      .set_doc("Shadowing: latency (us) of one broadcast or reduction, counted in the decision.");
  return s;
}

BalanceConfig BalanceConfig::from_deck(const InputDeck& deck) {
  BalanceConfig c;
  c.policy               = balance_policy_from_string(deck.get<std::string>("balance.policy"));
  c.interval             = deck.get<int>("balance.interval");
  c.slots_per_rank       = deck.get<int>("balance.slots_per_rank");
  c.predictor.predictor  = deck.get<std::string>("balance.predictor");
  c.predictor.ema_decay  = deck.get<double>("balance.ema_decay");
  c.predictor.window     = deck.get<int>("balance.window");
  c.sticky               = deck.get<double>("balance.sticky");
  c.migration_gbs        = deck.get<double>("balance.migration_gbs");
  c.row_ns               = deck.get<double>("balance.row_ns");
  c.tflops               = deck.get<double>("balance.tflops");
  c.migration_buffer_mb  = deck.get<double>("balance.migration_buffer_mb");
  c.shadowing            = deck.get<bool>("balance.shadowing");
  c.max_shadowed         = deck.get<int>("balance.max_shadowed");
  c.shadow_latency_us    = deck.get<double>("balance.shadow_latency_us");
  c.predictor.validate();
  return c;
}

DeckSchema replay_schema() {
    DeckSchema s;
  s.add("replay.trace_file", DeckType::string).set_required()
      .set_doc("HDF5 routing trace (/counts [iteration][source rank][layer][micro-batch][expert]).");
  s.add("replay.ranks", DeckType::integer).set_default("8").set_min(1).set_doc("EP ranks the experts are placed on.");
  s.add("replay.slots_per_rank", DeckType::integer).set_default("0").set_min(0)
      .set_doc("Slots per rank (0: experts / ranks); spare slots hold replicas under the moka policy.");
  s.add("replay.interval", DeckType::integer).set_default("10").set_min(1)
      .set_doc("Trace iterations between re-plans.");
  s.add("replay.policies", DeckType::string).set_default_list({"static", "smartmoe", "moka"})
      .set_choices({"static", "smartmoe", "moka"}).set_doc("Policies to replay.");
  s.add("replay.first_layer", DeckType::integer).set_default("0").set_min(0).set_doc("First trace layer replayed.");
  s.add("replay.layers", DeckType::integer).set_default("0").set_min(0)
      .set_doc("Trace layers replayed from replay.first_layer (0: all).");
  s.add("replay.shadowing", DeckType::boolean).set_default("false")
      .set_doc("Also replay FasterMoE's dynamic shadowing on the static placement: each step the experts whose "
               "computation at their tokens' ranks lowers the modelled time (busiest rank's rows x row time, plus "
               "their parameters broadcast and gradients reduced at balance.migration_gbs) are shadowed "
               "(moka::choose_shadowed; the trace's source ranks give where the tokens are).");
  s.add("replay.max_shadowed", DeckType::integer).set_default("4").set_min(0)
      .set_doc("Shadowing: experts shadowed at most per step.");
  s.add("replay.csv_file", DeckType::string).set_default("").set_doc("Per-iteration CSV output (empty: none).");
  s.add("replay.optimizer_moments", DeckType::integer).set_default("2").set_min(0).set_max(2)
      .set_doc("Optimizer moments an expert's state carries (adam: 2, sgd: 1), for the bytes moved.");
  s.merge(MoEConfig::schema());
  s.merge(BalanceConfig::schema());
  return s;
}

int BalanceConfig::slots(int num_experts, int ep) const {
  MOKA_REQUIRE(ep >= 1 && num_experts % ep == 0, "moe.num_experts = ", num_experts,
               " does not split evenly over EP = ", ep);
  const int base = num_experts / ep;
  if (slots_per_rank == 0) return base;
  MOKA_REQUIRE(slots_per_rank >= base, "balance.slots_per_rank = ", slots_per_rank, " is fewer than the ", base,
               " experts each of the ", ep, " EP ranks must hold (moe.num_experts / parallel.expert_parallel)");
  MOKA_REQUIRE(slots_per_rank == base || policy == BalancePolicy::moka, "balance.slots_per_rank = ", slots_per_rank,
               " gives spare slots (", slots_per_rank - base, " per rank), which only balance.policy = moka fills "
               "(", to_string(policy), " keeps one slot per expert)");
  MOKA_REQUIRE(!shadowing || slots_per_rank == base, "balance.shadowing needs one slot per expert: "
               "balance.slots_per_rank = ", slots_per_rank, " places replicas in ", slots_per_rank - base,
               " spare slots per rank (set balance.slots_per_rank = 0, or balance.shadowing = false)");
  MOKA_REQUIRE(slots_per_rank - base <= num_experts - base || ep == 1, "balance.slots_per_rank = ", slots_per_rank,
               ": more slots per rank than experts");
  MOKA_REQUIRE(ep > 1 || slots_per_rank == base, "balance.slots_per_rank = ", slots_per_rank,
               " with EP = 1: replicas need another rank (an expert is never twice on one rank)");
  return slots_per_rank;
}

double BalanceConfig::row_seconds(int d_model, int d_ff_in, int d_ff) const {
  if (row_ns > 0) return row_ns * 1e-9;
  const double flops = 3.0 * 2.0 * double(d_model) * (double(d_ff_in) + double(d_ff));
  return flops / (tflops * 1e12);
}

}  // namespace moka
