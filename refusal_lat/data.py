"""Datasets and prompt sets. Files are resolved from an explicit folder, the repo's data/cache, an
offline mirror next to the repository, or the canonical URL, in that order; every file is checked
against its sha256 (docs/method.md, "Splits")."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import REPO, ConfigError, DataError, Profile
from .store import atomic_write, sha256_file


@dataclass(frozen=True)
class DataFile:
    path: str        # relative path, the same under every source folder
    url: str
    sha256: str


_RD = "https://raw.githubusercontent.com/andyrdt/refusal_direction/9d852fae1a9121c78b29142de733cb1340770cc3/"
_APART = "https://raw.githubusercontent.com/nlpet/apart-lab-refusal-lat-project/6f2343a83e2e37bc8893bd613338b6253ae99ef2/"
DATA_FILES = {
    "advbench": DataFile("refusal_direction/dataset/raw/advbench.csv", _RD + "dataset/raw/advbench.csv",
                         "6cd1a5c63c07610d7eb67307772ee5606017ee950b5770ab288a2c487489d3e1"),
    "alpaca": DataFile("refusal_direction/dataset/processed/alpaca.json", _RD + "dataset/processed/alpaca.json",
                       "c4ce1bdc5c9b92caabcb171c27c7ec1e79832836bae10291d7c8ab8c6245f600"),
    "gpt4o": DataFile("apart-lab-refusal-lat-project/datasets/adversarial_questions_gpt4o.json",
                      _APART + "datasets/adversarial_questions_gpt4o.json",
                      "bad70a894f83f77abe4bd4a929df319b12d923c76eb18863d4950c182ff8d8ca"),
}
for _split in ("harmful_train", "harmful_val", "harmful_test", "harmless_train", "harmless_val", "harmless_test"):
    DATA_FILES[f"rd_{_split}"] = DataFile(f"refusal_direction/dataset/splits/{_split}.json",
                                          _RD + f"dataset/splits/{_split}.json", "")
DATA_FILES.update({  # sha256 of the refusal_direction split files at commit 9d852fae
    k: dataclasses.replace(DATA_FILES[k], sha256=s) for k, s in {
        "rd_harmful_train": "8f5c0eac0efd2a7f99084bbe8d0de2c465e31b1997184783c917969d9de9ece1",
        "rd_harmful_val": "305f1d1e6dfa6c50a32d24a18ef815f42b5441eb83e6d7767d242107162fd9f4",
        "rd_harmful_test": "5e12ae102c3791dee083a69ab6269a78e033411c629bc3f66f75d2fde196d9ef",
        "rd_harmless_train": "86623b1f8a25aa35df153fc97a556dbcebb6a7c881538ae43ee479ca17f2e002",
        "rd_harmless_val": "772010758e7d771ef4c7e5e4acdfd7598dcece1a6f383f20d382f640913a2a4d",
        "rd_harmless_test": "1b5930ce5e855ada758b3116ce7c4aaea9b9d05f8cdd77b385511d4c84173b19",
    }.items()})


def data_search_dirs(data_dir: str | Path | None = None) -> list[Path]:
    explicit = data_dir or os.environ.get("REFUSAL_LAT_DATA_DIR")
    if explicit and not Path(explicit).is_dir():  # an explicit setting that cannot be used is an error
        what = "data_dir" if data_dir else "REFUSAL_LAT_DATA_DIR"
        state = "is a file" if Path(explicit).exists() else "does not exist"
        raise DataError(f"{what}={explicit} {state}; point it at the folder that holds refusal_direction/ and "
                        f"apart-lab-refusal-lat-project/, or unset it")
    dirs = [Path(explicit)] if explicit else []
    mirrors = [p / "shared" / "data" for p in REPO.parents if (p / "shared" / "data").is_dir()]  # a mirror beside the repo
    return dirs + [REPO / "data" / "cache"] + (mirrors[:1] or [REPO.parent / "shared" / "data"])


def data_file(name: str, data_dir: str | Path | None = None) -> Path:
    """Path of a pinned dataset file; a missing or altered file is a one-line DataError. A folder named
    explicitly (data_dir or REFUSAL_LAT_DATA_DIR) must hold the file: it is not skipped silently."""
    if name not in DATA_FILES:
        raise DataError(f"unknown dataset {name!r}; known: {sorted(DATA_FILES)}")
    entry = DATA_FILES[name]
    dirs = data_search_dirs(data_dir)
    if (data_dir or os.environ.get("REFUSAL_LAT_DATA_DIR")) and not (dirs[0] / entry.path).is_file():
        what = "data_dir" if data_dir else "REFUSAL_LAT_DATA_DIR"
        raise DataError(f"{what}={dirs[0]} has no {entry.path} (dataset {name!r}); put the file there "
                        f"or unset {what} to use the other sources")
    for folder in dirs:
        path = folder / entry.path
        if path.is_file():
            got = sha256_file(path)
            if got != entry.sha256:
                raise DataError(f"{path} has sha256 {got[:16]}… but {name} is pinned to {entry.sha256[:16]}…; "
                                f"restore the original file (or delete it to use the next source)")
            return path
    target = REPO / "data" / "cache" / entry.path
    if entry.url:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(entry.url, timeout=20) as response:
                payload = response.read()
            if hashlib.sha256(payload).hexdigest() == entry.sha256:
                atomic_write(target, payload)
                return target
            reason = "the download's sha256 differs from the pin"
        except OSError as err:
            reason = f"download failed ({type(err).__name__})"
    else:
        reason = "it has no public URL"
    looked = ", ".join(str(d / entry.path) for d in dirs)
    raise DataError(f"dataset {name!r} not found: looked in {looked}; {reason} from {entry.url or 'the mirror'}. "
                    f"Put the file at one of those paths or set REFUSAL_LAT_DATA_DIR")


def _read_instructions(name: str, data_dir=None) -> list[str]:
    path = data_file(name, data_dir)
    if path.suffix == ".csv":
        import pandas as pd
        return pd.read_csv(path)["goal"].tolist()
    rows = json.loads(path.read_text())
    return [r["instruction"] if isinstance(r, dict) else r for r in rows]


def paper_splits(data_dir=None) -> dict[str, list[str]]:
    """The paper's splits (docs/method.md, "Splits"): AdvBench goals and Alpaca (empty input) instructions, each
    split with train_test_split(test_size=0.2, random_state=42); a pure function of file content."""
    from sklearn.model_selection import train_test_split
    harmful_train, harmful_test = train_test_split(_read_instructions("advbench", data_dir), test_size=0.2, random_state=42)
    harmless_train, harmless_test = train_test_split(_read_instructions("alpaca", data_dir), test_size=0.2, random_state=42)
    return {"harmful_train": harmful_train, "harmful_test": harmful_test,
            "harmless_train": harmless_train, "harmless_test": harmless_test,
            "gpt4o": _read_instructions("gpt4o", data_dir)}


def refusal_direction_splits(data_dir=None) -> dict[str, list[str]]:
    """Arditi et al.'s shipped splits (harmful/harmless x train/val/test), for robustness checks."""
    return {k[3:]: _read_instructions(k, data_dir) for k in DATA_FILES if k.startswith("rd_")}


