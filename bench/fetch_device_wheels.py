"""Download, here, the wheels of the Python packages that the lent GPU machine lacks, into ``.device-wheels/``.

The GPU machine (python 3.12, x86-64, torch 2.11.0+cu130, triton 3.6) reaches no package index. Its image has
numpy, scipy, pytest, absl-py, attrs, wrapt, mpmath, opt-einsum, joblib, threadpoolctl, narwhals and
scikit-learn, but no opacus and no dp-accounting (nor its compiled dependency dm-tree). scikit-learn is
optional here (``--no-optional`` leaves it out): no stage of the device run imports it (only
``dpsat_fast.train``'s digits data set does), and it is carried only for an image without it. This tool fetches
exactly those wheels for CPython 3.12 manylinux x86-64 (``pip download --only-binary=:all: --no-deps``, at
the versions of the CI environment), checks from each wheel's METADATA that every dependency is either
carried or known to be on the machine, and checks the total against what a device call may carry: 64 MiB
for the working tree and the carried folders together. ``bench/device_run.py`` installs, on the machine, only
those of them that are missing there (``pip install --no-index --no-deps --target``).

Usage (repository root; the folder is git-ignored)::

    python3 bench/fetch_device_wheels.py            # -> .device-wheels/, prints sizes and what fits
    # device call: carry [".device-wheels"], command "python3 bench/device_run.py"
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEST = ROOT / ".device-wheels"
CARRY_LIMIT = 64 * 2**20  # bytes: the working tree and every carried path of one device call

# (requirement, required?): pinned to the CI environment's versions
PACKAGES = [("opacus==1.6.0", True), ("dp-accounting==0.6.0", True), ("dm-tree==0.1.10", True),
            ("scikit-learn==1.9.1", False)]
# on the GPU machine's image already (its package list); the carried wheels may rely on these
ON_DEVICE = {"numpy", "scipy", "torch", "absl-py", "attrs", "wrapt", "mpmath", "opt-einsum", "joblib",
             "threadpoolctl", "narwhals", "typing-extensions", "packaging", "tqdm", "pytest"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def working_tree_bytes() -> int:
    """Tracked and untracked-but-not-ignored files: what a device call sends besides the carried paths."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    return sum((ROOT / f).stat().st_size for f in out.decode().split("\0") if f and (ROOT / f).is_file())


def requirements(wheel: Path) -> list[str]:
    """Names of the wheel's unconditional (non-extra) dependencies."""
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    names = []
    for line in meta.splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            names.append(canonical(re.split(r"[ ;<>=!~\[(]", line.split(":", 1)[1].strip())[0]))
    return sorted(set(names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=DEST)
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--optional", action=argparse.BooleanOptionalAction, default=True,
                        help="also the optional packages (scikit-learn) when they fit")
    args = parser.parse_args(argv)

    shutil.rmtree(args.dest, ignore_errors=True)
    args.dest.mkdir(parents=True)
    base = [sys.executable, "-m", "pip", "download", "-q", "--no-cache-dir", "--disable-pip-version-check",
            "--no-deps", "--only-binary=:all:", "--python-version", args.python_version, "--implementation", "cp",
            *[a for p in PLATFORMS for a in ("--platform", p)], "-d"]
    tree = working_tree_bytes()
    budget = CARRY_LIMIT - tree
    print(f"working tree {tree / 2**20:.1f} MiB; {budget / 2**20:.1f} MiB left to carry")
    carried: dict[str, Path] = {}
    used = 0
    for req, required in PACKAGES:
        if not required and not args.optional:
            continue
        tmp = args.dest / ".tmp"
        tmp.mkdir(exist_ok=True)
        subprocess.run(base + [str(tmp), req], check=True)
        (wheel,) = list(tmp.glob("*.whl"))
        size = wheel.stat().st_size
        fits = used + size <= budget
        print(f"  {wheel.name:<80} {size / 2**20:6.2f} MiB  {'fits' if fits else 'DOES NOT FIT'}")
        if fits:
            used += size
            carried[canonical(req.split("==")[0])] = wheel.rename(args.dest / wheel.name)
        elif required:
            raise SystemExit(f"{req} does not fit the carry limit")
        shutil.rmtree(tmp)
    unmet = {}
    for name, wheel in carried.items():
        missing = [r for r in requirements(wheel) if r not in carried and r not in ON_DEVICE]
        if missing:
            unmet[name] = missing
    print(f"{len(carried)} wheels, {used / 2**20:.2f} MiB in {args.dest} (+ tree {tree / 2**20:.1f} MiB = "
          f"{(used + tree) / 2**20:.1f} of {CARRY_LIMIT // 2**20} MiB)")
    if unmet:
        print("dependencies neither carried nor known on the device:", unmet)
        return 1
    print("every dependency is carried or on the device")
    return 0


if __name__ == "__main__":
    sys.exit(main())
