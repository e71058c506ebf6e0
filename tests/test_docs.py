"""The documentation (README.md, docs/, mkdocs.yml): the site builds with ``mkdocs build --strict``, every
link and anchor resolving, and every shell command and Python snippet runs as written or says why not.

Each fenced ``bash`` / ``python`` block carries a marker, an HTML comment on the line before its fence:

    <!-- snippet: run -->                    run by test_the_run_blocks_of_a_page_run_as_written
    <!-- snippet: run needs=detectron2 -->   the same, when Detectron2 is importable (always under CI)
    <!-- snippet: skip <reason> -->          not run (GPUs, a cluster, ImageNet, GitHub, ...): the reason is required

The run blocks of a page run in order, in one temporary folder laid out like a checkout (the repository's
top-level folders linked into it, ``.venv`` linked to the running interpreter's environment, that
environment's ``bin`` first on PATH), so a page's early blocks make the tiny data its later ones use.
bash blocks run with ``bash -eo pipefail``, python blocks with the environment's python. That test is marked
``slow``: its 8 pages took 12.6 minutes together on this project's shared 2-core machine (load ~4), the
README's quick start and the detection page most (each fine-tunes Mask R-CNN); the rest take seconds.
"""

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from frameworks import require

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
CODE = {"bash": "bash", "sh": "bash", "shell": "bash", "console": "bash", "python": "python", "py": "python",
        "pycon": "python"}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(?P<mode>\S+)(?P<rest>.*?)\s*-->\s*$")
# the repository's own outputs are not part of a checkout's layout
NOT_LINKED = {"outputs", "site", "work_dirs", "out", "build", "dist"}


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    kind: str  # "bash" or "python"
    mode: str  # "run", "skip", or "" (no marker)
    rest: str  # the skip reason, or run's needs=...
    code: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def needs(self) -> list[str]:
        found = re.search(r"needs=(\S+)", self.rest)
        return found.group(1).split(",") if found else []


def blocks(text: str, page: str) -> list[Block]:
    """The fenced bash / python blocks of a markdown text, with the marker on the line before each."""
    lines, found, i = text.splitlines(), [], 0
    while i < len(lines):
        opened = FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        indent, fence, lang = opened["indent"], opened["fence"], opened["lang"].lower()
        end = i + 1
        while end < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[end]):
            end += 1
        if lang in CODE:
            marker = MARKER.match(lines[i - 1]) if i > 0 else None
            body = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:end])
            found.append(Block(page, i + 1, CODE[lang], marker["mode"] if marker else "",
                               marker["rest"].strip() if marker else "", body + "\n"))
        i = end + 1
    return found


def marker_errors(found: list[Block]) -> list[str]:
    errors = []
    for block in found:
        if block.mode not in ("run", "skip"):
            errors.append(f"{block.where}: a {block.kind} block without <!-- snippet: run --> or "
                          "<!-- snippet: skip <reason> --> on the line before its fence")
        elif block.mode == "skip" and not block.rest:
            errors.append(f"{block.where}: <!-- snippet: skip --> needs a reason")
        elif block.mode == "run" and block.rest and not re.fullmatch(r"needs=[\w.,]+", block.rest):
            errors.append(f"{block.where}: unknown words after 'run': {block.rest!r} (only needs=module,...)")
    return errors


def page_blocks() -> dict[str, list[Block]]:
    return {str(p.relative_to(ROOT)): blocks(p.read_text(), str(p.relative_to(ROOT))) for p in PAGES}


def test_every_code_block_is_marked_run_or_skip_with_a_reason():
    found = [b for bs in page_blocks().values() for b in bs]
    assert found, "no code blocks found: is the extraction broken?"
    errors = marker_errors(found)
    assert not errors, "\n".join(errors)


