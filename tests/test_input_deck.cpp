#include <moka/balance/BalanceConfig.hpp>
#include <moka/train/BenchConfig.hpp>
#include <moka/train/PlanConfig.hpp>
#include <moka/deck/InputDeck.hpp>
#include <moka/train/RunConfig.hpp>
#include <moka/train/Trainer.hpp>

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>

namespace fs = std::filesystem;

namespace {

moka::DeckSchema schema() {
  moka::DeckSchema s;
  s.add("moe.num_experts", moka::DeckType::integer).set_default("8").set_min(1).set_doc("experts");
  s.add("moe.top_k", moka::DeckType::integer).set_default("2").set_min(1);
  s.add("train.lr", moka::DeckType::real).set_default("1e-3").set_min(0);
  s.add("train.steps", moka::DeckType::integer).set_required().set_doc("number of steps");
  s.add("gate.type", moka::DeckType::string).set_default("topk").set_choices({"topk", "gshard", "switch"});
  s.add("gate.noisy", moka::DeckType::boolean).set_default("false");
  s.add("run.name", moka::DeckType::string).set_default("x");
  s.add("model.widths", moka::DeckType::integer).set_default_list({"16", "32"});
  return s;
}

class TempDir {
 public:
  TempDir() {
    m_path = fs::temp_directory_path() / ("moka_deck_test_" + std::to_string(::getpid()) + "_" +
                                          std::to_string(counter()++));
    fs::create_directories(m_path);
  }
  ~TempDir() { fs::remove_all(m_path); }
  std::string write(const std::string& name, const std::string& text) const {
    const fs::path p = m_path / name;
    std::ofstream(p) << text;
    return p.string();
  }
  const fs::path& path() const { return m_path; }

 private:
  static int& counter() {
    static int c = 0;
    return c;
  }
  fs::path m_path;
};

// Expects \p f to throw moka::Error whose message contains every string in \p parts.
template <class F>
void expect_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "expected moka::Error";
  } catch (const moka::Error& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "missing '" << p << "' in: " << msg;
  }
}

}  // namespace

TEST(InputDeck, ParsesTypesListsStringsAndComments) {
  TempDir dir;
  const auto path = dir.write("a.deck",
                              "# header comment\n"
                              "moe.num_experts = 16   # trailing comment\n"
                              "  train.lr=3e-4\n"
                              "train.steps = 100\n"
                              "run.name = \"a name # with hash\"\n"
                              "gate.noisy = yes\n"
                              "model.widths = 64 128 256\n"
                              "\n");
  moka::InputDeck d = moka::InputDeck::parse_file(path);
  d.validate(schema());
  EXPECT_EQ(d.get<int>("moe.num_experts"), 16);
  EXPECT_DOUBLE_EQ(d.get<double>("train.lr"), 3e-4);
  EXPECT_EQ(d.get<long>("train.steps"), 100);
  EXPECT_EQ(d.get<std::string>("run.name"), "a name # with hash");
  EXPECT_TRUE(d.get<bool>("gate.noisy"));
  EXPECT_EQ(d.get_list<int>("model.widths"), (std::vector<int>{64, 128, 256}));
  // Defaults from the schema where the deck is silent.
  EXPECT_EQ(d.get<int>("moe.top_k"), 2);
  EXPECT_EQ(d.get<std::string>("gate.type"), "topk");
  EXPECT_EQ(d.find("moe.num_experts")->where(), path + ":2");
}

TEST(InputDeck, EscapedQuotes) {
  auto d = moka::InputDeck::parse_string("run.name = \"say \\\"hi\\\" \\\\ ok\"\ntrain.steps=1\n");
  d.validate(schema());
  EXPECT_EQ(d.get<std::string>("run.name"), "say \"hi\" \\ ok");
}

