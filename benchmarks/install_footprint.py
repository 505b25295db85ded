"""Install footprint: packages and megabytes each adapter's install brings, and its import time, against its peer.

Each install goes into a fresh virtualenv of its own (no system site-packages, no pip inside): our wheel,
built from this tree, with ``[langchain]`` against ``langchain-openai``, and with ``[llama-index]`` against
``llama-index-llms-openai-like``; pip byte-compiles as it does for a user. Megabytes are the files under
site-packages. Import time is the adapter class's import in a new interpreter (``python -I``), median of
``--runs`` runs after one that is discarded (it warms the disk cache), ours and the peer's in turn so both
meet the same load. The goal is judged on CPU time: on a shared 2-core machine the wall-clock time of an
import is mostly other processes' (both are reported). Goal: at most the peer's packages plus 10, and an
import within 1.1x of the peer's. ``--importtime`` prints the modules each of our adapters spends most on
(``python -X importtime``). Needs the package index (pip's cache serves repeated runs).
Run: ``.venv/bin/python benchmarks/install_footprint.py [--runs 7] [--importtime]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import HERE, save

ROOT = HERE.parent
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "anorag_integrations")
"""What the wheel is built from, copied out of the tree (setuptools' ``build/`` stays out of it)."""
EXTRA_PACKAGES = 10
"""Goal: our install brings at most this many packages more than the peer's."""
IMPORT_RATIO = 1.1
"""Goal: our adapter imports within this factor of the peer's time."""
INSTALL_LIMIT_S = 900
"""One install, from an empty pip cache on a slow link."""
TIMED_IMPORT = (
    "import time; cpu, wall = time.process_time(), time.perf_counter(); {statement}; "
    "print(time.process_time() - cpu, time.perf_counter() - wall)"
)
"""Prints the CPU and wall-clock seconds of ``statement``, an import."""


@dataclass(frozen=True)
class Install:
    """One side of a comparison: what pip installs, and the import a user then writes."""

    label: str
    requirement: str  # "{wheel}" stands for our built wheel
    statement: str
    ours: bool = False


PAIRS = [
    (
        Install("anorag-integrations[langchain]", "{wheel}[langchain]",
                "from anorag_integrations.langchain import ChatVLLMRouted", ours=True),
        Install("langchain-openai", "langchain-openai", "from langchain_openai import ChatOpenAI"),
    ),
    (
        Install("anorag-integrations[llama-index]", "{wheel}[llama-index]",
                "from anorag_integrations.llama_index import VLLMRouted", ours=True),
        Install("llama-index-llms-openai-like", "llama-index-llms-openai-like",
                "from llama_index.llms.openai_like import OpenAILike"),
    ),
]  # fmt: skip


def _run(command: list[str], *, cwd: Path, limit: float = 120) -> str:
    """``command``'s stdout; it runs outside the tree without PYTHON* variables, so a virtualenv sees only itself."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=limit)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:6])} ... failed:\n{result.stderr[-3000:]}")
    return result.stdout


def build_wheel(work: Path) -> Path:
    """Our wheel, built from a copy of the tree with this interpreter's setuptools."""
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, source / name)
    dist = work / "dist"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), "."]
    _run(command, cwd=source)
    (wheel,) = dist.glob("*.whl")
    return wheel


def install(work: Path, side: Install, wheel: Path) -> Path:
    """A fresh virtualenv holding ``side``'s requirement and its dependencies; its Python."""
    venv = work / side.label.replace("[", "-").replace("]", "")
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=work)
    python = venv / "bin" / "python"
    requirement = side.requirement.format(wheel=wheel)
    command = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    _run([*command, "--find-links", str(wheel.parent), requirement], cwd=work, limit=INSTALL_LIMIT_S)
    return python


def footprint(python: Path) -> dict[str, Any]:
    """Packages installed in ``python``'s virtualenv (all of them: nothing else is there) and their megabytes."""
    code = (
        "import importlib.metadata as m, json, sysconfig; "
        "print(json.dumps([sorted(d.metadata['Name'].lower().replace('_', '-') for d in m.distributions()), "
        "sysconfig.get_paths()['purelib']]))"
    )
    names, site = json.loads(_run([str(python), "-I", "-c", code], cwd=python.parent))
    size = sum(path.stat().st_size for path in Path(site).rglob("*") if path.is_file() and not path.is_symlink())
    return {"packages": len(names), "megabytes": round(size / 1e6, 1), "names": names}


