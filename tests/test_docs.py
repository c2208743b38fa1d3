"""The front door stays true: README short with its set-up commands up front, the generated command
reference current and complete, every relative link in README and docs resolving, mkdocs --strict."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import cli_reference  # noqa: E402

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_readme_is_short_and_starts_with_the_two_set_up_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 220, f"README.md has {len(lines)} lines; move detail into docs/"
    first = "\n".join(lines[:40])
    assert ".venv/bin/mad demo" in first and "pip install" in first
    assert ".venv/bin/python -m pytest -q" in first


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\n.venv/bin/python -m pytest -q\n" in ci
    assert "mkdocs build --strict" in ci


def test_cli_reference_is_current():
    on_disk = (ROOT / "docs" / "reference" / "cli.md").read_text()
    assert on_disk == cli_reference.render(), "docs/reference/cli.md is stale: python tools/cli_reference.py"


def test_every_option_of_every_command_is_in_the_reference():
    text = (ROOT / "docs" / "reference" / "cli.md").read_text()
    root = typer.main.get_command(cli_reference.app)
    missing = [f"{path} {opt}" for path, cmd in cli_reference._commands(root, "mad")
               for p in cmd.params if p.param_type_name == "option" and p.name != "help"
               for opt in p.opts if f"`{opt}`" not in text.split(f"## `{path}`")[1].split("\n## ")[0]]
    assert not missing, missing


def test_every_relative_link_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_mkdocs_build_strict(tmp_path):
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    if not Path(mkdocs).exists():
        pytest.skip("mkdocs not installed (pip install -e '.[docs]')")
    run = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]


def test_benchmark_pages_and_readme_table_are_rendered_from_the_json():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "render.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, f"re-render with python benchmarks/render.py: {run.stdout}{run.stderr}"


def test_a_changed_digit_on_a_rendered_page_is_caught(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import render
    pages = tmp_path / "benchmarks"
    shutil.copytree(ROOT / "docs" / "benchmarks", pages)
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    monkeypatch.setattr(render, "PAGES_DIR", pages)
    monkeypatch.setattr(render, "README", tmp_path / "README.md")
    assert render.main(check=True) == 0
    page = pages / "storage.md"
    text = page.read_text()
    digit = next(i for i, c in enumerate(text) if c.isdigit() and i > text.index("| figure |"))
    page.write_text(text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1:])
    assert render.main(check=True) == 1


# ---- every code reference in the docs names something that exists ----------------------------------------------
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")),
         *sorted((ROOT / "benchmarks" / "notes").glob("*.md"))]
REPO_PATH = re.compile(r"(?<![\w./-])((?:mad|benchmarks|tools|tests|\.ci)/[\w./-]*\w/?)")
PATH_NAME = re.compile(r"(mad/[\w/]+\.py): (\w+)")   # `mad/cache/inputs.py: by_clips`
DOTTED = re.compile(r"`((?:mad\.)?(?:adapt|cache|extract|bench|cli|demo|plan|predict|report|runtime|options|progress"
                    r"|tables|errors|synthetic)(?:\.\w+)+)(?:\(\))?`")


def _defines(path: Path, name: str) -> bool:
    """name is defined (def, class, assignment, import) or at least written as a word in the module at path."""
    src = path / "__init__.py" if path.is_dir() else path
    return re.search(rf"\b{re.escape(name)}\b", src.read_text()) is not None


def _resolve(dotted: str):
    """`adapt.config.resolve` -> (module file, remaining names), or None when no module prefix exists."""
    parts = dotted.removeprefix("mad.").split(".")
    for cut in range(len(parts), 0, -1):
        base = ROOT / "mad" / Path(*parts[:cut])
        for candidate in (base.with_suffix(".py"), base):
            if candidate.exists():
                return candidate, parts[cut:]
    return None


def _doc_text(page: Path) -> str:
    # generated pages quote option help and JSON keys, not code references
    return "" if page.parent.name in ("reference", "benchmarks") else page.read_text()


def test_every_repository_path_cited_in_the_docs_exists():
    def exists(page, p):  # a path from the root or the page, or the prefix of a file name (`results/demo_*`)
        return any((base / p).exists() or any(base.glob(p + "*")) for base in (ROOT, ROOT / "mad", page.parent))
    missing = [f"{page.relative_to(ROOT)}: {p}" for page in PAGES for p in REPO_PATH.findall(_doc_text(page))
               if not exists(page, p)]
    assert not missing, missing


def test_every_function_and_module_cited_in_the_docs_exists():
    stale = []
    for page in PAGES:
        text = _doc_text(page)
        for path, name in PATH_NAME.findall(text):
            if not (ROOT / path).exists() or not _defines(ROOT / path, name):
                stale.append(f"{page.relative_to(ROOT)}: {path}: {name}")
        for dotted in DOTTED.findall(text):
            if dotted.rsplit(".", 1)[1] in ("json", "jsonl", "csv", "txt", "md", "py", "pt", "html"):
                continue  # a file name (`errors.jsonl`), not a module
            found = _resolve(dotted)
            if found is None or any(not _defines(found[0], n) for n in found[1][:1]):
                stale.append(f"{page.relative_to(ROOT)}: {dotted}")
    assert not stale, stale


def test_the_code_map_names_what_each_file_holds():
    """Each line of docs/code-map.md's tree names a file that exists, and the code names on it (snake_case with an
    underscore, CamelCase) occur in that file: a renamed function or a moved class fails here."""
    text = (ROOT / "docs" / "code-map.md").read_text()
    tree = text.split("```", 2)[1]
    package, stale = ROOT / "mad", []
    for line in tree.splitlines():
        head = re.match(r"(mad/[\w/]*)\s", line) or re.match(r"\s{2}(\w+\.py)\s", line)
        if line.startswith("mad/") and head and head.group(1).endswith("/"):
            package = ROOT / head.group(1)
        if not head:
            continue
        target = ROOT / head.group(1) if line.startswith("mad/") else package / head.group(1)
        if not target.exists():
            stale.append(f"missing file {target.relative_to(ROOT)}")
            continue
        if target.is_dir():
            continue
        described = line[head.end():]
        for name in re.findall(r"(?<![\w.-])([A-Za-z_]\w*)(?![\w-])", described):
            if ("_" in name.strip("_") or re.fullmatch(r"[A-Z][a-z]+[A-Z]\w*", name)) and not _defines(target, name):
                stale.append(f"{target.relative_to(ROOT)}: {name}")
    assert not stale, stale


def test_a_changed_figure_in_prose_is_caught(tmp_path, monkeypatch):
    """A figure quoted in the README's or a docs page's prose between <!--fig ...--> markers is rendered from its
    JSON: editing it by hand fails the check, and a marker naming a missing key fails the render."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import render
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    monkeypatch.setattr(render, "PAGES_DIR", docs / "benchmarks")
    monkeypatch.setattr(render, "README", tmp_path / "README.md")
    assert render.main(check=True) == 0
    for page in (tmp_path / "README.md", docs / "install.md"):
        text = page.read_text()
        marker = text.index("<!--fig demo_time.json")
        digit = next(i for i in range(text.index("-->", marker), len(text)) if text[i].isdigit())
        page.write_text(text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1:])
        assert render.main(check=True) == 1
        page.write_text(text)
    assert render.main(check=True) == 0
    (docs / "install.md").write_text('<!--fig demo_time.json {d["no such key"]}-->1<!--/fig-->\n')
    with pytest.raises(SystemExit, match="no such key"):
        render.main(check=True)