TEST(InputDeck, CommandLineOverridesWin) {
  TempDir dir;
  const auto path = dir.write("a.deck", "moe.top_k = 2\ntrain.steps = 10\n");
  auto d = moka::InputDeck::parse_file(path);
  d.apply_overrides({"moe.top_k=4", "gate.type=gshard", "moe.top_k=3", "model.widths=1 2"});
  d.validate(schema());
  EXPECT_EQ(d.get<int>("moe.top_k"), 3);  // later argument wins over earlier and over the file
  EXPECT_EQ(d.get<std::string>("gate.type"), "gshard");
  EXPECT_EQ(d.get_list<int>("model.widths"), (std::vector<int>{1, 2}));
  EXPECT_EQ(d.find("moe.top_k")->where(), "command line argument 3");
  const std::string table = d.resolved_table();
  EXPECT_NE(table.find("command line argument 3"), std::string::npos) << table;
  EXPECT_NE(table.find(path + ":2"), std::string::npos) << table;
  EXPECT_NE(table.find("default"), std::string::npos) << table;
  expect_error([&] { d.apply_overrides({"moe.top_k"}); }, {"command line argument 1", "not of the form key=value"});
  expect_error([&] { d.apply_overrides({"1bad=3"}); }, {"invalid key name '1bad'"});
  expect_error([&] { d.apply_overrides({"moe.top_k="}); }, {"has no value"});
}

TEST(InputDeck, Includes) {
  TempDir dir;
  fs::create_directories(dir.path() / "sub");
  dir.write("sub/common.deck", "moe.num_experts = 32\ninclude \"more.deck\"\n");
  dir.write("sub/more.deck", "gate.type = switch\n");
  const auto path = dir.write("main.deck", "include \"sub/common.deck\"\ntrain.steps = 5\n");
  auto d = moka::InputDeck::parse_file(path);
  d.validate(schema());
  EXPECT_EQ(d.get<int>("moe.num_experts"), 32);
  EXPECT_EQ(d.get<std::string>("gate.type"), "switch");
  EXPECT_NE(d.find("gate.type")->file.find("more.deck"), std::string::npos);
}

TEST(InputDeck, ByteOrderMarkIsSkipped) {
  TempDir dir;
  const auto path = dir.write("bom.deck", "\xEF\xBB\xBFrun.name = bom\ntrain.steps = 3\n");
  auto d = moka::InputDeck::parse_file(path);
  d.validate(schema());
  EXPECT_EQ(d.get<std::string>("run.name"), "bom");
}

TEST(InputDeck, OversizedDeckIsAnError) {
  // /dev/zero never ends: the reader stops at the limit and names the file.
  expect_error([] { moka::InputDeck::parse_file("/dev/zero"); },
               {"input deck: '/dev/zero' is larger than 16 MB: not an input deck"});
  TempDir dir;
  const auto big = dir.write("big.deck", std::string(moka::InputDeck::max_deck_bytes + 1, '#'));
  const auto main = dir.write("main.deck", "train.steps = 1\ninclude \"big.deck\"\n");
  expect_error([&] { moka::InputDeck::parse_file(main); }, {"main.deck:2", "included deck '", "big.deck' is larger"});
}

TEST(InputDeck, MalformedDecksNameFileAndLine) {
  TempDir dir;
  auto parse = [&](const std::string& text) {
    const auto p = dir.write("bad.deck", text);
    return [p] { moka::InputDeck::parse_file(p); };
  };
  expect_error(parse("train.steps = 1\nmoe.top_k 2\n"), {"bad.deck:2", "found no '='"});
  expect_error(parse("run.name = \"unterminated\n"), {"bad.deck:1", "unterminated string"});
  expect_error(parse("train.steps = 1\n\n = 3\n"), {"bad.deck:3", "missing key"});
  expect_error(parse("moe..top_k = 3\n"), {"bad.deck:1", "invalid key name 'moe..top_k'"});
  expect_error(parse("moe.top_k =   # nothing\n"), {"bad.deck:1", "has no value"});
  expect_error(parse("moe.top_k = 2\nmoe.top_k = 3\n"), {"bad.deck:2", "duplicate key 'moe.top_k'", "bad.deck:1"});
  expect_error(parse("run.name = \"a\"b\n"), {"bad.deck:1", "after closing quote"});
  expect_error(parse("include \"missing.deck\"\n"), {"bad.deck:1", "cannot open included deck", "missing.deck"});
  expect_error([&] { moka::InputDeck::parse_file((dir.path() / "nope.deck").string()); },
               {"cannot open", "nope.deck"});
}

