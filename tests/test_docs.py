"""The README and the docs site agree with what they describe (no engine, no docs build:
`make docs` builds the site strictly).

- The README's quickstart snippets are the files in docs/quickstart/ (which the site's home
  page includes), so the snippets that were run are the ones shown.
- The README's relative links point at files that exist (the site's links are checked by
  ``mkdocs build --strict``).

That README and docs name only the public Python API is ``tests/test_public_api.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ["serve.sh", "steer.py", "live_probe.py", "train.sh"]

def _code_blocks(text: str, section: str) -> list[str]:
    start = text.index(f"## {section}\n")
    end = text.find("\n## ", start + 1)
    body = text[start:end if end > 0 else None]
    return re.findall(r"```[a-z]*\n(.*?)```", body, re.S)


def test_readme_quickstart_is_the_checked_snippet_files():
    blocks = _code_blocks((ROOT / "README.md").read_text(), "Quickstart")
    files = [(ROOT / "docs" / "quickstart" / f).read_text() for f in QUICKSTART]
    assert blocks == files
    home = (ROOT / "docs" / "index.md").read_text()
    assert re.findall(r'--8<-- "quickstart/([\w.]+)"', home) == QUICKSTART


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert links
    missing = [link for link in links
               if "://" not in link and not (ROOT / link).exists()]
    assert not missing, missing
