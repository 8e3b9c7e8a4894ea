"""Evaluate trained arms and seeds against the base model (issue 23; docs/method.md, "Training v2").

For every model (the base and each <arm>-s<seed> adapter of the recipe's folder):
- activations at the read position, every block input, on the direction prompts (data.prompt_sets):
  the model's own refusal direction (mean difference at profile.layer) and the SVD shares of the
  harmful - harmless differences at every layer;
- five sets of greedy completions (generation dtype, judged by the project judge and substrings):
  harmless  held-out Alpaca prompts (paper harmless_test, evenly spaced): over-refusal;
  harmful   held-out harmful prompts (the eval pool, evenly spaced), clean;
  ablated   the same, own direction ablated at every layer;
  pgd_at    the same under the evaluation attack at block 0 (AT's block) with AT's radius;
  pgd_lat   the same under the evaluation attack at lat_layer (LAT's block) with LAT's radius;
- a refusal-score transfer matrix: first-token refusal log-odds on the harmful prompts with every
  model's direction ablated in every model.
Records are cached per model under runs/<profile>/arms/<role>.safetensors (tensors, and the completions
as JSON in its metadata: nothing there is unpickled); the tables that summarise them (labels and numbers,
no text) are what gets committed, into a sealed folder (record.py) that only --publish replaces.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from ..activations import block_inputs
from ..config import ConfigError, Profile, model_role_spec, run_dir
from ..data import eval_pool, evenly_spaced, paper_splits, prompt_sets
from ..hooks import ablation
from ..judges import fingerprint
from ..models.load import model_fingerprint
from ..models.pool import use_model
from ..record import check_writable, verify
from ..store import VERSIONS, atomic_write, fresh, stable_hash, store
from .loop import adapter_root, arm_folder, load_log
from .recipe import ARMS, Recipe, arm_epsilon_value, check_selection, training_seeds
from .robustness import attacked_completions, condition_completions, refusal_labels

CONDITIONS = ("harmless", "harmful", "ablated", "pgd_at", "pgd_lat")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    n_harmful: int = 100
    n_harmless: int = 100
    tokens: int = 32        # greedy tokens per completion (the judges read the turn)
    attack_steps: int = 6   # the evaluation attack's PGD steps


def settings_of(rec: Recipe) -> EvalSettings:
    return EvalSettings(rec.eval_prompts, rec.eval_prompts, rec.eval_tokens, rec.eval_attack_steps)


def eval_prompts(settings: EvalSettings) -> dict[str, list[str]]:
    harmless = paper_splits()["harmless_test"]
    return {"harmful": eval_pool(settings.n_harmful)[0],
            "harmless": [harmless[i] for i in evenly_spaced(len(harmless), settings.n_harmless)]}


def arms_profile(profile: Profile, rec: Recipe, arms=ARMS, seeds=(0,), out: Path | None = None) -> Profile:
    """The profile with one model role per trained adapter found: base, then <arm>-s<seed>."""
    out = Path(out) if out else adapter_root(rec)
    base = model_role_spec(profile, profile.roles[0])
    models = {"base": dataclasses.replace(base, adapter=None)}
    for seed in seeds:
        for arm in arms:
            folder = out / arm_folder(arm, seed)
            if (folder / "adapter_config.json").is_file():
                verify(folder)
                models[arm_folder(arm, seed)] = dataclasses.replace(base, adapter=str(folder))
    dtype = {"generation_dtype": rec.eval_dtype} if rec.eval_dtype else {}  # the recipe's evaluation dtype
    return dataclasses.replace(profile, models=models, **dtype)


def logged_norms(folders) -> dict:
    """{layer: {"token_norm", ...}}: the base model's residual norms that training measured once and
    stored in every adapter's train_log.json (the same in all of them), so the evaluation radii are the
    same numbers whatever torch's thread count is here; a one-line ConfigError when the logs disagree."""
    found = {json.dumps(load_log(folder).get("residual_norms"), sort_keys=True) for folder in folders}
    if len(found) != 1 or found == {"null"}:
        raise ConfigError(f"the train logs of {[Path(f).name for f in folders]} record {len(found)} different sets of "
                          f"residual norms (or none); evaluate adapters trained from the same base and data together")
    return {int(layer): norms for layer, norms in json.loads(found.pop()).items()}


