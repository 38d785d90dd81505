"""Bad-input battery: malformed calls across every pillar (io, fingerprint, distill, detect,
models) each raise a typed exception (ValueError / TypeError / OSError) whose message names the
offending argument, file or field; none crashes or hangs the interpreter.

All cases run in one child interpreter (restarted after a crash), so a segfault or an abort fails
its own test instead of killing pytest, and a case silent for CASE_TIMEOUT_S seconds fails as a
hang. Each case is a function of a lazily built context (small models, a small tokenizer, files).
"""
from __future__ import annotations

import json
import math
import os
import select
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

import pytest
import torch

# A case silent this long in the child is a hang (the slowest legitimate case takes ~1 s).
CASE_TIMEOUT_S = 60.0


@dataclass
class Case:
    fn: Callable[["Ctx"], Any]
    error: Tuple[Type[BaseException], ...]
    match: str


CASES: Dict[str, Case] = {}


def case(name: str, error: Union[Type[BaseException], Tuple[Type[BaseException], ...]],
         match: str) -> Callable[[Callable[["Ctx"], Any]], Callable[["Ctx"], Any]]:
    """Registers a case: calling ``fn(ctx)`` must raise ``error`` with a message matching the
    regex ``match`` (searched, case-insensitive)."""

    def register(fn: Callable[["Ctx"], Any]) -> Callable[["Ctx"], Any]:
        assert name not in CASES, name
        CASES[name] = Case(fn, error if isinstance(error, tuple) else (error,), match)
        return fn

    return register


class Ctx:
    """What the cases need, built on first use inside the child (a scratch folder, the small
    tokenizer, toy models, files)."""

    def __init__(self, folder: Path) -> None:
        self.dir = folder
        self._cache: Dict[str, Any] = {}

    def _get(self, key: str, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def path(self, name: str, content: Optional[Union[bytes, str]] = None) -> Path:
        p = self.dir / name
        if content is not None:
            p.write_bytes(content.encode() if isinstance(content, str) else content)
        return p

    @property
    def tok(self):
        from fingerprint_toys import small_tokenizer

        return self._get("tok", lambda: small_tokenizer(self.dir / "tok"))

    @property
    def lm(self):
        from fingerprint_toys import ToyLM

        return self._get("lm", lambda: ToyLM(len(self.tok), seed=0))

    @property
    def mlp(self):
        from biastransfer import MLPConfig

        return self._get("mlp", lambda: MLPConfig(sizes=[6, 8, 5], aux_outputs=2, seed=0).build())

    @property
    def transformer(self):
        from biastransfer import TransformerConfig

        return self._get("transformer", lambda: TransformerConfig(
            vocab_size=len(self.tok), d_model=16, n_heads=2, d_mlp=32, max_seq_len=32).build())

    @property
    def module(self) -> torch.nn.Module:
        def make() -> torch.nn.Module:
            torch.manual_seed(0)
            return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 4))
        return self._get("module", make)

    @property
    def other_module(self) -> torch.nn.Module:
        def make() -> torch.nn.Module:
            torch.manual_seed(1)
            return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 4))
        return self._get("other_module", make)

    @property
    def weights_file(self) -> Path:
        """Plain safetensors weights (no checkpoint or fingerprint metadata)."""
        def make() -> Path:
            from biastransfer import save_safetensors

            p = self.path("weights.safetensors")
            save_safetensors(p, {"w": torch.ones(2, 3)})
            return p
        return self._get("weights_file", make)

    @property
    def text_file(self) -> Path:
        return self._get("text_file", lambda: self.path("notes.txt", "just some text\n"))

    @property
    def pickle_file(self) -> Path:
        def make() -> Path:
            p = self.path("pickled.pt")
            torch.save({"w": torch.ones(2)}, p)
            return p
        return self._get("pickle_file", make)

    @property
    def features(self) -> Tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        return torch.randn(16, 6, generator=g), torch.randint(4, (16,), generator=g)

    def records(self):
        from biastransfer import Record

        return [Record("Continue: 1, 2, 3.", " 4, 5, 6"), Record("Continue: 7, 8.", " 9, 10")]


# ------------------------------------------------------------------------------------------------
# io: tokenizer, safetensors, IDX, JSON lines


@case("tokenizer_missing_vocab", OSError, r"no-such-vocab\.json")
def _(ctx):
    from biastransfer import Tokenizer

    Tokenizer.from_files(ctx.dir / "no-such-vocab.json", ctx.dir / "no-such-merges.txt")


