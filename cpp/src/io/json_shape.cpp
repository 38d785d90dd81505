#include "libtransfer/io/json_shape.h"

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace libtransfer::io {
namespace {

using Json = nlohmann::json;

// Counts containers and object members; returns false (stopping the parse) past a limit.
class ShapeCounter : public nlohmann::json_sax<Json> {
 public:
  ShapeCounter(std::size_t max_depth, std::size_t max_members)
      : max_depth_(max_depth), max_members_(max_members) {}

  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override { return open(); }
  bool start_array(std::size_t) override { return open(); }
  bool end_object() override { return close(); }
  bool end_array() override { return close(); }
  bool key(string_t&) override {
    const std::size_t members = ++members_.back();
    if (members > shape.largest_object) shape.largest_object = members;
    if (members > max_members_) shape.exceeded = true;
    return !shape.exceeded;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override {
    shape.valid = false;
    return false;
  }

  JsonShape shape;

 private:
  bool open() {
    members_.push_back(0);
    if (members_.size() > shape.depth) shape.depth = members_.size();
    if (members_.size() > max_depth_) shape.exceeded = true;
    return !shape.exceeded;
  }
  bool close() {
    members_.pop_back();
    return true;
  }

  std::size_t max_depth_;
  std::size_t max_members_;
  std::vector<std::size_t> members_;  // per open container (arrays keep 0)
};

}  // namespace

JsonShape json_shape(std::string_view text, std::size_t max_depth, std::size_t max_members) {
  ShapeCounter counter(max_depth, max_members);
  Json::sax_parse(text.data(), text.data() + text.size(), &counter);
  return counter.shape;
}

}  // namespace libtransfer::io
