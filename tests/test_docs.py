"""The documentation site: every public name documented and on a page, the guides' code runs, the site loads.

The site tests build it with `mkdocs build --strict` and open every page in headless Chromium (Debian's
`chromium`); without that browser they are skipped, except under `CI=true`, where they fail.
"""

import contextlib
import functools
import http.server
import importlib
import os
import re
import shutil
import subprocess
import sys
import threading
import types
from pathlib import Path

import griffe
import pytest
from doc_snippets import DOCS, ROOT, check_page, extract, guide_pages, run_blocks

PACKAGES = ("eqx_ring", "eqx_ring.sharding", "models", "data_pipelines")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def public_names(package: str) -> list[str]:
    """The names a package re-exports: everything in its namespace not starting with `_`, but submodules."""
    module = importlib.import_module(package)
    return sorted(n for n, v in vars(module).items() if not n.startswith("_") and not isinstance(v, types.ModuleType))


@functools.cache
def _griffe_package(name: str) -> griffe.Module:
    return griffe.load(name, search_paths=[str(ROOT)], resolve_aliases=True, resolve_external=False)


def griffe_object(path: str) -> griffe.Object:
    top, *rest = path.split(".")
    obj = _griffe_package(top)
    for part in rest:
        obj = obj.members[part]
    return obj.final_target if obj.is_alias else obj


def _params(fn: griffe.Function) -> list[str]:
    return [p.name for p in fn.parameters if p.name not in ("self", "cls")]


def _own_methods(cls: griffe.Class) -> list[griffe.Object]:
    """Methods and properties a class defines itself that a user calls: public ones, `__init__` and `__call__`.

    A dataclass's generated `__init__` (griffe synthesizes it, at line 0) is documented by the class docstring.
    """
    return [m for name, m in cls.members.items()
            if not m.is_alias and (m.is_function or "property" in m.labels) and m.lineno
            and (not name.startswith("_") or name in ("__init__", "__call__"))]


def docstring_problems(path: str) -> list[str]:
    """What the docstring style (Equinox's: Markdown with **Arguments:** / **Returns:**) finds missing."""
    obj = griffe_object(path)
    problems = []

    def check_function(fn: griffe.Function, where: str) -> None:
        doc = fn.docstring.value if fn.docstring else ""
        if not doc.strip():
            problems.append(f"{where}: no docstring")
            return
        if "property" in fn.labels:
            return
        if _params(fn) and "**Arguments:**" not in doc and "**Arguments**" not in doc:
            problems.append(f"{where}: parameters {_params(fn)} but no **Arguments:** section")
        returns = fn.returns
        if fn.name != "__init__" and returns is not None and str(returns) != "None" and "**Returns:**" not in doc:
            problems.append(f"{where}: returns {returns} but no **Returns:** section")

    if obj.is_function:
        check_function(obj, path)
    elif obj.is_class:
        if not (obj.docstring and obj.docstring.value.strip()):
            problems.append(f"{path}: no class docstring")
        elif "dataclass" in obj.labels and "__init__" in obj.members and not obj.members["__init__"].lineno:
            fields = _params(obj.members["__init__"])
            if fields and "**Arguments:**" not in obj.docstring.value:
                problems.append(f"{path}: a dataclass with fields {fields} but no **Arguments:** in its docstring")
        for member in _own_methods(obj):
            if member.is_function:
                check_function(member, f"{path}.{member.name}")
            elif not member.docstring:
                problems.append(f"{path}.{member.name}: no docstring")
    elif not (obj.docstring and obj.docstring.value.strip()):
        problems.append(f"{path}: no docstring (an attribute docstring: a string right after the assignment)")
    return problems


def api_directives() -> set[str]:
    return {m[1] for page in (DOCS / "api").glob("*.md") for m in re.finditer(r"^::: ([\w.]+)", page.read_text(), re.M)}


ALL_PUBLIC = [f"{pkg}.{name}" for pkg in PACKAGES for name in public_names(pkg)]


def test_the_public_api_is_what_the_docs_cover():
    # A guard on the guard: the lists above are not empty, and they see names we know are public.
    assert {"eqx_ring.ring_attention", "eqx_ring.sharding.make_mesh", "models.train",
            "data_pipelines.global_packed_batches"} <= set(ALL_PUBLIC)
    assert "eqx_ring.sharding" not in ALL_PUBLIC and not any(n.split(".")[-1].startswith("_") for n in ALL_PUBLIC)


@pytest.mark.parametrize("path", ALL_PUBLIC)
def test_public_name_is_documented(path):
    assert docstring_problems(path) == []


def test_every_public_name_has_an_api_page():
    missing = sorted(set(ALL_PUBLIC) - api_directives())
    assert missing == [], f"public names with no `::: name` on a docs/api page: {missing}"


def test_docstring_checks_catch_a_missing_section(tmp_path, monkeypatch):
    pkg = tmp_path / "fakepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "def f(x: int) -> int:\n    '''Doubles.\n\n    **Arguments:**\n\n    - `x`: a number.\n    '''\n"
        "    return 2 * x\n\nLIMIT = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    _griffe_package.cache_clear()
    monkeypatch.setattr("test_docs.ROOT", tmp_path)
    try:
        assert docstring_problems("fakepkg.f") == ["fakepkg.f: returns int but no **Returns:** section"]
        assert docstring_problems("fakepkg.LIMIT")[0].startswith("fakepkg.LIMIT: no docstring")
    finally:
        _griffe_package.cache_clear()


