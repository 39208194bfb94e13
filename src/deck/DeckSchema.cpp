#include <moka/deck/DeckSchema.hpp>
#include <moka/core/Error.hpp>

#include <algorithm>
#include <cctype>
#include <sstream>

namespace moka {

const char* to_string(DeckType t) {
  switch (t) {
    case DeckType::integer: return "int";
    case DeckType::real: return "float";
    case DeckType::boolean: return "bool";
    case DeckType::string: return "string";
  }
  return "?";
}

bool is_valid_deck_key(const std::string& name) {
  if (name.empty()) return false;
  bool at_start = true;
  for (char c : name) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (c == '.') {
      if (at_start) return false;  // empty component
      at_start = true;
      continue;
    }
    if (at_start) {
      if (!(std::isalpha(u) || c == '_')) return false;
      at_start = false;
    } else if (!(std::isalnum(u) || c == '_')) {
      return false;
    }
  }
  return !at_start;
}

DeckKey& DeckKey::set_default(const std::string& value) {
  default_values = {value};
  required       = false;
  return *this;
}
DeckKey& DeckKey::set_default_list(std::vector<std::string> values) {
  default_values = std::move(values);
  is_list        = true;
  required       = false;
  return *this;
}
DeckKey& DeckKey::set_required() {
  required = true;
  default_values.clear();
  return *this;
}
DeckKey& DeckKey::set_list() {
  is_list = true;
  return *this;
}
DeckKey& DeckKey::set_choices(std::vector<std::string> values) {
  choices = std::move(values);
  return *this;
}
DeckKey& DeckKey::set_min(double v) {
  min_value = v;
  return *this;
}
DeckKey& DeckKey::set_max(double v) {
  max_value = v;
  return *this;
}
DeckKey& DeckKey::set_doc(std::string text) {
  doc = std::move(text);
  return *this;
}

DeckKey& DeckSchema::add(const std::string& name, DeckType type) {
  MOKA_REQUIRE(is_valid_deck_key(name), "invalid key name '", name, "'");
  MOKA_REQUIRE(m_keys.count(name) == 0, "key '", name, "' declared twice");
  DeckKey& k = m_keys[name];
  k.name     = name;
  k.type     = type;
  return k;
}

void DeckSchema::merge(const DeckSchema& other) {
  for (const auto& kv : other.m_keys) {
    MOKA_REQUIRE(m_keys.count(kv.first) == 0, "key '", kv.first, "' declared twice");
    m_keys[kv.first] = kv.second;
  }
}

const DeckKey* DeckSchema::find(const std::string& name) const {
  auto it = m_keys.find(name);
  return it == m_keys.end() ? nullptr : &it->second;
}

namespace {
std::size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> prev(b.size() + 1), cur(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) prev[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    cur[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t sub = prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1);
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, sub});
    }
    std::swap(prev, cur);
  }
  return prev[b.size()];
}
}  // namespace

std::string DeckSchema::suggest(const std::string& name) const {
  std::string best;
  std::size_t best_d = static_cast<std::size_t>(-1);
  for (const auto& kv : m_keys) {
    const std::size_t d = edit_distance(name, kv.first);
    if (d < best_d) {
      best_d = d;
      best   = kv.first;
    }
  }
  // Close enough: a few edits, relative to the length of the key.
  const std::size_t limit = std::max<std::size_t>(2, name.size() / 4);
  return best_d <= limit ? best : std::string();
}

std::string DeckSchema::markdown() const {
  std::ostringstream os;
  os << "| key | type | default | description |\n| --- | --- | --- | --- |\n";
  for (const auto& kv : m_keys) {
    const DeckKey& k = kv.second;
    os << "| `" << k.name << "` | " << to_string(k.type) << (k.is_list ? " list" : "") << " | ";
    if (k.required) {
      os << "required";
    } else if (!k.default_values.empty()) {
      os << "`";
      for (std::size_t i = 0; i < k.default_values.size(); ++i) os << (i ? " " : "") << k.default_values[i];
      os << "`";
    } else {
      os << "(none)";
    }
    os << " | " << k.doc;
    if (!k.choices.empty()) {
      os << " One of:";
      for (const auto& c : k.choices) os << " `" << c << "`";
      os << ".";
    }
    if (k.min_value) os << " Minimum " << *k.min_value << ".";
    if (k.max_value) os << " Maximum " << *k.max_value << ".";
    os << " |\n";
  }
  return os.str();
}

}  // namespace moka
