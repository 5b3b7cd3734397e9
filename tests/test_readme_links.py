"""Everything the README points at exists: relative links (and their #anchors), the extras of
every `pip install`, and every `es-stream ...` command line parses with the real CLI parser."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

from es_stream.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)  # '#' in code is no heading
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+://", t)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_exists(doc):
    broken = []
    for target in links(doc):
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{doc.name} links to what is not there:\n" + "\n".join(broken)


def test_every_docs_path_the_readme_names_exists():
    named = set(re.findall(r"`((?:docs|tools|pipelines|tests)/[\w./-]+\.(?:md|py))`",
                           README.read_text()))
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"README names files that do not exist: {missing}"


def pip_lines(text: str) -> list[str]:
    return [m.group(0) for m in re.finditer(r"pip install [^`\n]+", text)]


def test_every_pip_install_names_real_extras_and_no_package_index_release():
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
                 ["optional-dependencies"])
    bad = []
    for line in pip_lines(README.read_text()):
        for words in shlex.split(line.split("#")[0])[2:]:
            if words.startswith("-"):
                continue
            m = re.match(r"^(es-stream|\.|[\w./-]*\.whl)(?:\[([\w,-]+)\])?$", words)
            if not m:
                continue  # another package (torch==...): pip resolves it, nothing of ours
            if m.group(1) == "es-stream":
                bad.append(f"{line!r}: es-stream is installed from a checkout or a wheel, not "
                           "the package index")
            for extra in filter(None, (m.group(2) or "").split(",")):
                if extra not in extras:
                    bad.append(f"{line!r}: no extra [{extra}] in pyproject.toml")
    assert not bad, "\n".join(bad)


def block_commands(text: str) -> list[str]:
    """Every whole `es-stream <command> ...` line of the README's code blocks."""
    lines, language = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            language = None if language is not None else (line[3:].strip() or "text")
        elif language in ("bash", "sh", "console", "text") and line.startswith("es-stream "):
            lines.append(line)
    return lines


def inline_commands(text: str) -> list[str]:
    """Every `es-stream <command> ...` fragment in the prose (flags named, arguments elided)."""
    return [" ".join(m.split()) for m in re.findall(r"`(es-stream [a-z]+[^`]*)`", text)]


def as_argv(line: str) -> list[str]:
    line = line.split("  #")[0].split(" # ")[0]
    line = re.sub(r"\[[^\]]*\]", "", line)              # optional parts: [--epoch N]
    line = re.sub(r"<[^>]*>", "x", line)                 # placeholders: <pattern|dir|urls...>
    return shlex.split(line)[1:]


def subcommands() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_every_es_stream_command_line_in_the_readme_parses():
    parser = build_parser()
    lines = block_commands(README.read_text())
    assert len(lines) >= 5, lines
    failures = []
    for line in lines:
        try:
            parser.parse_args(as_argv(line))
        except SystemExit:
            failures.append(line)
    assert not failures, "README commands that the CLI does not parse:\n" + "\n".join(failures)


def test_every_command_and_flag_the_prose_names_exists():
    commands = subcommands()
    failures = []
    for fragment in inline_commands(README.read_text()):
        words = as_argv(fragment)
        sub = commands.get(words[0])
        if sub is None:
            failures.append(f"{fragment}: no command {words[0]!r}")
            continue
        flags = {s for a in sub._actions for s in a.option_strings}
        failures += [f"{fragment}: {words[0]} has no {w}" for w in words[1:]
                     if w.startswith("-") and w.split("=")[0] not in flags]
    assert not failures, "\n".join(failures)


def test_readme_names_what_a_new_user_needs():
    """The CPU-only install line, the extras of the README's tools, the run record and the
    pruner's run-length/overwrite arguments are in the README, and no code comment claims a
    manifest is written after the last epoch."""
    text = README.read_text(encoding="utf-8")
    for needed in ("pip install torch --index-url https://download.pytorch.org/whl/cpu",
                   "[plot]", "[query]", "_run.json", "overwrite=True", "epochs=N",
                   "prune --overwrite", "--no-progress", "no manifest is written after the last",
                   "keep=2", "first_visit_fraction", "--all --format mds"):
        assert needed in text, needed
    assert "# writes manifests/epoch=<epoch+1>" not in text
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"plot", "query"} <= set(extras)
