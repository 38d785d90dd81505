// Unit groups of the weight test: layout detection, explicit groups, unit matrices.
#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "libtransfer/detect/grouping.h"
#include "libtransfer/errors.h"

using namespace libtransfer;
using namespace libtransfer::detect;

namespace {

TensorMeta meta(const std::string& name, std::vector<std::int64_t> shape) {
  return {name, std::move(shape), "F32", true};
}

std::vector<TensorMeta> transformer_listing(const std::string& p, std::int64_t d,
                                            std::int64_t kv_rows, std::int64_t d_mlp,
                                            bool builtin) {
  std::vector<TensorMeta> t;
  t.push_back(meta(builtin ? "embed.weight" : p + "embed_tokens.weight", {50, d}));
  for (int i = 0; i < 2; ++i) {
    const std::string l = p + "layers." + std::to_string(i) + ".";
    if (builtin) {
      t.push_back(meta(l + "attn_norm.weight", {d}));
      t.push_back(meta(l + "attn.q.weight", {d, d}));
      t.push_back(meta(l + "attn.k.weight", {kv_rows, d}));
      t.push_back(meta(l + "attn.v.weight", {kv_rows, d}));
      t.push_back(meta(l + "attn.o.weight", {d, d}));
      t.push_back(meta(l + "mlp_norm.weight", {d}));
      t.push_back(meta(l + "mlp.gate.weight", {d_mlp, d}));
      t.push_back(meta(l + "mlp.up.weight", {d_mlp, d}));
      t.push_back(meta(l + "mlp.down.weight", {d, d_mlp}));
    } else {
      t.push_back(meta(l + "input_layernorm.weight", {d}));
      t.push_back(meta(l + "self_attn.q_proj.weight", {d, d}));
      t.push_back(meta(l + "self_attn.q_proj.bias", {d}));
      t.push_back(meta(l + "self_attn.k_proj.weight", {kv_rows, d}));
      t.push_back(meta(l + "self_attn.v_proj.weight", {kv_rows, d}));
      t.push_back(meta(l + "self_attn.o_proj.weight", {d, d}));
      t.push_back(meta(l + "post_attention_layernorm.weight", {d}));
      t.push_back(meta(l + "mlp.gate_proj.weight", {d_mlp, d}));
      t.push_back(meta(l + "mlp.up_proj.weight", {d_mlp, d}));
      t.push_back(meta(l + "mlp.down_proj.weight", {d, d_mlp}));
    }
  }
  t.push_back(meta(builtin ? "final_norm.weight" : p + "norm.weight", {d}));
  t.push_back(meta(builtin ? "head.weight" : "lm_head.weight", {50, d}));
  return t;
}

}  // namespace

TEST_CASE("natural order compares digit runs as numbers", "[detect][grouping]") {
  CHECK(natural_less("layers.2.weight", "layers.10.weight"));
  CHECK_FALSE(natural_less("layers.10.weight", "layers.2.weight"));
  CHECK(natural_less("a", "b"));
  CHECK(natural_less("layer", "layer.1"));
  CHECK_FALSE(natural_less("x1", "x1"));
}