def test_the_marker_check_finds_unmarked_blocks_and_skips_without_a_reason():
    text = ("```bash\necho unmarked\n```\n\n<!-- snippet: skip -->\n```python\nprint(1)\n```\n\n"
            "<!-- snippet: run -->\n```bash\necho ok\n```\n\n- a list\n\n  <!-- snippet: skip needs a GPU -->\n"
            "  ```bash\n  nvidia-smi\n  ```\n\n```text\nnot code: no marker needed\n```\n")
    found = blocks(text, "x.md")
    assert [(b.line, b.kind, b.mode) for b in found] == [(1, "bash", ""), (6, "python", "skip"),
                                                         (11, "bash", "run"), (18, "bash", "skip")]
    assert found[3].code == "nvidia-smi\n" and found[3].rest == "needs a GPU"
    errors = marker_errors(found)
    assert len(errors) == 2 and errors[0].startswith("x.md:1:") and errors[1].startswith("x.md:6:")


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    require("mkdocs")
    require("material")
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


def warnings(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if re.match(r"^\s*WARNING\b", line)]


def test_the_site_builds_strictly_without_a_warning(tmp_path):
    proc = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode == 0 and not warnings(proc), proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "models" / "index.html").is_file()


def test_the_strict_build_fails_on_a_broken_link_an_anchor_and_a_page_left_out_of_the_nav(tmp_path):
    """The build above can fail: the same site with a link to a missing page, a missing anchor, a repo
    file outside docs/ and a page the nav does not list."""
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs)
    config = tmp_path / "mkdocs.yml"
    config.write_text((ROOT / "mkdocs.yml").read_text())
    with open(docs / "index.md", "a") as f:
        f.write("\n[a](no-such-page.md) [b](api.md#no-such-anchor) [c](../pretrain/resnet50.yaml)\n")
    (docs / "orphan.md").write_text("# Not in the nav\n")
    proc = mkdocs_build(config, tmp_path / "site")
    assert proc.returncode != 0
    found, log = "\n".join(warnings(proc)), proc.stdout + proc.stderr
    for expected in ("no-such-page.md", "#no-such-anchor", "../pretrain/resnet50.yaml", 'not included in the "nav"'):
        assert expected in found, (expected, log[-3000:])
    assert "orphan.md" in log.split('not included in the "nav"', 1)[1], log[-3000:]


RUN_PAGES = [page for page, bs in page_blocks().items() if any(b.mode == "run" for b in bs)]


def checkout_layout(work: Path) -> dict:
    """``work`` laid out like a checkout; the environment its blocks run in."""
    for entry in ROOT.iterdir():
        if not entry.name.startswith(".") and entry.name not in NOT_LINKED:
            (work / entry.name).symlink_to(entry)
    venv = Path(sys.prefix)
    (work / ".venv").symlink_to(venv)
    path = os.pathsep.join([str(venv / "bin"), os.environ.get("PATH", "")])
    pythonpath = os.pathsep.join(p for p in [str(ROOT), os.environ.get("PYTHONPATH", "")] if p)
    return {**os.environ, "PATH": path, "PYTHONPATH": pythonpath, "MPLBACKEND": "Agg",
            "NO_MKDOCS_2_WARNING": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("page", RUN_PAGES)
def test_the_run_blocks_of_a_page_run_as_written(page, tmp_path):
    found = [b for b in page_blocks()[page] if b.mode == "run"]
    for module in sorted({m for b in found for m in b.needs}):
        require(module)
    env = checkout_layout(tmp_path)
    for block in found:
        if block.kind == "bash":
            cmd = ["bash", "-eo", "pipefail", "-c", block.code]
        else:
            cmd = [sys.executable, "-c", block.code]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (
            f"{block.where} failed (exit {proc.returncode}):\n{block.code}\n--- stdout\n{proc.stdout[-3000:]}"
            f"\n--- stderr\n{proc.stderr[-3000:]}")
    for entry in tmp_path.iterdir():  # what the blocks wrote (checkpoints: ~1 GB a page) is kept only on failure
        if not entry.is_symlink():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
