#pragma once
/// \file Checkpoint.hpp
/// \brief Saving and restoring a training state: every parameter (fp32
/// masters; fp64 in fp64 runs), the optimizer's moments and step, each MoE
/// layer's random streams, selection bias and placement, the balancer's
/// measurements and load history, and the loop's counters. Expert tensors
/// are stored by logical expert ([E, ...]), never by rank or slot, so a
/// file does not depend on the placement or on how many ranks wrote it, and
/// a run restarts on another rank count or EP / EDP / slicing layout.
/// Layout of the file: docs/checkpoints.md.
///
/// \code
/// moka::RunCounters c{step, epoch, cursor, ...};
/// moka::save_checkpoint(path, /*parallel=*/true, model, opt, &balancer, c, deck_text, world);
/// ...
/// moka::RunCounters c = moka::load_checkpoint(path, model, opt, &balancer, world);
/// \endcode

#include <moka/balance/Balancer.hpp>
#include <moka/checkpoint/CheckpointConfig.hpp>
#include <moka/comm/Communicator.hpp>
#include <moka/core/Collective.hpp>
#include <moka/core/Core.hpp>
#include <moka/core/Profiling.hpp>
#include <moka/io/CheckpointFile.hpp>
#include <moka/model/MoEModel.hpp>
#include <moka/model/Optimizer.hpp>

#include <mpi.h>

#include <chrono>
#include <cstdint>
#include <ctime>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

