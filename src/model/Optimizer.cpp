#include <moka/model/Optimizer.hpp>

namespace moka {

OptimizerType optimizer_type_from_string(const std::string& s) {
  if (s == "sgd") return OptimizerType::sgd;
  if (s == "adam") return OptimizerType::adam;
  if (s == "adamw") return OptimizerType::adamw;
  throw Error("moka: unknown optimizer '" + s + "' (expected one of: sgd, adam, adamw)");
}

double OptimizerConfig::learning_rate(long step) const {
  if (warmup_steps > 0 && step < warmup_steps) return lr * double(step + 1) / double(warmup_steps);
  const long decay_steps = total_steps - warmup_steps;
  if (decay_steps <= 0) return lr;
  const double progress = std::min(1.0, double(step - warmup_steps) / double(decay_steps));
  const double min_lr   = min_lr_ratio * lr;
  return min_lr + 0.5 * (lr - min_lr) * (1.0 + std::cos(M_PI * progress));
}

void OptimizerConfig::validate() const {
  MOKA_REQUIRE(lr > 0 && std::isfinite(lr), "train.lr = ", lr, " must be positive");
  MOKA_REQUIRE(min_lr_ratio >= 0 && min_lr_ratio <= 1, "train.min_lr_ratio = ", min_lr_ratio, " must be in [0, 1]");
  MOKA_REQUIRE(warmup_steps >= 0, "train.warmup_steps = ", warmup_steps, " must be >= 0");
  MOKA_REQUIRE(total_steps > 0, "train.steps = ", total_steps, " must be positive");
  MOKA_REQUIRE(beta1 >= 0 && beta1 < 1, "train.beta1 = ", beta1, " must be in [0, 1)");
  MOKA_REQUIRE(beta2 >= 0 && beta2 < 1, "train.beta2 = ", beta2, " must be in [0, 1)");
  MOKA_REQUIRE(eps > 0, "train.eps = ", eps, " must be positive");
  MOKA_REQUIRE(momentum >= 0 && momentum < 1, "train.momentum = ", momentum, " must be in [0, 1)");
  MOKA_REQUIRE(weight_decay >= 0, "train.weight_decay = ", weight_decay, " must be >= 0");
  MOKA_REQUIRE(clip_norm >= 0, "train.clip_norm = ", clip_norm, " must be >= 0");
}

DeckSchema OptimizerConfig::schema() {
  DeckSchema s;
  s.add("train.optimizer", DeckType::string).set_default("adamw").set_choices({"sgd", "adam", "adamw"})
      .set_doc("Update rule: SGD with momentum, Adam (L2 weight decay), AdamW (decoupled weight decay).");
  s.add("train.lr", DeckType::real).set_default("1e-3").set_min(0).set_doc("Peak learning rate.");
  s.add("train.min_lr_ratio", DeckType::real).set_default("0.1").set_min(0).set_max(1)
      .set_doc("Learning rate at the end of the cosine decay, relative to train.lr.");
  s.add("train.warmup_steps", DeckType::integer).set_default("0").set_min(0).set_doc("Linear warmup steps (more than train.steps is allowed, with a warning: the rate never reaches "
                                      "train.lr).");
  s.add("train.steps", DeckType::integer).set_default("1000").set_min(1).set_doc("Training steps (end of the cosine decay).");
  s.add("train.momentum", DeckType::real).set_default("0.9").set_min(0).set_max(0.999999).set_doc("SGD momentum.");
  s.add("train.beta1", DeckType::real).set_default("0.9").set_min(0).set_max(0.999999).set_doc("Adam beta1.");
  s.add("train.beta2", DeckType::real).set_default("0.999").set_min(0).set_max(0.999999).set_doc("Adam beta2.");
  s.add("train.eps", DeckType::real).set_default("1e-8").set_min(0).set_doc("Adam epsilon.");
  s.add("train.weight_decay", DeckType::real).set_default("0").set_min(0).set_doc("Weight decay.");
  s.add("train.clip_norm", DeckType::real).set_default("0").set_min(0)
      .set_doc("Clip the global gradient norm to this value (0: no clipping).");
  return s;
}

OptimizerConfig OptimizerConfig::from_deck(const InputDeck& deck) {
  OptimizerConfig c;
  c.type         = optimizer_type_from_string(deck.get<std::string>("train.optimizer"));
  c.lr           = deck.get<double>("train.lr");
  c.min_lr_ratio = deck.get<double>("train.min_lr_ratio");
  c.warmup_steps = deck.get<long>("train.warmup_steps");
  c.total_steps  = deck.get<long>("train.steps");
  c.momentum     = deck.get<double>("train.momentum");
  c.beta1        = deck.get<double>("train.beta1");
  c.beta2        = deck.get<double>("train.beta2");
  c.eps          = deck.get<double>("train.eps");
  c.weight_decay = deck.get<double>("train.weight_decay");
  c.clip_norm    = deck.get<double>("train.clip_norm");
  c.validate();
  return c;
}

}  // namespace moka
