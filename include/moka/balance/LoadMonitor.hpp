#pragma once
/// \file LoadMonitor.hpp
/// \brief moka::LoadMonitor: per layer, the per-expert assignment counts of
/// every step (summed over the gate group by the caller) and a prediction
/// of the next steps' loads: an exponential moving average
/// (balance.predictor = ema, weight balance.ema_decay on the past) or the
/// mean of the last balance.window steps (window). Embedding codes read the
/// loads from here (Trainer::load_monitor()).

#include <deque>
#include <string>
#include <vector>

namespace moka {

/// \brief How loads are predicted from their history.
struct LoadPredictorConfig {
  std::string predictor = "ema";  ///< "ema", "window" or "last"
  double ema_decay      = 0.7;    ///< ema: prediction = decay x prediction + (1 - decay) x newest
  int window            = 10;     ///< window: steps averaged (also the history kept)
  /// \brief Throws moka::Error naming the key that is out of range.
  void validate() const;
};

class LoadMonitor {
 public:
  LoadMonitor() = default;
  LoadMonitor(int layers, int experts, LoadPredictorConfig cfg);

  /// \brief One step's per-expert counts of layer \p layer.
  void record(int layer, const std::vector<double>& counts);
  /// \brief The predicted per-expert load of the next steps (zeros before
  /// the first record).
  std::vector<double> predicted(int layer) const;
  /// \brief The newest counts, and the kept history (oldest first).
  const std::vector<double>& last(int layer) const { return m_last.at(layer); }
  const std::deque<std::vector<double>>& history(int layer) const { return m_hist.at(layer); }
  /// \brief Steps recorded for \p layer.
  long steps(int layer) const { return m_steps.at(layer); }
  int layers() const { return static_cast<int>(m_last.size()); }
  int experts() const { return m_E; }
  const LoadPredictorConfig& config() const { return m_cfg; }
  /// \brief The whole state (for checkpoints): EMA, history and counts,
  /// flattened, and its inverse.
  std::vector<double> state() const;
  void set_state(const std::vector<double>& s);

 private:
  int m_E = 0;
  LoadPredictorConfig m_cfg;
  std::vector<std::vector<double>> m_ema, m_last;
  std::vector<std::deque<std::vector<double>>> m_hist;
  std::vector<long> m_steps;
};

}  // namespace moka
