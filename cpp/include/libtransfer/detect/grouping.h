// Which tensors of a model share a hidden index, and along which axis: the unit groups the weight
// test matches (DESIGN.md section 4). A hidden unit of a group is the concatenation of its slices
// in every member tensor (the in-rows of a layer, its bias entries, the out-columns of the next
// layer); permuting the units of a group consistently in all members leaves the function intact.
//
// Auto-detected layouts (detect_layout):
// - "transformer": our built-in TransformerLM names (embed.weight, layers.<i>.attn.{q,k,v,o},
//   layers.<i>.mlp.{gate,up,down}, ...). Per block: the GLU hidden units (rows of gate and up,
//   columns of down) and the attention heads (rows h*Dh..(h+1)*Dh of q, k, v and the same columns
//   of o).
// - "hf_transformer": Hugging Face Llama / Mistral / Qwen names (model.embed_tokens.weight,
//   model.layers.<i>.self_attn.{q,k,v,o}_proj, model.layers.<i>.mlp.{gate,up,down}_proj, ...);
//   q/k/v biases (Qwen2) join their heads.
// - "mlp_chain": consecutive 2-D weights whose shapes chain (W_{i+1} is [*, rows of W_i]), e.g.
//   our MLP (layers.<i>.weight) or nn.Sequential (0.weight, 2.weight, ...): hidden units of layer i
//   are the rows of W_i, the entries of its bias and the columns of W_{i+1}. The first layer's
//   columns (inputs) and the last layer's rows (classes) are not permutable and never tested.
// - explicit groups given by the caller, for anything else.
//
// Attention heads need the head count: options.n_heads, else the metadata ("libtransfer.config"
// JSON n_heads as written by save_model, or keys n_heads / num_attention_heads), else the head
// size from per-head norms (Qwen3's q_norm.weight [Dh]). Shapes alone never determine it (q of a
// [d, d] projection fits any divisor of d), so without any of these the attention groups are
// skipped with a note. Grouped-query attention (k/v with Hkv < H heads): a unit is a key/value
// head together with its H/Hkv query heads (and their o columns); the order of query heads
// inside a group is not tested.
//
// Costs: detection reads names and shapes only (no tensor data).
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "libtransfer/detect/state_source.h"
#include "libtransfer/models/model.h"

namespace libtransfer::detect {

// One tensor's part in a group: the unit index runs along `axis` (negative counts from the end).
// Unit u owns the slice [u * s, (u + 1) * s) of that axis, s = size(axis) / units.
struct GroupMember {
  std::string tensor;
  std::int64_t axis = 0;
};

// Units sharing one hidden index. units = 0 means "the size of the first member's axis";
// every member's axis size must be a multiple of units. skip_reason, when set, says why the
// group is reported but not tested (e.g. "1 unit", "number of heads unknown").
struct UnitGroup {
  std::string name;  // "layers.3.mlp", "layers.0.attn.heads", "layers.1", user's name
  std::string kind;  // "mlp_hidden", "glu_hidden", "attention_heads", "residual_basis", "custom"
  std::int64_t units = 0;
  std::vector<GroupMember> members;
  std::string skip_reason;
};

// A model's groups, as detected or given. residual (transformers only) lists every axis that
// indexes the residual stream (embedding columns, norm weights, q/k/v/gate/up columns, o/down
// rows, head columns); its first member is the embedding, whose columns the optional residual
// alignment matches. Empty residual.members for MLPs and explicit groups.
struct ModelLayout {
  std::string architecture;  // "transformer", "hf_transformer", "mlp_chain", "explicit"
  std::vector<UnitGroup> groups;
  UnitGroup residual;
  std::vector<std::string> notes;  // how heads were found, chain order used, ...
};

// What detection may need beyond names and shapes. n_heads: query heads (0: find them as
// described above).
struct LayoutOptions {
  std::int64_t n_heads = 0;
};

// The layout of a model from its listing and metadata. InvalidInput when the model has no 2-D
// floating weight or no recognizable layout (the message suggests explicit groups).
ModelLayout detect_layout(const std::vector<TensorMeta>& tensors,
                          const std::map<std::string, std::string>& metadata,
                          const LayoutOptions& options = {});

// Explicit groups checked against a listing and normalized (units filled in, axes made
// non-negative): InvalidInput naming the group and tensor for a missing tensor, an axis out of
// range, a non-floating tensor, sizes that are not multiples of units, or an empty group.
ModelLayout explicit_layout(const std::vector<UnitGroup>& groups,
                            const std::vector<TensorMeta>& tensors);

// The [units, features] matrix of a group: each member's axis moved first and reshaped to
// [units, -1], then concatenated along features (member order). tensors: name -> tensor for at
// least the group's members (already validated shapes).
torch::Tensor unit_matrix(const UnitGroup& group,
                          const std::map<std::string, torch::Tensor>& tensors);

// Applies a permutation of units to every member of the group in `tensors` (in place in the map:
// new tensors replace the old). perm: int64 [units] on any device; unit u of the result is unit
// perm[u] of the input.
void permute_units(const UnitGroup& group, const torch::Tensor& perm,
                   std::map<std::string, torch::Tensor>& tensors);

// Natural order of names: digit runs compare as numbers ("layers.2" < "layers.10").
bool natural_less(const std::string& a, const std::string& b);

}  // namespace libtransfer::detect
