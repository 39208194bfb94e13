#include <moka/core/Core.hpp>

#include <gtest/gtest.h>

namespace moka_test {
struct Widget {
  void check(int k) const { MOKA_REQUIRE(k > 0, "k = ", k, " must be positive"); }
  template <class T>
  T twice(T v) const {
    MOKA_REQUIRE(v < T(100), "v = ", v, " too large");
    return 2 * v;
  }
};
}  // namespace moka_test

TEST(Error, FunctionNameIsQualified) {
  EXPECT_EQ(moka::impl::function_name("void moka::InputDeck::validate(const moka::DeckSchema&) const"),
            "moka::InputDeck::validate");
  EXPECT_EQ(moka::impl::function_name("T ns::A<T>::f(T) const [with T = int]"), "ns::A<T>::f");
  EXPECT_EQ(moka::impl::function_name("int main()"), "main");
  EXPECT_EQ(moka::impl::function_name("void ns::F::operator()(int) const"), "ns::F::operator()");
}

TEST(Error, RequireNamesFunctionAndValue) {
  moka_test::Widget w;
  try {
    w.check(-3);
    FAIL() << "no throw";
  } catch (const moka::Error& e) {
    EXPECT_STREQ(e.what(), "moka_test::Widget::check: k = -3 must be positive");
  }
  EXPECT_NO_THROW(w.check(1));
  try {
    w.twice(500);
    FAIL() << "no throw";
  } catch (const moka::Error& e) {
    EXPECT_EQ(std::string(e.what()).rfind("moka_test::Widget::twice: v = 500 too large", 0), 0u) << e.what();
  }
}

TEST(Error, RequireExtentNamesLabel) {
  moka::Matrix<float, Kokkos::HostSpace> x("x", 4, 512);
  try {
    moka::require_extent("moka::MoELayer::forward", x, 1, 1024, "columns");
    FAIL() << "no throw";
  } catch (const moka::Error& e) {
    EXPECT_STREQ(e.what(), "moka::MoELayer::forward: 'x' has 512 columns, expected 1024 (x)");
  }
  EXPECT_NO_THROW(moka::require_extent("f", x, 0, 4, "rows"));
}

TEST(Error, IsRuntimeError) {
  EXPECT_THROW(moka::precision_from_string("fp16"), std::runtime_error);
  try {
    moka::precision_from_string("fp16");
  } catch (const moka::Error& e) {
    EXPECT_NE(std::string(e.what()).find("moka::precision_from_string: unknown precision 'fp16'"), std::string::npos)
        << e.what();
  }
  EXPECT_EQ(moka::precision_from_string("bf16"), moka::Precision::bf16);
  EXPECT_EQ(moka::to_string(moka::Precision::fp32), "fp32");
}
