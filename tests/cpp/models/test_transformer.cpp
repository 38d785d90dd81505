// TransformerLM against a brute-force float64 reference written here (one row at a time, real
// tokens only, explicit per-head loops and pairwise rotary rotations); causality, padding
// invariance, the KV cache, parameter names and counts, hidden activations, save/load.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <map>

#include "../test_support.h"
#include "libtransfer/errors.h"
#include "libtransfer/models/model.h"
#include "libtransfer/models/transformer.h"

using libtransfer::InvalidInput;
using namespace libtransfer::models;

namespace {

std::map<std::string, torch::Tensor> params64(TransformerLM& model) {
  std::map<std::string, torch::Tensor> out;
  for (auto& [name, t] : model.named_parameters()) out[name] = t.detach().to(torch::kDouble);
  return out;
}

torch::Tensor rms(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  return x / torch::sqrt((x * x).mean(-1, true) + eps) * w;
}

// Rotates pairs (i, i + half) of a [T, Dh] matrix by position * theta^(-2i/Dh).
torch::Tensor rope(const torch::Tensor& x, double theta) {
  const auto T = x.size(0);
  const auto Dh = x.size(1);
  auto out = x.clone();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t i = 0; i < Dh / 2; ++i) {
      const double angle = double(t) * std::pow(theta, -2.0 * double(i) / double(Dh));
      const double a = x[t][i].item<double>();
      const double b = x[t][i + Dh / 2].item<double>();
      out[t][i] = a * std::cos(angle) - b * std::sin(angle);
      out[t][i + Dh / 2] = b * std::cos(angle) + a * std::sin(angle);
    }
  }
  return out;
}

struct Reference {
  torch::Tensor logits;                 // [n, V]
  std::vector<torch::Tensor> gate, up;  // per layer [n, d_mlp]
};

// The model on one unpadded sequence, in float64, written independently of the library.
Reference reference(TransformerLM& model, const std::vector<int64_t>& ids) {
  const auto& c = model.config();
  auto p = params64(model);
  const auto n = int64_t(ids.size());
  const auto index = torch::tensor(ids, torch::kLong);
  auto x = p["embed.weight"].index_select(0, index);
  if (c.positions == "learned") x = x + p["pos.weight"].narrow(0, 0, n);
  const auto Dh = c.d_model / c.n_heads;
  Reference out;
  for (int64_t l = 0; l < c.n_layers; ++l) {
    const std::string pre = "layers." + std::to_string(l) + ".";
    const auto h = rms(x, p[pre + "attn_norm.weight"], c.norm_eps);
    const auto q = h.mm(p[pre + "attn.q.weight"].t());
    const auto k = h.mm(p[pre + "attn.k.weight"].t());
    const auto v = h.mm(p[pre + "attn.v.weight"].t());
    auto heads = torch::zeros({n, c.d_model}, torch::kDouble);
    for (int64_t hd = 0; hd < c.n_heads; ++hd) {
      auto qh = q.narrow(1, hd * Dh, Dh);
      auto kh = k.narrow(1, hd * Dh, Dh);
      const auto vh = v.narrow(1, hd * Dh, Dh);
      if (c.positions == "rotary") {
        qh = rope(qh, c.rope_theta);
        kh = rope(kh, c.rope_theta);
      }
      for (int64_t t = 0; t < n; ++t) {
        const auto scores = kh.narrow(0, 0, t + 1).mv(qh[t]) / std::sqrt(double(Dh));
        const auto w = torch::exp(scores - scores.max());
        heads[t]
            .narrow(0, hd * Dh, Dh)
            .copy_((w / w.sum()).unsqueeze(0).mm(vh.narrow(0, 0, t + 1))[0]);
      }
    }
    x = x + heads.mm(p[pre + "attn.o.weight"].t());
    const auto m = rms(x, p[pre + "mlp_norm.weight"], c.norm_eps);
    const auto g = m.mm(p[pre + "mlp.gate.weight"].t());
    const auto u = m.mm(p[pre + "mlp.up.weight"].t());
    out.gate.push_back(g);
    out.up.push_back(u);
    x = x + (g * torch::sigmoid(g) * u).mm(p[pre + "mlp.down.weight"].t());
  }
  x = rms(x, p["final_norm.weight"], c.norm_eps);
  const auto head = c.tied_head ? p["embed.weight"] : p["head.weight"];
  out.logits = x.mm(head.t());
  return out;
}

