#include <moka/moe/LayerMemory.hpp>

namespace moka {

void add_moe_layer_memory(MemoryEstimate& m, const MoEConfig& c, const LayerMemoryShape& sh) {
  // Everything in doubles: a deck of absurd sizes must give a large number,
  // not an overflow.
  const double d = c.d_model, E = c.num_experts, k = c.top_k, s = double(sh.scalar_bytes);
  const double S = sh.slices, L = sh.slots_per_rank > 0 ? double(sh.slots_per_rank) : E / sh.ep, n = sh.layers;
  const double dff = double(c.d_ff), dfi = c.activation == Activation::swiglu ? 2 * dff : dff;
  const double dffl = dff / S, dfil = dfi / S;
  const std::string layers = sh.layers_key.empty() ? "" : ", " + sh.layers_key;
  // Parameters, their gradients and the optimizer's values (MoELayer's
  // m_params, m_grads; Optimizer's moments); bf16 copies of W1 and W2.
  const double expert = L * (d * dfil + dffl * d + (c.expert_bias ? dfil + d : 0));
  const double bf16 = c.bf16_compute ? L * (d * dfil + dffl * d) * 2 : 0;
  m.add("expert weights, gradients and optimizer state", "moe.num_experts, moe.d_model, moe.d_ff" + layers +
            ", parallel.expert_parallel, parallel.expert_slicing" +
            (sh.slots_per_rank > 0 ? ", balance.slots_per_rank" : ""),
        n * (expert * s * (2 + sh.moments) + bf16));
  if (c.shadow_slots > 0 && sh.ep > 1) {
    // Shadow slots: parameters and gradients (no optimizer state), bf16
    // copies, and one slot's gradient staging.
    const double M = c.shadow_slots, slot = expert / L;
    m.add("shadow slots (dynamic shadowing)", "balance.max_shadowed, moe.d_model, moe.d_ff" + layers,
          n * (M * slot * s * 2 + (L > 0 ? bf16 / L * M : 0) + slot * s));
  }
  const double gate = d * E * (c.gate == GateType::noisy ? 2 : 1);
  m.add("gate weights, gradients and optimizer state", "moe.d_model, moe.num_experts" + layers,
        n * gate * s * (2 + sh.moments));
  // Workspace kept across steps. Dispatch side (T k rows of d): xs, ys,
  // dys, dxs, the exchange's receive and staging buffers. Expert side
  // (T k S rows): xe, ye, dye, dxe, pre-activation, h and their gradients.
  const double T = sh.tokens, rows = T * k, rows_e = rows * S;
  const double dispatch = rows * d * 8;
  const double experts  = rows_e * (4 * d + 2 * dfil + 2 * dffl);
  m.add("expert activations and their gradients", sh.tokens_key + ", moe.top_k, moe.d_model, moe.d_ff" + layers,
        n * (dispatch + experts) * s);
  // Gate: logits, probabilities, noise and their gradients (T x E each), the
  // gate's input copies (T x d), and the routing's integers (T k each).
  m.add("gate activations and routing", sh.tokens_key + ", moe.num_experts" + layers,
        n * ((T * E * 10 + T * d * 3) * s + T * k * 6 * 4 + rows * 3 * 4));
}

}  // namespace moka
