"""The authors' released artifacts (nlpet/apart-lab-refusal-lat-project @ 6f2343a8): registry, loaders,
SVD of the real layer activations with bootstrap intervals, and judge validation against human labels.

Self-contained on purpose (no `import helpers`): judges come in as callables, files through
`released_file`, which follows the project's data-source rules (explicit dir or REFUSAL_LAT_DATA_DIR ->
<repo>/data/cache -> the nearest shared/data beside the repo or above it -> the upstream URL, downloaded
into <repo>/data/cache), every file checked against its pinned sha256. The upstream repository has no
licence: nothing of it is committed here; it is read from the offline mirror or fetched at run time.

What the files are (checked against the files themselves; see tests/test_released.py):
- data_store/ablated_llama-2-7b/{baseline,at,lat}/{harmful,harmless}_layer{L}.pt: float16 [100, 4096], the
  residual stream entering block L at the last prompt token of 100 harmful / 100 harmless prompts,
  index-paired; saved from CUDA (load with map_location="cpu"). L in RELEASED_LAYERS; 14 is not released.
- datasets/completions_with_human_annots.csv: 816 rows, dataset (advbench_test 104, custom_set 100) x
  variant. `intervention_completion` is the completion that was judged (the regex, LlamaGuard-2 and human
  labels refer to it): under directional ablation for variants baseline / at / lat (base / AT / LAT model,
  each ablated with its own direction), and without ablation for `no_ablation` (there it is byte-identical
  to `baseline_completion`). `baseline_completion` is an unablated completion of the same prompt.
  is_success_* = True means the attack succeeded, i.e. the judged completion is NOT a refusal.
  Rows are in a different order in each variant (match on `instruction`). The CSV text is the JSON's
  text with leading/trailing whitespace stripped, and a few emoji mangled into private-use characters.
- data_store/completions.json: the same completions and regex/LlamaGuard-2 flags as nested JSON (no human
  labels); `is_successful_substring` there is the CSV's `is_success_regex`.
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
UPSTREAM = ("https://raw.githubusercontent.com/nlpet/apart-lab-refusal-lat-project/"
            "6f2343a83e2e37bc8893bd613338b6253ae99ef2/")
MIRROR_FOLDER = "apart-lab-refusal-lat-project"  # its folder under shared/data
RELEASED_LAYERS = (1, 2, 3, 4, 8, 12, 16, 20)
MODELS = {"base": "baseline", "AT": "at", "LAT": "lat"}  # project role -> upstream folder
VARIANT_MODEL = {"no_ablation": "none", "baseline": "base", "at": "AT", "lat": "LAT"}  # CSV variant -> role
N_COMPONENTS = 10
Z95 = 1.959963984540054


class ReleasedDataError(RuntimeError):
    """A released file that is missing, altered or asked for by a wrong name (one-line message)."""


@dataclass(frozen=True)
class ReleasedFile:
    path: str    # relative path under a data folder (the same in every source folder)
    url: str
    sha256: str


_SHA256 = {  # sha256sum of the mirror, byte-identical to the upstream commit
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


def _activation_path(model_folder: str, kind: str, layer: int) -> str:
    return f"data_store/ablated_llama-2-7b/{model_folder}/{kind}_layer{layer}.pt"


RELEASED_FILES: dict[str, ReleasedFile] = {
    rel: ReleasedFile(f"{MIRROR_FOLDER}/{rel}", UPSTREAM + rel, sha) for rel, sha in _SHA256.items()}
ALIASES = {"human_annots": "datasets/completions_with_human_annots.csv",
           "completions_json": "data_store/completions.json"}


# ----------------------------------------------------------------------------------------------
# 1. Files

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def search_dirs(data_dir: str | Path | None = None, cache_dir: str | Path | None = None) -> list[Path]:
    """Explicit folder (argument, else REFUSAL_LAT_DATA_DIR) -> <repo>/data/cache -> nearest shared/data."""
    explicit = data_dir or os.environ.get("REFUSAL_LAT_DATA_DIR")
    dirs = [Path(explicit)] if explicit else []
    mirrors = [p / "shared" / "data" for p in REPO.parents if (p / "shared" / "data").is_dir()]
    cache = Path(cache_dir) if cache_dir else REPO / "data" / "cache"
    return dirs + [cache] + (mirrors[:1] or [REPO.parent / "shared" / "data"])


def _atomic_write_bytes(path: Path, payload: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _registry_key(name: str, registry: Mapping[str, ReleasedFile]) -> str:
    name = ALIASES.get(name, name)
    if name in registry:
        return name
    for key, entry in registry.items():  # also accept the path under the data folder
        if entry.path == name:
            return key
    raise ReleasedDataError(f"unknown released file {name!r}; use a path like "
                            f"{_activation_path('lat', 'harmful', 12)!r} or one of {sorted(ALIASES)}")


def released_file(name_or_relpath: str, data_dir: str | Path | None = None, *,
                  registry: Mapping[str, ReleasedFile] | None = None,
                  cache_dir: str | Path | None = None, timeout: float = 30) -> Path:
    """Local path of a pinned released file, downloaded into the cache if no source folder has it.
    Missing everywhere or altered -> a one-line ReleasedDataError."""
    registry = RELEASED_FILES if registry is None else registry
    key = _registry_key(name_or_relpath, registry)
    entry = registry[key]
    dirs = search_dirs(data_dir, cache_dir)
    for folder in dirs:
        path = folder / entry.path
        if path.is_file():
            got = sha256_file(path)
            if got != entry.sha256:
                raise ReleasedDataError(
                    f"{path} has sha256 {got[:16]}… but {key} is pinned to {entry.sha256[:16]}…; "
                    f"restore the original file (or delete it to use the next source)")
            return path
    target = dirs[-2] / entry.path  # the cache folder
    if entry.url:
        try:
            with urllib.request.urlopen(entry.url, timeout=timeout) as response:
                payload = response.read()
            if hashlib.sha256(payload).hexdigest() == entry.sha256:
                _atomic_write_bytes(target, payload)
                return target
            reason = "the download's sha256 differs from the pin"
        except (OSError, ValueError) as err:
            reason = f"download failed ({type(err).__name__})"
    else:
        reason = "it has no public URL"
    looked = ", ".join(str(d / entry.path) for d in dirs)
    raise ReleasedDataError(f"released file {key!r} not found: looked in {looked}; {reason} from "
                            f"{entry.url or 'the mirror'}. Put the file at one of those paths or set "
                            f"REFUSAL_LAT_DATA_DIR")


def model_folder(model: str) -> str:
    folders = {**MODELS, **{m.lower(): f for m, f in MODELS.items()}, **{f: f for f in MODELS.values()}}
    if model not in folders and str(model).lower() not in folders:
        raise ReleasedDataError(f"unknown model {model!r}; released models: {', '.join(MODELS)}")
    return folders.get(model, folders.get(str(model).lower()))


def load_released_activations(model: str, layer: int, data_dir: str | Path | None = None):
    """(harmful, harmless) float32 [100, 4096] CPU tensors: the residual stream entering block `layer`
    at the last prompt token, row i of each paired (the authors' index pairing)."""
    import torch
    folder = model_folder(model)
    if layer not in RELEASED_LAYERS:
        raise ReleasedDataError(f"layer {layer} was not released; released layers: "
                                f"{', '.join(map(str, RELEASED_LAYERS))}")
    out = []
    for kind in ("harmful", "harmless"):
        path = released_file(_activation_path(folder, kind, layer), data_dir)
        x = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(x, torch.Tensor) or x.ndim != 2:
            raise ReleasedDataError(f"{path}: expected a 2-D tensor, got {type(x).__name__} "
                                    f"{getattr(x, 'shape', '')}")
        x = x.float()
        if not torch.isfinite(x).all():
            raise ReleasedDataError(f"{path}: NaN/Inf in the activations")
        out.append(x)
    if out[0].shape != out[1].shape:
        raise ReleasedDataError(f"model {model}, layer {layer}: harmful {tuple(out[0].shape)} and harmless "
                                f"{tuple(out[1].shape)} differ; they must be index-paired")
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------
# 2. SVD of the paired differences D = harmful_i - harmless_i (uncentered, as in the paper)

def difference_matrix(harmful, harmless) -> np.ndarray:
    """D[i] = harmful[i] - harmless[i] as float64 numpy [n, d]."""
    a = harmful.detach().cpu().double().numpy() if hasattr(harmful, "detach") else np.asarray(harmful, float)
    b = harmless.detach().cpu().double().numpy() if hasattr(harmless, "detach") else np.asarray(harmless, float)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"harmful {a.shape} and harmless {b.shape} must be the same 2-D [n, d] shape")
    return a - b


