#include <moka/balance/LoadMonitor.hpp>
#include <moka/core/Error.hpp>

namespace moka {

void LoadPredictorConfig::validate() const {
  MOKA_REQUIRE(predictor == "ema" || predictor == "window" || predictor == "last", "balance.predictor = '",
               predictor, "': expected ema, window or last");
  MOKA_REQUIRE(ema_decay >= 0 && ema_decay < 1, "balance.ema_decay = ", ema_decay, " must be in [0, 1)");
  MOKA_REQUIRE(window >= 1, "balance.window = ", window, " must be at least 1");
}

LoadMonitor::LoadMonitor(int layers, int experts, LoadPredictorConfig cfg) : m_E(experts), m_cfg(std::move(cfg)) {
  m_cfg.validate();
  MOKA_REQUIRE(layers >= 0 && experts >= 1, "moka::LoadMonitor: ", layers, " layers of ", experts, " experts");
  m_ema.assign(layers, std::vector<double>(experts, 0.0));
  m_last = m_ema;
  m_hist.assign(layers, {});
  m_steps.assign(layers, 0);
}

void LoadMonitor::record(int layer, const std::vector<double>& counts) {
  MOKA_REQUIRE(layer >= 0 && layer < layers(), "moka::LoadMonitor::record: layer ", layer, " of ", layers());
  MOKA_REQUIRE(static_cast<int>(counts.size()) == m_E, "moka::LoadMonitor::record: ", counts.size(),
               " counts for ", m_E, " experts");
  auto& ema = m_ema[layer];
  for (int e = 0; e < m_E; ++e)
    ema[e] = m_steps[layer] == 0 ? counts[e] : m_cfg.ema_decay * ema[e] + (1 - m_cfg.ema_decay) * counts[e];
  m_last[layer] = counts;
  m_hist[layer].push_back(counts);
  while (static_cast<int>(m_hist[layer].size()) > m_cfg.window) m_hist[layer].pop_front();
  ++m_steps[layer];
}

std::vector<double> LoadMonitor::predicted(int layer) const {
  MOKA_REQUIRE(layer >= 0 && layer < layers(), "moka::LoadMonitor::predicted: layer ", layer, " of ", layers());
  if (m_cfg.predictor == "ema") return m_ema[layer];
  if (m_cfg.predictor == "last") return m_last[layer];
  std::vector<double> mean(m_E, 0.0);
  const auto& h = m_hist[layer];
  for (const auto& c : h)
    for (int e = 0; e < m_E; ++e) mean[e] += c[e] / double(h.size());
  return mean;
}

std::vector<double> LoadMonitor::state() const {
  // layers, experts, then per layer: steps, ema[E], last[E], history size, history rows.
  std::vector<double> s{double(layers()), double(m_E)};
  for (int l = 0; l < layers(); ++l) {
    s.push_back(double(m_steps[l]));
    s.insert(s.end(), m_ema[l].begin(), m_ema[l].end());
    s.insert(s.end(), m_last[l].begin(), m_last[l].end());
    s.push_back(double(m_hist[l].size()));
    for (const auto& c : m_hist[l]) s.insert(s.end(), c.begin(), c.end());
  }
  return s;
}

void LoadMonitor::set_state(const std::vector<double>& s) {
  std::size_t at = 0;
  auto next = [&]() {
    MOKA_REQUIRE(at < s.size(), "moka::LoadMonitor::set_state: the state ends early (", s.size(), " values)");
    return s[at++];
  };
  MOKA_REQUIRE(int(next()) == layers() && int(next()) == m_E, "moka::LoadMonitor::set_state: the state is of ",
               s.empty() ? 0 : s[0], " layers x ", s.size() > 1 ? s[1] : 0, " experts, this monitor ", layers(),
               " x ", m_E);
  for (int l = 0; l < layers(); ++l) {
    m_steps[l] = static_cast<long>(next());
    for (int e = 0; e < m_E; ++e) m_ema[l][e] = next();
    for (int e = 0; e < m_E; ++e) m_last[l][e] = next();
    const long n = static_cast<long>(next());
    m_hist[l].clear();
    for (long i = 0; i < n; ++i) {
      std::vector<double> c(m_E);
      for (int e = 0; e < m_E; ++e) c[e] = next();
      m_hist[l].push_back(c);
    }
  }
  MOKA_REQUIRE(at == s.size(), "moka::LoadMonitor::set_state: ", s.size() - at, " values left over");
}

}  // namespace moka
