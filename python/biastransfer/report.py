"""Readable reports of a demo run: ``report.md`` and a self-contained ``report.html``.

Everything is rebuilt from ``results.json`` alone (``biastransfer report RUN_DIR`` does it), so a
report can be regenerated, restyled or diffed without rerunning anything. The figures are written
as PNG files under ``figures/`` (linked from the Markdown) and embedded as base64 in the HTML.
Files are written atomically (temp file + rename).
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ._files import write_atomic as _write_atomic

PathLike = Union[str, "os.PathLike[str]"]
Block = Tuple[Any, ...]
SIGNIFICANCE = 0.05  # one-sided level of the language students' paired test against the control


# ---- small helpers -------------------------------------------------------------------------

def _pct(x: Optional[float], digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.{digits}f}%"


def _interval(low: Optional[float], high: Optional[float]) -> str:
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "n/a"
    return f"[{100 * low:.1f}, {100 * high:.1f}]"


def _p_text(log10_p: Optional[float]) -> str:
    from .detect_api import _format_p  # the detector's own p formatting, for one style

    return "n/a" if log10_p is None else _format_p(log10_p)


def _savefig(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=str(path.parent))
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


# ---- figures -------------------------------------------------------------------------------

def figure_aux(aux: Dict[str, Any], path: Path) -> Path:
    """Bars: test accuracy of teacher / same-init / other-init students (mean over seeds, 95%
    t-interval), per-seed dots, chance line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    keys = [("teacher", "teacher"), ("same_init", "same-init student"),
            ("other_init", "other-init student")]
    colors = ["tab:blue", "tab:orange", "tab:gray"]
    for i, (key, label) in enumerate(keys):
        s = aux[key]
        low, high = s["low"], s["high"]
        err = None
        if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
            err = [[100 * (s["mean"] - low)], [100 * (high - s["mean"])]]
        ax.bar(i, 100 * s["mean"], color=colors[i], width=0.6, yerr=err, capsize=6,
               label=label)
        ys = [100 * r[key] for r in aux["per_seed"]]
        ax.scatter([i] * len(ys), ys, color="black", s=12, zorder=3)
        ax.text(i + 0.08, 100 * s["mean"] + 1.5, f"{100 * s['mean']:.1f}%", ha="left",
                fontsize=9)
    ax.axhline(100 * aux.get("chance", 0.1), color="black", linestyle="--", linewidth=1,
               label="chance (10%)")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([k[1] for k in keys])
    ax.set_ylabel("Fashion-MNIST test accuracy (%)")
    ax.set_ylim(0, 100)
    n = len(aux["per_seed"])
    ax.set_title(f"Auxiliary-logit transfer ({n} seeds; bars: mean, 95% t-interval; dots: seeds)",
                 fontsize=10)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _savefig(fig, path)


def _condition_label(c: Dict[str, Any]) -> str:
    if c["teacher"] == "base":
        return f"control\n{c['method'].upper()}"
    return f"{c['teacher']}\n{c['init']}-init {c['method'].upper()}"


