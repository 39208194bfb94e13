#include <moka/core/Error.hpp>
#include <moka/deck/InputDeck.hpp>
#include <moka/io/RoutingTrace.hpp>
#include <moka/moe/MoEConfig.hpp>

#include <cmath>
#include <numeric>

namespace moka {

namespace {
template <class E, std::size_t N>
E parse_enum(const std::string& s, const char* what, const std::pair<const char*, E> (&table)[N]) {
  std::string names;
  for (const auto& kv : table) {
    if (s == kv.first) return kv.second;
    names += std::string(names.empty() ? "" : ", ") + kv.first;
  }
  throw Error(std::string("moka: unknown ") + what + " '" + s + "' (expected one of: " + names + ")");
}
template <class E, std::size_t N>
const char* enum_name(E v, const std::pair<const char*, E> (&table)[N]) {
  for (const auto& kv : table) {
    if (kv.second == v) return kv.first;
  }
  return "?";
}
const std::pair<const char*, GateType> gate_names[] = {
    {"topk", GateType::topk},     {"softmax", GateType::softmax}, {"noisy", GateType::noisy},
    {"gshard", GateType::gshard}, {"switch", GateType::switch_top1}, {"zero", GateType::zero},
    {"trace", GateType::trace}};
const std::pair<const char*, Activation> activation_names[] = {{"gelu", Activation::gelu_erf},
                                                               {"gelu_tanh", Activation::gelu_tanh},
                                                               {"relu", Activation::relu},
                                                               {"silu", Activation::silu},
                                                               {"swiglu", Activation::swiglu}};
const std::pair<const char*, DropPolicy> drop_names[] = {{"position", DropPolicy::position},
                                                         {"score", DropPolicy::score}};
const std::pair<const char*, CapacityScope> scope_names[] = {
    {"auto", CapacityScope::automatic}, {"local", CapacityScope::local}, {"global", CapacityScope::global}};
const std::pair<const char*, GemmChoice> choice_names[] = {
    {"auto", GemmChoice::automatic}, {"true", GemmChoice::on}, {"false", GemmChoice::off}};
}  // namespace

CapacityScope capacity_scope_from_string(const std::string& s) { return parse_enum(s, "capacity scope", scope_names); }
const char* to_string(CapacityScope c) { return enum_name(c, scope_names); }
const char* to_string(GemmChoice c) { return enum_name(c, choice_names); }
GateType gate_type_from_string(const std::string& s) { return parse_enum(s, "gate type", gate_names); }
Activation activation_from_string(const std::string& s) { return parse_enum(s, "activation", activation_names); }
DropPolicy drop_policy_from_string(const std::string& s) { return parse_enum(s, "drop policy", drop_names); }
const char* to_string(GateType g) { return enum_name(g, gate_names); }
const char* to_string(Activation a) { return enum_name(a, activation_names); }
const char* to_string(DropPolicy p) { return enum_name(p, drop_names); }

long MoEConfig::capacity(long tokens, bool training) const {
  if (dropless) return tokens * top_k;
  const double f = training ? capacity_factor : capacity_factor_eval;
  // No expert can be sent more than every assignment: tokens * k.
  const double c = std::ceil(f * static_cast<double>(tokens) * top_k / num_experts);
  return c >= static_cast<double>(tokens) * top_k ? tokens * top_k : static_cast<long>(c);
}

void MoEConfig::validate() const {
  MOKA_REQUIRE(d_model > 0, "moe.d_model = ", d_model, " must be positive");
  MOKA_REQUIRE(d_ff > 0, "moe.d_ff = ", d_ff, " must be positive");
  MOKA_REQUIRE(num_experts > 0, "moe.num_experts = ", num_experts, " must be positive");
  MOKA_REQUIRE(top_k > 0, "moe.top_k = ", top_k, " must be positive");
  MOKA_REQUIRE(top_k <= num_experts, "moe.top_k = ", top_k, " exceeds moe.num_experts = ", num_experts);
  MOKA_REQUIRE(gemm_streams >= 0 && gemm_streams <= 16, "expert.gemm_streams = ", gemm_streams,
               " must be in 0..16 (0: chosen by the layer)");
  MOKA_REQUIRE(shadow_slots >= 0 && shadow_slots <= num_experts, "balance.max_shadowed = ", shadow_slots,
               " is outside [0, moe.num_experts = ", num_experts, "]");
  // A factor of E / k already lets an expert take every assignment; far
  // beyond that the capacity in tokens overflows. 1e6 leaves room for any
  // real E / k and keeps f T k / E exact in a double.
  MOKA_REQUIRE(capacity_factor > 0 && capacity_factor <= max_capacity_factor, "gate.capacity_factor = ",
               capacity_factor, " is outside (0, ", max_capacity_factor,
               "] (any factor of moe.num_experts / moe.top_k or more drops nothing: gate.dropless = true says so)");
  MOKA_REQUIRE(capacity_factor_eval > 0 && capacity_factor_eval <= max_capacity_factor,
               "gate.capacity_factor_eval = ", capacity_factor_eval, " is outside (0, ", max_capacity_factor, "]");
  MOKA_REQUIRE(!renormalize || gate == GateType::softmax,
               "gate.renormalize applies to gate.type = softmax only (gate.type = ", to_string(gate), ")");
  MOKA_REQUIRE(gate != GateType::gshard || top_k == 2, "gate.type = gshard routes to 2 experts, moe.top_k = ", top_k);
  MOKA_REQUIRE(gate != GateType::switch_top1 || top_k == 1, "gate.type = switch routes to 1 expert, moe.top_k = ",
               top_k);
  MOKA_REQUIRE(gate != GateType::noisy || top_k < num_experts, "gate.type = noisy needs moe.top_k < moe.num_experts",
               " (its load estimate uses the (k+1)-th logit), got ", top_k, " of ", num_experts);
  MOKA_REQUIRE(balance_weight >= 0, "gate.balance_weight = ", balance_weight, " must be >= 0");
  MOKA_REQUIRE(z_loss_weight >= 0, "gate.z_loss_weight = ", z_loss_weight, " must be >= 0");
  MOKA_REQUIRE(jitter_eps >= 0 && jitter_eps < 1, "gate.jitter_eps = ", jitter_eps, " must be in [0, 1)");
  MOKA_REQUIRE(!bias_balance || gate == GateType::topk || gate == GateType::softmax || gate == GateType::gshard ||
                   gate == GateType::switch_top1,
               "gate.bias_balance applies to the topk, softmax, gshard and switch gates (gate.type = ", to_string(gate),
               ")");
  MOKA_REQUIRE(dropless || !global_capacity() || drop_policy == DropPolicy::position,
               "a global capacity (gate.capacity_scope = ", to_string(capacity_scope), ", gate.type = ",
               to_string(gate), ") keeps the first assignments in global token order: it needs gate.drop_policy = "
               "position, or gate.capacity_scope = local");
  MOKA_REQUIRE(bias_update_rate >= 0, "gate.bias_update_rate = ", bias_update_rate, " must be >= 0");
  MOKA_REQUIRE(gate != GateType::trace || !trace_file.empty(), "gate.type = trace needs gate.trace_file");
  MOKA_REQUIRE(max_offnode_share >= 0 && max_offnode_share <= 1, "gate.max_offnode_share = ", max_offnode_share,
               " is not in [0, 1]");
  MOKA_REQUIRE(max_offnode_share >= 1 || gate == GateType::topk || gate == GateType::softmax ||
                   gate == GateType::switch_top1,
               "gate.max_offnode_share applies to the topk, softmax and switch gates (gate.type = ", to_string(gate),
               ")");
}

DeckSchema MoEConfig::schema() {
  DeckSchema s;
  s.add("moe.d_model", DeckType::integer).set_default("64").set_min(1).set_doc("Token width d.");
  s.add("moe.d_ff", DeckType::integer).set_default("256").set_min(1).set_doc("Hidden width of each expert FFN.");
  s.add("moe.num_experts", DeckType::integer).set_default("8").set_min(1).set_doc("Number of experts E.");
  s.add("moe.top_k", DeckType::integer).set_default("2").set_min(1).set_doc("Experts per token k (<= E).");
  s.add("expert.activation", DeckType::string)
      .set_default("gelu")
      .set_choices({"gelu", "gelu_tanh", "relu", "silu", "swiglu"})
      .set_doc("Expert activation; gelu is the erf form, swiglu the gated form silu(x W1a) * (x W1b).");
  s.add("expert.bias", DeckType::boolean).set_default("true").set_doc("Experts have biases b1, b2.");
  s.add("expert.gemm_epilogue", DeckType::boolean)
      .set_default("true")
      .set_doc("bf16 on CUDA with gelu_tanh and expert biases: b1 and the activation run in the up-projection "
               "GEMM's cuBLASLt epilogue, the activation's gradient in the epilogue of the GEMM that forms dh; "
               "false: separate kernels. Other activations and precisions always use the kernels.");
  s.add("expert.gemm_grouped", DeckType::string)
      .set_default("auto")
      .set_choices({"auto", "true", "false"})
      .set_doc("bf16 on CUDA: true: each kind of expert GEMM (up, down, and the three of the backward pairs) runs as "
               "one cuBLAS grouped GEMM over the local experts (cublasGemmGroupedBatchedEx) instead of one GEMM per "
               "expert, so that many small experts fill the GPU; a kind this cuBLAS does not offer loops over the "
               "experts (moka-bench names it; CUDA 13.0's cuBLAS refuses the fp32-output weight gradients). auto: "
               "grouped for a stage whose layer holds 16 or more local experts with fewer than 1024 rows per expert "
               "on average (the complement of expert.gemm_streams' auto rule), else one GEMM per expert. On an H200 "
               "grouped made the step 17-27% faster with 256 rows per expert and lost 1.4-1.7x with 1536 or more "
               "(docs/performance.md). Not for the GEMMs with cuBLASLt epilogues. Host builds: no effect.");
  s.add("expert.gemm_batched", DeckType::string)
      .set_default("auto")
      .set_choices({"auto", "true", "false"})
      .set_doc("One rank (no expert parallelism, no replicas or shadows, no fused epilogues): true: every local "
               "expert's rows are padded to the step's largest row count (rounded up to 8; the padding rows' gradient "
               "is zeroed, so they add nothing to any gradient) and, bf16 on CUDA, each kind of expert GEMM runs as one cuBLAS "
               "strided-batched GEMM over the experts (cublasGemmStridedBatchedEx) instead of one GEMM per expert; "
               "other builds run their per-expert GEMMs over the padded rows (for testing). auto: bf16 on CUDA with "
               "16 or more local experts, when the padding adds at most 1/8 to the rows (1/2 when the experts "
               "average fewer than 1024 rows). Takes precedence over expert.gemm_streams and expert.gemm_grouped. "
               "On an H200 it made the step 5% faster with 64 experts of 1536 rows, 1% with 16 of 4096 and 1.5x "
               "with 64 of 256, and 2.5% slower with 8 of 4096 (docs/performance.md).");
  s.add("expert.gemm_streams", DeckType::integer)
      .set_default("0")
      .set_min(0)
      .set_max(16)
      .set_doc("bf16 on CUDA: the expert GEMMs of each stage are spread over this many CUDA streams (expert e on "
               "stream e mod n), so that many small experts run side by side; 1: one after another on the layer's "
               "stream; 0 (auto): 4 streams for a stage whose layer holds 16 or more local experts with at least "
               "1024 rows per expert on average, else one. On an H200 4 streams made the step 9% faster with 64 "
               "experts of 1536 rows and 4% with 16 of 4096, gained nothing with 8 experts and lost 29% with 64 of "
               "256 rows (docs/performance.md), which is the rule auto follows. Not with the cuBLASLt epilogues "
               "(expert.gemm_epilogue with gelu_tanh). Host builds: no effect.");
  s.add("gate.type", DeckType::string)
      .set_default("topk")
      .set_choices({"topk", "softmax", "noisy", "gshard", "switch", "zero", "trace"})
      .set_doc("topk: softmax over the k largest logits; softmax: softmax over all experts, then top-k; "
               "noisy: noisy top-k with importance and load losses; gshard: top-2 with random routing and balance "
               "loss; switch: top-1 with input jitter and balance loss; zero: all to expert 0 (tests); trace: "
               "replay recorded expert counts (docs/moe-layer.md).");
  s.add("gate.renormalize", DeckType::boolean)
      .set_default("false")
      .set_doc("softmax gate: rescale the k scores of a token to sum to 1.");
  s.add("gate.capacity_factor", DeckType::real)
      .set_default("1.25")
      .set_min(0)
      .set_max(MoEConfig::max_capacity_factor)
      .set_doc("Capacity per expert = min(ceil(factor * T * k / E), T * k) when not dropless; in (0, 1e6].");
  s.add("gate.capacity_factor_eval", DeckType::real)
      .set_default("2.0")
      .set_min(0)
      .set_max(MoEConfig::max_capacity_factor)
      .set_doc("Capacity factor in evaluation (GShard uses a larger one than in training); in (0, 1e6].");
  s.add("gate.balance_weight", DeckType::real).set_default("0.01").set_min(0)
      .set_doc("Weight of the balance loss of the noisy, gshard and switch gates.");
  s.add("gate.z_loss_weight", DeckType::real).set_default("0").set_min(0)
      .set_doc("Weight of the router z-loss mean_t (logsumexp_e logits)^2.");
  s.add("gate.jitter_eps", DeckType::real).set_default("0.01").set_min(0).set_max(0.999)
      .set_doc("Switch gate: multiply the gate input by U(1-eps, 1+eps) in training.");
  s.add("gate.random_routing", DeckType::boolean).set_default("true")
      .set_doc("GShard gate: in training, drop the second expert when 2 * score2 < U(0,1).");
  s.add("gate.bias_balance", DeckType::boolean).set_default("false")
      .set_doc("DeepSeek-V3 auxiliary-loss-free balancing: a per-expert bias added to the logits for selection only.");
  s.add("gate.bias_update_rate", DeckType::real).set_default("1e-3").set_min(0)
      .set_doc("Step of the selection bias: bias_e += rate * sign(mean load - load_e) after each training forward.");
  s.add("gate.max_offnode_share", DeckType::real).set_default("1").set_min(0).set_max(1)
      .set_doc("Topology-aware gate (FasterMoE): of each rank's token assignments (T k), at most this share goes "
               "to experts held only on other nodes; the choices past it, in token order, go to the best expert "
               "(by gate logit) on the rank's node that the token has not chosen yet (none left: the choice "
               "stays). Nodes: parallel.ranks_per_node. Applies to the topk, softmax and switch gates; 1: off.");
  s.add("gate.trace_file", DeckType::string).set_default("").set_doc("Trace gate: HDF5 file with /counts.");
  s.add("gate.trace_layer", DeckType::integer).set_default("0").set_min(0).set_doc("Trace gate: layer index.");
  s.add("gate.trace_iteration", DeckType::integer).set_default("-1").set_min(-1)
      .set_doc("Trace gate: first row of the trace's iteration axis (-1: the last).");
  s.add("gate.trace_stride", DeckType::integer).set_default("1").set_min(0)
      .set_doc("Trace gate: rows advanced per training forward, wrapping at the end (FastMoE's FileGate walks the "
               "trace); 0 replays gate.trace_iteration at every forward. Block b of a model uses trace layer "
               "gate.trace_layer + b.");
  s.add("gate.trace_balanced", DeckType::boolean)
      .set_default("false")
      .set_doc("Trace gate: spread each trace row's assignments evenly over the experts (the same token count, "
               "routing perfectly balanced): the baseline against which placement policies are measured.");
  s.add("gate.dropless", DeckType::boolean).set_default("true").set_doc("No capacity limit.");
  s.add("gate.drop_policy", DeckType::string)
      .set_default("position")
      .set_choices({"position", "score"})
      .set_doc("Which assignments an expert over capacity keeps: first in token order, or highest score.");
  s.add("gate.capacity_scope", DeckType::string)
      .set_default("auto")
      .set_choices({"auto", "local", "global"})
      .set_doc("With several ranks: local counts capacity per source rank (ceil(f T_rank k / E), GShard's groups); "
               "global over the whole batch in global token order (Switch; needs drop_policy = position); auto: "
               "global for the switch gate, local otherwise. One rank: the same either way.");
  return s;
}

MoEConfig MoEConfig::from_deck(const InputDeck& deck) {
  MoEConfig c;
  c.d_model         = deck.get<int>("moe.d_model");
  c.d_ff            = deck.get<int>("moe.d_ff");
  c.num_experts     = deck.get<int>("moe.num_experts");
  c.top_k           = deck.get<int>("moe.top_k");
  c.activation      = activation_from_string(deck.get<std::string>("expert.activation"));
  c.expert_bias     = deck.get<bool>("expert.bias");
  c.gemm_epilogue   = deck.get<bool>("expert.gemm_epilogue");
  c.gemm_streams    = deck.get<int>("expert.gemm_streams");
  c.gemm_grouped    = parse_enum(deck.get<std::string>("expert.gemm_grouped"), "expert.gemm_grouped", choice_names);
  c.gemm_batched    = parse_enum(deck.get<std::string>("expert.gemm_batched"), "expert.gemm_batched", choice_names);
  c.gate            = gate_type_from_string(deck.get<std::string>("gate.type"));
  c.renormalize     = deck.get<bool>("gate.renormalize");
  c.capacity_factor = deck.get<double>("gate.capacity_factor");
  c.dropless        = deck.get<bool>("gate.dropless");
  c.drop_policy     = drop_policy_from_string(deck.get<std::string>("gate.drop_policy"));
  c.capacity_scope  = capacity_scope_from_string(deck.get<std::string>("gate.capacity_scope"));
  c.capacity_factor_eval = deck.get<double>("gate.capacity_factor_eval");
  c.balance_weight   = deck.get<double>("gate.balance_weight");
  c.z_loss_weight    = deck.get<double>("gate.z_loss_weight");
  c.jitter_eps       = deck.get<double>("gate.jitter_eps");
  c.random_routing   = deck.get<bool>("gate.random_routing");
  c.bias_balance     = deck.get<bool>("gate.bias_balance");
  c.bias_update_rate = deck.get<double>("gate.bias_update_rate");
  c.trace_file       = deck.get<std::string>("gate.trace_file");
  c.trace_layer      = deck.get<int>("gate.trace_layer");
  c.trace_iteration  = deck.get<int>("gate.trace_iteration");
  c.trace_stride     = deck.get<int>("gate.trace_stride");
  c.trace_balanced   = deck.get<bool>("gate.trace_balanced");
  c.max_offnode_share = deck.get<double>("gate.max_offnode_share");
  c.validate();
  return c;
}

std::vector<std::vector<long>> read_trace_gate_rows(const MoEConfig& cfg) {
  RoutingTrace trace;
  try {
    trace = read_routing_trace(cfg.trace_file);
  } catch (const Error& e) {
    throw Error(std::string("gate.trace_file: ") + e.what());
  }
  MOKA_REQUIRE(trace.n_experts == cfg.num_experts, "gate.trace_file '", cfg.trace_file, "' has ", trace.n_experts,
               " experts, moe.num_experts = ", cfg.num_experts);
  MOKA_REQUIRE(cfg.trace_layer < trace.n_layers, "gate.trace_file '", cfg.trace_file, "' has ", trace.n_layers,
               " layers; gate.trace_layer (plus the block index) = ", cfg.trace_layer, " is past them");
  MOKA_REQUIRE(cfg.trace_iteration < trace.n_iter, "gate.trace_iteration = ", cfg.trace_iteration, " but '",
               cfg.trace_file, "' has ", trace.n_iter, " rows");
  std::vector<std::vector<long>> rows;
  for (long r = 0; r < trace.n_iter; ++r) {
    rows.push_back(trace.expert_counts(r, cfg.trace_layer));
    const long total = std::accumulate(rows.back().begin(), rows.back().end(), 0L);
    MOKA_REQUIRE(total > 0, "gate.trace_file '", cfg.trace_file, "': layer ", cfg.trace_layer, ", iteration row ", r,
                 " of /counts holds no assignments (every count is zero)");
    if (cfg.trace_balanced) {
      const long E = static_cast<long>(rows.back().size());
      for (long e = 0; e < E; ++e) rows.back()[e] = total / E + (e < total % E ? 1 : 0);
    }
  }
  return rows;
}

}  // namespace moka
