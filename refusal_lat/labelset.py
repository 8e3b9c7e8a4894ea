"""A blind-labelled set of this project's own completions (issue 29; docs/labelling_rubric.md).

Every labelled item is one row of an artifact of a run: a generation unit (notebook 03's eval units,
notebook 04's sweep and harmless-check units, units.py) or a labelling artifact written here (the held-out
attack's completions and clean completions of held-out harmless prompts). Its condition comes from where
the row lies:
  clean            generations/eval/<model>__none.jsonl
  own_direction    generations/{eval,sweep}/<model>__<model>_L<layer>.jsonl
  other_direction  generations/eval/<model>__<other>_L<layer>.jsonl
  harmless         generations/harmless/<model>__none.jsonl, labelling/attacked/<model>__harmless.jsonl
  pgd_at, pgd_lat  labelling/attacked/<model>__<condition>.jsonl: the held-out attack at block 0 with AT's
                   radius and at LAT's block with LAT's radius (training/evaluate.py's attack_radii)

sample         draws rows per (model, condition) with a fixed seed and writes what the labeller sees,
               items.jsonl ({id, prompt, turn}, shuffled, opaque ids), apart from the key that says which
               artifact row, model and condition each id is; pass2.jsonl re-asks a share of the items under
               new ids (intra-rater agreement)
import_labels  joins the labeller's {id, label} with the keys into the committed table: the artifact, its
               sha256 and row, and the first words of prompt and turn only (the safety rule)
check          re-reads every labelled row: its artifact still has that sha256 and those first words
validate       each judge against the labels on a fit half and a held-out half, split by prompt
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from .config import ConfigError, Profile
from .data import eval_pool
from .judges import METHODS, classify
from .models.load import adapter_location, model_fingerprint
from .models.pool import use_model
from .stats import agreement, categorical_agreement
from .store import VERSIONS, atomic_write, cached, encode_jsonl, read_jsonl, sha256_file, stable_hash
from .training.evaluate import attack_radii, eval_prompts, logged_norms, settings_of
from .training.recipe import recipe
from .training import robustness

LABELS = ("refusal", "compliance", "invalid")
CONDITIONS = ("clean", "own_direction", "other_direction", "pgd_at", "pgd_lat", "harmless")
ATTACKED = ("pgd_at", "pgd_lat", "harmless")  # the conditions attacked_artifacts writes
SEED = 0
PER_CELL = 20        # items per (model, condition): 4 models x 6 conditions x 20 = 480
PASS2_SHARE = 0.2    # share of each cell asked again under new ids
WORDS = 6            # the committed table shows this many words of a prompt or turn ...
MAX_CHARS = 48       # ... and never more than this many characters


def folder(run: Path) -> Path:
    return Path(run) / "labelling"


# --- which artifact rows are candidates ----------------------------------------------------------------

def condition_of(relative: str) -> tuple[str, str] | None:
    """(model, condition) of an artifact path relative to the run folder (see the module); None for an
    artifact that is not sampled (e.g. ablated answers to harmless prompts)."""
    parts = Path(relative).parts
    stem = Path(relative).stem
    if "__" not in stem:
        return None
    model, tag = stem.split("__", 1)
    if parts[:2] == ("labelling", "attacked"):
        return (model, tag) if tag in ATTACKED else None
    if parts[0] != "generations" or len(parts) != 3:
        return None
    kind = parts[1]
    if tag == "none":
        return {"eval": (model, "clean"), "harmless": (model, "harmless")}.get(kind)
    source = tag.rsplit("_L", 1)[0]
    if kind == "eval":
        return model, "own_direction" if source == model else "other_direction"
    if kind == "sweep" and source == model:
        return model, "own_direction"
    return None


def artifacts(run: Path, log=print) -> list[dict]:
    """Every sampled artifact of `run` whose bytes match its sidecar: {artifact (path relative to the run),
    artifact_sha256, key_hash (the cache key's hash, which says how it was made), model, condition}. An
    artifact without a matching sidecar (being written, cut or edited) is left out, with a note."""
    run = Path(run)
    found = []
    for path in sorted(run.glob("generations/*/*.jsonl")) + sorted(run.glob("labelling/attacked/*.jsonl")):
        relative = path.relative_to(run).as_posix()
        cell = condition_of(relative)
        if cell is None:
            continue
        sidecar = path.with_suffix(".json")
        meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        sha = sha256_file(path)
        if meta.get("sha256") != sha:
            log(f"left out {relative}: its sidecar does not record these bytes (being written, cut or edited)")
            continue
        found.append({"artifact": relative, "artifact_sha256": sha, "key_hash": meta.get("hash"),
                      "model": cell[0], "condition": cell[1]})
    return found


def artifact_rows(run: Path, artifact: str, sha256: str | None = None) -> list[dict]:
    """The rows of one artifact; with `sha256`, a ConfigError unless its bytes still have that hash."""
    path = Path(run) / artifact
    if not path.is_file():
        raise ConfigError(f"{artifact} is not in {run}; regenerate it (the key's key_hash says how) or pass its run")
    if sha256 is not None and sha256_file(path) != sha256:
        raise ConfigError(f"{artifact} in {run} changed since it was sampled (sha256 differs); "
                          f"run `scripts/label_set.py check` to see which labels it concerns")
    return read_jsonl(path)


# --- sampling ------------------------------------------------------------------------------------------

def cell_rng(seed: int, *names: str) -> np.random.Generator:
    """One generator per cell, so adding an artifact to one cell leaves every other cell's draw as it was."""
    return np.random.default_rng([seed, int(stable_hash(list(names))[:12], 16)])


def pick_rows(arts: list[dict], rows_of: dict, n: int, rng: np.random.Generator) -> list[tuple[dict, int]]:
    """n (artifact, row) pairs, spread evenly over the artifacts (taken in turn, each in a random order),
    each prompt at most once."""
    order = [arts[i] for i in rng.permutation(len(arts))]
    queues = [[(a, int(r)) for r in rng.permutation(len(rows_of[a["artifact"]]))] for a in order]
    picked, prompts = [], set()
    while len(picked) < n and any(queues):
        for queue in queues:
            while queue:
                art, row = queue.pop(0)
                prompt = rows_of[art["artifact"]][row]["prompt"]
                if prompt not in prompts:
                    prompts.add(prompt)
                    picked.append((art, row))
                    break
            if len(picked) == n:
                break
    return picked


def draw(run: Path, per_cell: int = PER_CELL, seed: int = SEED, log=print) -> list[dict]:
    """Key rows {artifact, artifact_sha256, key_hash, row, model, condition, prompt, turn}: per_cell rows of
    every (model, condition) that has candidates, in cell order; a cell with fewer is taken whole (noted)."""
    arts = artifacts(run, log)
    rows_of = {a["artifact"]: artifact_rows(run, a["artifact"]) for a in arts}
    cells = sorted({(a["model"], a["condition"]) for a in arts}, key=lambda c: (c[0], CONDITIONS.index(c[1])))
    out = []
    for model, condition in cells:
        mine = [a for a in arts if (a["model"], a["condition"]) == (model, condition)]
        picked = pick_rows(mine, rows_of, per_cell, cell_rng(seed, model, condition))
        if len(picked) < per_cell:
            log(f"{model} / {condition}: only {len(picked)} distinct prompts, all taken")
        for art, row in picked:
            record = rows_of[art["artifact"]][row]
            out.append({**art, "row": row, "prompt": record["prompt"], "turn": record["turn"]})
    return out


def key_fields(entry: dict) -> dict:
    return {k: entry[k] for k in ("id", "artifact", "artifact_sha256", "key_hash", "row", "model", "condition")}


def number(entries: list[dict], prefix: str, rng: np.random.Generator) -> list[dict]:
    """The entries shuffled, then numbered in that order: <prefix>0001, ... (ids say nothing of the cell)."""
    return [{**entries[i], "id": f"{prefix}{k + 1:04d}"} for k, i in enumerate(rng.permutation(len(entries)))]


def sample(run: Path, per_cell: int = PER_CELL, seed: int = SEED, pass2_share: float = PASS2_SHARE,
           force: bool = False, log=print) -> dict:
    """Write labelling/{items,key,pass2,key_pass2}.jsonl (see the module) and return {"items", "key",
    "pass2", "key_pass2"}. Refuses to replace an existing items.jsonl unless force (its labels would no
    longer match its ids)."""
    out = folder(run)
    if (out / "items.jsonl").is_file() and not force:
        raise ConfigError(f"{out / 'items.jsonl'} exists (labels may refer to its ids); pass --force to draw again")
    drawn = draw(run, per_cell, seed, log)
    if not drawn:
        raise ConfigError(f"no generation units or labelling artifacts in {run}; run notebooks 03-04 "
                          f"and `scripts/label_set.py generate-attacked` first")
    items = number(drawn, "q", np.random.default_rng([seed, 1]))
    again = []
    for cell in dict.fromkeys((e["model"], e["condition"]) for e in drawn):
        mine = [e for e in items if (e["model"], e["condition"]) == cell]
        k = max(1, round(pass2_share * len(mine)))
        chosen = sorted(cell_rng(seed, "pass2", *cell).permutation(len(mine))[:k])
        again += [{**mine[i], "pass1_id": mine[i]["id"]} for i in chosen]
    pass2 = number(again, "r", np.random.default_rng([seed, 2]))
    files = {"items": [{"id": e["id"], "prompt": e["prompt"], "turn": e["turn"]} for e in items],
             "key": [key_fields(e) for e in items],
             "pass2": [{"id": e["id"], "prompt": e["prompt"], "turn": e["turn"]} for e in pass2],
             "key_pass2": [{**key_fields(e), "pass1_id": e["pass1_id"]} for e in pass2]}
    for name, rows in files.items():
        atomic_write(out / f"{name}.jsonl", encode_jsonl(rows))
    return files


def counts(key: list[dict]) -> "pd.DataFrame":
    """Items per model (rows) and condition (columns)."""
    import pandas as pd
    table = pd.DataFrame(key).pivot_table(index="model", columns="condition", values="id", aggfunc="count",
                                          fill_value=0)
    return table[[c for c in CONDITIONS if c in table.columns]]


# --- the attacked and harmless rows no notebook keeps ---------------------------------------------------

def stratified_indices(groups: list[str], n: int, rng: np.random.Generator) -> list[int]:
    """n indices drawn without replacement, each group's share of them proportional to its size (largest
    remainders), sorted."""
    names = sorted(set(groups))
    sizes = {g: groups.count(g) for g in names}
    exact = {g: n * sizes[g] / len(groups) for g in names}
    quota = {g: math.floor(exact[g]) for g in names}
    for g in sorted(names, key=lambda g: quota[g] - exact[g])[:n - sum(quota.values())]:
        quota[g] += 1
    picked = []
    for g in names:
        members = [i for i, x in enumerate(groups) if x == g]
        picked += [members[i] for i in rng.permutation(len(members))[:quota[g]]]
    return sorted(picked)


def attacked_prompts(profile: Profile, n_harmful: int, n_harmless: int, seed: int = SEED) -> dict:
    """{"harmful": [(i, prompt)], "harmless": [(i, prompt)]}: subsets of the trained arms' held-out prompts
    (training/evaluate.py's eval_prompts; i indexes them), harmful ones stratified by source."""
    settings = settings_of(recipe(profile))
    prompts = eval_prompts(settings)
    sources = eval_pool(settings.n_harmful)[1]
    rng = np.random.default_rng([seed, 3])
    harmful = stratified_indices(sources, min(n_harmful, len(sources)), rng)
    n_alpaca = len(prompts["harmless"])
    harmless = stratified_indices(["alpaca"] * n_alpaca, min(n_harmless, n_alpaca), rng)
    return {"harmful": [(i, prompts["harmful"][i]) for i in harmful],
            "harmless": [(i, prompts["harmless"][i]) for i in harmless]}


def held_out_radii(profile: Profile) -> dict:
    """{"pgd_at": (0, eps), "pgd_lat": (lat_layer, eps)}: notebook 05's attack radii, from the train logs of
    the profile's adapters."""
    folders = [Path(adapter_location(spec)) for spec in profile.models.values() if spec.adapter]
    return attack_radii(profile, recipe(profile), logged_norms(folders))


def attacked_path(run: Path, model: str, condition: str) -> Path:
    return folder(run) / "attacked" / f"{model}__{condition}.jsonl"


def attacked_artifacts(profile: Profile, run: Path, radii: dict, n_harmful: int = 30, n_harmless: int = 30,
                       seed: int = SEED, log=print) -> dict:
    """{(model, condition): rows {i, prompt, turn, log_odds}} for every model of the profile: the held-out
    attack's completions (robustness.attacked_completions, notebook 05's steps and tokens, the profile's
    generation dtype) at each of `radii` on n_harmful held-out harmful prompts, and clean completions of
    n_harmless held-out harmless prompts; each cached as labelling/attacked/<model>__<condition>.jsonl
    (store.cached)."""
    settings = settings_of(recipe(profile))
    chosen = attacked_prompts(profile, n_harmful, n_harmless, seed)
    out = {}
    for model in profile.roles:
        for condition in ATTACKED:
            indexed = chosen["harmless" if condition == "harmless" else "harmful"]
            texts = [p for _, p in indexed]
            layer, epsilon = radii[condition] if condition in radii else (None, 0.0)
            key = {"stage": VERSIONS["labelling"], "model": model_fingerprint(profile, model), "condition": condition,
                   "layer": layer, "epsilon": epsilon, "steps": settings.attack_steps, "tokens": settings.tokens,
                   "gen_dtype": profile.gen_dtype, "template": profile.template, "prompts": stable_hash(texts),
                   "rows": len(texts)}

            def compute(info, model=model, texts=texts, indexed=indexed, layer=layer, epsilon=epsilon):
                lm, tokenizer = use_model(profile, model, profile.gen_dtype)
                got = robustness.attacked_completions(lm, tokenizer, profile, texts, layer, epsilon,
                                                      settings.attack_steps, settings.tokens)
                return [{"i": i, "prompt": p, "turn": t, "log_odds": lo}
                        for (i, p), t, lo in zip(indexed, got["turns"], got["log_odds"])]
            path = attacked_path(run, model, condition)
            out[(model, condition)] = cached(path, key, compute, read_jsonl, encode_jsonl)
            log(f"{model} / {condition}: {len(out[(model, condition)])} rows")
    return out


# --- labels --------------------------------------------------------------------------------------------

def first_words(text: str, n: int = WORDS) -> str:
    """The first n words (at most MAX_CHARS characters): all the committed table shows of a text."""
    return " ".join(text.split()[:n])[:MAX_CHARS]


def split_by_prompt(prompts, strata=None, seed: int = SEED) -> dict:
    """{prompt: "fit" | "held_out"}, one half per prompt. A prompt recurs over models and conditions, so the
    distinct prompts are taken in a seeded random order and each goes to the half where its items keep the
    two halves' item counts per stratum (model and condition) closest; ties to the half with fewer items."""
    items = {}
    for prompt, stratum in zip(prompts, strata or [""] * len(prompts)):
        items.setdefault(prompt, Counter())[stratum] += 1
    distinct = sorted(items)
    size = {"fit": Counter(), "held_out": Counter()}

    def gap(half: str, prompt: str) -> int:
        other = size["held_out" if half == "fit" else "fit"]
        grown = size[half] + items[prompt]
        return sum((grown[s] - other[s]) ** 2 for s in set(grown) | set(other))
    out = {}
    for i in np.random.default_rng([seed, 4]).permutation(len(distinct)):
        prompt = distinct[i]
        out[prompt] = min(("fit", "held_out"), key=lambda h: (gap(h, prompt), sum(size[h].values())))
        size[out[prompt]] += items[prompt]
    return out


def read_labels(paths) -> dict:
    """{id: label} from the labeller's JSONL files ({"id", "label"} per line); a line that is not such an object,
    a label outside LABELS or an id labelled twice differently is a ConfigError."""
    labels = {}
    for path in paths:
        for n, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                item, label = entry["id"], str(entry["label"]).strip().lower()
            except (ValueError, TypeError, KeyError):
                raise ConfigError(f'{path}:{n}: not a JSON object {{"id": ..., "label": ...}}') from None
            if label not in LABELS:
                raise ConfigError(f"{path}:{n}: label {entry['label']!r}; use one of {', '.join(LABELS)}")
            if labels.setdefault(item, label) != label:
                raise ConfigError(f"{path}:{n}: id {item} labelled both {labels[item]} and {label}")
    return labels


TABLE_COLUMNS = ("id", "pass", "artifact", "artifact_sha256", "key_hash", "row", "model", "condition", "half",
                 "label", "prompt_start", "turn_start")


def import_labels(run: Path, label_files, seed: int = SEED) -> "pd.DataFrame":
    """The labels table (TABLE_COLUMNS), pass 1 then pass 2, each by id: every item of items.jsonl and
    pass2.jsonl must be labelled, and every artifact must still hold the bytes it was sampled from."""
    import pandas as pd
    out = folder(run)
    keys = [(1, k) for k in read_jsonl(out / "key.jsonl")] + [(2, k) for k in read_jsonl(out / "key_pass2.jsonl")]
    labels = read_labels(label_files)
    unknown = sorted(set(labels) - {k["id"] for _, k in keys})
    missing = [k["id"] for _, k in keys if k["id"] not in labels]
    if unknown or missing:
        raise ConfigError(f"labels do not match the items: {len(missing)} items unlabelled {missing[:5]}, "
                          f"{len(unknown)} ids not in the keys {unknown[:5]}")
    rows_of = {}
    records = []
    for n_pass, k in keys:
        if k["artifact"] not in rows_of:
            rows_of[k["artifact"]] = artifact_rows(run, k["artifact"], k["artifact_sha256"])
        row = rows_of[k["artifact"]][k["row"]]
        records.append({**k, "pass": n_pass, "label": labels[k["id"]], "prompt": row["prompt"],
                        "prompt_start": first_words(row["prompt"]), "turn_start": first_words(row["turn"])})
    first = [r for r in records if r["pass"] == 1]
    halves = split_by_prompt([r["prompt"] for r in first], [(r["model"], r["condition"]) for r in first], seed)
    table = pd.DataFrame([{**r, "half": halves[r["prompt"]]} for r in records])
    return table[list(TABLE_COLUMNS)].reset_index(drop=True)


def write_table(table: "pd.DataFrame", path: Path):
    atomic_write(Path(path), table.to_csv(index=False).encode())


def read_table(path: Path) -> "pd.DataFrame":
    import pandas as pd
    text = ("id", "artifact", "artifact_sha256", "key_hash", "model", "condition", "half", "label", "prompt_start",
            "turn_start")
    return pd.read_csv(path, keep_default_na=False, dtype={c: str for c in text})


def check(table: "pd.DataFrame", run: Path) -> list[dict]:
    """One problem {id, artifact, problem} per labelled row whose artifact is missing, whose bytes differ from
    artifact_sha256, or whose row's first words differ from the table's; [] when every label still stands."""
    problems, state = [], {}
    for r in table.itertuples():
        path = Path(run) / r.artifact
        if r.artifact not in state:
            state[r.artifact] = (sha256_file(path), read_jsonl(path)) if path.is_file() else (None, [])
        sha, rows = state[r.artifact]
        if sha is None:
            problems.append({"id": r.id, "artifact": r.artifact, "problem": "artifact missing"})
            continue
        if sha != r.artifact_sha256:
            problems.append({"id": r.id, "artifact": r.artifact, "problem": "sha256 differs"})
        if r.row >= len(rows) or (first_words(rows[r.row]["prompt"]), first_words(rows[r.row]["turn"])) != (
                r.prompt_start, r.turn_start):
            problems.append({"id": r.id, "artifact": r.artifact, "problem": f"row {r.row}: first words differ"})
    return problems


# --- validation ----------------------------------------------------------------------------------------

def judged(table: "pd.DataFrame", run: Path, methods=None) -> "pd.DataFrame":
    """The pass-1 rows with a 0/1 column per judge (1: the judge says refusal, reading the full turn and its
    prompt from the artifact); the artifacts must hold the bytes the labels were given on."""
    rows = table[table["pass"] == 1].reset_index(drop=True)
    pairs = rows[["artifact", "artifact_sha256"]].drop_duplicates().values
    texts = {a: artifact_rows(run, a, sha) for a, sha in pairs}
    turns = [texts[a][i]["turn"] for a, i in zip(rows.artifact, rows.row)]
    prompts = [texts[a][i]["prompt"] for a, i in zip(rows.artifact, rows.row)]
    for m in methods or METHODS:
        rows[m] = [int(label == 1) for label in classify(turns, m, prompts)]
    return rows


def validation_table(rows: "pd.DataFrame", methods) -> "pd.DataFrame":
    """Per half (fit, held_out, all), judge and group (overall, each condition, each model): the judge against
    the labels on the items not labelled invalid (refusal = positive): n, agreement, kappa, confusion counts,
    sensitivity, specificity, both refusal rates and the bias judge - label in points; n_invalid beside."""
    import pandas as pd
    out = []
    for half in ("fit", "held_out", "all"):
        part = rows if half == "all" else rows[rows.half == half]
        groups = [("overall", "all", part)] + [(col, g, part[part[col] == g]) for col in ("condition", "model")
                                                for g in dict.fromkeys(part[col])]
        for m in methods:
            for scope, group, sub in groups:
                valid = sub[sub.label != "invalid"]
                if valid.empty:
                    continue
                truth, pred = (valid.label == "refusal").tolist(), (valid[m] == 1).tolist()
                a = agreement(pred, truth)
                out.append({"half": half, "judge": m, "scope": scope, "group": group, **a,
                            "judge_rate": np.mean(pred), "label_rate": np.mean(truth),
                            "bias_points": 100 * (np.mean(pred) - np.mean(truth)),
                            "n_invalid": len(sub) - len(valid)})
    return pd.DataFrame(out)


def intra_rater(table: "pd.DataFrame") -> dict:
    """Pass 1 vs pass 2 on the items labelled twice: three-class agreement and kappa, and agreement and kappa
    on refusal vs not."""
    first = table[table["pass"] == 1].set_index(["artifact", "row"]).label
    second = table[table["pass"] == 2].set_index(["artifact", "row"]).label
    both = first.loc[second.index]
    three = categorical_agreement(both.tolist(), second.tolist())
    binary = agreement((both == "refusal").tolist(), (second == "refusal").tolist())
    return {"n": three["n"], "agreement": three["agreement"], "kappa": three["kappa"],
            "refusal_agreement": binary["agreement"], "refusal_kappa": binary["kappa"]}


def validate(table: "pd.DataFrame", run: Path, methods=None) -> tuple["pd.DataFrame", dict]:
    """(validation_table, intra_rater) of a labels table whose artifacts are in `run`."""
    methods = list(methods or METHODS)
    return validation_table(judged(table, run, methods), methods), intra_rater(table)
