"""The README and the docs site agree with what they describe (no engine, no docs build:
`make docs` builds the site strictly).

- The README's quickstart snippets are the files in docs/quickstart/ (which the site's home
  page includes), so the snippets that were run are the ones shown.
- The README's relative links point at files that exist (the site's links are checked by
  ``mkdocs build --strict``).
- README and docs name only the public Python API as importable: ``from vllm_steer import X``
  for X public, and dotted ``vllm_steer.`` names only inside the public subpackages.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ["serve.sh", "steer.py", "live_probe.py", "train.sh"]

#: The public top-level names (issue 25; vllm_steer.__all__ declares them).
PUBLIC = {
    "__version__", "SteeringVector", "SteeringVectorError", "VectorMetadata", "SteeringSpec",
    "make_spec", "SpecError", "make_llm", "train", "probe", "probe_once", "sweep",
    "ProbeConfig", "Reading", "build_prompt", "live_generate", "LiveProbeConfig", "StopWhen",
    "LiveResult", "capture_hidden", "take_captures",
}
#: Dotted ``vllm_steer.X`` mentions allowed in prose: the public subpackages, the fixtures
#: and benchmark packages (named as places, not API), and command-line modules.
ALLOWED_DOTTED = ("__version__", "extract", "probe", "fixtures", "bench", "cli",
                  "server.vllm_cli")


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


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


def test_docs_name_only_public_python_api():
    bad = []
    for path in _docs():
        if path.is_symlink():  # benchmark results: generated elsewhere
            continue
        # mkdocstrings directives (`::: module.name`) name where a docstring is read from
        text = "\n".join(line for line in path.read_text().splitlines()
                         if not line.startswith(":::"))
        for names in re.findall(r"from vllm_steer import ([\w, ]+)", text):
            bad += [(path.name, n) for n in (x.strip() for x in names.split(","))
                    if n and n not in PUBLIC and n != "X"]
        for mod in re.findall(r"from (vllm_steer\.[\w.]+) import", text):
            if not mod.removeprefix("vllm_steer.").startswith(("extract", "probe")):
                bad.append((path.name, mod))
        for dotted in re.findall(r"\bvllm_steer\.([\w.]*\w)", text):
            if not dotted.startswith(ALLOWED_DOTTED):
                bad.append((path.name, "vllm_steer." + dotted))
    assert not bad, "\n".join(map(str, bad))
