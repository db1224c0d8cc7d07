"""Executes the code of "Use a searched schedule in your pipeline": the README section if present, else the doc.

The examples load pipelines from local folders (`from_pretrained("stable-diffusion-v1-5", local_files_only=True)`);
here tiny random-weight pipelines of the same classes, built from configs as in test_pipelines.py, are saved under
those names first.
"""

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


# Local folder names the examples load, and the tiny pipeline (test_pipelines.BUILDERS) saved there.
LOCAL_PIPELINES = {"stable-diffusion-v1-5": "sd", "stable-diffusion-3-medium": "sd3"}


def _save_local_pipelines(text: str, folder: Path) -> list[str]:
    import torch
    from test_pipelines import BUILDERS, _eval

    made = []
    for name in sorted(set(re.findall(r'from_pretrained\("([^"]+)", local_files_only=True\)', text))):
        if name in LOCAL_PIPELINES:
            pipe = _eval(BUILDERS[LOCAL_PIPELINES[name]](folder / f"{name}-parts"))
            with torch.no_grad():
                pipe.save_pretrained(folder / name, safe_serialization=True)
            made.append(name)
    return made


def test_section_has_code():
    source, text = section_text()
    blocks = python_blocks(text)
    assert len(blocks) >= 6, f"{source} should show the diffusers (DDPM, SD 1.5, SD3), k-diffusion and export code"
    joined = "\n".join(blocks)
    for name in ("S3Scheduler", "sample_schedule", "export(", "StableDiffusionPipeline", "StableDiffusion3Pipeline",
                 "betas="):
        assert name in joined


def test_section_code_runs(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from s3search.models.base import single_threaded

    monkeypatch.chdir(tmp_path)
    source, text = section_text()
    assert set(_save_local_pipelines(text, tmp_path)) == set(LOCAL_PIPELINES)
    namespace: dict = {"__name__": "readme"}
    with single_threaded():   # tiny networks: thread hand-offs cost more than their arithmetic
        for i, block in enumerate(python_blocks(text)):
            code = compile(block, f"{source}[python block {i}]", "exec")
            exec(code, namespace)  # noqa: S102 - the project's own documentation
    assert (tmp_path / "schedule.json").exists()
    assert namespace["image"].size == (16, 16)      # the tiny pipelines' default size
