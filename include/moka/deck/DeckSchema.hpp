#pragma once
/// \file DeckSchema.hpp
/// \brief The keys an input deck may contain: type, default, allowed values, doc.
///
/// Each program (and each library component) declares its keys; the deck is
/// validated against the schema, so a typo is an error with a suggestion,
/// never a silent fall-back to a default.
///
/// \code
/// moka::DeckSchema s;
/// s.add("moe.num_experts", moka::DeckType::integer).set_default("8")
///   .set_doc("number of logical experts E").set_min(1);
/// s.add("gate.type", moka::DeckType::string).set_default("topk")
///   .set_choices({"topk", "gshard", "switch"});
/// \endcode

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace moka {

/// \brief Value type of a deck key.
enum class DeckType { integer, real, boolean, string };

/// \brief "int", "float", "bool" or "string".
const char* to_string(DeckType t);

/// \brief One declared key.
struct DeckKey {
  std::string name;                          ///< full key, e.g. "moe.top_k"
  DeckType type = DeckType::string;          ///< value type
  bool is_list  = false;                     ///< takes one or more values
  bool required = false;                     ///< must be given (no default)
  std::vector<std::string> default_values;   ///< used when absent (empty: none)
  std::vector<std::string> choices;          ///< allowed values (empty: any)
  std::optional<double> min_value;           ///< lower bound for numbers
  std::optional<double> max_value;           ///< upper bound for numbers
  std::string doc;                           ///< one-line description

  /// \brief Sets the default of a single-valued key.
  DeckKey& set_default(const std::string& value);
  /// \brief Makes the key a list and sets its default values.
  DeckKey& set_default_list(std::vector<std::string> values);
  /// \brief Marks the key as required.
  DeckKey& set_required();
  /// \brief Marks the key as a list (one or more values).
  DeckKey& set_list();
  /// \brief Restricts values to \p values.
  DeckKey& set_choices(std::vector<std::string> values);
  /// \brief Lower bound (inclusive) for integer and real keys.
  DeckKey& set_min(double v);
  /// \brief Upper bound (inclusive) for integer and real keys.
  DeckKey& set_max(double v);
  /// \brief Documentation line.
  DeckKey& set_doc(std::string text);
};

/// \brief A set of declared keys.
class DeckSchema {
 public:
  /// \brief Declares \p name; throws moka::Error if it is declared twice or malformed.
  DeckKey& add(const std::string& name, DeckType type);
  /// \brief Adds every key of \p other (throws on clashes).
  void merge(const DeckSchema& other);
  /// \brief The key \p name, or nullptr.
  const DeckKey* find(const std::string& name) const;
  /// \brief All keys, sorted by name.
  const std::map<std::string, DeckKey>& keys() const { return m_keys; }
  /// \brief The declared key nearest to \p name by edit distance, or "" if none is close.
  std::string suggest(const std::string& name) const;
  /// \brief Markdown table of all keys (name, type, default, doc): the deck reference.
  std::string markdown() const;

 private:
  std::map<std::string, DeckKey> m_keys;
};

/// \brief True if \p name is a valid key: dot-separated identifiers.
bool is_valid_deck_key(const std::string& name);

}  // namespace moka
