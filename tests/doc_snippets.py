"""Run the code in the docs: guide pages and docstring examples.

Conventions (docs/contributing is this docstring):

- A fenced block opened with ```python runs; ```py shows code without running it (for code that needs a
  cluster or a GPU) and ```bash/```text never run.
- The ```python blocks of one page run in order, in one fresh interpreter, sharing one namespace, with the
  working directory set to a scratch folder. A page that needs several devices says so in its own code
  (`jax.config.update("jax_num_cpu_devices", 8)`), as a reader would have to.
- The README's ```python blocks each run alone, in an interpreter of their own: each must stand on its own.
- A ```text block whose opening line has `title="Output"` and that directly follows a ```python block holds
  what that block prints; it is compared with doctest's ELLIPSIS and NORMALIZE_WHITESPACE rules, so `...`
  stands for anything.
- Docstring examples (```python blocks in the docstrings of public names) run each in a fresh namespace,
  with 8 simulated CPU devices.

Usage: `python tests/doc_snippets.py docs/masks.md [...]` runs pages and reports, as the tests do.
"""

from __future__ import annotations

import doctest
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_FENCE = re.compile(r"^(?P<indent>\s*)(?P<ticks>`{3,})(?P<info>[^`]*)$")


@dataclass
class Block:
    source: str
    line: int  # 1-based line of the opening fence
    expected: str | None = None  # the Output block that follows, if any


def extract(text: str) -> tuple[list[Block], int]:
    """The runnable blocks of a Markdown text, and how many ```py blocks it shows without running."""
    lines = text.splitlines()
    blocks: list[Block] = []
    shown_only = 0
    last_closed_python = False
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            if lines[i].strip():
                last_closed_python = False
            i += 1
            continue
        indent, ticks, info = m["indent"], m["ticks"], m["info"].strip()
        lang = info.split()[0] if info else ""
        start = i
        body = []
        i += 1
        while i < len(lines) and lines[i].strip() != ticks:
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1
        code = "\n".join(body) + "\n"
        if lang == "python":
            blocks.append(Block(code, start + 1))
            last_closed_python = True
            continue
        if lang == "text" and 'title="Output"' in info:
            if not last_closed_python or blocks[-1].expected is not None:
                raise ValueError(f"line {start + 1}: an Output block must directly follow a python block")
            blocks[-1].expected = code
        elif lang == "py":
            shown_only += 1
        last_closed_python = False
    return blocks, shown_only


_RUNNER = r"""
import contextlib, io, json, sys, traceback
blocks = json.load(open(sys.argv[1]))
results = []
namespace = {"__name__": "__main__"}
for b in blocks:
    if b["fresh"]:
        namespace = {"__name__": "__main__"}
    buffer = io.StringIO()
    error = None
    try:
        with contextlib.redirect_stdout(buffer):
            exec(compile(b["source"], b["where"], "exec"), namespace)
    except BaseException:
        error = traceback.format_exc()
    results.append({"stdout": buffer.getvalue(), "error": error})
    if error and not b["fresh"]:
        break
json.dump(results, open(sys.argv[2], "w"))
"""


def run_blocks(blocks: list[tuple[str, str]], *, fresh: bool, env: dict[str, str] | None = None,
               timeout: float = 600) -> list[dict]:
    """Runs (where, source) blocks in one new interpreter; returns each block's stdout and error (or stops at one)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        (tmp_path / "blocks.json").write_text(json.dumps(
            [{"source": s, "where": w, "fresh": fresh} for w, s in blocks]))
        # The caller's simulated device count must not leak into pages that set their own; its compile flags
        # (tests/conftest.py) carry over, and `env`'s XLA_FLAGS are added to them.
        env = dict(env or {})
        kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
        flags = " ".join([*kept, env.pop("XLA_FLAGS", "")]).strip()
        full_env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "MPLBACKEND": "Agg", **env}
        proc = subprocess.run([sys.executable, "-c", _RUNNER, "blocks.json", "results.json"], cwd=tmp,
                              env=full_env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"snippet runner failed:\n{proc.stdout}\n{proc.stderr}")
        return json.loads((tmp_path / "results.json").read_text())


def check_page(path: Path, *, separate: bool = False) -> list[str]:
    """Runs a page's python blocks; returns the failures (empty when every block ran and printed as shown).

    `separate=True` runs each block in an interpreter of its own, as a reader who copies one block would
    (the README's); by default they share one, in order, as a guide's do.
    """
    blocks, _ = extract(path.read_text())
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    sources = [(f"{rel}:{b.line}", b.source) for b in blocks]
    results = ([run_blocks([s], fresh=False)[0] for s in sources] if separate
               else run_blocks(sources, fresh=False))
    failures = []
    checker = doctest.OutputChecker()
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    for block, result in zip(blocks, results, strict=False):
        where = f"{rel}:{block.line}"
        if result["error"]:
            failures.append(f"{where} raised:\n{result['error']}")
            if not separate:
                break
            continue
        if block.expected is not None and not checker.check_output(block.expected, result["stdout"], flags):
            failures.append(f"{where} printed:\n{result['stdout']}\nbut the page shows:\n{block.expected}")
    return failures


def guide_pages() -> list[Path]:
    """Every Markdown page of the docs but the generated API reference."""
    return sorted(p for p in DOCS.rglob("*.md") if "api" not in p.relative_to(DOCS).parts)


if __name__ == "__main__":
    bad = 0
    for arg in sys.argv[1:] or [str(p) for p in guide_pages()]:
        page = Path(arg).resolve()
        failures = check_page(page, separate=page.name == "README.md")
        print(f"{page.relative_to(ROOT)}: {'ok' if not failures else 'FAILED'}")
        for f in failures:
            print(f)
        bad += bool(failures)
    sys.exit(1 if bad else 0)