@case("tokenizer_vocab_is_a_folder", OSError, r"vocab")
def _(ctx):
    from biastransfer import Tokenizer

    (ctx.dir / "vocab-folder").mkdir(exist_ok=True)
    Tokenizer.from_files(ctx.dir / "vocab-folder", ctx.path("m.txt", "#version: 0.2\n"))


@case("tokenizer_vocab_not_an_object", ValueError, r"vocab-list\.json")
def _(ctx):
    from biastransfer import Tokenizer

    Tokenizer.from_files(ctx.path("vocab-list.json", "[1, 2, 3]"),
                         ctx.path("m.txt", "#version: 0.2\n"))


@case("tokenizer_json_is_binary", ValueError, r"garbage\.json")
def _(ctx):
    from biastransfer import Tokenizer

    Tokenizer.from_tokenizer_json(ctx.path("garbage.json", bytes(range(256)) * 4))


@case("tokenizer_decode_id_out_of_range", ValueError, r"\bid|ids")
def _(ctx):
    ctx.tok.decode([0, 10**9])


@case("tokenizer_decode_negative_id", ValueError, r"\bid|ids")
def _(ctx):
    ctx.tok.decode([-1])


@case("tokenizer_encode_not_text", TypeError, r"text")
def _(ctx):
    ctx.tok.encode(123)


@case("tokenizer_id_to_token_out_of_range", (ValueError, IndexError), r"\bid")
def _(ctx):
    ctx.tok.id_to_token(len(ctx.tok) + 5)


@case("safetensors_load_text_file", ValueError, r"notes\.txt")
def _(ctx):
    from biastransfer import load_safetensors

    load_safetensors(ctx.text_file)


@case("safetensors_load_missing", OSError, r"missing\.safetensors")
def _(ctx):
    from biastransfer import load_safetensors

    load_safetensors(ctx.dir / "missing.safetensors")


@case("safetensors_load_pickle", ValueError, r"pickled\.pt")
def _(ctx):
    from biastransfer import load_safetensors

    load_safetensors(ctx.pickle_file)


@case("safetensors_save_non_tensor", TypeError, r"'a'|\ba\b")
def _(ctx):
    from biastransfer import save_safetensors

    save_safetensors(ctx.dir / "x.safetensors", {"a": "not a tensor"})


@case("safetensors_save_empty_name", ValueError, r"name")
def _(ctx):
    from biastransfer import save_safetensors

    save_safetensors(ctx.dir / "x.safetensors", {"": torch.ones(1)})


@case("safetensors_save_over_a_folder", OSError, r"a-folder")
def _(ctx):
    from biastransfer import save_safetensors

    (ctx.dir / "a-folder").mkdir(exist_ok=True)
    save_safetensors(ctx.dir / "a-folder", {"a": torch.ones(1)})


@case("safetensors_load_bad_device", (ValueError, TypeError), r"device")
def _(ctx):
    from biastransfer import load_safetensors

    load_safetensors(ctx.weights_file, device="banana")


# A CUDA device this machine lacks (no CUDA at all, or no 100th GPU).
ABSENT_CUDA = "cuda:99" if torch.cuda.is_available() else "cuda"


@case("safetensors_load_to_absent_cuda", ValueError, r"device.*cuda")
def _(ctx):
    from biastransfer import load_safetensors

    load_safetensors(ctx.weights_file, device=ABSENT_CUDA)


@case("safetensors_get_missing_tensor", (ValueError, KeyError), r"'nope'")
def _(ctx):
    from biastransfer import SafetensorsFile

    SafetensorsFile(ctx.weights_file).get_tensor("nope")


@case("idx_read_safetensors_file", ValueError, r"weights\.safetensors")
def _(ctx):
    from biastransfer import read_idx

    read_idx(ctx.weights_file)


@case("idx_read_missing", OSError, r"nothing\.idx")
def _(ctx):
    from biastransfer import read_idx

    read_idx(ctx.dir / "nothing.idx")


@case("idx_write_scalar", ValueError, r"tensor|shape|dimension")
def _(ctx):
    from biastransfer import write_idx

    write_idx(ctx.dir / "scalar.idx", torch.tensor(3.0))


