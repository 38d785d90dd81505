"""Models through Python: the built-in MLP and TransformerLM (callable, autograd into the C++
parameters, state dicts, save/load), TorchScript modules loaded in C++, and nn.Modules wrapped so
that C++ drives them."""
from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

from biastransfer import _C, modeling
from biastransfer.modeling import MLPConfig, TransformerConfig


def eager_mlp(model: "_C.Model", x: torch.Tensor) -> torch.Tensor:
    """relu(x W^T + b) layer by layer in float64, from the model's parameters."""
    params = dict(model.named_parameters())
    layers = len(params) // 2
    h = x.double()
    for i in range(layers):
        weight = params[f"layers.{i}.weight"].detach().double()
        h = h @ weight.T + params[f"layers.{i}.bias"].detach().double()
        if i + 1 < layers:
            h = h.clamp_min(0)
    return h


def test_paper_mlp_is_callable_and_matches_the_eager_formula():
    model = modeling.paper_mlp(seed=3)
    assert model.input_kind == "features" and model.input_size == 784 and model.output_size == 13
    assert model.class_outputs == 10 and model.aux_outputs == 3
    x = torch.rand(5, 784) * 2 - 1
    logits = model(x)
    assert logits.shape == (5, 13)
    torch.testing.assert_close(logits.double(), eager_mlp(model, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.aux_logits(logits), logits[:, 10:])
    w = dict(model.named_parameters())["layers.0.weight"]
    assert abs(w.std().item() - 1 / math.sqrt(784)) < 0.01 / math.sqrt(784) * 3
    assert dict(model.named_parameters())["layers.0.bias"].abs().sum().item() == 0
    same = modeling.paper_mlp(seed=3)
    assert torch.equal(same(x), logits)


def test_python_autograd_and_optimizers_reach_the_cpp_parameters():
    model = MLPConfig(sizes=[4, 8, 3], aux_outputs=1, seed=1).build()
    x = torch.randn(16, 4)
    target = torch.randint(0, 2, (16,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model(x).detach()
    loss = torch.nn.functional.cross_entropy(model.class_logits(model(x)), target)
    loss.backward()
    names = [name for name, _ in model.named_parameters()]
    assert names == ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"]
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    # The same tensors every time: an optimizer built on parameters() updates the model.
    assert model.parameters()[0] is model.parameters()[0]
    optimizer.step()
    assert not torch.equal(model(x).detach(), before)


def test_transformer_builds_from_its_config_and_round_trips(tmp_path):
    config = TransformerConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, d_mlp=24,
                               positions="learned", tied_head=False, seed=7, init_std=0.2)
    model = config.build()
    assert sum(p.numel() for p in model.parameters()) == config.num_parameters()
    assert model.num_parameters == config.num_parameters()
    assert model.input_kind == "tokens" and model.output_size == 50 and model.supports_kv_cache
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    logits = model(ids, attention_mask=mask)
    assert logits.shape == (2, 5, 50)
    # Left padding: the padded row's real positions equal the row alone.
    torch.testing.assert_close(logits[0, 2:], model(torch.tensor([[5, 6, 7]]))[0])
    acts = model.hidden_activations(ids, mask)
    assert sorted(acts) == ["layers.0.mlp.gate", "layers.0.mlp.up", "layers.1.mlp.gate",
                            "layers.1.mlp.up"]
    assert acts["layers.1.mlp.up"].shape == (8, 24)
    path = tmp_path / "lm.safetensors"
    model.save(str(path), metadata={"run": "test"})
    loaded = modeling.load_model(path)
    assert isinstance(loaded, _C.TransformerLM)
    assert torch.equal(loaded(ids, mask), logits.detach())
    for (name_a, a), (name_b, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name_a == name_b and torch.equal(a, b)
    # KV cache through Python.
    cache = _C.KVCache()
    first = model.forward_cached(ids[:, :3], mask[:, :3], cache)
    rest = model.forward_cached(ids[:, 3:], mask[:, 3:], cache)
    assert cache.length == 5
    full = torch.cat([first, rest], 1)
    torch.testing.assert_close(full[mask.bool()], logits[mask.bool()], rtol=1e-5, atol=1e-5)


def test_state_dict_errors_are_value_errors():
    model = MLPConfig(sizes=[3, 2], aux_outputs=0).build()
    state = model.state_dict()
    state["layers.0.weight"] = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"layers\.0\.weight.*\[2, 3\].*\[2, 4\]"):
        model.load_state_dict(state)
    state = model.state_dict()
    del state["layers.0.bias"]
    with pytest.raises(ValueError, match="missing"):
        model.load_state_dict(state)
    model.load_state_dict(state, strict=False)
    state = model.state_dict()
    state["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        model.load_state_dict(state)
    with pytest.raises(ValueError, match="aux_outputs"):
        MLPConfig(sizes=[3, 2], aux_outputs=2).build()
    with pytest.raises(ValueError, match="n_heads"):
        TransformerConfig(d_model=30, n_heads=4).build()


def test_to_clone_train_eval():
    model = TransformerConfig(vocab_size=20, seed=1).build()
    weight = model.parameters()[0]
    assert model.to(dtype=torch.float64) is model
    assert weight.dtype == torch.float64 and model.dtype == torch.float64
    assert model.parameters()[0] is weight
    copy = model.clone()
    with torch.no_grad():
        copy.parameters()[0].add_(1)
    assert not torch.equal(copy.parameters()[0], weight)
    assert model.train() is model and model.eval() is model
    assert "transformer" in repr(model)


class TinyLM(torch.nn.Module):
    """Embedding -> mean of the visible prefix -> linear head, with an optional mask."""

    def __init__(self, vocab: int = 11, width: int = 6, output: str = "tensor") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, vocab)
        self.output = output

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1).to(h.dtype)
        h = h.cumsum(1)
        logits = self.head(h)
        if self.output == "tuple":
            return (logits, h)
        if self.output == "dict":
            return {"logits": logits, "hidden": h}
        if self.output == "hf":
            return _HFOutput(logits)
        return logits


class _HFOutput:
    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits


@pytest.mark.parametrize("output", ["tensor", "tuple", "dict", "hf"])
def test_wrapped_modules_give_their_logits_and_share_parameters(output):
    module = TinyLM(output=output)
    model = modeling.wrap(module)
    assert isinstance(model, _C.Model)
    assert model.input_kind == "tokens" and model.output_size == 11
    assert model.mask_argument == "attention_mask"
    ids = torch.tensor([[0, 3, 4], [1, 2, 5]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    expected = TinyLM(output="tensor")(ids, mask)
    torch.testing.assert_close(model(ids, mask), expected)
    pairs = model.named_parameters()
    assert [n for n, _ in pairs] == [n for n, _ in module.named_parameters()]
    for (_, a), (_, b) in zip(pairs, module.named_parameters()):
        assert a is b
    model.eval()
    assert not module.training
    model.train()
    assert module.training
    with pytest.raises(ValueError, match="deepcopy"):
        model.clone()


def test_wrap_infers_features_from_a_first_linear_layer():
    module = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    model = modeling.wrap(module)
    assert model.input_kind == "features" and model.input_size == 5 and model.output_size == 3
    x = torch.randn(4, 5)
    torch.testing.assert_close(model(x), module(x))
    explicit = modeling.wrap(module, input_kind="features", output_size=3, input_size=5)
    assert explicit.output_size == 3


def test_a_cpp_driven_module_is_trained_in_place_through_its_own_tensors():
    module = torch.nn.Sequential(torch.nn.Linear(3, 2))
    model = modeling.wrap(module)
    # A state dict loaded from C++ lands in the module's own parameters.
    new_weight = torch.arange(6, dtype=torch.float32).view(2, 3)
    model.load_state_dict({"0.weight": new_weight, "0.bias": torch.zeros(2)})
    assert torch.equal(module[0].weight.detach(), new_weight)


def test_non_models_are_type_errors():
    with pytest.raises(TypeError, match="model"):
        _C.sample(3, [[1]], _C.SamplerConfig())
    with pytest.raises(TypeError, match="module"):
        modeling.wrap(object())


class ScriptLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(13, 4)
        self.head = torch.nn.Linear(4, 13, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1).to(torch.float32)
        return self.head(h.cumsum(1)), h


class ScriptClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(6, 4)

    def forward(self, x: torch.Tensor):
        return {"logits": self.layer(x)}


def test_torchscript_modules_load_in_cpp_and_match_python(tmp_path):
    torch.manual_seed(1)
    lm = ScriptLM()
    path = tmp_path / "lm.pt"
    torch.jit.script(lm).save(str(path))
    model = modeling.load_torchscript(path)
    assert model.input_kind == "tokens" and model.output_size == 13
    assert model.passes_attention_mask
    ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    torch.testing.assert_close(model(ids, mask), lm(ids, mask)[0])
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in lm.named_parameters()]
    copy = model.clone()
    with torch.no_grad():
        copy.parameters()[0].add_(1.0)
    torch.testing.assert_close(model(ids, mask), lm(ids, mask)[0])
    # Training through the Model updates the module's own tensors.
    model(ids, mask).sum().backward()
    assert all(p.grad is not None for p in model.parameters())

    classifier = ScriptClassifier()
    cpath = tmp_path / "classifier.pt"
    torch.jit.trace(classifier, torch.zeros(1, 6), strict=False).save(str(cpath))
    loaded = modeling.load_torchscript(cpath)
    assert loaded.input_kind == "features" and loaded.input_size == 6 and loaded.output_size == 4
    x = torch.randn(3, 6)
    torch.testing.assert_close(loaded(x), classifier(x)["logits"])
    with pytest.raises(OSError):
        modeling.load_torchscript(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="TorchScript"):
        modeling.load_torchscript(tmp_path / "junk.pt")
