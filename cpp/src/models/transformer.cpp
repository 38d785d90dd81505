// TransformerLM: config checks, seeded initialization, the forward shared by the full and the
// cached paths, and the GLU activations for the detector.
#include "libtransfer/models/transformer.h"

#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>
#include <cmath>
#include <limits>
#include <nlohmann/json.hpp>

#include "libtransfer/errors.h"

namespace libtransfer::models {
namespace {

namespace F = torch::nn::functional;

void require_positive(const char* field, std::int64_t value) {
  if (value <= 0) {
    throw InvalidInput(std::string("TransformerConfig.") + field +
                       ": expected a positive value, got " + std::to_string(value));
  }
}

bool is_reduced_precision(at::ScalarType type) {
  return type == at::kHalf || type == at::kBFloat16;
}

}  // namespace

void TransformerConfig::validate() const {
  require_positive("vocab_size", vocab_size);
  require_positive("d_model", d_model);
  require_positive("n_layers", n_layers);
  require_positive("n_heads", n_heads);
  require_positive("d_mlp", d_mlp);
  require_positive("max_seq_len", max_seq_len);
  if (d_model % n_heads != 0) {
    throw InvalidInput("TransformerConfig.n_heads: must divide d_model (" +
                       std::to_string(d_model) + "), got " + std::to_string(n_heads));
  }
  if (positions != "rotary" && positions != "learned") {
    throw InvalidInput("TransformerConfig.positions: expected 'rotary' or 'learned', got '" +
                       positions + "'");
  }
  if (positions == "rotary" && head_dim() % 2 != 0) {
    throw InvalidInput("TransformerConfig: rotary positions need an even head size, got d_model " +
                       std::to_string(d_model) + " / n_heads " + std::to_string(n_heads) + " = " +
                       std::to_string(head_dim()));
  }
  if (!(norm_eps > 0.0)) {
    throw InvalidInput("TransformerConfig.norm_eps: expected > 0, got " + std::to_string(norm_eps));
  }
  if (!(rope_theta > 0.0)) {
    throw InvalidInput("TransformerConfig.rope_theta: expected > 0, got " +
                       std::to_string(rope_theta));
  }
  if (!(init_std > 0.0) || !std::isfinite(init_std)) {
    throw InvalidInput("TransformerConfig.init_std: expected a finite value > 0, got " +
                       std::to_string(init_std));
  }
}

std::int64_t TransformerConfig::parameter_count() const {
  const std::int64_t d = d_model;
  std::int64_t count = vocab_size * d + d;  // embedding, final norm
  if (positions == "learned") count += max_seq_len * d;
  count += n_layers * (2 * d + 4 * d * d + 3 * d * d_mlp);
  if (!tied_head) count += vocab_size * d;
  return count;
}

std::string TransformerConfig::to_json() const {
  const nlohmann::json json = {
      {"vocab_size", vocab_size}, {"d_model", d_model},     {"n_layers", n_layers},
      {"n_heads", n_heads},       {"d_mlp", d_mlp},         {"max_seq_len", max_seq_len},
      {"positions", positions},   {"tied_head", tied_head}, {"norm_eps", norm_eps},
      {"rope_theta", rope_theta}, {"seed", seed},           {"init_std", init_std}};
  return json.dump();
}

TransformerConfig TransformerConfig::from_json(const std::string& text) {
  TransformerConfig c;
  try {
    const auto j = nlohmann::json::parse(text);
    c.vocab_size = j.at("vocab_size").get<std::int64_t>();
    c.d_model = j.at("d_model").get<std::int64_t>();
    c.n_layers = j.at("n_layers").get<std::int64_t>();
    c.n_heads = j.at("n_heads").get<std::int64_t>();
    c.d_mlp = j.at("d_mlp").get<std::int64_t>();
    c.max_seq_len = j.at("max_seq_len").get<std::int64_t>();
    c.positions = j.at("positions").get<std::string>();
    c.tied_head = j.at("tied_head").get<bool>();
    c.norm_eps = j.at("norm_eps").get<double>();
    c.rope_theta = j.at("rope_theta").get<double>();
    c.seed = j.at("seed").get<std::uint64_t>();
    c.init_std = j.at("init_std").get<double>();
  } catch (const nlohmann::json::exception& e) {
    throw InvalidInput("TransformerConfig.from_json: malformed config '" + text + "' (" + e.what() +
                       ")");
  }
  c.validate();
  return c;
}

TransformerLM::TransformerLM(TransformerConfig config) : config_(std::move(config)) {
  config_.validate();
  auto generator = at::make_generator<at::CPUGeneratorImpl>(config_.seed);
  const auto options = torch::TensorOptions().dtype(torch::kFloat);
  const std::int64_t d = config_.d_model;
  const double std = config_.init_std;
  const double residual_std = std / std::sqrt(2.0 * static_cast<double>(config_.n_layers));
  auto normal = [&](std::int64_t rows, std::int64_t cols, double scale) {
    return at::normal(0.0, scale, {rows, cols}, generator, options).requires_grad_(true);
  };
  auto ones = [&]() { return torch::ones({d}, options).requires_grad_(true); };
  embed_ = normal(config_.vocab_size, d, std);
  if (config_.positions == "learned") pos_ = normal(config_.max_seq_len, d, std);
  for (std::int64_t i = 0; i < config_.n_layers; ++i) {
    Layer layer;
    layer.attn_norm = ones();
    layer.q = normal(d, d, std);
    layer.k = normal(d, d, std);
    layer.v = normal(d, d, std);
    layer.o = normal(d, d, residual_std);
    layer.mlp_norm = ones();
    layer.gate = normal(config_.d_mlp, d, std);
    layer.up = normal(config_.d_mlp, d, std);
    layer.down = normal(d, config_.d_mlp, residual_std);
    layers_.push_back(std::move(layer));
  }
  final_norm_ = ones();
  if (!config_.tied_head) head_ = normal(config_.vocab_size, d, std);
}

NamedTensors TransformerLM::named_parameters() {
  NamedTensors out;
  out.emplace_back("embed.weight", embed_);
  if (pos_.defined()) out.emplace_back("pos.weight", pos_);
  for (size_t i = 0; i < layers_.size(); ++i) {
    const std::string p = "layers." + std::to_string(i) + ".";
    const auto& l = layers_[i];
    out.emplace_back(p + "attn_norm.weight", l.attn_norm);
    out.emplace_back(p + "attn.q.weight", l.q);
    out.emplace_back(p + "attn.k.weight", l.k);
    out.emplace_back(p + "attn.v.weight", l.v);
    out.emplace_back(p + "attn.o.weight", l.o);
    out.emplace_back(p + "mlp_norm.weight", l.mlp_norm);
    out.emplace_back(p + "mlp.gate.weight", l.gate);
    out.emplace_back(p + "mlp.up.weight", l.up);
    out.emplace_back(p + "mlp.down.weight", l.down);
  }
  out.emplace_back("final_norm.weight", final_norm_);
  if (head_.defined()) out.emplace_back("head.weight", head_);
  return out;
}

std::string TransformerLM::describe() const {
  const auto& c = config_;
  return "transformer V=" + std::to_string(c.vocab_size) + " d=" + std::to_string(c.d_model) +
         " layers=" + std::to_string(c.n_layers) + " heads=" + std::to_string(c.n_heads) +
         " mlp=" + std::to_string(c.d_mlp) + " " + c.positions +
         (c.tied_head ? " tied" : " untied");
}

void TransformerLM::to(torch::Device device, torch::Dtype dtype) {
  torch::NoGradGuard no_grad;
  // set_data keeps every tensor's identity (optimizers and Python objects holding it).
  for (auto& [name, tensor] : named_parameters()) tensor.set_data(tensor.to(device, dtype));
}

std::shared_ptr<Model> TransformerLM::clone() const {
  auto copy = std::make_shared<TransformerLM>(config_);
  auto source = const_cast<TransformerLM*>(this)->named_parameters();
  auto target = copy->named_parameters();
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < source.size(); ++i) {
    target[i].second.set_data(source[i].second.detach().clone());
  }
  return copy;
}