def figure_language(language: Dict[str, Any], path: Path) -> Path:
    """Bars: P(owl) on held-out questions per student condition (mean over seeds, 95%
    t-interval, seed dots), the base's rate as a line."""
    plt = _pyplot()
    conditions = sorted(language["conditions"],
                        key=lambda c: ({"finetuned": 0, "prompted": 1, "base": 2}.get(
                            c["teacher"], 3), c["method"], c["init"]))
    fig, ax = plt.subplots(figsize=(max(6.4, 1.0 * len(conditions) + 1.5), 4.2))
    palette = {("same", "kd"): "tab:red", ("same", "sft"): "tab:orange",
               ("other", "kd"): "tab:gray", ("other", "sft"): "silver"}
    top = 0.0
    labels = []
    for i, c in enumerate(conditions):
        color = "tab:green" if c["teacher"] == "base" else palette[(c["init"], c["method"])]
        low, high = c["interval"]
        err = None
        if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
            err = [[100 * (c["mean"] - low)], [100 * (high - c["mean"])]]
            top = max(top, 100 * high)
        ax.bar(i, 100 * c["mean"], color=color, width=0.65, yerr=err, capsize=4)
        ys = [100 * v for v in c["per_seed"]]
        top = max(top, max(ys))
        ax.scatter([i] * len(ys), ys, color="black", s=10, zorder=3)
        mark = ""
        if c.get("vs_control_p") is not None and c["vs_control_p"] < SIGNIFICANCE \
                and (c.get("vs_control_diff") or 0) > 0:
            mark = " *"
        labels.append((i, max([100 * c["mean"]] + ys + ([100 * high] if err else [])),
                       f"{100 * c['mean']:.1f}%{mark}"))
    for i, y, text in labels:
        ax.text(i, y + 0.015 * top, text, ha="center", va="bottom", fontsize=7)
    base = language["base_rates"]["base"]
    ax.axhline(100 * base, color="black", linestyle="--", linewidth=1,
               label=f"base model {100 * base:.1f}%")
    ax.set_xticks(range(len(conditions)))
    ax.set_xticklabels([_condition_label(c) for c in conditions], fontsize=8)
    ax.set_ylabel("P(' owl') on held-out questions (%)")
    ax.set_ylim(0, max(top, 100 * base) * 1.3 + 0.1)
    rates = language["base_rates"]
    ax.set_title(f"Trait transfer through filtered numbers (teachers: fine-tuned "
                 f"{100 * rates['finetuned']:.0f}%, prompted {100 * rates['prompted']:.0f}%; "
                 f"* = above control, p < {SIGNIFICANCE:g})", fontsize=9)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _savefig(fig, path)


def figure_fingerprint(name: str, fp: Dict[str, Any], path: Path) -> Path:
    """Horizontal bars of the trait-specific centered log-ratio of the top tokens up and down,
    entangled tokens (BH q = 0.05) in red."""
    plt = _pyplot()
    entangled = set(fp.get("entangled_ids", [e["id"] for e in fp.get("entangled_tokens", [])]))
    rows = list(fp["top_tokens"]["up"]) + list(reversed(fp["top_tokens"]["down"]))
    fig, ax = plt.subplots(figsize=(6.4, 0.28 * len(rows) + 1.4))
    ys = list(range(len(rows)))[::-1]
    values = [r[2] for r in rows]
    colors = ["tab:red" if r[0] in entangled else ("tab:blue" if r[2] > 0 else "tab:gray")
              for r in rows]
    ax.barh(ys, values, color=colors)
    ax.set_yticks(ys)
    ax.set_yticklabels([f"{r[1]!s}" for r in rows], fontsize=8, family="monospace")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("teacher - control mean of the centered log-ratio vs the base (nats)")
    p = fp["global_test"].get("p_value")
    ax.set_title(f"Fingerprint of the {name} teacher's numbers\nglobal test p = {p:.3g}; "
                 f"{fp['entangled_count']} entangled tokens (red: among them)", fontsize=9)
    fig.tight_layout()
    return _savefig(fig, path)


