"""Each benchmark owns one section of BENCHMARKS.md, delimited by HTML comments, and rewrites only that."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def machine_line() -> str:
    return (f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, python {platform.python_version()}")


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nWritten by `benchmarks/*.py`; ratios are measured side by side in one run.\n"
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def ok_rows(keys: list[str], **columns) -> dict:
    """A batch as the runner hands it to a stage: these keys, all `ok`, with these input columns."""
    from ops.stage import objects

    n = len(keys)
    return {"key": objects(keys), "status": objects(["ok"] * n), "error_code": objects([""] * n),
            "error": objects([""] * n), **columns}
