#include <moka/core/Error.hpp>
#include <moka/train/RegimeTask.hpp>
#include <moka/core/impl/Init.hpp>

#include <cmath>

namespace moka {

DeckSchema RegimeTaskConfig::schema() {
  DeckSchema s;
  s.add("task.input_dim", DeckType::integer).set_default("4").set_min(4).set_doc("Input features (>= 4).");
  s.add("task.train_size", DeckType::integer).set_default("8192").set_min(1).set_doc("Training samples.");
  s.add("task.test_size", DeckType::integer).set_default("2048").set_min(1).set_doc("Held-out samples.");
  s.add("task.seed", DeckType::integer).set_default("2024").set_min(0).set_doc("Seed of the data.");
  s.add("task.noise", DeckType::real).set_default("0").set_min(0).set_doc("Std of noise on training targets.");
  return s;
}

RegimeTaskConfig RegimeTaskConfig::from_deck(const InputDeck& deck) {
  RegimeTaskConfig c;
  c.input_dim  = deck.get<int>("task.input_dim");
  c.train_size = deck.get<long>("task.train_size");
  c.test_size  = deck.get<long>("task.test_size");
  c.seed       = deck.get<long>("task.seed");
  c.noise      = deck.get<double>("task.noise");
  return c;
}

void regime_targets(const double* x, int d_in, double* y, int* regime) {
  const int r = (x[0] >= 0 ? 1 : 0) + (x[1] >= 0 ? 2 : 0);
  const double a = x[2], b = x[3];
  double extra = 0;
  for (int i = 4; i < d_in; ++i) extra += 0.1 * x[i];
  switch (r) {
    case 0: y[0] = std::sin(M_PI * a); y[1] = a * b; break;
    case 1: y[0] = a * a - b * b; y[1] = std::cos(M_PI * b); break;
    case 2: y[0] = std::exp(-2.0 * (a * a + b * b)); y[1] = a - b; break;
    default: y[0] = std::tanh(3.0 * a * b); y[1] = std::fabs(a) - 0.5; break;
  }
  y[0] += extra;
  y[1] -= extra;
  if (regime) *regime = r;
}

RegimeData make_regime_data(const RegimeTaskConfig& cfg, int split) {
  MOKA_REQUIRE(cfg.input_dim >= 4, "task.input_dim = ", cfg.input_dim, " must be >= 4");
  MOKA_REQUIRE(split == 0 || split == 1, "split = ", split, " must be 0 (train) or 1 (test)");
  RegimeData d;
  d.n     = split == 0 ? cfg.train_size : cfg.test_size;
  d.d_in  = cfg.input_dim;
  d.d_out = RegimeTaskConfig::output_dim;
  d.x.resize(d.n * d.d_in);
  d.y.resize(d.n * d.d_out);
  d.regime.resize(d.n);
  impl::SplitMix64 rng{static_cast<std::uint64_t>(cfg.seed) * 2 + static_cast<std::uint64_t>(split) + 1};
  for (long i = 0; i < d.n; ++i) {
    for (int j = 0; j < d.d_in; ++j) d.x[i * d.d_in + j] = rng.uniform(1.0);
    regime_targets(&d.x[i * d.d_in], d.d_in, &d.y[i * d.d_out], &d.regime[i]);
    if (split == 0 && cfg.noise > 0) {
      for (int j = 0; j < d.d_out; ++j) {
        // Box-Muller from two uniforms in (0, 1].
        const double u1 = 0.5 * (rng.uniform(1.0) + 1.0000001), u2 = 0.5 * (rng.uniform(1.0) + 1.0);
        d.y[i * d.d_out + j] += cfg.noise * std::sqrt(-2.0 * std::log(u1)) * std::cos(2 * M_PI * u2);
      }
    }
  }
  return d;
}

}  // namespace moka