std::map<std::string, std::string> TransformerLM::metadata() const {
  return {{"libtransfer.architecture", "transformer"}, {"libtransfer.config", config_.to_json()}};
}

torch::Tensor TransformerLM::head_weight() const { return config_.tied_head ? embed_ : head_; }

std::pair<torch::Tensor, torch::Tensor> TransformerLM::checked_inputs(
    const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
    const char* function) const {
  const std::string where = std::string("TransformerLM.") + function;
  if (!input_ids.defined() || input_ids.dim() != 2) {
    throw InvalidInput(where + ": input_ids must have shape [B, T], got " +
                       (input_ids.defined() ? c10::str(input_ids.sizes()) : "undefined"));
  }
  if (!at::isIntegralType(input_ids.scalar_type(), /*includeBool=*/false)) {
    throw WrongType(where + ": input_ids must be integer token ids, got dtype " +
                    std::string(c10::toString(input_ids.scalar_type())));
  }
  const auto device = embed_.device();
  auto ids = input_ids.to(device, torch::kLong);
  if (ids.numel() > 0) {
    const auto low = ids.min().item<std::int64_t>();
    const auto high = ids.max().item<std::int64_t>();
    if (low < 0 || high >= config_.vocab_size) {
      throw InvalidInput(where + ": token ids must lie in [0, " +
                         std::to_string(config_.vocab_size) + "), got values in [" +
                         std::to_string(low) + ", " + std::to_string(high) + "]");
    }
  }
  torch::Tensor mask;
  if (attention_mask.defined()) {
    if (attention_mask.sizes() != input_ids.sizes()) {
      throw InvalidInput(where + ": attention_mask must have the shape of input_ids " +
                         c10::str(input_ids.sizes()) + ", got " + c10::str(attention_mask.sizes()));
    }
    mask = attention_mask.to(device).ne(0).to(torch::kLong);
  } else {
    mask = torch::ones_like(ids);
  }
  return {ids, mask};
}

