"""What a reader checks: the command reference is the parser's, the links resolve, and the
README's runnable shell blocks run as written on a fresh directory."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tidal_ray.cli import build_parser
from tidal_ray.cli_reference import REGENERATE, reference

ROOT = Path(__file__).resolve().parent.parent
# A fence opened as ```bash runnable (or ```sh runnable) up to its closing ```.
RUNNABLE = re.compile(r"^```(?:bash|sh) runnable[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def runnable_blocks(text: str) -> list[str]:
    return [m.group(1) for m in RUNNABLE.finditer(text)]


def anchors(markdown: str) -> set[str]:
    """GitHub's ids of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.*?)\s*$", re.sub(r"^```.*?^```", "", markdown, flags=re.M | re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from all_parsers(sub)


def test_cli_reference_is_up_to_date():
    path = ROOT / "docs" / "cli.md"
    current = path.read_text() if path.exists() else ""
    assert current == reference(), f"docs/cli.md is out of date: run `{REGENERATE}`"


def test_cli_reference_names_every_command_and_flag():
    text = reference()
    for parser in all_parsers(build_parser()):
        assert f"`{parser.prog}`" in text, parser.prog
        for action in parser._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert f"`{option}" in text or f", {option}" in text, f"{parser.prog} {option}"
            if action.help and "%" not in action.help and not isinstance(action, argparse._HelpAction):
                assert " ".join(action.help.split()).replace("|", "\\|")[:40] in text, f"{parser.prog} {action.dest}"


def test_runnable_blocks_are_found():
    blocks = runnable_blocks((ROOT / "README.md").read_text())
    assert blocks, "README.md has no ```bash runnable block"
    assert all("tidal-ray" in b for b in blocks)
    assert runnable_blocks("```bash runnable\necho a\n```\n```bash\necho b\n```\n") == ["echo a\n"]


@pytest.mark.parametrize("page", ["README.md", "benchmarks/README.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_resolve(page):
    text = (ROOT / page).read_text()
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # links in code blocks are not links
    missing = []
    for target in LINK.findall(text):
        path, _, anchor = target.partition("#")
        if re.match(r"[a-z]+:", path):
            continue
        file = (ROOT / page).parent.joinpath(path) if path else ROOT / page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file.read_text())):
            missing.append(target)
    assert not missing, f"{page}: links to missing files or headings: {missing}"


@pytest.mark.slow
def test_readme_runnable_blocks_run_as_written(tmp_path):
    """Each README block fenced ```bash runnable, in order, in one empty directory, with
    this environment's ``tidal-ray`` first on PATH; any failing command fails the test."""
    bin_dir = os.path.dirname(sys.executable)
    assert os.path.exists(os.path.join(bin_dir, "tidal-ray")), f"no tidal-ray beside {sys.executable}"
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    for n, block in enumerate(runnable_blocks((ROOT / "README.md").read_text()), 1):
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=1200)
        assert out.returncode == 0, (f"README runnable block {n} failed (exit {out.returncode}):\n{block}\n"
                                     f"--- stdout (end)\n{out.stdout[-3000:]}\n--- stderr (end)\n{out.stderr[-3000:]}")
