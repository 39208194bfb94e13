#pragma once
/// \file MoEConfig.hpp
/// \brief Shape and behaviour of one MoE layer: the `moe.*`, `gate.*` and
/// `expert.*` keys of a deck.
///
/// The struct does not depend on the deck parser (kernel headers include
/// it): schema() and from_deck() are declared with the deck types
/// incomplete; callers of them include moka/deck/InputDeck.hpp.

#include <string>
#include <vector>

namespace moka {

class DeckSchema;
class InputDeck;

/// \brief How a gate turns logits into the k expert scores of a token.
enum class GateType {
  topk,     ///< top-k of the logits, softmax over the k selected (FastMoE NaiveGate)
  softmax,  ///< softmax over all E experts, then top-k (GShard / Mixtral), optional renormalisation
  noisy,    ///< noisy top-k (Shazeer et al.): trainable noise, importance and load cv^2 losses
  gshard,   ///< GShard top-2: renormalised top-2 of the softmax, random routing, balance loss
  switch_top1,  ///< Switch top-1: input jitter, softmax probability of the top expert, balance loss
  zero,     ///< every assignment to expert 0 with score 1/k (for tests)
  trace     ///< replays recorded per-expert counts from an HDF5 trace
};

/// \brief A choice the layer can make itself (expert.gemm_grouped).
enum class GemmChoice {
  off,       ///< never
  on,        ///< always (where the backend offers it)
  automatic  ///< by the layer's rule for the stage's shape (documented with the key)
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

/// \brief Over which tokens capacity is counted when tokens come from several ranks.
enum class CapacityScope {
  automatic,  ///< global for the Switch gate, local otherwise
  local,      ///< per source rank: ceil(f T_rank k / E) of each rank's assignments (GShard groups)
  global      ///< over the batch of all ranks: the first ceil(f T k / E) in global token order (Switch)
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
  double capacity_factor = 1.25;  ///< gate.capacity_factor (> 0), in training
  double capacity_factor_eval = 2.0;  ///< gate.capacity_factor_eval (> 0), in evaluation
  double balance_weight = 0.01;   ///< gate.balance_weight: weight of the gate's balance loss
  double z_loss_weight  = 0.0;    ///< gate.z_loss_weight: router z-loss weight
  double jitter_eps     = 0.01;   ///< gate.jitter_eps: Switch input jitter U(1-eps, 1+eps)
  bool random_routing   = true;   ///< gate.random_routing: GShard drops the 2nd expert when 2 p2 < U(0,1)
  bool bias_balance     = false;  ///< gate.bias_balance: DeepSeek-V3 auxiliary-loss-free bias
  double bias_update_rate = 1e-3; ///< gate.bias_update_rate
  bool bf16_compute = false;      ///< expert GEMMs in bf16 with fp32 accumulation (CUDA, float layers; train.precision = bf16)
  bool gemm_epilogue = true;      ///< expert.gemm_epilogue: bf16 gelu_tanh fused into cuBLASLt epilogues
  GemmChoice gemm_grouped = GemmChoice::automatic;  ///< expert.gemm_grouped: bf16 expert GEMMs as cuBLAS grouped GEMMs
  GemmChoice gemm_batched = GemmChoice::automatic;  ///< expert.gemm_batched: padded rows, strided-batched expert GEMMs
  int gemm_streams   = 0;         ///< expert.gemm_streams: CUDA streams the bf16 expert GEMMs are spread over (0: auto)
  std::string trace_file;         ///< gate.trace_file: HDF5 trace (trace gate)
  int trace_layer     = 0;        ///< gate.trace_layer: index on the trace's layer axis
  int trace_iteration = -1;       ///< gate.trace_iteration: first row of the trace (-1: the last)
  int trace_stride    = 1;        ///< gate.trace_stride: rows advanced per training forward (0: stay)
  bool trace_balanced = false;    ///< gate.trace_balanced: each row's assignments spread evenly over the experts
  bool dropless = true;           ///< gate.dropless: no capacity limit
  /// gate.max_offnode_share: share of a rank's assignments (T k) that may
  /// go to experts on other nodes (FasterMoE's topology-aware gate); the
  /// rest go to the best expert on the rank's node. 1: no limit.
  double max_offnode_share = 1.0;
  /// Dynamic shadowing (FasterMoE): extra expert slots per rank that hold,
  /// for one step, copies of the experts the shadow rule picks (at most
  /// this many per step). Not a moe.* key: moka-train sets it from
  /// balance.shadowing / balance.max_shadowed. 0: no shadowing.
  int shadow_slots = 0;
  DropPolicy drop_policy = DropPolicy::position;  ///< gate.drop_policy
  CapacityScope capacity_scope = CapacityScope::automatic;  ///< gate.capacity_scope
  /// \brief Whether capacity counts over all ranks' tokens (resolves automatic).
  bool global_capacity() const {
    return capacity_scope == CapacityScope::global ||
           (capacity_scope == CapacityScope::automatic && gate == GateType::switch_top1);
  }

  /// \brief Width of W1's output: d_ff, or 2 d_ff for SwiGLU.
  int d_ff_in() const { return activation == Activation::swiglu ? 2 * d_ff : d_ff; }
  /// \brief Largest gate.capacity_factor(_eval) accepted.
  static constexpr double max_capacity_factor = 1e6;
  /// \brief min(ceil(factor * T * k / E), T * k) with the training or
  /// evaluation factor, or T * k when dropless.
  long capacity(long tokens, bool training = true) const;
  /// \brief Throws moka::Error naming the first inconsistent setting.
  void validate() const;

  /// \brief The deck keys of the MoE layer.
  static DeckSchema schema();
  /// \brief Reads and validates the keys from a validated deck.
  static MoEConfig from_deck(const InputDeck& deck);
};

/// \brief Every row of the trace gate's layer (gate.trace_layer) of
/// gate.trace_file, in order: what the trace gate replays (forward i of
/// training uses row (first + i x gate.trace_stride) mod rows). Checked:
/// the file's expert count, the layer and first row in range, no row
/// without assignments; moka::Error names the file and what is wrong. With
/// gate.trace_balanced each row's total is spread evenly instead (the
/// first total mod E experts one more): the same token count, perfectly
/// balanced routing, the baseline that adaptive placement is measured
/// against.
std::vector<std::vector<long>> read_trace_gate_rows(const MoEConfig& cfg);

/// \brief Parses a gate name (topk, softmax, noisy, gshard, switch, zero, trace); throws moka::Error otherwise.
GateType gate_type_from_string(const std::string& s);
/// \brief Parses an activation name; throws moka::Error otherwise.
Activation activation_from_string(const std::string& s);
/// \brief Parses a drop policy ("position", "score"); throws moka::Error otherwise.
DropPolicy drop_policy_from_string(const std::string& s);
/// \brief Parses "auto", "local" or "global"; throws moka::Error otherwise.
CapacityScope capacity_scope_from_string(const std::string& s);
/// \brief Names, as in decks.
const char* to_string(GateType g);
const char* to_string(Activation a);
const char* to_string(DropPolicy p);
const char* to_string(CapacityScope c);
const char* to_string(GemmChoice c);

}  // namespace moka
