// Unit groups of the weight test: layout detection, explicit groups, unit matrices (grouping.h).
#include "libtransfer/detect/grouping.h"

#include <torch/torch.h>

#include <algorithm>
#include <cctype>
#include <nlohmann/json.hpp>
#include <optional>
#include <regex>
#include <set>
#include <sstream>
#include <utility>

#include "libtransfer/errors.h"

namespace libtransfer::detect {
namespace {

using Listing = std::vector<TensorMeta>;

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::ostringstream out;
  out << "[";
  for (std::size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << "]";
  return out.str();
}

const TensorMeta* find(const Listing& tensors, const std::string& name) {
  for (const auto& t : tensors) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

// Adds (name, axis) when the tensor exists; returns whether it did.
bool add_if_present(const Listing& tensors, std::vector<GroupMember>& members,
                    const std::string& name, std::int64_t axis) {
  if (find(tensors, name) == nullptr) return false;
  members.push_back({name, axis});
  return true;
}

const TensorMeta& require(const Listing& tensors, const std::string& name, const std::string& why) {
  const TensorMeta* t = find(tensors, name);
  if (t == nullptr) {
    throw InvalidInput("model has no tensor '" + name + "', which " + why +
                       " needs; pass explicit groups for other layouts");
  }
  return *t;
}

// Tensor names of one transformer family.
struct TransformerNaming {
  std::string architecture;
  std::string prefix;      // before "layers.<i>." ("" or "model.")
  std::string attn_group;  // group name suffix after "layers.<i>."
  std::string q, k, v, o, gate, up, down, attn_norm, mlp_norm, q_norm, k_norm;
  std::string embed, pos, final_norm, head;
};

TransformerNaming builtin_naming() {
  return {"transformer",
          "",
          "attn.heads",
          "attn.q",
          "attn.k",
          "attn.v",
          "attn.o",
          "mlp.gate",
          "mlp.up",
          "mlp.down",
          "attn_norm",
          "mlp_norm",
          "attn.q_norm",
          "attn.k_norm",
          "embed.weight",
          "pos.weight",
          "final_norm.weight",
          "head.weight"};
}

TransformerNaming hf_naming(const std::string& prefix) {
  return {"hf_transformer",
          prefix,
          "self_attn.heads",
          "self_attn.q_proj",
          "self_attn.k_proj",
          "self_attn.v_proj",
          "self_attn.o_proj",
          "mlp.gate_proj",
          "mlp.up_proj",
          "mlp.down_proj",
          "input_layernorm",
          "post_attention_layernorm",
          "self_attn.q_norm",
          "self_attn.k_norm",
          prefix + "embed_tokens.weight",
          "",
          prefix + "norm.weight",
          "lm_head.weight"};
}

// Layer indices i for which `prefix` + "layers.<i>." + `q` + ".weight" exists, ascending.
std::vector<std::int64_t> layer_indices(const Listing& tensors, const TransformerNaming& naming) {
  const std::string head = naming.prefix + "layers.";
  const std::string tail = "." + naming.q + ".weight";
  std::set<std::int64_t> found;
  for (const auto& t : tensors) {
    const auto& n = t.name;
    if (n.size() <= head.size() + tail.size() || n.compare(0, head.size(), head) != 0 ||
        n.compare(n.size() - tail.size(), tail.size(), tail) != 0) {
      continue;
    }
    const std::string digits = n.substr(head.size(), n.size() - head.size() - tail.size());
    if (!digits.empty() && digits.size() <= 9 &&
        std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      found.insert(std::stoll(digits));  // <= 9 digits: no overflow from a hostile name
    }
  }
  return {found.begin(), found.end()};
}

std::optional<std::int64_t> positive_int(const nlohmann::json& value) {
  if (value.is_number_integer() && value.get<std::int64_t>() > 0) return value.get<std::int64_t>();
  return std::nullopt;
}

// The query-head count from metadata: save_model's "libtransfer.config" JSON, or plain keys.
std::optional<std::int64_t> heads_from_metadata(const std::map<std::string, std::string>& meta,
                                                std::string& source) {
  const auto config = meta.find("libtransfer.config");
  if (config != meta.end()) {
    const auto json = nlohmann::json::parse(config->second, nullptr, /*allow_exceptions=*/false);
    if (json.is_object()) {
      for (const char* key : {"n_heads", "num_attention_heads"}) {
        if (json.contains(key)) {
          if (auto h = positive_int(json[key])) {
            source = std::string("metadata libtransfer.config ") + key;
            return h;
          }
        }
      }
    }
  }
  for (const char* key : {"n_heads", "num_attention_heads", "num_heads"}) {
    const auto it = meta.find(key);
    if (it == meta.end()) continue;
    try {
      const long long h = std::stoll(it->second);
      if (h > 0) {
        source = std::string("metadata ") + key;
        return h;
      }
    } catch (const std::exception&) {
    }
    throw InvalidInput(std::string("metadata '") + key + "': expected a positive integer, got '" +
                       it->second + "'");
  }
  return std::nullopt;
}

void skip_single_units(ModelLayout& layout) {
  for (auto& g : layout.groups) {
    if (g.skip_reason.empty() && g.units < 2) {
      g.skip_reason = "skipped: " + std::to_string(g.units) + " unit (nothing to permute)";
    }
  }
}

ModelLayout transformer_layout(const Listing& tensors,
                               const std::map<std::string, std::string>& metadata,
                               const LayoutOptions& options, const TransformerNaming& naming,
                               const std::vector<std::int64_t>& layers) {
  ModelLayout layout;
  layout.architecture = naming.architecture;
  layout.residual.name = "residual_basis";
  layout.residual.kind = "residual_basis";

  // The head count, once for the model.
  std::optional<std::int64_t> heads;
  std::string heads_source;
  if (options.n_heads > 0) {
    heads = options.n_heads;
    heads_source = "n_heads option";
  } else if (options.n_heads < 0) {
    throw InvalidInput("n_heads: expected a positive integer or 0 (find it), got " +
                       std::to_string(options.n_heads));
  } else {
    heads = heads_from_metadata(metadata, heads_source);
  }

  const std::string embed = naming.embed;
  std::vector<GroupMember>& res = layout.residual.members;
  add_if_present(tensors, res, embed, 1);
  if (!naming.pos.empty()) add_if_present(tensors, res, naming.pos, 1);

  for (const std::int64_t i : layers) {
    const std::string p = naming.prefix + "layers." + std::to_string(i) + ".";
    const std::string what = "block " + std::to_string(i) + "'s attention";
    const auto& q = require(tensors, p + naming.q + ".weight", what);
    const auto& k = require(tensors, p + naming.k + ".weight", what);
    require(tensors, p + naming.v + ".weight", what);
    require(tensors, p + naming.o + ".weight", what);
    for (const auto* t : {&q, &k}) {
      if (t->shape.size() != 2) {
        throw InvalidInput("tensor '" + t->name + "': expected a 2-D projection, got shape " +
                           shape_text(t->shape));
      }
    }

    // Attention heads (GQA: one unit = a key/value head with its query heads).
    UnitGroup attn{p + naming.attn_group, "attention_heads", 0, {}, ""};
    attn.members = {
        {q.name, 0}, {k.name, 0}, {p + naming.v + ".weight", 0}, {p + naming.o + ".weight", 1}};
    for (const auto& proj : {naming.q, naming.k, naming.v}) {
      add_if_present(tensors, attn.members, p + proj + ".bias", 0);
    }
    std::optional<std::int64_t> layer_heads = heads;
    std::string layer_source = heads_source;
    if (!layer_heads) {
      const TensorMeta* qn = find(tensors, p + naming.q_norm + ".weight");
      if (qn != nullptr && qn->shape.size() == 1 && qn->shape[0] > 0 &&
          q.shape[0] % qn->shape[0] == 0) {
        layer_heads = q.shape[0] / qn->shape[0];
        layer_source = "head size of " + qn->name;
      }
    }
    if (!layer_heads) {
      attn.units = 0;
      attn.skip_reason =
          "skipped: number of attention heads unknown (pass n_heads; shapes alone do not "
          "determine it)";
    } else {
      const std::int64_t h = *layer_heads;
      if (q.shape[0] % h != 0) {
        throw InvalidInput("n_heads = " + std::to_string(h) + " (from " + layer_source +
                           ") does not divide the " + std::to_string(q.shape[0]) + " rows of '" +
                           q.name + "'");
      }
      const std::int64_t head_dim = q.shape[0] / h;
      if (k.shape[0] % head_dim != 0 || h % (k.shape[0] / head_dim) != 0) {
        throw InvalidInput("tensor '" + k.name + "' has " + std::to_string(k.shape[0]) +
                           " rows, not a number of heads of size " + std::to_string(head_dim) +
                           " dividing the " + std::to_string(h) + " query heads (n_heads from " +
                           layer_source + ")");
      }
      attn.units = k.shape[0] / head_dim;
      if (layout.notes.empty()) {
        layout.notes.push_back("attention: " + std::to_string(h) + " query heads (from " +
                               layer_source + "), " + std::to_string(attn.units) +
                               " key/value heads of size " + std::to_string(head_dim));
      }
    }
    layout.groups.push_back(attn);

    // The MLP: GLU (gate, up, down) or plain (up, down).
    const std::string up = p + naming.up + ".weight";
    const std::string down = p + naming.down + ".weight";
    const bool glu = find(tensors, p + naming.gate + ".weight") != nullptr;
    const std::string mlp_what = "block " + std::to_string(i) + "'s MLP";
    const auto& up_meta = require(tensors, up, mlp_what);
    require(tensors, down, mlp_what);
    UnitGroup mlp{p + "mlp", glu ? "glu_hidden" : "mlp_hidden", 0, {}, ""};
    if (glu) mlp.members.push_back({p + naming.gate + ".weight", 0});
    mlp.members.push_back({up, 0});
    if (glu) add_if_present(tensors, mlp.members, p + naming.gate + ".bias", 0);
    add_if_present(tensors, mlp.members, p + naming.up + ".bias", 0);
    mlp.members.push_back({down, 1});
    mlp.units = up_meta.shape.empty() ? 0 : up_meta.shape[0];
    layout.groups.push_back(mlp);

    // Residual axes of the block.
    for (const auto& norm : {naming.attn_norm, naming.mlp_norm}) {
      add_if_present(tensors, res, p + norm + ".weight", 0);
      add_if_present(tensors, res, p + norm + ".bias", 0);
    }
    for (const auto& proj : {naming.q, naming.k, naming.v})
      res.push_back({p + proj + ".weight", 1});
    res.push_back({p + naming.o + ".weight", 0});
    add_if_present(tensors, res, p + naming.o + ".bias", 0);
    if (glu) res.push_back({p + naming.gate + ".weight", 1});
    res.push_back({up, 1});
    res.push_back({down, 0});
    add_if_present(tensors, res, p + naming.down + ".bias", 0);
  }
  add_if_present(tensors, res, naming.final_norm, 0);
  if (naming.final_norm.size() > 7) {
    add_if_present(tensors, res, naming.final_norm.substr(0, naming.final_norm.size() - 6) + "bias",
                   0);
  }
  add_if_present(tensors, res, naming.head, 1);
  if (res.empty() || res.front().tensor != embed) {
    res.clear();  // no embedding: no residual basis to test or align
  } else {
    layout.residual.units = require(tensors, embed, "the residual basis").shape.at(1);
  }
  skip_single_units(layout);
  return layout;
}

// Whether consecutive 2-D weights chain: W_{i+1} has as many columns as W_i has rows.
bool chains(const std::vector<const TensorMeta*>& weights) {
  for (std::size_t i = 0; i + 1 < weights.size(); ++i) {
    if (weights[i + 1]->shape[1] != weights[i]->shape[0]) return false;
  }
  return true;
}

ModelLayout mlp_chain_layout(const Listing& tensors,
                             const std::vector<const TensorMeta*>& matrices) {
  std::vector<const TensorMeta*> order = matrices;
  std::string note = "mlp chain in listing order";
  if (!chains(order)) {
    std::stable_sort(order.begin(), order.end(), [](const TensorMeta* a, const TensorMeta* b) {
      return natural_less(a->name, b->name);
    });
    note = "mlp chain in natural name order";
  }
  if (matrices.size() == 1) {
    throw InvalidInput("the model has a single 2-D weight ('" + matrices[0]->name + "' " +
                       shape_text(matrices[0]->shape) +
                       "): a single layer has no permutable hidden units to test");
  }
  if (!chains(order)) {
    std::string listing;
    for (const auto* m : matrices) listing += "\n  " + m->name + " " + shape_text(m->shape);
    throw InvalidInput(
        "could not recognize the model's layout: not our transformer, not Hugging Face "
        "Llama/Mistral/Qwen naming, and its 2-D weights do not form an MLP chain (each layer's "
        "input size equal to the previous layer's output size) in listing or name order; pass "
        "explicit groups. 2-D weights:" +
        listing);
  }
  ModelLayout layout;
  layout.architecture = "mlp_chain";
  layout.notes.push_back(note);
  for (std::size_t i = 0; i + 1 < order.size(); ++i) {
    const auto& w = *order[i];
    std::string base = w.name;
    const std::string suffix = "weight";
    if (base.size() > suffix.size() &&
        base.compare(base.size() - suffix.size(), suffix.size(), suffix) == 0) {
      base = base.substr(0, base.size() - suffix.size());
    }
    UnitGroup g;
    g.name = base.empty() ? w.name : (base.back() == '.' ? base.substr(0, base.size() - 1) : base);
    g.kind = "mlp_hidden";
    g.units = w.shape[0];
    g.members.push_back({w.name, 0});
    if (base != w.name) {
      const TensorMeta* bias = find(tensors, base + "bias");
      if (bias != nullptr && bias->floating &&
          bias->shape == std::vector<std::int64_t>{w.shape[0]}) {
        g.members.push_back({bias->name, 0});
      }
    }
    g.members.push_back({order[i + 1]->name, 1});
    layout.groups.push_back(g);
  }
  skip_single_units(layout);
  return layout;
}

}  // namespace

bool natural_less(const std::string& a, const std::string& b) {
  std::size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (std::isdigit(static_cast<unsigned char>(a[i])) &&
        std::isdigit(static_cast<unsigned char>(b[j]))) {
      std::size_t ie = i, je = j;
      while (ie < a.size() && std::isdigit(static_cast<unsigned char>(a[ie]))) ++ie;
      while (je < b.size() && std::isdigit(static_cast<unsigned char>(b[je]))) ++je;
      // Compare as numbers: strip leading zeros, then by length, then digit by digit.
      std::size_t is = i, js = j;
      while (is + 1 < ie && a[is] == '0') ++is;
      while (js + 1 < je && b[js] == '0') ++js;
      const auto la = ie - is, lb = je - js;
      if (la != lb) return la < lb;
      const int c = a.compare(is, la, b, js, lb);
      if (c != 0) return c < 0;
      i = ie;
      j = je;
    } else {
      if (a[i] != b[j]) return a[i] < b[j];
      ++i;
      ++j;
    }
  }
  return a.size() - i < b.size() - j;
}

ModelLayout detect_layout(const std::vector<TensorMeta>& tensors,
                          const std::map<std::string, std::string>& metadata,
                          const LayoutOptions& options) {
  std::vector<const TensorMeta*> matrices;
  for (const auto& t : tensors) {
    if (t.floating && t.shape.size() == 2) matrices.push_back(&t);
  }
  if (matrices.empty()) {
    std::string names;
    for (std::size_t i = 0; i < tensors.size() && i < 8; ++i) {
      names += (i ? ", " : "") + tensors[i].name + " " + shape_text(tensors[i].shape);
    }
    throw InvalidInput(
        "the model has no 2-D floating weight, so the weight test has nothing to "
        "match (" +
        std::to_string(tensors.size()) + " tensors" + (names.empty() ? "" : ": " + names) + ")");
  }
  const auto builtin = builtin_naming();
  if (auto layers = layer_indices(tensors, builtin); !layers.empty()) {
    return transformer_layout(tensors, metadata, options, builtin, layers);
  }
  static const std::regex hf_q(R"(^(.*)layers\.\d+\.self_attn\.q_proj\.weight$)");
  for (const auto& t : tensors) {
    std::smatch match;
    if (std::regex_match(t.name, match, hf_q)) {
      const auto naming = hf_naming(match[1].str());
      return transformer_layout(tensors, metadata, options, naming, layer_indices(tensors, naming));
    }
  }
  return mlp_chain_layout(tensors, matrices);
}

ModelLayout explicit_layout(const std::vector<UnitGroup>& groups,
                            const std::vector<TensorMeta>& tensors) {
  if (groups.empty()) throw InvalidInput("groups: expected at least one group, got none");
  ModelLayout layout;
  layout.architecture = "explicit";
  std::set<std::string> names;
  for (std::size_t gi = 0; gi < groups.size(); ++gi) {
    UnitGroup g = groups[gi];
    if (g.name.empty()) g.name = "group " + std::to_string(gi);
    if (g.kind.empty()) g.kind = "custom";
    const std::string where = "group '" + g.name + "'";
    if (!names.insert(g.name).second) throw InvalidInput(where + " appears twice in groups");
    if (g.members.empty()) throw InvalidInput(where + ": expected at least one member, got none");
    if (g.units < 0) {
      throw InvalidInput(where + ": units must be >= 0 (0: the first member's size), got " +
                         std::to_string(g.units));
    }
    for (std::size_t mi = 0; mi < g.members.size(); ++mi) {
      auto& m = g.members[mi];
      const TensorMeta* t = find(tensors, m.tensor);
      if (t == nullptr) {
        throw InvalidInput(where + ": model A has no tensor '" + m.tensor + "'");
      }
      if (!t->floating) {
        throw WrongType(where + ": tensor '" + m.tensor + "' has dtype " + t->dtype +
                        "; the weight test reads floating weights only");
      }
      const auto rank = static_cast<std::int64_t>(t->shape.size());
      if (m.axis < -rank || m.axis >= rank) {
        throw InvalidInput(where + ": axis " + std::to_string(m.axis) + " is out of range for '" +
                           m.tensor + "' of shape " + shape_text(t->shape));
      }
      if (m.axis < 0) m.axis += rank;
      const std::int64_t size = t->shape[m.axis];
      if (mi == 0 && g.units == 0) g.units = size;
      if (g.units == 0 || size % g.units != 0) {
        throw InvalidInput(where + ": axis " + std::to_string(m.axis) + " of '" + m.tensor + "' " +
                           shape_text(t->shape) + " has size " + std::to_string(size) +
                           ", not a positive multiple of the group's " + std::to_string(g.units) +
                           " units");
      }
    }
    layout.groups.push_back(g);
  }
  skip_single_units(layout);
  return layout;
}

torch::Tensor unit_matrix(const UnitGroup& group,
                          const std::map<std::string, torch::Tensor>& tensors) {
  std::vector<torch::Tensor> parts;
  parts.reserve(group.members.size());
  for (const auto& m : group.members) {
    const auto& t = tensors.at(m.tensor);
    parts.push_back(t.movedim(m.axis, 0).reshape({group.units, -1}));
  }
  return parts.size() == 1 ? parts.front().contiguous() : torch::cat(parts, 1);
}

void permute_units(const UnitGroup& group, const torch::Tensor& perm,
                   std::map<std::string, torch::Tensor>& tensors) {
  for (const auto& m : group.members) {
    auto& t = tensors.at(m.tensor);
    const std::int64_t block = t.size(m.axis) / group.units;
    auto p = perm.to(t.device(), torch::kLong);
    const auto index =
        block == 1 ? p
                   : (p.unsqueeze(1) * block + torch::arange(block, p.options()).unsqueeze(0))
                         .reshape({-1});
    t = t.index_select(m.axis, index);
  }
}

}  // namespace libtransfer::detect