def import_times(pythons: dict[str, Path], statements: dict[str, str], runs: int) -> dict[str, dict[str, Any]]:
    """Each side's import in ``runs`` new interpreters, the sides in turn, after one discarded round: CPU and
    wall-clock milliseconds, medians and runs."""
    seconds: dict[str, list[list[float]]] = {label: [] for label in pythons}
    for _ in range(runs + 1):
        for label, python in pythons.items():
            command = [str(python), "-I", "-c", TIMED_IMPORT.format(statement=statements[label])]
            seconds[label].append([float(part) for part in _run(command, cwd=python.parent).split()])
    times = {}
    for label, measured in seconds.items():
        cpu, wall = ([round(run[i] * 1000, 1) for run in measured[1:]] for i in (0, 1))
        times[label] = {
            "import_cpu_ms": statistics.median(cpu),
            "import_wall_ms": statistics.median(wall),
            "import_cpu_ms_runs": cpu,
            "import_wall_ms_runs": wall,
        }
    return times


def heaviest_imports(python: Path, statement: str, top: int = 15) -> list[tuple[int, str]]:
    """The ``top`` modules by cumulative import time (microseconds) under ``statement`` (``-X importtime``)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    command = [str(python), "-I", "-X", "importtime", "-c", statement]
    result = subprocess.run(command, cwd=python.parent, env=env, capture_output=True, text=True, timeout=120)
    rows = []
    for line in result.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]), parts[2].rstrip()))
    return sorted(rows, reverse=True)[:top]


def measure(pair: tuple[Install, Install], wheel: Path, work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Both sides of a pair installed, then their imports timed in turn."""
    pythons = {side.label: install(work, side, wheel) for side in pair}
    times = import_times(pythons, {side.label: side.statement for side in pair}, args.runs)
    rows = []
    for side in pair:
        python = pythons[side.label]
        row: dict[str, Any] = {"install": side.label, "import": side.statement, **footprint(python)}
        row.update(times[side.label])
        if args.importtime and side.ours:
            row["heaviest_imports_us"] = heaviest_imports(python, side.statement)
        rows.append(row)
    return rows


def compare(ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, Any]:
    """Our side against the peer's, and whether the goals are met."""
    more = ours["packages"] - peer["packages"]
    ratio = round(ours["import_cpu_ms"] / peer["import_cpu_ms"], 2)
    return {
        "ours": ours["install"],
        "peer": peer["install"],
        "extra_packages": more,
        "extra_megabytes": round(ours["megabytes"] - peer["megabytes"], 1),
        "import_ratio": ratio,
        "import_wall_ratio": round(ours["import_wall_ms"] / peer["import_wall_ms"], 2),
        "only_ours": sorted(set(ours["names"]) - set(peer["names"]) - {"anorag-integrations"}),
        "packages_goal_met": more <= EXTRA_PACKAGES,
        "import_goal_met": ratio <= IMPORT_RATIO,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7, help="timed imports per install (the median is reported)")
    parser.add_argument("--importtime", action="store_true", help="print what our adapters spend their import on")
    args = parser.parse_args()

    rows, comparisons = [], []
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        work = Path(tmp)
        wheel = build_wheel(work)
        for pair in PAIRS:
            ours, peer = measure(pair, wheel, work, args)
            rows += [ours, peer]
            comparisons.append(compare(ours, peer))

    for row in rows:
        footprint_text = f"{row['packages']:4} packages {row['megabytes']:7.1f} MB"
        import_text = f"import {row['import_cpu_ms']:7.1f} ms CPU, {row['import_wall_ms']:7.1f} ms wall"
        print(f"{row['install']:34} {footprint_text}   {import_text}  ({row['import']})")
        for micros, module in row.get("heaviest_imports_us", []):
            print(f"{'':38}{micros / 1000:8.1f} ms  {module}")
    for c in comparisons:
        verdict = "met" if c["packages_goal_met"] and c["import_goal_met"] else "NOT met"
        print(
            f"{c['ours']} vs {c['peer']}: {c['extra_packages']:+d} packages, {c['extra_megabytes']:+.1f} MB, "
            f"import {c['import_ratio']}x CPU ({c['import_wall_ratio']}x wall); "
            f"goal (<= +{EXTRA_PACKAGES} packages, <= {IMPORT_RATIO}x) {verdict}; "
            f"only ours: {', '.join(c['only_ours']) or '-'}"
        )
    results = {"installs": rows, "comparisons": comparisons}
    print("written to", save("install_footprint", results, cores="one install or import at a time", runs=args.runs))


if __name__ == "__main__":
    main()
