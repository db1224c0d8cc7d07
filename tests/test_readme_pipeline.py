"""Executes the code of "Use a searched schedule in your pipeline": the README section if present, else the doc."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEADING = "Use a searched schedule in your pipeline"


def section_text() -> tuple[str, str]:
    readme = ROOT / "README.md"
    if readme.exists():
        text = readme.read_text()
        match = re.search(rf"^(#+) {re.escape(HEADING)}\s*$", text, flags=re.M)
        if match:
            level = len(match.group(1))
            rest = text[match.end():]
            return "README.md", _until_next_heading(rest, level)
    return "docs/use-in-pipeline.md", (ROOT / "docs" / "use-in-pipeline.md").read_text()


def _until_next_heading(text: str, level: int) -> str:
    """Text up to the next heading of the same or a higher level; '#' lines inside code fences are code."""
    in_fence, offset = False, 0
    for line in text.splitlines(keepends=True):
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and re.match(rf"#{{1,{level}}} ", line):
            return text[:offset]
        offset += len(line)
    return text


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def test_section_has_code():
    source, text = section_text()
    blocks = python_blocks(text)
    assert len(blocks) >= 4, f"{source} should show the diffusers, k-diffusion and export code"
    joined = "\n".join(blocks)
    for name in ("S3Scheduler", "sample_schedule", "export("):
        assert name in joined


def test_section_code_runs(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.chdir(tmp_path)
    source, text = section_text()
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(python_blocks(text)):
        code = compile(block, f"{source}[python block {i}]", "exec")
        exec(code, namespace)  # noqa: S102 - the project's own documentation
    assert (tmp_path / "schedule.json").exists()
