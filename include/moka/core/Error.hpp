#pragma once
/// \file Error.hpp
/// \brief moka::Error and the always-on precondition checks.
///
/// Every host-side precondition in MoKA is checked in all build types and
/// throws moka::Error with the qualified function name, the offending value
/// and, for Views, the View's label:
/// `moka::MoELayer::forward: x has 512 columns, expected 1024 (x)`.

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace moka {

/// \brief The exception type thrown by MoKA for bad input and failed checks.
class Error : public std::runtime_error {
 public:
  /// \brief An error whose what() is \p message.
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

namespace impl {

/// \brief Reduces a __PRETTY_FUNCTION__ string to the qualified name,
/// e.g. "void moka::InputDeck::validate(const X&) const" -> "moka::InputDeck::validate".
std::string function_name(const char* pretty);

template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

/// \brief Throws moka::Error("<where>: <args...>").
template <class... Args>
[[noreturn]] void fail(const std::string& where, Args&&... args) {
  throw Error(where + ": " + concat(std::forward<Args>(args)...));
}

}  // namespace impl

/// \brief Checks the extent \p dim of \p view against \p expected and throws
/// moka::Error naming the function, the extent, the expectation and the label.
/// \param where qualified function name (use MOKA_FUNCTION)
/// \param what  how the dimension is called in the message ("rows", "columns")
template <class View>
void require_extent(const std::string& where, const View& view, int dim,
                    std::size_t expected, const char* what) {
  const std::size_t got = view.extent(dim);
  if (got != expected) {
    impl::fail(where, "'", view.label(), "' has ", got, " ", what, ", expected ",
               expected, " (", view.label(), ")");
  }
}

}  // namespace moka

/// \brief Qualified name of the enclosing function, e.g. "moka::InputDeck::get".
#define MOKA_FUNCTION ::moka::impl::function_name(__PRETTY_FUNCTION__)

/// \brief Always-on precondition: throws moka::Error with the enclosing
/// function's name and the streamed message if \p cond is false.
/// Usage: `MOKA_REQUIRE(k <= E, "top_k = ", k, " exceeds num_experts = ", E);`
#define MOKA_REQUIRE(cond, ...)                           \
  do {                                                    \
    if (!(cond)) ::moka::impl::fail(MOKA_FUNCTION, __VA_ARGS__); \
  } while (0)