@dataclass(frozen=True)
class PromptSets:
    harmful: list          # direction set, paired by index with `harmless`
    harmless: list
    eval: list             # harmful evaluation prompts
    eval_source: list      # "advbench_train" | "advbench_test" | "gpt4o" per eval prompt

    def as_dict(self) -> dict[str, list[str]]:
        return {"harmful": self.harmful, "harmless": self.harmless, "eval": self.eval}


def evenly_spaced(n_total: int, n: int) -> list[int]:
    """Deterministic subset that keeps the order and covers the whole list (all eval sources)."""
    return sorted(set(np.round(np.linspace(0, n_total - 1, n)).astype(int).tolist()))


def prompt_sets(profile: Profile, data_dir=None) -> PromptSets:
    """Direction set = first n_direction of each train split; eval = harmful_train[100:] +
    harmful_test + GPT-4o questions (520), evenly subsampled to n_eval for smaller profiles."""
    s = paper_splits(data_dir)
    n = profile.n_direction
    if n > 100:
        raise ConfigError(f"n_direction={n} would overlap the eval set (harmful_train[100:]); use <= 100")
    pool = s["harmful_train"][100:] + s["harmful_test"] + s["gpt4o"]
    sources = (["advbench_train"] * len(s["harmful_train"][100:]) + ["advbench_test"] * len(s["harmful_test"])
               + ["gpt4o"] * len(s["gpt4o"]))
    keep = evenly_spaced(len(pool), profile.n_eval)
    return PromptSets(harmful=s["harmful_train"][:n], harmless=s["harmless_train"][:n],
                      eval=[pool[i] for i in keep], eval_source=[sources[i] for i in keep])


def truncate(text: str, n: int = 40) -> str:
    """For showing harmful prompts: enough to recognise, not enough to use."""
    return text if len(text) <= n else text[:n].rstrip() + "…"


def require_prompts(instructions: list[str], what: str = ""):
    if not instructions:
        raise ConfigError(f"empty prompt list{' for ' + what if what else ''}: nothing to run; "
                          f"check the dataset sizes (n_direction, n_eval, n_sweep, n_val) in the profile")


def validation_sets(profile: Profile) -> dict[str, list[str]]:
    """Held-out prompts for selection and harmless checks, disjoint from the direction/eval sets:
    refusal_direction's harmful_val (HarmBench) and harmless_val (Alpaca), and Alpaca test prompts."""
    sets, rd, splits = prompt_sets(profile), refusal_direction_splits(), paper_splits()
    used = set(sets.harmful) | set(sets.harmless) | set(sets.eval)
    harmful_val = [p for p in rd["harmful_val"] if p not in used][:profile.n_val]
    harmless_val = [p for p in rd["harmless_val"] if p not in used][:profile.n_val]
    harmless_test = splits["harmless_test"]
    check = [harmless_test[i] for i in evenly_spaced(len(harmless_test), profile.n_harmless_check)]
    return {"harmful_val": harmful_val, "harmless_val": harmless_val, "harmless_check": check}
