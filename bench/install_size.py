"""What a device installs: the agent alone (`pip install mqtt-fleet`), against the extras.

Builds the project's wheel once, then installs it into a fresh virtual environment per
variant and measures what the install added: distributions and bytes on disk (the venv's
site-packages, less what an empty venv holds). Needs the package index (pip download).

Run:  .venv/bin/python bench/install_size.py [--variants agent,broker,sim,all]
Results are printed and appended as JSON to bench/results/install_size.jsonl.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._record import record

REPO = Path(__file__).resolve().parent.parent


def site_packages(env: Path) -> Path:
    return next((env / "lib").glob("python3*/site-packages"))


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def distributions(folder: Path) -> set[str]:
    return {p.name.split("-")[0].lower() for p in folder.glob("*.dist-info")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="agent,broker,sim,all")
    args = parser.parse_args()
    results: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="fleet-install-") as tmp:
        work = Path(tmp)
        # From a copy of the committed tree: a build in the checkout leaves build/ behind.
        source = work / "src"
        source.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", "HEAD"], check=True, capture_output=True
        )
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive.stdout, check=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(work), str(source)],
            check=True,
        )
        wheel = next(work.glob("mqtt_fleet-*.whl"))
        empty = work / "empty"
        venv.create(empty, with_pip=True)
        baseline = size_of(site_packages(empty))
        base_dists = distributions(site_packages(empty))
        for variant in args.variants.split(","):
            env = work / variant
            venv.create(env, with_pip=True)
            target = str(wheel) if variant == "agent" else f"{wheel}[{variant}]"
            subprocess.run(
                [str(env / "bin" / "python"), "-m", "pip", "install", "-q", target], check=True
            )
            site = site_packages(env)
            added = sorted(distributions(site) - base_dists - {"mqtt_fleet"})
            results[variant] = {
                "distributions": len(added),
                "megabytes": round((size_of(site) - baseline) / 1e6, 1),
                "packages": added,
            }
            megabytes = results[variant]["megabytes"]
            print(f"{variant:<8} {len(added):>3} distributions {megabytes:>7} MB")
    record("install_size", {"variants": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
