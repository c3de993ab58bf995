"""CPU recipes for the demo's label signal (issue 12's stretch goal): one DP (or non-DP, or zero-shot) training run
through the production step, encoding and Poisson sampler (no Ray, no ledger: an experiment, not a release), then
n texts per label sampled plain and n kept of n x over with label sharpening, scored by TF-IDF + LR on the real
test split, with the majority-class rate beside it, and the adapter itself as a classifier.

    python bench/cpu_recipes.py --n 400 --calibrate --tag b64s150 --json bench/results/cpu_recipes-b64s150.json
    python bench/cpu_recipes.py --n 400 --calibrate --nodp --tag nodp --json bench/results/cpu_recipes-nodp.json
    python bench/cpu_recipes.py --n 400 --calibrate --zeroshot --tag zs --json bench/results/cpu_recipes-zs.json
"""
import argparse, json, math, time
import numpy as np, torch
from collections import Counter
ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=64); ap.add_argument("--steps", type=int, default=150)
ap.add_argument("--lr", type=float, default=5e-3); ap.add_argument("--layers", type=int, default=8)
ap.add_argument("--modules", default="q_proj,v_proj"); ap.add_argument("--r", type=int, default=8)
ap.add_argument("--eps", type=float, default=8.0); ap.add_argument("--clip", type=float, default=1.0)
ap.add_argument("--maxlen", type=int, default=64); ap.add_argument("--n", type=int, default=500, help="per label kept")
ap.add_argument("--over", type=float, default=2.0); ap.add_argument("--temp", type=float, default=1.0)
ap.add_argument("--template", default="{dataset} text, label {label}: "); ap.add_argument("--tag", default="x")
ap.add_argument("--json", default=None)
ap.add_argument("--nodp", action="store_true"); ap.add_argument("--calibrate", action="store_true"); ap.add_argument("--zeroshot", action="store_true")
a = ap.parse_args()
torch.set_num_threads(2)
from dpsynth.config import load_config
from dpsynth.data import prepare, format_prefix
from dpsynth.privacy.secret import ledger_secret
from dpsynth.models import load_base, wrap_lora
from dpsynth.prefixlm import encode, collate, score_texts
from dpsynth.train.step import DPLoRAStep, PlainLoRAStep
from dpsynth.train.plan import plan_training
from dpsynth.privacy.sampling import poisson_batches
from dpsynth.sample.engines import TransformersEngine, sample_texts
from dpsynth.evaluate.classifiers import tfidf_logreg
t_all = time.time()
cfg = load_config(None, ["model.max_length=64", "sampling.max_new_tokens=40", f"model.prefix_template={a.template!r}", f"training.batch_size={a.batch}", f"training.steps={a.steps}", f"privacy.epsilon={a.eps}",
                         f"lora.last_layers={a.layers}", f"lora.r={a.r}", f"lora.target_modules=[{a.modules}]"])
splits = prepare(cfg.data, ledger_secret(cfg.privacy.ledger))
n = len(splits.train_units())  # the population plan_training takes: units
delta = 1 / splits.dataset_size ** 1.1
tp = plan_training(cfg, n, delta); sigma, q, steps = tp.sigma, tp.schedule.q, tp.schedule.steps
res = {"args": vars(a), "sigma": sigma, "q": q, "steps": steps}
print("sigma", sigma, "q", q, flush=True)
torch.manual_seed(0)
model, tok, _ = load_base(cfg.model)
model = wrap_lora(model, cfg.lora)
pref = lambda lab: format_prefix(a.template, splits.name, lab)
enc = [encode(tok, pref(ex.label), ex.text, a.maxlen) for ex in splits.train]
if not a.zeroshot:
    if a.nodp:
        step = PlainLoRAStep(model, expected_batch_size=a.batch, learning_rate=a.lr, micro_batch_size=32)
    else:
        step = DPLoRAStep(model, noise_multiplier=sigma, max_grad_norm=a.clip, expected_batch_size=a.batch, learning_rate=a.lr, micro_batch_size=32)
    t0 = time.time(); losses = []
    for i, idx in enumerate(poisson_batches(n, q, steps)):
        losses.append(step(collate([enc[j] for j in idx], tok.pad_token_id)))
        if (i + 1) % 10 == 0:
            print(f"step {i+1} loss {np.nanmean(losses[-10:]):.3f} {time.time()-t0:.0f}s", flush=True)
    res["train_s"] = time.time() - t0; res["loss_first10"] = float(np.nanmean(losses[:10])); res["loss_last10"] = float(np.nanmean(losses[-10:]))
