"""Write the sha256 manifest (refusal_lat/record.py) of committed folders whose files are as committed.

    python scripts/seal_committed.py adapters/cpu/v2/*-s* adapters/cpu/v2/eval figures/cpu notebooks/reference/cpu

Run it only on folders whose files are the committed ones (`git status` shows them unchanged): from then
on every reader checks them against the manifest, and only the command that publishes a folder (with
--publish) writes into it and seals it again. --check verifies instead of writing.
"""
import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--check", action="store_true", help="verify the manifests; write nothing")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from refusal_lat import record
    try:
        for folder in map(Path, args.folders):
            if not folder.is_dir():
                raise record.CommittedError(f"{folder} is not a folder; name committed folders")
            if args.check:
                if not record.sealed(folder):
                    raise record.CommittedError(f"{folder} has no {record.MANIFEST}; seal it first")
                record.verify(folder)
                print(f"{folder}: as committed")
            else:
                print(f"sealed {record.seal(folder, record.remake_command(folder))}")
    except record.CommittedError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
