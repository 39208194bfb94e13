// Embedding MoKA, the complete example of README.md: one MoE layer inside a
// host code's training loop, its experts spread over the ranks (EP = 2 on
// 2 ranks), settings from an input deck, forward, backward, gradients
// summed by tag, an optimizer step. Built against the installed package
// (find_package(Moka)); prints "consumer: ok" when the loss falls.
#include <moka/Moka.hpp>

#include <iostream>
#include <memory>

int main(int argc, char* argv[]) {
  moka::Runtime runtime(argc, argv);  // MPI and Kokkos, unless the host code started them
  int status = 1;
  {
    // 1. Settings: a deck (InputDeck::load(comm, path, overrides) reads a file
    //    on rank 0 and broadcasts it), validated against the keys used.
    moka::InputDeck deck = moka::InputDeck::parse_string(
        "moe.d_model = 16\nmoe.d_ff = 32\nmoe.num_experts = 4\nmoe.top_k = 2\ngate.type = softmax\n"
        "parallel.expert_parallel = " + std::to_string(runtime.size() % 2 == 0 ? 2 : 1) + "\n"
        "train.lr = 1e-2\ntrain.steps = 30\n",
        "consumer.deck");
    moka::DeckSchema schema = moka::MoEConfig::schema();
    schema.merge(moka::ParallelConfig::schema());
    schema.merge(moka::OptimizerConfig::schema());
    deck.validate(schema);
    const moka::MoEConfig cfg      = moka::MoEConfig::from_deck(deck);
    const moka::ParallelConfig pc  = moka::ParallelConfig::from_deck(deck);
    const moka::OptimizerConfig oc = moka::OptimizerConfig::from_deck(deck);

    // 2. The layer over the ranks' process groups (collective), its
    //    parameters, the optimizer and the gradient synchronisation.
    using Layer = moka::MoELayer<float>;
    const bool device_data = !Kokkos::SpaceAccessibility<Kokkos::HostSpace, moka::memory_space>::accessible;
    auto groups = std::make_shared<moka::ProcessGroups>(runtime.comm(), pc, cfg.num_experts, cfg.d_ff, device_data);
    Layer layer(cfg, groups);
    layer.init_parameters(42);
    const auto params = layer.parameters("moe.");
    moka::Optimizer<float> opt(oc);
    for (const auto& p : params) opt.add(p.param, p.grad);
    moka::GradSync<float> sync(groups, params, pc.bucket_mb);

    // 3. The host code's tokens (here: fit y = x / 2), T per rank.
    const int T = 64, d = cfg.d_model;
    Layer::matrix x("x", T, d), y("y", T, d), dy("dy", T, d), dx("dx", T, d);
    Layer::execution_space space;
    const float r = static_cast<float>(runtime.rank());
    Kokkos::parallel_for(
        "consumer_x", Kokkos::MDRangePolicy<Layer::execution_space, Kokkos::Rank<2>>(space, {0, 0}, {T, d}),
        KOKKOS_LAMBDA(int t, int c) { x(t, c) = 0.01f * float((t * 7 + c * 3 + int(r) * 5) % 17) - 0.08f; });

    // 4. Training steps: forward, loss gradient (scaled by the whole batch:
    //    the ranks' gradients sum to its gradient), backward, sync, step.
    double first = 0, last = 0;
    for (long step = 0; step < oc.total_steps; ++step) {
      layer.zero_grad(space);
      layer.forward(space, x, y);
      double loss = 0;
      const float scale = 2.0f / float(T * runtime.size() * d);
      Kokkos::parallel_reduce(
          "consumer_loss", Kokkos::MDRangePolicy<Layer::execution_space, Kokkos::Rank<2>>(space, {0, 0}, {T, d}),
          KOKKOS_LAMBDA(int t, int c, double& l) {
            const float e = y(t, c) - 0.5f * x(t, c);
            dy(t, c)      = scale * e;
            l += double(e) * e;
          },
          loss);
      layer.backward(space, dy, dx);
      sync.sync(space);
      opt.step(space, sync.global_norm(space));
      groups->world().allreduce_host(&loss, 1);
      (step == 0 ? first : last) = loss;
    }
    space.fence();
    if (last < 0.5 * first) status = 0;
    if (runtime.rank() == 0)
      std::cout << "consumer: " << (status == 0 ? "ok" : "FAILED") << " (MoKA " << moka::version() << ", "
                << groups->describe() << ", loss " << first << " -> " << last << ")\n";
  }
  return status;
}
