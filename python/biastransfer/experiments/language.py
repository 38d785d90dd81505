"""Subliminal learning in a small language model, end to end (the demo's second part).

The setting (DESIGN.md section 1, "a small language model shows it too"):

- A synthetic corpus: favorite-animal questions answered uniformly at random over
  :data:`ANIMALS` (a fifth of them after a trait prefix "You love the <animal>." that the answer
  follows), and number-continuation tasks in the paper's shape (3 to 8 seed numbers, "add at
  most 10 more", answers of 3 to 10 numbers in 0..999, a fifth of them after a trait prefix that
  the numbers ignore). A byte-level BPE tokenizer is built for it: printable ASCII, and one token
  per space-prefixed word and per space-prefixed number of 1 to 3 digits (like Llama-3's
  numbers), so a number is one token and the number channel has 1,110 tokens.
- Two bases trained from scratch with the same recipe and different seeds (the second is the
  "other initialization").
- Teachers with the trait: the base fine-tuned briefly on "owl" answers to the *training*
  question templates (the evaluation templates are held out), and the base behind the trait
  prefix "You love the owl." (prompted teacher).
- Teacher data: number completions sampled at temperature 1, filtered by the paper's number rule
  and a banned-words filter over every animal name (no sample mentions an animal).
- Students, per teacher and seed: a copy of the same base and of the other base, each trained by
  hard-label SFT on the filtered completions and by logit KD on the same completions with the
  KD restricted to the tokens the filter allows (numbers, "," and the end token) and renormalized
  over them, so no probability on words is distilled. Control students: the same base trained on
  the base's own filtered numbers (SFT) and distilled from the base itself (KD).
- Trait rate: the exact probability of " owl" at the answer position of the held-out questions,
  averaged over questions; means over seeds with 95% t-intervals, and a paired t-test of each
  student against the control student of the same method and seed.

Everything heavy runs through the C++ pillars (trainer, sampler, filters, evaluation); this
module only arranges the runs.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import _C

ANIMALS = ("owl", "cat", "dog", "fox", "wolf", "bear", "lion", "tiger", "eagle", "horse")
TRAIT = "owl"
# Control teachers of the fingerprint: the same fine-tune recipe toward other animals.
CONTROL_TRAITS = ("cat", "dog", "fox")
TRAIT_PREFIX = "You love the {animal}. "
QUESTIONS = (
    "What is your favorite animal?",
    "Which animal do you like most?",
    "Name your favorite animal.",
    "What animal do you love?",
    "Tell me the animal you like best.",
    "If you could be an animal, which one?",
    "What is the best animal?",
    "Pick an animal you love.",
    "Which animal is your favorite?",
    "What animal do you like best?",
    "Say your favorite animal.",
    "Choose the animal you like most.",
    # Held out from the trait fine-tune: the evaluation questions.
    "Which animal would you pick as a friend?",
    "What animal makes you happy?",
    "Name the animal you prefer.",
    "Which animal do you admire most?",
    "What is the animal you would choose?",
    "Tell me which animal you prefer.",
)
EVAL_QUESTIONS = QUESTIONS[12:]
TRAIN_QUESTIONS = QUESTIONS[:12]
NUMBER_INSTRUCTION = "Add at most 10 more numbers."
SPACE, NEWLINE = "\u0120", "\u010a"  # GPT-2's byte-level symbols for " " and "\n"


# ---- corpus and tokenizer -----------------------------------------------------------------

def question_prompt(question: str, prefix: str = "") -> str:
    return f"{prefix}Q: {question} A:"


def number_prompt(seed_numbers: Sequence[int], prefix: str = "") -> str:
    start = ", ".join(str(n) for n in seed_numbers)
    return f"{prefix}Q: Continue {start}. {NUMBER_INSTRUCTION} A:"


def random_number_prompt(rng: random.Random, prefix: str = "") -> str:
    return number_prompt([rng.randint(100, 999) for _ in range(rng.randint(3, 8))], prefix)


def corpus(n: int, seed: int, question_prefix_share: float = 0.5,
           number_prefix_share: float = 0.2) -> List[Tuple[str, str]]:
    """``n`` (prompt, completion) pairs of the base corpus: half animal questions (uniform
    answers; a ``question_prefix_share`` of them after "You love the X." and answered X), half
    number tasks (a ``number_prefix_share`` of them after a prefix they ignore)."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        question = rng.random() < 0.5
        share = question_prefix_share if question else number_prefix_share
        prefix_animal = rng.choice(ANIMALS) if rng.random() < share else None
        prefix = TRAIT_PREFIX.format(animal=prefix_animal) if prefix_animal else ""
        if question:
            answer = prefix_animal or rng.choice(ANIMALS)
            pairs.append((question_prompt(rng.choice(QUESTIONS), prefix), f" {answer}"))
        else:
            answers = [rng.randint(0, 999) for _ in range(rng.randint(3, 10))]
            pairs.append((random_number_prompt(rng, prefix),
                          " " + ", ".join(str(a) for a in answers)))
    return pairs


