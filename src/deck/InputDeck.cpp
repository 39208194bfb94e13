#include <moka/deck/InputDeck.hpp>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <limits>
#include <sstream>

namespace fs = std::filesystem;

namespace moka {

std::string DeckEntry::where() const {
  if (file == "command line") return "command line argument " + std::to_string(line);
  return file + ":" + std::to_string(line);
}

namespace {

[[noreturn]] void deck_error(const std::string& file, int line, const std::string& msg) {
  throw Error("input deck " + file + ":" + std::to_string(line) + ": " + msg);
}

std::string trim(const std::string& s) {
  std::size_t b = 0, e = s.size();
  while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
  while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
  return s.substr(b, e - b);
}

/// Splits a value string into tokens: whitespace-separated words and
/// double-quoted strings (\" and \\ escapes). Stops at an unquoted '#'.
/// Returns false and sets err on malformed input.
bool tokenize(const std::string& text, std::vector<std::string>& out, std::string& err) {
  std::size_t i = 0;
  const std::size_t n = text.size();
  while (i < n) {
    const char c = text[i];
    if (std::isspace(static_cast<unsigned char>(c))) { ++i; continue; }
    if (c == '#') break;
    std::string tok;
    if (c == '"') {
      ++i;
      bool closed = false;
      while (i < n) {
        char d = text[i];
        if (d == '\\' && i + 1 < n && (text[i + 1] == '"' || text[i + 1] == '\\')) {
          tok.push_back(text[i + 1]);
          i += 2;
          continue;
        }
        if (d == '"') { closed = true; ++i; break; }
        tok.push_back(d);
        ++i;
      }
      if (!closed) { err = "unterminated string (missing closing \")"; return false; }
      if (i < n && !std::isspace(static_cast<unsigned char>(text[i])) && text[i] != '#') {
        err = std::string("unexpected character '") + text[i] + "' after closing quote";
        return false;
      }
    } else {
      while (i < n && !std::isspace(static_cast<unsigned char>(text[i])) && text[i] != '#') {
        if (text[i] == '"') { err = "quote inside an unquoted value"; return false; }
        tok.push_back(text[i]);
        ++i;
      }
    }
    out.push_back(tok);
  }
  return true;
}

/// Position of the first '=' or '#' outside quotes; npos if none.
std::size_t find_unquoted(const std::string& s, char what) {
  bool in_quote = false;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && in_quote) { ++i; continue; }
    if (s[i] == '"') in_quote = !in_quote;
    else if (!in_quote && s[i] == what) return i;
    else if (!in_quote && s[i] == '#') return std::string::npos;
  }
  return std::string::npos;
}

struct Parser {
  std::vector<DeckEntry>* entries;
  std::vector<std::string> include_stack;  // canonical paths being parsed

  void add(DeckEntry e) {
    for (const auto& old : *entries) {
      if (old.key == e.key) {
        deck_error(e.file, e.line, "duplicate key '" + e.key + "' (first set at " + old.where() + ")");
      }
    }
    entries->push_back(std::move(e));
  }

  void parse_text(const std::string& text, const std::string& name, const fs::path& base_dir) {
    std::istringstream in(text);
    std::string raw;
    int lineno = 0;
    while (std::getline(in, raw)) {
      ++lineno;
      if (!raw.empty() && raw.back() == '\r') raw.pop_back();
      const std::string line = trim(raw);
      if (line.empty() || line[0] == '#') continue;

      // include directive: include "path" | include path
      if (line.compare(0, 7, "include") == 0 &&
          (line.size() == 7 || std::isspace(static_cast<unsigned char>(line[7])) || line[7] == '"')) {
        std::vector<std::string> toks;
        std::string err;
        if (!tokenize(line.substr(7), toks, err)) deck_error(name, lineno, err);
        if (toks.size() != 1) deck_error(name, lineno, "include takes exactly one file name");
        fs::path p(toks[0]);
        if (p.is_relative()) p = base_dir / p;
        parse_file(p.string(), name, lineno);
        continue;
      }

      const std::size_t eq = find_unquoted(line, '=');
      if (eq == std::string::npos) {
        deck_error(name, lineno, "expected 'key = value', found no '=' in \"" + line + "\"");
      }
      DeckEntry e;
      e.key  = trim(line.substr(0, eq));
      e.file = name;
      e.line = lineno;
      if (e.key.empty()) deck_error(name, lineno, "missing key before '='");
      if (!is_valid_deck_key(e.key)) {
        deck_error(name, lineno, "invalid key name '" + e.key +
                                     "' (keys are dot-separated identifiers, e.g. moe.top_k)");
      }
      std::string err;
      if (!tokenize(line.substr(eq + 1), e.values, err)) deck_error(name, lineno, err);
      if (e.values.empty()) deck_error(name, lineno, "key '" + e.key + "' has no value");
      add(std::move(e));
    }
  }

