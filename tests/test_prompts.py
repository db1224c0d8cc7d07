"""Prompt sets: the file formats, clear errors, and the rule that gives each sample of a split its prompt."""

from __future__ import annotations

from collections import Counter

import pytest

from s3search.models.prompts import conditions_for, load_prompt_set, prompt_indices


def test_text_and_jsonl_files_load(tmp_path):
    txt = tmp_path / "captions.txt"
    txt.write_text("a handwritten 7\n\n# a comment\nthe digit seven\n")
    ps = load_prompt_set(txt)
    assert [p.text for p in ps.prompts] == ["a handwritten 7", "the digit seven"] and ps.name == "captions"
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a bold 7", "negative_prompt": "blurry"}\n{"prompt": "a 3"}\n')
    ps = load_prompt_set(jl)
    assert [(p.text, p.negative) for p in ps.prompts] == [("a bold 7", "blurry"), ("a 3", "")]
    assert len(ps.sha256) == 64


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "\n# only a comment\n", "holds no prompt"),
    ("bad.jsonl", '{"prompt": 3}\n', "bad.jsonl:1"),
    ("bad2.jsonl", '{"prompt": "x", "seed": 1}\n', "unknown field 'seed'"),
    ("notjson.jsonl", "a plain line\n", "not a JSON object"),
    ("p.csv", "a,b\n", "is .txt"),
])
def test_bad_prompt_files_name_the_file_and_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_prompt_set(path)
    assert name in str(info.value)


def test_every_prompt_is_used_equally_and_the_rule_is_the_same_in_any_batching():
    whole = prompt_indices(7, seed=3, split="search", start=0, n=70)
    assert Counter(whole) == {i: 10 for i in range(7)}
    pieces = prompt_indices(7, 3, "search", 0, 25) + prompt_indices(7, 3, "search", 25, 45)
    assert pieces == whole                                   # a Ray worker's batch rebuilds the same prompts


def test_splits_and_seeds_pair_noise_and_prompts_differently():
    rows = {(seed, split): prompt_indices(1000, seed, split, 0, 50)
            for seed in (0, 1) for split in ("search", "validation", "test")}
    assert len({tuple(v) for v in rows.values()}) == len(rows)


def test_conditions_carry_the_negative_prompt_or_the_default(tmp_path):
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a", "negative_prompt": "n"}\n{"prompt": "b"}\n')
    ps = load_prompt_set(jl)
    c = conditions_for(ps, seed=0, split="test", start=0, n=4, guidance_scale=7.5, default_negative="ugly")
    assert len(c.prompts) == 4 and c.guidance_scale == 7.5
    assert {(p, n) for p, n in zip(c.prompts, c.negative_prompts)} == {("a", "n"), ("b", "ugly")}


def test_without_any_negative_prompt_the_pipeline_default_is_kept(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a\nb\n")
    assert conditions_for(load_prompt_set(txt), 0, "search", 0, 3).negative_prompts is None
