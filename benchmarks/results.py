"""Benchmark records in one place: the machine a figure was measured on, and RESULTS.md.

Every record names the CPU, its cores and the load average (the CPU here is shared with other
jobs, so a figure means little without it) and the package versions. Markdown reports are
appended to benchmarks/RESULTS.md as dated sections (benchmarks share the file: never rewrite
it); `machine` gives the same facts as a dict for the JSON records under benchmarks/results/.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def versions(packages) -> dict[str, str]:
    """{package: installed version, or 'not installed'}."""
    from importlib import metadata

    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def machine(packages) -> dict:
    """The machine and versions as a dict, for JSON records."""
    return {"nproc": os.cpu_count(), "cpu": cpu_model(), "load_average_start": os.getloadavg()[0],
            "python": platform.python_version(), "versions": versions(packages),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime(
                "%Y-%m-%d %H:%M:%S UTC")}


def machine_lines(packages=("jax", "jaxlib", "flax", "torch", "transformers")) -> list[str]:
    """Machine and versions for a RESULTS.md section; load average because the CPU is shared."""
    listed = ", ".join(f"{p} {v}" for p, v in versions(packages).items())
    return [f"- Machine: nproc {os.cpu_count()}, CPU {cpu_model()}, load average at start "
            f"{os.getloadavg()[0]:.1f} (the CPU is shared with other jobs)",
            f"- Versions: Python {platform.python_version()}, {listed}"]


def load_line() -> str:
    return f"- Load average at end: {os.getloadavg()[0]:.1f}"


def command_line(script: str, argv=None) -> str:
    """How a benchmark was run, for its section: `python benchmarks/NAME.py ARGS`."""
    args = " ".join(argv or sys.argv[1:])
    return f"python benchmarks/{os.path.basename(script)} {args}".strip()


def append(text: str, path: str = RESULTS) -> None:
    """Appends `text` after a blank line (none at the top of an empty file)."""
    with open(path, "a", encoding="utf-8") as f:
        if f.tell() > 0:
            f.write("\n")
        f.write(text)


def append_section(title: str, command: str, lines: list[str], path: str = RESULTS) -> None:
    """Appends one dated section: `## title (date)`, the command, then `lines`."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    append("\n".join([f"## {title} ({stamp})", "", f"Command: `{command}`", ""] + lines) + "\n",
           path)
