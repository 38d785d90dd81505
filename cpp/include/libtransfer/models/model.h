// The Model interface every pillar drives: logits for a batch of token ids (language models) or
// of feature vectors (classifiers such as the auxiliary-logit MLP), plus named parameters, so the
// trainer, the sampler, the fingerprint and the detector work on built-in C++ models, TorchScript
// modules and Python nn.Modules alike.
//
// Costs: the interface is a virtual call per forward; implementations own their parameters.
#pragma once

#include <torch/types.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace libtransfer::models {

// What a model's forward takes.
enum class InputKind {
  kTokens,  // input [B, T] int64 token ids, attention_mask [B, T] (1 real, 0 padding) -> [B, T, V]
  kFeatures,  // input [B, F] floating features (attention_mask ignored)            -> [B, C]
};

// Named tensors in a stable order (registration order for built-ins): parameters, buffers, or a
// whole state dict. Plain pairs so that names of any module system survive unchanged.
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// Incremental decoding state of a language model: per layer the keys and values of every
// position seen so far ([B, H, T_past, D_head]), and the attention mask over those positions
// ([B, T_past], int64). Built and grown by forward_cached; empty at the start.
struct KVCache {
  std::vector<torch::Tensor> keys;
  std::vector<torch::Tensor> values;
  torch::Tensor mask;       // [B, T_past] int64; undefined when empty
  torch::Tensor positions;  // [B] int64: position index of the next token per row
  std::int64_t length() const { return mask.defined() ? mask.size(1) : 0; }
  void clear() { *this = KVCache(); }
};

// A model: forward plus the parameters the trainer updates. Implementations must be usable from
// several pillars, so forward never changes the parameters and never caches results.
class Model {
 public:
  virtual ~Model() = default;

  // Logits, see InputKind. attention_mask may be undefined (all ones). Left padding must be
  // supported by language models (the sampler batches prompts of different lengths that way):
  // positions count from the first real token of each row.
  virtual torch::Tensor forward(const torch::Tensor& input,
                                const torch::Tensor& attention_mask = {}) = 0;

  virtual InputKind input_kind() const = 0;
  // V (vocabulary size) for language models, C (number of logits) for feature models.
  virtual std::int64_t output_size() const = 0;
  // F for feature models; 0 for language models.
  virtual std::int64_t input_size() const { return 0; }

  // Trainable parameters (the tensors themselves, not copies: optimizers update them in place).
  virtual NamedTensors named_parameters() = 0;
  // Non-trainable state saved with the model (e.g. rotary tables are not saved; running stats
  // would be). Default: none.
  virtual NamedTensors named_buffers() { return {}; }

  // Training mode (dropout on); default no-op for models without mode-dependent behaviour.
  virtual void set_training(bool /*on*/) {}
  virtual bool is_training() const { return false; }

  // A short human-readable description ("mlp 784-256-256-13", "torchscript:path").
  virtual std::string describe() const = 0;

  // The device of the parameters (CPU for models without parameters).
  virtual torch::Device device();

  // Moves parameters and buffers (in place, keeping tensor identity where torch allows).
  virtual void to(torch::Device device, torch::Dtype dtype) = 0;

  // Incremental decoding: logits [B, T_new, V] for the new tokens given the cache, which is
  // extended in place. Only models with supports_kv_cache(); others throw NotImplemented and
  // the sampler recomputes the whole prefix instead.
  virtual bool supports_kv_cache() const { return false; }
  virtual torch::Tensor forward_cached(const torch::Tensor& input_ids,
                                       const torch::Tensor& attention_mask, KVCache& cache);

  // Hidden activations for the detector's activation test: for every group of hidden units, the
  // outputs of each projection that produces them, flattened to [N, units] (N = examples for
  // feature models, real (unmasked) positions for language models), computed under no_grad.
  // Names: MLP "layers.<i>" (pre-activation of hidden layer i, i = 0 .. hidden layers - 1);
  // TransformerLM "layers.<i>.mlp.gate" and "layers.<i>.mlp.up" (pre-activation outputs of the
  // GLU's two sibling projections). Default: InvalidInput saying the model does not expose them.
  virtual NamedTensors hidden_activations(const torch::Tensor& input,
                                          const torch::Tensor& attention_mask = {});

  // A new model of the same architecture holding deep copies of the parameters and buffers
  // (students start from a teacher's initialization this way). Throws for models that cannot be
  // copied (Python modules are copied on the Python side).
  virtual std::shared_ptr<Model> clone() const = 0;

  // Metadata stored with the weights by save_model (architecture and config as strings) so that
  // load_model can rebuild a built-in model from the file alone.
  virtual std::map<std::string, std::string> metadata() const { return {}; }
};

using ModelPtr = std::shared_ptr<Model>;

// Parameters then buffers, detached (sharing storage with the model).
NamedTensors state_dict(Model& model);

// Copies tensors into the model's parameters/buffers under no_grad. strict: every model tensor
// must be present and no extra tensor given; shapes must match (InvalidInput naming the tensor,
// both shapes). Dtype/device are converted to the model's.
void load_state_dict(Model& model, const NamedTensors& tensors, bool strict = true);

// Saves state_dict(model) with metadata() (plus any extra metadata) as safetensors, atomically.
void save_model(Model& model, const std::string& path,
                const std::map<std::string, std::string>& extra_metadata = {});

// Rebuilds a built-in model (MLP, TransformerLM) from a file written by save_model, using its
// metadata. InvalidInput if the file has no libtransfer architecture metadata.
ModelPtr load_model(const std::string& path);

// Convenience: parameters only (what optimizers need).
std::vector<torch::Tensor> parameters(Model& model);

}  // namespace libtransfer::models