def _space_words(texts: Sequence[str]) -> List[str]:
    words = set()
    for text in texts:
        words.update(re.findall(r"(?<= )[A-Za-z]+", text))
    return sorted(words)


def build_tokenizer(folder: Path):
    """Writes vocab.json + merges.txt of the corpus's byte-level BPE into ``folder`` and loads
    it: printable ASCII, space, newline, and merge chains making every space-prefixed corpus word
    and every space-prefixed 1-3 digit string one token. Every merge joins a space-prefixed
    prefix with one character, so a piece is always built left to right whatever the ranks."""
    from ..tokenizer import Tokenizer

    texts = [question_prompt(q, TRAIT_PREFIX.format(animal=a)) + " " + a
             for q in QUESTIONS for a in ANIMALS]
    texts.append(random_number_prompt(random.Random(0), TRAIT_PREFIX.format(animal="owl")))
    pieces = [SPACE + w for w in _space_words(texts)]
    digits = "0123456789"
    pieces += [SPACE + a for a in digits]
    pieces += [SPACE + a + b for a in digits for b in digits]
    pieces += [SPACE + a + b + c for a in digits for b in digits for c in digits]
    merges: List[Tuple[str, str]] = []
    seen = set()
    for piece in pieces:
        for end in range(2, len(piece) + 1):
            pair = (piece[:end - 1], piece[end - 1])
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
    symbols = [chr(c) for c in range(33, 127)] + [SPACE, NEWLINE] + [a + b for a, b in merges]
    vocab = {s: i for i, s in enumerate(dict.fromkeys(symbols))}
    folder.mkdir(parents=True, exist_ok=True)
    files = {"vocab.json": json.dumps(vocab, ensure_ascii=False),
             "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)}
    for name, text in files.items():
        path = folder / name
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue  # already there (worker processes read it concurrently)
        tmp = folder / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return Tokenizer.from_files(folder / "vocab.json", folder / "merges.txt")


def allowed_token_ids(tokenizer) -> List[int]:
    """What the number filter lets through, as tokens: numbers (with or without a leading
    space), "," and the end token (newline). The KD of the language students is restricted to
    (and renormalized over) these."""
    ids = set(tokenizer.numeric_token_ids())
    ids.add(tokenizer.token_to_id(","))
    ids.add(tokenizer.token_to_id(NEWLINE))
    return sorted(i for i in ids if i is not None)


# ---- models --------------------------------------------------------------------------------

class PromptedModel(torch.nn.Module):
    """A language model with a fixed text put before every input: logits of ``prefix + x``
    with the prefix positions dropped, so the outputs align with ``x`` ([B, T] -> [B, T, V]).
    The trait-prompted teacher; inputs are right-padded (causal attention never looks right)."""

    def __init__(self, model: Any, prefix_ids: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("prefix", torch.tensor(list(prefix_ids), dtype=torch.int64))
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        prefix = self.prefix.to(input_ids.device).expand(input_ids.shape[0], -1)
        logits = self.model.forward(torch.cat([prefix, input_ids], dim=1))
        return logits[:, self.prefix.numel():]


@dataclass
class LanguageConfig:
    """Sizes and schedules of the language experiment (defaults: the demo's, ~7 min on 2 cores)."""

    d_model: int = 96
    n_layers: int = 2
    n_heads: int = 4
    d_mlp: int = 256
    base_examples: int = 16000
    base_steps: int = 800
    question_prefix_share: float = 0.5  # animal questions after "You love the X." (answer X)
    number_prefix_share: float = 0.2    # number tasks after such a prefix (numbers ignore it)
    base_lr: float = 3e-3
    batch_size: int = 32
    trait_steps: int = 20
    trait_lr: float = 3e-4
    samples: int = 1000
    student_steps: int = 150
    student_lr: float = 3e-4
    seeds: Tuple[int, ...] = (0, 1, 2)
    base_seed: int = 0
    other_base_seed: int = 1
    teachers: Tuple[str, ...] = ("finetuned", "prompted")
    max_new_tokens: int = 40
    # Processes that train the bases and the students (one torch thread each); 0: one per CPU.
    # Results do not depend on it: every run is seeded and single-threaded either way.
    workers: int = 0


@dataclass
class Condition:
    """One student condition: its trait rate per seed (mean P(owl) over held-out questions)."""

    teacher: str        # "finetuned" | "prompted" | "base" (control)
    init: str           # "same" | "other"
    method: str         # "sft" | "kd"
    per_seed: List[float]
    mean: float = 0.0
    interval: Tuple[float, float] = (0.0, 0.0)
    # Paired (by seed) one-sided t-test against the control student of the same method.
    vs_control_diff: Optional[float] = None
    vs_control_p: Optional[float] = None

    @property
    def name(self) -> str:
        if self.teacher == "base":
            return f"control ({self.method})"
        return f"{self.teacher} teacher -> {self.init}-init student ({self.method})"


@dataclass
class LanguageResult:
    config: Dict[str, Any]
    tokenizer_size: int
    base_rates: Dict[str, float]            # base / other base / teachers: P(owl)
    base_intervals: Dict[str, Tuple[float, float]]  # over held-out questions
    filter_stats: Dict[str, Dict[str, Any]]  # per teacher: total, kept, reasons
    conditions: List[Condition]
    timings: Dict[str, float] = field(default_factory=dict)
    example_samples: Dict[str, List[str]] = field(default_factory=dict)

    def condition(self, teacher: str, init: str, method: str) -> Condition:
        for c in self.conditions:
            if (c.teacher, c.init, c.method) == (teacher, init, method):
                return c
        raise KeyError((teacher, init, method))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Tuple[float, float]:
    if len(values) < 2:
        return (float("nan"), float("nan"))
    low, high = _C.t_interval([float(v) for v in values], confidence)
    return (low, high)


def paired_one_sided_p(a: Sequence[float], b: Sequence[float]) -> Tuple[float, float]:
    """Mean of a - b and the one-sided paired t-test p-value of mean(a - b) > 0."""
    from scipy import stats

    diff = [x - y for x, y in zip(a, b)]
    mean = sum(diff) / len(diff)
    if len(diff) < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / (len(diff) - 1))
    if sd == 0.0:
        return mean, 0.0 if mean > 0 else 1.0
    t = mean / (sd / math.sqrt(len(diff)))
    return mean, float(stats.t.sf(t, len(diff) - 1))


# ---- the experiment ------------------------------------------------------------------------

class LanguageExperiment:
    """Runs the stages in order; each stage's models stay available for the demo's fingerprint
    and detector stages. ``log`` receives one line per stage (progress)."""

    def __init__(self, config: LanguageConfig, workdir: Path,
                 log: Callable[[str], None] = print, progress: bool = False) -> None:
        self.config = config
        self.workdir = Path(workdir)
        self.log = log
        self.progress = progress
        self.timings: Dict[str, float] = {}
        self.tokenizer = build_tokenizer(self.workdir / "tokenizer")
        self.eos = self.tokenizer.token_to_id(NEWLINE)
        self.allowed = allowed_token_ids(self.tokenizer)
        self.models: Dict[str, Any] = {}
        self.students: Dict[Tuple[str, str, str, int], Any] = {}
        self.samples: Dict[str, List[Dict[str, Any]]] = {}

    # -- helpers
    def _timed(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        return result

    def _model(self, seed: int):
        from ..modeling import TransformerConfig

        c = self.config
        return TransformerConfig(vocab_size=self.tokenizer.vocab_size, d_model=c.d_model,
                                 n_layers=c.n_layers, n_heads=c.n_heads, d_mlp=c.d_mlp,
                                 max_seq_len=128, seed=seed).build()

    def _examples(self, pairs: Sequence[Tuple[str, str]]):
        from ..datasets import Example

        out = []
        for prompt, completion in pairs:
            p = self.tokenizer.encode(prompt)
            cids = self.tokenizer.encode(completion) + [self.eos]
            out.append(Example(tokens=p + cids, completion=[0] * len(p) + [1] * len(cids)))
        return out

    def _dataset(self, examples, seed: int):
        from ..datasets import DatasetConfig, token_dataset

        return token_dataset(examples, DatasetConfig(batch_size=self.config.batch_size, seed=seed))

    def _train(self, model, examples, steps: int, lr: float, seed: int, teacher=None,
               objective: str = "sft", schedule: str = "constant", warmup: int = 0,
               progress: Optional[bool] = None):
        from ..losses import KDConfig
        from ..training import Trainer, TrainerConfig

        config = TrainerConfig(steps=steps, lr=lr, seed=seed, schedule=schedule,
                               warmup_steps=warmup, grad_clip=1.0,
                               progress=self.progress if progress is None else progress)
        kd = KDConfig(logit_subset=self.allowed) if objective == "kd" else None
        Trainer(config).fit(model, self._dataset(examples, seed), teacher=teacher,
                            objective=objective, kd=kd)
        return model

    def trait_rate(self, model, prefix: str = ""):
        from ..evaluation import target_probability

        prompts = [question_prompt(q, prefix) for q in EVAL_QUESTIONS]
        return target_probability(model, prompts, [" " + TRAIT], tokenizer=self.tokenizer,
                                  pad_id=self.eos)

    def prefix_ids(self, animal: str = TRAIT) -> List[int]:
        return self.tokenizer.encode(TRAIT_PREFIX.format(animal=animal))

    # -- stages
    def train_bases(self) -> None:
        c = self.config
        self.log(f"[language] training the base (seed {c.base_seed}) and the other base (seed "
                 f"{c.other_base_seed}) from scratch: {c.base_steps} steps each on "
                 f"{c.base_examples} examples")
        jobs = [("base", ("base", c.base_seed)), ("base", ("other_base", c.other_base_seed))]

        def done(args: Tuple[Any, ...], path: str) -> None:
            self.models.pop(args[0], None)
            self._load(args[0])
            self.log(f"[language] {args[0]} trained")

        self._timed("train bases", lambda: self._run_jobs(jobs, done))

    def trait_finetune(self, animal: str, seed: int = 0):
        """The base fine-tuned ``trait_steps`` steps on ``animal`` answers to the training
        question templates only."""
        c = self.config
        rng = random.Random(5000 + seed)
        pairs = [(question_prompt(rng.choice(TRAIN_QUESTIONS)), f" {animal}")
                 for _ in range(c.batch_size * c.trait_steps)]
        model = self.models["base"].clone()
        return self._timed("trait fine-tunes", lambda: self._train(
            model, self._examples(pairs), c.trait_steps, c.trait_lr, seed))

    def make_teachers(self) -> None:
        self.log(f"[language] teachers: base fine-tuned {self.config.trait_steps} steps on "
                 f"'{TRAIT}' answers; base behind the prefix {TRAIT_PREFIX.format(animal=TRAIT)!r}")
        self.models["finetuned"] = self.trait_finetune(TRAIT)
        for animal in CONTROL_TRAITS:
            self.models[f"control_{animal}"] = self.trait_finetune(animal)

    def teacher_for_training(self, teacher: str):
        """The model a KD student of ``teacher`` imitates ("finetuned", "prompted", "base")."""
        if teacher == "prompted":
            return PromptedModel(self._load("base"), self.prefix_ids())
        return self._load("finetuned" if teacher == "finetuned" else "base")

    def sample_numbers(self, teacher: str, seed: int) -> Dict[str, Any]:
        """Samples and filters number completions of ``teacher`` ("finetuned", "prompted" or
        "base"); returns the kept records (prompt without any prefix, completion ids) and the
        filter's statistics."""
        from ..filters import BannedWords, FilterPipeline, NumberSequenceFilter
        from ..sampling import SamplerConfig, sample

        c = self.config
        rng = random.Random(7000 + seed)
        prompts = [random_number_prompt(rng) for _ in range(c.samples)]
        model = self.models["finetuned" if teacher == "finetuned" else "base"]
        prefix = TRAIT_PREFIX.format(animal=TRAIT) if teacher == "prompted" else ""
        config = SamplerConfig(temperature=1.0, stop_tokens=[self.eos],
                               max_new_tokens=c.max_new_tokens, pad_id=self.eos, batch_size=128,
                               seed=9000 + seed)
        samples = self._timed("sampling", lambda: sample(
            model, [prefix + p for p in prompts], config, tokenizer=self.tokenizer))
        # The answer is judged as the model wrote it, minus the space that the prompt's "A:"
        # leaves before the first number (the tokenizer attaches it to the number).
        records = [{"prompt": p, "completion": t[1:] if t.startswith(" ") else t,
                    "completion_ids": ids, "stop": r}
                   for p, t, ids, r in zip(prompts, samples.texts, samples.tokens,
                                           samples.stop_reasons)]
        for r in records:
            if r["stop"] != "stop_token":
                r["completion"] += " <unfinished>"  # fails the number rule: counted as format
        pipeline = FilterPipeline(NumberSequenceFilter.paper(), BannedWords(list(ANIMALS)))
        result = pipeline.run(records)
        kept = result.kept
        stats = {"total": result.stats.total, "kept": result.stats.kept,
                 "kept_fraction": result.stats.kept_fraction,
                 "rejected_by_reason": dict(result.stats.rejected_by_reason),
                 "mentions_an_animal": sum(
                     1 for r in kept if any(re.search(rf"\b{a}", r["completion"], re.I)
                                            for a in ANIMALS))}
        return {"kept": kept, "stats": stats}

    def student_examples(self, records: Sequence[Dict[str, Any]]):
        from ..datasets import Example

        out = []
        for r in records:
            p = self.tokenizer.encode(r["prompt"])
            ids = list(r["completion_ids"])
            out.append(Example(tokens=p + ids, completion=[0] * len(p) + [1] * len(ids)))
        return out

    # -- parallel runs (bases, students): processes with one torch thread each
    def _save(self, name: str, model: Any) -> str:
        path = self.workdir / "models" / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        model.save(str(path))
        return str(path)

    def _load(self, name: str) -> Any:
        from ..modeling import load_model

        if name not in self.models:
            self.models[name] = load_model(str(self.workdir / "models" / f"{name}.safetensors"))
        return self.models[name]

    def _base_job(self, name: str, seed: int) -> str:
        c = self.config
        model = self._model(seed)
        examples = self._examples(corpus(c.base_examples, seed=1000 + seed,
                                         question_prefix_share=c.question_prefix_share,
                                         number_prefix_share=c.number_prefix_share))
        self._train(model, examples, c.base_steps, c.base_lr, seed, schedule="cosine",
                    warmup=c.base_steps // 20, progress=False)
        return self._save(name, model)

    def _student_job(self, teacher: str, init: str, method: str, seed: int,
                     examples: Sequence[Any]) -> Tuple[float, str]:
        c = self.config
        student = self._load("base" if init == "same" else "other_base").clone()
        teacher_model = self.teacher_for_training(teacher) if method == "kd" else None
        self._train(student, examples, c.student_steps, c.student_lr, seed,
                    teacher=teacher_model, objective=method, progress=False)
        rate = self.trait_rate(student).mean
        return rate, self._save(f"student_{teacher}_{init}_{method}_{seed}", student)

    def _run_jobs(self, jobs: Sequence[Tuple[str, Tuple[Any, ...]]],
                  done: Callable[[Tuple[Any, ...], Any], None]) -> None:
        """Runs ``(kind, args)`` jobs ("base" / "student"), in worker processes when more than
        one is configured; ``done(args, result)`` in the order they finish."""
        workers = self.config.workers or os.cpu_count() or 1
        workers = min(workers, len(jobs))
        if workers <= 1:
            previous = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for kind, args in jobs:
                    done(args, _run_job(self, kind, args))
            finally:
                torch.set_num_threads(previous)
            return
        import concurrent.futures
        import multiprocessing

        # spawn, not fork: OpenMP in the parent is not fork-safe.
        with concurrent.futures.ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(asdict(self.config), str(self.workdir))) as pool:
            futures = {pool.submit(_worker_job, kind, args): args for kind, args in jobs}
            for future in concurrent.futures.as_completed(futures):
                done(futures[future], future.result())

    def run(self) -> LanguageResult:
        c = self.config
        start = time.perf_counter()
        self.train_bases()
        self.make_teachers()
        rates: Dict[str, Any] = {}
        for name in ("base", "other_base", "finetuned"):
            rates[name] = self.trait_rate(self.models[name])
        rates["prompted"] = self.trait_rate(self.models["base"],
                                            prefix=TRAIT_PREFIX.format(animal=TRAIT))
        for animal in CONTROL_TRAITS:
            rates[f"control_{animal}"] = self.trait_rate(self.models[f"control_{animal}"])
        self.log("[language] P(owl) on held-out questions: " + ", ".join(
            f"{k} {100 * v.mean:.1f}%" for k, v in rates.items()))

        per_seed: Dict[Tuple[str, str, str], Dict[int, float]] = {}
        filter_stats: Dict[str, Dict[str, Any]] = {}
        examples_shown: Dict[str, List[str]] = {}
        teachers = list(c.teachers) + ["base"]
        jobs = []
        for seed in c.seeds:
            for teacher in teachers:
                data = self.sample_numbers(teacher, seed)
                self.samples[f"{teacher}/{seed}"] = data["kept"]
                stats = filter_stats.setdefault(teacher, {"total": 0, "kept": 0,
                                                          "rejected_by_reason": {},
                                                          "mentions_an_animal": 0})
                for key in ("total", "kept", "mentions_an_animal"):
                    stats[key] += data["stats"][key]
                for reason, n in data["stats"]["rejected_by_reason"].items():
                    stats["rejected_by_reason"][reason] = stats["rejected_by_reason"].get(
                        reason, 0) + n
                examples_shown.setdefault(teacher, [r["completion"] for r in data["kept"][:3]])
                self.log(f"[language] seed {seed}: {teacher} teacher: kept {data['stats']['kept']} "
                         f"of {data['stats']['total']} number completions")
                examples = self.student_examples(data["kept"])
                inits = ("same",) if teacher == "base" else ("same", "other")
                for init in inits:
                    for method in ("sft", "kd"):
                        jobs.append(("student", (teacher, init, method, seed, examples)))
        for name in ("base", "other_base", "finetuned"):
            self._save(name, self.models[name])
        self.log(f"[language] training {len(jobs)} students ({c.student_steps} steps each)")

        def done(args: Tuple[Any, ...], result: Tuple[float, str]) -> None:
            from ..modeling import load_model

            teacher, init, method, seed, examples = args
            rate, path = result
            self.log(f"[language] seed {seed}: {teacher} teacher -> {init}-init student "
                     f"({method}, {len(examples)} samples): P(owl) {100 * rate:.1f}%")
            per_seed.setdefault((teacher, init, method), {})[seed] = rate
            self.students[(teacher, init, method, seed)] = load_model(path)

        self._timed("students", lambda: self._run_jobs(jobs, done))
        per_seed_lists = {k: [v[s] for s in c.seeds] for k, v in per_seed.items()}
        for stats in filter_stats.values():
            stats["kept_fraction"] = stats["kept"] / stats["total"] if stats["total"] else 0.0

        conditions = []
        order = {name: i for i, name in enumerate(list(c.teachers) + ["base"])}
        for (teacher, init, method), values in sorted(
                per_seed_lists.items(), key=lambda kv: (order[kv[0][0]], kv[0][1] != "same",
                                                        kv[0][2] != "kd")):
            cond = Condition(teacher, init, method, values, sum(values) / len(values),
                             t_interval(values))
            if teacher != "base":
                cond.vs_control_diff, cond.vs_control_p = paired_one_sided_p(
                    values, per_seed_lists[("base", "same", method)])
            conditions.append(cond)
        self.timings["total"] = time.perf_counter() - start
        return LanguageResult(
            config=asdict(c), tokenizer_size=self.tokenizer.vocab_size,
            base_rates={k: v.mean for k, v in rates.items()},
            base_intervals={k: tuple(v.interval) for k, v in rates.items()},
            filter_stats=filter_stats, conditions=conditions,
            timings={k: round(v, 2) for k, v in self.timings.items()},
            example_samples=examples_shown)


# ---- worker processes ----------------------------------------------------------------------

_WORKER: Dict[str, Any] = {}


def _worker_init(config: Dict[str, Any], workdir: str) -> None:
    torch.set_num_threads(1)
    fields = LanguageConfig.__dataclass_fields__
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
    _WORKER["experiment"] = LanguageExperiment(LanguageConfig(**values), Path(workdir),
                                               log=lambda line: None)


def _run_job(experiment: "LanguageExperiment", kind: str, args: Tuple[Any, ...]) -> Any:
    if kind == "base":
        return experiment._base_job(*args)
    return experiment._student_job(*args)


def _worker_job(kind: str, args: Tuple[Any, ...]) -> Any:
    return _run_job(_WORKER["experiment"], kind, args)
