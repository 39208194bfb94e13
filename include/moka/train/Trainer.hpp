#pragma once
/// \file Trainer.hpp
/// \brief Training of moka::MoEModel on the regime task over the ranks of a
/// communicator: each rank a slice of every batch, MoE layers laid out by
/// the parallel.* keys (EP x EDP x expert slicing), gradients summed by tag
/// (moka::GradSync), progress lines, a CSV of metrics, held-out loss.

#include <moka/core/Memory.hpp>
#include <moka/model/MoEModel.hpp>
#include <moka/model/Optimizer.hpp>
#include <moka/parallel/ProcessGroups.hpp>
#include <moka/train/RegimeTask.hpp>
#include <moka/train/RunConfig.hpp>

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
  long steps = 0;                ///< steps done when the loop ended (of the whole run)
  long first_step = 0;           ///< the step it started from (a restart's checkpoint step)
  bool interrupted = false;      ///< stopped early by SIGTERM / SIGUSR1 after writing a checkpoint
  std::string checkpoint;        ///< the last checkpoint written ("" : none)
};

/// \brief Every key moka-train reads: run, task, model, MoE, optimizer, loop.
DeckSchema train_schema();

/// \brief Checks everything about a training deck that is the same on every
/// rank, before anything is allocated: every section's values, the layout
/// against \p world_size ranks, the batch split, bf16 on this build, the
/// trace gate's file, and the memory the run needs (per rank on the
/// device, times \p ranks_on_node on the host) against what the machine
/// has. moka::Error names the key (and for memory the keys and bytes).
/// Run it under moka::agree_on_failure so that it is reported once.
void check_training_deck(const InputDeck& deck, int world_size, int ranks_on_node);

/// \brief The memory a training run of \p deck on \p world_size ranks
/// allocates on one rank (moka::MemoryEstimate items with their keys).
MemoryEstimate training_memory(const InputDeck& deck, int world_size);

/// \brief Held-out mean squared error of \p model on \p data over the ranks
/// of \p world (each a contiguous slice, in chunks of 1024 rows), in
/// evaluation mode (no noise, jitter or random routing; the evaluation
/// capacity factor); the model's mode is restored after.
/// \note Collective over \p world (and the model's process groups).
template <class S, class M>
double held_out_loss(MoEModel<S, M>& model, const RegimeData& data, Communicator& world,
                     const typename M::execution_space& space);

/// \brief Trains the model that \p deck describes (a validated deck).
/// Progress goes to \p log on rank 0. Checks the run's world communicator
/// first when run.comm_check is set. Continues from io.restart where set;
/// writes checkpoints by the io.checkpoint_* keys; SIGTERM or SIGUSR1 during
/// the loop makes it write one at the next step boundary and return with
/// TrainResult::interrupted set. A bad checkpoint or one that does not fit
/// the deck raises moka::CollectiveError on every rank.
/// \note Collective over \p comm.
TrainResult train_regime_model(MPI_Comm comm, const InputDeck& deck, std::ostream& log);

}  // namespace moka
