"""The repository stands on its own (issue 11, item 6): code and docs name the Docker image
``mlan/postfix-amavis`` where they mean it, and no file cites notes kept outside the
repository, which a reader of the repository cannot open.

Files are those git knows (tracked, or new and not ignored); read-only git commands only.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# Built from parts so that this file does not match itself.
_SEED = "se" + "ed"
# The project's old name for the image. "the seed corpus" (fuzzing) and "the seed is fixed"
# (a random seed) are other meanings and stay.
IMAGE_AS_SEED = re.compile(
    rf"\bthe\s+{_SEED}\b(?!\s+(?:corpus|is\s+fixed))|\b{_SEED}(?:'s|\s+image|\s+README)\b",
    re.IGNORECASE)
OUTSIDE_PATH = re.compile(r"\.\./shared\b|\bshared/(?:notes|design)\b")


# Not part of the repository: what .gitignore keeps out, for a copy without git.
_UNTRACKED = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache",
              ".hypothesis", "build", "var", "work", "crashes", "logs"}


def repository_files() -> list[Path]:
    """The files git knows (tracked, or new and not ignored); in a copy without git (a unit
    test run on a copy as another user, say) every file outside the ignored folders."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return sorted(p for p in REPO.rglob("*") if p.is_file()
                      and not _UNTRACKED.intersection(p.relative_to(REPO).parts)
                      and not p.name.endswith(".egg-info"))
    # safe.directory: a checkout owned by another user is still listed
    proc = subprocess.run(["git", "-c", f"safe.directory={REPO}", "ls-files", "-z", "--cached",
                           "--others", "--exclude-standard"],
                          cwd=REPO, capture_output=True, timeout=60, check=True)
    files = [REPO / name for name in sorted(set(proc.stdout.decode().split("\0"))) if name]
    assert REPO / "README.md" in files      # the scan below sees the repository
    return files


def offending_lines(pattern: re.Pattern[str]) -> list[str]:
    found = []
    for path in repository_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
            continue        # deleted in the working tree, a submodule, or not text
        for match in pattern.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append(f"{path.relative_to(REPO)}:{line}: {match.group(0)!r}")
    return found


def test_issue11_no_file_calls_the_image_by_its_old_name() -> None:
    assert offending_lines(IMAGE_AS_SEED) == []


def test_issue11_no_file_cites_a_path_outside_the_repository() -> None:
    assert offending_lines(OUTSIDE_PATH) == []


@pytest.mark.parametrize(("text", "flagged"), [
    (f"as in the {_SEED} (RSA keys)", True),
    (f"The {_SEED.title()}'s queries are templates", True),
    (f"the {_SEED}\nimage's table", True),
    (f"{_SEED} image", True),
    (f"the {_SEED} corpus runs in tests", False),
    (f"the {_SEED}\ncorpus", False),
    (f"the {_SEED} is fixed (PYMTA_FUZZ_SEED)", False),
    (f"a 32-byte {_SEED}", False),
    ("as in mlan/postfix-amavis", False),
])
def test_the_image_pattern_spares_the_other_meanings(text: str, flagged: bool) -> None:
    assert bool(IMAGE_AS_SEED.search(text)) is flagged


@pytest.mark.parametrize(("text", "flagged"), [
    ("see `sha" "red/notes/x.md`", True),
    ("(``../sha" "red/design``)", True),
    ("/work/sha" "red/design/architecture.md", True),
    ("fuzz/work/ is gitignored", False),
    ("tests/services/README.md", False),
])
def test_the_path_pattern(text: str, flagged: bool) -> None:
    assert bool(OUTSIDE_PATH.search(text)) is flagged
