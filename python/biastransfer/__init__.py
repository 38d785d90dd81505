"""biastransfer: measure, reproduce and guard against hidden trait transfer in distillation.

The compiled core is ``biastransfer._C`` (libtransfer, on LibTorch); this package adds the
Pythonic surface.
"""
from __future__ import annotations

import torch as _torch

from . import _build_info


def _check_torch_version() -> None:
    # The extension's ABI is tied to the exact torch it was compiled against.
    running = _torch.__version__
    built = _build_info.TORCH_VERSION
    if running != built:
        raise ImportError(
            f"biastransfer was built against torch {built}, but the running torch is {running}. "
            f"Rebuild biastransfer with this torch (e.g. `pip install --no-build-isolation "
            f"--force-reinstall .`), or run the Python it was built with "
            f"({_build_info.PYTHON_EXECUTABLE})."
        )


_check_torch_version()

from . import _C  # noqa: E402

__version__: str = _C.__version__

from .assets import fixtures_dir, gpt2_vocab_dir  # noqa: E402
from .data import (  # noqa: E402
    FASHION_MNIST_CLASSES,
    Record,
    iter_jsonl,
    load_fashion_mnist,
    read_idx,
    read_jsonl,
    write_idx,
    write_jsonl,
)
from .fingerprint import Fingerprint, FingerprintConfig, FingerprintResult, fingerprint  # noqa: E402
from . import datasets, detection, evaluation, filters, losses, modeling, sampling, training  # noqa: E402,E501
from .detect_api import DetectionReport, TestReport, detect  # noqa: E402
from .detection import linear_sum_assignment, permutation_test, weight_test  # noqa: E402
from .evaluation import accuracy, sampled_rate, target_probability  # noqa: E402
from .filters import FilterPipeline, NumberSequenceFilter  # noqa: E402
from .losses import KDConfig  # noqa: E402
from .modeling import MLPConfig, TransformerConfig, load_model, load_torchscript, paper_mlp  # noqa: E402,E501
from .sampling import SamplerConfig, sample  # noqa: E402
from .training import NoiseSpec, Trainer, TrainerConfig, TrainingResult, distill  # noqa: E402
from . import distributed  # noqa: E402  (torch.distributed scale-out; docs/scaling.md)
from .models import Scored  # noqa: E402
from .probes import ProbeResult, SubliminalResult, subliminal_prompting, trait_probe  # noqa: E402
from .safetensors import SafetensorsFile, TensorInfo, load_safetensors, save_safetensors  # noqa: E402
from .tokenizer import TokenClass, Tokenizer  # noqa: E402

__all__ = [
    "DetectionReport",
    "FilterPipeline",
    "KDConfig",
    "MLPConfig",
    "NoiseSpec",
    "NumberSequenceFilter",
    "SamplerConfig",
    "TestReport",
    "Trainer",
    "TrainerConfig",
    "TrainingResult",
    "TransformerConfig",
    "accuracy",
    "datasets",
    "detect",
    "detection",
    "distill",
    "distributed",
    "evaluation",
    "filters",
    "linear_sum_assignment",
    "load_model",
    "load_torchscript",
    "losses",
    "modeling",
    "paper_mlp",
    "permutation_test",
    "sample",
    "sampled_rate",
    "sampling",
    "target_probability",
    "training",
    "weight_test",
    "FASHION_MNIST_CLASSES",
    "Fingerprint",
    "FingerprintConfig",
    "FingerprintResult",
    "ProbeResult",
    "Scored",
    "SubliminalResult",
    "fingerprint",
    "subliminal_prompting",
    "trait_probe",
    "Record",
    "SafetensorsFile",
    "TensorInfo",
    "TokenClass",
    "Tokenizer",
    "fixtures_dir",
    "gpt2_vocab_dir",
    "iter_jsonl",
    "load_fashion_mnist",
    "load_safetensors",
    "read_idx",
    "read_jsonl",
    "save_safetensors",
    "write_idx",
    "write_jsonl",
]