torch::Tensor TransformerLM::rms_norm(const torch::Tensor& x, const torch::Tensor& weight) const {
  // Reduced-precision inputs are normalized in float32 (the mean of squares loses digits).
  const auto xf = is_reduced_precision(x.scalar_type()) ? x.to(torch::kFloat) : x;
  const auto normed = xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + config_.norm_eps);
  return normed.to(x.scalar_type()) * weight;
}

torch::Tensor TransformerLM::rotate(const torch::Tensor& x, const torch::Tensor& positions) const {
  // x [B, H, T, Dh]; angles in float64 (exact enough for any position), then x's dtype.
  const std::int64_t half = config_.head_dim() / 2;
  const auto index_options = torch::TensorOptions().dtype(torch::kDouble).device(x.device());
  const auto exponents = torch::arange(half, index_options) * (2.0 / config_.head_dim());
  const auto inv_freq = torch::pow(config_.rope_theta, -exponents);           // [half]
  const auto angles = positions.to(torch::kDouble).unsqueeze(-1) * inv_freq;  // [B, T, half]
  const auto cos = torch::cat({angles.cos(), angles.cos()}, -1).unsqueeze(1).to(x.scalar_type());
  const auto sin = torch::cat({angles.sin(), angles.sin()}, -1).unsqueeze(1).to(x.scalar_type());
  const auto x1 = x.narrow(-1, 0, half);
  const auto x2 = x.narrow(-1, half, half);
  return x * cos + torch::cat({-x2, x1}, -1) * sin;
}

torch::Tensor TransformerLM::run(const torch::Tensor& ids, const torch::Tensor& positions,
                                 const torch::Tensor& key_mask, KVCache* cache,
                                 NamedTensors* activations) {
  const std::int64_t B = ids.size(0);
  const std::int64_t T = ids.size(1);
  const std::int64_t S = key_mask.size(1);  // past + new keys
  const std::int64_t past = S - T;
  const std::int64_t H = config_.n_heads;
  const std::int64_t Dh = config_.head_dim();
  const std::int64_t d = config_.d_model;
  if (pos_.defined() && positions.numel() > 0) {
    const auto last = positions.max().item<std::int64_t>();
    if (last >= config_.max_seq_len) {
      throw InvalidInput("TransformerLM: position " + std::to_string(last) +
                         " is past max_seq_len " + std::to_string(config_.max_seq_len) +
                         " of the learned position table");
    }
  }
  auto x = F::embedding(ids, embed_);
  if (pos_.defined()) x = x + F::embedding(positions, pos_);

  // Query t (key index past + t) sees real keys up to itself; itself always, so that padded
  // queries have one finite score (their outputs are never used).
  const auto opts = torch::TensorOptions().dtype(torch::kLong).device(ids.device());
  const auto query_index = torch::arange(past, S, opts).unsqueeze(1);  // [T, 1]
  const auto key_index = torch::arange(S, opts).unsqueeze(0);          // [1, S]
  const auto causal = key_index.le(query_index);
  const auto self = key_index.eq(query_index);
  const auto allowed =
      (causal.unsqueeze(0) & key_mask.ne(0).unsqueeze(1)) | self.unsqueeze(0);  // [B, T, S]
  const auto blocked = allowed.logical_not().unsqueeze(1);                      // [B, 1, T, S]
  const double scale = 1.0 / std::sqrt(static_cast<double>(Dh));
  const bool rotary = config_.positions == "rotary";

  for (size_t i = 0; i < layers_.size(); ++i) {
    const auto& l = layers_[i];
    const auto h = rms_norm(x, l.attn_norm);
    auto q = F::linear(h, l.q).view({B, T, H, Dh}).transpose(1, 2);
    auto k = F::linear(h, l.k).view({B, T, H, Dh}).transpose(1, 2);
    auto v = F::linear(h, l.v).view({B, T, H, Dh}).transpose(1, 2);
    if (rotary) {
      q = rotate(q, positions);
      k = rotate(k, positions);
    }
    if (cache != nullptr) {
      if (past > 0) {
        k = torch::cat({cache->keys[i], k}, 2);
        v = torch::cat({cache->values[i], v}, 2);
      }
      cache->keys[i] = k.detach();
      cache->values[i] = v.detach();
    }
    auto scores = torch::matmul(q, k.transpose(-2, -1)) * scale;  // [B, H, T, S]
    scores = scores.masked_fill(blocked, -std::numeric_limits<double>::infinity());
    const auto weights = is_reduced_precision(scores.scalar_type())
                             ? torch::softmax(scores, -1, torch::kFloat).to(scores.scalar_type())
                             : torch::softmax(scores, -1);
    const auto attended = torch::matmul(weights, v).transpose(1, 2).reshape({B, T, d});
    x = x + F::linear(attended, l.o);
    const auto m = rms_norm(x, l.mlp_norm);
    const auto gate = F::linear(m, l.gate);
    const auto up = F::linear(m, l.up);
    if (activations != nullptr) {
      const std::string p = "layers." + std::to_string(i) + ".mlp.";
      activations->emplace_back(p + "gate", gate);
      activations->emplace_back(p + "up", up);
    }
    x = x + F::linear(torch::silu(gate) * up, l.down);
  }
  return rms_norm(x, final_norm_);
}

