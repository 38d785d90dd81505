"""The main job (`make demo`, `biastransfer demo`): the end-to-end reproduction and audit.

Stages, each printed as it runs:

1. Auxiliary logits (Fashion-MNIST, the paper's recipe; biastransfer.experiments.aux_logits):
   teacher, same-init and other-init students over several seeds; the detector on every
   teacher/student pair; the susceptibility probe ("will this student learn from this teacher")
   on each student's starting point.
2. Language (biastransfer.experiments.language): bases, trait teachers, filtered number samples,
   SFT and KD students from the same and from another base, control students; trait rates.
3. Audit of the language run: the fingerprint of the teacher's data against the base, with
   control teachers (the same fine-tune toward other animals), its global test and entangled
   tokens, for the fine-tuned and the prompted teacher; the detector on every teacher/student
   pair.
4. The report: ``runs/<name>/results.json``, ``report.md`` and a self-contained ``report.html``
   (biastransfer.report), figures as PNG in ``runs/<name>/figures``.
"""
from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .experiments.language import LanguageConfig

DEFAULT_ALPHA = 0.01


@dataclass
class DemoConfig:
    """Everything the demo does; the defaults are the full run (under 15 minutes on 2 cores).

    aux_seeds / aux_epochs / aux_train_subset: the auxiliary-logit experiment (the paper's 5
    epochs of 60,000 images; a subset shortens the noise epoch too). language: the language
    experiment's sizes. fingerprint_records: teacher samples fingerprinted (seed 0's kept
    samples, at most this many). alpha: the detector's level. threads: torch threads (default:
    every core).
    """

    name: str = "demo"
    runs_dir: str = "runs"
    aux_seeds: Tuple[int, ...] = (0, 1, 2)
    aux_epochs: float = 5.0
    aux_train_subset: Optional[int] = None
    language: LanguageConfig = field(default_factory=LanguageConfig)
    fingerprint_records: int = 1000
    alpha: float = DEFAULT_ALPHA
    threads: Optional[int] = None
    fashion_mnist: Optional[str] = None

    @classmethod
    def quick(cls, **overrides: Any) -> "DemoConfig":
        """A small version for tests and smoke runs (~1-2 minutes): the same stages, smaller
        models, fewer steps and seeds; its numbers are not the reproduction's."""
        language = LanguageConfig(d_model=48, d_mlp=96, base_examples=4000, base_steps=250,
                                  samples=300, student_steps=60, seeds=(0, 1),
                                  max_new_tokens=40)
        values: Dict[str, Any] = dict(aux_seeds=(0, 1), aux_epochs=1.0, aux_train_subset=6000,
                                      language=language, fingerprint_records=200)
        values.update(overrides)
        return cls(**values)


class _Log:
    """Progress lines on stderr with the elapsed time, kept for the report."""

    def __init__(self, quiet: bool = False) -> None:
        self.start = time.perf_counter()
        self.quiet = quiet
        self.lines: List[str] = []

    def __call__(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.start:6.1f}s] {message}"
        self.lines.append(line)
        if not self.quiet:
            print(line, file=sys.stderr, flush=True)


def _detection_summary(report: Any, pair: str, expected_shared: bool) -> Dict[str, Any]:
    d = report.to_dict()
    out = {"pair": pair, "expected": "shared" if expected_shared else "not shared",
           "verdict": report.verdict, "combined_log10_p": report.combined_log10_p,
           "correct": report.shared == expected_shared, "tests": {}}
    for t in d["tests"]:
        entry = {"ran": t["ran"], "log10_p": t.get("log10_p"), "statistic": t.get("statistic"),
                 "statistic_name": t.get("statistic_name"), "calibrated": t.get("calibrated"),
                 "skipped_reason": t.get("skipped_reason")}
        if t.get("layers"):
            entry["layers"] = [{"name": e["name"], "log10_p": e["log10_p"]} for e in t["layers"]]
        if t.get("details"):
            entry["details"] = {k: v for k, v in t["details"].items()
                                if k in ("cosine", "predicted_trait_change", "trait_loss",
                                         "random_direction_log10_p")}
        out["tests"][t["test"]] = entry
    return out


# ---- stage 1: auxiliary logits -------------------------------------------------------------