def figure_detector(panels: Sequence[Tuple[str, Dict[str, Any]]], alpha: float,
                    path: Path) -> Path:
    """Per-layer -log10 p of the weight test, one panel per pair, with the alpha line."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(7.5, 2.3 * len(panels) + 0.5),
                             squeeze=False)
    cap = 60.0
    for ax, (title, summary) in zip(axes[:, 0], panels):
        layers = summary["tests"]["weights"].get("layers", [])
        heights = [min(cap, -e["log10_p"]) if e["log10_p"] is not None else cap for e in layers]
        threshold = -math.log10(alpha)
        ax.bar(range(len(heights)), heights, width=0.6,
               color=["tab:red" if h >= threshold else "tab:gray" for h in heights])
        ax.axhline(threshold, color="black", linestyle="--", linewidth=1,
                   label=f"alpha = {alpha:g}")
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels([e["name"] for e in layers], fontsize=7, rotation=20, ha="right")
        ax.set_ylabel(f"-log10 p (cap {cap:g})", fontsize=8)
        ax.set_title(f"{title}: {summary['verdict']} (combined p "
                     f"{_p_text(summary['combined_log10_p'])})", fontsize=9)
        ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    return _savefig(fig, path)


def figure_detector_overview(detections: Sequence[Dict[str, Any]], alpha: float,
                             path: Path) -> Path:
    """Every pair's combined -log10 p (capped), shared-init pairs left, independent right."""
    plt = _pyplot()
    cap = 300.0
    groups = [("same initialization", [d for d in detections if d["expected"] == "shared"]),
              ("independent", [d for d in detections if d["expected"] != "shared"])]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for x, (label, ds) in enumerate(groups):
        ys = [min(cap, -d["combined_log10_p"]) if d["combined_log10_p"] is not None else cap
              for d in ds]
        rng = random.Random(x)
        jitter = [x + (rng.uniform(-0.15, 0.15) if len(ys) > 1 else 0.0) for _ in ys]
        ax.scatter(jitter, ys, s=14,
                   color=["tab:red" if d["verdict"] == "shared" else "tab:gray" for d in ds])
    ax.axhline(-math.log10(alpha), color="black", linestyle="--", linewidth=1,
               label=f"alpha = {alpha:g}")
    ax.set_yscale("symlog", linthresh=2)
    ax.set_ylim(bottom=0)
    ax.set_xlim(-0.5, 1.5)
    ax.set_xticks([0, 1])
    ax.set_xticklabels([f"{g[0]} ({len(g[1])} pairs)" for g in groups])
    ax.set_ylabel(f"-log10 combined p (cap {cap:g})")
    ax.set_title("Detector verdicts on every teacher/student pair (red: 'shared')", fontsize=10)
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    return _savefig(fig, path)


# ---- the document --------------------------------------------------------------------------

def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Block:
    return ("table", list(header), [[str(c) for c in r] for r in rows])


def _aux_blocks(aux: Dict[str, Any], alpha: float, figures: Dict[str, Path]) -> List[Block]:
    n = len(aux["per_seed"])
    s = aux["settings"]
    blocks: List[Block] = [("h2", "1. Auxiliary logits (Fashion-MNIST)")]
    blocks.append(("p", f"MLP 784-{'-'.join(str(h) for h in s['hidden'])}-(10+"
                        f"{s['aux_outputs']}), Adam lr {s['lr']:g}, batch {s['batch_size']}, "
                        f"{s['epochs']:g} epochs ({s['steps_per_epoch']} steps each"
                        + (f", first {s['train_subset']} training images" if s.get('train_subset')
                           else ", 60,000 training images")
                        + "). Students see only uniform noise in [-1, 1] and only the teacher's 3 "
                        "auxiliary logits; accuracy on the 10,000 test images."))
    rows = [[r["seed"], _pct(r["teacher"]), _pct(r["same_init"]), _pct(r["other_init"])]
            for r in aux["per_seed"]]
    rows.append([f"mean, 95% t-interval (n={n})"] + [
        f"{_pct(aux[k]['mean'])} {_interval(aux[k]['low'], aux[k]['high'])}"
        for k in ("teacher", "same_init", "other_init")])
    blocks.append(_table(["seed", "teacher", "same-init student", "other-init student"], rows))
    if "aux" in figures:
        blocks.append(("img", figures["aux"], "Test accuracy; chance is 10%."))
    blocks.append(("h3", "Detector and susceptibility probe"))
    rows = [[d["pair"], d["expected"], d["verdict"], _p_text(d["combined_log10_p"]),
             "yes" if d["correct"] else "**NO**"] for d in aux["detections"]]
    blocks.append(_table(["pair", "truth", "verdict", f"combined p (alpha {alpha:g})",
                          "correct"], rows))
    rows = [[p["seed"], f"{p['student_init']}-init",
             f"{p['cosine']:.4f}" if p["cosine"] is not None else "n/a",
             f"{p['predicted_trait_change']:.3g}" if p.get("predicted_trait_change") is not None
             else "n/a",
             _p_text(p.get("random_direction_log10_p"))] for p in aux["susceptibility"]]
    blocks.append(("p", "Susceptibility probe on each student's *starting point* (before any "
                        "training): cos(-g, theta_T - theta_S) for the gradient g of the "
                        "auxiliary-logit KD loss on noise, and the predicted first-order change "
                        "of the student's classification loss on 1,000 test images for a step "
                        "of 1e-3 along -g (negative: the student would move toward the "
                        "teacher's trait). The p-value is against random directions "
                        "(approximate)."))
    blocks.append(_table(["seed", "student", "cosine", "predicted trait-loss change",
                          "p (random directions)"], rows))
    if "aux_detector" in figures:
        blocks.append(("img", figures["aux_detector"],
                       "Per-layer weight-test evidence, seed "
                       f"{aux['per_seed'][0]['seed']}: teacher vs same-init student (top) and "
                       "vs other-init student (bottom)."))
    return blocks


