"""Prompt sets of text-to-image models, and which prompt each sample of a split gets.

A prompt set is a server-side file named in the model registry (never a path from a request):
- `.txt`: one prompt a line (blank lines and lines starting with `#` are skipped);
- `.jsonl`: one JSON object a line with `prompt` and optionally `negative_prompt`.

Sample i of a split gets prompt `(i + offset(seed, split)) mod len(prompts)`: the same rule everywhere, so every
schedule of a study meets the same (prompt, noise) pairs, a Ray worker rebuilds them from (seed, split, i) alone,
every prompt is used equally often (a class-balanced metric needs that), and the splits start at unrelated
points of the list, so search, validation and test pair noise and prompts differently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..evaluation.seeds import SPLITS
from .base import Conditions

__all__ = ["Prompt", "PromptSet", "load_prompt_set", "prompt_indices", "conditions_for"]

MAX_PROMPT_CHARS = 2000


@dataclass(frozen=True)
class Prompt:
    text: str
    negative: str = ""


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[Prompt, ...]
    sha256: str                  # of the file: part of a model's provenance, so caches follow the prompts

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError(f"prompt set {self.name!r} is empty")


def _parse_line(line: str, path: Path, number: int, jsonl: bool) -> Optional[Prompt]:
    stripped = line.strip()
    if not stripped or (not jsonl and stripped.startswith("#")):
        return None
    where = f"{path}:{number}"
    if not jsonl:
        text, negative = stripped, ""
    else:
        try:
            doc = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not a JSON object ({e.msg})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("prompt"), str):
            raise ValueError(f"{where}: each line needs a string field 'prompt'")
        unknown = sorted(set(doc) - {"prompt", "negative_prompt"})
        if unknown:
            raise ValueError(f"{where}: unknown field {unknown[0]!r} (fields: prompt, negative_prompt)")
        text, negative = doc["prompt"], doc.get("negative_prompt", "")
        if not isinstance(negative, str):
            raise ValueError(f"{where}: negative_prompt must be a string")
    if len(text) > MAX_PROMPT_CHARS or len(negative) > MAX_PROMPT_CHARS:
        raise ValueError(f"{where}: a prompt is longer than {MAX_PROMPT_CHARS} characters")
    return Prompt(text, negative)


def load_prompt_set(path: str | Path, name: Optional[str] = None) -> PromptSet:
    """Read a .txt or .jsonl prompt file; ValueError names the file (and line) when it is empty or malformed."""
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"{path}: a prompt file is .txt (one prompt a line) or .jsonl, not {path.suffix!r}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    jsonl = path.suffix == ".jsonl"
    prompts = tuple(p for i, line in enumerate(text.splitlines(), 1)
                    if (p := _parse_line(line, path, i, jsonl)) is not None)
    if not prompts:
        raise ValueError(f"{path}: the prompt file holds no prompt")
    return PromptSet(name or path.stem, prompts, hashlib.sha256(raw).hexdigest())


def _split_offset(seed: int, split: str, n_prompts: int) -> int:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {', '.join(SPLITS)}")
    digest = hashlib.blake2b(f"{int(seed)}:{split}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n_prompts


def prompt_indices(n_prompts: int, seed: int, split: str, start: int, n: int) -> list[int]:
    """The prompt of samples start .. start + n - 1 of (seed, split)."""
    if n_prompts < 1:
        raise ValueError("a prompt set needs at least one prompt")
    offset = _split_offset(seed, split, n_prompts)
    return [(start + i + offset) % n_prompts for i in range(n)]


def conditions_for(prompt_set: PromptSet, seed: int, split: str, start: int, n: int,
                   guidance_scale: Optional[float] = None, default_negative: str = "") -> Conditions:
    """The conditions of rows start .. start + n - 1 (one prompt a row), by the rule above; guidance None is
    the model's default."""
    chosen: Sequence[Prompt] = [prompt_set.prompts[i]
                                for i in prompt_indices(len(prompt_set.prompts), seed, split, start, n)]
    negatives = tuple(p.negative or default_negative for p in chosen)
    # No negative prompt at all: None, so the pipeline uses its own default (SDXL zeroes the negative
    # embeddings, which is not what encoding "" gives).
    return Conditions(prompts=tuple(p.text for p in chosen),
                      negative_prompts=negatives if any(negatives) else None,
                      guidance_scale=None if guidance_scale is None else float(guidance_scale))
