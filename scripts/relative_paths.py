"""Rewrite the machine's absolute paths in published artefacts (docs/results/) as relative ones.

    python scripts/relative_paths.py            # rewrite in place, print what changed
    python scripts/relative_paths.py --check    # change nothing; exit 1 if a file would change

A run or sweep writes the absolute paths of the machine that made it into its reports, configs,
logs and JSON (`/work/main/runs/cpu-reduced-sweep-skip/trials/412a56e7`, `storage_path: /tmp/runs`).
Published under docs/results/<set>/, those paths name folders that exist nowhere else. Here:

- each published set directory (docs/results/<set>/, or docs/results/ itself for a file lying
  there) stands for the machine's storage folder, the folder holding run directories: the path's
  prefix up to its last `runs` component (`/work/main/runs`, `/tmp/runs`), or a path given as
  `storage_path=...` itself (a benchmark's scratch storage, `/tmp/st`);
- a path under that folder becomes relative to the run or sweep directory the file belongs to
  (the nearest folder above it holding a config.yaml, sweep.json or trials.json; else the set
  directory): `trials/412a56e7` in a sweep's report.md, `..` for a trial's own storage_path,
  `sqlite:///optuna.db`, `cpu-reduced/report.md` in a log beside the run directories;
- a path inside the checkout that made the run (the folder holding that `runs` folder) becomes
  relative to the repository root (`.venv/bin/python`), as the commands are run from there;
- a path in a home folder (`/root/...`, `/home/<user>/...`) starts with `~/` instead.

Only the path text changes. The script checks this itself: every JSON file (and every line of a
JSONL file) and every YAML file is parsed before and after, and each numeric leaf must be
identical at the same place; a file that fails the check is not written. Running it again changes
nothing. An absolute path none of the rules above covers is left as it is, named on stderr, and
the exit status is 1.
"""
from __future__ import annotations

import argparse
import json
import os
import posixpath
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
TEXT_SUFFIXES = {".md", ".html", ".json", ".jsonl", ".yaml", ".yml", ".csv", ".log", ".txt"}
RUN_MARKERS = ("config.yaml", "sweep.json", "trials.json")

# An absolute path on a Linux or macOS machine, starting at a top folder where runs, checkouts
# and caches live. It ends at whitespace, quotes, brackets, '<', '&' (an HTML entity) or ','.
ABSOLUTE = re.compile(r"(?<![\w.~-])/(?:work|tmp|home|root|mnt|Users|private|var/folders|scratch|data)"
                      r"(?:/[^\s\"'`<>()\[\]{},;|&*]*)?")
STORAGE_OVERRIDE = re.compile(r"storage_path=$")


def set_dir(path: Path, results: Path) -> Path:
    """The published set a file belongs to: docs/results/<set>/, or docs/results/ itself."""
    rel = path.relative_to(results)
    return results / rel.parts[0] if len(rel.parts) > 1 else results


def owner_dir(path: Path, results: Path) -> Path:
    """The run or sweep directory a file belongs to (the nearest one above it), else its set."""
    top = set_dir(path, results)
    d = path.parent
    while d != top and top in d.parents:
        if any((d / m).is_file() for m in RUN_MARKERS):
            return d
        d = d.parent
    return top


def split_storage(abs_path: str, storage_hint: bool) -> tuple[str, str] | None:
    """(storage folder, path below it) when the path lies in a folder of run directories."""
    parts = abs_path.rstrip("/").split("/")
    if "runs" in parts[1:]:
        i = len(parts) - 1 - parts[::-1].index("runs")
        return "/".join(parts[: i + 1]), "/".join(parts[i + 1:])
    if storage_hint:                      # storage_path=/tmp/st: the storage folder itself
        return abs_path.rstrip("/"), ""
    return None


def home_relative(abs_path: str) -> str | None:
    m = re.match(r"^/(?:root|home/[^/]+|Users/[^/]+)(/.*)?$", abs_path)
    return "~" + (m.group(1) or "") if m else None


def rewrite_path(abs_path: str, owner_rel: str, checkouts: set[str], storage_hint: bool) -> str | None:
    """The relative form of one absolute path, or None when no rule covers it.

    owner_rel: the owner directory's path relative to its set directory ('' for the set itself)."""
    trailing = "/" if abs_path.endswith("/") and len(abs_path) > 1 else ""
    found = split_storage(abs_path, storage_hint)
    if found is not None:
        storage, below = found
        target = posixpath.join("/S", below) if below else "/S"
        owner = posixpath.join("/S", owner_rel) if owner_rel else "/S"
        rel = posixpath.relpath(target, owner)
        return rel + (trailing if rel != "." else "")
    for checkout in sorted(checkouts, key=len, reverse=True):
        if abs_path == checkout or abs_path.startswith(checkout + "/"):
            rel = abs_path[len(checkout) + 1:] or "."
            return rel
    return home_relative(abs_path)


