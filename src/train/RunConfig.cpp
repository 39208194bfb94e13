#include <moka/train/RunConfig.hpp>

namespace moka {

DeckSchema RunConfig::schema() {
  DeckSchema s;
  s.add("run.name", DeckType::string).set_default("moka").set_doc("Label of the run, printed in the log.");
  s.add("run.seed", DeckType::integer).set_default("1234").set_min(0).set_doc("Seed of the run's random streams: parameter initialisation, the gates' noise, jitter and "
                                                                     "random routing, and the shuffling of the training set.");
  s.add("run.log_level", DeckType::string)
      .set_default("info")
      .set_choices({"error", "warn", "info", "debug"})
      .set_doc("Verbosity of rank 0's log.");
  s.add("run.comm_check", DeckType::boolean)
      .set_default("true")
      .set_doc("At start, check one all-reduce over MPI and (on GPU builds) NCCL against the exact sum.");
  return s;
}

RunConfig RunConfig::from_deck(const InputDeck& deck) {
  RunConfig c;
  c.name       = deck.get<std::string>("run.name");
  c.seed       = deck.get<long>("run.seed");
  c.log_level  = log::level_from_string(deck.get<std::string>("run.log_level"));
  c.comm_check = deck.get<bool>("run.comm_check");
  return c;
}

}  // namespace moka