@case("idx_write_complex", TypeError, r"dtype|complex")
def _(ctx):
    from biastransfer import write_idx

    write_idx(ctx.dir / "complex.idx", torch.zeros(2, dtype=torch.complex64))


@case("jsonl_line_not_an_object", ValueError, r"list\.jsonl.*line 2|line 2.*list\.jsonl")
def _(ctx):
    from biastransfer import read_jsonl

    read_jsonl(ctx.path("list.jsonl", '{"prompt": "a", "completion": "b"}\n[1, 2]\n'))


@case("jsonl_invalid_utf8", ValueError, r"bytes\.jsonl")
def _(ctx):
    from biastransfer import read_jsonl

    read_jsonl(ctx.path("bytes.jsonl", b'{"prompt": "\xff\xfe", "completion": "b"}\n'))


@case("jsonl_write_non_string_prompt", (TypeError, ValueError), r"prompt")
def _(ctx):
    from biastransfer import write_jsonl

    write_jsonl(ctx.dir / "out.jsonl", [{"prompt": 1, "completion": "x"}])


@case("jsonl_write_missing_prompt", (ValueError, KeyError), r"prompt")
def _(ctx):
    from biastransfer import write_jsonl

    write_jsonl(ctx.dir / "out.jsonl", [{"completion": "x"}])


# ------------------------------------------------------------------------------------------------
# fingerprint: fingerprint(), accumulators, compare, probes


@case("fingerprint_empty_data", ValueError, r"data|records")
def _(ctx):
    from biastransfer import fingerprint

    fingerprint(ctx.lm, ctx.lm, [], ctx.tok)


@case("fingerprint_zero_temperature", ValueError, r"temperature")
def _(ctx):
    from biastransfer import fingerprint

    fingerprint(ctx.lm, ctx.lm, ctx.records(), ctx.tok, temperature=0.0)


@case("fingerprint_nan_temperature", ValueError, r"temperature")
def _(ctx):
    from biastransfer import fingerprint

    fingerprint(ctx.lm, ctx.lm, ctx.records(), ctx.tok, temperature=math.nan)


@case("fingerprint_zero_batch_size", ValueError, r"batch_size")
def _(ctx):
    from biastransfer import fingerprint

    fingerprint(ctx.lm, ctx.lm, ctx.records(), ctx.tok, batch_size=0)


@case("fingerprint_mismatched_vocabulary", ValueError, r"vocab")
def _(ctx):
    from biastransfer import fingerprint
    from fingerprint_toys import ToyLM

    fingerprint(ToyLM(len(ctx.tok) + 7, seed=1), ctx.lm, ctx.records(), ctx.tok)