def checkouts_of(texts: dict[Path, str]) -> set[str]:
    """Folders that held a `runs` folder on the machine (the checkouts the runs were made from)."""
    found = set()
    for text in texts.values():
        for m in ABSOLUTE.finditer(text):
            parts = m.group(0).rstrip("/").split("/")
            if "runs" in parts[1:]:
                i = len(parts) - 1 - parts[::-1].index("runs")
                if i > 2:
                    found.add("/".join(parts[:i]))
    return found


def rewrite_text(text: str, owner_rel: str, checkouts: set[str]) -> tuple[str, list[tuple[str, str]], list[str]]:
    """(new text, [(old, new) paths], [paths left as they were])."""
    changes, unknown, out, last = [], [], [], 0
    for m in ABSOLUTE.finditer(text):
        path = m.group(0)
        while path.endswith((".", ":")) and len(path) > 1:   # sentence punctuation after a path
            path = path[:-1]
        start, end = m.start(), m.start() + len(path)
        hint = bool(STORAGE_OVERRIDE.search(text[max(0, start - 13):start]))
        new = rewrite_path(path, owner_rel, checkouts, hint)
        if new is None:
            unknown.append(path)
            continue
        out.append(text[last:start])
        out.append(new)
        last = end
        changes.append((path, new))
    out.append(text[last:])
    return "".join(out), changes, unknown


def numeric_leaves(obj, where: str = "") -> list[tuple[str, object]]:
    """Every number in a parsed JSON/YAML document with its place (bools are not numbers here)."""
    if isinstance(obj, dict):
        return [leaf for k, v in obj.items() for leaf in numeric_leaves(v, f"{where}/{k}")]
    if isinstance(obj, list):
        return [leaf for i, v in enumerate(obj) for leaf in numeric_leaves(v, f"{where}[{i}]")]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [(where, repr(obj))]
    return []


def parsed(path: Path, text: str) -> list:
    if path.suffix == ".json":
        return [json.loads(text)]
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if path.suffix in (".yaml", ".yml"):
        return list(yaml.safe_load_all(text))
    return []


def check_numbers(path: Path, before: str, after: str) -> None:
    """Raise unless every numeric leaf of the parsed file is the same before and after."""
    a = [numeric_leaves(doc, f"#{i}") for i, doc in enumerate(parsed(path, before))]
    b = [numeric_leaves(doc, f"#{i}") for i, doc in enumerate(parsed(path, after))]
    if a != b:
        raise SystemExit(f"{shown(path)}: numeric leaves differ after rewriting paths; nothing written")


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if ROOT in path.parents else str(path)


def text_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file would change")
    ap.add_argument("--root", type=Path, default=RESULTS, help="published artefacts (default docs/results)")
    args = ap.parse_args(argv)
    results = args.root.resolve()

    texts = {p: p.read_bytes().decode("utf-8") for p in text_files(results)}   # newlines kept as they are
    checkouts = checkouts_of(texts)
    changed, kinds, unknown_all, json_checked = [], {}, [], 0
    for path, text in texts.items():
        top, owner = set_dir(path, results), owner_dir(path, results)
        owner_rel = owner.relative_to(top).as_posix() if owner != top else ""
        new, changes, unknown = rewrite_text(text, owner_rel, checkouts)
        unknown_all += [(path, u) for u in unknown]
        if path.suffix in (".json", ".jsonl", ".yaml", ".yml"):
            check_numbers(path, text, new)
            json_checked += 1
        if new == text:
            continue
        changed.append((path, len(changes)))
        for old, _ in changes:
            kind = re.sub(r"/(runs)(/.*)?$", r"/\1/...", old)
            kind = re.sub(r"^(/(?:root|home/[^/]+))/.*$", r"\1/...", kind)
            kinds[kind] = kinds.get(kind, 0) + 1
        if not args.check:
            path.write_bytes(new.encode("utf-8"))

    verb = "would change" if args.check else "changed"
    print(f"{len(changed)} of {len(texts)} text files {verb} ({sum(n for _, n in changed)} paths); "
          f"numbers checked in {json_checked} JSON/JSONL/YAML files")
    for path, n in changed:
        print(f"  {shown(path)}: {n}")
    for kind, n in sorted(kinds.items()):
        print(f"  kind {kind}: {n}")
    for path, u in unknown_all:
        print(f"{shown(path)}: absolute path left as it is: {u}", file=sys.stderr)
    return 1 if unknown_all or (args.check and changed) else 0


if __name__ == "__main__":
    sys.exit(main())