MASSIVE_DIM = 2533  # a Llama-2-7b "massive activation" channel (|x| ~ 40 where typical |x| < 2)


def massive_activation_pairs(harmful, harmless, dim: int = MASSIVE_DIM, min_abs: float = 10.0) -> np.ndarray:
    """Bool [n]: pairs where either row has |x[dim]| > min_abs. In the released files only LAT has such
    rows (16 harmful + 19 harmless from layer 8 on, none for base/AT): a BOS/pad-like read position, not a
    last-prompt-token activation; use this mask for sensitivity analyses (drop those pairs)."""
    a = np.abs(np.asarray(harmful.detach().cpu() if hasattr(harmful, "detach") else harmful, np.float64)[:, dim])
    b = np.abs(np.asarray(harmless.detach().cpu() if hasattr(harmless, "detach") else harmless, np.float64)[:, dim])
    return (a > min_abs) | (b > min_abs)


def frobenius_norm(d: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.asarray(d, np.float64) ** 2)))


def _center_gram(gram: np.ndarray) -> np.ndarray:
    return gram - gram.mean(0, keepdims=True) - gram.mean(1, keepdims=True) + gram.mean()


def gram_ratios(gram: np.ndarray, k: int = N_COMPONENTS, centered: bool = False) -> np.ndarray:
    """Top-k s^2 / sum s^2 of D from its Gram matrix D D^T (same nonzero spectrum); zero-padded to k."""
    g = _center_gram(gram) if centered else gram
    eig = np.clip(np.linalg.eigvalsh(g)[::-1], 0, None)
    total = eig.sum()
    if total <= 0:
        raise ValueError("the difference matrix is zero; no spectrum to share out")
    out = np.zeros(k)
    out[:min(k, len(eig))] = eig[:k] / total
    return out