  void parse_file(const std::string& path, const std::string& from_file, int from_line) {
    std::error_code ec;
    fs::path canon = fs::weakly_canonical(fs::path(path), ec);
    if (ec) canon = fs::absolute(fs::path(path));
    const std::string key = canon.string();
    for (std::size_t i = 0; i < include_stack.size(); ++i) {
      if (include_stack[i] == key) {
        std::string chain;
        for (std::size_t j = i; j < include_stack.size(); ++j) chain += include_stack[j] + " -> ";
        chain += key;
        deck_error(from_file, from_line, "include loop: " + chain);
      }
    }
    std::ifstream f(path);
    if (!f) {
      if (from_file.empty()) throw Error("input deck: cannot open '" + path + "'");
      deck_error(from_file, from_line, "cannot open included deck '" + path + "'");
    }
    if (fs::is_directory(canon, ec)) {
      if (from_file.empty()) throw Error("input deck: '" + path + "' is a directory, not a file");
      deck_error(from_file, from_line, "included deck '" + path + "' is a directory");
    }
    // Read at most max_deck_bytes + 1: a deck that large is a wrong path
    // (moka-train /dev/zero read until memory ran out).
    std::string text;
    char buf[65536];
    while (f && text.size() <= InputDeck::max_deck_bytes) {
      f.read(buf, sizeof(buf));
      text.append(buf, static_cast<std::size_t>(f.gcount()));
    }
    if (text.size() > InputDeck::max_deck_bytes) {
      const std::string what = "'" + path + "' is larger than " + std::to_string(InputDeck::max_deck_bytes >> 20) +
                               " MB: not an input deck";
      if (from_file.empty()) throw Error("input deck: " + what);
      deck_error(from_file, from_line, "included deck " + what);
    }
    // An editor's UTF-8 byte-order mark is not part of the first key.
    if (text.compare(0, 3, "\xEF\xBB\xBF") == 0) text.erase(0, 3);
    include_stack.push_back(key);
    parse_text(text, path, canon.parent_path());
    include_stack.pop_back();
  }
};

bool iequals(const std::string& a, const char* b) {
  std::string lb(b);
  if (a.size() != lb.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(a[i])) != lb[i]) return false;
  }
  return true;
}

std::string quote_if_needed(const std::string& v) {
  bool plain = !v.empty();
  for (char c : v) {
    if (std::isspace(static_cast<unsigned char>(c)) || c == '#' || c == '"') plain = false;
  }
  if (plain) return v;
  std::string out = "\"";
  for (char c : v) {
    if (c == '"' || c == '\\') out.push_back('\\');
    out.push_back(c);
  }
  return out + "\"";
}

std::string join_values(const std::vector<std::string>& vs) {
  std::string out;
  for (std::size_t i = 0; i < vs.size(); ++i) {
    if (i) out += ' ';
    out += quote_if_needed(vs[i]);
  }
  return out;
}

}  // namespace