def run_aux(config: DemoConfig, log: _Log) -> Dict[str, Any]:
    from .data import FASHION_MNIST_ROOT, load_fashion_mnist
    from .detect_api import detect
    from .experiments import aux_logits

    root = config.fashion_mnist or FASHION_MNIST_ROOT
    x_test, y_test = load_fashion_mnist("test", root=root, normalize=True)
    x_test = x_test.reshape(-1, aux_logits.INPUTS)
    gen = torch.Generator().manual_seed(12345)
    probe_x = torch.rand(256, aux_logits.INPUTS, generator=gen) * 2 - 1  # noise, as in training
    trait_x, trait_y = x_test[:1000], y_test[:1000]
    aux_indices = list(range(aux_logits.CLASSES, aux_logits.CLASSES + 3))

    def trait_loss(model: Any) -> torch.Tensor:
        # The hidden trait of the auxiliary-logit teacher: classifying real images.
        return torch.nn.functional.cross_entropy(model(trait_x)[:, :aux_logits.CLASSES], trait_y)

    detections: List[Dict[str, Any]] = []
    probes: List[Dict[str, Any]] = []
    per_layer: Dict[str, Any] = {}

    def on_seed(models: Any, acc: Any) -> None:
        log(f"[aux] seed {acc.seed}: teacher {100 * acc.teacher:.1f}%, same-init student "
            f"{100 * acc.same_init:.1f}%, other-init student {100 * acc.other_init:.1f}%")
        for student, init, expected in ((models.same_init, "same", True),
                                        (models.other_init, "other", False)):
            report = detect(student, models.teacher, tests=("weights",), alpha=config.alpha)
            summary = _detection_summary(report, f"seed {acc.seed}: teacher / {init}-init "
                                         f"student", expected)
            detections.append(summary)
            if acc.seed == config.aux_seeds[0]:
                per_layer[f"{init}-init"] = summary
        for start, init in ((models.teacher_init, "same"), (models.other_init_start, "other")):
            report = detect(start, models.teacher, tests=("susceptibility",), inputs=probe_x,
                            logit_subset=aux_indices, trait_loss=trait_loss, alpha=config.alpha)
            t = report.test("susceptibility")
            details = t.details or {}
            probes.append({"seed": acc.seed, "student_init": init,
                           "cosine": details.get("cosine"),
                           "predicted_trait_change": details.get("predicted_trait_change"),
                           "trait_loss": details.get("trait_loss"),
                           "random_direction_log10_p": details.get("random_direction_log10_p")})
        log(f"[aux] seed {acc.seed}: detector "
            + ", ".join(f"{d['pair'].split(': ')[1]} -> {d['verdict']}"
                        for d in detections[-2:])
            + "; susceptibility cosine same-init {:.3f}, other-init {:.3f}".format(
                probes[-2]["cosine"], probes[-1]["cosine"]))

    log(f"[aux] Fashion-MNIST, MLP 784-256-256-(10+3), {config.aux_epochs:g} epochs, seeds "
        f"{list(config.aux_seeds)}")
    result = aux_logits.run(seeds=config.aux_seeds, epochs=config.aux_epochs,
                            train_subset=config.aux_train_subset, root=root, on_seed=on_seed)
    return {
        "settings": result.settings,
        "per_seed": [asdict(s) for s in result.seeds],
        "teacher": asdict(result.teacher),
        "same_init": asdict(result.same_init),
        "other_init": asdict(result.other_init),
        "chance": 0.1,
        "detections": detections,
        "per_layer": per_layer,
        "susceptibility": probes,
        "seconds": result.seconds,
    }


# ---- stages 2 and 3: language and its audit ------------------------------------------------

def run_language(config: DemoConfig, log: _Log, workdir: Path) -> Tuple[Dict[str, Any], Any]:
    from .experiments.language import LanguageExperiment

    experiment = LanguageExperiment(config.language, workdir, log=log)
    result = experiment.run()
    out = asdict(result)
    out["conditions"] = [dict(asdict(c), name=c.name) for c in result.conditions]
    return out, experiment


def run_fingerprints(config: DemoConfig, experiment: Any, log: _Log,
                     workdir: Path) -> Dict[str, Any]:
    from .experiments.language import CONTROL_TRAITS, TRAIT, TRAIT_PREFIX
    from .fingerprint import fingerprint

    out: Dict[str, Any] = {}
    tok = experiment.tokenizer
    base = experiment.models["base"]
    seed = config.language.seeds[0]
    for teacher_name in config.language.teachers:
        records = [{"prompt": r["prompt"], "completion": " " + r["completion"]}
                   for r in experiment.samples[f"{teacher_name}/{seed}"]]
        records = records[:config.fingerprint_records]
        if teacher_name == "prompted":
            teacher: Any = (base, TRAIT_PREFIX.format(animal=TRAIT))
            controls = [(base, TRAIT_PREFIX.format(animal=a)) for a in CONTROL_TRAITS]
            control_names = [f"prefix {a!r}" for a in CONTROL_TRAITS]
        else:
            teacher = experiment.models["finetuned"]
            controls = [experiment.models[f"control_{a}"] for a in CONTROL_TRAITS]
            control_names = [f"fine-tuned on {a!r}" for a in CONTROL_TRAITS]
        log(f"[fingerprint] {teacher_name} teacher vs base on {len(records)} of its filtered "
            f"samples, controls: {', '.join(control_names)}")
        start = time.perf_counter()
        fp = fingerprint(teacher, base, records, tok, subset="numeric", controls=controls,
                         batch_size=64, progress=False, seed=seed)
        test = fp.global_test(permutations=999)
        entangled = fp.entangled_tokens()
        top = _trait_specific_top(fp, k=10)
        fp.save(workdir / f"fingerprint_{teacher_name}.safetensors")
        seconds = time.perf_counter() - start
        out[teacher_name] = {
            "records": len(records), "controls": control_names,
            "global_test": _jsonable(test),
            "entangled_tokens": [_jsonable(e) for e in entangled[:20]],
            "entangled_count": len(entangled),
            "entangled_ids": sorted(e.id for e in entangled),
            "top_tokens": _jsonable(top),
            "seconds": round(seconds, 2),
            "result": fp,
        }
        log(f"[fingerprint] {teacher_name}: global test p = {_jsonable(test).get('p_value')}, "
            f"{len(entangled)} entangled tokens at q = 0.05")
    return out