def attack_radii(profile: Profile, rec: Recipe, norms: dict) -> dict:
    """{"pgd_at": (0, eps), "pgd_lat": (lat_layer, eps)}: absolute per-token radii of the evaluation
    attacks, the recipe's calibrated fractions of the base model's median token norms (logged_norms)."""
    return {"pgd_at": (0, arm_epsilon_value(rec, "at") * norms[0]["token_norm"]),
            "pgd_lat": (rec.lat_layer, arm_epsilon_value(rec, "lat") * norms[rec.lat_layer]["token_norm"])}


def encode_record(rec: dict, key: str | None = None) -> bytes:
    """A model's record as safetensors: activations and direction as tensors, everything else (role,
    completions, labels, log-odds) as JSON in the metadata."""
    from safetensors.torch import save
    tensors = {"acts_harmful": rec["acts"]["harmful"], "acts_harmless": rec["acts"]["harmless"],
               "direction": rec["direction"]}
    meta = {"record": json.dumps({"role": rec["role"], "conditions": rec["conditions"]})}
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta if key is None else {**meta, "key": key})


def read_record(path: Path) -> dict:
    """encode_record's inverse (safetensors and JSON only: reading it runs no code)."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        rec = json.loads(f.metadata()["record"])
        return {**rec, "acts": {k: f.get_tensor(f"acts_{k}") for k in ("harmful", "harmless")},
                "direction": f.get_tensor("direction")}


GENERATION_ROWS = 100  # batched evaluation: rows per generation (harmful: 25 prompts x 4 conditions)


def evaluate_model(profile: Profile, role: str, prompts: dict, radii: dict, settings: EvalSettings,
                   run: Path | None = None, batched: bool = False) -> dict:
    """The record of one model (see the module), cached in runs/<profile>/arms/<role>.safetensors.
    batched: the harmful conditions generate together and the log-odds come from the generation's
    first step (robustness.condition_completions); the same computation with other batch shapes, so
    a few near-tied greedy tokens may differ: its own cache key."""
    run = Path(run or run_dir(profile))
    key = {"stage": VERSIONS.get("arms", "arms-v1"), "model": model_fingerprint(profile, role),
           "settings": dataclasses.asdict(settings), "radii": radii, "prompts": stable_hash(prompts),
           "layer": profile.layer, "dtype": profile.dtype, "gen_dtype": profile.gen_dtype}
    if batched:
        key["batched"] = GENERATION_ROWS
    path = run / "arms" / f"{role}.safetensors"
    hit = fresh(path, key, read_record)
    if hit is not None:  # the turns are the record; the labels are this checkout's judges' (cheap to redo)
        return rejudge(hit, prompts)
    acts, direction = model_activations(profile, role)
    model, tokenizer = use_model(profile, role, profile.gen_dtype)
    record = {"role": role, "acts": acts, "direction": direction, "conditions": {}}
    outs = condition_outputs(model, tokenizer, profile, prompts, direction, radii, settings, batched)
    for condition in CONDITIONS:
        out = outs[condition]
        texts = prompts["harmless" if condition == "harmless" else "harmful"]
        record["conditions"][condition] = {**out, "labels": refusal_labels(out["turns"], texts)}
        print(f"{role} {condition}: refusal {np.mean(record['conditions'][condition]['labels']['project']):.3f}",
              flush=True)
    store(path, key, encode_record(record))
    return record


def model_activations(profile: Profile, role: str) -> tuple[dict, torch.Tensor]:
    """({"harmful", "harmless"}: [n, blocks, d] read-position block inputs on the direction prompts, in the
    profile's dtype) and the role's refusal direction (their mean difference at profile.layer)."""
    sets = prompt_sets(profile)
    model, tokenizer = use_model(profile, role)
    acts = {"harmful": block_inputs(model, tokenizer, profile, sets.harmful, desc=f"{role} harmful"),
            "harmless": block_inputs(model, tokenizer, profile, sets.harmless, desc=f"{role} harmless")}
    return acts, acts["harmful"][:, profile.layer].mean(0) - acts["harmless"][:, profile.layer].mean(0)


def rejudge(record: dict, prompts: dict) -> dict:
    """A cached record with every condition's labels made again from its turns by this checkout's judges."""
    for condition, out in record["conditions"].items():
        out["labels"] = refusal_labels(out["turns"], prompts["harmless" if condition == "harmless" else "harmful"])
    return record


def condition_outputs(model, tokenizer, profile: Profile, prompts: dict, direction: torch.Tensor, radii: dict,
                      settings: EvalSettings, batched: bool = False) -> dict:
    """{condition: {"turns", "log_odds"}} of one model in every condition (see the module), one condition
    at a time (robustness.attacked_completions), or batched: the four harmful conditions of each 25
    prompts in one generation of GENERATION_ROWS rows, the harmless prompts GENERATION_ROWS at a time
    with the template's common start computed once (robustness.condition_completions)."""
    if batched:
        steps, tokens = settings.attack_steps, settings.tokens
        harmful = {"harmful": (None, None, 0.0), "ablated": (direction, None, 0.0),
                   "pgd_at": (None, *radii["pgd_at"]), "pgd_lat": (None, *radii["pgd_lat"])}
        clean = {"harmless": (None, None, 0.0)}
        return {**condition_completions(model, tokenizer, profile, prompts["harmless"], clean, steps, tokens,
                                        GENERATION_ROWS, share_prefix=True),
                **condition_completions(model, tokenizer, profile, prompts["harmful"], harmful, steps, tokens,
                                        GENERATION_ROWS // len(harmful))}
    outs = {}
    for condition in CONDITIONS:
        texts = prompts["harmless" if condition == "harmless" else "harmful"]
        layer, eps = radii.get(condition, (None, 0.0))
        with ablation(model, direction if condition == "ablated" else None):
            outs[condition] = attacked_completions(model, tokenizer, profile, texts, layer, eps, settings.attack_steps,
                                                   settings.tokens)
    return outs


def transfer_log_odds(profile: Profile, records: dict, prompts: list[str], run: Path | None = None) -> "pd.DataFrame":
    """Rows (model, direction_of, prompt, log_odds): refusal log-odds of each model with each model's
    direction ablated at every layer (none: no ablation). Each cell is cached as the refusal-score
    matrix's are (scores.score_key: the model's fingerprint, the direction's bytes, the prompts, the
    dtype; not torch's thread count), in runs/<profile>/arms/scores/, so a rerun reads them back."""
    import pandas as pd
    from ..scores import score_key, score_path
    from ..selection import subspace_refusal_log_odds
    from ..store import cached, encode_jsonl, read_jsonl
    from ..units import NO_ABLATION
    run = Path(run or run_dir(profile))
    rows = []
    for role in records:
        for source in [NO_ABLATION, *records]:
            direction = None if source == NO_ABLATION else records[source]["direction"]
            layer = None if direction is None else profile.layer

            def compute(info, role=role, direction=direction):
                model, tokenizer = use_model(profile, role, profile.gen_dtype)
                scores = subspace_refusal_log_odds(model, tokenizer, profile, prompts,
                                                   None if direction is None else direction[None])
                return [{"i": i, "prompt": p, "refusal_log_odds": float(s)}
                        for i, (p, s) in enumerate(zip(prompts, scores))]
            key = score_key(profile, role, source, layer, direction, prompts)
            cell = cached(score_path(run / "arms", role, source, layer), key, compute, read_jsonl, encode_jsonl)
            rows += [{"model": role, "direction_of": source, "prompt": r["i"], "log_odds": r["refusal_log_odds"]}
                     for r in cell]
    return pd.DataFrame(rows)


def arm_of(role: str) -> str:
    return role.rsplit("-s", 1)[0] if "-s" in role else role


def rate_table(records: dict, judges=("project", "substring")) -> "pd.DataFrame":
    """One row per model, condition and judge: refusals, rate with its Wilson 95 % interval, mean log-odds."""
    import pandas as pd
    from ..stats import wilson
    rows = []
    for role, rec in records.items():
        for condition, out in rec["conditions"].items():
            for judge in judges:
                labels = [int(label == 1) for label in out["labels"][judge]]  # invalid (-1) is not a refusal
                lo, hi = wilson(sum(labels), len(labels))
                rows.append({"model": role, "arm": arm_of(role), "condition": condition, "judge": judge,
                             "n": len(labels), "refusals": sum(labels), "rate": sum(labels) / len(labels),
                             "lo": lo, "hi": hi, "mean_log_odds": float(np.mean(out["log_odds"]))})
    return pd.DataFrame(rows)


def paired_rates(records: dict, condition: str, a: list[str], b: list[str], judge: str = "project",
                 n_boot: int = 2000, seed: int = 0) -> dict:
    """Refusal rate of models `a` minus models `b` on `condition`, paired by prompt; with several
    models on a side (seeds) each prompt's labels are averaged over them first. 95 % bootstrap interval
    over prompts, sign-flip p (10,000 patterns); McNemar when each side is one model."""
    from ..stats import mcnemar, sign_flip_p, sign_patterns
    refused = lambda m: np.asarray(records[m]["conditions"][condition]["labels"][judge]) == 1  # invalid (-1): no
    la, lb = np.mean([refused(m) for m in a], axis=0), np.mean([refused(m) for m in b], axis=0)
    d = la - lb
    idx = np.random.default_rng(seed).integers(0, len(d), (n_boot, len(d)))
    boot = d[idx].mean(1)
    out = {"condition": condition, "judge": judge, "a": "+".join(a), "b": "+".join(b), "n": len(d),
           "rate_a": la.mean(), "rate_b": lb.mean(), "difference": d.mean(),
           "lo": float(np.quantile(boot, 0.025)), "hi": float(np.quantile(boot, 0.975)),
           "p_sign_flip": sign_flip_p(d, sign_patterns(len(d)))}
    if len(a) == len(b) == 1:
        m = mcnemar(records[a[0]]["conditions"][condition]["labels"][judge],
                    records[b[0]]["conditions"][condition]["labels"][judge])
        out.update({"mcnemar_b": m["b"], "mcnemar_c": m["c"], "p_mcnemar": m["p_value"]})
    return out


def comparisons(records: dict, judge: str = "project") -> "pd.DataFrame":
    """The issue's comparisons: every model vs base on harmless prompts (over-refusal); AT and LAT vs
    SFT (seed by seed, then pooled over seeds) under the attacks and own ablation; LAT vs rand."""
    import pandas as pd
    roles = list(records)
    by_arm = {arm: [r for r in roles if arm_of(r) == arm] for arm in ARMS}
    rows = [paired_rates(records, "harmless", [r], ["base"], judge) for r in roles if r != "base"]
    for condition in ("harmful", "ablated", "pgd_at", "pgd_lat"):
        for arm in ("at", "lat", "rand"):
            for role in by_arm[arm]:
                twin = role.replace(arm + "-", "sft-", 1)
                if twin in records:
                    rows.append(paired_rates(records, condition, [role], [twin], judge))
            if len(by_arm[arm]) > 1 and by_arm["sft"]:
                rows.append(paired_rates(records, condition, by_arm[arm], by_arm["sft"], judge))
        if by_arm["lat"] and by_arm["rand"]:
            rows.append(paired_rates(records, condition, by_arm["lat"], by_arm["rand"], judge))
        for role in by_arm["lat"]:  # LAT against AT of the same seed, then pooled (the paper's LAT vs AT)
            twin = role.replace("lat-", "at-", 1)
            if twin in records:
                rows.append(paired_rates(records, condition, [role], [twin], judge))
        if len(by_arm["lat"]) > 1 and by_arm["at"]:
            rows.append(paired_rates(records, condition, by_arm["lat"], by_arm["at"], judge))
        for arm in ("sft", "at", "lat"):
            if by_arm[arm]:
                rows.append(paired_rates(records, condition, by_arm[arm], ["base"], judge))
    return pd.DataFrame(rows)


def records_from_labels(labels: "pd.DataFrame") -> dict:
    """Per-model records holding only the judged labels, rebuilt from a committed labels.csv (model,
    condition, prompt, project, substring): enough for comparisons() without evaluating again."""
    records = {}
    for model in labels.model.unique():  # the order the tables were written in
        for condition in labels.condition.unique():
            part = labels[(labels.model == model) & (labels.condition == condition)].sort_values("prompt")
            if len(part):
                conditions = records.setdefault(model, {"conditions": {}})["conditions"]
                conditions[condition] = {"labels": {j: part[j].astype(int).tolist() for j in ("project", "substring")}}
    return records


def live_layers(harmful: np.ndarray, harmless: np.ndarray) -> list[int]:
    """Layers whose harmful - harmless differences are not all zero (block 0's input at the read position
    is the same token's embedding for every prompt, so it has no spectrum)."""
    return [layer for layer in range(harmful.shape[1]) if np.abs(harmful[:, layer] - harmless[:, layer]).max() > 0]


def svd_shares(records: dict, k: int = 3) -> "pd.DataFrame":
    """Share of the first k components of the uncentered harmful - harmless differences, every model
    and layer (svd.variance_ratios, the paper's quantity)."""
    import pandas as pd
    from ..svd import variance_ratios
    rows = []
    for role, rec in records.items():
        h, n = rec["acts"]["harmful"].double().numpy(), rec["acts"]["harmless"].double().numpy()
        for layer in live_layers(h, n):
            r = variance_ratios(h[:, layer] - n[:, layer], k)
            rows.append({"model": role, "arm": arm_of(role), "layer": layer, **{f"comp{i + 1}": r[i] for i in range(k)},
                         "first_two": r[0] + r[1]})
    return pd.DataFrame(rows)


def seed_spread(shares: "pd.DataFrame") -> "pd.DataFrame":
    """Per arm and layer: mean, min and max over seeds of each share."""
    cols = ["comp1", "comp2", "first_two"]
    g = shares.groupby(["arm", "layer"])[cols]
    out = g.mean().add_suffix("_mean").join(g.min().add_suffix("_min")).join(g.max().add_suffix("_max"))
    return out.join(shares.groupby(["arm", "layer"]).size().rename("seeds")).reset_index()


def second_component_differences(records: dict, n_boot: int = 1000) -> "pd.DataFrame":
    """LAT - SFT (same seed) and LAT - base differences of the second (and first) component's share at
    every layer, both models resampled with the same prompt pairs (svd.paired_model_differences)."""
    from ..svd import paired_model_differences
    diffs = {}
    for role, rec in records.items():
        h, n = rec["acts"]["harmful"].double().numpy(), rec["acts"]["harmless"].double().numpy()
        for layer in live_layers(h, n):
            diffs[(role, layer)] = h[:, layer] - n[:, layer]
    lats = [r for r in records if arm_of(r) == "lat"]
    pairs = [(r, r.replace("lat-", "sft-", 1)) for r in lats if r.replace("lat-", "sft-", 1) in records]
    pairs += [(r, "base") for r in lats]
    return paired_model_differences(diffs, pairs=pairs, components=(1, 2), n_boot=n_boot)


def transfer_summary(scores: "pd.DataFrame") -> "pd.DataFrame":
    """Mean refusal log-odds per (model, direction_of) minus the model's unablated mean."""
    mean = scores.groupby(["model", "direction_of"])["log_odds"].mean().unstack()
    return mean.sub(mean["none"], axis=0).drop(columns="none")


TABLES = ("rates", "comparisons", "svd_shares", "svd_seed_spread", "svd_paired_differences", "transfer_summary",
          "transfer_log_odds", "labels")


def manifest(profile: Profile, rec: Recipe, arms, seeds, settings: EvalSettings) -> dict:
    """What the tables depend on: every adapter's bytes, the recipe's radii, the settings and prompts."""
    from ..store import sha256_file
    arms_p = arms_profile(profile, rec, arms, seeds)
    return {"stage": VERSIONS.get("arms", "arms-v1"), "profile": profile.name, "layer": profile.layer,
            "gen_dtype": arms_p.gen_dtype, "settings": dataclasses.asdict(settings),
            "epsilon": {"at": arm_epsilon_value(rec, "at"), "lat": arm_epsilon_value(rec, "lat")},
            "prompts": stable_hash(eval_prompts(settings)),
            "adapters": {role: sha256_file(Path(spec.adapter) / "adapter_model.safetensors")
                         for role, spec in arms_p.models.items() if spec.adapter}}


def load_tables(folder: Path, want: dict | None = None) -> dict | None:
    """{name: DataFrame} from a folder written by evaluate_arms, or None when a table is missing or
    (with `want`) its manifest.json differs from `want` or does not parse. A committed folder is first
    checked against its sealed manifest (record.verify): an edited or cut table is an error."""
    import pandas as pd
    folder = Path(folder)
    if not all((folder / f"{n}.csv").is_file() for n in TABLES) or not (folder / "manifest.json").is_file():
        return None
    verify(folder)
    if want is not None:
        try:
            stored, want = json.loads((folder / "manifest.json").read_text()), json.loads(json.dumps(want))
        except ValueError:  # a cut manifest: evaluate again rather than trust the tables
            return None
        if not isinstance(stored, dict) or any(stored.get(k) != v for k, v in want.items()):
            return None
    def read(name):
        try:
            return pd.read_csv(folder / f"{name}.csv", index_col=0 if name == "transfer_summary" else None)
        except pd.errors.EmptyDataError:  # e.g. no LAT adapter, so no LAT - SFT differences
            return pd.DataFrame()
    return {n: read(n) for n in TABLES}


def tables_judge(folder: Path) -> str:
    """The judge version whose labels a table folder holds (the `project` column of labels.csv): the method whose
    fingerprint its manifest.json records, or "project_v1" for tables evaluated before the manifest recorded it
    (version 1 was then the project judge)."""
    from ..judges import FITTED
    try:
        recorded = json.loads((Path(folder) / "manifest.json").read_text()).get("judge")
    except (OSError, ValueError):
        recorded = None
    if recorded is None:
        return "project_v1"
    for method in FITTED:
        if fingerprint(method) == recorded:
            return method
    raise ConfigError(f"{folder}: its labels were made by judge {recorded}, which is neither of this checkout's "
                      f"fitted judges; evaluate again (scripts/evaluate_arms.py) so that labels and judge agree")


def rebuild_comparisons(folder: Path, publish: bool = False) -> "pd.DataFrame":
    """comparisons.csv again from the folder's own labels.csv (no model runs): for a table folder whose
    comparisons() gained rows after it was evaluated. A committed folder needs publish=True."""
    folder = Path(folder)
    tables = load_tables(folder)
    if tables is None:
        raise ConfigError(f"{folder} holds no complete set of tables ({', '.join(TABLES)}); evaluate first")
    check_writable(folder, publish, "scripts/evaluate_arms.py")
    table = comparisons(records_from_labels(tables["labels"]))
    atomic_write(folder / "comparisons.csv", table.to_csv(index=False).encode())
    return table


def evaluate_arms(profile: Profile, rec: Recipe, arms, seeds, settings: EvalSettings, out: Path,
                  run: Path | None = None, log=print, publish: bool = False, batched: bool = False) -> dict:
    """Evaluate the base and the <arm>-s<seed> adapter of every arm and seed named (each must be trained),
    write the tables (and manifest.json) into `out` and return them; per-model records are cached under
    runs/, so a rerun only adds what is new. A committed `out` (record.committed) is written only with
    publish=True and only for the recipe's own arms and seeds (the tables the README cites). batched:
    evaluate_model's batched conditions (recorded in manifest.json)."""
    import time
    import pandas as pd
    arms, seeds = check_selection(arms, seeds)
    out = Path(out)
    check_writable(out, publish, "scripts/evaluate_arms.py")
    if publish and (sorted(arms) != sorted(rec.arms) or sorted(seeds) != sorted(training_seeds(rec))):
        raise ConfigError(f"published tables cover the recipe's arms {list(rec.arms)} and seeds {training_seeds(rec)}, "
                          f"not arms {arms} and seeds {seeds}; write a partial evaluation elsewhere (--out <folder>)")
    prompts = eval_prompts(settings)
    arms_p = arms_profile(profile, rec, arms, seeds)
    missing = [arm_folder(a, s) for s in seeds for a in arms if arm_folder(a, s) not in arms_p.models]
    if missing:
        raise ConfigError(f"no trained adapter {missing} in {adapter_root(rec)}; train them first "
                          f"(scripts/train_adapters.py) or name arms and seeds that exist")
    radii = attack_radii(profile, rec, logged_norms([Path(spec.adapter) for spec in arms_p.models.values()
                                                     if spec.adapter]))
    log(f"models: {list(arms_p.models)}; attack radii {radii}")
    records = {}
    for role in arms_p.models:
        started = time.time()
        records[role] = evaluate_model(arms_p, role, prompts, radii, settings, run, batched=batched)
        log(f"{role}: {time.time() - started:.0f} s")
    shares = svd_shares(records)
    scores = transfer_log_odds(arms_p, records, prompts["harmful"], run)
    tables = {"rates": rate_table(records), "comparisons": comparisons(records), "svd_shares": shares,
              "svd_seed_spread": seed_spread(shares), "svd_paired_differences": second_component_differences(records),
              "transfer_summary": transfer_summary(scores), "transfer_log_odds": scores,
              "labels": pd.DataFrame([{"model": role, "condition": c, "prompt": i, "project": p, "substring": s,
                                       "log_odds": round(lo, 4)}
                                      for role, r in records.items() for c, o in r["conditions"].items()
                                      for i, (p, s, lo) in enumerate(zip(o["labels"]["project"], o["labels"]["substring"],
                                                                         o["log_odds"]))])}
    for name, table in tables.items():
        atomic_write(out / f"{name}.csv", table.to_csv(index=name == "transfer_summary").encode())
    written = {**manifest(profile, rec, arms, seeds, settings), "radii": radii, "threads": torch.get_num_threads(),
               "judge": fingerprint("project"), **({"batched": GENERATION_ROWS} if batched else {})}
    atomic_write(out / "manifest.json", (json.dumps(written, indent=1) + "\n").encode())
    return tables