TEST_CASE("MLP chains are detected in listing or natural order", "[detect][grouping]") {
  SECTION("our MLP, names out of order as a safetensors file lists them") {
    std::vector<TensorMeta> t;
    // 11 layers listed lexicographically: layers.0, layers.1, layers.10, layers.2, ...
    std::vector<std::string> names;
    for (int i = 0; i < 11; ++i) names.push_back("layers." + std::to_string(i));
    std::sort(names.begin(), names.end());
    for (const auto& n : names) {
      const int i = std::stoi(n.substr(7));
      t.push_back(meta(n + ".weight", {10 + i + 1, 10 + i}));
      t.push_back(meta(n + ".bias", {10 + i + 1}));
    }
    const auto layout = detect_layout(t, {});
    CHECK(layout.architecture == "mlp_chain");
    REQUIRE(layout.groups.size() == 10);
    CHECK(layout.groups[9].name == "layers.9");
    CHECK(layout.groups[9].units == 20);
    REQUIRE(layout.groups[9].members.size() == 3);
    CHECK(layout.groups[9].members[0].tensor == "layers.9.weight");
    CHECK(layout.groups[9].members[1].tensor == "layers.9.bias");
    CHECK(layout.groups[9].members[2].tensor == "layers.10.weight");
    CHECK(layout.groups[9].members[2].axis == 1);
  }
  SECTION("nn.Sequential names") {
    const std::vector<TensorMeta> t = {meta("0.weight", {16, 20}), meta("0.bias", {16}),
                                       meta("2.weight", {8, 16}), meta("2.bias", {8}),
                                       meta("4.weight", {5, 8})};
    const auto layout = detect_layout(t, {});
    REQUIRE(layout.groups.size() == 2);
    CHECK(layout.groups[0].name == "0");
    CHECK(layout.groups[1].units == 8);
    CHECK(layout.groups[1].members.back().tensor == "4.weight");
  }
  SECTION("one-unit layers are skipped with a note") {
    const std::vector<TensorMeta> t = {meta("a.weight", {1, 4}), meta("b.weight", {3, 1})};
    const auto layout = detect_layout(t, {});
    REQUIRE(layout.groups.size() == 1);
    CHECK_THAT(layout.groups[0].skip_reason, Catch::Contains("1 unit"));
  }
}

TEST_CASE("layouts that cannot be tested are refused clearly", "[detect][grouping]") {
  CHECK_THROWS_WITH(detect_layout({meta("scale", {4})}, {}), Catch::Contains("no 2-D floating"));
  CHECK_THROWS_WITH(detect_layout({meta("w.weight", {4, 3})}, {}),
                    Catch::Contains("single 2-D weight"));
  CHECK_THROWS_WITH(detect_layout({meta("a.weight", {4, 3}), meta("b.weight", {4, 5})}, {}),
                    Catch::Contains("explicit groups") && Catch::Contains("b.weight [4, 5]"));
  TensorMeta ints = meta("ids", {3, 3});
  ints.floating = false;
  CHECK_THROWS_AS(detect_layout({ints}, {}), InvalidInput);
}

TEST_CASE("our transformer: heads from n_heads, metadata JSON, or skipped", "[detect][grouping]") {
  const auto t = transformer_listing("", 16, 16, 24, true);
  SECTION("n_heads option") {
    const auto layout = detect_layout(t, {}, LayoutOptions{4});
    CHECK(layout.architecture == "transformer");
    REQUIRE(layout.groups.size() == 4);
    CHECK(layout.groups[0].name == "layers.0.attn.heads");
    CHECK(layout.groups[0].kind == "attention_heads");
    CHECK(layout.groups[0].units == 4);
    CHECK(layout.groups[0].members.size() == 4);
    CHECK(layout.groups[0].members[3].tensor == "layers.0.attn.o.weight");
    CHECK(layout.groups[0].members[3].axis == 1);
    CHECK(layout.groups[1].name == "layers.0.mlp");
    CHECK(layout.groups[1].kind == "glu_hidden");
    CHECK(layout.groups[1].units == 24);
    // Residual: embedding first, every residual axis listed once.
    CHECK(layout.residual.members.front().tensor == "embed.weight");
    CHECK(layout.residual.units == 16);
    CHECK(layout.residual.members.size() == 1 + 2 * 9 + 2);
  }
  SECTION("metadata as save_model writes it") {
    const auto layout =
        detect_layout(t, {{"libtransfer.config", R"({"n_heads": 2, "d_model": 16})"}});
    CHECK(layout.groups[0].units == 2);
  }
  SECTION("unknown head count: attention skipped, MLP still tested") {
    const auto layout = detect_layout(t, {});
    CHECK_THAT(layout.groups[0].skip_reason, Catch::Contains("pass n_heads"));
    CHECK(layout.groups[1].skip_reason.empty());
  }
  SECTION("a head count that does not divide the projection") {
    CHECK_THROWS_WITH(detect_layout(t, {}, LayoutOptions{3}), Catch::Contains("does not divide"));
  }
}