@case("fingerprint_nan_logits", ValueError, r"finite|nan")
def _(ctx):
    from biastransfer import fingerprint

    class NanLM(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return self.inner(ids) * math.nan

    fingerprint(NanLM(ctx.lm), ctx.lm, ctx.records(), ctx.tok)


@case("accumulator_zero_vocab", ValueError, r"vocab_size")
def _(ctx):
    from biastransfer import _C

    _C.FingerprintAccumulator(0)


@case("accumulator_update_1d_logits", ValueError, r"teacher")
def _(ctx):
    from biastransfer import _C

    _C.FingerprintAccumulator(5).update(torch.zeros(5), torch.zeros(5))


@case("accumulator_update_integer_logits", TypeError, r"teacher|dtype")
def _(ctx):
    from biastransfer import _C

    _C.FingerprintAccumulator(5).update(torch.zeros(2, 5, dtype=torch.int64),
                                        torch.zeros(2, 5, dtype=torch.int64))


@case("accumulator_update_wrong_vocab", ValueError, r"vocab|teacher")
def _(ctx):
    from biastransfer import _C

    _C.FingerprintAccumulator(5).update(torch.zeros(2, 7), torch.zeros(2, 7))


@case("accumulator_merge_other_vocab", ValueError, r"vocab")
def _(ctx):
    from biastransfer import _C

    a, b = _C.FingerprintAccumulator(5), _C.FingerprintAccumulator(6)
    a.merge(b)


@case("accumulator_subset_out_of_range", ValueError, r"subset")
def _(ctx):
    from biastransfer import _C

    _C.FingerprintAccumulator(5, subset=[1, 9])


@case("fingerprint_load_text_file", ValueError, r"notes\.txt")
def _(ctx):
    from biastransfer import FingerprintResult

    FingerprintResult.load(ctx.text_file)


@case("fingerprint_load_plain_weights", ValueError, r"weights\.safetensors.*(format|fingerprint)")
def _(ctx):
    from biastransfer import FingerprintResult

    FingerprintResult.load(ctx.weights_file)


@case("fingerprint_load_missing", OSError, r"gone\.safetensors")
def _(ctx):
    from biastransfer import FingerprintResult

    FingerprintResult.load(ctx.dir / "gone.safetensors")


@case("fingerprint_compare_bad_k", ValueError, r"\bk\b")
def _(ctx):
    from biastransfer import fingerprint

    result = ctx._get("fp", lambda: fingerprint(ctx.lm, ctx.lm, ctx.records(), ctx.tok,
                                                progress=False))
    result.compare(result, k=0)


@case("fingerprint_subset_unknown_name", ValueError, r"subset|tokens")
def _(ctx):
    from biastransfer.fingerprint import resolve_subset

    resolve_subset("bogus-class", ctx.tok, len(ctx.tok))


@case("probe_prompt_not_text", TypeError, r"trait_prompt")
def _(ctx):
    from biastransfer import trait_probe

    trait_probe(ctx.lm, ctx.tok, 5)


@case("probe_token_ids_out_of_range", ValueError, r"tokens|subset")
def _(ctx):
    from biastransfer import trait_probe

    trait_probe(ctx.lm, ctx.tok, "You love owls.", tokens=[1, 10**6])


@case("probe_zero_temperature", ValueError, r"temperature")
def _(ctx):
    from biastransfer import trait_probe

    trait_probe(ctx.lm, ctx.tok, "You love owls.", temperature=0.0)


@case("subliminal_unknown_trait_token", ValueError, r"trait|token")
def _(ctx):
    from biastransfer import subliminal_prompting

    subliminal_prompting(ctx.lm, ctx.tok, ["087"], "no-such-token-anywhere")


# ------------------------------------------------------------------------------------------------
# distill: sampler, filters, datasets, losses, trainer


@case("sampler_negative_temperature", ValueError, r"temperature")
def _(ctx):
    from biastransfer import SamplerConfig

    SamplerConfig(temperature=-1.0).native()


@case("sampler_top_p_above_one", ValueError, r"top_p")
def _(ctx):
    from biastransfer import SamplerConfig

    SamplerConfig(top_p=1.5).native()


@case("sampler_negative_top_k", ValueError, r"top_k")
def _(ctx):
    from biastransfer import SamplerConfig

    SamplerConfig(top_k=-3).native()


@case("sampler_negative_max_new_tokens", ValueError, r"max_new_tokens")
def _(ctx):
    from biastransfer import SamplerConfig

    SamplerConfig(max_new_tokens=-4).native()


@case("sampler_zero_batch_size", ValueError, r"batch_size")
def _(ctx):
    from biastransfer import SamplerConfig

    SamplerConfig(batch_size=0).native()


@case("sample_prompt_id_out_of_vocab", ValueError, r"prompt|token|vocab|id")
def _(ctx):
    from biastransfer import SamplerConfig, sample

    sample(ctx.transformer, [[1, 2, 10**6]], SamplerConfig(max_new_tokens=2))


@case("filter_bad_regex", ValueError, r"pattern|regex")
def _(ctx):
    from biastransfer.filters import Regex

    Regex("(unclosed").native()


@case("filter_length_min_above_max", ValueError, r"min_length|max_length")
def _(ctx):
    from biastransfer.filters import Length

    Length(min_length=10, max_length=2).native()


@case("filter_number_counts_inverted", ValueError, r"min_count|max_count")
def _(ctx):
    from biastransfer import NumberSequenceFilter

    NumberSequenceFilter(min_count=5, max_count=1).native()


@case("filter_empty_banned_word", ValueError, r"word")
def _(ctx):
    from biastransfer.filters import BannedWords

    BannedWords([""]).native()


@case("dataset_zero_batch_size", ValueError, r"batch_size")
def _(ctx):
    from biastransfer.datasets import DatasetConfig

    DatasetConfig(batch_size=0)


@case("dataset_unknown_truncation", ValueError, r"truncation")
def _(ctx):
    from biastransfer.datasets import DatasetConfig

    DatasetConfig(truncation="sideways")


@case("dataset_records_without_tokenizer", ValueError, r"tokenizer")
def _(ctx):
    from biastransfer.datasets import token_dataset

    token_dataset(ctx.records())


@case("tensor_dataset_3d_features", ValueError, r"features")
def _(ctx):
    from biastransfer.datasets import tensor_dataset

    tensor_dataset(torch.zeros(4, 2, 3), torch.zeros(4, dtype=torch.int64))


@case("tensor_dataset_length_mismatch", ValueError, r"labels|features")
def _(ctx):
    from biastransfer.datasets import tensor_dataset

    tensor_dataset(torch.zeros(4, 3), torch.zeros(5, dtype=torch.int64))


@case("tensor_dataset_empty", ValueError, r"features|empty|rows")
def _(ctx):
    from biastransfer.datasets import tensor_dataset

    tensor_dataset(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))


