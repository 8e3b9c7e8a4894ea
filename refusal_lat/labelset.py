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
Round s labels training v3's sweep models from sweep/<role>/<condition>.jsonl (training/sweep_eval.py):
the same conditions under their sweep names (harmful = clean, ablated_own, ablated_base and ablated@<LAT> =
other_direction, pgd_*, harmless) and the prefilling attack:
  prefill          sweep/<role>/prefill.jsonl: the turn goes on after an affirmative prefix (not shown)

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
CONDITIONS = ("clean", "own_direction", "other_direction", "pgd_at", "pgd_lat", "harmless", "prefill")
ATTACKED = ("pgd_at", "pgd_lat", "harmless")  # the conditions attacked_artifacts writes
# Labelling rounds. Each draws from its own artifacts, numbers its items with its own prefixes (pass 1, pass 2),
# keeps its files apart (items<suffix>.jsonl, ...) and its labels in its own table, so a later round never moves
# an earlier one's draw, ids or halves. "q": notebooks 03-05's models (v2 arms); "s": training v3's sweep models
# (runs/<profile>/sweep/<role>/<condition>.jsonl, sweep_eval), first for the prefilling attack.
ROUNDS = {"q": {"globs": ("generations/*/*.jsonl", "labelling/attacked/*.jsonl"), "prefixes": ("q", "r"), "suffix": "",
                "table": "{profile}_turns.csv"},
          "s": {"globs": ("sweep/*/*.jsonl",), "prefixes": ("s", "t"), "suffix": "_s",
                "table": "{profile}_turns_sweep.csv"}}
SWEEP_CONDITIONS = {"harmful": "clean", "ablated_own": "own_direction", "ablated_base": "other_direction",
                    "pgd_at": "pgd_at", "pgd_lat": "pgd_lat", "harmless": "harmless", "prefill": "prefill"}
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
    if parts[0] == "sweep" and len(parts) == 3:  # sweep_eval.condition_path: the model is the sweep role
        condition = "other_direction" if stem.startswith("ablated@") else SWEEP_CONDITIONS.get(stem)
        return (parts[1].replace("__", "/"), condition) if condition else None
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


def artifacts(run: Path, log=print, round_name: str = "q") -> list[dict]:
    """Every sampled artifact of `run` whose bytes match its sidecar: {artifact (path relative to the run),
    artifact_sha256, key_hash (the cache key's hash, which says how it was made), model, condition}. An
    artifact without a matching sidecar (being written, cut or edited) is left out, with a note."""
    run = Path(run)
    found = []
    for path in (p for pattern in ROUNDS[round_name]["globs"] for p in sorted(run.glob(pattern))):
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


def draw(run: Path, per_cell: int = PER_CELL, seed: int = SEED, log=print, round_name: str = "q",
         conditions=None) -> list[dict]:
    """Key rows {artifact, artifact_sha256, key_hash, row, model, condition, prompt, turn}: per_cell rows of
    every (model, condition) that has candidates (of `conditions` only, when given), in cell order; a cell
    with fewer is taken whole (noted)."""
    arts = [a for a in artifacts(run, log, round_name) if conditions is None or a["condition"] in conditions]
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
           force: bool = False, log=print, round_name: str = "q", conditions=None) -> dict:
    """Write labelling/{items,key,pass2,key_pass2}<round suffix>.jsonl (see the module) and return {"items",
    "key", "pass2", "key_pass2"}. Refuses to replace an existing items file unless force (its labels would no
    longer match its ids)."""
    out, (first, second), suffix = folder(run), ROUNDS[round_name]["prefixes"], ROUNDS[round_name]["suffix"]
    if (out / f"items{suffix}.jsonl").is_file() and not force:
        raise ConfigError(f"{out / f'items{suffix}.jsonl'} exists (labels may refer to its ids); pass --force to "
                          "draw again")
    drawn = draw(run, per_cell, seed, log, round_name, conditions)
    if not drawn:
        raise ConfigError(f"no generation units or labelling artifacts in {run} for round {round_name!r}; run notebooks "
                          "03-04 and `scripts/label_set.py generate-attacked` (round q) or scripts/evaluate_sweep.py "
                          "(round s) first")
    items = number(drawn, first, np.random.default_rng([seed, 1]))
    again = []
    for cell in dict.fromkeys((e["model"], e["condition"]) for e in drawn):
        mine = [e for e in items if (e["model"], e["condition"]) == cell]
        k = max(1, round(pass2_share * len(mine)))
        chosen = sorted(cell_rng(seed, "pass2", *cell).permutation(len(mine))[:k])
        again += [{**mine[i], "pass1_id": mine[i]["id"]} for i in chosen]
    pass2 = number(again, second, np.random.default_rng([seed, 2]))
    files = {"items": [{"id": e["id"], "prompt": e["prompt"], "turn": e["turn"]} for e in items],
             "key": [key_fields(e) for e in items],
             "pass2": [{"id": e["id"], "prompt": e["prompt"], "turn": e["turn"]} for e in pass2],
             "key_pass2": [{**key_fields(e), "pass1_id": e["pass1_id"]} for e in pass2]}
    for name, rows in files.items():
        atomic_write(out / f"{name}{suffix}.jsonl", encode_jsonl(rows))
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