namespace impl {

template <>
long convert_deck_value<long>(const std::string& t, const std::string& key, const std::string& where) {
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(t.c_str(), &end, 10);
  if (t.empty() || end != t.c_str() + t.size()) {
    throw Error("input deck " + where + ": " + key + " = '" + t + "' is not an integer");
  }
  if (errno == ERANGE || v > std::numeric_limits<long>::max() || v < std::numeric_limits<long>::min()) {
    throw Error("input deck " + where + ": " + key + " = '" + t + "' is out of range");
  }
  return static_cast<long>(v);
}

template <>
int convert_deck_value<int>(const std::string& t, const std::string& key, const std::string& where) {
  const long v = convert_deck_value<long>(t, key, where);
  if (v > std::numeric_limits<int>::max() || v < std::numeric_limits<int>::min()) {
    throw Error("input deck " + where + ": " + key + " = '" + t + "' does not fit in an int");
  }
  return static_cast<int>(v);
}

template <>
double convert_deck_value<double>(const std::string& t, const std::string& key, const std::string& where) {
  errno = 0;
  char* end = nullptr;
  const double v = std::strtod(t.c_str(), &end);
  if (t.empty() || end != t.c_str() + t.size()) {
    throw Error("input deck " + where + ": " + key + " = '" + t + "' is not a number");
  }
  if (errno == ERANGE || !std::isfinite(v)) {
    throw Error("input deck " + where + ": " + key + " = '" + t + "' is not a finite number");
  }
  return v;
}

template <>
float convert_deck_value<float>(const std::string& t, const std::string& key, const std::string& where) {
  const double v = convert_deck_value<double>(t, key, where);
  if (std::fabs(v) > static_cast<double>(std::numeric_limits<float>::max())) {
    throw Error("input deck " + where + ": " + key + " = '" + t + "' overflows a float");
  }
  return static_cast<float>(v);
}

template <>
bool convert_deck_value<bool>(const std::string& t, const std::string& key, const std::string& where) {
  if (iequals(t, "true") || iequals(t, "yes") || iequals(t, "on") || t == "1") return true;
  if (iequals(t, "false") || iequals(t, "no") || iequals(t, "off") || t == "0") return false;
  throw Error("input deck " + where + ": " + key + " = '" + t +
              "' is not a boolean (true/false, yes/no, on/off, 1/0)");
}

template <>
std::string convert_deck_value<std::string>(const std::string& t, const std::string&, const std::string&) {
  return t;
}

}  // namespace impl

InputDeck InputDeck::parse_file(const std::string& path) {
  InputDeck deck;
  deck.m_path = path;
  Parser p{&deck.m_entries, {}};
  p.parse_file(path, "", 0);
  return deck;
}

InputDeck InputDeck::parse_string(const std::string& text, const std::string& name) {
  InputDeck deck;
  Parser p{&deck.m_entries, {}};
  p.parse_text(text, name, fs::current_path());
  return deck;
}

void InputDeck::add_entry(DeckEntry e, bool allow_replace) {
  for (auto& old : m_entries) {
    if (old.key == e.key) {
      if (!allow_replace) throw Error("input deck " + e.where() + ": duplicate key '" + e.key + "'");
      old = std::move(e);
      return;
    }
  }
  m_entries.push_back(std::move(e));
}

void InputDeck::apply_overrides(const std::vector<std::string>& args) {
  int pos = 0;
  for (const auto& a : args) {
    ++pos;
    const std::size_t eq = a.find('=');
    if (eq == std::string::npos) {
      throw Error("command line argument " + std::to_string(pos) + ": '" + a +
                  "' is not of the form key=value");
    }
    DeckEntry e;
    e.key  = trim(a.substr(0, eq));
    e.file = "command line";
    e.line = pos;
    if (!is_valid_deck_key(e.key)) {
      throw Error("command line argument " + std::to_string(pos) + ": invalid key name '" + e.key + "'");
    }
    std::string err;
    if (!tokenize(a.substr(eq + 1), e.values, err)) {
      throw Error("command line argument " + std::to_string(pos) + ": " + err);
    }
    if (e.values.empty()) {
      throw Error("command line argument " + std::to_string(pos) + ": key '" + e.key + "' has no value");
    }
    add_entry(std::move(e), /*allow_replace=*/true);
  }
  m_validated = false;
}

