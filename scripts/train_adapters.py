"""Train the SFT / AT / LAT / rand LoRA adapters of a profile (training.py) and record how they were made.

    python scripts/train_adapters.py --profile cpu --arms sft at lat rand --seeds 0 1 --jobs 2 --publish
    python scripts/train_adapters.py --profile cpu --check lat-s0        # retrain one, compare bytes
    python scripts/train_adapters.py --profile tiny --set epsilon=0.2 --out /tmp/adapters
    python scripts/train_adapters.py --profile cpu --sweep --jobs 2 --publish   # training v3: every point
    python scripts/train_adapters.py --profile cpu --budget 0.14 --arms lat --seeds 0 --publish
    python scripts/train_adapters.py --profile cpu --budget 0.14 --check lat-s0

Each arm and seed goes to <out>/<arm>-s<seed>/ (default out: the recipe's `adapters` folder): the PEFT
adapter, its training log (JSON + CSV) and COMMAND.txt with the exact command line, the git commit and
the time. <out>/summary.csv has one row per adapter. --jobs N trains N adapters at a time in separate
processes of one torch thread each (the data are built first, once). --check ARM-sSEED retrains that
adapter into a temporary folder and compares its adapter_model.safetensors with the committed one byte
for byte (exit 1 when they differ). The recipe's folder (under adapters/) is committed: training into it
needs --publish, which then seals each adapter folder again (MANIFEST.json, refusal_lat/record.py).
--summary-only rewrites <out>/summary.csv from the adapters already in it (with --publish where committed).
--budget B trains the point B of the profile's budget sweep (`sweep:` in configs/<profile>.yaml,
refusal_lat/training/sweep.py; B = 0 is its SFT point) into <sweep adapters>/eps<B>/; --sweep trains
every point not yet trained, cheapest first, each in its own process (--jobs at a time).
"""
import argparse
import filecmp
import hashlib
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_set(items: list[str]) -> dict:
    """--set key=value (value parsed as YAML 1.2 / JSON: 4 -> int, 010 -> 10, 2.5e-4 -> float, [q_proj] -> list)."""
    from refusal_lat.config import ConfigError, parse_yaml
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {item!r}")
        if key.strip() in out:
            raise ConfigError(f"--set names {key.strip()!r} twice; keep one")
        out[key.strip()] = parse_yaml(value, f"--set {key.strip()}")
    return out


def git_state() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    return commit + dirty


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_jobs(args, jobs: list[tuple[str, int]]) -> int:
    """Each (arm, seed) in its own process with one torch thread, `args.jobs` at a time."""
    base = [sys.executable, str(Path(__file__).resolve()), "--profile", args.profile, "--threads", "1"]
    base += ["--set", *args.set] if args.set else []
    base += ["--out", args.out] if args.out else []
    base += ["--publish"] if args.publish else []
    pending, running, failed = list(jobs), [], 0
    while pending or running:
        while pending and len(running) < args.jobs:
            arm, seed = pending.pop(0)
            running.append(subprocess.Popen(base + ["--arms", arm, "--seeds", str(seed), "--jobs", "1",
                                                    "--no-summary"]))
        time.sleep(2)
        for proc in [p for p in running if p.poll() is not None]:
            running.remove(proc)
            failed += proc.returncode != 0
    return failed


def sweep_point(profile, budget: float) -> dict:
    """The recipe overrides of one point of the profile's sweep (a one-line error for a budget it lacks)."""
    from refusal_lat.config import ConfigError
    from refusal_lat.training import sweep as S
    sw = S.sweep_of(profile)
    if budget != 0 and budget not in sw.budgets:
        raise ConfigError(f"--budget {budget:g} is not a point of {profile.name}'s sweep; its budgets: "
                          f"{[0, *sw.budgets]} (0: the SFT point)")
    return S.point_overrides(sw, budget)