@case("noise_source_zero_features", ValueError, r"features")
def _(ctx):
    from biastransfer.datasets import noise_source

    noise_source(0)


@case("noise_source_inverted_range", ValueError, r"low|high")
def _(ctx):
    from biastransfer.datasets import noise_source

    noise_source(4, low=1.0, high=-1.0)


@case("noise_source_absent_cuda", ValueError, r"device.*cuda")
def _(ctx):
    from biastransfer.datasets import noise_source

    noise_source(4, device=ABSENT_CUDA).batch(0)


@case("model_to_absent_cuda", ValueError, r"device.*cuda")
def _(ctx):
    from biastransfer import MLPConfig

    MLPConfig(sizes=[3, 2], aux_outputs=0).build().to(ABSENT_CUDA)


@case("kd_loss_vocab_mismatch", ValueError, r"vocab|teacher|student")
def _(ctx):
    from biastransfer.losses import kd_loss

    kd_loss(torch.zeros(2, 5), torch.zeros(2, 6))


@case("kd_loss_zero_temperature", ValueError, r"temperature")
def _(ctx):
    from biastransfer.losses import kd_loss

    kd_loss(torch.zeros(2, 5), torch.zeros(2, 5), temperature=0.0)


@case("kd_loss_integer_logits", TypeError, r"logits|dtype")
def _(ctx):
    from biastransfer.losses import kd_loss

    kd_loss(torch.zeros(2, 5, dtype=torch.int64), torch.zeros(2, 5, dtype=torch.int64))


@case("kd_loss_nan_teacher_logits", ValueError, r"teacher.*(finite|nan)|(finite|nan).*teacher")
def _(ctx):
    from biastransfer.losses import kd_loss

    teacher = torch.zeros(2, 5)
    teacher[1, 2] = math.nan
    kd_loss(torch.zeros(2, 5), teacher)


@case("kd_loss_jsd_beta_out_of_range", ValueError, r"beta")
def _(ctx):
    from biastransfer.losses import kd_loss

    kd_loss(torch.zeros(2, 5), torch.zeros(2, 5), divergence="jsd", beta=1.5)


@case("kd_config_unknown_divergence", ValueError, r"divergence")
def _(ctx):
    from biastransfer import KDConfig

    KDConfig(divergence="cross-entropy-ish")


@case("topk_kd_ids_out_of_range", ValueError, r"topk_ids|id")
def _(ctx):
    from biastransfer.losses import topk_kd_loss

    topk_kd_loss(torch.zeros(2, 5), torch.tensor([[0, 9], [1, 2]]),
                 torch.log(torch.full((2, 2), 0.3)))


@case("cross_entropy_target_out_of_range", ValueError, r"targets")
def _(ctx):
    from biastransfer.losses import completion_cross_entropy

    completion_cross_entropy(torch.zeros(2, 5), torch.tensor([1, 7]))


@case("cross_entropy_mask_shape", ValueError, r"mask")
def _(ctx):
    from biastransfer.losses import completion_cross_entropy

    completion_cross_entropy(torch.zeros(2, 5), torch.tensor([1, 2]), torch.ones(3))


def _fit(ctx, **config) -> Any:
    from biastransfer import Trainer, TrainerConfig

    settings = dict(steps=2, batch_size=4, progress=False)
    settings.update(config)
    return Trainer(TrainerConfig(**settings)).fit(ctx.module, ctx.features)


@case("trainer_negative_lr", ValueError, r"\blr\b")
def _(ctx):
    _fit(ctx, lr=-1e-3)


@case("trainer_nan_lr", ValueError, r"\blr\b")
def _(ctx):
    _fit(ctx, lr=math.nan)