TEST(InputDeck, IncludeLoopIsAnError) {
  TempDir dir;
  dir.write("a.deck", "train.steps = 1\ninclude \"b.deck\"\n");
  dir.write("b.deck", "\ninclude \"a.deck\"\n");
  expect_error([&] { moka::InputDeck::parse_file((dir.path() / "a.deck").string()); },
               {"b.deck:2", "include loop", "a.deck -> ", "b.deck -> "});
  dir.write("self.deck", "include \"self.deck\"\n");
  expect_error([&] { moka::InputDeck::parse_file((dir.path() / "self.deck").string()); },
               {"self.deck:1", "include loop"});
}

TEST(InputDeck, DuplicateAcrossIncludes) {
  TempDir dir;
  dir.write("inc.deck", "moe.top_k = 1\n");
  const auto p = dir.write("main.deck", "moe.top_k = 2\ninclude \"inc.deck\"\n");
  expect_error([&] { moka::InputDeck::parse_file(p); }, {"inc.deck:1", "duplicate key 'moe.top_k'", "main.deck:1"});
}

TEST(InputDeck, ValidationReportsEveryProblem) {
  TempDir dir;
  const auto p = dir.write("v.deck",
                           "moe.num_expert = 8\n"        // typo
                           "moe.top_k = two\n"           // bad int
                           "train.lr = 1e-3x\n"          // bad float
                           "gate.type = expert_choice\n" // not a choice
                           "gate.noisy = maybe\n"        // bad bool
                           "moe.num_experts = 0\n"       // below min
                           "run.name = a b\n"            // two values for a scalar
                           "totally.unrelated = 1\n");   // no suggestion
  auto d = moka::InputDeck::parse_file(p);
  try {
    d.validate(schema());
    FAIL() << "no throw";
  } catch (const moka::Error& e) {
    const std::string m = e.what();
    for (const char* part :
         {"v.deck:1: unknown key 'moe.num_expert' (did you mean 'moe.num_experts'?)",
          "v.deck:2: moe.top_k = 'two' is not an integer", "v.deck:3: train.lr = '1e-3x' is not a number",
          "v.deck:4: gate.type = 'expert_choice' is not one of: topk gshard switch",
          "v.deck:5: gate.noisy = 'maybe' is not a boolean", "v.deck:6: moe.num_experts = 0 is below the minimum 1",
          "v.deck:7: run.name takes one value, got 2", "v.deck:8: unknown key 'totally.unrelated'",
          "missing required key 'train.steps' (number of steps)"}) {
      EXPECT_NE(m.find(part), std::string::npos) << "missing: " << part << "\nin: " << m;
    }
    EXPECT_EQ(m.find("totally.unrelated' (did you mean"), std::string::npos) << m;
  }
}

TEST(InputDeck, NumbersOutOfRange) {
  auto d = moka::InputDeck::parse_string("train.steps = 99999999999999999999999\ntrain.lr = 1e999\n", "r.deck");
  expect_error([&] { d.validate(schema()); }, {"r.deck:1", "out of range", "r.deck:2", "not a finite number"});
  auto d2 = moka::InputDeck::parse_string("train.steps = 5000000000\n", "i.deck");
  d2.validate(schema());
  EXPECT_EQ(d2.get<long>("train.steps"), 5000000000L);
  expect_error([&] { d2.get<int>("train.steps"); }, {"does not fit in an int"});
}