def run_sweep(args, profile) -> int:
    """Every (budget, arm, seed) of the sweep whose adapter folder is missing, each in its own process
    (--budget B --arms A --seeds S, one torch thread), `args.jobs` at a time, SFT and AT first (cheapest)."""
    from refusal_lat.training import sweep as S
    sw = S.sweep_of(profile)
    todo = [(b, a, s) for b, a, s in S.points(sw)
            if not (REPO / S.point_folder(sw, b, a, s) / "adapter_model.safetensors").is_file()]
    todo.sort(key=lambda p: ({"sft": 0, "at": 1, "rand": 2, "lat": 3}[p[1]], p[0], p[2]))
    print(f"sweep: {len(todo)} of {len(S.points(sw))} adapters to train: "
          + ", ".join(S.point_folder(sw, *p) for p in todo), flush=True)
    base = [sys.executable, str(Path(__file__).resolve()), "--profile", args.profile, "--threads", "1"]
    base += ["--publish"] if args.publish else []
    pending, running, failed = list(todo), [], 0
    while pending or running:
        while pending and len(running) < args.jobs:
            b, a, s = pending.pop(0)
            running.append(subprocess.Popen(base + ["--budget", f"{b:g}", "--arms", a, "--seeds", str(s)]))
        time.sleep(5)
        for proc in [p for p in running if p.poll() is not None]:
            running.remove(proc)
            failed += proc.returncode != 0
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--arms", nargs="+", help="default: the recipe's arms")
    parser.add_argument("--seeds", nargs="+", type=int, help="default: the recipe's seeds")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override recipe keys")
    parser.add_argument("--out", help="output folder (default: the recipe's `adapters`, relative to the repo)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the profile's train_threads)")
    parser.add_argument("--jobs", type=int, default=1, help="adapters trained at a time, one thread each")
    parser.add_argument("--check", metavar="ARM-sSEED", help="retrain one adapter and compare it byte for byte")
    parser.add_argument("--publish", action="store_true", help="replace committed adapters (under adapters/)")
    parser.add_argument("--budget", type=float, help="a point of the profile's budget sweep (0: its SFT point)")
    parser.add_argument("--sweep", action="store_true", help="train every point of the budget sweep not yet trained")
    parser.add_argument("--summary-only", action="store_true",
                        help="rewrite <out>/summary.csv from the adapters already there (every seed); train nothing")
    parser.add_argument("--no-summary", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import torch
    import helpers as H
    import training as T
    from refusal_lat import record
    try:
        profile = H.load_profile(args.profile)
        if args.sweep:
            return run_sweep(args, profile)
        overrides = parse_set(args.set)
        if args.budget is not None:
            overrides = {**sweep_point(profile, args.budget), **overrides}
        rec = T.recipe(profile, overrides)
        args.arms, seeds = T.check_selection(args.arms or rec.arms,
                                             args.seeds if args.seeds is not None else T.training_seeds(rec), args.threads)
        if args.jobs < 1:
            raise H.ConfigError(f"jobs = {args.jobs} is out of range; need jobs >= 1")
        out = Path(args.out) if args.out else T.adapter_root(rec)
        if not args.check:  # refuse now, not after the training
            for folder in [out] + [out / T.arm_folder(a, s) for s in seeds for a in args.arms]:
                record.check_writable(folder, args.publish, "scripts/train_adapters.py")
    except H.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check:
        arm, _, seed = args.check.rpartition("-s")
        committed = out / args.check / "adapter_model.safetensors"
        if arm not in T.ARMS or not seed.isdigit() or not committed.is_file():
            print(f"error: --check wants ARM-sSEED of an adapter in {out} (e.g. lat-s0); {committed} not found",
                  file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory() as tmp:
            T.train_profile(profile, [arm], overrides, Path(tmp), seeds=[int(seed)], progress=False)
            fresh = Path(tmp) / args.check / "adapter_model.safetensors"
            same = filecmp.cmp(fresh, committed, shallow=False)
            data = [T.load_log(folder)["data_hash"] for folder in (Path(tmp) / args.check, committed.parent)]
            print(f"{args.check}: retrained {sha256(fresh)[:16]} vs committed {sha256(committed)[:16]}: "
                  f"{'byte-identical' if same else 'DIFFERENT'}; training data "
                  + ("identical" if data[0] == data[1] else
                     f"DIFFERENT ({data[0]} vs {data[1]}: the base model's answers came out differently here)"))
        return 0 if same else 1
    if args.summary_only:
        if not T.trained_seeds(out):
            print(f"error: no adapter folder (<arm>-s<seed>) in {out}: nothing to summarise; train one first",
                  file=sys.stderr)
            return 2
        failed = 0
    elif args.jobs > 1:
        model, tokenizer = H.load_model(profile, "base")  # the data once, before the workers start
        T.training_examples(profile, rec, model, tokenizer)
        del model
        failed = run_jobs(args, [(arm, seed) for seed in seeds for arm in args.arms])
    else:
        command = "cd " + shlex.quote(str(REPO)) + " && .venv/bin/python " + " ".join(
            shlex.quote(a) for a in [str(Path(sys.argv[0]).resolve().relative_to(REPO))
                                     if Path(sys.argv[0]).resolve().is_relative_to(REPO) else sys.argv[0],
                                     *sys.argv[1:]])
        started, commit = time.strftime("%Y-%m-%d %H:%M:%S %Z"), git_state()  # the code that trains
        logs = T.train_profile(profile, args.arms, overrides, out, seeds=seeds, publish=args.publish)
        failed = 0
        for (arm, seed), log in logs.items():
            folder = out / T.arm_folder(arm, seed)
            (folder / "COMMAND.txt").write_text(
                f"{command}\n\n# git commit: {commit}\n# started: {started}\n"
                f"# {T.arm_folder(arm, seed)}: {log['steps']} steps, {log['seconds'] / 60:.1f} min of training on "
                f"{log['threads']} torch threads\n")
            if record.committed(folder):
                record.seal(folder, record.remake_command(folder))
    if not args.no_summary:  # every adapter of this recipe in the folder, whichever seeds this run trained
        table = T.summary(dict(sorted(T.existing_logs(rec, out, T.trained_seeds(out)).items())))
        table.to_csv(out / "summary.csv", index=False)
        print(table.to_string(index=False))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
