#pragma once
/// \file MoEConfig.hpp
/// \brief Shape and behaviour of one MoE layer: the `moe.*`, `gate.*` and
/// `expert.*` keys of a deck.

#include <moka/DeckSchema.hpp>
#include <moka/InputDeck.hpp>

#include <string>

namespace moka {

/// \brief How a gate turns logits into the k expert scores of a token.
enum class GateType {
  topk,     ///< top-k of the logits, softmax over the k selected (FastMoE NaiveGate)
  softmax,  ///< softmax over all E experts, then top-k (GShard / Mixtral), optional renormalisation
  zero      ///< every assignment to expert 0 with score 1/k (for tests)
};

/// \brief Expert activation.
enum class Activation {
  gelu_erf,   ///< 0.5 x (1 + erf(x / sqrt 2))
  gelu_tanh,  ///< 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
  relu,       ///< max(x, 0)
  silu,       ///< x sigmoid(x)
  swiglu      ///< silu(x W1a) * (x W1b): gated form, W1 has 2 d_ff columns
};

/// \brief Which assignments an expert over capacity keeps.
enum class DropPolicy {
  position,  ///< the first `capacity` in token order
  score      ///< the `capacity` with the highest gate scores (ties: token order)
};

/// \brief Configuration of an MoE layer.
struct MoEConfig {
  int d_model     = 64;   ///< moe.d_model: token width d
  int d_ff        = 256;  ///< moe.d_ff: hidden width of each expert
  int num_experts = 8;    ///< moe.num_experts: E
  int top_k       = 2;    ///< moe.top_k: k
  bool expert_bias = true;  ///< expert.bias: b1 and b2 present
  Activation activation = Activation::gelu_erf;  ///< expert.activation
  GateType gate = GateType::topk;                ///< gate.type
  bool renormalize = false;       ///< gate.renormalize: softmax gate, scores of the k sum to 1
  double capacity_factor = 1.25;  ///< gate.capacity_factor (> 0)
  bool dropless = true;           ///< gate.dropless: no capacity limit
  DropPolicy drop_policy = DropPolicy::position;  ///< gate.drop_policy

  /// \brief Width of W1's output: d_ff, or 2 d_ff for SwiGLU.
  int d_ff_in() const { return activation == Activation::swiglu ? 2 * d_ff : d_ff; }
  /// \brief ceil(capacity_factor * T * k / E), or T * k when dropless.
  long capacity(long tokens) const;
  /// \brief Throws moka::Error naming the first inconsistent setting.
  void validate() const;

  /// \brief The deck keys of the MoE layer.
  static DeckSchema schema();
  /// \brief Reads and validates the keys from a validated deck.
  static MoEConfig from_deck(const InputDeck& deck);
};

/// \brief Parses a gate name ("topk", "softmax", "zero"); throws moka::Error otherwise.
GateType gate_type_from_string(const std::string& s);
/// \brief Parses an activation name; throws moka::Error otherwise.
Activation activation_from_string(const std::string& s);
/// \brief Parses a drop policy ("position", "score"); throws moka::Error otherwise.
DropPolicy drop_policy_from_string(const std::string& s);
/// \brief Names, as in decks.
const char* to_string(GateType g);
const char* to_string(Activation a);
const char* to_string(DropPolicy p);

}  // namespace moka