def import_labels(run: Path, label_files, seed: int = SEED, round_name: str = "q", fixed_halves: dict | None = None
                  ) -> "pd.DataFrame":
    """The labels table (TABLE_COLUMNS), pass 1 then pass 2, each by id: every item of the round's items and
    pass-2 files must be labelled, and every artifact must still hold the bytes it was sampled from.
    fixed_halves {prompt: half}: prompts an earlier round already put in a half keep it (labelled_halves);
    the other prompts are split among themselves."""
    import pandas as pd
    out, suffix = folder(run), ROUNDS[round_name]["suffix"]
    keys = ([(1, k) for k in read_jsonl(out / f"key{suffix}.jsonl")]
            + [(2, k) for k in read_jsonl(out / f"key_pass2{suffix}.jsonl")])
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
    fixed = fixed_halves or {}
    first = [r for r in records if r["pass"] == 1 and r["prompt"] not in fixed]
    halves = {**split_by_prompt([r["prompt"] for r in first], [(r["model"], r["condition"]) for r in first], seed),
              **fixed}
    table = pd.DataFrame([{**r, "half": halves[r["prompt"]]} for r in records])
    return table[list(TABLE_COLUMNS)].reset_index(drop=True)


def labelled_halves(table: "pd.DataFrame", run: Path) -> dict:
    """{prompt: half} of an earlier round's labels table (full prompts read back from its artifacts)."""
    rows = table[table["pass"] == 1]
    texts = {a: artifact_rows(run, a, sha) for a, sha in rows[["artifact", "artifact_sha256"]].drop_duplicates().values}
    return {texts[a][i]["prompt"]: h for a, i, h in zip(rows.artifact, rows.row, rows.half)}


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


# --- both labelled domains as one table (the judge's fit and validation, issue 29) -------------------------

DOMAINS = ("llama2", "qwen")  # the authors' Llama-2 completions, this project's Qwen turns (cpu)
AUTHORS_HALVES = {"advbench_test": "fit", "custom_set": "held_out"}
AUTHORS_MODELS = {"no_ablation": "none", "baseline": "base", "at": "AT", "lat": "LAT"}
ROW_COLUMNS = ("domain", "half", "model", "condition", "prompt", "turn", "label", "source")


def normalise_prompt(prompt: str) -> str:
    """Lower case, whitespace runs collapsed: how prompts are compared across the two domains."""
    return " ".join(str(prompt).lower().split())