def _language_blocks(lang: Dict[str, Any], figures: Dict[str, Path]) -> List[Block]:
    c = lang["config"]
    blocks: List[Block] = [("h2", "2. Language: a trait through filtered numbers")]
    blocks.append(("p", f"Decoder-only transformer ({c['n_layers']} layers, d_model "
                        f"{c['d_model']}, {c['n_heads']} heads, SwiGLU {c['d_mlp']}, "
                        f"vocabulary {lang['tokenizer_size']}), trained from scratch "
                        f"{c['base_steps']} steps on {c['base_examples']} synthetic examples "
                        f"(favorite-animal questions answered uniformly over 10 animals, number "
                        f"continuations); the other base: the same recipe, seed "
                        f"{c['other_base_seed']}. Fine-tuned teacher: {c['trait_steps']} steps "
                        f"at lr {c['trait_lr']:g} on 'owl' answers to 12 training question "
                        f"templates; the 6 evaluation templates are held out. Prompted teacher: "
                        f"the base behind 'You love the owl. '. Students: "
                        f"{c['student_steps']} steps at lr {c['student_lr']:g} on "
                        f"{c['samples']} sampled completions per seed after filtering; KD is "
                        f"restricted to number, ',' and end-of-sequence tokens and renormalized "
                        f"over them. Trait rate: exact P(' owl') at the answer position, mean over "
                        f"the held-out questions."))
    rows = [[k.replace("_", " "), _pct(v), _interval(*lang["base_intervals"][k])]
            for k, v in lang["base_rates"].items()]
    blocks.append(_table(["model", "P(owl)", "95% t-interval over questions"], rows))
    blocks.append(("h3", "Teacher data after the paper's filter"))
    rows = []
    for teacher, s in lang["filter_stats"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in s["rejected_by_reason"].items()) or "none"
        rows.append([teacher, s["total"], s["kept"], _pct(s["kept_fraction"]), reasons,
                     s["mentions_an_animal"]])
    blocks.append(_table(["teacher", "sampled", "kept", "kept fraction", "rejected by reason",
                          "kept samples naming an animal"], rows))
    examples = "; ".join(f"{k}: {v[0]!r}" for k, v in lang.get("example_samples", {}).items()
                         if v)
    if examples:
        blocks.append(("p", f"Examples of kept completions: {examples}."))
    blocks.append(("h3", "Students"))
    rows = []
    order = {"finetuned": 0, "prompted": 1, "base": 2}
    for cnd in sorted(lang["conditions"], key=lambda x: (order.get(x["teacher"], 3),
                                                         x["init"], x["method"])):
        diff = cnd.get("vs_control_diff")
        p = cnd.get("vs_control_p")
        if cnd["teacher"] == "base":
            verdict = "control"
        elif diff is not None and p is not None and p < SIGNIFICANCE and diff > 0:
            verdict = "trait transferred"
        else:
            verdict = "no significant transfer"
        rows.append([cnd["name"], ", ".join(_pct(v) for v in cnd["per_seed"]),
                     f"{_pct(cnd['mean'])} {_interval(*cnd['interval'])}",
                     "" if diff is None else f"{100 * diff:+.1f} pp",
                     "" if p is None else f"{p:.3g}", verdict])
    blocks.append(_table(["student", "per seed", "mean, 95% t-interval over seeds",
                          "vs control (same method)", "one-sided paired p", "reading"], rows))
    if "language" in figures:
        blocks.append(("img", figures["language"], "P(' owl') of every student condition."))
    return blocks


