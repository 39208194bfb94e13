#pragma once
/// \file RegimeTask.hpp
/// \brief A scientific-ML regression task made in-process from a seed:
/// inputs uniform in [-1, 1]^d_in, and targets that follow a different
/// nonlinear law in each region of input space, so experts have something
/// to specialise on.
///
/// The region ("regime") of a sample is set by the signs of x0 and x1 (four
/// quadrants). With x2, x3 the next inputs (and x4.. adding a weak linear
/// term), the two targets are:
///   regime 0: sin(pi x2),             x2 x3
///   regime 1: x2^2 - x3^2,            cos(pi x3)
///   regime 2: exp(-2 (x2^2 + x3^2)),  x2 - x3
///   regime 3: tanh(3 x2 x3),          |x2| - 0.5
/// The same seed gives the same data on every machine and rank count.

#include <moka/deck/DeckSchema.hpp>
#include <moka/deck/InputDeck.hpp>

#include <cstdint>
#include <vector>

namespace moka {

/// \brief Task settings (`task.*` keys).
struct RegimeTaskConfig {
  int input_dim  = 4;     ///< task.input_dim (>= 4)
  long train_size = 8192; ///< task.train_size
  long test_size  = 2048; ///< task.test_size
  long seed       = 2024; ///< task.seed
  double noise    = 0.0;  ///< task.noise: std of Gaussian noise added to training targets

  static constexpr int output_dim = 2;  ///< targets per sample
  static DeckSchema schema();
  static RegimeTaskConfig from_deck(const InputDeck& deck);
};

/// \brief Samples of the task, row-major, in host memory.
struct RegimeData {
  long n = 0;
  int d_in = 0, d_out = 0;
  std::vector<double> x;     ///< [n, d_in]
  std::vector<double> y;     ///< [n, d_out]
  std::vector<int> regime;   ///< [n]
};

/// \brief The training set (split 0) or the held-out test set (split 1).
RegimeData make_regime_data(const RegimeTaskConfig& cfg, int split);

/// \brief The targets of one input row (no noise).
void regime_targets(const double* x, int d_in, double* y, int* regime);

}  // namespace moka
