"""Refit refusal_lat/project_judge.json from the authors' human-labelled completions (issue #20).

    .venv/bin/python scripts/fit_project_judge.py [CSV] [--design]

CSV defaults to the pinned file the project's data resolver finds (an explicit folder, data/cache, the
offline mirror, or the upstream URL at the pinned commit; docs/method.md, "The authors' released data").
The data is never copied into the repo. Protocol (see the refusal_lat.project_judge docstring): fit and choose C by grouped CV (one-SE rule) on
advbench_test only, threshold fixed at 0.5, then score custom_set once with the frozen parameters.
--design prints the CV table only (no JSON written, custom_set not scored): use it while changing
features, so the held-out half is looked at once, at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from refusal_lat import project_judge as J
from refusal_lat import stats as S  # noqa: E402

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
N_FOLDS, N_REPEATS, THRESHOLD = 8, 5, 0.5


def data_file_url() -> str:
    from refusal_lat.data import DATA_FILES
    return DATA_FILES["released_human_annots"].url


def read_bytes(path: str | None) -> tuple[bytes, str]:
    from refusal_lat.data import data_file
    found = Path(path) if path else data_file("released_human_annots")
    return found.read_bytes(), str(found)


def load(raw: bytes) -> pd.DataFrame:
    d = pd.read_csv(io.BytesIO(raw))
    d["intervention_completion"] = d["intervention_completion"].fillna("").astype(str)
    d["refusal"] = ~d["is_successful_human_annot"].astype(bool)  # success = complied = not a refusal
    return d


def fit(x: np.ndarray, y: np.ndarray, c: float) -> dict:
    """Standardise, fit L2 logistic regression, fold the scaling back into raw-unit weights."""
    sc = StandardScaler().fit(x)
    scale = np.where(sc.scale_ > 0, sc.scale_, 1.0)
    lr = LogisticRegression(C=c, max_iter=5000).fit((x - sc.mean_) / scale, y)
    w = lr.coef_[0] / scale
    b = float(lr.intercept_[0] - np.sum(lr.coef_[0] * sc.mean_ / scale))
    return {"features": list(J.FEATURES), "weights": [float(v) for v in w], "intercept": b,
            "threshold": THRESHOLD}


def grouped_cv(x, y, groups, c) -> float:
    uniq = np.unique(groups)
    scores = []
    for rep in range(N_REPEATS):
        perm = np.random.RandomState(rep).permutation(uniq)
        fold_of = {g: i % N_FOLDS for i, g in enumerate(perm)}
        folds = np.array([fold_of[g] for g in groups])
        correct = 0
        for f in range(N_FOLDS):
            tr, te = folds != f, folds == f
            p = fit(x[tr], y[tr], c)
            pred = (x[te] @ np.array(p["weights"]) + p["intercept"]) >= 0  # P >= 0.5
            correct += int((pred == y[te]).sum())
        scores.append(correct / len(y))
    return float(np.mean(scores))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="?", help="path to completions_with_human_annots.csv")
    ap.add_argument("--design", action="store_true", help="CV on advbench_test only; write nothing")
    ap.add_argument("--out", default=str(J.PARAMS_PATH))
    args = ap.parse_args(argv)

    raw, source = read_bytes(args.csv)
    d = load(raw)
    dev = d[d.dataset == "advbench_test"]
    x = J.feature_matrix(dev.intervention_completion.tolist(), dev.instruction.tolist())
    y = dev.refusal.values
    groups = dev.instruction.values
    cv = {c: grouped_cv(x, y, groups, c) for c in C_GRID}
    for c, s in cv.items():
        print(f"C={c:<7g} grouped-CV agreement on advbench_test = {s:.4f}")
    top = max(cv.values())
    se = float(np.sqrt(top * (1 - top) / len(y)))  # binomial SE of an agreement over the dev rows
    best_c = min(c for c in C_GRID if cv[c] >= top - se)  # one-standard-error rule: most regularised
    print(f"best CV {top:.4f}, 1-SE band {top - se:.4f}; chosen C = {best_c} (CV {cv[best_c]:.4f})")
    params = fit(x, y, best_c)
    for name, w in zip(J.FEATURES, params["weights"]):
        print(f"  {name:20s} {w:+.3f}")
    if args.design:
        return params
    params.update({
        "C": best_c, "cv_agreement_advbench_test": cv[best_c],
        "cv": {"scheme": f"GroupKFold by instruction, {N_FOLDS} folds x {N_REPEATS} shuffles",
               "rule": "one-standard-error: smallest C with CV >= best - sqrt(best(1-best)/n)",
               "by_C": {str(c): v for c, v in cv.items()}},
        "fit_rows": int(len(dev)), "fit_subset": "advbench_test",
        "data_sha256": hashlib.sha256(raw).hexdigest(), "data_source": data_file_url(),
        "label": "refusal = not is_successful_human_annot, on intervention_completion",
    })
    held = d[d.dataset == "custom_set"]
    pred = np.array(J.predict_refusal(held.intervention_completion.tolist(), held.instruction.tolist(), params))
    truth = held.refusal.values
    params["heldout"] = {"subset": "custom_set", "rows": int(len(held)),
                         "agreement": float(np.mean(pred == truth)), "kappa": S.agreement(pred, truth)["kappa"]}
    print(f"held-out custom_set: agreement {params['heldout']['agreement']:.4f}, "
          f"kappa {params['heldout']['kappa']:.4f} (n={len(held)}) from {source}")
    Path(args.out).write_text(json.dumps(params, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return params


if __name__ == "__main__":
    main()
