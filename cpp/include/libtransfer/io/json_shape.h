// A pre-pass over a JSON text that builds nothing: how deep it nests and how many members its
// largest object has. Parsers run it before building a tree, so that hostile nesting (the
// serializer recurses) and huge objects are refused in linear time and constant memory.
//
// Why not nlohmann's parser callback, the other way to refuse deep nesting while parsing: after
// every nested object it rescans the parent container, O(n^2) for n sibling objects (a 1 MB line
// of "{}," took seconds, a 64 MB one would take days); and ordered_json inserts are linear too.
#pragma once

#include <cstddef>
#include <string_view>

namespace libtransfer::io {

// What json_shape measured. `valid` is false for text that is not JSON (the parse that follows
// reports why); measuring stops early, with `exceeded` set, once a limit is passed.
struct JsonShape {
  bool valid = true;
  bool exceeded = false;
  std::size_t depth = 0;           // most containers open at once (0 for a scalar)
  std::size_t largest_object = 0;  // most members of one object
};

// Measures `text`, stopping once the depth passes `max_depth` or an object passes `max_members`.
// Costs one linear pass; memory grows with the depth only (at most max_depth + 1 counters).
JsonShape json_shape(std::string_view text, std::size_t max_depth, std::size_t max_members);

}  // namespace libtransfer::io
