#pragma once
/// \file Trainer.hpp
/// \brief Training of moka::MoEModel on the regime task over the ranks of a
/// communicator: each rank a slice of every batch, MoE layers laid out by
/// the parallel.* keys (EP x EDP x expert slicing), gradients summed by tag
/// (moka::GradSync), progress lines, a CSV of metrics, held-out loss.

#include <moka/MoEModel.hpp>
#include <moka/Optimizer.hpp>
#include <moka/ProcessGroups.hpp>
#include <moka/RegimeTask.hpp>
#include <moka/RunConfig.hpp>

#include <mpi.h>

#include <ostream>
#include <string>

namespace moka {

/// \brief Loop settings (`train.batch_size`, `train.precision`, `io.*` keys).
struct TrainerConfig {
  long batch_size = 256;           ///< train.batch_size: samples per step over all ranks
  std::string precision = "fp32";  ///< train.precision: fp32 or fp64
  long log_every  = 50;            ///< io.log_every: progress line period (steps)
  long eval_every = 100;           ///< io.eval_every: held-out loss period (steps)
  std::string metrics_file;        ///< io.metrics_file: CSV path ("" : none)

  static DeckSchema schema();
  static TrainerConfig from_deck(const InputDeck& deck);
};

/// \brief What a training run reached.
struct TrainResult {
  double initial_test_loss = 0;  ///< held-out MSE before the first step
  double final_test_loss   = 0;  ///< held-out MSE after the last step
  double final_train_loss  = 0;  ///< training MSE of the last step
  double seconds           = 0;  ///< wall time of the loop
  double samples_per_second = 0; ///< samples (tokens) per second over all ranks
  long steps = 0;
};

/// \brief Every key moka-train reads: run, task, model, MoE, optimizer, loop.
DeckSchema train_schema();

/// \brief Trains the model that \p deck describes. Progress goes to \p log on rank 0.
/// \note Collective over \p comm.
TrainResult train_regime_model(MPI_Comm comm, const InputDeck& deck, std::ostream& log);

}  // namespace moka
