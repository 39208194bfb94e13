#pragma once
/// \file LayerMemory.hpp
/// \brief The memory of MoE layers, estimated from their configuration
/// before any is allocated (moka::MemoryEstimate): what the drivers check
/// against the machine, and what the planner will weigh layouts by.

#include <moka/core/Memory.hpp>
#include <moka/moe/MoEConfig.hpp>

#include <cstddef>
#include <string>

namespace moka {

/// \brief How the layers are laid out and trained, for the estimate.
struct LayerMemoryShape {
  double tokens = 0;             ///< tokens per rank per forward (the largest batch)
  int ep = 1, slices = 1;        ///< EP and expert slicing
  int slots_per_rank = 0;        ///< expert slots per EP rank (0: experts / EP; more: replicas in spare slots)
  int layers = 1;                ///< MoE layers alike
  std::size_t scalar_bytes = 4;  ///< sizeof the layer's Scalar
  int moments = 2;               ///< optimizer values per parameter (Adam 2, SGD 1, none 0)
  std::string tokens_key = "train.batch_size";  ///< the deck key that sizes the tokens
  std::string layers_key = "model.blocks";      ///< the deck key that counts the layers ("" for one)
};

/// \brief Adds the parameters, gradients, optimizer state and the forward
/// and backward workspace of \p shape.layers layers of \p cfg (rows at
/// their balanced count: T k per rank, gathered over the slice group).
void add_moe_layer_memory(MemoryEstimate& estimate, const MoEConfig& cfg, const LayerMemoryShape& shape);

}  // namespace moka
