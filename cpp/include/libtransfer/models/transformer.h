// A small decoder-only transformer language model (Llama-style): token embedding, pre-norm
// blocks of RMSNorm -> causal multi-head self-attention and RMSNorm -> SwiGLU MLP, a final
// RMSNorm and a head tied to the embedding or separate. Positions are rotary (RoPE, the
// rotate-half layout of GPT-NeoX / Llama) or a learned table. No biases, no dropout.
//
// Left padding is supported everywhere: positions count from each row's first real token and
// padded keys are masked. forward_cached reuses the keys and values of earlier positions (the
// sampler's incremental decoding) and gives the same logits as the full forward.
//
// Costs per forward of B x T tokens: about 2 * parameters * B * T flops plus the attention's
// 4 * B * T^2 * d_model; memory B * n_heads * T^2 for the attention weights of one layer.
// Written with plain tensor ops, so it runs on any device and dtype torch supports.
#pragma once

#include <torch/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "libtransfer/models/model.h"

namespace libtransfer::models {

// Architecture, initialization and seed of a TransformerLM. Defaults: a tiny model.
struct TransformerConfig {
  std::int64_t vocab_size = 256;
  std::int64_t d_model = 32;
  std::int64_t n_layers = 1;
  std::int64_t n_heads = 4;
  std::int64_t d_mlp = 64;
  std::int64_t max_seq_len = 256;
  std::string positions = "rotary";  // "rotary" | "learned"
  bool tied_head = true;
  double norm_eps = 1e-5;
  double rope_theta = 10000.0;
  std::uint64_t seed = 0;
  // Standard deviation of every weight matrix at initialization (GPT-2's 0.02); the attention
  // output and MLP down projections get init_std / sqrt(2 * n_layers) (GPT-2's residual scaling)
  // so that the residual stream's variance does not grow with depth. Norm weights start at 1.
  double init_std = 0.02;

  // InvalidInput naming the field: sizes positive, d_model divisible by n_heads, head size even
  // for rotary positions, positions one of the two names, norm_eps and rope_theta positive.
  void validate() const;
  std::int64_t head_dim() const { return d_model / n_heads; }
  // Number of parameters: V d [+ max_seq_len d] + n_layers (2 d + 4 d^2 + 3 d d_mlp) + d
  // [+ V d when untied].
  std::int64_t parameter_count() const;
  std::string to_json() const;
  static TransformerConfig from_json(const std::string& text);
};

// The model. Parameters are float32 on the CPU after construction, drawn from a CPU generator
// seeded with config.seed in registration order (see named_parameters), independent of the
// global RNG. Names (the detector relies on them): embed.weight [V, d], pos.weight [L, d]
// (learned), layers.<i>.attn_norm.weight [d], layers.<i>.attn.{q,k,v,o}.weight [d, d],
// layers.<i>.mlp_norm.weight [d], layers.<i>.mlp.{gate,up}.weight [d_mlp, d],
// layers.<i>.mlp.down.weight [d, d_mlp], final_norm.weight [d], head.weight [V, d] (untied).
class TransformerLM : public Model {
 public:
  explicit TransformerLM(TransformerConfig config);

  // input_ids [B, T] int64 in [0, V), attention_mask [B, T] (1 real, 0 padding; undefined = all
  // real) -> logits [B, T, V] in the parameters' dtype. Logits at padded positions are finite
  // but meaningless. Learned positions: InvalidInput past max_seq_len.
  torch::Tensor forward(const torch::Tensor& input_ids,
                        const torch::Tensor& attention_mask = {}) override;
  InputKind input_kind() const override { return InputKind::kTokens; }
  std::int64_t output_size() const override { return config_.vocab_size; }
  NamedTensors named_parameters() override;
  std::string describe() const override;
  void to(torch::Device device, torch::Dtype dtype) override;

  bool supports_kv_cache() const override { return true; }
  // input_ids / attention_mask [B, T_new] for the new tokens; the cache (empty at the start)
  // grows by T_new. Returns logits [B, T_new, V], equal to the last T_new positions of a full
  // forward on the concatenated inputs and masks.
  torch::Tensor forward_cached(const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                               KVCache& cache) override;

  // "layers.<i>.mlp.gate" and "layers.<i>.mlp.up": the GLU's two pre-activation projections at
  // the real positions, [N_real, d_mlp] each (no_grad).
  NamedTensors hidden_activations(const torch::Tensor& input_ids,
                                  const torch::Tensor& attention_mask = {}) override;
  std::shared_ptr<Model> clone() const override;
  std::map<std::string, std::string> metadata() const override;

  const TransformerConfig& config() const { return config_; }

 private:
  struct Layer {
    torch::Tensor attn_norm, q, k, v, o, mlp_norm, gate, up, down;
  };
  // Checked ids and mask (int64, the parameters' device).
  std::pair<torch::Tensor, torch::Tensor> checked_inputs(const torch::Tensor& input_ids,
                                                         const torch::Tensor& attention_mask,
                                                         const char* function) const;
  // The shared body: embeddings at `positions` [B, T], attention over the cached keys plus the
  // new ones with key mask `key_mask` [B, T_past + T]; fills the cache when given; records the
  // GLU activations when `activations` is given. Returns the final hidden states [B, T, d].
  torch::Tensor run(const torch::Tensor& ids, const torch::Tensor& positions,
                    const torch::Tensor& key_mask, KVCache* cache, NamedTensors* activations);
  torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight) const;
  torch::Tensor rotate(const torch::Tensor& x, const torch::Tensor& positions) const;
  torch::Tensor head_weight() const;

  TransformerConfig config_;
  torch::Tensor embed_;
  torch::Tensor pos_;  // learned positions only
  std::vector<Layer> layers_;
  torch::Tensor final_norm_;
  torch::Tensor head_;  // untied only
};

}  // namespace libtransfer::models
