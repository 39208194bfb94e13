#pragma once
/// \file MachineProfile.hpp
/// \brief What one machine costs per unit of work, measured by
/// `moka-bench bench.mode = calibrate` and read by the cost model
/// (moka::predict_step) and moka-plan. No machine constant lives in the
/// code: every figure the model multiplies by comes from a profile file.
///
/// File format (text, one `key = value` per line, `#` comments; the
/// format is versioned by `moka_profile`; docs/cost-model.md):
///
///     moka_profile     = 1
///     card             = NVIDIA H200
///     backend          = Cuda
///     precision        = bf16
///     ranks_per_node   = 1
///     concurrent_ranks = 1              # ranks of a node that compute at full speed at once
///     comm             = nccl
///     layer_fixed_s    = 2.1e-04        # per layer forward+backward, no data
///     gate_flop_s      = 1.0e-13        # per token x d_model x experts
///     gate_elem_s      = 2.0e-10        # per token x experts
///     token_elem_s     = 3.0e-11        # per routed row x d_model (dispatch, combine, their backwards)
///     expert           = 2048 8192 1024 1.9e-03   # d_model, d_ff per rank, rows, seconds (one expert, fwd+bwd)
///     expert_shared_s  = 5.0e-05        # of one expert's time, what the experts of a layer share
///     exchange         = mpi 4.0e-05 2.5e+09      # path, seconds per transfer, bytes per second
///     exchange_fixed_s = 1.0e-04        # per layer step with an EP group (counts, gate statistics)
///     allreduce        = 2.0e-05 5.0e+09          # seconds per call, bytes per second
///     optimizer_elem_s = 1.0e-09        # per parameter per step
///
/// `expert` lines form one curve of rows -> seconds per (d_model, d_ff per
/// rank); `exchange` one line per path (mpi, nccl, direct).

#include <string>
#include <vector>

namespace moka {

/// \brief A machine's measured costs (seconds), for one backend, precision
/// and number of ranks per node.
struct MachineProfile {
  static constexpr int format_version = 1;

  /// \brief One expert's forward + backward time at several row counts.
  struct ExpertCurve {
    int d_model = 0, d_ff = 0;  ///< d_ff: the columns one rank holds (d_ff / slices)
    std::vector<double> rows, seconds;  ///< ascending rows
  };
  /// \brief Cost of one transfer of an exchange path: latency + bytes / bandwidth.
  struct Link {
    std::string path;  ///< mpi, nccl, direct
    double latency = 0, bandwidth = 0;
  };

  std::string card;           ///< "NVIDIA H200", "cpu: <model> (N cores)"
  std::string backend;        ///< Kokkos default execution space
  std::string precision;      ///< fp32, bf16, fp64
  int ranks_per_node = 1;     ///< ranks that ran side by side while measuring
  /// How many of a node's ranks compute at full speed at once: ranks_per_node
  /// where each has its own device or cores, fewer where they share (4 ranks
  /// on 2 cores: about 2). The costs below were measured with every rank of
  /// the node busy; a rank that computes while others wait runs
  /// ranks_per_node / concurrent_ranks times faster (moka::predict_step).
  double concurrent_ranks = 1;
  std::string comm = "none";  ///< the collectives' backend (mpi, nccl; none at one rank)
  std::string created;        ///< UTC time of the calibration
  std::string source;         ///< where it was read from (not written)
  double layer_fixed  = 0;
  double gate_flop    = 0;
  double gate_elem    = 0;
  double token_elem   = 0;
  double expert_shared = 0;  ///< what a layer's experts share: subtracted per expert with rows beyond the first
  /// Smart scheduling: the share of (1 - 1/G) min(experts, exchange) that G
  /// peer groups hide (measured at the profile's ranks with G = ranks;
  /// negative where scheduling costs more than it hides; optional key
  /// schedule_overlap, 0 when absent).
  double schedule_overlap = 0;
  double exchange_fixed = 0;
  double optimizer_elem = 0;
  std::vector<ExpertCurve> experts;
  std::vector<Link> exchange;
  Link allreduce{"allreduce", 0, 0};  ///< latency 0 and bandwidth 0: not measured (one rank)

  /// \brief Seconds of forward + backward of one expert of \p d x \p dff on
  /// \p rows rows: the curve of that shape, linear between its points and
  /// beyond its last (per-row cost of the last segment); a shape that was
  /// not measured is scaled from the nearest measured one by d x dff.
  /// Throws moka::Error when the profile has no expert curve.
  double expert_seconds(int d, int dff, double rows) const;
  /// \brief Whether a curve of exactly \p d x \p dff was measured.
  bool has_expert_shape(int d, int dff) const;
  /// \brief The link of exchange \p path; nullptr when not measured.
  const Link* link(const std::string& path) const;

  /// \brief Writes the file (throws moka::Error when it cannot).
  void write(const std::string& path) const;
  /// \brief Reads \p path; throws moka::Error naming the file, the line and
  /// what is wrong (unknown key, bad number, missing key, other version).
  static MachineProfile read(const std::string& path);
  /// \brief Parses the text of a profile (\p name labels the messages).
  static MachineProfile parse(const std::string& text, const std::string& name);
};

}  // namespace moka
