"""The user docs (README.md, docs/*.md) against the code and the repository: fails when they drift apart.

Checked mechanically: every option of ``optimize`` is in the option reference (docs/api.md), every relative link
points at a file that exists (and at a heading that exists, for ``file.md#anchor``), and no project-internal
jargon is left in text written for users. No torch import, no GPU: this runs in a second.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from diffopt.config import OptimizeConfig

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Words of the project's internal bookkeeping that mean nothing to a user of the library.
INTERNAL = [
    r"seed recipe",
    r"seed page",
    r"session \d",
    r"issue \d",
    r"the lead\b",
    r"device host",
    r"our gpu host",
    r"anchor",
]

FENCE = re.compile(r"^(```|~~~)")
# [text](target) and ![alt](target); the target ends at whitespace or ")" (an optional "title" is ignored).
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _prose(path: Path) -> list[tuple[int, str]]:
    """(line number, line) of the lines outside fenced code blocks."""
    lines, fenced = [], False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append((number, line))
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # keeps letters, digits, "_", "-" and spaces
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, line in _prose(path):
        match = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    for _, line in _prose(path):  # explicit <a name="..."> / id="..." targets count too
        result.update(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", line))
    return result


def links(path: Path) -> list[tuple[int, str]]:
    found = []
    for number, line in _prose(path):
        line = re.sub(r"`[^`]*`", "", line)  # code spans are not links
        found.extend((number, target) for target in LINK.findall(line))
    return found


def test_docs_exist():
    assert (ROOT / "README.md").is_file()
    assert (ROOT / "docs" / "api.md").is_file()


def test_slugs_follow_github():
    assert github_slug("LoRA and IP-Adapter with optimize") == "lora-and-ip-adapter-with-optimize"
    assert github_slug("`diffopt.optimize`") == "diffoptoptimize"
    assert github_slug("Transformer pipelines (SD3, Flux, PixArt-Sigma)") == "transformer-pipelines-sd3-flux-pixart-sigma"
    assert github_slug("`diffopt.DeepCache` and `diffopt.FirstBlockCache`") == "diffoptdeepcache-and-diffoptfirstblockcache"


@pytest.mark.parametrize("name", OptimizeConfig.option_names())
def test_every_option_is_in_the_api_reference(name):
    """A new field of OptimizeConfig without a line in docs/api.md fails here."""
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    assert f"`{name}`" in text, f"option {name!r} of OptimizeConfig is not documented in docs/api.md"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for number, target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, fragment = target.partition("#")
        dest = doc if not file_part else (doc.parent / file_part).resolve()
        if not dest.exists():
            broken.append(f"{doc.name}:{number}: {target} (no such file)")
            continue
        if fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            broken.append(f"{doc.name}:{number}: {target} (no heading #{fragment} in {dest.name})")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_internal_words(doc):
    pattern = re.compile("|".join(f"(?:{word})" for word in INTERNAL), re.IGNORECASE)
    hits = [
        f"{doc.name}:{number}: {match.group(0)!r} in {line.strip()[:100]!r}"
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
        for match in pattern.finditer(line)
    ]
    assert not hits, "\n".join(hits)
