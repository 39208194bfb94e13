#include <moka/model/MoEModel.hpp>

namespace moka {

DeckSchema ModelConfig::schema() {
  DeckSchema s = MoEConfig::schema();
  s.add("model.blocks", DeckType::integer).set_default("2").set_min(0)
      .set_doc("Number of [LayerNorm -> MoE -> residual] blocks between the input and output projections.");
  return s;
}

ModelConfig ModelConfig::from_deck(const InputDeck& deck) {
  ModelConfig c;
  c.blocks = deck.get<int>("model.blocks");
  c.moe    = MoEConfig::from_deck(deck);
  return c;
}

}  // namespace moka