TransformerConfig small(const std::string& positions, bool tied) {
  TransformerConfig c;
  c.vocab_size = 23;
  c.d_model = 16;
  c.n_layers = 2;
  c.n_heads = 2;
  c.d_mlp = 24;
  c.max_seq_len = 32;
  c.positions = positions;
  c.tied_head = tied;
  c.seed = 4;
  c.init_std = 0.3;  // large weights, so that every part of the network matters
  return c;
}

// Left-pads rows with `pad` to the longest row: (ids, mask).
std::pair<torch::Tensor, torch::Tensor> left_pad(const std::vector<std::vector<int64_t>>& rows,
                                                 int64_t pad = 0) {
  size_t longest = 0;
  for (const auto& r : rows) longest = std::max(longest, r.size());
  auto ids = torch::full({int64_t(rows.size()), int64_t(longest)}, pad, torch::kLong);
  auto mask = torch::zeros_like(ids);
  for (size_t b = 0; b < rows.size(); ++b) {
    const auto offset = int64_t(longest - rows[b].size());
    for (size_t t = 0; t < rows[b].size(); ++t) {
      ids[int64_t(b)][offset + int64_t(t)] = rows[b][t];
      mask[int64_t(b)][offset + int64_t(t)] = 1;
    }
  }
  return {ids, mask};
}

const std::vector<std::vector<int64_t>> kRows = {{3, 7, 1, 22, 5, 9}, {4, 4, 18}, {0, 11, 2, 6}};

}  // namespace

TEST_CASE("TransformerLM equals a brute-force float64 reference, padded or not",
          "[models][transformer]") {
  for (const auto& positions : {std::string("rotary"), std::string("learned")}) {
    for (const bool tied : {true, false}) {
      DYNAMIC_SECTION(positions << (tied ? " tied" : " untied")) {
        TransformerLM model(small(positions, tied));
        model.to(torch::kCPU, torch::kDouble);
        const auto [ids, mask] = left_pad(kRows, 13);
        const auto logits = model.forward(ids, mask);
        REQUIRE(logits.sizes() == torch::IntArrayRef({3, 6, 23}));
        const auto acts = model.hidden_activations(ids, mask);
        REQUIRE(acts.size() == 4);
        CHECK(acts[0].first == "layers.0.mlp.gate");
        CHECK(acts[1].first == "layers.0.mlp.up");
        CHECK(acts[3].first == "layers.1.mlp.up");
        int64_t offset = 0;
        for (size_t b = 0; b < kRows.size(); ++b) {
          const auto n = int64_t(kRows[b].size());
          const auto expected = reference(model, kRows[b]);
          const auto got = logits[int64_t(b)].narrow(0, 6 - n, n);
          CHECK(torch::allclose(got, expected.logits, 1e-10, 1e-10));
          // The same row alone (no padding) gives the same logits.
          const auto alone = model.forward(torch::tensor(kRows[b]).unsqueeze(0))[0];
          CHECK(torch::allclose(alone, expected.logits, 1e-10, 1e-10));
          for (int64_t l = 0; l < 2; ++l) {
            CHECK(torch::allclose(acts[2 * l].second.narrow(0, offset, n), expected.gate[l], 1e-10,
                                  1e-10));
            CHECK(torch::allclose(acts[2 * l + 1].second.narrow(0, offset, n), expected.up[l],
                                  1e-10, 1e-10));
          }
          offset += n;
        }
        CHECK(acts[0].second.size(0) == offset);  // real positions only
      }
    }
  }
}