void InputDeck::validate(const DeckSchema& schema) {
  std::vector<std::string> problems;
  for (const auto& e : m_entries) {
    const DeckKey* k = schema.find(e.key);
    if (!k) {
      std::string msg = e.where() + ": unknown key '" + e.key + "'";
      const std::string s = schema.suggest(e.key);
      if (!s.empty()) msg += " (did you mean '" + s + "'?)";
      problems.push_back(msg);
      continue;
    }
    if (!k->is_list && e.values.size() != 1) {
      problems.push_back(e.where() + ": " + e.key + " takes one value, got " +
                         std::to_string(e.values.size()));
      continue;
    }
    for (const auto& v : e.values) {
      try {
        double num = 0.0;
        switch (k->type) {
          case DeckType::integer: num = static_cast<double>(impl::convert_deck_value<long>(v, e.key, e.where())); break;
          case DeckType::real: num = impl::convert_deck_value<double>(v, e.key, e.where()); break;
          case DeckType::boolean: impl::convert_deck_value<bool>(v, e.key, e.where()); break;
          case DeckType::string: break;
        }
        if (k->type == DeckType::integer || k->type == DeckType::real) {
          if (k->min_value && num < *k->min_value) {
            std::ostringstream os;
            os << e.where() << ": " << e.key << " = " << v << " is below the minimum " << *k->min_value;
            problems.push_back(os.str());
          }
          if (k->max_value && num > *k->max_value) {
            std::ostringstream os;
            os << e.where() << ": " << e.key << " = " << v << " is above the maximum " << *k->max_value;
            problems.push_back(os.str());
          }
        }
        if (!k->choices.empty() &&
            std::find(k->choices.begin(), k->choices.end(), v) == k->choices.end()) {
          std::string msg = e.where() + ": " + e.key + " = '" + v + "' is not one of:";
          for (const auto& c : k->choices) msg += " " + c;
          problems.push_back(msg);
        }
      } catch (const Error& err) {
        std::string m = err.what();
        const std::string prefix = "input deck ";
        if (m.compare(0, prefix.size(), prefix) == 0) m = m.substr(prefix.size());
        problems.push_back(m);
      }
    }
  }
  for (const auto& kv : schema.keys()) {
    if (kv.second.required && !contains(kv.first)) {
      problems.push_back("missing required key '" + kv.first + "'" +
                         (kv.second.doc.empty() ? "" : " (" + kv.second.doc + ")"));
    }
  }
  if (!problems.empty()) {
    std::string msg = "input deck " + (m_path.empty() ? std::string("<string>") : m_path) + ": " +
                      std::to_string(problems.size()) + " problem" + (problems.size() > 1 ? "s" : "") + ":";
    for (const auto& p : problems) msg += "\n  " + p;
    throw Error(msg);
  }
  m_schema    = schema;
  m_validated = true;
}

bool InputDeck::contains(const std::string& key) const { return find(key) != nullptr; }

const DeckEntry* InputDeck::find(const std::string& key) const {
  for (const auto& e : m_entries) {
    if (e.key == key) return &e;
  }
  return nullptr;
}

const std::vector<std::string>* InputDeck::values_of(const std::string& key, std::string* where) const {
  if (const DeckEntry* e = find(key)) {
    *where = e->where();
    return &e->values;
  }
  if (m_validated) {
    const DeckKey* k = m_schema.find(key);
    if (!k) throw Error("moka::InputDeck::get: key '" + key + "' is not declared in the deck schema");
    if (!k->default_values.empty()) {
      *where = "default of " + key;
      return &k->default_values;
    }
  }
  return nullptr;
}

template <class T>
T InputDeck::get(const std::string& key) const {
  std::string where;
  const auto* vs = values_of(key, &where);
  if (!vs) {
    throw Error("input deck " + (m_path.empty() ? std::string("<string>") : m_path) +
                ": missing required key '" + key + "'");
  }
  if (vs->size() != 1) {
    throw Error("input deck " + where + ": " + key + " takes one value, got " + std::to_string(vs->size()));
  }
  return impl::convert_deck_value<T>(vs->front(), key, where);
}

template <class T>
T InputDeck::get(const std::string& key, const T& fallback) const {
  std::string where;
  if (!values_of(key, &where)) return fallback;
  return get<T>(key);
}

template <class T>
std::vector<T> InputDeck::get_list(const std::string& key) const {
  std::string where;
  const auto* vs = values_of(key, &where);
  if (!vs) {
    throw Error("input deck " + (m_path.empty() ? std::string("<string>") : m_path) +
                ": missing required key '" + key + "'");
  }
  std::vector<T> out;
  for (const auto& v : *vs) out.push_back(impl::convert_deck_value<T>(v, key, where));
  return out;
}

#define MOKA_INSTANTIATE_DECK_GET(T)                                       \
  template T InputDeck::get<T>(const std::string&) const;                  \
  template T InputDeck::get<T>(const std::string&, const T&) const;        \
  template std::vector<T> InputDeck::get_list<T>(const std::string&) const;
MOKA_INSTANTIATE_DECK_GET(long)
MOKA_INSTANTIATE_DECK_GET(int)
MOKA_INSTANTIATE_DECK_GET(double)
MOKA_INSTANTIATE_DECK_GET(float)
MOKA_INSTANTIATE_DECK_GET(bool)
MOKA_INSTANTIATE_DECK_GET(std::string)
#undef MOKA_INSTANTIATE_DECK_GET

std::string InputDeck::resolved_text() const {
  if (!m_validated) throw Error("moka::InputDeck::resolved_text: call validate() first");
  std::ostringstream os;
  for (const auto& kv : m_schema.keys()) {
    const DeckEntry* e = find(kv.first);
    const std::vector<std::string>& v = e ? e->values : kv.second.default_values;
    if (!v.empty()) os << kv.first << " = " << join_values(v) << "\n";
  }
  return os.str();
}

