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


def test_a_result_goes_to_the_page_of_its_longest_prefix():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import render

    assert render.page_of("plan_sweep_k400.json") == "sweep"
    assert render.page_of("plan_ViT-B-16_k400.json") == "storage"
    assert render.page_of("bench_sweep_cpu.json") == "sweep"
    assert render.page_of("nothing_known.json") == "other"
