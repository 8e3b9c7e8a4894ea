"""Compare refusal judges with the human labels (issue #20): prints the tables in notes/issue20.md.

    .venv/bin/python scripts/compare_judges.py [CSV] [--write]

--write records every classify method's confusion counts on the held-out custom_set half in
refusal_lat/judge_errors.json, which stats.score_units reads to carry each judge's measured error
("project" is the recommended judge, version 2, since issue 29; the validation of every judge on both
labelled domains is scripts/label_set.py validate --publish -> data/labels/validation/).

"refusal" = not is_successful_human_annot, judged on intervention_completion. Judges: the frozen
project judges (version 2 project_judge.json and version 1 project_judge_v1.json, both read the requests),
helpers.classify 'paper' / 'substring' / 'project_rules' (label 1 = refusal; invalid
-1 and acceptance 0 both count as not-refusal), and the CSV's regex and LlamaGuard-2 columns
(success -> not refusal). Completions are printed only as their first 8 words.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
import fit_project_judge as F  # noqa: E402
import helpers as H  # noqa: E402
from refusal_lat import project_judge as J  # noqa: E402
from refusal_lat import stats as S  # noqa: E402


def judges(d) -> dict:
    texts = d.intervention_completion.tolist()
    out = {"project (v2, recommended)": np.array(J.predict_refusal(texts, d.instruction.tolist())),
           "project_v1": np.array(J.predict_refusal(texts, d.instruction.tolist(), J.load_params(J.PARAMS_V1_PATH)))}
    for m in ("paper", "substring", "project_rules"):
        out[f"helpers.classify {m}"] = np.array(H.classify(texts, m)) == 1
    out["regex column"] = ~d.is_success_regex.astype(bool).values
    out["LlamaGuard-2 column"] = ~d.is_success_llamaguard2.astype(bool).values
    return out


def table(d, title):
    truth = d.refusal.values
    print(f"\n### {title} (n = {len(d)}, human refusal rate {truth.mean():.3f})\n")
    print("| judge | agreement | Cohen's kappa | sensitivity | specificity | TP | FN | FP | TN |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, pred in judges(d).items():
        a = S.agreement(pred, truth)
        print(f"| {name} | {a['agreement']:.4f} | {a['kappa']:.3f} | {a['sensitivity']:.3f} | {a['specificity']:.3f} | "
              f"{a['tp']} | {a['fn']} | {a['fp']} | {a['tn']} |")


def out_of_fold(dev, c):
    x = J.feature_matrix(dev.intervention_completion.tolist(), dev.instruction.tolist())
    y = dev.refusal.values
    groups = dev.instruction.values
    perm = np.random.RandomState(0).permutation(np.unique(groups))
    fold_of = {g: i % F.N_FOLDS for i, g in enumerate(perm)}
    folds = np.array([fold_of[g] for g in groups])
    pred = np.zeros(len(y), dtype=bool)
    for f in range(F.N_FOLDS):
        p = F.fit(x[folds != f], y[folds != f], c)
        pred[folds == f] = x[folds == f] @ np.array(p["weights"]) + p["intercept"] >= 0
    return pred, y


def write_errors(d, sha256: str):
    """{method: {tp, pos, tn, neg}} on custom_set, refusal = positive, for stats.score_units."""
    held = d[d.dataset == "custom_set"]
    truth = held.refusal.values
    record = {"subset": "custom_set", "rows": len(held), "data_sha256": sha256,
              "labelled": "Llama-2-7b-chat (base, AT, LAT; with and without direction ablation) 64-token "
                          "greedy completions of the authors' custom_set harmful prompts, labelled on all 64 tokens",
              "methods": {}}
    for m in H.METHODS:
        pred = np.array(H.classify(held.intervention_completion.tolist(), m, held.instruction.tolist())) == 1
        record["methods"][m] = {"tp": int((pred & truth).sum()), "pos": int(truth.sum()),
                                "tn": int((~pred & ~truth).sum()), "neg": int((~truth).sum())}
    S.JUDGE_ERRORS_PATH.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {S.JUDGE_ERRORS_PATH.relative_to(REPO)}: {record['methods']}")


def main(argv=None):
    argv = list(argv or [])
    write = "--write" in argv
    argv = [a for a in argv if a != "--write"]
    raw, source = F.read_bytes(argv[0] if argv else None)
    d = F.load(raw)
    if write:
        write_errors(d, hashlib.sha256(raw).hexdigest())
    params = J.load_params(J.PARAMS_V1_PATH)  # the out-of-fold correction below is version 1's (advbench_test only)
    print(f"data: {source}; version 2 C={J.load_params()['C']}; version 1 C={params['C']}, "
          f"CV {params['cv_agreement_advbench_test']:.4f}")
    table(d[d.dataset == "custom_set"], "Held-out: custom_set")
    table(d[d.dataset == "advbench_test"], "Fit half: advbench_test (both project judges in-sample)")

    held = d[d.dataset == "custom_set"].reset_index(drop=True)
    pred = np.array(J.predict_refusal(held.intervention_completion.tolist(), held.instruction.tolist(), params))
    prob = J.refusal_probability(held.intervention_completion.tolist(), held.instruction.tolist(), params)
    wrong = np.where(pred != held.refusal.values)[0]
    print(f"\n### custom_set disagreements of version 1: {len(wrong)} (first 10 by row order)\n")
    print("| variant | human | judge P(refusal) | first 8 words |")
    print("|---|---|---|---|")
    for i in wrong[:10]:
        words = " ".join(held.intervention_completion[i].split()[:8]).replace("|", "/")
        human = "refusal" if held.refusal[i] else "complied"
        print(f"| {held.variant[i]} | {human} | {prob[i]:.2f} | {words} ... |")

    # Rogan-Gladen with sensitivity/specificity from out-of-fold advbench_test predictions.
    oof, y = out_of_fold(d[d.dataset == "advbench_test"], params["C"])
    sens_c = (int((oof & y).sum()), int(y.sum()))
    spec_c = (int((~oof & ~y).sum()), int((~y).sum()))
    print(f"\n### Version 1's error-corrected refusal rates on custom_set (sens {sens_c[0]}/{sens_c[1]}, "
          f"spec {spec_c[0]}/{spec_c[1]} from out-of-fold advbench_test predictions)\n")
    print("| variant | human rate | judge raw rate [Wilson] | Rogan-Gladen [propagated Wilson] |")
    print("|---|---|---|---|")
    for v in ("no_ablation", "baseline", "at", "lat"):
        m = (held.variant == v).values
        r = S.corrected_rate_interval(int(pred[m].sum()), int(m.sum()), sens_c, spec_c)
        print(f"| {v} | {held.refusal.values[m].mean():.3f} | {r['raw_rate']:.3f} [{r['raw_low']:.3f}, "
              f"{r['raw_high']:.3f}] | {r['rate']:.3f} [{r['low']:.3f}, {r['high']:.3f}] |")


if __name__ == "__main__":
    main(sys.argv[1:])