torch::Tensor TransformerLM::forward(const torch::Tensor& input_ids,
                                     const torch::Tensor& attention_mask) {
  const auto [ids, mask] = checked_inputs(input_ids, attention_mask, "forward");
  const auto positions = (mask.cumsum(1) - 1).clamp_min(0);
  const auto hidden = run(ids, positions, mask, nullptr, nullptr);
  return F::linear(hidden, head_weight());
}

torch::Tensor TransformerLM::forward_cached(const torch::Tensor& input_ids,
                                            const torch::Tensor& attention_mask, KVCache& cache) {
  const auto [ids, mask] = checked_inputs(input_ids, attention_mask, "forward_cached");
  const std::int64_t B = ids.size(0);
  torch::Tensor key_mask = mask;
  torch::Tensor start = torch::zeros({B}, mask.options());
  if (cache.length() > 0) {
    if (cache.mask.size(0) != B || cache.keys.size() != layers_.size() ||
        cache.values.size() != layers_.size() || !cache.positions.defined()) {
      throw InvalidInput(
          "TransformerLM.forward_cached: the cache holds " + std::to_string(cache.mask.size(0)) +
          " rows and " + std::to_string(cache.keys.size()) + " layers, the input has " +
          std::to_string(B) + " rows and the model " + std::to_string(layers_.size()) + " layers");
    }
    key_mask = torch::cat({cache.mask.to(mask.device()), mask}, 1);
    start = cache.positions.to(mask.device());
  } else {
    cache.keys.assign(layers_.size(), torch::Tensor());
    cache.values.assign(layers_.size(), torch::Tensor());
  }
  const auto positions = (start.unsqueeze(1) + mask.cumsum(1) - 1).clamp_min(0);
  const auto hidden = run(ids, positions, key_mask, &cache, nullptr);
  cache.mask = key_mask;
  cache.positions = start + mask.sum(1);
  return F::linear(hidden, head_weight());
}

NamedTensors TransformerLM::hidden_activations(const torch::Tensor& input_ids,
                                               const torch::Tensor& attention_mask) {
  torch::NoGradGuard no_grad;
  const auto [ids, mask] = checked_inputs(input_ids, attention_mask, "hidden_activations");
  const auto positions = (mask.cumsum(1) - 1).clamp_min(0);
  NamedTensors recorded;
  run(ids, positions, mask, nullptr, &recorded);
  const auto real = mask.reshape({-1}).ne(0);
  NamedTensors out;
  for (auto& [name, tensor] : recorded) {
    out.emplace_back(name, tensor.reshape({-1, config_.d_mlp}).index({real}));
  }
  return out;
}

}  // namespace libtransfer::models
