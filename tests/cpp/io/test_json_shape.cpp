// Tests of the JSON shape pre-pass (io/json_shape.h): depth and object sizes counted by hand on
// small texts, early stops at the limits, invalid text, and linear time on a million siblings.
#include <catch2/catch.hpp>
#include <chrono>
#include <limits>
#include <string>

#include "libtransfer/io/json_shape.h"

namespace {

using libtransfer::io::json_shape;
constexpr std::size_t kNoLimit = std::numeric_limits<std::size_t>::max();

}  // namespace

TEST_CASE("json_shape counts nesting depth and the largest object", "[io][json_shape]") {
  const auto scalar = json_shape("42", kNoLimit, kNoLimit);
  CHECK(scalar.valid);
  CHECK(scalar.depth == 0);
  const auto nested = json_shape(R"({"a": [1, {"b": 2, "c": [[]]}], "d": {}})", kNoLimit, kNoLimit);
  CHECK(nested.valid);
  CHECK_FALSE(nested.exceeded);
  CHECK(nested.depth == 5);  // object, array, object, array, array
  CHECK(nested.largest_object == 2);
}

TEST_CASE("json_shape stops at the depth and member limits", "[io][json_shape]") {
  CHECK_FALSE(json_shape("[[[]]]", 3, kNoLimit).exceeded);
  CHECK(json_shape("[[[[]]]]", 3, kNoLimit).exceeded);
  CHECK_FALSE(json_shape(R"({"a":1,"b":2})", kNoLimit, 2).exceeded);
  const auto wide = json_shape(R"({"a":1,"b":2,"c":3})", kNoLimit, 2);
  CHECK(wide.exceeded);
  CHECK(wide.depth == 1);
  // A million '[' stop at the limit: nothing grows with the input.
  CHECK(json_shape(std::string(1'000'000, '['), 64, kNoLimit).exceeded);
}

TEST_CASE("json_shape marks invalid text", "[io][json_shape]") {
  CHECK_FALSE(json_shape("{\"a\": }", kNoLimit, kNoLimit).valid);
  CHECK_FALSE(json_shape("[1, 2", kNoLimit, kNoLimit).valid);
  CHECK_FALSE(json_shape("", kNoLimit, kNoLimit).valid);
}

TEST_CASE("json_shape is linear in sibling objects", "[io][json_shape]") {
  std::string text = "[";
  for (int i = 0; i < 1'000'000; ++i) text += i > 0 ? ",{}" : "{}";
  text += "]";
  const auto start = std::chrono::steady_clock::now();
  const auto shape = json_shape(text, kNoLimit, kNoLimit);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK(shape.valid);
  CHECK(shape.depth == 2);
  // A parser callback would rescan the array after each object (hours); this takes well under a
  // second (generous bound: sanitizer builds are slower).
  CHECK(seconds < 30.0);
}
