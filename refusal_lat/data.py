"""Datasets and prompt sets. Files are resolved from an explicit folder, the repo's data/cache, an
offline mirror beside the repository (../shared/data), or the canonical URL, in that order; every file is checked
against its sha256 (docs/method.md, "Splits")."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import urllib.request
from dataclasses import dataclass
from functools import lru_cache
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


# The authors' released Llama-2-7b artifacts (refusal_lat/released.py reads them; docs/method.md, "The
# authors' released data"): the residual stream entering block L at the last prompt token, float16 [100, 4096],
# of 100 harmful / 100 harmless prompts for base/AT/LAT at RELEASED_LAYERS, and 816 human-labelled completions.
RELEASED_LAYERS = (1, 2, 3, 4, 8, 12, 16, 20)
_RELEASED_SHA256 = {  # sha256 of the authors' released files at commit 6f2343a8 (issue 18)
    "data_store/ablated_llama-2-7b/at/harmful_layer1.pt": "cb11513599ced996b976bfbdad3b0d36c53de31b10968a835216f75ede415688",
    "data_store/ablated_llama-2-7b/at/harmful_layer12.pt": "260d42f5f803d2e86896fba67a97a9990818f8563aacf1b9ed94e6af697adff7",
    "data_store/ablated_llama-2-7b/at/harmful_layer16.pt": "d1d81a12d13959108fc47179028c4c29dcd2b6cab7b012dd7181845195bd9bcc",
    "data_store/ablated_llama-2-7b/at/harmful_layer2.pt": "04c7a4366b1843634b8d4dfb80f1c8de511756348b79d1d526a63f386c513a0c",
    "data_store/ablated_llama-2-7b/at/harmful_layer20.pt": "969b965e3cb2235c48013875a9e2909b8611737440d2bdf1822a24b7e00c9a9d",
    "data_store/ablated_llama-2-7b/at/harmful_layer3.pt": "b3e40b39064a253aeadadd81b05bdcec32c2ff8abc5192a72b4688dbfd99d6cd",
    "data_store/ablated_llama-2-7b/at/harmful_layer4.pt": "654aa133bad7669cde5a34c9af58c66746a2ac5d2e95655290b091faeb0a5eee",
    "data_store/ablated_llama-2-7b/at/harmful_layer8.pt": "6be104f5b3f2ca157c558d09e43d16262579958d7e75d01a1c5ecb359b7496f8",
    "data_store/ablated_llama-2-7b/at/harmless_layer1.pt": "0e98eb9f36d3256aa18776e9a28c784ee0d1e1b6ec7308f90452e1cde3461a95",
    "data_store/ablated_llama-2-7b/at/harmless_layer12.pt": "51a3413610c29d7fb3f951dd29b014b2d868a0772037e009042d0dab06d95b62",
    "data_store/ablated_llama-2-7b/at/harmless_layer16.pt": "c9d4377dcd6fa259743aba987c3df4aa98f03d47c2d37fdb4140995ded1d9520",
    "data_store/ablated_llama-2-7b/at/harmless_layer2.pt": "fb5f37abc24453e956d0d69480ac6f8e68148b2e18772a14bbd466694e139e39",
    "data_store/ablated_llama-2-7b/at/harmless_layer20.pt": "2b85c2747b99047a7ceed03d46492eec6ce111f370719579ac2d3464b9532b27",
    "data_store/ablated_llama-2-7b/at/harmless_layer3.pt": "243b29858dbbfa90af57223f16c995c8250ee1936fee0062a86a6b1380539363",
    "data_store/ablated_llama-2-7b/at/harmless_layer4.pt": "fddf1763d58652a1fea796960608109bb4db446a42d91de0673a9e60ef12a4b8",
    "data_store/ablated_llama-2-7b/at/harmless_layer8.pt": "6f7fa0ca6918010056ead9c2f9381de6499a7d46fe88e73bd4fea56bc7d1db6f",
    "data_store/ablated_llama-2-7b/baseline/harmful_layer1.pt": "971796ffcab02ac3d109e19268608fa10b488e775981fe35de368e02aec74dc5",
    "data_store/ablated_llama-2-7b/baseline/harmful_layer12.pt": "7ee6539f8525274fa016fbbec53e318bc1cabbd7e2747d110d281c3f9ada1121",
    "data_store/ablated_llama-2-7b/baseline/harmful_layer16.pt": "54268a827f79832d7ab762c666a450fb4edd515c5c642a8980f7e93d9d139801",
    "data_store/ablated_llama-2-7b/baseline/harmful_layer2.pt": "2cc2e4d59b5c3a5cbc9a829feefa54fb3a1dee157d0d0701b87ab9a364daa8aa",
    "data_store/ablated_llama-2-7b/baseline/harmful_layer20.pt": "b3d3e7675957fb59705de5fe556f42458e2136a9d0bee64a18d72653730f70e7",
    "data_store/ablated_llama-2-7b/baseline/harmful_layer3.pt": "dac342722994c54c0f58b86ad32dec9a9e3c247c1359d643a21e0180ac1d126c",
    "data_store/ablated_llama-2-7b/baseline/harmful_layer4.pt": "9a25ee485c53bd9379484af9d9f348c6adedde4dd04f52c55b06004f2ebcfc8e",
    "data_store/ablated_llama-2-7b/baseline/harmful_layer8.pt": "82beeb5dfed8916303237098aac49b4bb0b4f1154cc1123154fcc8d5b2af3428",
    "data_store/ablated_llama-2-7b/baseline/harmless_layer1.pt": "8525d475c530f792ce8f167d346af70df38077e6be4fe1fb28d0f4d0462b0812",
    "data_store/ablated_llama-2-7b/baseline/harmless_layer12.pt": "9fc868632f2640c91fe01248ccbed3de56d8cb81e70a3b9f72cf983529624227",
    "data_store/ablated_llama-2-7b/baseline/harmless_layer16.pt": "4dbb3f5fed7e7583e4ecc3042946e0fcdaad985c765e1dd43a5a04482efbc48f",
    "data_store/ablated_llama-2-7b/baseline/harmless_layer2.pt": "d0d0bed3650709b3c972b905d3462ad27ed82dc646f9a41a7966bbc45b13cab5",
    "data_store/ablated_llama-2-7b/baseline/harmless_layer20.pt": "810545c087f243cd1b81dd93990a38d3b5a736e87a3bda59516423ae82c6467d",
    "data_store/ablated_llama-2-7b/baseline/harmless_layer3.pt": "06bf95e6a522206316ec57af6364bb20e3f387b7ca153006679f9c9fe72cafc8",
    "data_store/ablated_llama-2-7b/baseline/harmless_layer4.pt": "1bf4945797b9167a2015f6cd2682cbe0c1555a5f31037525b422fce8f8b2423f",
    "data_store/ablated_llama-2-7b/baseline/harmless_layer8.pt": "f7a591a2a57ff8b646c254be6b41ff47a62345f2e7d9cbd18a5ec8202165bbda",
    "data_store/ablated_llama-2-7b/lat/harmful_layer1.pt": "3c06b4a43e5ef788eebd352af5413998d2031b66028b6a7da6c3ee9c8758749b",
    "data_store/ablated_llama-2-7b/lat/harmful_layer12.pt": "5278edc7eedaabbe436bc21d2461c1ab65bbc9825f4d3de013c3b0e654264648",
    "data_store/ablated_llama-2-7b/lat/harmful_layer16.pt": "d9bcb42e0b5c9e0ee2b1ec41675fc1207e61466387de2135602fe3b7918c696f",
    "data_store/ablated_llama-2-7b/lat/harmful_layer2.pt": "c21df658860817cbee8ba2070d0b3cb7feb6347c962fa0472e3960def1c0f819",
    "data_store/ablated_llama-2-7b/lat/harmful_layer20.pt": "47070dbed8352566d2b600fc9651aa906fbad31121a641adb0ed769baf25d602",
    "data_store/ablated_llama-2-7b/lat/harmful_layer3.pt": "66c759e5f00795e3859d36d0d62d3bccbce391bdd7305b960547749c5927d2f5",
    "data_store/ablated_llama-2-7b/lat/harmful_layer4.pt": "e81e9d184143dbbad18fe2d61cfccdbc8327c4d0065b02ec66356e13b3d549a4",
    "data_store/ablated_llama-2-7b/lat/harmful_layer8.pt": "75e06e8c63158f769b6964b5f15328a17789cb51672e5a694140f7c2c95eebfa",
    "data_store/ablated_llama-2-7b/lat/harmless_layer1.pt": "b314bb760f155d498e5b7d18db168d1f1128e3ffc37e799ee0d8665dc90d3136",
    "data_store/ablated_llama-2-7b/lat/harmless_layer12.pt": "525a1f6c8e8f4fb1548efbf5141d27b9dbed665c37f2abac4faf9ed781ee1b22",
    "data_store/ablated_llama-2-7b/lat/harmless_layer16.pt": "13738b45b835b276ad6b5282164602bc237a4837d92fcec3b5a0cbbbb25a61a4",
    "data_store/ablated_llama-2-7b/lat/harmless_layer2.pt": "566ccb77d211bf1dd073b33e4c02368fb6fba396e0a5c351c67fa209c188d3b9",
    "data_store/ablated_llama-2-7b/lat/harmless_layer20.pt": "3837377a5f124ae66a00fbd6ec741558ce14223cea918909feeb94c1cd6b7944",
    "data_store/ablated_llama-2-7b/lat/harmless_layer3.pt": "f08bfbacc6afd14c040f22b522f78f4a92f093bdd3fe255f0a24789a54ac4b95",
    "data_store/ablated_llama-2-7b/lat/harmless_layer4.pt": "c752b9f62325fd5b472b3e623d3c5768799e0290dd6bbd4182a37e8e19d44bbe",
    "data_store/ablated_llama-2-7b/lat/harmless_layer8.pt": "efe8f437ac18e3a9f53ce94ce687d80c2721d88187461709c59bc204d77957dc",
    "data_store/completions.json": "23d9f10b1ffa465b98de9fb5aa1c8ee107f70213566219ff0537e96fd0f882e2",
    "datasets/completions_with_human_annots.csv": "b4fde36dd6c0ff8ccb75d68a1843674a92ef54e1c76faef8425a2e496bb4ce30",
}


def released_key(model_folder: str, kind: str, layer: int) -> str:
    """DATA_FILES name of one released activation file, e.g. released_acts/lat/harmful_layer12."""
    return f"released_acts/{model_folder}/{kind}_layer{layer}"


for _rel, _sha in _RELEASED_SHA256.items():
    _m = re.fullmatch(r"data_store/ablated_llama-2-7b/(\w+)/(\w+)_layer(\d+)\.pt", _rel)
    _name = released_key(_m[1], _m[2], int(_m[3])) if _m else {
        "datasets/completions_with_human_annots.csv": "released_human_annots",
        "data_store/completions.json": "released_completions_json"}[_rel]
    DATA_FILES[_name] = DataFile(f"apart-lab-refusal-lat-project/{_rel}", _APART + _rel, _sha)


def data_search_dirs(data_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> list[Path]:
    """Explicit folder (argument, else REFUSAL_LAT_DATA_DIR) -> the cache (<repo>/data/cache) -> the mirror
    beside the repository (<repo>/../shared/data). No other folder is searched: what lies above the
    repository does not change what it reads."""
    explicit = data_dir or os.environ.get("REFUSAL_LAT_DATA_DIR")
    if explicit and not Path(explicit).is_dir():  # an explicit setting that cannot be used is an error
        what = "data_dir" if data_dir else "REFUSAL_LAT_DATA_DIR"
        state = "is a file" if Path(explicit).exists() else "does not exist"
        raise DataError(f"{what}={explicit} {state}; point it at the folder that holds refusal_direction/ and "
                        f"apart-lab-refusal-lat-project/, or unset it")
    dirs = [Path(explicit)] if explicit else []
    cache = Path(cache_dir) if cache_dir else REPO / "data" / "cache"
    return dirs + [cache, REPO.parent / "shared" / "data"]


def data_file(name: str, data_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> Path:
    """Path of a pinned file of DATA_FILES (downloaded into the cache if no source folder has it);
    a missing or altered file is a one-line DataError. A folder named explicitly (data_dir or
    REFUSAL_LAT_DATA_DIR) must hold the file: it is not skipped silently."""
    if name not in DATA_FILES:
        close = sorted(k for k in DATA_FILES if not k.startswith("released_acts/"))
        raise DataError(f"unknown data file {name!r}; known: {close} and released_key(model, kind, layer)")
    entry = DATA_FILES[name]
    dirs = data_search_dirs(data_dir, cache_dir)
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
    target = dirs[-2] / entry.path  # the cache
    if entry.url:
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with urllib.request.urlopen(entry.url, timeout=20) as response:
                payload = response.read()
            if hashlib.sha256(payload).hexdigest() == entry.sha256:
                atomic_write(target, payload)
                return target
            reason = "the download's sha256 differs from the pin"
        except (OSError, ValueError) as err:
            reason = f"download failed ({type(err).__name__})"
    else:
        reason = "it has no public URL"
    looked = ", ".join(str(d / entry.path) for d in dirs)
    raise DataError(f"data file {name!r} not found: looked in {looked}; {reason} from {entry.url or 'the mirror'}. "
                    f"Put the file at one of those paths or set REFUSAL_LAT_DATA_DIR")


def _read_instructions(name: str, data_dir=None) -> list[str]:
    return list(_parse_instructions(data_file(name, data_dir), DATA_FILES[name].sha256))


@lru_cache(maxsize=None)
def _parse_instructions(path: Path, sha256: str) -> tuple[str, ...]:
    """The instructions in a file that data_file has checked against `sha256`: the same bytes are parsed
    once per process (Alpaca's 4 MB of JSON takes ~50 ms, and paper_splits is called often)."""
    if path.suffix == ".csv":
        import pandas as pd
        return tuple(pd.read_csv(path)["goal"].tolist())
    rows = json.loads(path.read_text())
    return tuple(r["instruction"] if isinstance(r, dict) else r for r in rows)


def train_test_split(items: list, test_size: float = 0.2, seed: int = 42) -> tuple[list, list]:
    """sklearn.model_selection.train_test_split(items, test_size=test_size, random_state=seed), the same
    lists in the same order (its ShuffleSplit: one permutation of RandomState(seed), the first
    ceil(test_size * n) indices are the test split), without importing scikit-learn (~2 s)."""
    order = np.random.RandomState(seed).permutation(len(items))
    n_test = math.ceil(test_size * len(items))
    return [items[i] for i in order[n_test:]], [items[i] for i in order[:n_test]]


def paper_splits(data_dir=None) -> dict[str, list[str]]:
    """The paper's splits (docs/method.md, "Splits"): AdvBench goals and Alpaca (empty input) instructions, each
    split with train_test_split(test_size=0.2, random_state=42); a pure function of file content."""
    harmful_train, harmful_test = train_test_split(_read_instructions("advbench", data_dir))
    harmless_train, harmless_test = train_test_split(_read_instructions("alpaca", data_dir))
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
    prompts, sources = eval_pool(profile.n_eval, data_dir)
    return PromptSets(harmful=s["harmful_train"][:n], harmless=s["harmless_train"][:n], eval=prompts, eval_source=sources)


def eval_pool(n: int = 520, data_dir=None) -> tuple[list[str], list[str]]:
    """(prompts, sources): n evenly spaced prompts of the paper's 520 harmful eval prompts
    (harmful_train[100:] + harmful_test + GPT-4o questions) and where each comes from."""
    s = paper_splits(data_dir)
    pool = s["harmful_train"][100:] + s["harmful_test"] + s["gpt4o"]
    sources = (["advbench_train"] * len(s["harmful_train"][100:]) + ["advbench_test"] * len(s["harmful_test"])
               + ["gpt4o"] * len(s["gpt4o"]))
    keep = evenly_spaced(len(pool), n)
    return [pool[i] for i in keep], [sources[i] for i in keep]


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
