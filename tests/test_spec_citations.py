"""Every "SPEC §n" in the code and the documents resolves to a section of docs/spec.md, the metric contract."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
SPEC = ROOT / "docs" / "spec.md"
CITATION = re.compile(r"SPEC (?:§|sections? )(\d+)((?:(?:,| and| or) (?:§)?\d+)*)")


def _cited_files():
    for folder in ("lrc_kernels", "tests", "bench", "docs", "examples", "scripts"):
        yield from (path for path in (ROOT / folder).rglob("*") if path.suffix in (".py", ".md"))
    yield ROOT / "README.md"


def test_every_spec_citation_names_a_section_of_docs_spec():
    sections = {int(number) for number in re.findall(r"^## (\d+)\. ", SPEC.read_text(), flags=re.M)}
    assert sections == set(range(1, 10))
    cited = 0
    for path in _cited_files():
        for match in CITATION.finditer(path.read_text(encoding="utf-8")):
            numbers = [int(match[1]), *map(int, re.findall(r"\d+", match[2]))]
            cited += len(numbers)
            assert set(numbers) <= sections, (path.relative_to(ROOT), match[0])
    assert cited > 40  # the docstrings cite the spec throughout; a regex that stopped matching would pass


def test_no_citation_of_files_the_repository_lacks():
    for path in _cited_files():
        if path == pathlib.Path(__file__).resolve():
            continue
        text = path.read_text(encoding="utf-8")
        assert "CONTRACT.md" not in text and "shared/SPEC.md" not in text, path.relative_to(ROOT)