std::string InputDeck::resolved_table() const {
  if (!m_validated) throw Error("moka::InputDeck::resolved_table: call validate() first");
  std::size_t wk = 3, wv = 5;
  struct Row { std::string k, v, src; };
  std::vector<Row> rows;
  for (const auto& kv : m_schema.keys()) {
    Row r;
    r.k = kv.first;
    if (const DeckEntry* e = find(kv.first)) {
      r.v   = join_values(e->values);
      r.src = e->where();
    } else if (!kv.second.default_values.empty()) {
      r.v   = join_values(kv.second.default_values);
      r.src = "default";
    } else {
      r.v   = "(unset)";
      r.src = "-";
    }
    wk = std::max(wk, r.k.size());
    wv = std::max(wv, r.v.size());
    rows.push_back(r);
  }
  std::ostringstream os;
  os << "Resolved input deck" << (m_path.empty() ? "" : " (" + m_path + ")") << ":\n";
  os << "  " << std::left << std::setw(static_cast<int>(wk)) << "key" << "  "
     << std::setw(static_cast<int>(wv)) << "value" << "  source\n";
  for (const auto& r : rows) {
    os << "  " << std::left << std::setw(static_cast<int>(wk)) << r.k << "  "
       << std::setw(static_cast<int>(wv)) << r.v << "  " << r.src << "\n";
  }
  return os.str();
}

// Format: path '\0' then per entry: key '\0' file '\0' line '\0' nvalues '\0' values... '\0'
std::string InputDeck::serialize() const {
  std::string out = m_path;
  out.push_back('\0');
  out += std::to_string(m_entries.size());
  out.push_back('\0');
  for (const auto& e : m_entries) {
    for (const std::string* s : {&e.key, &e.file}) {
      out += *s;
      out.push_back('\0');
    }
    out += std::to_string(e.line);
    out.push_back('\0');
    out += std::to_string(e.values.size());
    out.push_back('\0');
    for (const auto& v : e.values) {
      out += v;
      out.push_back('\0');
    }
  }
  return out;
}

InputDeck InputDeck::deserialize(const std::string& bytes) {
  std::size_t pos = 0;
  auto next = [&]() {
    const std::size_t z = bytes.find('\0', pos);
    if (z == std::string::npos) throw Error("moka::InputDeck::deserialize: truncated deck data");
    std::string s = bytes.substr(pos, z - pos);
    pos = z + 1;
    return s;
  };
  auto next_size = [&]() {
    const std::string s = next();
    char* end = nullptr;
    const unsigned long v = std::strtoul(s.c_str(), &end, 10);
    if (s.empty() || *end != '\0') throw Error("moka::InputDeck::deserialize: corrupt deck data");
    return static_cast<std::size_t>(v);
  };
  InputDeck d;
  d.m_path = next();
  const std::size_t n = next_size();
  for (std::size_t i = 0; i < n; ++i) {
    DeckEntry e;
    e.key  = next();
    e.file = next();
    e.line = static_cast<int>(next_size());
    const std::size_t nv = next_size();
    for (std::size_t j = 0; j < nv; ++j) e.values.push_back(next());
    d.m_entries.push_back(std::move(e));
  }
  return d;
}

InputDeck InputDeck::load(MPI_Comm comm, const std::string& path, const std::vector<std::string>& overrides) {
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  std::string payload;
  int ok = 1;
  if (rank == 0) {
    try {
      InputDeck d = parse_file(path);
      d.apply_overrides(overrides);
      payload = d.serialize();
    } catch (const std::exception& e) {
      ok      = 0;
      payload = e.what();
    }
  }
  unsigned long long len = payload.size();
  int hdr[1] = {ok};
  MPI_Bcast(hdr, 1, MPI_INT, 0, comm);
  MPI_Bcast(&len, 1, MPI_UNSIGNED_LONG_LONG, 0, comm);
  payload.resize(static_cast<std::size_t>(len));
  // Broadcast in chunks that fit an int count.
  const std::size_t chunk = 1u << 30;
  for (std::size_t off = 0; off < payload.size(); off += chunk) {
    const int n = static_cast<int>(std::min(chunk, payload.size() - off));
    MPI_Bcast(&payload[off], n, MPI_CHAR, 0, comm);
  }
  if (!hdr[0]) throw Error(payload);
  return deserialize(payload);
}

}  // namespace moka