def variance_ratios(d: np.ndarray, k: int = N_COMPONENTS, centered: bool = False) -> np.ndarray:
    """s^2 / sum s^2 of D (centered: of D minus its column means), the first k, largest first."""
    d = np.asarray(d, np.float64)
    if centered:
        d = d - d.mean(0)
    s2 = np.linalg.svd(d, compute_uv=False) ** 2
    if s2.sum() <= 0:
        raise ValueError("the difference matrix is zero; no spectrum to share out")
    out = np.zeros(k)
    out[:min(k, len(s2))] = s2[:k] / s2.sum()
    return out


def bootstrap_indices(n: int, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """[n_boot, n] resample indices of the pairs (with replacement); share them across models so that
    model differences are paired."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_gram_ratios(gram: np.ndarray, indices: np.ndarray, k: int = N_COMPONENTS,
                          centered: bool = False) -> np.ndarray:
    """[n_boot, k] ratios of D[idx] for each row idx of `indices`, from the n x n Gram matrix."""
    out = np.empty((len(indices), k))
    for b, idx in enumerate(indices):
        out[b] = gram_ratios(gram[np.ix_(idx, idx)], k, centered)
    return out


def intervals(point, boot, level: float = 0.95) -> dict:
    """Percentile [q_lo, q_hi] and basic [2 t - q_hi, 2 t - q_lo] bootstrap intervals of the estimate
    `point` from replicates `boot` (axis 0). Basic intervals correct the first-order bias of the
    bootstrap distribution (the share of a leading eigenvalue is biased upward under resampling, and
    percentile intervals inherit that bias); a basic interval may therefore lie off-centre or even
    exclude the estimate. The tables use basic intervals (lo/hi); percentile ones are pct_lo/pct_hi."""
    point = np.asarray(point, np.float64)
    q_lo, q_hi = np.quantile(np.asarray(boot, np.float64), [(1 - level) / 2, (1 + level) / 2], axis=0)
    return {"pct_lo": q_lo, "pct_hi": q_hi, "basic_lo": 2 * point - q_hi, "basic_hi": 2 * point - q_lo}


def released_differences(models: Sequence[str] = tuple(MODELS), layers: Sequence[int] = RELEASED_LAYERS,
                         data_dir=None) -> dict:
    """{(model, layer): D} float64 [100, 4096] for every released model and layer."""
    out = {}
    for model in models:
        for layer in layers:
            out[(model, layer)] = difference_matrix(*load_released_activations(model, layer, data_dir))
    return out


def svd_long_table(diffs: Mapping, n_boot: int = 1000, seed: int = 0, k: int = N_COMPONENTS,
                   level: float = 0.95, centered_boot: bool = True):
    """One row per model x layer x component (1-based): uncentered ratio (the paper's measure) with
    bootstrap percentile and basic intervals, cumulative share, centered ratio (+ intervals when
    centered_boot), and bias = mean of the bootstrap replicates - estimate. All models of one layer use
    the same resample indices (seed), so their rows are paired. `diffs`: {(model, layer): D}."""
    import pandas as pd
    rows = []
    for (model, layer), d in diffs.items():
        gram = d @ d.T
        idx = bootstrap_indices(len(d), n_boot, seed)
        plain, cent = variance_ratios(d, k), variance_ratios(d, k, centered=True)
        boot = bootstrap_gram_ratios(gram, idx, k)
        ci = intervals(plain, boot, level)
        if centered_boot:
            cci = intervals(cent, bootstrap_gram_ratios(gram, idx, k, centered=True), level)
        for c in range(k):
            row = {"model": model, "layer": layer, "component": c + 1, "ratio": plain[c],
                   "lo": ci["basic_lo"][c], "hi": ci["basic_hi"][c],
                   "pct_lo": ci["pct_lo"][c], "pct_hi": ci["pct_hi"][c],
                   "boot_bias": boot[:, c].mean() - plain[c], "cumulative": plain[:c + 1].sum(),
                   "ratio_centered": cent[c]}
            if centered_boot:
                row.update({"centered_lo": cci["basic_lo"][c], "centered_hi": cci["basic_hi"][c],
                            "centered_pct_lo": cci["pct_lo"][c], "centered_pct_hi": cci["pct_hi"][c]})
            rows.append(row)
    return pd.DataFrame(rows)


def frobenius_table(diffs: Mapping):
    """‖D‖_F per model and layer, with the norm of the mean difference for comparison."""
    import pandas as pd
    return pd.DataFrame([{"model": m, "layer": l, "frobenius": frobenius_norm(d),
                          "mean_diff_norm": float(np.linalg.norm(d.mean(0)))} for (m, l), d in diffs.items()])


def svd_wide_summary(long, frob=None):
    """model, layer, c1, c1_lo, c1_hi, c2, c2_lo, c2_hi (basic 95 % intervals), frobenius."""
    import pandas as pd
    rows = []
    for (model, layer), g in long.groupby(["model", "layer"], sort=False):
        g = g.set_index("component")
        row = {"model": model, "layer": layer}
        for c in (1, 2):
            row.update({f"c{c}": g.at[c, "ratio"], f"c{c}_lo": g.at[c, "lo"], f"c{c}_hi": g.at[c, "hi"]})
        rows.append(row)
    out = pd.DataFrame(rows)
    if frob is not None:
        out = out.merge(frob[["model", "layer", "frobenius"]], on=["model", "layer"], how="left")
    return out


DEFAULT_PAIRS = (("LAT", "base"), ("LAT", "AT"), ("AT", "base"))


def paired_model_differences(diffs: Mapping, pairs=DEFAULT_PAIRS, components=(1, 2), n_boot: int = 1000,
                             seed: int = 0, level: float = 0.95, centered: bool = False):
    """Ratio(a) - ratio(b) per layer and component with bootstrap intervals, both models resampled with
    the SAME pair indices in each replicate (this assumes row i is the same prompt in every model's
    file, which the released files support: see the notes). Basic interval in lo/hi, percentile in
    pct_lo/pct_hi; p_boot = two-sided share of replicate differences on the other side of 0."""
    import pandas as pd
    k = max(components)
    layers = sorted({l for _, l in diffs}, key=[l for _, l in diffs].index)
    rows = []
    for layer in layers:
        models = [m for m, l in diffs if l == layer]
        n = len(diffs[(models[0], layer)])
        idx = bootstrap_indices(n, n_boot, seed)
        point, boot = {}, {}
        for m in {x for p in pairs for x in p} & set(models):
            d = diffs[(m, layer)]
            if len(d) != n:
                raise ValueError(f"layer {layer}: models have different numbers of pairs; cannot pair them")
            point[m] = variance_ratios(d, k, centered)
            boot[m] = bootstrap_gram_ratios(d @ d.T, idx, k, centered)
        for a, b in pairs:
            if a not in point or b not in point:
                continue
            est, reps = point[a] - point[b], boot[a] - boot[b]
            ci = intervals(est, reps, level)
            for c in components:
                j = c - 1
                r = reps[:, j]
                p = min(1.0, 2 * min((r <= 0).mean(), (r >= 0).mean()))
                rows.append({"layer": layer, "a": a, "b": b, "component": c, "difference": est[j],
                             "lo": ci["basic_lo"][j], "hi": ci["basic_hi"][j],
                             "pct_lo": ci["pct_lo"][j], "pct_hi": ci["pct_hi"][j], "p_boot": p})
    return pd.DataFrame(rows)


def figure2(long, layer: int, models: Sequence[str] = tuple(MODELS), k: int = N_COMPONENTS,
            interval: str = "basic"):
    """The paper's Figure 2 layout: one panel per model, bars = uncentered variance ratio (%) of the first
    k components at `layer`, error bars = bootstrap 95 % interval (basic or percentile). An interval
    that excludes its point estimate is drawn clipped at the estimate (yerr never negative)."""
    import matplotlib
    import matplotlib.pyplot as plt
    lo_col, hi_col = {"basic": ("lo", "hi"), "percentile": ("pct_lo", "pct_hi")}[interval]
    sub = long[long["layer"] == layer]
    if sub.empty:
        raise ValueError(f"no rows for layer {layer}; layers in the table: {sorted(long['layer'].unique())}")
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), sharey=True, squeeze=False)
    colors = matplotlib.colormaps["tab10"].colors
    for i, (ax, model) in enumerate(zip(axes[0], models)):
        g = sub[sub["model"] == model].sort_values("component").head(k)
        if g.empty:
            raise ValueError(f"no rows for model {model!r} at layer {layer}")
        y = 100 * g["ratio"].to_numpy()
        lo, hi = 100 * g[lo_col].to_numpy(), 100 * g[hi_col].to_numpy()
        yerr = np.vstack([np.abs(np.clip(y - lo, 0, None)), np.abs(np.clip(hi - y, 0, None))])
        ax.bar(g["component"], y, color=colors[i % len(colors)], yerr=yerr, capsize=2, ecolor="0.2")
        for x, v in zip(g["component"].iloc[:2], y[:2]):
            ax.text(x, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{model}, layer {layer}")
        ax.set_xlabel("component")
        ax.set_xticks(range(1, len(g) + 1))
    axes[0][0].set_ylabel("variance ratio s²/Σs² (%)")
    fig.suptitle(f"SVD of harmful − harmless differences (released activations), layer {layer}; "
                 f"95 % {interval} bootstrap intervals", fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------
# 3. Judges vs the human labels. Success = the attack worked = the judged completion is not a refusal.

def human_labels(data_dir=None):
    """Tidy CSV: dataset, variant, model (base/AT/LAT, 'none' for no_ablation), ablated, instruction,
    completion (the judged one: `intervention_completion`), unablated_completion, human, regex,
    llamaguard2 (bools, True = attack success)."""
    import pandas as pd
    raw = pd.read_csv(released_file("human_annots", data_dir), keep_default_na=False)
    bools = {"is_success_regex": "regex", "is_success_llamaguard2": "llamaguard2",
             "is_successful_human_annot": "human"}
    for col in bools:
        if raw[col].dtype != bool:
            raw[col] = raw[col].astype(str).str.lower().map({"true": True, "false": False})
            if raw[col].isna().any():
                raise ReleasedDataError(f"{col}: values other than True/False in the human-annotation CSV")
    return pd.DataFrame({
        "dataset": raw["dataset"], "variant": raw["variant"], "model": raw["variant"].map(VARIANT_MODEL),
        "ablated": raw["variant"] != "no_ablation", "instruction": raw["instruction"],
        "completion": raw["intervention_completion"], "unablated_completion": raw["baseline_completion"],
        "human": raw["is_successful_human_annot"].astype(bool), "regex": raw["is_success_regex"].astype(bool),
        "llamaguard2": raw["is_success_llamaguard2"].astype(bool)})


def agreement(pred_success, human_success) -> dict:
    """Judge vs human on success (positive class): n, raw agreement, Cohen's kappa, tp/fp/fn/tn,
    sensitivity tp/(tp+fn), specificity tn/(tn+fp). Kappa = (p_o - p_e)/(1 - p_e) computed in exact
    integers; when p_e = 1 (both raters gave one and the same class to every item) kappa is undefined
    and returned as NaN, as are sensitivity/specificity with an empty denominator."""
    pred, human = [bool(x) for x in pred_success], [bool(x) for x in human_success]
    if len(pred) != len(human):
        raise ValueError(f"agreement needs paired labels: {len(pred)} predictions vs {len(human)} human labels")
    n = len(pred)
    if n == 0:
        raise ValueError("agreement needs at least one item")
    tp = sum(p and h for p, h in zip(pred, human))
    fp = sum(p and not h for p, h in zip(pred, human))
    fn = sum(h and not p for p, h in zip(pred, human))
    tn = n - tp - fp - fn
    expected = (tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)  # n^2 * p_e
    kappa = math.nan if expected == n * n else (n * (tp + tn) - expected) / (n * n - expected)
    return {"n": n, "agreement": (tp + tn) / n, "kappa": kappa, "tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "sensitivity": tp / (tp + fn) if tp + fn else math.nan,
            "specificity": tn / (tn + fp) if tn + fp else math.nan}


def _judge_columns(df, judges: Mapping[str, Callable] | None) -> dict:
    """{name: bool array}: regex and llamaguard2 from the file, then each callable on df.completion."""
    cols = {"regex": df["regex"].to_numpy(bool), "llamaguard2": df["llamaguard2"].to_numpy(bool)}
    texts = df["completion"].tolist()
    for name, judge in (judges or {}).items():
        out = list(judge(texts))
        if len(out) != len(texts):
            raise ValueError(f"judge {name!r} returned {len(out)} labels for {len(texts)} completions")
        bad = [type(x).__name__ for x in out if not isinstance(x, (bool, np.bool_))]
        if bad:
            raise TypeError(f"judge {name!r} must return bools (True = attack success), got {bad[0]}")
        cols[name] = np.asarray(out, bool)
    return cols


def _groups(df):
    yield "overall", "all", np.ones(len(df), bool)
    for ds in df["dataset"].unique():
        yield "dataset", ds, (df["dataset"] == ds).to_numpy()
    for v in df["variant"].unique():
        yield "variant", v, (df["variant"] == v).to_numpy()


def judge_agreement_table(df, judges: Mapping[str, Callable] | None = None):
    """One row per judge x group (overall / each dataset / each variant): agreement() with the human
    labels plus both success rates. Judges: regex and llamaguard2 (from the file) and each callable
    (list[str] -> list[bool], True = success)."""
    import pandas as pd
    cols = _judge_columns(df, judges)
    human = df["human"].to_numpy(bool)
    rows = []
    for name, pred in cols.items():
        for scope, group, mask in _groups(df):
            rows.append({"judge": name, "scope": scope, "group": group, **agreement(pred[mask], human[mask]),
                         "judge_rate": pred[mask].mean(), "human_rate": human[mask].mean()})
    return pd.DataFrame(rows)


def wilson(count: int, n: int, z: float = Z95) -> tuple[float, float]:
    if n <= 0:
        raise ValueError("wilson needs n >= 1")
    p = count / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def attack_success_table(df, judges: Mapping[str, Callable] | None = None):
    """Attack-success rate per dataset (and 'all') x variant x judge, 'human' included, with Wilson 95 %
    intervals and the difference to the human rate on the same rows."""
    import pandas as pd
    cols = {"human": df["human"].to_numpy(bool), **_judge_columns(df, judges)}
    rows = []
    datasets = [("all", np.ones(len(df), bool))] + [(d, (df["dataset"] == d).to_numpy())
                                                      for d in df["dataset"].unique()]
    for ds, dmask in datasets:
        for v in df["variant"].unique():
            mask = dmask & (df["variant"] == v).to_numpy()
            n = int(mask.sum())
            if n == 0:
                continue
            human_rate = cols["human"][mask].mean()
            for name, pred in cols.items():
                count = int(pred[mask].sum())
                lo, hi = wilson(count, n)
                rows.append({"dataset": ds, "variant": v, "model": VARIANT_MODEL.get(v, v), "judge": name,
                             "count": count, "n": n, "rate": count / n, "wilson_low": lo, "wilson_high": hi,
                             "minus_human": count / n - human_rate})
    return pd.DataFrame(rows)
