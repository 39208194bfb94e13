#pragma once
/// \file Placement.hpp
/// \brief moka::Placement: where the experts of one MoE layer live. Each
/// logical expert (the gate's column) has one or more physical slots; a
/// slot is (rank within the EP group, local slot on that rank). Every rank
/// of an EP group has the same number of slots, L, and every slot holds
/// exactly one expert.
///
/// The contiguous placement (expert e on rank e / L, local slot e % L) is
/// the default and what a layout without an explicit placement uses. The
/// token exchange, the ownership of expert parameters and the gradient
/// groups read the placement instead of computing an expert's home; the
/// adaptive balancer (docs/design.md, section 4) changes it between steps.
///
/// \code
/// // 4 experts on 2 ranks, 2 slots each: rank 0 holds experts 3 and 0,
/// // rank 1 holds experts 1 and 2.
/// auto p = moka::Placement::from_slots(4, 2, {3, 0, 1, 2});
/// p.slots_of(0);           // {{0, 1}}
/// p.expert_at(1, 0);       // 1
/// \endcode

#include <moka/core/Error.hpp>

#include <sstream>
#include <string>
#include <vector>

namespace moka {

/// \brief Logical experts -> physical slots on the ranks of an EP group.
class Placement {
 public:
  /// \brief One physical slot: rank within the EP group, local slot there.
  struct Slot {
    int rank  = 0;
    int local = 0;
    friend bool operator==(const Slot& a, const Slot& b) { return a.rank == b.rank && a.local == b.local; }
    friend bool operator!=(const Slot& a, const Slot& b) { return !(a == b); }
  };

  /// \brief An empty placement (no experts): MoELayer reads it as "contiguous".
  Placement() = default;

  /// \brief Expert e on rank e / L, local slot e % L, L = E / EP.
  /// Throws moka::Error when \p ep_size does not divide \p num_experts.
  static Placement contiguous(int num_experts, int ep_size) {
    MOKA_REQUIRE(ep_size >= 1 && num_experts >= 1 && num_experts % ep_size == 0,
                 "moka::Placement::contiguous: ", num_experts, " experts do not split evenly over ", ep_size,
                 " ranks");
    std::vector<int> slots(num_experts);
    for (int e = 0; e < num_experts; ++e) slots[e] = e;
    return from_slots(num_experts, ep_size, std::move(slots));
  }

  /// \brief From the expert on each slot: \p slot_expert[r * L + l] is the
  /// expert on rank r's local slot l (L = slot_expert.size() / ep_size).
  /// An expert may appear on several slots (replicas). Validated: every
  /// slot holds an expert in [0, E), every expert has a slot, and the ranks
  /// have equal slot counts; moka::Error names the first violation.
  static Placement from_slots(int num_experts, int ep_size, std::vector<int> slot_expert) {
    Placement p;
    p.m_E = num_experts;
    p.m_P = ep_size;
    MOKA_REQUIRE(ep_size >= 1, "moka::Placement: EP size ", ep_size, " must be positive");
    MOKA_REQUIRE(num_experts >= 1, "moka::Placement: ", num_experts, " experts (need at least one)");
    const int n = static_cast<int>(slot_expert.size());
    MOKA_REQUIRE(n % ep_size == 0, "moka::Placement: ", n, " slots do not split evenly over ", ep_size,
                 " ranks (every rank needs the same number of slots)");
    MOKA_REQUIRE(n >= num_experts, "moka::Placement: ", n, " slots for ", num_experts,
                 " experts (every expert needs a slot)");
    p.m_L = n / ep_size;
    p.m_slot_expert = std::move(slot_expert);
    p.m_slots.assign(num_experts, {});
    for (int s = 0; s < n; ++s) {
      const int e = p.m_slot_expert[s];
      MOKA_REQUIRE(e >= 0 && e < num_experts, "moka::Placement: slot ", s, " (rank ", s / p.m_L, ", local ",
                   s % p.m_L, ") holds expert ", e, ", outside [0, ", num_experts, ")");
      p.m_slots[e].push_back({s / p.m_L, s % p.m_L});
    }
    for (int e = 0; e < num_experts; ++e)
      MOKA_REQUIRE(!p.m_slots[e].empty(), "moka::Placement: expert ", e, " has no slot");
    return p;
  }

