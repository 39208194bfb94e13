#pragma once
/// \file InputDeck.hpp
/// \brief Input decks with AMReX ParmParse semantics.
///
/// Syntax, one entry per line:
/// \code
/// # a comment
/// moe.num_experts = 8            # integer
/// train.lr        = 3e-4         # real
/// run.name        = "quick start"  # quoted string (may hold spaces and #)
/// moe.layers      = 64 128 256   # a list
/// include "common.deck"          # path relative to this file
/// \endcode
/// Command-line `key=value` arguments override the file (a later one wins
/// over an earlier one). Keys must be declared in a moka::DeckSchema:
/// unknown keys fail with file:line and a "did you mean" suggestion;
/// duplicate keys in the files fail with both locations. Every error names
/// the file and line.
///
/// In MPI runs, moka::InputDeck::load parses on rank 0 and broadcasts, and a
/// parse error on rank 0 is raised on every rank.

#include <moka/deck/DeckSchema.hpp>
#include <moka/core/Error.hpp>

#include <mpi.h>

#include <cstddef>
#include <string>
#include <vector>

namespace moka {

/// \brief One key with its values and where they came from.
struct DeckEntry {
  std::string key;                  ///< full key
  std::vector<std::string> values;  ///< raw tokens, quotes removed
  std::string file;                 ///< file name, or "command line"
  int line = 0;                     ///< 1-based line, or argument position
  /// \brief "file:line" or "command line argument N".
  std::string where() const;
};

/// \brief A parsed input deck.
class InputDeck {
 public:
  /// \brief Largest deck file read (16 MB); larger is an error naming the file.
  static constexpr std::size_t max_deck_bytes = std::size_t(16) << 20;

  InputDeck() = default;

  /// \brief Parses \p path (and its includes). Throws moka::Error on malformed input.
  static InputDeck parse_file(const std::string& path);
  /// \brief Parses \p text; \p name is used in messages and as the base for includes.
  static InputDeck parse_string(const std::string& text, const std::string& name = "<string>");
  /// \brief Parses on rank 0 of \p comm, applies \p overrides, broadcasts.
  /// Errors on rank 0 are thrown on all ranks with the same message.
  /// \note Collective over \p comm.
  static InputDeck load(MPI_Comm comm, const std::string& path,
                        const std::vector<std::string>& overrides = {});

  /// \brief Applies command-line `key=value` arguments (value tokens as in the file).
  void apply_overrides(const std::vector<std::string>& args);

  /// \brief Checks every entry against \p schema (unknown keys with suggestions,
  /// types, value counts, bounds, choices, required keys) and keeps the schema
  /// for defaults. Throws one moka::Error listing every problem.
  void validate(const DeckSchema& schema);

  /// \brief Whether \p key was given (in a file or on the command line).
  bool contains(const std::string& key) const;
  /// \brief The entry for \p key, or nullptr.
  const DeckEntry* find(const std::string& key) const;
  /// \brief All entries in the order first given.
  const std::vector<DeckEntry>& entries() const { return m_entries; }
  /// \brief Top-level deck path ("" for a string deck).
  const std::string& path() const { return m_path; }

  /// \brief Value of a single-valued key: the deck's, else the schema default;
  /// throws moka::Error if neither exists or the value does not convert.
  /// T is one of long, int, double, float, bool, std::string.
  template <class T>
  T get(const std::string& key) const;
  /// \brief As get(key), but \p fallback where the key is absent and has no default.
  template <class T>
  T get(const std::string& key, const T& fallback) const;
  /// \brief All values of a key (list keys).
  template <class T>
  std::vector<T> get_list(const std::string& key) const;

  /// \brief Table of every schema key with its value and source
  /// (file:line, command line, or default). Needs validate() first.
  std::string resolved_table() const;
  /// \brief Every schema key that has a value (given or default) as a deck
  /// (`key = value` lines, sorted, strings quoted where needed) that
  /// parse_string reads back: what checkpoints store. Needs validate() first.
  std::string resolved_text() const;

  /// \brief Byte string holding all entries (for broadcasts and checkpoints).
  std::string serialize() const;
  /// \brief Inverse of serialize().
  static InputDeck deserialize(const std::string& bytes);

 private:
  const std::vector<std::string>* values_of(const std::string& key, std::string* where) const;
  void add_entry(DeckEntry e, bool allow_replace);

  std::string m_path;
  std::vector<DeckEntry> m_entries;
  DeckSchema m_schema;
  bool m_validated = false;
};

namespace impl {
/// \brief Converts one deck token; throws moka::Error naming \p where and \p key.
template <class T>
T convert_deck_value(const std::string& token, const std::string& key, const std::string& where);
}  // namespace impl

}  // namespace moka
