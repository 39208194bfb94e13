#include <moka/parallel/ProcessGroups.hpp>

#include <sstream>
#include <vector>

namespace moka {

DeckSchema ParallelConfig::schema() {
  DeckSchema s;
  s.add("parallel.expert_parallel", DeckType::integer).set_default("1").set_min(1)
      .set_doc("EP: ranks that share the experts of an MoE layer (each holds num_experts / EP); tokens are "
               "exchanged among them.");
  s.add("parallel.expert_data_parallel", DeckType::integer).set_default("0").set_min(0)
      .set_doc("EDP: replicas of each EP group, whose expert gradients are summed; 0 means world / (EP x S). "
               "EP x EDP x S must equal the number of ranks.");
  s.add("parallel.expert_slicing", DeckType::integer).set_default("1").set_min(1)
      .set_doc("S: ranks over which each expert's d_ff is split (FastMoE hidden-hidden slicing); d_ff must be "
               "divisible by S.");
  s.add("comm.backend", DeckType::string).set_default("auto").set_choices({"auto", "mpi", "nccl"})
      .set_doc("Library of the token exchange and gradient all-reduce: nccl (device memory, CUDA builds), mpi "
               "(host memory; device data staged through pinned host buffers unless MOKA_MPI_CUDA_AWARE=1), or "
               "auto: nccl on CUDA builds when every rank has its own GPU, mpi otherwise.");
  s.add("comm.bucket_mb", DeckType::real).set_default("32").set_min(0.001)
      .set_doc("Gradients are all-reduced in coalesced buckets of about this many MB per group.");
  s.add("comm.exchange_coalesce_mb", DeckType::real).set_default("-1").set_min(-1)
      .set_doc("Token exchange with L > 1 local experts per rank: when no rank sends more than (L - 1) times this "
               "many MB, the rows go as one message per peer and one device pass puts them in (local expert, "
               "source rank) order; above it, as one message per (peer, local expert) block, straight to their "
               "place. 0: always blocks; -1: 8 with NCCL, 0 with MPI (an MPI message costs little, a copy on the "
               "host much).");
  s.add("comm.exchange_max_message_mb", DeckType::real).set_default("96").set_min(0)
      .set_doc("Token exchange: a message (a block, or a peer's rows when coalesced) of more than this many MB goes "
               "as consecutive pieces of nearly equal size, each at most this (on 4 x H200 with NCCL 2.28, blocks "
               "of about 128 MB ran at 79% of NCCL's all-to-all, in pieces of 96 MB at most at 97%). 0: no limit.");
  s.add("comm.exchange_direct", DeckType::string).set_default("auto").set_choices({"auto", "on", "off"})
      .set_doc("Token exchange between EP ranks whose GPUs reach each other's memory (one node, NVLink or P2P; "
               "NCCL 2.28 or later, comm.backend = nccl; with expert slicing the slice stage still sends messages): "
               "on: one kernel stores every row straight into its place in the receiving GPU's buffer (NCCL "
               "symmetric windows), no messages per block and no reordering pass; off: NCCL send/recv messages; "
               "auto: on where possible. on where it is not possible is an error naming why.");
  s.add("comm.schedule_degree", DeckType::integer).set_default("1").set_min(1)
      .set_doc("Smart scheduling (FasterMoE; docs/distributed.md): the EP token exchange in this many groups of peers "
               "(ring order: the group of distances [g P / G, (g + 1) P / G)), the experts computing the rows of "
               "one group while the next group's move, in forward and backward, and each group's results sent "
               "back as soon as they are computed. 1: off; more than EP counts as EP. Takes the message exchange "
               "(not comm.exchange_direct, no coalescing) and fp32 / fp64 layers without expert slicing; elsewhere "
               "the layer runs unscheduled and says so once.");
  s.add("parallel.ranks_per_node", DeckType::integer).set_default("0").set_min(0)
      .set_doc("Ranks per node for the topology-aware gate (gate.max_offnode_share): world ranks r and q share a "
               "node when r / N = q / N. 0: the ranks that share memory (MPI_COMM_TYPE_SHARED). A smaller N fakes "
               "several nodes on one machine (tests).");
  return s;
}

ParallelConfig ParallelConfig::from_deck(const InputDeck& deck) {
  ParallelConfig c;
  c.expert_parallel      = static_cast<int>(deck.get<long>("parallel.expert_parallel"));
  c.expert_data_parallel = static_cast<int>(deck.get<long>("parallel.expert_data_parallel"));
  c.expert_slicing       = static_cast<int>(deck.get<long>("parallel.expert_slicing"));
  c.backend              = deck.get<std::string>("comm.backend");
  c.bucket_mb            = deck.get<double>("comm.bucket_mb");
  c.exchange_coalesce_mb = deck.get<double>("comm.exchange_coalesce_mb");
  c.exchange_max_message_mb = deck.get<double>("comm.exchange_max_message_mb");
  c.exchange_direct      = deck.get<std::string>("comm.exchange_direct");
  c.ranks_per_node       = static_cast<int>(deck.get<long>("parallel.ranks_per_node"));
  c.schedule_degree      = static_cast<int>(deck.get<long>("comm.schedule_degree"));
  return c;
}

void ParallelConfig::validate(int world, int num_experts, int d_ff) const {
  const int ep = expert_parallel, s = expert_slicing;
  MOKA_REQUIRE(ep >= 1 && s >= 1 && expert_data_parallel >= 0, "parallel.*: sizes must be positive (EP = ", ep,
               ", S = ", s, ", EDP = ", expert_data_parallel, ")");
  MOKA_REQUIRE(world % (ep * s) == 0, "parallel.expert_parallel x parallel.expert_slicing = ", ep, " x ", s, " = ",
               ep * s, " does not divide the ", world, " ranks");
  const int edp = world / (ep * s);
  MOKA_REQUIRE(expert_data_parallel == 0 || expert_data_parallel == edp, "parallel.expert_data_parallel = ",
               expert_data_parallel, " but EP x EDP x S must equal the ", world, " ranks (EDP = ", edp,
               " with EP = ", ep, ", S = ", s, ")");
  MOKA_REQUIRE(num_experts % ep == 0, "moe.num_experts = ", num_experts,
               " is not divisible by parallel.expert_parallel = ", ep);
  MOKA_REQUIRE(d_ff % s == 0, "moe.d_ff = ", d_ff, " is not divisible by parallel.expert_slicing = ", s);
  (void)comm_backend_from_string(backend);
  MOKA_REQUIRE(exchange_direct == "auto" || exchange_direct == "on" || exchange_direct == "off",
               "comm.exchange_direct = '", exchange_direct, "' (expected auto, on or off)");
  MOKA_REQUIRE(schedule_degree >= 1, "comm.schedule_degree = ", schedule_degree, " must be at least 1");
  MOKA_REQUIRE(schedule_degree == 1 || exchange_direct != "on", "comm.schedule_degree = ", schedule_degree,
               " sends the exchange as messages in peer groups; comm.exchange_direct = on asks for direct puts "
               "(set one of them off)");
}

ProcessGroups::ProcessGroups(MPI_Comm world, const ParallelConfig& config, int num_experts, int d_ff,
                             bool device_data)
    : m_cfg(config) {
  int size = 1, rank = 0;
  MPI_Comm_size(world, &size);
  MPI_Comm_rank(world, &rank);
  m_cfg.validate(size, num_experts, d_ff);
  m_cfg.expert_data_parallel = size / (m_cfg.expert_parallel * m_cfg.expert_slicing);
  const bool usable = nccl_usable(world);
  if (m_cfg.backend == "auto") {
    m_backend = device_data && usable ? CommBackend::nccl : CommBackend::mpi;
  } else {
    m_backend = comm_backend_from_string(m_cfg.backend);
    MOKA_REQUIRE(m_backend != CommBackend::nccl || device_data,
                 "comm.backend = nccl needs the data in device memory (this run keeps it on the host)");
    MOKA_REQUIRE(m_backend != CommBackend::nccl || usable,
                 "comm.backend = nccl needs a build with NCCL and one GPU per rank (ranks of a node share a GPU "
                 "here); use comm.backend = mpi");
  }
  const int S = m_cfg.expert_slicing, EP = m_cfg.expert_parallel;
  const int s = rank % S, ep = (rank / S) % EP, edp = rank / (S * EP);
  m_world = make_communicator(world, m_backend);
  m_ep    = m_world->split(edp * S + s, ep);
  m_slice = m_world->split(edp * EP + ep, s);
  m_edp   = m_world->split(ep * S + s, edp);
  m_moe   = m_world->split(edp, ep * S + s);
  // Nodes: consecutive blocks of ranks_per_node, or the ranks that share
  // memory (named by their lowest world rank).
  if (m_cfg.ranks_per_node > 0) {
    m_node = rank / m_cfg.ranks_per_node;
  } else {
    MPI_Comm shm = MPI_COMM_NULL;
    MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, rank, MPI_INFO_NULL, &shm);
    MPI_Allreduce(&rank, &m_node, 1, MPI_INT, MPI_MIN, shm);
    MPI_Comm_free(&shm);
  }
  std::vector<int> nodes(size);
  MPI_Allgather(&m_node, 1, MPI_INT, nodes.data(), 1, MPI_INT, world);
  m_ep_nodes.resize(EP);
  for (int q = 0; q < EP; ++q) m_ep_nodes[q] = nodes[(edp * EP + q) * S + s];
}

std::string ProcessGroups::describe() const {
  std::ostringstream os;
  os << "EP " << ep_size() << " x EDP " << edp_size() << " x S " << slice_size() << " over " << m_world->size()
     << " rank" << (m_world->size() > 1 ? "s" : "") << ", " << to_string(m_backend);
  return os.str();
}

}  // namespace moka
