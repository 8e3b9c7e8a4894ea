"""Run only notebook 02's Llama-2 section (the cells tagged `llama2`: the authors' released activations) for
one profile, without the profile's models: tables to the run folder, figures to figures/<profile>/.
Usage: python scripts/llama2_section.py --profile cpu [--run-dir DIR]"""
import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--run-dir", default=None)
    args = parser.parse_args()
    cells = json.loads((REPO / "notebooks" / "02_svd_variance.ipynb").read_text())["cells"]
    setup = next(c for c in cells if "H.start(" in "".join(c["source"]))
    tagged = [c for c in cells if "llama2" in c.get("metadata", {}).get("tags", []) and c["cell_type"] == "code"]
    import matplotlib
    matplotlib.use("Agg")
    from IPython.display import display
    scope = {"profile": args.profile, "run_dir": args.run_dir, "overrides": {}, "display": display}
    for cell in [setup, *tagged]:
        exec(compile("".join(cell["source"]), "02_svd_variance.ipynb", "exec"), scope)


if __name__ == "__main__":
    main()
