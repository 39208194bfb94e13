// moka-train: reads an input deck, echoes the resolved configuration and the
// MPI / Kokkos / NCCL / HDF5 set-up, checks the communicators, and trains
// the MoE model the deck describes on the regime task.
//
//   moka-train <deck> [key=value ...]
//   moka-train --deck-reference      # the deck keys, as a Markdown table

#include <moka/core/Collective.hpp>
#include <moka/deck/InputDeck.hpp>
#include <moka/core/Log.hpp>
#include <moka/core/Profiling.hpp>
#include <moka/train/RunConfig.hpp>
#include <moka/core/Runtime.hpp>
#include <moka/train/Trainer.hpp>

#include <cstring>
#include <iostream>
#include <string>
#include <vector>

namespace {

const char* usage =
    "usage: moka-train <deck> [key=value ...]\n"
    "       moka-train --deck-reference\n"
    "Reads the input deck, applies the key=value overrides (they win over the\n"
    "file), prints the resolved configuration and runs the job.\n";

moka::DeckSchema train_schema() { return moka::train_schema(); }

}  // namespace

int main(int argc, char* argv[]) {
  moka::Runtime runtime(argc, argv);
  const char* program = "moka-train";

  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "-h" || args[0] == "--help") {
    if (runtime.rank() == 0) std::cout << usage;
    return args.empty() ? 2 : 0;
  }
  if (args[0] == "--deck-reference") {
    if (runtime.rank() == 0) std::cout << train_schema().markdown();
    return 0;
  }

  // Deck errors are the same on every rank (rank 0 parses and broadcasts):
  // report once and leave cleanly.
  moka::InputDeck deck;
  try {
    deck = moka::InputDeck::load(runtime.comm(), args[0],
                                 std::vector<std::string>(args.begin() + 1, args.end()));
    deck.validate(train_schema());
  } catch (const std::exception& e) {
    if (runtime.rank() == 0) std::cerr << program << ": error: " << e.what() << std::endl;
    return 2;
  }

  // What is the same on every rank (values, layout, memory) is checked
  // before anything is allocated, and reported once.
  try {
    moka::agree_on_failure(runtime.comm(), [&] {
      moka::check_training_deck(deck, runtime.size(), runtime.local_size());
    });
  } catch (const moka::CollectiveError& e) {
    if (runtime.rank() == 0) std::cerr << program << ": error: " << e.what() << std::endl;
    return 2;
  }

  try {
    moka::ScopedRegion region("moka-train");
    const moka::RunConfig run = moka::RunConfig::from_deck(deck);
    moka::log::set_level(run.log_level);
    moka::log::info(deck.resolved_table());
    runtime.print_configuration(std::cout);
    const moka::TrainResult r = moka::train_regime_model(runtime.comm(), deck, std::cout);
    if (!r.interrupted) moka::log::info("run '", run.name, "' done");
  } catch (const moka::CollectiveError& e) {
    // Every rank knows (a checkpoint that cannot be read or written, a deck
    // that does not fit it): said once, every rank leaves.
    if (runtime.rank() == 0) std::cerr << program << ": error: " << e.what() << std::endl;
    return 2;
  } catch (const std::exception& e) {
    moka::Runtime::abort(program, e);
  }
  moka::TimerTable::instance().report(runtime.comm(), std::cout);
  return 0;
}