def authors_rows(raw: bytes | None = None) -> "pd.DataFrame":
    """The authors' 816 human-labelled Llama-2 completions (released data, `released_human_annots`) as ROW_COLUMNS:
    half fit = advbench_test, held_out = custom_set (the split scripts/fit_project_judge.py has always used);
    label refusal = not is_successful_human_annot; model none (no ablation) / base / AT / LAT; condition clean
    (no_ablation) or own_direction (each model with its own direction ablated); turn = intervention_completion."""
    import io
    import pandas as pd
    from .data import data_file
    if raw is None:
        raw = data_file("released_human_annots").read_bytes()
    d = pd.read_csv(io.BytesIO(raw))
    return pd.DataFrame({
        "domain": "llama2", "half": d.dataset.map(AUTHORS_HALVES), "model": d.variant.map(AUTHORS_MODELS),
        "condition": ["clean" if v == "no_ablation" else "own_direction" for v in d.variant],
        "prompt": d.instruction.astype(str), "turn": d.intervention_completion.fillna("").astype(str),
        "label": ["compliance" if s else "refusal" for s in d.is_successful_human_annot.astype(bool)],
        "source": [f"{ds}/{v}/{i}" for i, (ds, v) in enumerate(zip(d.dataset, d.variant))]})


def qwen_rows(table: "pd.DataFrame", run: Path) -> "pd.DataFrame":
    """The pass-1 rows of the labels table as ROW_COLUMNS, each with its full prompt and turn read from its artifact
    in `run` (which must still hold the bytes the labels were given on)."""
    import pandas as pd
    rows = table[table["pass"] == 1].reset_index(drop=True)
    pairs = rows[["artifact", "artifact_sha256"]].drop_duplicates().values
    texts = {a: artifact_rows(run, a, sha) for a, sha in pairs}
    return pd.DataFrame({
        "domain": "qwen", "half": rows.half, "model": rows.model, "condition": rows.condition,
        "prompt": [texts[a][i]["prompt"] for a, i in zip(rows.artifact, rows.row)],
        "turn": [texts[a][i]["turn"] for a, i in zip(rows.artifact, rows.row)], "label": rows.label,
        "source": [f"{a}#{i}" for a, i in zip(rows.artifact, rows.row)]})


def fit_rows(both: "pd.DataFrame") -> tuple["pd.DataFrame", int]:
    """(rows, dropped): the fit halves of both domains, binary labels only (invalid left out), minus every row whose
    prompt (normalise_prompt) is also a prompt of either domain's held-out half: some requests occur in both
    domains, and a judge fitted on one domain's answers to a request is not scored on the other's."""
    held = set(both[both.half == "held_out"].prompt.map(normalise_prompt))
    fit = both[(both.half == "fit") & (both.label != "invalid")]
    keep = ~fit.prompt.map(normalise_prompt).isin(held)
    return fit[keep].reset_index(drop=True), int((~keep).sum())


def rows_hash(rows: "pd.DataFrame") -> str:
    """sha256 of the rows' (domain, prompt, turn, label) in order: what a fit read."""
    return stable_hash([[d, p, t, lab] for d, p, t, lab in zip(rows.domain, rows.prompt, rows.turn, rows.label)])


# --- one validation table per domain (scripts/label_set.py validate --publish) ------------------------------

VALIDATION_DIR = Path(__file__).resolve().parents[1] / "data" / "labels" / "validation"
SPLITS = {("llama2", "fit"): "advbench_test", ("llama2", "held_out"): "custom_set",
          ("qwen", "fit"): "fit half (by prompt)", ("qwen", "held_out"): "held-out half (by prompt)"}
VALIDATION_COLUMNS = ("domain", "half", "split", "judge", "judge_id", "fitted_on_this_half", "scope", "group", "n",
                      "n_invalid", "agreement", "kappa", "sensitivity", "specificity", "tp", "fp", "fn", "tn",
                      "judge_rate", "label_rate", "bias_points", "success_bias_points")


def fitted_halves(method: str) -> set:
    """{(domain, half)} whose rows a judge was fitted or designed on: version 2 both fit halves, version 1 the
    authors' advbench_test; the rule judges none (they were written before any label was read)."""
    from .project_judge import PARAMS_PATH, PARAMS_V1_PATH, load_params
    if method not in ("project", "project_v1"):
        return set()
    params = load_params(PARAMS_PATH if method == "project" else PARAMS_V1_PATH)
    if params.get("version", 1) >= 2:
        return {(d, "fit") for d in params["fit_halves"]}
    return {("llama2", "fit")}