def test_snippet_extraction_pairs_outputs_and_skips_shown_only_code():
    text = ("```python\nprint(1)\n```\n\n```text title=\"Output\"\n1\n```\n\n"
            "```py\nnot run\n```\n\n```python\nx = 2\n```\n")
    blocks, shown = extract(text)
    assert [b.source for b in blocks] == ["print(1)\n", "x = 2\n"]
    assert blocks[0].expected == "1\n" and blocks[1].expected is None and shown == 1


def test_a_wrong_output_block_fails(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```python\nprint(6 * 7)\n```\n\n```text title=\"Output\"\n41\n```\n")
    failures = check_page(page)
    assert len(failures) == 1 and "printed:\n42" in failures[0]


@pytest.mark.parametrize("page", [str(p.relative_to(DOCS)) for p in guide_pages()])
def test_guide_code_runs(page):
    assert check_page(DOCS / page) == []


def test_readme_code_runs_block_by_block():
    """Every python block of the README runs as written, each alone in a new interpreter (as a reader copies one)."""
    assert check_page(ROOT / "README.md", separate=True) == []


def _docstring_examples() -> list[tuple[str, str]]:
    examples = []
    for path in ALL_PUBLIC:
        obj = griffe_object(path)
        members = [obj, *(_own_methods(obj) if obj.is_class else [])]
        for member in members:
            if member.docstring:
                where = path if member is obj else f"{path}.{member.name}"
                examples += [(f"{where} (docstring line {b.line})", b.source)
                             for b in extract(member.docstring.value)[0]]
    return examples


def test_docstring_examples_run():
    examples = _docstring_examples()
    results = run_blocks(examples, fresh=True, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    errors = [f"{where}:\n{r['error']}" for (where, _), r in zip(examples, results, strict=True) if r["error"]]
    assert errors == []


# The built site, in a browser.


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@contextlib.contextmanager
def _serve(directory: Path):
    """A static file server for `directory` on a free localhost port; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def served(site):
    with _serve(site) as url:
        yield url


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must check the site in Chromium: install Debian's chromium package")
        pytest.skip("Debian's chromium is not installed (apt install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        # No network here: background networking would only log refused connections.
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def _pages(site: Path) -> list[str]:
    """Every page of the site, as URL paths relative to its root ("" is the home page)."""
    return sorted("" if p.parent == site else f"{p.parent.relative_to(site).as_posix()}/"
                  for p in site.rglob("index.html"))


def test_site_loads_without_errors_or_broken_links(site, served, browser, tmp_path):
    pages = _pages(site)
    assert "api/eqx_ring/" in pages and "quickstart/" in pages and "" in pages
    page = browser.new_page()
    problems: list[str] = []
    current = [""]
    page.on("console", lambda m: problems.append(f"{current[0]}: console {m.type}: {m.text}")
            if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"{current[0]}: page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"{current[0]}: request failed: {r.url}"))
    page.on("response", lambda r: problems.append(f"{current[0]}: HTTP {r.status}: {r.url}")
            if r.status >= 400 else None)
    ids: dict[str, set[str]] = {}
    links: list[tuple[str, str]] = []
    for rel in pages:
        current[0] = rel or "/"
        page.goto(served + rel, wait_until="networkidle")
        ids[rel] = set(page.eval_on_selector_all("[id]", "els => els.map(e => e.id)"))
        hrefs = page.eval_on_selector_all("a[href]", "els => els.map(a => a.href)")
        links += [(rel, h) for h in hrefs if h.startswith(served)]
        if rel in ("", "api/eqx_ring/", "how-ring-attention-works/"):
            page.screenshot(path=str(tmp_path / f"{rel.strip('/').replace('/', '_') or 'home'}.png"), full_page=False)
    for source, href in links:
        target, _, anchor = href[len(served):].partition("#")
        target = target.removesuffix("index.html")
        if target not in ids:
            if not (site / target).is_file():
                problems.append(f"{source or '/'}: broken link {href}")
        elif anchor and anchor not in ids[target]:
            problems.append(f"{source or '/'}: link to a missing anchor {href}")
    page.close()
    assert problems == []
    # Every image on the pages above was fetched (a failed one is a failed request above); the screenshots exist.
    shots = ("home", "api_eqx_ring", "how-ring-attention-works")
    assert all((tmp_path / f"{n}.png").stat().st_size > 10_000 for n in shots)
    if os.environ.get("DOCS_SCREENSHOTS"):
        dest = Path(os.environ["DOCS_SCREENSHOTS"])
        dest.mkdir(parents=True, exist_ok=True)
        for png in tmp_path.glob("*.png"):
            shutil.copy(png, dest / png.name)


def test_the_browser_check_sees_errors(browser, tmp_path):
    # The site check relies on these events: a missing file and a script error must show up in them.
    (tmp_path / "index.html").write_text("<img src='missing.png'><script>console.error('boom')</script>")
    page = browser.new_page()
    seen = []
    page.on("console", lambda m: seen.append(m.type))
    page.on("response", lambda r: seen.append(r.status))
    with _serve(tmp_path) as url:
        page.goto(url, wait_until="networkidle")
    page.close()
    assert 404 in seen and "error" in seen