TEST(InputDeck, GettersWithoutSchema) {
  auto d = moka::InputDeck::parse_string("a.b = 3\n", "g.deck");
  EXPECT_EQ(d.get<int>("a.b"), 3);
  EXPECT_EQ(d.get<int>("a.c", 7), 7);
  expect_error([&] { d.get<int>("a.c"); }, {"missing required key 'a.c'"});
  expect_error([&] { d.get<bool>("a.b"); }, {"g.deck:1", "not a boolean"});
}

TEST(InputDeck, UndeclaredKeyAfterValidationIsProgrammingError) {
  auto d = moka::InputDeck::parse_string("train.steps = 3\n");
  d.validate(schema());
  expect_error([&] { d.get<int>("not.declared"); }, {"not declared in the deck schema"});
}

TEST(InputDeck, SerializeRoundTrip) {
  auto d = moka::InputDeck::parse_string("run.name = \"with space\"\nmodel.widths = 1 2 3\ntrain.steps=4\n", "s.deck");
  d.apply_overrides({"moe.top_k=5"});
  auto e = moka::InputDeck::deserialize(d.serialize());
  ASSERT_EQ(e.entries().size(), d.entries().size());
  for (std::size_t i = 0; i < e.entries().size(); ++i) {
    EXPECT_EQ(e.entries()[i].key, d.entries()[i].key);
    EXPECT_EQ(e.entries()[i].values, d.entries()[i].values);
    EXPECT_EQ(e.entries()[i].where(), d.entries()[i].where());
  }
  expect_error([&] { moka::InputDeck::deserialize(std::string("x\0" "3\0", 4)); }, {"truncated"});
}

TEST(DeckSchema, RejectsBadDeclarationsAndWritesReference) {
  moka::DeckSchema s;
  s.add("a.b", moka::DeckType::integer).set_default("1").set_doc("thing");
  EXPECT_THROW(s.add("a.b", moka::DeckType::integer), moka::Error);
  EXPECT_THROW(s.add("a b", moka::DeckType::integer), moka::Error);
  EXPECT_EQ(s.suggest("a.c"), "a.b");
  EXPECT_EQ(s.suggest("completely.different.name"), "");
  const std::string md = s.markdown();
  EXPECT_NE(md.find("| `a.b` | int | `1` | thing |"), std::string::npos) << md;
}

TEST(InputDeck, ExampleDecksValidate) {
  // Every deck shipped in input_decks/ must validate against the driver schema.
  int n = 0;
  for (const auto& entry : fs::directory_iterator(fs::path(MOKA_SOURCE_DIR) / "input_decks")) {
    if (entry.path().extension() != ".deck") continue;
    auto d = moka::InputDeck::parse_file(entry.path().string());
    const std::string name = entry.path().filename().string();
    const bool bench  = name.rfind("bench_", 0) == 0 || name.rfind("calibrate_", 0) == 0;
    const bool replay = name.rfind("replay", 0) == 0, plan = name.rfind("plan_", 0) == 0;
    EXPECT_NO_THROW(d.validate(bench    ? moka::bench_schema()
                               : replay ? moka::replay_schema()
                               : plan   ? moka::plan_schema()
                                        : moka::train_schema()))
        << entry.path();
    ++n;
  }
  EXPECT_GE(n, 1);
}

TEST(InputDeck, DocumentedReferenceMatchesSchema) {
  // docs/input-decks.md carries the output of `moka-train --deck-reference`.
  std::ifstream f(fs::path(MOKA_SOURCE_DIR) / "docs" / "input-decks.md");
  ASSERT_TRUE(f) << "docs/input-decks.md missing";
  std::stringstream ss;
  ss << f.rdbuf();
  const std::string doc = ss.str();
  const std::string begin = "<!-- deck-reference:begin -->\n", end = "<!-- deck-reference:end -->";
  const auto b = doc.find(begin), e = doc.find(end);
  ASSERT_NE(b, std::string::npos);
  ASSERT_NE(e, std::string::npos);
  EXPECT_EQ(doc.substr(b + begin.size(), e - b - begin.size()), moka::train_schema().markdown())
      << "regenerate the table with: moka-train --deck-reference";
}