  /// \brief From the slots of each expert: \p slots[e] lists expert e's
  /// slots. Validated as from_slots(), and no slot may be listed twice.
  static Placement from_expert_slots(int ep_size, int slots_per_rank, const std::vector<std::vector<Slot>>& slots) {
    MOKA_REQUIRE(ep_size >= 1 && slots_per_rank >= 1, "moka::Placement: ", ep_size, " ranks x ", slots_per_rank,
                 " slots (both must be positive)");
    std::vector<int> at(std::size_t(ep_size) * slots_per_rank, -1);
    for (std::size_t e = 0; e < slots.size(); ++e)
      for (const Slot& s : slots[e]) {
        MOKA_REQUIRE(s.rank >= 0 && s.rank < ep_size && s.local >= 0 && s.local < slots_per_rank,
                     "moka::Placement: expert ", e, " on slot (rank ", s.rank, ", local ", s.local,
                     ") outside ", ep_size, " ranks x ", slots_per_rank, " slots");
        int& holder = at[std::size_t(s.rank) * slots_per_rank + s.local];
        MOKA_REQUIRE(holder < 0, "moka::Placement: slot (rank ", s.rank, ", local ", s.local,
                     ") used twice (experts ", holder, " and ", e, ")");
        holder = static_cast<int>(e);
      }
    for (std::size_t i = 0; i < at.size(); ++i)
      MOKA_REQUIRE(at[i] >= 0, "moka::Placement: slot (rank ", i / slots_per_rank, ", local ", i % slots_per_rank,
                   ") holds no expert (every slot must hold one)");
    return from_slots(static_cast<int>(slots.size()), ep_size, std::move(at));
  }

  /// \brief Whether this is the empty placement (no experts).
  bool empty() const { return m_E == 0; }
  int num_experts() const { return m_E; }
  /// \brief Ranks of the EP group.
  int ep_size() const { return m_P; }
  /// \brief Slots per rank (L).
  int slots_per_rank() const { return m_L; }
  /// \brief Slots in all (EP x L).
  int num_slots() const { return m_P * m_L; }
  /// \brief The slots of expert \p e (one, or several for a replicated expert).
  const std::vector<Slot>& slots_of(int e) const { return m_slots.at(e); }
  /// \brief The expert on \p rank's local slot \p local.
  int expert_at(int rank, int local) const { return m_slot_expert.at(std::size_t(rank) * m_L + local); }
  /// \brief The expert of every slot, rank by rank ([EP x L]).
  const std::vector<int>& slot_experts() const { return m_slot_expert; }
  /// \brief Whether every expert has exactly one slot.
  bool single_slot() const { return num_slots() == m_E; }
  /// \brief Whether expert e sits on rank e / L, local slot e % L.
  bool is_contiguous() const {
    if (!single_slot()) return false;
    for (int s = 0; s < num_slots(); ++s)
      if (m_slot_expert[s] != s) return false;
    return true;
  }
  /// \brief "rank 0: 3 0 | rank 1: 1 2".
  std::string describe() const {
    std::ostringstream os;
    for (int r = 0; r < m_P; ++r) {
      os << (r ? " | " : "") << "rank " << r << ":";
      for (int l = 0; l < m_L; ++l) os << " " << expert_at(r, l);
    }
    return os.str();
  }
  friend bool operator==(const Placement& a, const Placement& b) {
    return a.m_E == b.m_E && a.m_P == b.m_P && a.m_slot_expert == b.m_slot_expert;
  }
  friend bool operator!=(const Placement& a, const Placement& b) { return !(a == b); }

 private:
  int m_E = 0, m_P = 0, m_L = 0;
  std::vector<int> m_slot_expert;          // [P L]: the expert on each slot
  std::vector<std::vector<Slot>> m_slots;  // [E]: each expert's slots
};

}  // namespace moka