def judge_columns(rows: "pd.DataFrame", methods) -> "pd.DataFrame":
    """rows (ROW_COLUMNS) with a 0/1 column per judge (1: the judge says refusal; invalid counts as not)."""
    rows = rows.reset_index(drop=True).copy()
    for m in methods:
        rows[m] = [int(label == 1) for label in classify(rows.turn.tolist(), m, rows.prompt.tolist())]
    return rows


def scopes(domain: str, part: "pd.DataFrame") -> list:
    """(scope, group, rows) for one half of one domain: the authors' Llama-2 rows overall, clean, ablated and
    each model's ablated rows; the Qwen rows overall, per labelling round (round_of), per condition and per model."""
    out = [("overall", "all", part)]
    if domain == "llama2":
        ablated = part[part.condition == "own_direction"]
        out += [("condition", "clean", part[part.condition == "clean"]), ("ablated rows", "all", ablated)]
        out += [("ablated rows, model", m, ablated[ablated.model == m]) for m in ("base", "AT", "LAT")]
    else:
        if "source" in part:
            rounds = part.source.map(round_of)
            out += [("round", r, part[rounds == r]) for r in ROUNDS if (rounds == r).any()]
        out += [("condition", c, part[part.condition == c]) for c in CONDITIONS if (part.condition == c).any()]
        out += [("model", m, part[part.model == m]) for m in dict.fromkeys(part.model)]
    return out


def round_of(source: str) -> str:
    """The labelling round of a Qwen row from its source (<artifact>#<row>): the round whose globs hold it."""
    artifact = source.rsplit("#", 1)[0]
    return next(r for r, spec in ROUNDS.items() if any(Path(artifact).match(g) for g in spec["globs"]))


def domain_validation(judged_rows: "pd.DataFrame", methods) -> "pd.DataFrame":
    """One domain's validation table (VALIDATION_COLUMNS): per half, judge and scope, the judge against the labels
    on the rows not labelled invalid (refusal = positive); bias_points = judge refusal rate - label refusal rate,
    success_bias_points = its negative (judge attack-success rate - the labels'), both in points."""
    import pandas as pd
    from .judges import fingerprint
    out = []
    for domain in dict.fromkeys(judged_rows.domain):
        for half in ("held_out", "fit"):
            part = judged_rows[(judged_rows.domain == domain) & (judged_rows.half == half)]
            for m in methods:
                fitted = (domain, half) in fitted_halves(m)
                for scope, group, sub in scopes(domain, part):
                    valid = sub[sub.label != "invalid"]
                    if valid.empty:
                        continue
                    truth, pred = (valid.label == "refusal").tolist(), (valid[m] == 1).tolist()
                    a = agreement(pred, truth)
                    bias = 100 * (np.mean(pred) - np.mean(truth))
                    out.append({"domain": domain, "half": half, "split": SPLITS[(domain, half)], "judge": m,
                                "judge_id": fingerprint(m), "fitted_on_this_half": fitted, "scope": scope,
                                "group": group, **a, "n_invalid": len(sub) - len(valid),
                                "judge_rate": float(np.mean(pred)), "label_rate": float(np.mean(truth)),
                                "bias_points": bias, "success_bias_points": -bias})
    return pd.DataFrame(out, columns=list(VALIDATION_COLUMNS))


def held_out_counts(table: "pd.DataFrame", judge: str, domain: str) -> tuple[int, int, int, int]:
    """(tp, fn, fp, tn) of a judge on a domain's held-out half, all rows (from a domain_validation table)."""
    row = table[(table.domain == domain) & (table.half == "held_out") & (table.judge == judge)
                & (table.scope == "overall")]
    if len(row) != 1:
        raise ConfigError(f"no held-out validation of judge {judge!r} on {domain}")
    r = row.iloc[0]
    return int(r.tp), int(r.fn), int(r.fp), int(r.tn)