TEST_CASE("TransformerLM is causal", "[models][transformer]") {
  TransformerLM model(small("rotary", true));
  auto ids = torch::tensor(std::vector<int64_t>{1, 2, 3, 4, 5, 6}).unsqueeze(0);
  const auto before = model.forward(ids);
  ids[0][4] = 20;
  const auto after = model.forward(ids);
  CHECK(torch::equal(before.narrow(1, 0, 4), after.narrow(1, 0, 4)));
  CHECK_FALSE(torch::allclose(before.narrow(1, 4, 2), after.narrow(1, 4, 2)));
}

TEST_CASE("forward_cached equals the full forward, with left padding", "[models][transformer]") {
  for (const auto& positions : {std::string("rotary"), std::string("learned")}) {
    DYNAMIC_SECTION(positions) {
      TransformerLM model(small(positions, false));  // float32
      std::vector<std::vector<int64_t>> rows = kRows;
      const std::vector<std::vector<int64_t>> more = {{8, 1, 2, 3}, {5, 6, 7, 8}, {9, 10, 0, 1}};
      for (size_t b = 0; b < rows.size(); ++b)
        rows[b].insert(rows[b].end(), more[b].begin(), more[b].end());
      const auto [prompt_ids, prompt_mask] = left_pad(kRows);
      const auto extra =
          torch::tensor(std::vector<int64_t>{8, 1, 2, 3, 5, 6, 7, 8, 9, 10, 0, 1}).view({3, 4});
      const auto ids = torch::cat({prompt_ids, extra}, 1);
      const auto mask = torch::cat({prompt_mask, torch::ones_like(extra)}, 1);
      const auto full = model.forward(ids, mask);

      KVCache cache;
      std::vector<torch::Tensor> pieces{model.forward_cached(prompt_ids, prompt_mask, cache)};
      pieces.push_back(
          model.forward_cached(extra.narrow(1, 0, 1), torch::ones({3, 1}, torch::kLong), cache));
      pieces.push_back(
          model.forward_cached(extra.narrow(1, 1, 2), torch::ones({3, 2}, torch::kLong), cache));
      pieces.push_back(
          model.forward_cached(extra.narrow(1, 3, 1), torch::ones({3, 1}, torch::kLong), cache));
      CHECK(cache.length() == 10);
      CHECK(torch::equal(cache.positions, torch::tensor(std::vector<int64_t>{10, 7, 8})));
      const auto cached = torch::cat(pieces, 1);
      const auto real = mask.to(torch::kBool);
      CHECK((cached.index({real}) - full.index({real})).abs().max().item<double>() < 1e-5);
    }
  }
}

TEST_CASE("TransformerLM parameters: names, count, tied head, seeding", "[models][transformer]") {
  auto config = small("learned", false);
  TransformerLM untied(config);
  const auto params = untied.named_parameters();
  int64_t count = 0;
  for (const auto& [name, t] : params) count += t.numel();
  CHECK(count == config.parameter_count());
  const int64_t V = 23, d = 16, L = 32, m = 24;
  CHECK(count == V * d + L * d + 2 * (2 * d + 4 * d * d + 3 * d * m) + d + V * d);
  std::vector<std::string> names;
  for (const auto& [name, t] : params) names.push_back(name);
  const std::vector<std::string> expected_first = {"embed.weight",
                                                   "pos.weight",
                                                   "layers.0.attn_norm.weight",
                                                   "layers.0.attn.q.weight",
                                                   "layers.0.attn.k.weight",
                                                   "layers.0.attn.v.weight",
                                                   "layers.0.attn.o.weight",
                                                   "layers.0.mlp_norm.weight",
                                                   "layers.0.mlp.gate.weight",
                                                   "layers.0.mlp.up.weight",
                                                   "layers.0.mlp.down.weight"};
  CHECK(std::vector<std::string>(names.begin(), names.begin() + 11) == expected_first);
  CHECK(names[names.size() - 2] == "final_norm.weight");
  CHECK(names.back() == "head.weight");
  CHECK(params[8].second.sizes() == torch::IntArrayRef({24, 16}));
  CHECK(params[10].second.sizes() == torch::IntArrayRef({16, 24}));

  auto tied_config = small("rotary", true);
  TransformerLM tied(tied_config);
  int64_t tied_count = 0;
  for (const auto& [name, t] : tied.named_parameters()) {
    CHECK(name != "head.weight");
    CHECK(name != "pos.weight");
    tied_count += t.numel();
  }
  CHECK(tied_count == V * d + 2 * (2 * d + 4 * d * d + 3 * d * m) + d);
  // The tied head is the embedding itself: scaling one embedding row scales that logit.
  const auto ids = torch::tensor(std::vector<int64_t>{1, 2}).unsqueeze(0);
  const auto before = tied.forward(ids);
  {
    torch::NoGradGuard no_grad;
    tied.named_parameters()[0].second[5].mul_(2.0);
  }
  const auto after = tied.forward(ids);
  CHECK(torch::allclose(after.select(2, 5), before.select(2, 5) * 2, 1e-5, 1e-6));
  CHECK(torch::equal(after.select(2, 4), before.select(2, 4)));
  // The gradient of the embedding includes the head's share.
  tied.forward(ids).select(2, 7).sum().backward();
  CHECK(tied.named_parameters()[0].second.grad()[7].abs().sum().item<double>() > 0);

  TransformerLM same(tied_config);
  CHECK(torch::equal(same.named_parameters()[3].second, tied.named_parameters()[3].second));
  tied_config.seed = 5;
  TransformerLM other(tied_config);
  CHECK_FALSE(torch::equal(other.named_parameters()[3].second, same.named_parameters()[3].second));
  // init_std: 0.3 for q, 0.3 / sqrt(2 * 2) for o.
  TransformerConfig wide = small("rotary", true);
  wide.d_model = 128;
  wide.n_heads = 4;
  TransformerLM w(wide);
  CHECK(w.named_parameters()[2].second.std().item<double>() == Approx(0.3).epsilon(0.02));
  CHECK(w.named_parameters()[5].second.std().item<double>() == Approx(0.15).epsilon(0.02));
}

