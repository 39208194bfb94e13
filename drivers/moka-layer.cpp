// moka-layer: one MoE layer of a checkpoint on a batch, forward and
// backward, for checks against other frameworks (scripts/torch-moka.py).
//
//   moka-layer <weights.h5> <batch.h5> <out.h5> [block] [fp32|fp64|bf16]
//
// weights.h5: a MoKA checkpoint (or a file in its layout): the `deck`
// attribute gives the layer's keys (moe.*, gate.*, expert.*), the datasets
// model/block<b>/gate_w, w1, (b1, w2, b2) its weights by logical expert.
// batch.h5: datasets x [T, d] and dy [T, d]. out.h5 gets y, dx and the
// gradients grad/gate_w, grad/w1, ... (float64, with checksums). One rank.
#include <moka/checkpoint/Checkpoint.hpp>
#include <moka/core/Runtime.hpp>
#include <moka/train/Trainer.hpp>

#include <iostream>
#include <string>
#include <vector>

namespace {

template <class S>
int run(const std::string& weights, const std::string& batch, const std::string& out, int block, bool bf16) {
  using M      = moka::memory_space;
  using matrix = Kokkos::View<S**, Kokkos::LayoutRight, M>;
  moka::CheckpointReader w(weights);
  auto deck = moka::InputDeck::parse_string(w.attribute("deck"), weights + " (deck attribute)");
  deck.validate(moka::train_schema());
  moka::MoEConfig cfg = moka::ModelConfig::from_deck(deck).moe;
  cfg.bf16_compute    = bf16;
  if (cfg.gate == moka::GateType::trace) cfg.trace_layer += block;
  moka::MoELayer<S, M> layer(cfg);
  typename M::execution_space space;
  moka::read_layer_parameters(w, "model/block" + std::to_string(block) + "/", layer, space);
  moka::CheckpointReader b(batch);
  const auto xs = b.shape("x");
  MOKA_REQUIRE(xs.size() == 2 && xs[1] == cfg.d_model && b.shape("dy") == xs, "batch '", batch,
               "': x and dy must both be [T, ", cfg.d_model, "]");
  const long T = xs[0], d = cfg.d_model;
  matrix x("x", T, d), y("y", T, d), dy("dy", T, d), dx("dx", T, d);
  auto load = [&](const std::string& n, const matrix& v) {
    const auto h = b.read_block<double>(n, {0, 0}, {T, d});
    auto m       = Kokkos::create_mirror_view(v);
    for (long i = 0; i < T; ++i)
      for (long j = 0; j < d; ++j) m(i, j) = S(h[i * d + j]);
    Kokkos::deep_copy(v, m);
  };
  load("x", x);
  load("dy", dy);
  layer.zero_grad(space);
  layer.forward(space, x, y);
  layer.backward(space, dy, dx);
  space.fence();
  moka::CheckpointWriter o(out);
  auto save = [&](const std::string& n, const auto& v, std::vector<long> shape) {
    const auto h = moka::impl::to_host_vector(v);
    o.write<double>(n, std::vector<double>(h.begin(), h.end()), shape);
  };
  using flat = Kokkos::View<S*, M, Kokkos::MemoryTraits<Kokkos::Unmanaged>>;
  save("y", flat(y.data(), y.size()), {T, d});
  save("dx", flat(dx.data(), dx.size()), {T, d});
  for (const auto& p : layer.parameters()) save("grad/" + p.name, p.grad, p.shape);
  o.attribute("deck", w.attribute("deck"));
  o.commit();
  std::cout << "moka-layer: " << T << " tokens, E=" << cfg.num_experts << ", k=" << cfg.top_k << ", d=" << d
            << ", d_ff=" << cfg.d_ff << (bf16 ? ", bf16 expert GEMMs" : "") << "; wrote " << out << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char* argv[]) {
  moka::Runtime runtime(argc, argv);
  const std::vector<std::string> a(argv + 1, argv + argc);
  if (a.size() < 3 || a.size() > 5 || runtime.size() != 1) {
    if (runtime.rank() == 0)
      std::cerr << "usage: moka-layer <weights.h5> <batch.h5> <out.h5> [block] [fp32|fp64|bf16]   (one rank)\n";
    return 2;
  }
  try {
    const int block             = a.size() > 3 ? std::stoi(a[3]) : 0;
    const std::string precision = a.size() > 4 ? a[4] : "fp32";
    if (precision == "fp64") return run<double>(a[0], a[1], a[2], block, false);
    MOKA_REQUIRE(precision == "fp32" || precision == "bf16", "precision '", precision, "' (fp32, fp64 or bf16)");
#ifndef KOKKOS_ENABLE_CUDA
    MOKA_REQUIRE(precision != "bf16", "bf16 needs a CUDA build");
#endif
    return run<float>(a[0], a[1], a[2], block, precision == "bf16");
  } catch (const std::exception& e) {
    std::cerr << "moka-layer: error: " << e.what() << std::endl;
    return 2;
  }
}
