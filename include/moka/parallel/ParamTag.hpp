#pragma once
/// \file ParamTag.hpp
/// \brief The tag of a parameter: over which ranks its gradient is summed
/// (moka::GradSync) and how the global norm counts it.

namespace moka {

/// \brief Over which ranks a parameter's gradient is summed.
enum class ParamTag {
  dense,              ///< data-parallel over the world (norms, dense layers)
  gate,               ///< the gate's weights: summed over the gate group (ProcessGroups::gate)
  expert,             ///< this rank's expert part: summed over the EDP group
  expert_replicated,  ///< an expert tensor whole on every slice rank (b2): summed over EDP, counted once per slice group
  none                ///< not synchronised
};
/// \brief "dense", "gate", "expert", "expert_replicated", "none".
inline const char* to_string(ParamTag t) {
  switch (t) {
    case ParamTag::dense: return "dense";
    case ParamTag::gate: return "gate";
    case ParamTag::expert: return "expert";
    case ParamTag::expert_replicated: return "expert_replicated";
    case ParamTag::none: return "none";
  }
  return "?";
}

}  // namespace moka