TEST_CASE("TransformerLM checks its config and inputs", "[models][transformer]") {
  auto c = small("rotary", true);
  c.n_heads = 3;
  CHECK_THROWS_WITH(TransformerLM(c), Catch::Contains("n_heads") && Catch::Contains("16"));
  c = small("rotary", true);
  c.positions = "alibi";
  CHECK_THROWS_WITH(TransformerLM(c), Catch::Contains("'alibi'"));
  c = small("rotary", true);
  c.d_model = 6;
  c.n_heads = 2;
  CHECK_THROWS_WITH(TransformerLM(c), Catch::Contains("even head size"));
  TransformerLM model(small("learned", true));
  CHECK_THROWS_WITH(model.forward(torch::full({1, 2}, 23, torch::kLong)),
                    Catch::Contains("[0, 23)"));
  CHECK_THROWS_WITH(model.forward(torch::zeros({1, 33}, torch::kLong)),
                    Catch::Contains("max_seq_len"));
  CHECK_THROWS_AS(model.forward(torch::zeros({1, 3})), libtransfer::WrongType);
  CHECK_THROWS_AS(model.forward(torch::zeros({1, 3}, torch::kLong), torch::ones({1, 2})),
                  InvalidInput);
}

TEST_CASE("TransformerLM save/load and clone", "[models][transformer][io]") {
  libtransfer::testing::TempDir dir;
  TransformerLM model(small("learned", false));
  const auto path = dir.file("lm.safetensors");
  save_model(model, path);
  const auto loaded = load_model(path);
  const auto ids = torch::tensor(std::vector<int64_t>{1, 5, 9}).unsqueeze(0);
  CHECK(torch::equal(loaded->forward(ids), model.forward(ids)));
  CHECK(loaded->describe() == model.describe());
  const auto a = state_dict(model);
  const auto b = state_dict(*loaded);
  REQUIRE(a.size() == b.size());
  for (size_t i = 0; i < a.size(); ++i) CHECK(torch::equal(a[i].second, b[i].second));
  const auto copy = model.clone();
  {
    torch::NoGradGuard no_grad;
    copy->named_parameters()[0].second.add_(1.0);
  }
  CHECK_FALSE(torch::equal(copy->forward(ids), model.forward(ids)));
  CHECK(torch::equal(loaded->forward(ids), model.forward(ids)));
}
