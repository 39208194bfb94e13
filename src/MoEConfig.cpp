#include <moka/Error.hpp>
#include <moka/MoEConfig.hpp>

#include <cmath>

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
    {"topk", GateType::topk}, {"softmax", GateType::softmax}, {"zero", GateType::zero}};
const std::pair<const char*, Activation> activation_names[] = {{"gelu", Activation::gelu_erf},
                                                               {"gelu_tanh", Activation::gelu_tanh},
                                                               {"relu", Activation::relu},
                                                               {"silu", Activation::silu},
                                                               {"swiglu", Activation::swiglu}};
const std::pair<const char*, DropPolicy> drop_names[] = {{"position", DropPolicy::position},
                                                         {"score", DropPolicy::score}};
}  // namespace

GateType gate_type_from_string(const std::string& s) { return parse_enum(s, "gate type", gate_names); }
Activation activation_from_string(const std::string& s) { return parse_enum(s, "activation", activation_names); }
DropPolicy drop_policy_from_string(const std::string& s) { return parse_enum(s, "drop policy", drop_names); }
const char* to_string(GateType g) { return enum_name(g, gate_names); }
const char* to_string(Activation a) { return enum_name(a, activation_names); }
const char* to_string(DropPolicy p) { return enum_name(p, drop_names); }

long MoEConfig::capacity(long tokens) const {
  if (dropless) return tokens * top_k;
  return static_cast<long>(std::ceil(capacity_factor * static_cast<double>(tokens) * top_k / num_experts));
}

void MoEConfig::validate() const {
  MOKA_REQUIRE(d_model > 0, "moe.d_model = ", d_model, " must be positive");
  MOKA_REQUIRE(d_ff > 0, "moe.d_ff = ", d_ff, " must be positive");
  MOKA_REQUIRE(num_experts > 0, "moe.num_experts = ", num_experts, " must be positive");
  MOKA_REQUIRE(top_k > 0, "moe.top_k = ", top_k, " must be positive");
  MOKA_REQUIRE(top_k <= num_experts, "moe.top_k = ", top_k, " exceeds moe.num_experts = ", num_experts);
  MOKA_REQUIRE(capacity_factor > 0 && std::isfinite(capacity_factor), "gate.capacity_factor = ", capacity_factor,
               " must be positive");
  MOKA_REQUIRE(!renormalize || gate == GateType::softmax,
               "gate.renormalize applies to gate.type = softmax only (gate.type = ", to_string(gate), ")");
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
  s.add("gate.type", DeckType::string)
      .set_default("topk")
      .set_choices({"topk", "softmax", "zero"})
      .set_doc("topk: softmax over the k largest logits; softmax: softmax over all experts, then top-k; "
               "zero: all to expert 0 (tests).");
  s.add("gate.renormalize", DeckType::boolean)
      .set_default("false")
      .set_doc("softmax gate: rescale the k scores of a token to sum to 1.");
  s.add("gate.capacity_factor", DeckType::real)
      .set_default("1.25")
      .set_min(0)
      .set_doc("Capacity per expert = ceil(factor * T * k / E) when not dropless; must be > 0.");
  s.add("gate.dropless", DeckType::boolean).set_default("true").set_doc("No capacity limit.");
  s.add("gate.drop_policy", DeckType::string)
      .set_default("position")
      .set_choices({"position", "score"})
      .set_doc("Which assignments an expert over capacity keeps: first in token order, or highest score.");
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
  c.gate            = gate_type_from_string(deck.get<std::string>("gate.type"));
  c.renormalize     = deck.get<bool>("gate.renormalize");
  c.capacity_factor = deck.get<double>("gate.capacity_factor");
  c.dropless        = deck.get<bool>("gate.dropless");
  c.drop_policy     = drop_policy_from_string(deck.get<std::string>("gate.drop_policy"));
  c.validate();
  return c;
}

}  // namespace moka