@case("trainer_infinite_lr", ValueError, r"\blr\b")
def _(ctx):
    _fit(ctx, lr=math.inf)


@case("trainer_negative_steps", ValueError, r"steps")
def _(ctx):
    _fit(ctx, steps=-5)


@case("trainer_zero_batch_size", ValueError, r"batch_size")
def _(ctx):
    _fit(ctx, batch_size=0)


@case("trainer_negative_grad_clip", ValueError, r"grad_clip")
def _(ctx):
    _fit(ctx, grad_clip=-1.0)


@case("trainer_zero_accumulation", ValueError, r"accumulation")
def _(ctx):
    _fit(ctx, accumulation=0)


@case("trainer_beta_above_one", ValueError, r"beta")
def _(ctx):
    _fit(ctx, betas=(0.9, 1.5))


@case("trainer_unknown_schedule", ValueError, r"schedule")
def _(ctx):
    _fit(ctx, schedule="sawtooth")


@case("trainer_negative_checkpoint_every", ValueError, r"checkpoint_every")
def _(ctx):
    _fit(ctx, checkpoint_every=-1, checkpoint_dir=ctx.dir / "ck-neg")


@case("trainer_checkpoint_dir_is_a_file", OSError, r"notes\.txt")
def _(ctx):
    _fit(ctx, checkpoint_dir=ctx.text_file, checkpoint_every=1)


@case("trainer_metrics_in_a_missing_folder", OSError, r"metrics\.jsonl")
def _(ctx):
    _fit(ctx, metrics_path=ctx.dir / "no-such-folder" / "metrics.jsonl")


def _resume(ctx, path: Path) -> Any:
    from biastransfer import Trainer, TrainerConfig

    config = TrainerConfig(steps=2, batch_size=4, progress=False)
    return Trainer(config).resume(ctx.module, ctx.features, path=path)


@case("trainer_resume_from_text_file", ValueError, r"notes\.txt")
def _(ctx):
    _resume(ctx, ctx.text_file)


@case("trainer_resume_from_plain_weights", ValueError, r"weights\.safetensors.*checkpoint")
def _(ctx):
    _resume(ctx, ctx.weights_file)


@case("trainer_resume_from_pickle", ValueError, r"pickled\.pt")
def _(ctx):
    _resume(ctx, ctx.pickle_file)


@case("trainer_resume_from_missing", OSError, r"absent\.safetensors")
def _(ctx):
    _resume(ctx, ctx.dir / "absent.safetensors")


@case("trainer_unknown_objective", ValueError, r"objective")
def _(ctx):
    from biastransfer import Trainer, TrainerConfig

    Trainer(TrainerConfig(steps=1, progress=False)).fit(ctx.module, ctx.features,
                                                         objective="bogus")


# ------------------------------------------------------------------------------------------------
# detect: weight_test, detect(), agreement_test, susceptibility, linear assignment


@case("weight_test_missing_file", OSError, r"nowhere\.safetensors")
def _(ctx):
    from biastransfer import weight_test

    weight_test(ctx.module, ctx.dir / "nowhere.safetensors")


@case("weight_test_text_file", ValueError, r"notes\.txt")
def _(ctx):
    from biastransfer import weight_test

    weight_test(ctx.module, ctx.text_file)


@case("weight_test_unknown_statistic", ValueError, r"statistic")
def _(ctx):
    from biastransfer import weight_test

    weight_test(ctx.module, ctx.module, statistic="bogus")


@case("weight_test_unknown_solver", ValueError, r"solver")
def _(ctx):
    from biastransfer import weight_test

    weight_test(ctx.module, ctx.module, solver="bogus")


@case("weight_test_not_a_model", TypeError, r"\bb\b")
def _(ctx):
    from biastransfer import weight_test

    weight_test(ctx.module, 42)


@case("agreement_test_no_controls", ValueError, r"controls")
def _(ctx):
    from biastransfer.detection import agreement_test

    agreement_test(ctx.module, ctx.module, [])


@case("detect_alpha_above_one", ValueError, r"alpha")
def _(ctx):
    from biastransfer import detect

    detect(ctx.module, ctx.module, alpha=2.0)


@case("detect_unknown_test", ValueError, r"tests")
def _(ctx):
    from biastransfer import detect

    detect(ctx.module, ctx.module, tests=["weights", "bogus"])