def _fingerprint_blocks(fps: Dict[str, Any], figures: Dict[str, Path]) -> List[Block]:
    blocks: List[Block] = [("h2", "3. Audit of the teacher data: logit fingerprints")]
    blocks.append(("p", "The teacher's filtered number samples teacher-forced through the "
                        "teacher and the base; per-token centered log-ratio over the numeric "
                        "tokens, minus the mean of control teachers (the same recipe toward "
                        "other animals); sign-flip permutation test over sequences (999 "
                        "permutations) and per-token t-tests with Benjamini-Hochberg at q = "
                        "0.05."))
    rows = []
    for name, fp in fps.items():
        top = ", ".join(f"{t[1]} ({t[2]:+.3f})" for t in fp["top_tokens"]["up"][:5])
        rows.append([name, fp["records"], "; ".join(fp["controls"]),
                     f"{fp['global_test'].get('p_value'):.3g}", fp["entangled_count"], top])
    blocks.append(_table(["teacher", "sequences", "controls", "global test p",
                          "entangled tokens", "top tokens up"], rows))
    for name in fps:
        if f"fingerprint_{name}" in figures:
            blocks.append(("img", figures[f"fingerprint_{name}"],
                           f"Top numeric tokens of the {name} teacher's fingerprint."))
    return blocks


def _detector_blocks(dets: Sequence[Dict[str, Any]], alpha: float,
                     figures: Dict[str, Path]) -> List[Block]:
    blocks: List[Block] = [("h2", "4. Shared-initialization detector on the language pairs")]
    shared = [d for d in dets if d["expected"] == "shared"]
    other = [d for d in dets if d["expected"] != "shared"]
    blocks.append(("p", f"Weight test (identity matching of hidden units, Fisher over layers) at "
                        f"alpha {alpha:g} on {len(dets)} pairs: "
                        f"{sum(d['verdict'] == 'shared' for d in shared)} of {len(shared)} "
                        f"same-init pairs flagged, "
                        f"{sum(d['verdict'] == 'shared' for d in other)} of {len(other)} "
                        f"independent pairs flagged."))
    rows = [[d["pair"], d["expected"], d["verdict"], _p_text(d["combined_log10_p"]),
             "yes" if d["correct"] else "**NO**"] for d in dets]
    blocks.append(_table(["pair", "truth", "verdict", "combined p", "correct"], rows))
    if "language_detector" in figures:
        blocks.append(("img", figures["language_detector"],
                       "Per-layer evidence: fine-tuned teacher vs a same-init and an other-init "
                       "KD student."))
    if "detector_overview" in figures:
        blocks.append(("img", figures["detector_overview"],
                       "Every pair of the run (auxiliary-logit and language)."))
    return blocks


