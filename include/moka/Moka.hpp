#pragma once
/// \file Moka.hpp
/// \brief Umbrella header: every public header of MoKA, layer by layer
/// (docs/design.md). Embedding codes may include this one header, or only
/// the headers of the layers they use. Library files never include it.

// core: types, errors, logging, timers, the runtime guard
#include <moka/core/BFloat16.hpp>
#include <moka/core/Core.hpp>
#include <moka/core/Error.hpp>
#include <moka/core/Log.hpp>
#include <moka/core/Profiling.hpp>
#include <moka/core/Runtime.hpp>
// deck: input decks and their schemas
#include <moka/deck/DeckSchema.hpp>
#include <moka/deck/InputDeck.hpp>
// linalg: matrix products and column sums (internal, moka::impl)
#include <moka/linalg/ColumnSums.hpp>
#include <moka/linalg/Gemm.hpp>
// comm: communicators (MPI, NCCL), the start-up check
#include <moka/comm/CommCheck.hpp>
#include <moka/comm/Communicator.hpp>
// io: routing traces
#include <moka/io/CheckpointFile.hpp>
#include <moka/io/RoutingTrace.hpp>
// parallel: process groups, gradient synchronisation
#include <moka/parallel/GradSync.hpp>
#include <moka/parallel/ParamTag.hpp>
#include <moka/parallel/Placement.hpp>
#include <moka/parallel/ProcessGroups.hpp>
#include <moka/parallel/ReplicaGroups.hpp>
#include <moka/parallel/ReplicaSplit.hpp>
// moe: the MoE layer
#include <moka/moe/MoEConfig.hpp>
#include <moka/moe/MoELayer.hpp>
#include <moka/moe/TokenExchange.hpp>
// model: dense layers, the MoE model, the optimizer
#include <moka/model/Dense.hpp>
#include <moka/model/MoEModel.hpp>
#include <moka/model/Optimizer.hpp>
#include <moka/balance/BalanceConfig.hpp>
#include <moka/balance/Balancer.hpp>
#include <moka/balance/LoadMonitor.hpp>
#include <moka/balance/Migration.hpp>
#include <moka/balance/Policy.hpp>
#include <moka/checkpoint/Checkpoint.hpp>
#include <moka/checkpoint/CheckpointConfig.hpp>
// train: the training loop, the regime task, run and benchmark settings
#include <moka/train/BenchConfig.hpp>
#include <moka/train/RegimeTask.hpp>
#include <moka/train/RunConfig.hpp>
#include <moka/train/Trainer.hpp>
