#pragma once
/// \file ProcessGroups.hpp
/// \brief The process groups of distributed MoE training (SmartMoE /
/// FastMoE terms) and the `parallel.*` / `comm.*` deck keys.
///
/// The world's ranks are laid out as EDP x EP x S (S fastest):
///   rank = (edp * EP + ep) * S + s
/// - every rank holds its own tokens (data parallel over the world);
/// - an **EP group** (same edp and s) shares the experts: each of its EP
///   ranks holds E / EP of them, and tokens move inside it (all-to-all);
/// - a **slice group** (same edp and ep) splits every expert's d_ff over S
///   ranks (FastMoE's hidden-hidden slicing): rows are gathered over it and
///   the partial outputs summed back;
/// - an **EDP group** (same ep and s) holds replicas of the same expert
///   slices; their gradients are summed over it;
/// - the gate and every non-expert parameter are data-parallel over the
///   whole world (the **dense group**); the gate's group (its gradients and
///   its whole-batch statistics) is the world too, named apart so that a
///   layout with a separate gate group changes one place;
/// - the **MoE group** (same edp: EP x S ranks) holds one copy of every
///   expert; clipping sums expert norms over it, so each expert counts once.

#include <moka/comm/Communicator.hpp>
#include <moka/deck/DeckSchema.hpp>
#include <moka/deck/InputDeck.hpp>

#include <memory>
#include <string>
#include <vector>

namespace moka {

/// \brief Layout and communication settings.
struct ParallelConfig {
  int expert_parallel      = 1;       ///< parallel.expert_parallel: EP
  int expert_data_parallel = 0;       ///< parallel.expert_data_parallel: EDP (0: world / (EP S))
  int expert_slicing       = 1;       ///< parallel.expert_slicing: S
  std::string backend      = "auto";  ///< comm.backend: auto, mpi or nccl
  double bucket_mb         = 32;      ///< comm.bucket_mb: gradient all-reduce bucket size
  /// comm.exchange_coalesce_mb: one message per peer up to (L - 1) x this;
  /// negative: 8 with NCCL, 0 (always blocks) with MPI.
  double exchange_coalesce_mb = -1;
  /// comm.exchange_max_message_mb: larger exchange messages go in nearly
  /// equal pieces of at most this; 0: no limit.
  double exchange_max_message_mb = 96;
  /// comm.exchange_direct: auto, on or off: the EP token exchange stores rows
  /// straight into the peers' receive buffers (NCCL symmetric windows)
  /// where the ranks' GPUs reach each other's memory.
  std::string exchange_direct = "auto";
  /// comm.schedule_degree: smart scheduling (FasterMoE): the EP exchange in
  /// this many peer groups, each group's rows computed while the next moves
  /// (1: one exchange, then the experts).
  int schedule_degree = 1;
  /// parallel.ranks_per_node: consecutive world ranks per node for the
  /// topology-aware gate (0: the ranks that share memory, as MPI finds them).
  int ranks_per_node = 0;

  /// \brief Throws moka::Error naming the first inconsistency with a world of
  /// \p world ranks and experts of the given shape.
  void validate(int world, int num_experts, int d_ff) const;
  static DeckSchema schema();
  static ParallelConfig from_deck(const InputDeck& deck);
};

/// \brief The communicators of one layout. Collective to construct.
class ProcessGroups {
 public:
  /// \brief Splits \p world by \p config (validated first). \p device_data:
  /// whether the tensors the groups move live in device memory (NCCL needs
  /// it; `auto` picks MPI otherwise).
  ProcessGroups(MPI_Comm world, const ParallelConfig& config, int num_experts, int d_ff, bool device_data);

  Communicator& world() const { return *m_world; }
  Communicator& ep() const { return *m_ep; }
  Communicator& slice() const { return *m_slice; }
  Communicator& edp() const { return *m_edp; }
  Communicator& moe() const { return *m_moe; }
  /// \brief The gate group: the ranks whose tokens form one batch for the
  /// gate's statistics and whose gate gradients are summed (the world).
  Communicator& gate() const { return *m_world; }
  int ep_size() const { return m_cfg.expert_parallel; }
  int slice_size() const { return m_cfg.expert_slicing; }
  int edp_size() const { return m_cfg.expert_data_parallel; }
  int ep_rank() const { return m_ep->rank(); }
  int slice_rank() const { return m_slice->rank(); }
  int edp_rank() const { return m_edp->rank(); }
  CommBackend backend() const { return m_backend; }
  const ParallelConfig& config() const { return m_cfg; }
  /// \brief This rank's node (parallel.ranks_per_node, or the ranks that
  /// share memory), and the node of each rank of its EP group (by EP rank).
  int node() const { return m_node; }
  const std::vector<int>& ep_nodes() const { return m_ep_nodes; }
  /// \brief "EP 2 x EDP 2 x S 1 over 4 ranks, nccl".
  std::string describe() const;

 private:
  ParallelConfig m_cfg;
  CommBackend m_backend = CommBackend::mpi;
  int m_node = 0;
  std::vector<int> m_ep_nodes;
  std::unique_ptr<Communicator> m_world, m_ep, m_slice, m_edp, m_moe;
};

}  // namespace moka