def test_prose_pages_quote_their_headline_figures_through_markers():
    """The demo's time and accuracies in README.md and docs/install.md come from demo_time.json, not typed."""
    for page in (ROOT / "README.md", ROOT / "docs" / "install.md"):
        assert page.read_text().count("<!--fig demo_time.json") >= 5, page


def test_a_result_goes_to_the_page_of_its_longest_prefix():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import render

    assert render.page_of("plan_sweep_k400.json") == "sweep"
    assert render.page_of("plan_ViT-B-16_k400.json") == "storage"
    assert render.page_of("bench_sweep_cpu.json") == "sweep"
    assert render.page_of("nothing_known.json") == "other"


def _changed_digit_after(text: str, start: int) -> str:
    digit = next(i for i in range(start, len(text)) if text[i].isdigit())
    return text[:digit] + str((int(text[digit]) + 1) % 10) + text[digit + 1:]


def test_a_changed_figure_in_a_script_table_or_a_benchmark_note_is_caught(tmp_path, monkeypatch):
    """benchmarks/results/*.md that scripts write beside their JSON, and the readings in benchmarks/notes/, are
    checked against the JSON too: one digit changed in either fails the check."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import render
    for name in ("docs", "benchmarks"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    monkeypatch.setattr(render, "PAGES_DIR", tmp_path / "docs" / "benchmarks")
    monkeypatch.setattr(render, "README", tmp_path / "README.md")
    monkeypatch.setattr(render, "RESULTS", tmp_path / "benchmarks" / "results")
    monkeypatch.setattr(render, "NOTES", tmp_path / "benchmarks" / "notes")
    assert render.main(check=True) == 0
    table = tmp_path / "benchmarks" / "results" / "demo_time.md"
    note = tmp_path / "benchmarks" / "notes" / "memory.md"
    for page, start in ((table, lambda t: t.index("| none |")), (note, lambda t: t.index("-->", t.index("<!--fig")))):
        text = page.read_text()
        page.write_text(_changed_digit_after(text, start(text)))
        assert render.main(check=True) == 1, page
        page.write_text(text)
    assert render.main(check=True) == 0
    assert "<!--fig" in (tmp_path / "docs" / "benchmarks" / "memory.md").read_text()  # the reading is on the page


def test_benchmark_results_hold_no_hand_written_tables():
    """Every .md under benchmarks/results is written by a script from its JSON (render.script_tables), apart from
    two captured outputs kept as they were printed (no JSON behind them)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import render
    checked = {p.name for p in render.script_tables()}
    kept_as_printed = {"quantisers.md", "evl_demo.md"}
    loose = {p.name for p in (ROOT / "benchmarks" / "results").glob("*.md")} - checked - kept_as_printed
    assert not loose, f"hand-written result pages (render them from JSON or move to benchmarks/notes/): {loose}"


