"""The documentation speaks to users and matches the published artefacts (fast: no Ray, no model).

- README.md's result tables are what scripts/readme_tables.py makes from docs/results/;
- no Markdown page names a working session, an internal issue number or a path outside the
  repository;
- every docs/ path a docstring or comment cites exists;
- no published artefact under docs/results/ holds an absolute path of the machine that made it
  (scripts/relative_paths.py rewrites them).
Each check is also run once on a planted fault, so a check that can no longer fail is noticed.
"""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


readme_tables = _script("readme_tables")
relative_paths = _script("relative_paths")


# --- (a) README tables are current -------------------------------------------------------------

def test_readme_tables_are_current():
    _, stale = readme_tables.render((ROOT / "README.md").read_text(encoding="utf-8"))
    assert stale == [], f"stale README tables {stale}: run `python scripts/readme_tables.py`"


def test_readme_tables_check_names_a_tampered_table(tmp_path):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    tampered = text.replace("| Std-CoT | 18.4 [15.0, 21.9] |", "| Std-CoT | 19.4 [15.0, 21.9] |", 1)
    assert tampered != text
    readme = tmp_path / "README.md"
    readme.write_text(tampered, encoding="utf-8")
    assert readme_tables.main(["--check", "--readme", str(readme)]) == 1
    assert readme_tables.render(tampered)[1] == ["gpu-study"]
    assert readme_tables.main(["--readme", str(readme)]) == 0          # rewrites it...
    assert readme.read_text(encoding="utf-8") == text                   # ...back to the current README
    gone = re.sub(r"<!-- table:train-speed:begin.*?<!-- table:train-speed:end -->\n", "", text, flags=re.S)
    assert readme_tables.render(gone)[1] == ["train-speed (markers missing)"]


# --- (b) Markdown for users ----------------------------------------------------------------------

INTERNAL = [
    (re.compile(r"\.\./shared|\.\./\.library", re.I), "a path outside the repository"),
    (re.compile(r"/work/", re.I), "a path outside the repository"),
    (re.compile(r"\bsessions? \d+|\b(?:this|last|next|earlier) sessions?\b", re.I), "a working session"),
    (re.compile(r"\bissues? #?\d+", re.I), "an internal issue number"),
    (re.compile(r"(?<![#\w&/])#\d+\b"), "an issue number"),
]


def markdown_files() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))


def internal_references(text: str) -> list[str]:
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        for pattern, what in INTERNAL:
            for m in pattern.finditer(line):
                found.append(f"line {number}: {what}: {m.group(0)!r}")
    return found


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_names_no_session_issue_or_outside_path(path):
    assert internal_references(path.read_text(encoding="utf-8")) == []


def test_internal_reference_patterns_catch_what_they_are_for():
    bad = ["see ../shared/env.md", "under /work/main/runs", "as in session 12", "(issue 9)",
           "Issue 5's bar", "fixed this session", "tracked in #23"]
    good = ["answers end with `#### 72`", "ray#30861 upstream", "Ray's session folder", "&#39;"]
    assert all(internal_references(line) for line in bad)
    assert not any(internal_references(line) for line in good)


# --- (c) cited docs exist ------------------------------------------------------------------------

CITED = re.compile(r"docs/[A-Za-z0-9_./-]+")


def cited_doc_paths() -> list[tuple[str, str]]:
    """(file:line, cited path) for every docs/ path in cwt_ray/, benchmarks/, jobs/, configs/."""
    out = []
    for top in ("cwt_ray", "benchmarks", "jobs", "configs"):
        for path in sorted((ROOT / top).rglob("*")):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            for number, line in enumerate(text.splitlines(), start=1):
                for m in CITED.finditer(line):
                    glob = line[m.end():m.end() + 1] == "*"
                    out.append((f"{path.relative_to(ROOT)}:{number}", m.group(0).rstrip(".") + ("*" if glob else "")))
    return out


def missing(cited: str) -> bool:
    if cited.endswith("*"):
        return not any(ROOT.glob(cited))
    return not (ROOT / cited).exists()


def test_every_cited_doc_exists():
    cited = cited_doc_paths()
    assert any(path == "docs/method.md" for _, path in cited)
    assert [f"{where}: {path}" for where, path in cited if missing(path)] == []


def test_cited_doc_check_catches_a_missing_doc():
    assert missing("docs/no-such-page.md") and missing("docs/results/no-such-run-*")
    assert not missing("docs/results/gpu-h200-2026-11-26/gpu-*") and not missing("docs/results/")


# --- (d) published artefacts hold no machine paths -------------------------------------------------

ABSOLUTE = re.compile(r"(?<![\w.~-])/(?:work|tmp|home|root)/")


def test_published_artefacts_hold_no_absolute_paths():
    files = relative_paths.text_files(RESULTS)
    assert len(files) > 50
    found = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in files
             for m in ABSOLUTE.finditer(p.read_text(encoding="utf-8", errors="replace"))]
    assert found == [], f"absolute paths left ({len(found)}): run `python scripts/relative_paths.py`"


def test_relative_paths_rewrites_a_planted_sweep(tmp_path):
    sweep = tmp_path / "results" / "my-sweeps-2026-01-01" / "my-sweep"
    trial = sweep / "trials" / "abc12345"
    trial.mkdir(parents=True)
    (sweep / "sweep.json").write_text("{}")
    (sweep / "trials.json").write_text(json.dumps(
        [{"run_dir": "/work/main/runs/my-sweep/trials/abc12345", "accuracy": 0.05, "tokens": 72.79}]))
    (sweep / "report.md").write_text("Report: /work/main/runs/my-sweep/report.md; "
                                     "`optuna-dashboard sqlite:////work/main/runs/my-sweep/optuna.db`.\n")
    (trial / "config.yaml").write_text("name: abc12345\nstorage_path: /work/main/runs/my-sweep/trials\nlr: 1.0e-4\n")
    (trial / "console.log").write_text("student in /root/.cache/cwt-ray/smollm2-135m\r\n"
                                       "timed: /work/main/.venv/bin/python -m cwt_ray\n")
    root = str(tmp_path / "results")
    assert relative_paths.main(["--root", root, "--check"]) == 1
    assert relative_paths.main(["--root", root]) == 0
    assert json.loads((sweep / "trials.json").read_text()) == [
        {"run_dir": "trials/abc12345", "accuracy": 0.05, "tokens": 72.79}]
    assert (sweep / "report.md").read_text() == ("Report: report.md; `optuna-dashboard sqlite:///optuna.db`.\n")
    assert (trial / "config.yaml").read_text() == "name: abc12345\nstorage_path: ..\nlr: 1.0e-4\n"
    assert (trial / "console.log").read_bytes() == (b"student in ~/.cache/cwt-ray/smollm2-135m\r\n"
                                                   b"timed: .venv/bin/python -m cwt_ray\n")
    assert relative_paths.main(["--root", root, "--check"]) == 0    # idempotent


def test_relative_paths_refuses_to_change_a_number(tmp_path):
    with pytest.raises(SystemExit, match="numeric leaves differ"):
        relative_paths.check_numbers(Path("x.json"), '{"a": [1, 2.5]}', '{"a": [1, 2.50001]}')
    relative_paths.check_numbers(Path("x.json"), '{"p": "/tmp/runs/x", "a": 1}', '{"p": "x", "a": 1}')