namespace moka {

/// \brief The loop's state besides the model (what moka-train keeps).
struct RunCounters {
  long step   = 0;  ///< steps done
  long epoch  = 0;  ///< shuffles of the training set done
  long cursor = 0;  ///< position in the current epoch's order
  long migrated = 0;                ///< expert slots migrated so far
  double initial_test_loss = 0;     ///< held-out loss before the first step of the run
  std::vector<std::int64_t> order;  ///< the current epoch's sample order
};

/// \brief What save_checkpoint wrote: bytes of datasets and seconds.
struct CheckpointStats {
  double bytes   = 0;
  double seconds = 0;         ///< the whole write
  double verify_seconds = 0;  ///< of it, closing, reading back against the checksums and renaming
};

namespace impl {

/// One block of a rank's expert tensor in the [E, ...] dataset: the
/// dataset's offset and extents, and where its rows start in the local
/// tensor (local0) with a row stride (ld); a row holds count.back() values.
struct ExpertBlock {
  std::vector<long> offset, count;
  long local0 = 0, ld = 0;
  long rows() const {
    long n = 1;
    for (std::size_t i = 0; i + 1 < count.size(); ++i) n *= count[i];
    return n;
  }
  long cols() const { return count.back(); }
};

/// The global [E, ...] shape of expert tensor \p kind ("w1", "b1", "w2", "b2").
inline std::vector<long> expert_global_shape(const MoEConfig& c, const std::string& kind) {
  const long E = c.num_experts, d = c.d_model, dff = c.d_ff, dfi = c.d_ff_in();
  if (kind == "w1") return {E, d, dfi};
  if (kind == "b1") return {E, dfi};
  if (kind == "w2") return {E, dff, d};
  return {E, d};
}

/// The blocks of local slot \p l (expert \p e) of tensor \p kind on a rank
/// holding d_ff columns [s0, s0 + dffl) (SwiGLU: of both halves).
inline std::vector<ExpertBlock> expert_blocks(const MoEConfig& c, const std::string& kind, int l, int e, long s0,
                                              long dffl) {
  const long d = c.d_model, dff = c.d_ff;
  const int halves = c.activation == Activation::swiglu ? 2 : 1;
  const long dfil  = dffl * halves;
  std::vector<ExpertBlock> out;
  if (kind == "w1" || kind == "b1") {
    for (int h = 0; h < halves; ++h) {
      ExpertBlock b;
      if (kind == "w1") {
        b.offset = {e, 0, h * dff + s0};
        b.count  = {1, d, dffl};
        b.local0 = l * d * dfil + h * dffl;
      } else {
        b.offset = {e, h * dff + s0};
        b.count  = {1, dffl};
        b.local0 = l * dfil + h * dffl;
      }
      b.ld = dfil;
      out.push_back(b);
    }
  } else if (kind == "w2") {
    out.push_back({{e, s0, 0}, {1, dffl, d}, l * dffl * d, d});
  } else {
    out.push_back({{e, 0}, {1, d}, l * d, d});
  }
  return out;
}

/// "block0.w1" -> "w1"; "" for a name that is not an expert tensor.
inline std::string expert_kind(const std::string& name) {
  const std::size_t dot = name.rfind('.');
  const std::string k   = dot == std::string::npos ? name : name.substr(dot + 1);
  return (k == "w1" || k == "b1" || k == "w2" || k == "b2") ? k : "";
}

/// "block0.norm.gamma" -> "block0/norm/gamma".
inline std::string dataset_name(const std::string& param) {
  std::string s = param;
  for (char& c : s)
    if (c == '.') c = '/';
  return s;
}

/// Whether block \p b is one contiguous run of the local tensor.
inline bool contiguous(const ExpertBlock& b) { return b.rows() == 1 || b.ld == b.cols(); }

/// Block \p b of \p local packed row-major into \p out; and its inverse.
template <class T>
void pack_block(const T* local, const ExpertBlock& b, std::vector<T>& out) {
  out.resize(static_cast<std::size_t>(b.rows() * b.cols()));
  for (long r = 0; r < b.rows(); ++r)
    std::copy(local + b.local0 + r * b.ld, local + b.local0 + r * b.ld + b.cols(), out.begin() + r * b.cols());
}
template <class T>
void unpack_block(T* local, const ExpertBlock& b, const std::vector<T>& packed) {
  for (long r = 0; r < b.rows(); ++r)
    std::copy(packed.begin() + r * b.cols(), packed.begin() + (r + 1) * b.cols(), local + b.local0 + r * b.ld);
}

/// The values of \p v on the host: its own memory where the host can read
/// it, else a copy in \p scratch (grown, never shrunk: one allocation for
/// all tensors of a checkpoint).
template <class V>
const typename V::non_const_value_type* host_data(const V& v, std::vector<typename V::non_const_value_type>& scratch) {
  using T = typename V::non_const_value_type;
  if (Kokkos::SpaceAccessibility<Kokkos::HostSpace, typename V::memory_space>::accessible) {
    Kokkos::fence();
    return v.data();
  }
  if (scratch.size() < v.size()) scratch.resize(v.size());
  Kokkos::View<T*, Kokkos::HostSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>> h(scratch.data(), v.size());
  Kokkos::deep_copy(h, Kokkos::View<const T*, typename V::memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>(v.data(), v.size()));
  return scratch.data();
}
/// Where values for \p v are read to on the host (its memory, or
/// \p scratch), and the copy to the device after.
template <class V>
typename V::non_const_value_type* host_target(const V& v, std::vector<typename V::non_const_value_type>& scratch) {
  if (Kokkos::SpaceAccessibility<Kokkos::HostSpace, typename V::memory_space>::accessible) {
    Kokkos::fence();
    return v.data();
  }
  if (scratch.size() < v.size()) scratch.resize(v.size());
  return scratch.data();
}
template <class V>
void finish_target(const V& v, const std::vector<typename V::non_const_value_type>& scratch) {
  using T = typename V::non_const_value_type;
  if (Kokkos::SpaceAccessibility<Kokkos::HostSpace, typename V::memory_space>::accessible) return;
  Kokkos::View<const T*, Kokkos::HostSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>> h(scratch.data(), v.size());
  Kokkos::deep_copy(Kokkos::View<T*, typename V::memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>(v.data(), v.size()), h);
}

template <class V>
std::vector<typename V::non_const_value_type> to_host_vector(const V& v) {
  std::vector<typename V::non_const_value_type> scratch;
  const auto* p = host_data(v, scratch);
  return std::vector<typename V::non_const_value_type>(p, p + v.size());
}
template <class V>
void from_host_vector(const V& v, const std::vector<typename V::non_const_value_type>& src) {
  using T = typename V::non_const_value_type;
  MOKA_REQUIRE(src.size() == v.size(), "moka::checkpoint: ", src.size(), " values for a tensor of ", v.size());
  Kokkos::View<const T*, Kokkos::HostSpace, Kokkos::MemoryTraits<Kokkos::Unmanaged>> h(src.data(), src.size());
  Kokkos::deep_copy(Kokkos::View<T*, typename V::memory_space, Kokkos::MemoryTraits<Kokkos::Unmanaged>>(v.data(), v.size()), h);
}

/// Sends / receives \p bytes bytes in messages of at most 1 GB.
inline void send_bytes(const void* data, std::size_t bytes, int to, MPI_Comm comm) {
  const char* p = static_cast<const char*>(data);
  for (std::size_t at = 0; at < bytes; at += std::size_t(1) << 30)
    MPI_Send(p + at, static_cast<int>(std::min(bytes - at, std::size_t(1) << 30)), MPI_BYTE, to, 77, comm);
}
inline void recv_bytes(void* data, std::size_t bytes, int from, MPI_Comm comm) {
  char* p = static_cast<char*>(data);
  for (std::size_t at = 0; at < bytes; at += std::size_t(1) << 30)
    MPI_Recv(p + at, static_cast<int>(std::min(bytes - at, std::size_t(1) << 30)), MPI_BYTE, from, 77, comm,
             MPI_STATUS_IGNORE);
}

/// One tensor's worth of checkpoint data: the parameter or a moment, with
/// how it maps to its dataset.
template <class S>
struct TensorPlan {
  std::string dataset;
  std::vector<long> shape;             // of the dataset
  bool expert = false;
  std::vector<ExpertBlock> blocks;     // expert: every block held here (all slots)
  std::vector<char> owned;             // expert: whether this rank writes block i
  bool dense_writer = false;           // dense: rank 0 writes it
};

/// The plan of MoE layer tensor \p p (named "<prefix>gate_w", "<prefix>w1",
/// ...) of \p L on this rank, into dataset \p dataset: each expert block is
/// written by the first EDP group's first replica holder (b2 by the first
/// slice rank); the gate's tensors by world rank 0.
template <class S, class M>
TensorPlan<S> layer_plan(MoELayer<S, M>& L, const ParamRef<S, M>& p, const std::string& dataset, int world_rank) {
  TensorPlan<S> t;
  t.dataset = dataset;
  const std::string kind = (p.tag == ParamTag::expert || p.tag == ParamTag::expert_replicated)
                               ? expert_kind(p.name) : std::string();
  if (kind.empty()) {
    t.shape        = p.shape;
    t.dense_writer = world_rank == 0;
    return t;
  }
  t.expert = true;
  const auto* g = L.groups();
  const int ep_rank = g ? g->ep_rank() : 0, edp_rank = g ? g->edp_rank() : 0, slice = g ? g->slice_rank() : 0;
  const long dffl = L.local_d_ff(), s0 = slice * dffl;
  t.shape = expert_global_shape(L.config(), kind);
  for (int l = 0; l < L.local_experts(); ++l) {
    const int e = L.local_expert(l);
    const auto& first = L.placement().slots_of(e).front();
    const bool writer = edp_rank == 0 && first.rank == ep_rank && first.local == l && (kind != "b2" || slice == 0);
    for (const ExpertBlock& blk : expert_blocks(L.config(), kind, l, e, s0, dffl)) {
      t.blocks.push_back(blk);
      t.owned.push_back(writer);
    }
  }
  return t;
}

/// The plans of every parameter of \p model on this rank (datasets named
/// as the parameters, '.' -> '/').
template <class S, class M>
std::vector<TensorPlan<S>> tensor_plans(MoEModel<S, M>& model, int world_rank) {
  std::vector<TensorPlan<S>> out;
  for (const auto& p : model.parameters()) {
    if (p.name.rfind("block", 0) == 0) {
      const int b = std::stoi(p.name.substr(5, p.name.find('.') - 5));  // "block<b>.w1"
      out.push_back(layer_plan(model.moe(b), p, dataset_name(p.name), world_rank));
    } else {
      TensorPlan<S> t;
      t.dataset      = dataset_name(p.name);
      t.shape        = p.shape;
      t.dense_writer = world_rank == 0;
      out.push_back(t);
    }
  }
  return out;
}

/// Checks that \p model's layers are laid out over the ranks of \p world.
template <class S, class M>
void check_world(MoEModel<S, M>& model, Communicator& world, const char* op) {
  if (model.config().blocks == 0) return;
  const auto* g = model.moe(0).groups();
  const int n   = g ? g->world().size() : 1;
  agree_on_failure(world.mpi_comm(), [&] {
    MOKA_REQUIRE(n == world.size(), "moka::", op, ": the model's layers are laid out over ", n, " rank",
                 n > 1 ? "s" : "", ", the communicator has ", world.size());
  });
}

/// Runs \p f unless \p failure holds an error already; an error it throws
/// is kept there. Rank 0 of a gathered write goes on receiving after a
/// failure, so that no sender waits for ever.
template <class F>
void guarded(std::string& failure, F&& f) {
  if (!failure.empty()) return;
  try {
    f();
  } catch (const Error& e) {
    failure = e.what();
  }
}

/// Writes one tensor (\p local: this rank's values on the host) into
/// dataset \p name: parallel, each rank its blocks; gathered, rank 0 writes
/// its own, then every other rank's in turn (received through \p pack).
template <class S>
void write_tensor(CheckpointWriter* w, bool parallel, MPI_Comm comm, int rank, int size, const std::string& name,
                  const TensorPlan<S>& t, const S* local, std::vector<S>& pack, std::string& failure) {
  const std::size_t R = t.shape.size();
  // The blocks this rank writes: contiguous ones from \p local as they are,
  // the others packed (room reserved first, so the pointers stay valid).
  std::vector<CheckpointBlock<S>> mine;
  std::vector<std::vector<S>> packed;
  if (!t.expert) {
    if (t.dense_writer) mine.push_back({std::vector<long>(R, 0), t.shape, local});
  } else {
    packed.reserve(t.blocks.size());
    for (std::size_t i = 0; i < t.blocks.size(); ++i) {
      if (!t.owned[i]) continue;
      const ExpertBlock& b = t.blocks[i];
      if (contiguous(b)) {
        mine.push_back({b.offset, b.count, local + b.local0});
      } else {
        packed.emplace_back();
        pack_block(local, b, packed.back());
        mine.push_back({b.offset, b.count, packed.back().data()});
      }
    }
  }
  if (parallel) {
    // Every rank's blocks in one collective call (MPI-IO collective transfer).
    guarded(failure, [&] { w->create<S>(name, t.shape); });
    w->write_blocks<S>(name, mine);  // collective: every rank, also after a failure (kept for commit)
    return;
  }
  if (rank == 0) {
    guarded(failure, [&] { w->create<S>(name, t.shape); });
    guarded(failure, [&] { w->write_blocks<S>(name, mine); });
  }
  if (size == 1 || !t.expert) return;
  if (rank == 0) {
    for (int r = 1; r < size; ++r) {
      long sizes[2];
      MPI_Recv(sizes, 2, MPI_LONG, r, 76, comm, MPI_STATUS_IGNORE);
      std::vector<long> m(static_cast<std::size_t>(sizes[0]));
      recv_bytes(m.data(), m.size() * sizeof(long), r, comm);
      pack.resize(static_cast<std::size_t>(sizes[1]));
      recv_bytes(pack.data(), pack.size() * sizeof(S), r, comm);
      std::size_t at = 0;
      for (std::size_t i = 0; i + 2 * R <= m.size(); i += 2 * R) {
        const std::vector<long> off(m.begin() + i, m.begin() + i + R), cnt(m.begin() + i + R, m.begin() + i + 2 * R);
        long n = 1;
        for (long c : cnt) n *= c;
        guarded(failure, [&] { w->write_block<S>(name, off, cnt, pack.data() + at); });
        at += static_cast<std::size_t>(n);
      }
    }
  } else {
    // Gathered: this rank's blocks to rank 0, offsets and counts, then values.
    std::vector<long> meta;
    std::vector<S> vals;
    for (const auto& b : mine) {
      meta.insert(meta.end(), b.offset.begin(), b.offset.end());
      meta.insert(meta.end(), b.count.begin(), b.count.end());
      long n = 1;
      for (long c : b.count) n *= c;
      vals.insert(vals.end(), b.data, b.data + n);
    }
    long sizes[2] = {long(meta.size()), long(vals.size())};
    MPI_Send(sizes, 2, MPI_LONG, 0, 76, comm);
    send_bytes(meta.data(), meta.size() * sizeof(long), 0, comm);
    send_bytes(vals.data(), vals.size() * sizeof(S), 0, comm);
  }
}

/// Reads this rank's values of one tensor from dataset \p name (every
/// block held here, replicas included) into \p v (through \p scratch on a
/// device).
template <class S, class V>
void read_tensor(const CheckpointReader& r, const std::string& name, const TensorPlan<S>& t, const V& v,
                 std::vector<S>& scratch, std::vector<S>& pack) {
  const std::vector<long> have = r.shape(name);
  if (have != t.shape) {
    std::string a, b;
    for (std::size_t i = 0; i < have.size(); ++i) a += (i ? " x " : "") + std::to_string(have[i]);
    for (std::size_t i = 0; i < t.shape.size(); ++i) b += (i ? " x " : "") + std::to_string(t.shape[i]);
    throw Error("checkpoint '" + r.path() + "': dataset '" + name + "' is " + a + ", the model's is " + b +
                " (a checkpoint of another model shape or expert count)");
  }
  S* dst = host_target(v, scratch);
  if (!t.expert) {
    long n = 1;
    for (long x : t.shape) n *= x;
    MOKA_REQUIRE(n == long(v.size()), "checkpoint '", r.path(), "': dataset '", name, "' has ", n,
                 " values for a tensor of ", v.size());
    r.read_block_into<S>(name, std::vector<long>(t.shape.size(), 0), t.shape, dst);
  } else {
    for (const ExpertBlock& b : t.blocks) {
      if (contiguous(b)) {
        r.read_block_into<S>(name, b.offset, b.count, dst + b.local0);
      } else {
        pack.resize(static_cast<std::size_t>(b.rows() * b.cols()));
        r.read_block_into<S>(name, b.offset, b.count, pack.data());
        unpack_block(dst, b, pack);
      }
    }
  }
  finish_target(v, scratch);
}

}  // namespace impl

/// \brief Writes the training state to \p path (through `<path>.tmp`,
/// verified, renamed). \p parallel: every rank writes its blocks through
/// MPI-IO (needs CheckpointWriter::parallel_available()); otherwise rank 0
/// gathers and writes. \p deck_text: the resolved deck, stored as the
/// `deck` attribute. Collective over \p world; throws moka::Error on every
/// rank when any fails (an earlier file at \p path is left as it was).
/// \p before_commit, when given, runs on every rank once everything is
/// written and before the commit (the fault tests kill a run there).
template <class S, class M>
CheckpointStats save_checkpoint(const std::string& path, bool parallel, MoEModel<S, M>& model,
                                Optimizer<S, M>& opt, const Balancer<S, M>* balancer, const RunCounters& counters,
                                const std::string& deck_text, Communicator& world,
                                const std::function<void()>& before_commit = {}) {
  ScopedRegion region("moka::save_checkpoint");
  const auto t0     = std::chrono::steady_clock::now();
  const MPI_Comm comm = world.mpi_comm();
  const int rank = world.rank(), size = world.size();
  parallel = parallel && size > 1;
  impl::check_world(model, world, "save_checkpoint");
  Kokkos::fence();
  const auto plans  = impl::tensor_plans(model, rank);
  const auto params = model.parameters();
  CheckpointStats stats;
  std::unique_ptr<CheckpointWriter> w;
  agree_on_failure(comm, [&] {
    if (parallel) w = std::make_unique<CheckpointWriter>(path, comm);
    else if (rank == 0) w = std::make_unique<CheckpointWriter>(path);
  });
  // Every writer call is guarded: the first failure is kept and the rest of
  // the writes skipped, while every rank still takes part in each transfer
  // and collective call; the failure is agreed on at the end.
  std::string failure;
  const bool writes = parallel || rank == 0;
  std::vector<S> scratch, pack;  // grown once for the largest tensor
  auto tensor = [&](const std::string& name, const impl::TensorPlan<S>& t, const auto& view) {
    impl::write_tensor<S>(w.get(), parallel, comm, rank, size, name, t, impl::host_data(view, scratch), pack, failure);
    long n = 1;
    for (long s : t.shape) n *= s;
    stats.bytes += double(n) * sizeof(S);
  };
  auto ints = [&](const std::string& name, const std::vector<std::int64_t>& v, std::vector<long> shape = {}) {
    if (shape.empty()) shape = {long(v.size())};
    if (writes) impl::guarded(failure, [&] { w->write<std::int64_t>(name, v, shape); });
  };
  auto reals = [&](const std::string& name, const std::vector<double>& v) {
    if (writes) impl::guarded(failure, [&] { w->write<double>(name, v, {long(v.size())}); });
  };
  auto attribute = [&](const std::string& name, const std::string& v) {
    if (writes) impl::guarded(failure, [&] { w->attribute(name, v); });
  };
  for (std::size_t i = 0; i < params.size(); ++i)
    tensor("model/" + plans[i].dataset, plans[i], params[i].param);
  for (std::size_t i = 0; i < params.size(); ++i) {
    const long k = opt.find(params[i].param.data());
    MOKA_REQUIRE(k >= 0, "moka::save_checkpoint: parameter '", params[i].name, "' is not in the optimizer");
    tensor("optimizer/m/" + plans[i].dataset, plans[i], opt.first_moment(std::size_t(k)));
    if (opt.second_moment(std::size_t(k)).extent(0) > 0)
      tensor("optimizer/v/" + plans[i].dataset, plans[i], opt.second_moment(std::size_t(k)));
  }
  ints("optimizer/steps", {opt.steps_taken()});
  for (int b = 0; b < model.config().blocks; ++b) {
    auto& L = model.moe(b);
    const std::string p = "model/block" + std::to_string(b) + "/";
    std::vector<std::int64_t> st;
    for (std::uint64_t v : L.stream_state()) st.push_back(static_cast<std::int64_t>(v));
    ints(p + "streams", st);
    const auto bias = impl::to_host_vector(L.selection_bias());
    if (writes) impl::guarded(failure, [&] { w->write<S>(p + "selection_bias", bias, {long(bias.size())}); });
    const Placement& pl = L.placement();
    ints("balance/block" + std::to_string(b) + "/placement",
         std::vector<std::int64_t>(pl.slot_experts().begin(), pl.slot_experts().end()),
         {long(pl.ep_size()), long(pl.slots_per_rank())});
  }
  if (balancer) reals("balance/state", balancer->state());
  ints("run/step", {counters.step});
  ints("run/epoch", {counters.epoch});
  ints("run/cursor", {counters.cursor});
  ints("run/migrated", {counters.migrated});
  reals("run/initial_test_loss", {counters.initial_test_loss});
  ints("run/order", counters.order.empty() ? std::vector<std::int64_t>{-1} : counters.order);
  const auto* g = model.config().blocks > 0 ? model.moe(0).groups() : nullptr;
  std::string layout = std::to_string(size) + " rank" + (size > 1 ? "s" : "");
  if (g) layout += " (EP " + std::to_string(g->ep_size()) + " x EDP " + std::to_string(g->edp_size()) +
                   " x slicing " + std::to_string(g->slice_size()) + ")";
  const std::time_t now = std::time(nullptr);
  char stamp[64];
  std::strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  attribute("format", "MoKA checkpoint");
  attribute("format_version", "1");
  attribute("moka_version", version());
  attribute("build", build_description());
  attribute("written_by", layout + (parallel ? ", MPI-IO" : ", gathered to rank 0"));
  attribute("precision", std::is_same<S, double>::value ? "fp64" : "fp32");
  attribute("optimizer", opt.config().type == OptimizerType::sgd    ? "sgd"
                         : opt.config().type == OptimizerType::adam ? "adam" : "adamw");
  attribute("created", stamp);
  attribute("deck", deck_text);
  if (before_commit) before_commit();
  const auto t1 = std::chrono::steady_clock::now();
  if (parallel) {
    // commit() agrees on block-write failures; a failure of the collective
    // calls is the same on every rank.
    agree_on_failure(comm, [&] {
      if (!failure.empty()) throw Error(failure);
      w->commit();
    });
  } else {
    agree_on_failure(comm, [&] {
      if (!failure.empty()) throw Error(failure);
      if (rank == 0) w->commit();
    });
  }
  const auto t2        = std::chrono::steady_clock::now();
  stats.seconds        = std::chrono::duration<double>(t2 - t0).count();
  stats.verify_seconds = std::chrono::duration<double>(t2 - t1).count();
  return stats;
}

/// \brief Restores the training state of \p path into \p model, \p opt and
/// \p balancer (nullptr: skipped) and returns the loop counters. The file is
/// verified first (each rank a share of every dataset); every rank reads
/// the blocks of the experts its slots hold, so the writer's rank count and
/// layout do not matter. The placement is restored where the file's has
/// this run's EP size and slots per rank (otherwise the model's stays and
/// \p placement_kept says so). Collective over \p world; moka::Error on
/// every rank naming the file and what is wrong.
template <class S, class M>
RunCounters load_checkpoint(const std::string& path, MoEModel<S, M>& model, Optimizer<S, M>& opt,
                            Balancer<S, M>* balancer, Communicator& world, bool* placement_kept = nullptr) {
  ScopedRegion region("moka::load_checkpoint");
  const MPI_Comm comm = world.mpi_comm();
  impl::check_world(model, world, "load_checkpoint");
  verify_checkpoint(path, comm);
  RunCounters c;
  bool kept = false;
  agree_on_failure(comm, [&] {
    CheckpointReader r(path);
    MOKA_REQUIRE(r.has_attribute("format") && r.attribute("format") == "MoKA checkpoint", "checkpoint '", path,
                 "': not a MoKA checkpoint (no format attribute)");
    MOKA_REQUIRE(r.attribute("format_version") == "1", "checkpoint '", path, "': format version ",
                 r.attribute("format_version"), " (this MoKA reads version 1)");
    auto one = [&](const std::string& n) { return r.read<std::int64_t>(n).at(0); };
    // The placement first: the expert blocks are read for the slots as they will be.
    for (int b = 0; b < model.config().blocks; ++b) {
      auto& L = model.moe(b);
      const std::string n = "balance/block" + std::to_string(b) + "/placement";
      const auto s        = r.shape(n);
      MOKA_REQUIRE(s.size() == 2, "checkpoint '", path, "': dataset '", n, "' is not [ranks, slots]");
      if (s[0] == L.placement().ep_size() && s[1] == L.placement().slots_per_rank()) {
        const auto v = r.read<std::int64_t>(n);
        const Placement p = Placement::from_slots(L.config().num_experts, int(s[0]), std::vector<int>(v.begin(), v.end()));
        if (p != L.placement()) L.set_placement(p);
        kept = true;
      }
    }
    const auto plans  = impl::tensor_plans(model, world.rank());
    const auto params = model.parameters();
    std::vector<S> scratch, pack;
    for (std::size_t i = 0; i < params.size(); ++i) {
      impl::read_tensor<S>(r, "model/" + plans[i].dataset, plans[i], params[i].param, scratch, pack);
      const long k = opt.find(params[i].param.data());
      MOKA_REQUIRE(k >= 0, "moka::load_checkpoint: parameter '", params[i].name, "' is not in the optimizer");
      impl::read_tensor<S>(r, "optimizer/m/" + plans[i].dataset, plans[i], opt.first_moment(std::size_t(k)), scratch,
                           pack);
      const auto v = opt.second_moment(std::size_t(k));
      if (v.extent(0) > 0) {
        MOKA_REQUIRE(r.has("optimizer/v/" + plans[i].dataset), "checkpoint '", path, "': no second moments ('optimizer/v/",
                     plans[i].dataset, "'): it was written with train.optimizer = ",
                     r.has_attribute("optimizer") ? r.attribute("optimizer") : "?");
        impl::read_tensor<S>(r, "optimizer/v/" + plans[i].dataset, plans[i], v, scratch, pack);
      }
    }
    opt.set_steps_taken(one("optimizer/steps"));
    for (int b = 0; b < model.config().blocks; ++b) {
      auto& L = model.moe(b);
      const std::string p = "model/block" + std::to_string(b) + "/";
      std::vector<std::uint64_t> st;
      for (std::int64_t v : r.read<std::int64_t>(p + "streams")) st.push_back(static_cast<std::uint64_t>(v));
      L.set_stream_state(st);
      const long E = L.config().num_experts;
      impl::from_host_vector(L.selection_bias(), r.read_block<S>(p + "selection_bias", {0}, {E}));
      typename MoEModel<S, M>::execution_space space;
      L.refresh_bf16_weights(space);
      space.fence();
    }
    if (balancer && r.has("balance/state")) balancer->set_state(r.read<double>("balance/state"));
    c.step     = one("run/step");
    c.epoch    = one("run/epoch");
    c.cursor   = one("run/cursor");
    c.migrated = one("run/migrated");
    c.initial_test_loss = r.read<double>("run/initial_test_loss").at(0);
    c.order    = r.read<std::int64_t>("run/order");
    if (c.order.size() == 1 && c.order[0] == -1) c.order.clear();
  });
  Kokkos::fence();
  if (placement_kept) *placement_kept = kept;
  return c;
}

/// \brief Sets the parameters of MoE layer \p L from datasets \p prefix +
/// "gate_w", "noise_w", "w1", "b1", "w2", "b2" of \p r (a checkpoint's
/// "model/block<b>/", or a file another framework wrote in this layout:
/// scripts/torch-moka.py), each rank the blocks of its slots; float data
/// is converted to the layer's type. The bf16 copies follow. moka::Error
/// names a missing dataset or one of another shape.
template <class S, class M>
void read_layer_parameters(const CheckpointReader& r, const std::string& prefix, MoELayer<S, M>& L,
                           const typename M::execution_space& space) {
  const int world_rank = L.groups() ? L.groups()->world().rank() : 0;
  std::vector<S> scratch, pack;
  for (const auto& p : L.parameters()) {
    const std::string name = prefix + p.name;
    const impl::TensorPlan<S> t = impl::layer_plan(L, p, name, world_rank);
    impl::read_tensor<S>(r, name, t, p.param, scratch, pack);
  }
  L.refresh_bf16_weights(space);
  space.fence();
}

}  // namespace moka