model.eval()
if hasattr(model, "_module"): pass
eng = TransformersEngine(model, tok)
sp = load_config(None, [f"sampling.temperature={a.temp}", "sampling.max_new_tokens=40"]).sampling
torch.manual_seed(0)
t0 = time.time(); gen = {}
want = math.ceil(a.n * a.over)
for lab in splits.labels:
    texts = []
    while len(texts) < want:
        texts += [t for t in sample_texts(eng, pref(lab), 128, sp) if t]
    gen[lab] = texts[:want]
res["sample_s"] = time.time() - t0
t0 = time.time()
items = [(t, lab) for lab in splits.labels for t in gen[lab]]
scores = np.array([[x.sum() for x in score_texts(model, tok, [(pref(l2), t) for t, _ in items], a.maxlen)] for l2 in splits.labels]).T  # NLL (n, L)
res["score_s"] = time.time() - t0
own = np.array([splits.labels.index(l) for _, l in items])
if a.calibrate:
    scores = scores - scores.mean(0, keepdims=True)  # contextual calibration over the candidates
margin = np.array([min(scores[i, j] for j in range(len(splits.labels)) if j != own[i]) - scores[i, own[i]] for i in range(len(items))])
test_x = [e.text for e in splits.test]; test_y = np.array([e.label for e in splits.test])
real = tfidf_logreg(0).fit([e.text for e in splits.train], [e.label for e in splits.train])
maj = Counter(test_y).most_common(1)[0][1] / len(test_y)
def evaluate(sel, name):
    x = [items[i][0] for i in sel]; y = [items[i][1] for i in sel]
    clf = tfidf_logreg(0).fit(x, y)
    acc = float((clf.predict(test_x) == test_y).mean())
    fid = float((real.predict(x) == np.array(y)).mean())
    res[name] = {"acc": acc, "fidelity": fid, "n": len(sel)}
    print(name, res[name], flush=True)
first = [i for lab in splits.labels for i in [k for k in range(len(items)) if items[k][1] == lab][: a.n]]
evaluate(first, "plain")
for keep in (0.5,):
    sel = []
    for j, lab in enumerate(splits.labels):
        idx = [k for k in range(len(items)) if own[k] == j]
        idx.sort(key=lambda k: -margin[k])
        sel += idx[: a.n]
    evaluate(sel, "sharpened")
res["self_classifier_acc_on_generated_vs_real_clf"] = float(((margin > 0) == (real.predict([t for t, _ in items]) == np.array([l for _, l in items]))).mean())
# the adapter as a classifier on the real test split
ts = np.array([[x.sum() for x in score_texts(model, tok, [(pref(l2), e.text) for e in splits.test[:400]], a.maxlen)] for l2 in splits.labels]).T
res["adapter_as_classifier_test_acc"] = float((np.array(splits.labels)[ts.argmin(1)] == test_y[:400]).mean())
res["adapter_as_classifier_test_acc_calibrated"] = float((np.array(splits.labels)[(ts - ts.mean(0, keepdims=True)).argmin(1)] == test_y[:400]).mean())
res["majority"] = maj; res["total_s"] = time.time() - t_all
print(json.dumps(res), flush=True)
if a.json:
    json.dump(res, open(a.json, "w"), indent=1)
