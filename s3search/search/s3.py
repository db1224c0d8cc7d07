"""The S³ loop: evaluate seeds, fit the predictor, evolve a large predictor-scored population, truly evaluate
the predicted top k, repeat until only the refinement share of the NFE's budget is left, which the refinement
spends on the best schedules' grids (`refine`).

The budget is split before the loop (`budget_shares`): the refinement's share at the end, `loop_share` kept for
the loop, and the rest for seeding. Stage 1 of the baselines (each on its conventional grid) is always seeded,
since the final table compares against it; the other seeding stages share what the seeding share leaves, so at
small budgets they shrink first and the loop still runs.

One predictor serves every NFE of the search (and warm-start pairs from earlier studies): pairs are grouped by
(source, NFE) so only scores within one group are compared while fitting. With `options.fidelity` the
low-fidelity scores are one more group per NFE (fidelity.low_group), and the budget counts slots (context.py):
every candidate a round proposes is scored at low fidelity and the best `keep` share of it is evaluated in full.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
from sklearn.isotonic import IsotonicRegression

import predictors
from predictors.base import kendall_tau
from predictors.warm_start import is_outside_group

from ..schedule import SolverSchedule
from ..space import SearchSpace
from .context import SearchContext
from .fidelity import low_group
from .options import SearchOptions
from .near_copies import NearCopies, distinct
from .refine import refine_budget, refine_grid
from .refine_low import refine_grid_low
from .study import Candidate, chash

__all__ = ["run_s3", "budget_shares", "Shares", "later_baselines_cap", "variants_cap", "random_seeds",
           "loop_batch", "calibrator", "evolve", "local_pool", "fit_predictor", "seed_random", "seed_variants",
           "structural_variants", "niche_factor", "niches", "niche_elites", "seed_warm", "warm_elites"]


@dataclass(frozen=True)
class Shares:
    """How an NFE's budget is split, in evaluations."""

    seed: int      # before the loop: baselines, structural variants, random seeds
    loop: int      # kept for the predictor loop (it also gets whatever seeding leaves unused)
    refine: int    # kept for grid refinement at the end


def budget_shares(options: SearchOptions, budget: int) -> Shares:
    refine = refine_budget(options, budget)
    loop = min(budget - refine, math.ceil(float(options.loop_share) * budget))
    return Shares(seed=budget - refine - loop, loop=loop, refine=refine)


def _capped(options: SearchOptions) -> bool:
    # loop_share 0 keeps the seeding rules from before the loop had a share (max_seed_fraction only), so the
    # old behaviour stays reproducible with explicit options.
    return float(options.loop_share) > 0