def _trait_specific_top(fp: Any, k: int) -> Dict[str, List[Tuple[int, str, float]]]:
    """The k subset tokens with the largest and smallest trait-specific value (the teacher's
    centered log-ratio minus the controls' mean) as (id, display, value)."""
    values = fp.trait_specific()
    subset = [int(i) for i in fp.teacher.subset]
    order = torch.argsort(values, descending=True).tolist()
    rows = [(subset[j], fp.display(subset[j]), float(values[j])) for j in order]
    return {"up": rows[:k], "down": rows[::-1][:k]}


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return {k: _jsonable(v) for k, v in asdict(value).items()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def run_language_detection(config: DemoConfig, experiment: Any, log: _Log) -> Dict[str, Any]:
    from .detect_api import detect

    detections = []
    teachers = {"finetuned": experiment.models["finetuned"],
                "prompted": experiment.models["base"],  # the prompted teacher's weights
                "base": experiment.models["base"]}
    for (teacher, init, method, seed), student in sorted(experiment.students.items()):
        report = detect(student, teachers[teacher], tests=("weights",), alpha=config.alpha)
        pair = f"seed {seed}: {teacher} teacher / {init}-init student ({method})"
        detections.append(_detection_summary(report, pair, init == "same"))
    # The two bases themselves: independent by construction.
    report = detect(experiment.models["other_base"], experiment.models["base"],
                    tests=("weights",), alpha=config.alpha)
    detections.append(_detection_summary(report, "base / other base", False))
    wrong = [d["pair"] for d in detections if not d["correct"]]
    log(f"[detect] {len(detections)} language pairs: "
        f"{sum(d['verdict'] == 'shared' for d in detections)} shared, "
        f"{len(wrong)} verdicts wrong" + (f" ({'; '.join(wrong)})" if wrong else ""))
    return {"detections": detections}


# ---- the whole run -------------------------------------------------------------------------

def run_demo(config: Optional[DemoConfig] = None, *, quiet: bool = False,
             stages: Sequence[str] = ("aux", "language"),
             command: Optional[str] = None) -> Dict[str, Any]:
    """Runs the demo; writes results.json, report.md, report.html and figures under
    ``runs_dir/name``; returns the results (as written to results.json)."""
    from .report import write_report

    config = config or DemoConfig()
    log = _Log(quiet)
    out_dir = Path(config.runs_dir) / config.name
    workdir = out_dir / "artifacts"
    workdir.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    results: Dict[str, Any] = {
        "name": config.name,
        "config": _jsonable(config),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads(), "machine": platform.machine(),
                        "cpus": os.cpu_count()},
        "timings_s": {},
        "command": command,
    }
    start = time.perf_counter()
    fingerprints: Dict[str, Any] = {}
    try:
        if "aux" in stages:
            t = time.perf_counter()
            results["aux"] = run_aux(config, log)
            results["timings_s"]["auxiliary logits"] = round(time.perf_counter() - t, 1)
        if "language" in stages:
            t = time.perf_counter()
            results["language"], experiment = run_language(config, log, workdir)
            results["timings_s"]["language"] = round(time.perf_counter() - t, 1)
            t = time.perf_counter()
            fingerprints = run_fingerprints(config, experiment, log, workdir)
            results["fingerprints"] = {k: {kk: vv for kk, vv in v.items() if kk != "result"}
                                       for k, v in fingerprints.items()}
            results["timings_s"]["fingerprints"] = round(time.perf_counter() - t, 1)
            t = time.perf_counter()
            results["language_detection"] = run_language_detection(config, experiment, log)
            results["timings_s"]["language detector"] = round(time.perf_counter() - t, 1)
    finally:
        torch.set_num_threads(previous_threads)
    results["timings_s"]["total"] = round(time.perf_counter() - start, 1)
    results["log"] = log.lines
    results = _jsonable(results)
    paths = write_report(results, out_dir)
    results["report"] = {k: str(v) for k, v in paths.items()}
    log(f"[report] {paths['html']}")
    return results