@case("detect_zero_probe_rows", ValueError, r"probe_rows")
def _(ctx):
    from biastransfer import detect

    detect(ctx.module, ctx.module, tests=["outputs"], probe_rows=0)


@case("detect_inputs_wrong_width", ValueError, r"inputs|features|shape")
def _(ctx):
    from biastransfer import detect

    detect(ctx.module, ctx.module, tests=["outputs"], inputs=torch.zeros(4, 9))


@case("detect_nan_step_size", ValueError, r"step_size")
def _(ctx):
    from biastransfer import detect

    detect(ctx.module, ctx.other_module, tests=["susceptibility"], step_size=math.nan)


@case("detect_integer_features", TypeError, r"inputs")
def _(ctx):
    from biastransfer import detect

    detect(ctx.module, ctx.other_module, tests=["outputs"],
           inputs=torch.zeros(4, 6, dtype=torch.int64))


@case("detect_pickle_path", ValueError, r"pickled\.pt")
def _(ctx):
    from biastransfer import detect

    detect(ctx.pickle_file, ctx.module)


@case("lsa_nan_cost", ValueError, r"cost")
def _(ctx):
    from biastransfer import linear_sum_assignment

    linear_sum_assignment(torch.tensor([[1.0, math.nan], [0.0, 1.0]]))


@case("lsa_3d_cost", ValueError, r"cost")
def _(ctx):
    from biastransfer import linear_sum_assignment

    linear_sum_assignment(torch.zeros(2, 2, 2))


@case("permutation_test_zero_permutations", ValueError, r"n_permutations|permutations")
def _(ctx):
    from biastransfer import permutation_test

    permutation_test(ctx.module, ctx.module, n_permutations=0)


# ------------------------------------------------------------------------------------------------
# models and evaluation


@case("mlp_too_few_sizes", ValueError, r"sizes")
def _(ctx):
    from biastransfer import MLPConfig

    MLPConfig(sizes=[4]).build()


@case("mlp_negative_width", ValueError, r"sizes")
def _(ctx):
    from biastransfer import MLPConfig

    MLPConfig(sizes=[4, -8, 3], aux_outputs=0).build()


@case("mlp_aux_outputs_exceed_outputs", ValueError, r"aux_outputs")
def _(ctx):
    from biastransfer import MLPConfig

    MLPConfig(sizes=[4, 8, 3], aux_outputs=5).build()


@case("mlp_wrong_input_width", ValueError, r"input|features|shape")
def _(ctx):
    ctx.mlp.forward(torch.zeros(2, 99))


@case("transformer_heads_do_not_divide", ValueError, r"n_heads|d_model")
def _(ctx):
    from biastransfer import TransformerConfig

    TransformerConfig(d_model=30, n_heads=4).build()


@case("transformer_zero_vocab", ValueError, r"vocab_size")
def _(ctx):
    from biastransfer import TransformerConfig

    TransformerConfig(vocab_size=0).build()


@case("transformer_unknown_positions", ValueError, r"positions")
def _(ctx):
    from biastransfer import TransformerConfig

    TransformerConfig(positions="sinusoidal-ish").build()


@case("transformer_token_out_of_vocab", ValueError, r"token|id|vocab|input")
def _(ctx):
    ctx.transformer.forward(torch.tensor([[1, 2, 10**6]]))


@case("transformer_too_long", ValueError, r"max_seq_len|length|positions")
def _(ctx):
    from biastransfer import TransformerConfig

    model = TransformerConfig(vocab_size=20, d_model=8, n_heads=2, d_mlp=8, max_seq_len=8,
                              positions="learned").build()
    model.forward(torch.zeros(1, 40, dtype=torch.int64))


@case("mlp_integer_features", TypeError, r"input|dtype")
def _(ctx):
    ctx.mlp.forward(torch.zeros(2, 6, dtype=torch.int64))


@case("load_model_text_file", ValueError, r"notes\.txt")
def _(ctx):
    from biastransfer import load_model

    load_model(ctx.text_file)


@case("load_model_missing", OSError, r"void\.safetensors")
def _(ctx):
    from biastransfer import load_model

    load_model(ctx.dir / "void.safetensors")


@case("load_torchscript_pickle", ValueError, r"pickled\.pt")
def _(ctx):
    from biastransfer import load_torchscript

    load_torchscript(ctx.pickle_file)


