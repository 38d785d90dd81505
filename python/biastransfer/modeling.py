"""Models for the distillation pillars: the built-in C++ models, TorchScript modules, and Python
``torch.nn.Module`` objects wrapped so that the C++ sampler, trainer and detector can drive them.

Every object returned here is a ``biastransfer._C.Model``: callable (``model(x)`` returns logits
with autograd into the parameters), with ``named_parameters()``, ``state_dict()``,
``load_state_dict()``, ``save(path)``, ``train()``/``eval()``, ``clone()`` and ``to(device)``.

Shapes: language models take token ids ``[B, T]`` (int64) and an optional ``attention_mask``
``[B, T]`` (1 real, 0 padding; left padding supported) and return ``[B, T, V]``; feature models
(the MLP) take ``[B, F]`` floats and return ``[B, C]``.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import asdict, dataclass, field
from typing import Any, List, Optional, Union

import torch

from . import _C

__all__ = [
    "MLPConfig",
    "Model",
    "TransformerConfig",
    "load_model",
    "load_torchscript",
    "paper_mlp",
    "wrap",
]

PathLike = Union[str, "os.PathLike[str]"]
Model = _C.Model

# The MNIST auxiliary-logit experiment's network (Cloud et al. 2025): 784 inputs, two hidden
# layers of 256, 10 class logits and 3 auxiliary logits.
PAPER_MLP_SIZES = (784, 256, 256, 13)
PAPER_MLP_AUX_OUTPUTS = 3


@dataclass
class MLPConfig:
    """An MLP with auxiliary logits.

    ``sizes`` = (inputs, hidden..., outputs); the last ``aux_outputs`` outputs are auxiliary.
    Weights are drawn N(0, 1/sqrt(fan_in)) from a generator seeded with ``seed``; biases are 0.
    """

    sizes: List[int] = field(default_factory=lambda: list(PAPER_MLP_SIZES))
    aux_outputs: int = PAPER_MLP_AUX_OUTPUTS
    seed: int = 0

    def build(self) -> "_C.MLP":
        """The model (float32 on the CPU)."""
        return _C.MLP(list(self.sizes), aux_outputs=self.aux_outputs, seed=self.seed)


@dataclass
class TransformerConfig:
    """A decoder-only transformer language model (RMSNorm, causal attention, SwiGLU MLP).

    ``positions`` is ``"rotary"`` or ``"learned"``; ``tied_head`` shares the embedding matrix
    with the output head. ``init_std`` is the standard deviation of the weight matrices (the
    attention-output and MLP-down projections get ``init_std / sqrt(2 n_layers)``).
    """

    vocab_size: int = 256
    d_model: int = 32
    n_layers: int = 1
    n_heads: int = 4
    d_mlp: int = 64
    max_seq_len: int = 256
    positions: str = "rotary"
    tied_head: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    seed: int = 0
    init_std: float = 0.02

    def build(self) -> "_C.TransformerLM":
        """The model (float32 on the CPU)."""
        return _C.TransformerLM(**asdict(self))

    def num_parameters(self) -> int:
        """Parameter count by the closed form (no model is built)."""
        return _C.transformer_parameter_count(
            vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
            d_mlp=self.d_mlp, max_seq_len=self.max_seq_len, positions=self.positions,
            tied_head=self.tied_head)


def paper_mlp(seed: int = 0) -> "_C.MLP":
    """The paper's MLP 784-256-256-(10+3) with the initialization drawn from ``seed``."""
    return MLPConfig(seed=seed).build()


def load_model(path: PathLike) -> "_C.Model":
    """A built-in model (MLP or TransformerLM) saved with ``model.save(path)``."""
    return _C.load_model(os.fspath(path))


def load_torchscript(path: PathLike, input_kind: Optional[str] = None, output_size: int = 0,
                     input_size: int = 0,
                     device: Union[str, torch.device, None] = None) -> "_C.TorchScriptModel":
    """A TorchScript archive (``torch.jit.save``) as a Model.

    ``input_kind`` ``"tokens"`` / ``"features"`` (None: detected with probe forwards),
    ``output_size`` (0: detected), ``input_size`` for feature models (0: the first 2-D
    parameter's column count). Only TorchScript archives are loaded, never arbitrary pickles.
    """
    return _C.TorchScriptModel.load(os.fspath(path), input_kind=input_kind,
                                    output_size=output_size, input_size=input_size, device=device)


_MASK_ARGUMENTS = ("attention_mask", "mask")


def _mask_argument(module: Any) -> str:
    """The keyword under which the module's forward takes the attention mask ('' if none)."""
    forward = getattr(module, "forward", module)
    try:
        parameters = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return ""
    for name in _MASK_ARGUMENTS:
        if name in parameters:
            return name
    return ""


def _first_layer(module: Any) -> Optional[torch.nn.Module]:
    """The first leaf submodule that holds parameters (registration order)."""
    if not isinstance(module, torch.nn.Module):
        return None
    for sub in module.modules():
        is_leaf = next(iter(sub.children()), None) is None
        if is_leaf and next(sub.parameters(False), None) is not None:
            return sub
    return None


def _infer_kind(module: Any) -> tuple:
    """(input_kind, input_size) from the module's structure: Hugging Face configs and a first
    nn.Embedding mean tokens; a first nn.Linear means features of its in_features."""
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "vocab_size", None) is not None:
        return "tokens", 0
    first = _first_layer(module)
    if isinstance(first, torch.nn.Linear):
        return "features", first.in_features
    return "tokens", 0


def wrap(module: Any, input_kind: Optional[str] = None, output_size: Optional[int] = None,
         input_size: Optional[int] = None, name: Optional[str] = None) -> "_C.Model":
    """A ``torch.nn.Module`` (or an HF-style model) as a Model the C++ pillars can drive.

    The forward is called with the attention mask when it takes ``attention_mask`` (or
    ``mask``); the logits are the output itself, its ``.logits``, its ``["logits"]`` or its first
    element. ``input_kind`` (``"tokens"`` or ``"features"``) is inferred when not given: a first
    ``nn.Linear`` layer means features, anything else tokens. ``output_size`` (V or C) is probed
    with one forward when not given. Parameters are the module's own tensors, so a C++ optimizer
    trains the module in place. A bound Model is returned unchanged.
    """
    if isinstance(module, _C.Model):
        return module
    if not callable(module) or not hasattr(module, "named_parameters"):
        raise TypeError(f"module: expected a torch.nn.Module (callable with named_parameters), "
                        f"got {type(module).__name__}")
    inferred_kind, inferred_size = _infer_kind(module)
    kind = input_kind if input_kind is not None else inferred_kind
    size = input_size if input_size is not None else (inferred_size if kind == "features" else 0)
    return _C.WrappedModule(module, input_kind=kind, output_size=output_size or 0,
                            input_size=size, mask_argument=_mask_argument(module),
                            name=name or f"python:{type(module).__name__}")
