"""Build the device kit: the wheels a lent GPU machine's image lacks, plus this project's.

    python bench/device/device_kit.py                         # .whl/ for the GPU image (make device-kit)
    python bench/device/device_kit.py --python-version 3.11 --out .rehearsal/kit   # for this machine

The lent machine (docs/gpu.md) is offline, with Python 3.12 and a CUDA build of
torch and most of what the project imports preinstalled, but not torchtune and the
packages below. The kit holds exactly those, at the versions ``constraints.txt`` pins,
as wheels for CPython ``--python-version`` on manylinux x86-64, and a wheel of this
project; ``bench/device/run_on_device.sh`` installs it there with ``pip install --no-index
--no-deps --target``. The kit travels with the working tree, whose whole size a lent
machine takes is limited: the build fails if the kit and the tree together exceed
``--limit-mib`` (48). The kit is built in a temporary folder and swapped in whole;
``kit.json`` beside the wheels lists them with sizes and sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What the GPU image lacks of the project's runtime dependencies (torchtune, and what it and
# `datasets` import); everything else the project imports is in the image.
KIT_PACKAGES = (
    "torchtune",
    "torchao",
    "torchdata",
    "omegaconf",
    "datasets",
    "dill",
    "multiprocess",
    "kagglehub",
    "kagglesdk",
)
# pip matches manylinux tags exactly: every tag a wheel of these packages may carry
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
LIMIT_MIB = 48.0


class KitError(Exception):
    pass


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions(constraints: Path, packages=KIT_PACKAGES) -> dict[str, str]:
    """``name -> version`` of ``packages`` as ``constraints`` pins them (``name==version``)."""
    pins = {}
    for number, line in enumerate(constraints.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)\s*==\s*([A-Za-z0-9.+!_-]+)", line)
        if match is None:
            raise KitError(f"{constraints}:{number}: not a 'name==version' pin: {line!r}")
        pins[canonical(match[1])] = match[2]
    missing = [p for p in packages if canonical(p) not in pins]
    if missing:
        raise KitError(
            f"{constraints} pins no version of {', '.join(missing)}: add them "
            "(pip freeze of `make install`) before building the kit"
        )
    return {p: pins[canonical(p)] for p in packages}


def wheel_name(path: Path) -> str:
    """The distribution a wheel file holds, canonical (``torchao-0.15.0-...whl`` -> torchao)."""
    return canonical(path.name.split("-", 1)[0])


def check_one_wheel_each(wheels: list[Path], expected: list[str]) -> None:
    """Exactly one wheel of every expected distribution: two versions stop pip's install."""
    names = [wheel_name(w) for w in wheels]
    problems = [f"{n}: {names.count(n)} wheels" for n in sorted(set(names)) if names.count(n) > 1]
    problems += [f"{n}: no wheel" for n in map(canonical, expected) if n not in names]
    if problems:
        raise KitError("the kit is not one wheel per package: " + "; ".join(problems))


def tree_bytes(root: Path = ROOT, exclude: Path | None = None) -> int:
    """Bytes of what travels to a lent machine: tracked and untracked-not-ignored files
    (less ``exclude``, the kit being built)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    files = (root / name for name in listed.decode().split("\0") if name)
    if exclude is not None:
        files = (f for f in files if exclude.resolve() not in f.resolve().parents)
    return sum(f.stat().st_size for f in files if f.is_file() and not f.is_symlink())


def check_size(kit_bytes: int, tree: int, limit_mib: float) -> None:
    total = (kit_bytes + tree) / 2**20
    if total > limit_mib:
        raise KitError(
            f"kit {kit_bytes / 2**20:.1f} MiB + tree {tree / 2**20:.1f} MiB = {total:.1f} MiB, "
            f"over the {limit_mib:g} MiB a lent machine is sent with room to spare: "
            "drop a package the image has, or ignore large untracked files"
        )


# what the project's wheel is built from: a kit whose wheel came from other sources runs
# old code beside the tree's new configs, so run_on_device.sh compares the two digests
SOURCES = ("pyproject.toml", "abmll_tune", "recipes")


def source_digest(root: Path = ROOT) -> str:
    """sha256 over the project's wheel sources (paths and contents, sorted; caches and
    compiled files left out). Standard library only: the lent machine runs it before
    anything is installed."""
    digest = hashlib.sha256()
    for top in SOURCES:
        path = root / top
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for f in files:
            if not f.is_file() or "__pycache__" in f.parts or f.suffix in (".pyc", ".pyo"):
                continue
            digest.update(f.relative_to(root).as_posix().encode() + b"\0")
            digest.update(f.read_bytes() + b"\0")
    return digest.hexdigest()


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def build(out: Path, python_version: str, limit_mib: float) -> dict:
    pins = pinned_versions(ROOT / "constraints.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        platforms = [a for p in PLATFORMS for a in ("--platform", p)]
        _pip(
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            python_version,
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(tmp),
            *(f"{name}=={version}" for name, version in pins.items()),
        )
        _pip("wheel", "--quiet", "--no-deps", "-w", str(tmp), str(ROOT))  # this project
        wheels = sorted(tmp.glob("*.whl"))
        check_one_wheel_each(wheels, [*pins, "abmll-tune"])
        kit_bytes = sum(w.stat().st_size for w in wheels)
        check_size(kit_bytes, tree_bytes(exclude=tmp), limit_mib)
        manifest = {
            "source_digest": source_digest(),
            "python_version": python_version,
            "platforms": list(PLATFORMS),
            "pins": pins,
            "bytes": kit_bytes,
            "wheels": {
                w.name: {
                    "bytes": w.stat().st_size,
                    "sha256": hashlib.sha256(w.read_bytes()).hexdigest(),
                }
                for w in wheels
            },
        }
        (tmp / "kit.json").write_text(json.dumps(manifest, indent=2) + "\n")
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_kit(kit: Path, root: Path = ROOT) -> int:
    """0 when ``kit`` was built from ``root``'s sources, else 1 with what to do."""
    try:
        built_from = json.loads((kit / "kit.json").read_text()).get("source_digest")
    except (OSError, ValueError) as error:
        print(f"device kit: {kit / 'kit.json'} unreadable ({error}): run make device-kit")
        return 1
    here = source_digest(root)
    if built_from != here:
        print(
            f"device kit: {kit} was built from other sources (digest {str(built_from)[:12]}, "
            f"this tree {here[:12]}): its wheel would run old code; run make device-kit"
        )
        return 1
    print(f"device kit: built from this tree's sources ({here[:12]})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".whl")
    parser.add_argument(
        "--python-version", default="3.12", help="the lent machine's Python (default 3.12)"
    )
    parser.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    parser.add_argument(
        "--check-kit",
        type=Path,
        metavar="KIT",
        help="only check that KIT/kit.json was built from this tree's sources (exit 1 if not)",
    )
    args = parser.parse_args(argv)
    if args.check_kit is not None:
        return check_kit(args.check_kit)
    try:
        manifest = build(args.out, args.python_version, args.limit_mib)
    except (KitError, subprocess.CalledProcessError) as error:
        print(f"device kit: {error}", file=sys.stderr)
        return 1
    for name, info in manifest["wheels"].items():
        print(f"  {info['bytes'] / 2**20:6.2f} MiB  {name}")
    print(
        f"device kit: {len(manifest['wheels'])} wheels, {manifest['bytes'] / 2**20:.1f} MiB, "
        f"in {args.out} (tree {tree_bytes() / 2**20:.1f} MiB; limit {args.limit_mib:g} MiB together)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
