#include <moka/core/Core.hpp>

namespace moka {

std::string to_string(Precision p) {
  switch (p) {
    case Precision::fp64: return "fp64";
    case Precision::fp32: return "fp32";
    case Precision::bf16: return "bf16";
  }
  return "?";
}

Precision precision_from_string(const std::string& s) {
  if (s == "fp64") return Precision::fp64;
  if (s == "fp32") return Precision::fp32;
  if (s == "bf16") return Precision::bf16;
  impl::fail(MOKA_FUNCTION, "unknown precision '", s, "' (expected fp64, fp32 or bf16)");
}

const char* version() { return MOKA_VERSION_STRING; }

}  // namespace moka
