"""Adapters that turn a language model into a logits function, and the per-model prompt prefix.

A model is anything callable on ``input_ids`` [B, T] (int64) that returns next-token logits
[B, T, V]: a ``torch.nn.Module`` returning a tensor, a Hugging Face model returning an object
with ``.logits``, or one returning a tuple (or a dict) whose first element (``"logits"`` key) is
the logits. :func:`as_logits_fn` detects which, passes ``attention_mask`` when the callable
accepts one, and runs it under ``torch.no_grad()`` in eval mode (the mode is restored after).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import torch

__all__ = ["LogitsFn", "ModelSpec", "Scored", "as_logits_fn", "as_scored", "model_device",
           "model_name"]

# (input_ids [B, T] int64, attention_mask [B, T] int64) -> logits [B, T, V] (floating).
LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Scored:
    """A model and the text put before each record's prompt when it scores the completions.

    Use it for the system-prompt trait case: the teacher is ``Scored(model, "You love owls. ")``
    and the reference is the same model with no prefix, so that the same completion tokens are
    scored under both contexts.
    """

    model: Any
    prefix: str = ""
    name: Optional[str] = None  # shown in summaries and saved metadata; default: see model_name


ModelSpec = Union[Scored, "tuple[Any, str]", Any]


def as_scored(spec: ModelSpec, argument: str) -> Scored:
    """A :class:`Scored` from a model, a ``(model, prefix)`` pair or a ``Scored``.

    Raises TypeError naming ``argument`` when it is neither callable nor such a pair."""
    if isinstance(spec, Scored):
        scored = spec
    elif isinstance(spec, tuple):
        if len(spec) != 2 or not isinstance(spec[1], str):
            raise TypeError(
                f"{argument}: a tuple must be (model, prefix_text), got a tuple of "
                f"{len(spec)} elements ({', '.join(type(x).__name__ for x in spec)})"
            )
        scored = Scored(spec[0], spec[1])
    else:
        scored = Scored(spec)
    if not callable(scored.model):
        raise TypeError(
            f"{argument}: expected a model (a callable such as torch.nn.Module), "
            f"a (model, prefix) tuple or a Scored, got {type(scored.model).__name__}"
        )
    if not isinstance(scored.prefix, str):
        raise TypeError(f"{argument}: prefix must be a str, got {type(scored.prefix).__name__}")
    return scored


def model_name(model: Any) -> str:
    """A readable name: Hugging Face ``config._name_or_path``, else ``name_or_path``, else the
    class name."""
    config = getattr(model, "config", None)
    for owner, attribute in ((config, "_name_or_path"), (model, "name_or_path")):
        value = getattr(owner, attribute, None) if owner is not None else None
        if isinstance(value, str) and value:
            return value
    return type(model).__name__


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter or buffer; CPU when it has none."""
    if isinstance(model, torch.nn.Module):
        for tensor in model.parameters():
            return tensor.device
        for tensor in model.buffers():
            return tensor.device
    return torch.device("cpu")


def _accepts_attention_mask(model: Any) -> bool:
    target = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        return False
    return any(
        p.name == "attention_mask" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters
    )


def _logits_of(output: Any, argument: str) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"{argument}: the model returned {type(output).__name__}; expected logits as a tensor, "
        f"an object with .logits, a dict with 'logits' or a tuple whose first element is logits"
    )


def as_logits_fn(model: Any, argument: str = "model") -> LogitsFn:
    """A function ``(input_ids [B,T], attention_mask [B,T]) -> logits [B,T,V]`` for ``model``.

    The call runs under ``torch.no_grad()`` with the module in eval mode (its previous mode is
    restored afterwards, also on error). ``attention_mask`` is passed as a keyword when the
    model's forward has such a parameter or ``**kwargs``. Raises TypeError naming ``argument``
    when the model is not callable or returns no logits, ValueError when the logits are not
    [B, T, V] floating point.
    """
    if not callable(model):
        raise TypeError(f"{argument}: expected a callable model, got {type(model).__name__}")
    with_mask = _accepts_attention_mask(model)

    def logits_fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        was_training = bool(getattr(model, "training", False))
        if isinstance(model, torch.nn.Module):
            model.eval()
        try:
            with torch.no_grad():
                if with_mask:
                    output = model(input_ids, attention_mask=attention_mask)
                else:
                    output = model(input_ids)
        finally:
            if isinstance(model, torch.nn.Module):
                model.train(was_training)
        logits = _logits_of(output, argument)
        if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(input_ids.shape):
            raise ValueError(
                f"{argument}: expected logits of shape [B, T, V] = [{input_ids.shape[0]}, "
                f"{input_ids.shape[1]}, V] for input_ids {list(input_ids.shape)}, "
                f"got {list(logits.shape)}"
            )
        if not logits.is_floating_point():
            raise TypeError(f"{argument}: expected floating-point logits, got {logits.dtype}")
        return logits

    return logits_fn
