// Embedding MoKA: start the runtime, read a deck from a string, validate it
// against the run schema, use a View. Prints "consumer: ok" on success.
#include <moka/core/Core.hpp>
#include <moka/deck/InputDeck.hpp>
#include <moka/train/RunConfig.hpp>
#include <moka/core/Runtime.hpp>

#include <iostream>

int main(int argc, char* argv[]) {
  moka::Runtime runtime(argc, argv);
  int status = 1;
  {
    moka::InputDeck deck = moka::InputDeck::parse_string("run.seed = 42\n", "consumer");
    deck.validate(moka::RunConfig::schema());
    const moka::RunConfig run = moka::RunConfig::from_deck(deck);
    moka::Matrix<float> x("x", 4, 3);
    Kokkos::deep_copy(x, 2.0f);
    float sum = 0;
    Kokkos::parallel_reduce(
        "consumer_sum", Kokkos::RangePolicy<moka::execution_space>(0, 4),
        KOKKOS_LAMBDA(int i, float& s) { s += x(i, 0) + x(i, 1) + x(i, 2); }, sum);
    if (run.seed == 42 && sum == 24.0f) status = 0;
    if (runtime.rank() == 0) std::cout << "consumer: " << (status == 0 ? "ok" : "FAILED") << " (MoKA " << moka::version() << ")\n";
  }
  return status;
}