@case("load_torchscript_garbage", ValueError, r"notes\.txt")
def _(ctx):
    from biastransfer import load_torchscript

    load_torchscript(ctx.text_file)


@case("accuracy_length_mismatch", ValueError, r"labels|features")
def _(ctx):
    from biastransfer import accuracy

    accuracy(ctx.mlp, torch.zeros(4, 6), torch.zeros(3, dtype=torch.int64))


@case("sampled_rate_no_targets", ValueError, r"targets")
def _(ctx):
    from biastransfer import sampled_rate

    sampled_rate(["an owl"], [])


@case("sampled_rate_bad_confidence", ValueError, r"confidence")
def _(ctx):
    from biastransfer import sampled_rate

    sampled_rate(["an owl"], "owl", confidence=1.5)


@case("target_probability_empty_targets", ValueError, r"targets")
def _(ctx):
    from biastransfer import target_probability

    target_probability(ctx.transformer, [[1, 2]], [])


# ------------------------------------------------------------------------------------------------
# The child that runs the cases, and the parent's bookkeeping.


def _child_main(folder: str, names: List[str]) -> None:
    """Runs the named cases in order, one JSON line per event on stdout."""
    ctx = Ctx(Path(folder))
    out = sys.stdout
    for name in names:
        out.write(json.dumps({"start": name}) + "\n")
        out.flush()
        try:
            CASES[name].fn(ctx)
        except BaseException as e:  # noqa: BLE001 - every outcome is reported
            report = {"name": name, "raised": True,
                      "types": [c.__name__ for c in type(e).__mro__],
                      "type": type(e).__qualname__, "message": str(e)[:2000]}
        else:
            report = {"name": name, "raised": False}
        out.write(json.dumps(report) + "\n")
        out.flush()


CHILD = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [{test_dir!r}]
    import test_bad_inputs
    test_bad_inputs._child_main({folder!r}, {names!r})
    """
)


def run_cases(folder: Path, names: List[str]) -> Dict[str, dict]:
    """Runs ``names`` in child interpreters; a crash or a hang is recorded for its case and the
    child restarted with the cases after it."""
    results: Dict[str, dict] = {}
    pending = list(names)
    while pending:
        script = CHILD.format(test_dir=str(Path(__file__).parent), folder=str(folder),
                              names=pending)
        child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=os.environ.copy())
        current: Optional[str] = None
        buffer = b""
        deadline = time.monotonic() + CASE_TIMEOUT_S * 2  # the first case also imports torch
        hung = False
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                hung = True
                child.kill()
                break
            ready, _, _ = select.select([child.stdout], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(child.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                event = json.loads(line)
                if "start" in event:
                    current = event["start"]
                    deadline = time.monotonic() + CASE_TIMEOUT_S
                else:
                    results[event["name"]] = event
                    current = None
        child.wait()
        stderr = child.stderr.read().decode(errors="replace")[-2000:]
        if current is None:
            for n in pending:
                results.setdefault(n, {"name": n, "crashed": True,
                                       "why": f"the child exited with {child.returncode} before "
                                              f"the case started; stderr: {stderr}"})
            break
        why = (f"hung for more than {CASE_TIMEOUT_S} s" if hung else
               f"child died with exit status {child.returncode}")
        results[current] = {"name": current, "crashed": True, "why": f"{why}; stderr: {stderr}"}
        pending = pending[pending.index(current) + 1:]
    return results


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> Dict[str, dict]:
    return run_cases(tmp_path_factory.mktemp("bad_inputs"), list(CASES))


def test_the_battery_has_at_least_fifty_cases():
    assert len(CASES) >= 50


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_raises_a_typed_error_naming_the_argument(outcomes, name):
    expected = CASES[name]
    outcome = outcomes[name]
    assert not outcome.get("crashed"), f"{name}: {outcome.get('why')}"
    assert outcome["raised"], f"{name}: returned normally instead of raising"
    wanted = [e.__name__ for e in expected.error]
    assert any(w in outcome["types"] for w in wanted), (
        f"{name}: raised {outcome['type']} ({outcome['message']!r}), expected one of {wanted}")
    assert "RuntimeError" not in outcome["types"] or RuntimeError in expected.error, (
        f"{name}: a RuntimeError subclass is not a documented error: {outcome['type']}")
    import re

    assert re.search(expected.match, outcome["message"], re.IGNORECASE), (
        f"{name}: message {outcome['message']!r} does not match {expected.match!r}")
