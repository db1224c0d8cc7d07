"""The search space: every operator returns a valid schedule of the space with exactly the target NFE."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s3search.schedule import DERIVATIVES, SolverSchedule, evaluation_plan
from s3search.space import SearchSpace, SpaceOptions

PROCESSES = ["edm", "vp-linear", "vp-cosine", "flow", "vp-discrete"]
_SPACES: dict[tuple, SearchSpace] = {}


def space_for(process: str, nfes: tuple[int, ...], restricted: bool = False) -> SearchSpace:
    key = (process, nfes, restricted)
    if key not in _SPACES:
        opts = SpaceOptions(correctors=("none", "implicit"), finals=("denoise",), first_steps=("model",),
                            derivatives=("dpmpp", "bh2"), max_order=2, eta_max=0.5) if restricted else None
        _SPACES[key] = SearchSpace(process, nfes, options=opts)
    return _SPACES[key]


def assert_member(space: SearchSpace, s: SolverSchedule, nfe: int) -> None:
    assert isinstance(s, SolverSchedule)
    s.validate()
    assert s.nfe == nfe == sum(evaluation_plan(s))
    space.check(s)
    assert space.t_min_start * (1 - 1e-6) <= s.timesteps[0] <= space.t_max
    assert all(b < a for a, b in zip(s.timesteps, s.timesteps[1:]))
    # The JSON round trip is the same schedule, with the same canonical hash.
    back = SolverSchedule.from_json(s.to_json())
    assert back == s and back.canonical_hash() == s.canonical_hash()


spaces = st.tuples(st.sampled_from(PROCESSES),
                   st.lists(st.integers(1, 12), min_size=1, max_size=3, unique=True).map(tuple),
                   st.booleans())


def test_start_at_its_limit_stays_in_space():
    # The cleanest start allowed is stored to seven significant digits, which on EDM (80 e^-2 = 10.8268226...)
    # rounds below the exact bound; such a schedule is still a member (a CI run once drew one).
    space = space_for("edm", (5,))
    rng = np.random.default_rng(0)
    at_limit = 0
    for _ in range(200):
        s = space.jitter(space.random(rng, nfe=5), rng, scale=100.0)
        assert_member(space, s, 5)
        at_limit += abs(s.timesteps[0] - space.t_min_start) < 1e-5 * space.t_min_start
    assert at_limit > 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spaces, st.integers(0, 2**32 - 1))
def test_random_mutate_crossover_stay_in_space(spec, seed):
    process, nfes, restricted = spec
    if restricted:   # model first step + denoise final cost 2 evaluations at least
        nfes = tuple(sorted({max(2, n) for n in nfes}))
    space = space_for(process, nfes, restricted)
    rng = np.random.default_rng(seed)
    a = space.random(rng)
    assert_member(space, a, a.nfe)
    assert a.nfe in nfes
    b = space.random(rng, nfe=a.nfe)
    c = space.random(rng)                   # possibly another NFE: the child takes the first parent's
    for _ in range(3):
        m = space.mutate(a, rng)
        assert_member(space, m, a.nfe)
        x = space.crossover(a, b, rng)
        assert_member(space, x, a.nfe)
        y = space.crossover(a, c, rng)
        assert_member(space, y, a.nfe)
        j = space.jitter(a, rng, scale=0.15)
        assert_member(space, j, a.nfe)
        assert j.steps == a.steps and j.first_step == a.first_step and j.final == a.final
        a = m


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(PROCESSES), st.integers(1, 10), st.data())
def test_flat_decoding_is_valid_and_deterministic(process, nfe, data):
    space = space_for(process, (nfe,))
    u = data.draw(st.lists(st.floats(0.0, 1.0), min_size=space.unit_dim(nfe), max_size=space.unit_dim(nfe)))
    s = space.from_unit(u, nfe)
    assert_member(space, s, nfe)
    assert space.from_unit(u, nfe) == s


def test_restricted_options_are_respected():
    space = space_for("edm", (5,), restricted=True)
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = space.mutate(space.random(rng), rng)
        assert s.first_step == "model" and s.final == "denoise"
        assert all(st_.corrector in ("none", "implicit") and st_.order <= 2 and st_.eta <= 0.5 for st_ in s.steps)
        assert all(st_.derivative in ("dpmpp", "bh2") for st_ in s.steps)


def test_operators_explore_every_choice():
    """Not a degenerate space: random + mutation reach every value of every categorical choice."""
    space = space_for("vp-linear", (6,))
    rng = np.random.default_rng(1)
    seen: dict[str, set] = {"prediction": set(), "order": set(), "derivative": set(), "corrector": set(),
                            "first": set(), "final": set(), "steps": set(), "stochastic": set()}
    s = space.random(rng)
    for _ in range(400):
        s = space.mutate(s, rng) if rng.random() < 0.7 else space.random(rng)
        seen["first"].add(s.first_step)
        seen["final"].add(s.final)
        seen["steps"].add(len(s.steps))
        for x in s.steps:
            seen["prediction"].add(x.prediction)
            seen["order"].add(x.order)
            seen["derivative"].add(x.derivative)
            seen["corrector"].add(x.corrector)
            seen["stochastic"].add(x.eta > 0)
    assert seen["prediction"] == {"data", "noise"}
    assert seen["order"] == {1, 2, 3}
    assert seen["derivative"] == set(DERIVATIVES)
    assert seen["corrector"] == {"none", "unic", "implicit"}
    assert seen["first"] == {"model", "zero-x0"} and seen["final"] == {"denoise", "none"}
    assert seen["stochastic"] == {True, False}
    assert len(seen["steps"]) >= 3


def test_mutation_changes_the_schedule_and_hash_dedupes():
    space = space_for("edm", (5,))
    rng = np.random.default_rng(2)
    s = space.random(rng)
    hashes = {space.mutate(s, rng).canonical_hash() for _ in range(50)}
    assert len(hashes) > 40
    same = SolverSchedule.from_dict(json.loads(s.to_json()))
    assert same.canonical_hash() == s.canonical_hash()


def test_grid_end_stays_in_range():
    space = SearchSpace("edm", (4,), options=SpaceOptions(t_end_span=1.0))
    rng = np.random.default_rng(3)
    lo = space.t_min
    hi = space.process.t_of_lambda(space.lam_max_end)
    for _ in range(200):
        s = space.mutate(space.random(rng), rng)
        assert lo <= s.timesteps[-1] <= hi * (1 + 1e-9)


@pytest.mark.parametrize("kwargs, field", [
    ({"nfe": 0}, "nfe"), ({"nfe": ()}, "nfe"), ({"nfe": 3, "t_min": 5.0, "t_max": 1.0}, "t_min"),
    ({"nfe": 3, "t_max": 500.0}, "t_max"),
    ({"nfe": 3, "options": {"max_order": 7}}, "options.max_order"),
    ({"nfe": 3, "options": {"correctors": ("implicit",)}}, "options.correctors"),
    ({"nfe": 3, "options": {"derivatives": ("euler",)}}, "options.derivatives"),
    ({"nfe": 3, "options": {"bogus": 1}}, "options.bogus"),
    ({"nfe": 1, "options": {"first_steps": ("model",), "finals": ("denoise",)}}, "nfe"),
])
def test_invalid_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        SearchSpace("edm", **kwargs)


def test_operators_reject_schedules_of_other_nfe():
    space = space_for("edm", (5,))
    other = space_for("edm", (6,)).random(0)
    with pytest.raises(ValueError, match="nfe"):
        space.mutate(other, 0)
    with pytest.raises(ValueError, match="nfe"):
        space.random(0, nfe=6)


def test_crossing_a_schedule_with_itself_gives_the_same_schedule():
    # Round-off of the grid blend must not make a copy look new: the search would pay to evaluate it.
    space = SearchSpace("edm", (4, 6))
    rng = np.random.default_rng(11)
    for _ in range(50):
        a = space.random(rng)
        assert space.crossover(a, a, rng).canonical_hash() == a.canonical_hash()


@pytest.mark.parametrize("nfe", [3, 4, 6, 10])
def test_structural_variants_of_a_baseline_keep_its_nfe_and_steps(nfe):
    from s3search import baselines
    from s3search.search.s3 import structural_variants
    from s3search.search.study import chash

    space = SearchSpace("edm", nfe, options=SpaceOptions(first_steps=("model", "zero-x0", "mean-x0")))
    base = baselines.for_nfe("dpmpp_2m", nfe, "edm", grid="logsnr", t_start=space.t_max, t_end=space.t_min)
    variants = structural_variants(space, base, np.random.default_rng(nfe))
    pairs = {(v.first_step, v.final) for v in variants}
    assert ("mean-x0", "none") in pairs and (base.first_step, base.final) not in pairs
    assert len({chash(v) for v in variants}) == len(variants) and chash(base) not in {chash(v) for v in variants}
    for v in variants:
        space.check(v)
        assert v.nfe == nfe
        # The baseline's own rules survive: an analytical first step only frees evaluations for extra steps.
        assert len(v.steps) >= len(base.steps) - 1
    with pytest.raises(ValueError, match="first_step"):
        SearchSpace("edm", nfe).restructure(base, "mean-x0", "none")


@pytest.mark.parametrize("seed", range(20))
def test_grid_vector_round_trips_and_stays_in_the_space(seed):
    space = SearchSpace("edm", (4, 6), options=SpaceOptions(first_steps=("model", "zero-x0", "mean-x0"),
                                                             t_start_span=1.0))
    rng = np.random.default_rng(seed)
    s = space.random(rng, nfe=int(rng.choice([4, 6])))
    x, box = space.grid_vector(s)
    assert x.shape == (len(s.steps) + 2,) and box.shape == (len(x), 2)
    assert np.all(box[:, 0] <= x + 1e-9) and np.all(x <= box[:, 1] + 1e-9)
    same = space.with_grid(s, x)
    assert same.canonical_hash() == s.canonical_hash()
    moved = space.with_grid(s, x + rng.normal(0, 0.5, size=x.shape))
    space.check(moved)
    assert moved.nfe == s.nfe and moved.steps == s.steps and (moved.first_step, moved.final) == (s.first_step, s.final)
    assert moved.timesteps != s.timesteps
    far = space.with_grid(s, box[:, 1] + 5.0)          # outside the box: clipped, still a member
    space.check(far)
    with pytest.raises(ValueError, match="grid vector"):
        space.with_grid(s, x[:-1])
    with pytest.raises(ValueError, match="grid vector"):
        space.with_grid(s, np.full_like(x, np.nan))