def later_baselines_cap(options: SearchOptions, budget: int, stage1: int) -> int:
    """Baseline evaluations allowed once stage 1 (`stage1` evaluations) is done: stages 2 and 3 get half of what
    the seeding share leaves after stage 1, within `max_seed_fraction`; the other half is for variants and
    random seeds."""
    frac_cap = max(0, int(options.max_seed_fraction * budget))
    if not _capped(options):
        return frac_cap
    left = max(0, budget_shares(options, budget).seed - stage1)
    return min(frac_cap, stage1 + (left + 1) // 2)


def variants_cap(options: SearchOptions, budget: int, seeded: int) -> Optional[int]:
    """Structural variants allowed after `seeded` seeding evaluations: two thirds of what the seeding share
    has left (the rest is for random seeds); None: no cap."""
    if not _capped(options):
        return None
    left = max(0, budget_shares(options, budget).seed - seeded)
    return left - left // 3


def random_seeds(options: SearchOptions, budget: int, seeded: int) -> int:
    """Random seeds to evaluate after `seeded` seeding evaluations: `init_random` when set, else max(8,
    budget / 20) within what the seeding share has left."""
    if options.init_random is not None:
        return int(options.init_random)
    default = max(8, budget // 20)
    if not _capped(options):
        return default
    return min(default, max(0, budget_shares(options, budget).seed - seeded))


def loop_batch(options: SearchOptions, budget: int) -> int:
    """True evaluations per loop round: `batch_size`, made smaller when the loop's share would otherwise buy
    fewer than about four rounds, since the predictor learns from each round before it picks the next."""
    size = int(options.batch_size)
    if not _capped(options):
        return size
    return max(1, min(size, max(4, budget_shares(options, budget).loop // 4)))


def calibrator(predictor: predictors.Predictor, schedules: Sequence[SolverSchedule], values: Sequence[float]
               ) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """A monotone map from the predictor's raw scores to the metric's scale, fitted on (raw score, true value)
    of the given evaluated schedules (one NFE group: raw scores of different groups are not comparable).

    The raw score of a ranking predictor is a number only its order means; stored beside the true value it
    reads as nonsense. The map is non-decreasing, so it never reorders candidates; ranking still uses the raw
    score, since ties of the fitted steps would throw information away. None with fewer than two distinct
    finite pairs."""
    keep = [i for i, v in enumerate(values) if math.isfinite(v)]
    if len(keep) < 2:
        return None
    raw = np.asarray(predictor.predict([schedules[i] for i in keep]), dtype=np.float64)
    true = np.asarray([values[i] for i in keep], dtype=np.float64)
    if len(np.unique(raw)) < 2:
        return None
    iso = IsotonicRegression(increasing=True, out_of_bounds="clip").fit(raw, true)
    return lambda scores: np.asarray(iso.predict(np.asarray(scores, dtype=np.float64)), dtype=np.float64)


def _seeded(ctx: SearchContext, nfe: int, sources: tuple[str, ...]) -> int:
    # Counted by source so a resumed search computes the same caps as the first run did at that point.
    return ctx.count(nfe, sources)


def seed_random(ctx: SearchContext, nfe: int, n: int) -> None:
    """Evaluate n random schedules (beyond those already in the study)."""
    have = ctx.count(nfe, ("random",))
    want = max(0, min(n - have, ctx.remaining(nfe)))
    if want == 0:
        return
    cands = [Candidate(ctx.space.random(ctx.rng, nfe), source="random") for _ in range(want)]
    ctx.evaluate(cands, nfe)


def structural_variants(space: SearchSpace, schedule: SolverSchedule, rng: np.random.Generator
                        ) -> list[SolverSchedule]:
    """The schedule with every other (first step, final rule) pair of the space, at the same NFE.

    An analytical first step and no final denoise each free an evaluation for another step. Few-step winners
    of earlier searches mostly used both, and random search reaches them late: a search would spend 100-200
    evaluations on a plateau before a mutation flipped the pair (gmm-64d, NFE 4).
    """
    o = space.options
    out: dict[str, SolverSchedule] = {}
    for first in o.first_steps:
        for final in o.finals:
            if (first, final) == (schedule.first_step, schedule.final):
                continue
            try:
                variant = space.restructure(schedule, first, final, rng)
            except ValueError:   # this NFE cannot be reached with that pair
                continue
            out.setdefault(chash(variant), variant)
    return list(out.values())


def seed_variants(ctx: SearchContext, nfe: int, n_best: int, limit: Optional[int] = None) -> None:
    """Evaluate the structural variants of the n best baselines that lie in the space (at most `limit`, those
    of the best baseline first)."""
    have = ctx.count(nfe, ("variant",))
    if n_best <= 0 or have:
        return
    # With fidelity every baseline has a low-fidelity score and few a full one: rank them on the former.
    pool = ctx.low.at(nfe) if ctx.low is not None else ctx.ledger.done.values()
    best = sorted((e for e in pool if e.nfe == nfe and e.ok and e.source == "baseline"
                   and isinstance(e.schedule, SolverSchedule) and ctx.space.contains(e.schedule)),
                  key=lambda e: e.value)[:n_best]
    # ctx.evaluate drops copies and what the study already holds, and stops at the NFE's budget.
    cands = [Candidate(v, source="variant", label=f"{e.label}+{v.first_step}/{v.final}")
             for e in best for v in structural_variants(ctx.space, e.schedule, ctx.rng)]
    cands = _fresh(ctx, cands)[:limit] if limit is not None else cands
    if cands:
        ctx.evaluate(cands, nfe)


def _fresh(ctx: SearchContext, cands: list[Candidate]) -> list[Candidate]:
    """cands without copies and without what the study already holds (so a cap counts new evaluations)."""
    out: dict[str, Candidate] = {}
    known = ctx.evaluated()
    for c in cands:
        h = chash(c.schedule)
        if h not in out and h not in known:
            out[h] = c
    return list(out.values())


def fit_predictor(ctx: SearchContext, holdout: float = 0.2) -> Optional[predictors.Predictor]:
    """Fit the configured predictor on every evaluated schedule (plus warm-start pairs).

    Also refits on a random 80% to measure Kendall tau on the held-out 20% of this study's own pairs: the
    figure reported as predictor quality.
    """
    scheds, values = ctx.ledger.solver_pairs()
    groups = [s.nfe for s in scheds]
    own = list(range(len(scheds)))       # the search's own full-fidelity pairs: what the held-out tau is about
    if ctx.low is not None:              # low-fidelity scores: a group per NFE, compared only among themselves
        low_s, low_v = ctx.low.solver_pairs()
        scheds += low_s
        values += low_v
        groups += [low_group(s.nfe) for s in low_s]
    for s, v, g in ctx.warm_pairs:
        scheds.append(s)
        values.append(v)
        groups.append(g)
    if sum(math.isfinite(v) for v in values) < 4:
        return None
    params = dict(ctx.options.predictor_params)
    params.setdefault("seed", ctx.config.seed)
    own = [i for i in own if not is_outside_group(groups[i])]
    if holdout > 0 and len(own) >= 20:
        perm = ctx.rng.permutation(own)
        n_test = max(5, int(holdout * len(own)))
        test = set(perm[:n_test].tolist())
        train = [i for i in range(len(scheds)) if i not in test]
        p = predictors.get(ctx.config.predictor, **params).fit(
            [scheds[i] for i in train], [values[i] for i in train], [groups[i] for i in train])
        taus = []
        for nfe in sorted({groups[i] for i in test}):
            idx = [i for i in test if groups[i] == nfe and math.isfinite(values[i])]
            if len(idx) >= 5:
                taus.append(kendall_tau(p.predict([scheds[i] for i in idx]), [values[i] for i in idx]))
        taus = [t for t in taus if math.isfinite(t)]
        ctx.predictor_tau = float(np.mean(taus)) if taus else None
    return predictors.get(ctx.config.predictor, **params).fit(scheds, values, groups)


def warm_elites(ctx: SearchContext, nfe: int, per_group: int = 4) -> list[SolverSchedule]:
    """The best `per_group` warm pairs at this NFE of each warm group (values compare only within one)."""
    groups: dict[int, list[tuple[float, SolverSchedule]]] = {}
    for s, v, g in ctx.warm_pairs:
        if s.nfe == nfe and math.isfinite(v):
            groups.setdefault(g, []).append((v, s))
    return [s for g in sorted(groups) for _, s in sorted(groups[g], key=lambda p: p[0])[:per_group]]


def seed_warm(ctx: SearchContext, nfe: int, n: int) -> None:
    """Evaluate the n unseen schedules the predictor fitted with the warm pairs ranks best, evolved from this
    NFE's best evaluated schedules and the warm groups' best (an earlier study's winner at this NFE is a
    candidate as it is). Random seeds when there is nothing to fit yet."""
    have = ctx.count(nfe, ("warm",))
    want = max(0, min(n - have, ctx.remaining(nfe)))
    if want == 0:
        return
    predictor = fit_predictor(ctx, holdout=0)
    if predictor is None:
        seed_random(ctx, nfe, n)
        return
    own = [e.schedule for e in ctx.ranked_in_space(nfe)[:8]]
    o = ctx.options
    ranked = evolve(ctx.space, predictor, own + warm_elites(ctx, nfe), nfe, ctx.rng, population=int(o.population),
                    children=int(o.children), generations=int(o.generations), exclude=ctx.evaluated())
    ctx.evaluate([Candidate(s, source="warm") for s, _ in ranked[:want]], nfe)


def _tournament(scores: np.ndarray, rng: np.random.Generator, size: int = 3) -> int:
    pick = rng.integers(len(scores), size=size)
    return int(pick[np.argmin(scores[pick])])


def evolve(space: SearchSpace, predictor: predictors.Predictor, elites: Sequence[SolverSchedule], nfe: int,
           rng: np.random.Generator, *, population: int = 256, children: int = 256, generations: int = 12,
           exclude: set[str] | None = None) -> list[tuple[SolverSchedule, float]]:
    """A (mu + lambda) genetic search scored by the predictor only; returns unseen candidates, best first."""
    exclude = exclude or set()
    pool: dict[str, SolverSchedule] = {}

    def add(s: SolverSchedule) -> None:
        pool.setdefault(chash(s), s)

    for s in elites:
        add(s)
    while len(pool) < population:
        if elites and rng.random() < 0.7:
            add(space.mutate(elites[int(rng.integers(len(elites)))], rng))
        else:
            add(space.random(rng, nfe))
    keys = list(pool)
    scheds = [pool[k] for k in keys]
    scores = predictor.predict(scheds)
    for _ in range(generations):
        kids = []
        for _ in range(children):
            a = scheds[_tournament(scores, rng)]
            if rng.random() < 0.5:
                b = scheds[_tournament(scores, rng)]
                child = space.crossover(a, b, rng)
                if rng.random() < 0.5:
                    child = space.mutate(child, rng, n_changes=1)
            else:
                child = space.mutate(a, rng)
            kids.append(child)
        known = set(keys)
        new = [(chash(c), c) for c in kids]
        new = list({h: c for h, c in new if h not in known}.items())
        if new:
            kid_scores = predictor.predict([c for _, c in new])
            keys += [h for h, _ in new]
            scheds += [c for _, c in new]
            scores = np.concatenate([scores, kid_scores])
        keep = np.argsort(scores, kind="stable")[:population]
        keys = [keys[i] for i in keep]
        scheds = [scheds[i] for i in keep]
        scores = scores[keep]
    return [(s, float(v)) for k, s, v in zip(keys, scheds, scores) if k not in exclude]


def local_pool(space: SearchSpace, predictor: predictors.Predictor, elites: Sequence[SolverSchedule],
               rng: np.random.Generator, size: int, exclude: set[str]) -> list[tuple[SolverSchedule, float]]:
    """Neighbours of the best evaluated schedules (rank-weighted): one- and two-change mutants, grid-only
    jitters and crossovers between them, scored by the predictor, which is most reliable next to points it
    was trained on."""
    if not elites:
        return []
    w = 1.0 / (1.0 + np.arange(len(elites)))
    w /= w.sum()
    pool: dict[str, SolverSchedule] = {}
    for _ in range(size):
        a = elites[int(rng.choice(len(elites), p=w))]
        u = rng.random()
        if len(elites) > 1 and u < 0.25:
            child = space.crossover(a, elites[int(rng.choice(len(elites), p=w))], rng)
        elif u < 0.5:    # fine-tune the grid alone: small continuous moves a global mutation rarely makes
            child = space.jitter(a, rng, scale=float(rng.choice([0.05, 0.15])))
        else:
            child = space.mutate(a, rng, n_changes=1 if rng.random() < 0.6 else 2)
        h = chash(child)
        if h not in exclude:
            pool.setdefault(h, child)
    scheds = list(pool.values())
    scores = predictor.predict(scheds) if scheds else np.zeros(0)
    order = np.argsort(scores, kind="stable")
    return [(scheds[i], float(scores[i])) for i in order]


def direct_neighbours(space: SearchSpace, elites: Sequence[SolverSchedule], rng: np.random.Generator, n: int,
                      exclude: set[str], first_share: float = 0.7) -> list[tuple[SolverSchedule, float]]:
    """n unseen neighbours of the best schedules drawn without the predictor (no predicted score).

    Next to the best schedules the predictor often cannot order small moves (its tau on a batch there is
    near zero or negative), so a share of each batch is a plain local random search: grid jitters and
    single-choice mutants, of elites[0] with probability `first_share`, else of one of the other elites.
    """
    out: dict[str, SolverSchedule] = {}
    for _ in range(50 * max(n, 1)):
        if len(out) >= n or not elites:
            break
        if len(elites) == 1 or rng.random() < first_share:
            a = elites[0]
        else:   # no draw for the one other elite: the stream, and so the search, is that of two parents
            a = elites[1] if len(elites) == 2 else elites[1 + int(rng.integers(len(elites) - 1))]
        if rng.random() < 0.6:
            child = space.jitter(a, rng, scale=float(rng.choice([0.03, 0.1, 0.3])))
        else:
            child = space.mutate(a, rng, n_changes=1)
        h = chash(child)
        if h not in exclude:
            out.setdefault(h, child)
    return [(s, math.nan) for s in out.values()]


def niche_factor(options: SearchOptions) -> float:
    """`niche_within`, or its default: off when the baselines seed the search, 3 when they do not.

    Seeded, the search starts in the best known basin and a budget of 200 is best spent there (gmm-64d NFE 5:
    niches at 1.5 missed the target for every seed, against one without). Unseeded, its first random
    schedules pick the basin, and S³ stayed in a poor one in one seed of three (0.569 after 200 evaluations);
    with niches at 3 it reached 0.224 / 0.187 / 0.226 for seeds 0 / 1 / 2 (docs/bench/search.md).
    """
    if options.niche_within is not None:
        return float(options.niche_within)
    return 1.0 if options.seed_baselines else 3.0


def niches(ranked: Sequence[SolverSchedule], values: Sequence[float], within: float
           ) -> list[list[SolverSchedule]]:
    """The schedules of each structure (first-step rule, final rule) whose best is within a factor `within` of
    the overall best, best structure first; [] when niching is off (within <= 1) or the metric is not positive.
    `ranked` is sorted by `values`.

    The structure decides how many steps an NFE buys, and the basins are far apart: on gmm-64d at NFE 5 the
    analytical-first, no-final-denoise schedules reach 0.05 where the plain ones stall at 0.19 (seed 2), yet
    after seeding both sit near 0.3, and the predictor, trained mostly on poor random schedules of the first
    kind, keeps a search in whichever basin its first rounds favour. Searching next to every close
    structure's best until one pulls clearly ahead avoids that.
    """
    best = values[0] if len(values) else math.nan
    if within <= 1 or not best > 0:   # a ratio means nothing for a metric that reaches zero or below
        return []
    groups: dict[tuple[str, str], list[SolverSchedule]] = {}
    for sched, v in zip(ranked, values):
        if v <= best * within:
            groups.setdefault(_structure(sched), []).append(sched)
    return list(groups.values())


def _structure(schedule: SolverSchedule) -> tuple[str, str]:
    return schedule.first_step, schedule.final


def niche_elites(ranked: Sequence[SolverSchedule], groups: Sequence[Sequence[SolverSchedule]], n: int
                 ) -> list[SolverSchedule]:
    """The n elites, taken in turn from the close structures' `groups` (`niches`), then the next best overall."""
    if not groups:
        return list(ranked[:n])
    out = _leader_in_turn(groups)[:n]
    taken = {id(s) for s in out}
    out += [s for s in ranked if id(s) not in taken][:n - len(out)]   # too few close ones: the next best
    return out


def _by_structure_in_turn(cands: list[tuple[SolverSchedule, float]], order: Sequence[tuple[str, str]]
                          ) -> list[tuple[SolverSchedule, float]]:
    """cands (best first) reordered to take the best of each structure in `order` in turn; the rest after."""
    if len(order) < 2:
        return cands
    queues: dict[tuple[str, str], list] = {st: [] for st in order}
    rest: list = []
    for c in cands:
        queues.get(_structure(c[0]), rest).append(c)
    return _leader_in_turn(list(queues.values())) + rest


def _leader_in_turn(queues: Sequence[Sequence]) -> list:
    """Every other item from the first queue, the items between from the others in turn; then what is left.

    The leading structure keeps half of the effort; the close ones share the other half.
    """
    lead, others = list(queues[0]), [list(q) for q in queues[1:]]
    out, turn = [], 0
    while lead or any(others):
        if lead:
            out.append(lead.pop(0))
        for _ in range(len(others)):
            q = others[turn % len(others)]
            turn += 1
            if q:
                out.append(q.pop(0))
                break
    return out


def _choose(local: list[tuple[SolverSchedule, float]], ranked: list[tuple[SolverSchedule, float]], k: int,
            explore: float) -> list[tuple[SolverSchedule, float]]:
    """The predicted best (k - e) neighbours of the elites plus the e best of the freely evolved population."""
    n_global = int(round(explore * k)) if local else k
    picks: dict[str, tuple[SolverSchedule, float]] = {}
    for source, n in ((ranked, n_global), (local, k)):
        for s, p in source:
            if len(picks) >= k or n <= 0:
                break
            h = chash(s)
            if h not in picks:
                picks[h] = (s, p)
                n -= 1
    for s, p in ranked:                      # too few neighbours: fill up from the evolved population
        if len(picks) >= k:
            break
        picks.setdefault(chash(s), (s, p))
    return list(picks.values())


def _on_metric_scale(to_metric: Optional[Callable[[np.ndarray], np.ndarray]], raw: Sequence[float]
                     ) -> list[float]:
    """Raw scores mapped to the metric's scale for storage (nan stays nan: a candidate chosen without the
    predictor); the raw scores themselves where there is no map."""
    out = [float(p) for p in raw]
    idx = [i for i, p in enumerate(out) if math.isfinite(p)]
    if to_metric is None or not idx:
        return out
    mapped = to_metric(np.asarray([out[i] for i in idx]))
    for i, m in zip(idx, mapped):
        out[i] = float(m)
    return out


def run_s3(ctx: SearchContext, nfe: int) -> None:
    """Spend this NFE's remaining budget with the S³ loop (seeds are evaluated before this is called)."""
    o = ctx.options
    budget = ctx.budgets[nfe]
    # Few random seeds: the baselines on several grids already spread the predictor's first fit, and an
    # evaluation kept from seeding goes to the loop (BENCHMARKS.md, "At budget 200 the loop's evaluations
    # matter more than wider seeding").
    seed_variants(ctx, nfe, int(o.variants_of_best), variants_cap(o, budget, _seeded(ctx, nfe, ("baseline",))))
    init = random_seeds(o, budget, _seeded(ctx, nfe, ("baseline", "variant")))
    # A warm start spends the random seeds on what the warm-started predictor ranks best instead.
    if ctx.warm_pairs:
        seed_warm(ctx, nfe, init)
    else:
        seed_random(ctx, nfe, init)
    generation = 0
    last_batch: list[tuple[float, float]] = []
    keep = budget_shares(o, budget).refine
    batch = loop_batch(o, budget)
    while ctx.remaining(nfe) > keep and not ctx.stopped():
        predictor = fit_predictor(ctx)
        if predictor is None:   # too few successful evaluations to learn from: explore at random
            seed_random(ctx, nfe, init + batch)
            init += batch
            continue
        to_metric = calibrator(predictor, *ctx.ledger.solver_pairs(nfe))
        ranked_done = ctx.ranked_in_space(nfe)
        ranked_scheds, ranked_values = [e.schedule for e in ranked_done], [e.value for e in ranked_done]
        within = niche_factor(o)
        close = niches(ranked_scheds, ranked_values, within)
        elites = niche_elites(ranked_scheds, close, 16)
        exclude = ctx.evaluated()
        ranked = evolve(ctx.space, predictor, elites, nfe, ctx.rng, population=int(o.population),
                        children=int(o.children), generations=int(o.generations), exclude=exclude)
        local = local_pool(ctx.space, predictor, elites[:8], ctx.rng, 2 * int(o.children), exclude)
        k = min(batch, ctx.remaining(nfe) - keep)
        n_direct = min(k - 1, int(round(float(o.direct) * k))) if k > 1 else 0
        local = _by_structure_in_turn(local, [_structure(g[0]) for g in close])
        # Near copies of evaluated schedules (or of each other) leave the pools before the choice.
        copies = NearCopies(ctx.space.process, [e.schedule for e in ctx.ledger.done.values() if e.nfe == nfe]
                            + ([e.schedule for e in ctx.low.at(nfe)] if ctx.low is not None else []))
        ranked = [c for c in ranked if not copies.near(c[0])]
        local = [c for c in local if not copies.near(c[0])]
        picks = distinct(_choose(local, ranked, k - n_direct, float(o.explore)), copies)
        parents, share = ([g[0] for g in close], 0.5) if len(close) > 1 else (elites[:2], 0.7)
        picks += distinct(direct_neighbours(ctx.space, parents, ctx.rng, n_direct,
                                            exclude | {chash(s) for s, _ in picks}, first_share=share), copies)
        generation += 1
        raw = {chash(s): p for s, p in picks}
        shown = _on_metric_scale(to_metric, [p for _, p in picks])
        cands = [Candidate(s, source="s3" if math.isfinite(p) else "s3-local", predicted=q, generation=generation)
                 for (s, p), q in zip(picks, shown)]
        done = ctx.evaluate(cands, nfe)
        if not done:   # everything proposed was already evaluated: widen the search with random schedules
            ctx.evaluate([Candidate(ctx.space.random(ctx.rng, nfe), source="random") for _ in range(k)], nfe)
            continue
        last_batch = [(raw[chash(e.schedule)], e.value) for e in done
                      if e.ok and math.isfinite(raw.get(chash(e.schedule), math.nan))]
        batch_tau = kendall_tau([p for p, _ in last_batch], [v for _, v in last_batch]) \
            if len(last_batch) >= 3 else float("nan")
        best = ctx.ledger.best(nfe)
        ctx.log.append({"nfe": nfe, "generation": generation, "evaluations": ctx.ledger.count,
                        "best": best.value if best else math.inf, "cv_tau": ctx.predictor_tau,
                        "batch_tau": batch_tau})
    if not ctx.stopped():
        # With fidelity the refinement's optimiser runs on low-fidelity scores (refine_low.py).
        if ctx.low is not None:
            refine_grid_low(ctx, nfe)
        else:
            refine_grid(ctx, nfe)
