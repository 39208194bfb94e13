#pragma once
/// \file Calibration.hpp
/// \brief The fits that turn calibration measurements into a machine
/// profile (moka-bench bench.mode = calibrate; docs/cost-model.md).

#include <moka/plan/MachineProfile.hpp>

#include <vector>

namespace moka {

/// \brief Least squares y ~ X b with every coefficient >= 0: a feature
/// whose coefficient comes out negative is dropped (0) and the rest fitted
/// again. \p X: one row of features per measurement. Throws moka::Error on
/// mismatched sizes or fewer measurements than features.
std::vector<double> fit_nonnegative(const std::vector<std::vector<double>>& X, const std::vector<double>& y);

/// \brief Latency and bandwidth of a link from measurements of \p transfers
/// transfers each of \p bytes[i] taking \p seconds[i] in all: seconds =
/// transfers (latency + bytes / bandwidth), fitted with latency >= 0 by
/// least relative error (each measurement weighted by 1 / its time).
/// Throws moka::Error when the times do not grow with the bytes (no
/// bandwidth can be derived).
MachineProfile::Link fit_link(const std::string& path, const std::vector<double>& bytes,
                              const std::vector<double>& seconds, double transfers);

/// \brief Median of \p v (the upper one of an even count); 0 when empty.
double median_of(std::vector<double> v);

}  // namespace moka
