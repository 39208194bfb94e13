#include <moka/core/Error.hpp>

#include <cstring>

namespace moka {
namespace impl {

std::string function_name(const char* pretty) {
  // "R ns::Class::fn(args) const [with T = ...]" -> "ns::Class::fn".
  std::string s(pretty);
  std::size_t paren = s.find('(');
  // operator() has its own parentheses: skip them.
  const std::size_t op = s.find("operator()");
  if (op != std::string::npos && op < paren) paren = s.find('(', op + std::strlen("operator()"));
  if (paren == std::string::npos) return s;
  std::string head = s.substr(0, paren);
  // Drop the return type: the name starts after the last space not inside <>.
  int depth = 0;
  std::size_t start = 0;
  for (std::size_t i = 0; i < head.size(); ++i) {
    if (head[i] == '<') ++depth;
    else if (head[i] == '>') --depth;
    else if (head[i] == ' ' && depth == 0) start = i + 1;
  }
  return head.substr(start);
}

}  // namespace impl
}  // namespace moka
