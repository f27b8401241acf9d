"""The repository stands alone: nothing in it points at a document it does not ship."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Developers' private references, not part of the product; spelt in pieces so that this file
# does not cite them itself.
OUTSIDE = ("PAPERS" + ".md", "../" + "shared")


def tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in listed if not name.endswith((".png", ".csv"))]


def test_no_file_cites_a_document_outside_the_repository():
    citing = [str(path.relative_to(ROOT)) for path in tracked_files()
              if path.is_file()
              and any(name in path.read_text(errors="ignore") for name in OUTSIDE)]
    assert citing == []


def test_every_docs_page_a_file_cites_exists():
    cited = {(str(path.relative_to(ROOT)), page) for path in tracked_files() if path.is_file()
             for page in re.findall(r"docs/[\w.-]+\.md", path.read_text(errors="ignore"))}
    assert [pair for pair in sorted(cited) if not (ROOT / pair[1]).exists()] == []
