"""Reproduction experiments, each a ``run(...)`` function returning a result dataclass.

aux_logits: the auxiliary-logit MLP experiment of Cloud et al. (a student imitating only a
teacher's auxiliary logits on noise learns the teacher's classes, if and only if it shares the
teacher's initialization), on Fashion-MNIST, trained by the C++ trainer.
"""
from __future__ import annotations

__all__ = ["aux_logits"]