TEST_CASE("Hugging Face names with grouped-query attention", "[detect][grouping]") {
  // d = 16, 4 query heads of size 4, 2 key/value heads (k, v have 8 rows).
  auto t = transformer_listing("model.", 16, 8, 24, false);
  const auto layout = detect_layout(t, {{"num_attention_heads", "4"}});
  CHECK(layout.architecture == "hf_transformer");
  REQUIRE(layout.groups.size() == 4);
  CHECK(layout.groups[0].name == "model.layers.0.self_attn.heads");
  CHECK(layout.groups[0].units == 2);  // one unit per key/value head
  // q bias joins its heads
  bool has_bias = false;
  for (const auto& m : layout.groups[0].members)
    has_bias |= m.tensor.find("q_proj.bias") != std::string::npos;
  CHECK(has_bias);
  CHECK(layout.residual.members.front().tensor == "model.embed_tokens.weight");
  CHECK(layout.residual.members.back().tensor == "lm_head.weight");

  SECTION("head size from Qwen3's q_norm") {
    t.push_back(meta("model.layers.0.self_attn.q_norm.weight", {4}));
    t.push_back(meta("model.layers.1.self_attn.q_norm.weight", {4}));
    const auto from_norm = detect_layout(t, {});
    CHECK(from_norm.groups[0].units == 2);
    CHECK(from_norm.groups[0].skip_reason.empty());
  }
}

TEST_CASE("explicit groups are validated", "[detect][grouping]") {
  const std::vector<TensorMeta> t = {meta("fc1.weight", {6, 4}), meta("fc1.bias", {6}),
                                     meta("fc2.weight", {3, 6})};
  UnitGroup g{"hidden", "", 0, {{"fc1.weight", 0}, {"fc1.bias", -1}, {"fc2.weight", -1}}, ""};
  const auto layout = explicit_layout({g}, t);
  CHECK(layout.groups[0].units == 6);
  CHECK(layout.groups[0].kind == "custom");
  CHECK(layout.groups[0].members[1].axis == 0);
  CHECK(layout.groups[0].members[2].axis == 1);

  CHECK_THROWS_WITH(explicit_layout({UnitGroup{"x", "", 0, {{"nope", 0}}, ""}}, t),
                    Catch::Contains("no tensor 'nope'"));
  CHECK_THROWS_WITH(explicit_layout({UnitGroup{"x", "", 0, {{"fc1.weight", 2}}, ""}}, t),
                    Catch::Contains("axis 2 is out of range"));
  CHECK_THROWS_WITH(explicit_layout({UnitGroup{"x", "", 4, {{"fc1.weight", 0}}, ""}}, t),
                    Catch::Contains("not a positive multiple"));
  CHECK_THROWS_WITH(explicit_layout({UnitGroup{"x", "", 0, {}, ""}}, t),
                    Catch::Contains("at least one member"));
  CHECK_THROWS_AS(explicit_layout({}, t), InvalidInput);
}

TEST_CASE("unit matrices and unit permutations slice blocks along the axis", "[detect][grouping]") {
  torch::manual_seed(0);
  const auto q = torch::randn({6, 4});  // 3 heads of 2 rows
  const auto o = torch::randn({4, 6});  // 3 heads of 2 columns
  std::map<std::string, torch::Tensor> tensors = {{"q", q}, {"o", o}};
  const UnitGroup heads{"heads", "attention_heads", 3, {{"q", 0}, {"o", 1}}, ""};
  const auto units = unit_matrix(heads, tensors);
  REQUIRE(units.sizes() == torch::IntArrayRef({3, 16}));
  // Head 1 = rows 2..3 of q (flattened) then columns 2..3 of o (transposed, flattened).
  const auto expected =
      torch::cat({q.slice(0, 2, 4).reshape({-1}), o.slice(1, 2, 4).t().reshape({-1})});
  CHECK(torch::equal(units[1], expected));

  const auto perm = torch::tensor({2, 0, 1}, torch::kLong);
  permute_units(heads, perm, tensors);
  CHECK(torch::equal(tensors["q"].slice(0, 0, 2), q.slice(0, 4, 6)));
  CHECK(torch::equal(tensors["o"].slice(1, 2, 4), o.slice(1, 0, 2)));
  // Permuting then reading units equals reading units then permuting rows.
  CHECK(torch::equal(unit_matrix(heads, tensors), units.index_select(0, perm)));
}
