"""What the benchmark scripts share: their JSON result files and their BENCHMARKS.md sections.

Each script owns one section of BENCHMARKS.md between an HTML-comment marker pair and rewrites
only that section; results files and BENCHMARKS.md are written through a temporary file and a
rename, so an interrupted script leaves the old file or the new one.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
from pathlib import Path

from dplatent.io import atomic_write

ROOT = Path(__file__).resolve().parents[1]
BENCH_MD = ROOT / "BENCHMARKS.md"


def machine() -> str:
    """The machine a record was measured on, as the records state it ("x86_64 2 cores, Linux")."""
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.system()}"


def _write_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def load(path: Path) -> list[dict]:
    """The records in a results file ([] when it does not exist yet)."""
    return json.loads(path.read_text()) if path.is_file() else []


def save(path: Path, records: list[dict]) -> None:
    _write_atomic(path, json.dumps(records, indent=2) + "\n")


def add_run_options(parser) -> None:
    """The options every resumable benchmark script shares."""
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--force", action="store_true", help="measure again what has a record")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--markdown-only", action="store_true",
                        help="only rewrite the BENCHMARKS.md section from the records")


def shown_command(script: str, argv: list[str], drop: tuple[str, ...]) -> str:
    """The command a record shows, quoted for a shell: `python benchmarks/<script>` and the
    arguments without the flags in `drop`, the value of --data-dir replaced by DIR (a record
    never holds a machine path)."""
    shown = [a for a in argv if a not in drop]
    if "--data-dir" in shown:
        shown[shown.index("--data-dir") + 1] = "DIR"
    return shlex.join(["python", f"benchmarks/{script}", *shown])


def write_section(name: str, body: str, heading: str) -> None:
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->` in BENCHMARKS.md
    with `body`; where the markers are missing, append `heading` and a new marked section."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = BENCH_MD.read_text() if BENCH_MD.is_file() else "# Benchmarks\n"
    block = f"{begin}\n{body}{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n{block}\n"
    _write_atomic(BENCH_MD, text)