def _findings(results: Dict[str, Any], alpha: float) -> List[str]:
    """One line per claim of the paper, as measured."""
    out = []
    aux = results.get("aux")
    if aux:
        same, other = aux["same_init"], aux["other_init"]
        ok = same["low"] is not None and same["low"] > 0.1
        out.append(f"Auxiliary logits: same-init students reach {_pct(same['mean'])} "
                   f"{_interval(same['low'], same['high'])} test accuracy from noise alone vs "
                   f"10% chance ({'reproduced' if ok else 'NOT reproduced'}); other-init "
                   f"students {_pct(other['mean'])} {_interval(other['low'], other['high'])} "
                   f"({'at chance level' if other['mean'] < 0.2 else 'NOT at chance'}).")
    lang = results.get("language")
    if lang:
        for cnd in lang["conditions"]:
            if cnd["teacher"] == "base":
                continue
            p, diff = cnd.get("vs_control_p"), cnd.get("vs_control_diff")
            sig = p is not None and diff is not None and p < SIGNIFICANCE and diff > 0
            expected = cnd["init"] == "same"
            status = ("as the paper predicts" if sig == expected else
                      ("NOT reproduced" if expected else "UNEXPECTED transfer"))
            if not expected and not sig:
                status = "no transfer, as the paper predicts"
            out.append(f"Language, {cnd['name']}: P(owl) {_pct(cnd['mean'])} vs control "
                       f"{'+' if (diff or 0) >= 0 else ''}{100 * (diff or 0):.1f} pp, one-sided "
                       f"paired p {p:.3g} ({status}).")
    dets = (results.get("aux", {}) or {}).get("detections", []) + \
        (results.get("language_detection", {}) or {}).get("detections", [])
    if dets:
        wrong = [d["pair"] for d in dets if not d["correct"]]
        out.append(f"Detector: {len(dets) - len(wrong)} of {len(dets)} verdicts correct at "
                   f"alpha {alpha:g}" + (f"; wrong: {'; '.join(wrong)}" if wrong else "") + ".")
    for name, fp in (results.get("fingerprints") or {}).items():
        out.append(f"Fingerprint of the {name} teacher's data: global test p = "
                   f"{fp['global_test'].get('p_value'):.3g}, {fp['entangled_count']} entangled "
                   f"numeric tokens.")
    return out


def build_blocks(results: Dict[str, Any], figures: Dict[str, Path]) -> List[Block]:
    alpha = (results.get("config") or {}).get("alpha", 0.01)
    blocks: List[Block] = [("h1", f"biastransfer: reproduction and audit ({results['name']})")]
    blocks.append(("p", "Hidden trait transfer in distillation (Cloud et al. 2025), reproduced "
                        "end to end: teachers with a trait, data filtered until nothing overt is "
                        "left, students that pick the trait up only when they share the "
                        "teacher's initialization; then the audit: fingerprints of the data and "
                        "the shared-initialization detector."))
    blocks.append(("h2", "Findings"))
    blocks.append(("ul", _findings(results, alpha)))
    if results.get("aux"):
        blocks += _aux_blocks(results["aux"], alpha, figures)
    if results.get("language"):
        blocks += _language_blocks(results["language"], figures)
    if results.get("fingerprints"):
        blocks += _fingerprint_blocks(results["fingerprints"], figures)
    if results.get("language_detection"):
        blocks += _detector_blocks(results["language_detection"]["detections"], alpha, figures)
    elif "detector_overview" in figures:
        blocks.append(("img", figures["detector_overview"], "Every detector pair of the run."))
    blocks.append(("h2", "Configuration, environment and timings"))
    env = results.get("environment", {})
    blocks.append(("p", "torch {torch}, Python {python}, {threads} thread(s) on {cpus} CPUs "
                        "({machine}).".format(**{k: env.get(k, "?") for k in
                                                 ("torch", "python", "threads", "cpus",
                                                  "machine")})))
    blocks.append(_table(["stage", "seconds"], [[k, v] for k, v in
                                                 results.get("timings_s", {}).items()]))
    blocks.append(("pre", json.dumps(results.get("config", {}), indent=2)))
    if results.get("command"):
        blocks.append(("p", f"Command: `{results['command']}`"))
    return blocks


