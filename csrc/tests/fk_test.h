// A minimal test harness for the host unit tests (no external dependency).
//
//   FK_TEST(name) { FK_CHECK(cond); FK_CHECK_NEAR(a, b, tol); ... }
//   int main() { return fk_test::run_all(); }
//
// Every check that fails prints file:line and the values, and the test
// executable exits non-zero, which is what ctest counts.
#pragma once

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace fk_test {

struct Case {
  const char* name;
  std::function<void()> fn;
};

inline std::vector<Case>& registry() {
  static std::vector<Case> cases;
  return cases;
}

inline int& failures() {
  static int n = 0;
  return n;
}

struct Register {
  Register(const char* name, std::function<void()> fn) { registry().push_back({name, std::move(fn)}); }
};

inline void fail(const char* file, int line, const std::string& what) {
  ++failures();
  std::fprintf(stderr, "  FAIL %s:%d: %s\n", file, line, what.c_str());
}

// |a - b| <= tol, with NaN never near anything and equal infinities near.
inline bool near(double a, double b, double tol) {
  if (std::isnan(a) || std::isnan(b)) return false;
  if (std::isinf(a) || std::isinf(b)) return a == b;
  return std::fabs(a - b) <= tol;
}

inline int run_all() {
  int failed_cases = 0;
  for (const Case& c : registry()) {
    const int before = failures();
    c.fn();
    const bool ok = failures() == before;
    failed_cases += ok ? 0 : 1;
    std::printf("[%s] %s\n", ok ? " OK " : "FAIL", c.name);
  }
  std::printf("%zu cases, %d failed\n", registry().size(), failed_cases);
  return failed_cases == 0 ? 0 : 1;
}

}  // namespace fk_test

#define FK_TEST(name)                                                  \
  static void name();                                                  \
  static ::fk_test::Register fk_register_##name(#name, &name);         \
  static void name()

#define FK_CHECK(cond)                                                 \
  do {                                                                 \
    if (!(cond)) ::fk_test::fail(__FILE__, __LINE__, "CHECK(" #cond ")"); \
  } while (0)

#define FK_CHECK_EQ_U32(a, b)                                                              \
  do {                                                                                     \
    const unsigned long fk_a_ = static_cast<unsigned long>(a);                             \
    const unsigned long fk_b_ = static_cast<unsigned long>(b);                             \
    if (fk_a_ != fk_b_) {                                                                  \
      char fk_buf_[160];                                                                   \
      std::snprintf(fk_buf_, sizeof fk_buf_, "%s == %s: 0x%08lx != 0x%08lx", #a, #b, fk_a_, fk_b_); \
      ::fk_test::fail(__FILE__, __LINE__, fk_buf_);                                        \
    }                                                                                      \
  } while (0)

#define FK_CHECK_NEAR(a, b, tol)                                                           \
  do {                                                                                     \
    const double fk_a_ = static_cast<double>(a);                                           \
    const double fk_b_ = static_cast<double>(b);                                           \
    if (!::fk_test::near(fk_a_, fk_b_, (tol))) {                                           \
      char fk_buf_[256];                                                                   \
      std::snprintf(fk_buf_, sizeof fk_buf_, "%s ~ %s: %.17g vs %.17g (tol %.3g)", #a, #b, fk_a_, fk_b_, \
                    static_cast<double>(tol));                                             \
      ::fk_test::fail(__FILE__, __LINE__, fk_buf_);                                        \
    }                                                                                      \
  } while (0)

// Relative closeness: |a - b| <= rtol * |b|.
#define FK_CHECK_REL(a, b, rtol) FK_CHECK_NEAR(a, b, (rtol) * std::fabs(static_cast<double>(b)))