def test_the_code_map_names_every_module():
    """A module added under mad/ appears in docs/code-map.md's tree by its file name (modules of a package two levels
    down, such as mad/bench/memory/, by their stem on the package's line)."""
    tree = (ROOT / "docs" / "code-map.md").read_text().split("```", 2)[1]
    words = set(re.findall(r"[\w.]+", tree))
    missing = [str(f.relative_to(ROOT)) for f in sorted((ROOT / "mad").rglob("*.py"))
               if f.name not in ("__init__.py", "__main__.py") and f.name not in words
               and not (len(f.relative_to(ROOT / "mad").parts) > 2 and f.stem in words)]
    assert not missing, f"add to docs/code-map.md: {missing}"


def test_every_option_in_the_docs_examples_exists():
    """Each `mad CMD --option` written in README.md or a docs page's examples is an option of that command today:
    a renamed or removed option fails here (the pages quote commands users copy)."""
    root = typer.main.get_command(cli_reference.app)
    options = {path: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
               for path, cmd in cli_reference._commands(root, "mad")}
    stale = []
    for page in PAGES:
        text = page.read_text()
        for line in re.findall(r"(?:^|\$ |`)(mad (?:[a-z-]+ )+[^`\n]*)", text, flags=re.M):
            words = line.split()
            path = next((" ".join(words[:n]) for n in (3, 2) if " ".join(words[:n]) in options), None)
            if path is None:
                continue  # prose such as "mad train trains ..."
            stale += [f"{page.relative_to(ROOT)}: {path} {o}" for o in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line)
                      if o not in options[path] and o != "--help"]
    assert not stale, stale