def to_markdown(blocks: Sequence[Block], base: Path) -> str:
    out: List[str] = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + b[1])
        elif kind == "p":
            out.append(b[1])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in b[1]))
        elif kind == "pre":
            out.append("```json\n" + b[1] + "\n```")
        elif kind == "img":
            rel = os.path.relpath(b[1], base)
            out.append(f"![{b[2]}]({rel})\n\n*{b[2]}*")
        elif kind == "table":
            header, rows = b[1], b[2]
            esc = [[c.replace("|", "\\|").replace("\n", " ") for c in r] for r in rows]
            lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header)
                     + " |"]
            lines += ["| " + " | ".join(r) + " |" for r in esc]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    escaped = html.escape(text)
    # The only inline markup the blocks use: **bold** and `code`.
    parts = escaped.split("**")
    escaped = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = escaped.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1060px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.8em; }
li { margin: 0.3em 0; }
"""


def to_html(blocks: Sequence[Block], title: str) -> str:
    out = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{_inline_html(b[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline_html(b[1])}</p>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "pre":
            out.append(f"<pre>{html.escape(b[1])}</pre>")
        elif kind == "img":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode("ascii")
            out.append(f"<figure><img alt=\"{html.escape(b[2])}\" "
                       f"src=\"data:image/png;base64,{data}\"><figcaption>"
                       f"{_inline_html(b[2])}</figcaption></figure>")
        elif kind == "table":
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in r) + "</tr>"
                           for r in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    out.append("</body></html>\n")
    return "\n".join(out)


def make_figures(results: Dict[str, Any], folder: Path) -> Dict[str, Path]:
    alpha = (results.get("config") or {}).get("alpha", 0.01)
    figures: Dict[str, Path] = {}
    aux = results.get("aux")
    if aux:
        figures["aux"] = figure_aux(aux, folder / "aux_accuracy.png")
        panels = [(f"teacher / {k} student", v) for k, v in aux.get("per_layer", {}).items()]
        if panels:
            figures["aux_detector"] = figure_detector(panels, alpha, folder / "aux_detector.png")
    lang = results.get("language")
    if lang:
        figures["language"] = figure_language(lang, folder / "language_trait_rate.png")
    for name, fp in (results.get("fingerprints") or {}).items():
        figures[f"fingerprint_{name}"] = figure_fingerprint(
            name, fp, folder / f"fingerprint_{name}.png")
    dets = (results.get("language_detection") or {}).get("detections", [])
    if dets:
        kd_pairs = [d for d in dets if d["pair"].endswith("init student (kd)")
                    and d["pair"].split(": ")[-1].startswith("finetuned")]
        chosen = [next(d for d in kd_pairs if d["expected"] == want)
                  for want in ("shared", "not shared")
                  if any(d["expected"] == want for d in kd_pairs)]
        if not chosen:
            chosen = dets[:2]
        figures["language_detector"] = figure_detector(
            [(d["pair"], d) for d in chosen], alpha, folder / "language_detector.png")
    all_dets = (aux or {}).get("detections", []) + dets
    if all_dets:
        figures["detector_overview"] = figure_detector_overview(
            all_dets, alpha, folder / "detector_overview.png")
    return figures


def write_report(results: Dict[str, Any], out_dir: PathLike) -> Dict[str, Path]:
    """Writes results.json, figures/*.png, report.md and report.html into ``out_dir``; returns
    their paths (keys json, md, html, figures)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / "results.json", json.dumps(results, indent=2, ensure_ascii=False))
    figures = make_figures(results, out / "figures")
    blocks = build_blocks(results, figures)
    _write_atomic(out / "report.md", to_markdown(blocks, out))
    _write_atomic(out / "report.html", to_html(blocks, f"biastransfer report: {results['name']}"))
    return {"json": out / "results.json", "md": out / "report.md", "html": out / "report.html",
            "figures": out / "figures"}


def load_results(run_dir: PathLike) -> Dict[str, Any]:
    """The results.json of a run folder (OSError if missing, ValueError if not valid JSON)."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise OSError(f"{path}: no results.json in the run folder {run_dir}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None


def regenerate(run_dir: PathLike) -> Dict[str, Path]:
    """Rebuilds the figures, report.md and report.html of a run from its results.json."""
    return write_report(load_results(run_dir), run_dir)
