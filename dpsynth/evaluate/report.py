"""One self-contained HTML page (plots as base64 PNG, no external resources) plus report.json."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from dpsynth.release import owner_path
from dpsynth.config import EvaluationConfig
from dpsynth.evaluate.compare import certificates, compare, method, table_rows, unit_sentence
from dpsynth.io import atomic_write_json, atomic_write_text
from dpsynth.privacy.certificate import read_certificate

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.6em 0 1.2em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}.note{color:#555;font-size:.92em}img{max-width:100%}
h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}.warn{background:#fff6e0;border:1px solid #e8c56b;padding:.6em}"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _f(x, nd: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return _e(x)
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    return f"{x:.{nd}f}" if abs(x) < 1e4 else f"{x:.3g}"


def _table(header: list[str], rows: list[list], left: int = 1) -> str:
    th = "".join(f'<th class="{"l" if i < left else ""}">{_e(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"l" if i < left else ""}">{c if isinstance(c, Markup) else _f(c)}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


class Markup(str):
    """Already-escaped HTML."""


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _plots(res: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    util = res.get("utility", {})  # unlabelled data: no classifier
    sources = [s for s in ("real", "synthetic", "dp_real", "zero_shot") if any(s in row for row in util.values())]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / max(1, len(sources))
    for j, s in enumerate(sources):
        xs = [i + j * width for i in range(len(util))]
        ax.bar(xs, [row.get(s, {}).get("accuracy", 0) for row in util.values()], width, label=res["sources"][s])
    ax.set_xticks([i + width * (len(sources) - 1) / 2 for i in range(len(util))], list(util))
    ax.set_ylabel("test accuracy"), ax.set_ylim(0, 1), ax.legend(fontsize=7, loc="lower right")
    out["utility"] = _png(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4))
    priv = res["privacy"]
    for name, rep in [*((f"generator {k}", v) for k, v in priv["generator"].items()), ("corpus nearest neighbour", priv["corpus_nearest_neighbour"])]:
        ax.plot(rep["roc"]["fpr"], rep["roc"]["tpr"], label=f"{name} (AUC {rep['auc']:.3f})")
    ax.plot([1e-3, 1], [1e-3, 1], "k:", lw=0.8)
    ax.set_xscale("log"), ax.set_yscale("log"), ax.set_xlim(1e-3, 1), ax.set_ylim(1e-3, 1)
    ax.set_xlabel("false positive rate"), ax.set_ylabel("true positive rate"), ax.legend(fontsize=7)
    out["roc"] = _png(fig)

    lengths = res["fidelity"].get("lengths", {})
    fig, ax = plt.subplots(figsize=(6, 3))
    if lengths.get("bins"):
        edges = lengths["bins"]
        mids = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
        for name, key in (("real test", "real_histogram"), ("synthetic", "synthetic_histogram")):
            h = lengths[key]
            ax.plot(mids, [x / max(1, sum(h)) for x in h], marker=".", label=name)
        if edges[-1] > 200:
            ax.set_xscale("log")
        ax.set_title(f"KS distance {lengths['ks']:.3f}", fontsize=9)
    ax.set_xlabel("words per text"), ax.set_ylabel("fraction"), ax.legend(fontsize=7)
    out["lengths"] = _png(fig)

    points = res.get("audit", {}).get("points", [])
    if points:
        xs = [p["target_epsilon"] for p in points]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
        a1.plot(xs, [p["utility"]["synthetic"]["accuracy"] for p in points], "o-", label="trained on synthetic")
        a1.plot(xs, [p["utility"]["real"]["accuracy"] for p in points], "s--", label="trained on real")
        a1.set_xlabel("target epsilon"), a1.set_ylabel("test accuracy"), a1.set_ylim(0, 1), a1.legend(fontsize=7)
        a2.plot(xs, [p["privacy"]["empirical_epsilon"]["lower_bound"] for p in points], "o-", label="empirical lower bound")
        a2.plot(xs, [min(p["certified_epsilon"], 50) for p in points], "s--", label="certified (capped at 50)")
        a2.set_xlabel("target epsilon"), a2.set_ylabel("epsilon"), a2.legend(fontsize=7)
        out["curve"] = _png(fig)
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for p in points:
            rows = p["privacy"].get("canaries", {}).get("by_count", [])
            ax.plot([r["in_train"] for r in rows], [r["exposure_extrapolated_mean"] for r in rows], "o-", label=f"eps={p['target_epsilon']}")
        ax.set_xscale("symlog"), ax.set_xlabel("canary copies in training"), ax.set_ylabel("exposure (bits)"), ax.legend(fontsize=7)
        out["exposure"] = _png(fig)
    return out


def comparison_html(comparison: dict) -> str:
    a, b = comparison["runs"]
    cls = "note" if comparison["same_budget"] else "warn"
    return ("<h2>Comparison at the same epsilon</h2>"
            f"<p class='{cls}'>{_e(comparison['budget_note'])}. Each column comes from that run's own certificate and "
            "evaluation.</p>" + _table(["", f"this run: {a['run_dir']}", f"compared: {b['run_dir']}"], table_rows(comparison)))


def render_html(res: dict, cert, run_dir: Path, comparison: dict | None = None) -> str:
    plots = _plots(res)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>dpsynth report: {_e(run_dir.name)}</title>"
             f"<style>{CSS}</style></head><body><h1>dpsynth report: {_e(run_dir)}</h1>"]
    parts.append(_table(["certificate", ""], [
        ["epsilon (certified)", f"{cert.epsilon:.4f} ({cert.accountant})"], ["delta", f"{cert.delta:.3g}"],
        ["privacy unit", unit_sentence(cert)],
        ["mechanism", method(cert)],
        ["dataset", f"{cert.dataset.name} (fingerprint {cert.dataset.fingerprint}, {cert.dataset.train_units:,} train "
                    f"{cert.dataset.unit}s)"],
        ["corpus", f"{res['corpus']}: {res['synthetic_examples']} examples"], ["real test split", res["test_examples"]],
    ], left=2))
    parts.append("<p class='warn'>The synthetic corpus is covered by the certificate. This report is not: it also reads the "
                 "private train split (real-data upper bound, DP-SGD baseline, attack members, audit runs). It is for the "
                 "data owner, not for release.</p>")
    if comparison:
        parts.append(comparison_html(comparison))

    parts.append("<h2>Utility</h2><p class='note'>Same real test split for every classifier (Kurakin et al. 2023).</p>")
    verdict = res.get("verdict")
    if verdict:
        parts.append(f"<p class='{'warn' if verdict['level'] in ('no_signal', 'below_dp_direct', 'out_of_genre') else 'note'}'><b>Verdict: "
                     f"{_e(verdict['text'])}</b></p>")
    lm = res.get("lm_utility")
    if lm:
        parts.append("<h3>Language-model utility</h3><p class='note'>A fresh LoRA on the public base, fine-tuned without "
                     f"DP for {lm['steps']} steps on each corpus, measured on {lm['test_texts']} real test texts.</p>")
        parts.append(_table(["LM", "test perplexity", "next-token accuracy"], [
            [name, lm[key]["perplexity"], lm[key]["next_token_accuracy"]]
            for name, key in (("trained on the DP synthetic corpus", "synthetic"), ("trained on the real data (ceiling)", "real"),
                              ("the base model alone (zero-shot floor)", "zero_shot"))]))
    if "synthetic" not in res:  # unlabelled data (data.attribute_columns: []): nothing to classify
        parts.append("<p class='note'>Unlabelled data: no classifier utility; see MAUVE and lengths under Fidelity.</p>")
    else:
        base = res.get("baselines", {})
        brows = [["trained on the DP synthetic corpus", res["synthetic"]["accuracy"]]]
        if "dp_real" in res["utility"].get(res["classifier"], {}):
            brows.append(["DP-SGD directly on the real data (same epsilon)", res["utility"][res["classifier"]]["dp_real"]["accuracy"]])
        if "zero_shot" in base:
            brows.append(["zero-shot floor (base model, no private data)", base["zero_shot"]["accuracy"]])
        if "majority_class" in base:
            brows.append([f"majority class (always '{base['majority_class']['label']}')", base["majority_class"]["accuracy"]])
        brows.append(["trained on the real data (ceiling)", res["real"]["accuracy"]])
        parts.append(_table([f"{res['classifier']}: test accuracy", ""], brows))
        sharp = res.get("sharpening")
        if sharp:
            parts.append(f"<p class='note'>Label sharpening (free post-processing: the adapter scores each candidate under every "
                         f"label, the clearest {sharp['kept']} of {sharp['candidates']} kept):</p>")
            parts.append(_table(["", "accuracy", "macro-F1", "label fidelity"], [
                ["without sharpening", sharp["unsharpened"]["accuracy"], sharp["unsharpened"]["macro_f1"], sharp["unsharpened"]["label_fidelity"]],
                ["with sharpening (released)", sharp["sharpened"]["accuracy"], sharp["sharpened"]["macro_f1"], sharp["sharpened"]["label_fidelity"]]]))
        util = res["utility"]
        srcs = [s for s in res["sources"] if any(s in row for row in util.values())]
        rows = []
        for name, row in util.items():
            for s in srcs:
                if s in row:
                    m = row[s]
                    dp = m.get("dp")
                    note = (f"eps={dp['epsilon']:.3f}, sigma={dp['noise_multiplier']:.3f}, q={dp['sampling_rate']:.4f}, "
                            f"{dp['steps']} steps (Opacus, Poisson)" if dp else "") + (f"; {m['features']}" if m.get("features") else "")
                    rows.append([name, res["sources"][s], m["accuracy"], m["macro_f1"], m["train_examples"], note])
        parts.append(_table(["classifier", "trained on", "accuracy", "macro-F1", "train examples", "note"], rows, left=2))
        parts.append(plots["utility"])
    attrs = {c: a for c, a in res.get("attributes", {}).items() if "synthetic" in a}
    if attrs:
        parts.append("<h3>Each attribute on its own</h3>")
        parts.append(_table(["attribute", "trained on synthetic", "trained on real", "majority class", "attribute fidelity"],
                            [[c, a["synthetic"]["accuracy"], a["real"]["accuracy"], a["majority_class"]["accuracy"],
                              a["fidelity"]] for c, a in attrs.items()], left=1))
    rec = res.get("records")
    if rec and rec.get("parse_rate") is not None:
        parts.append(f"<p class='note'>Records: {rec['parse_rate']:.1%} of {rec['drawn']} generations parsed into "
                     f"{_e(', '.join(rec['columns']))}; the rest were redrawn (free post-processing).</p>")
    tun = res.get("tuning")
    if tun:
        parts.append("<h3>Hyperparameter tuning on synthetic data</h3>")
        parts.append(_table(["", ""], [["Spearman rank correlation (real vs synthetic ranking)", tun.get("spearman_rho")],
                                       ["pick on real", json.dumps(tun.get("picked_on_real"))],
                                       ["pick on synthetic", json.dumps(tun.get("picked_on_synthetic"))],
                                       ["real test accuracy, real pick", tun.get("test_accuracy_of_real_pick")],
                                       ["real test accuracy, synthetic pick", tun.get("test_accuracy_of_synthetic_pick")]]))

    fid = res["fidelity"]
    parts.append("<h2>Fidelity</h2>")
    if "mauve" in fid:
        parts.append(_table(["MAUVE (MiniLM features)", "score", "sd over draws", "texts a side", "all texts"],
                            [[k.replace("_", " "), v.get("mauve"), v.get("sd"), v.get("texts"), v.get("all_texts", {}).get("mauve")]
                             for k, v in fid["mauve"].items() if isinstance(v, dict)]))
    genre = fid.get("out_of_genre", {})
    if genre.get("share") is not None:
        limit = res.get("evaluation_config", {}).get("out_of_genre_threshold", 0.10)
        real = f"{genre['real_share']:.1%}" if genre.get("real_share") is not None else "-"
        parts.append(f"<p class='{'warn' if genre['share'] > limit else 'note'}'>Out of genre: a text is flagged when its "
                     f"code/markup score ({_e(genre['score'])}) is above the 99th percentile of the real test texts' "
                     f"scores, at least 1.5 (here {genre['threshold']:.2f}); real texts held out from that reference ({_e(genre['held_out'])}) "
                     "show the floor.</p>")
        parts.append(_table(["out of genre", ""], [
            ["synthetic texts flagged", f"{genre['share']:.1%} ({genre['flagged']} of {genre['synthetic_texts']})"],
            ["real texts held out, flagged (the floor)", real],
            *[[f"  example {i + 1}", ex] for i, ex in enumerate(genre.get("examples", []))]]))
    keys = ["texts", "words_mean", "words_median", "chars_mean", "vocabulary", "distinct_1", "distinct_2"]
    parts.append(_table(["corpus", *keys], [[name, *[st[k] for k in keys]] for name, st in fid["text_stats"].items()]))
    lengths = fid.get("lengths", {})
    if lengths.get("ks") is not None:
        parts.append(_table(["length (words)", "synthetic", "real test"], [
            ["mean", lengths["synthetic_words_mean"], lengths["real_words_mean"]],
            ["95th percentile", lengths["synthetic_words_p95"], lengths["real_words_p95"]],
            ["Kolmogorov-Smirnov distance (p-value)", Markup(f"{lengths['ks']:.3f} ({lengths['ks_p_value']:.2g})"), ""]]))
    parts.append(plots["lengths"])
    lf, vo, du = fid.get("label_fidelity"), fid["vocabulary_overlap"], fid["duplicates"]
    label_rows = [] if lf is None else [  # none for unlabelled data
        ["label fidelity: real-trained classifier agrees with synthetic label", lf["agreement"]],
        ["  (that classifier's accuracy on real test)", lf["classifier_real_test_accuracy"]],
        *[[f"  agreement on label {k}", v] for k, v in lf["per_label"].items()]]
    parts.append(_table(["", ""], [
        *label_rows,
        ["synthetic vocabulary seen in real train (types / tokens)", f"{vo['type_overlap']:.3f} / {vo['token_overlap']:.3f}"],
        ["synthetic duplicate rate", du["duplicate_rate"]]]))

    priv = res["privacy"]
    parts.append("<h2>Privacy audit of this run</h2>")
    parts.append(f"<p class='note'>{priv['members']} members (train split) vs {priv['nonmembers']} non-members (held-out splits). "
                 "Epsilon lower bound: Clopper-Pearson 95 %, threshold picked on one half, evaluated on the other.</p>")
    arows = [[f"generator: {k.replace('_', ' ')}", v["auc"], v["tpr_at_0.01_fpr"], v["epsilon_lower_bound"]] for k, v in priv["generator"].items()]
    nn = priv["corpus_nearest_neighbour"]
    arows.append(["released corpus only: nearest synthetic neighbour", nn["auc"], nn["tpr_at_0.01_fpr"], nn["epsilon_lower_bound"]])
    parts.append(_table(["attack", "AUC", "TPR @ 1% FPR", "empirical eps lower bound"], arows))
    emp = priv["empirical_epsilon"]
    parts.append(f"<p><b>Empirical epsilon lower bound {emp['lower_bound']:.3f}</b> ({_e(emp['attack'])}) vs <b>certified epsilon "
                 f"{emp['certified']:.3f}</b>.</p>")
    parts.append(plots["roc"])
    mem = priv["memorisation"]
    mkeys = ["texts", "exact_copies", "shared_8gram_rate", "lcs_words_mean", "lcs_words_p95", "lcs_words_max"]
    parts.append(_table(["verbatim overlap with train", *mkeys], [[k.replace("_", " "), *[v[m] for m in mkeys]] for k, v in mem.items()]))

    audit = res.get("audit")
    parts.append("<h2>Privacy-utility curve and DP vs non-DP audit (canary runs)</h2>")
    if audit and audit["points"]:
        parts.append(f"<p class='note'>{_e(audit['note'])} {audit['canaries']} canaries ({audit['canary_records']} records).</p>")
        prow = []
        for p in audit["points"]:
            pr = p["privacy"]
            top = max(pr.get("canaries", {}).get("by_count", [{"exposure_extrapolated_mean": None}]), key=lambda r: r.get("in_train", 0))
            prow.append([p["target_epsilon"], p["certified_epsilon"], p["utility"]["synthetic"]["accuracy"], p["utility"]["real"]["accuracy"],
                         p["utility"].get("mauve"), pr["generator"]["loss"]["auc"], pr["generator"].get("reference_calibrated", {}).get("auc"),
                         pr["corpus_nearest_neighbour"]["auc"], top.get("exposure_extrapolated_mean"),
                         pr.get("canaries", {}).get("secrets_in_corpus"), pr["empirical_epsilon"]["lower_bound"]])
        parts.append(_table(["target eps", "certified eps", "acc. synthetic", "acc. real", "MAUVE", "MIA AUC (loss)", "MIA AUC (calibrated)",
                             "NN AUC (corpus)", "exposure, most-repeated canaries (bits)", "secrets in corpus", "empirical eps lower bound"], prow))
        parts.append(plots["curve"] + plots["exposure"])
        for p in audit["points"]:
            rows = p["privacy"].get("canaries", {}).get("by_count", [])
            parts.append(f"<h3>eps={_e(p['target_epsilon'])}: canary exposure by copies in training</h3>")
            parts.append(_table(["copies in train", "canaries", "exposure (sampled, mean)", "exposure (extrapolated, mean)", "max"],
                                [[r["in_train"], r["canaries"], r["exposure_sampled_mean"], r["exposure_extrapolated_mean"],
                                  r["exposure_extrapolated_max"]] for r in rows]))
    else:
        parts.append("<p class='note'>Not run (evaluation.audit_epsilons is empty; `dpsynth report --full` runs epsilon in "
                     "{1, 3, 8, inf}).</p>")

    parts.append("<h2>Synthetic samples per label</h2>")
    for label, texts in res.get("samples", {}).items():
        parts.append(f"<h3>{_e(label)}</h3><ul>" + "".join(f"<li>{_e(t)}</li>" for t in texts) + "</ul>")
    parts.append("<h2>Methods</h2><ul class='note'>"
                 "<li>Utility comparisons and tuning on synthetic data: Kurakin et al. 2023, arXiv 2306.01684.</li>"
                 "<li>MAUVE: Pillutla et al. 2021 (mauve-text, all-MiniLM-L6-v2 features).</li>"
                 "<li>Loss-threshold MIA: Yeom et al. 2018; reference-calibrated: Carlini et al. 2021; TPR at low FPR: Carlini et al. 2022.</li>"
                 "<li>Canary exposure: Carlini et al. 2019, \"The Secret Sharer\" (sampled and skew-normal extrapolated).</li>"
                 "<li>Empirical epsilon: Kairouz et al. 2015 hypothesis-testing bound with Clopper-Pearson intervals, Jagielski et al. 2020; one-run setting, Steinke et al. 2023.</li>"
                 "</ul>")
    parts.append(f"<p class='note'>timings (s): {_e(json.dumps(res.get('timings_s', {})))}</p></body></html>")
    return "\n".join(parts)


def report(run_dir: Path, ev: EvaluationConfig | None = None, *, compare_with: Path | None = None,
           show_progress: bool = False, audit: dict | None = None) -> tuple[Path, Path]:
    """Evaluate the run (config `evaluation`) and write report.json + report.html into it, atomically.
    `compare_with`: a second run on the same dataset, shown side by side (its saved evaluation when current)."""
    from dpsynth.evaluate.pipeline import evaluate

    run_dir = Path(run_dir)
    if compare_with is not None:
        certificates(run_dir, compare_with)  # refuse an incomparable pair before evaluating anything
    res = evaluate(run_dir, ev, show_progress=show_progress, audit=audit)
    cert = read_certificate(run_dir / "certificate.json")
    comparison = compare(run_dir, compare_with, evaluation_a=res, show_progress=show_progress) if compare_with else None
    doc = {"run_dir": str(run_dir), "certificate": cert.to_json(), **res, **({"comparison": comparison} if comparison else {})}
    # The report is the evaluation's: measured on the owner's test data, so it stays in the owner-only part.
    atomic_write_json(owner_path(run_dir, "report.json"), doc)
    atomic_write_text(owner_path(run_dir, "report.html"), render_html(res, cert, run_dir, comparison))
    return owner_path(run_dir, "report.html"), owner_path(run_dir, "report.json")
