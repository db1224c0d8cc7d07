"""Timestep grids: N + 1 process times, noisiest first, inside the process's range [t_min, t_top].

Our schedules end at t_N > 0 (the final rule returns D(x_N, t_N)), so every grid runs from `t_start`
(default process.t_max) down to `t_end` (default process.t_min). Grids defined on a noise level (EDM rho,
KL-optimal, Align Your Steps) work in the VE noise level sigma = exp(-lambda) = sigma_t / alpha_t and are mapped
back to the process's own time, so the same grid means the same noise levels on VP, VE and flow processes.
The flow-pipeline grids (flow-shift, flow-dynamic, flow-dpm, flow-unipc) are diffusers' flow-matching sigmas; on
the flow process their default ends are the pipeline's own (docs/grids.md).
All arithmetic is float64 on Python floats / numpy arrays.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from . import processes
from .processes import EDM, NoiseProcess, RectifiedFlow, VPDiscrete

__all__ = [
    "time_uniform",
    "quadratic",
    "logsnr",
    "edm",
    "kl_optimal",
    "ays",
    "ays_sigmas",
    "ays_native_process",
    "loglinear_interp",
    "from_sigmas",
    "flow_shift",
    "flow_unshift",
    "flux_mu",
    "flow_shifted",
    "flow_pipeline",
    "from_flow_sigmas",
    "FLOW_TRAIN_STEPS",
    "FLOW_PIPELINE_GRIDS",
    "AYS_TABLES",
    "names",
    "get",
]

Grid = tuple[float, ...]
GridFn = Callable[..., Grid]

# Align Your Steps, paper Table 3 (arXiv 2404.14507): 10-step VE sigmas of the named model, noisiest first.
# The paper lists the last value (sigma_min of the model); diffusers / ComfyUI replace it by 0 because their
# final step goes to sigma = 0. Our final rule returns D(x_N, t_N), which is that same step, so we keep it.
AYS_TABLES: dict[str, tuple[float, ...]] = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}

# A published endpoint may sit just outside the target range through rounding (SD's sigma_max is 14.6146);
# within this relative slack it is clamped onto the range edge rather than rejected.
_ENDPOINT_SLACK = 1e-2


# ----- argument checks ------------------------------------------------------------------------------------
def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 1:
        raise ValueError(f"n={n!r} must be an integer >= 1 (the number of steps)")
    return int(n)


def _range(process: NoiseProcess, t_start: Optional[float], t_end: Optional[float]) -> tuple[float, float]:
    start = process.t_max if t_start is None else t_start
    end = process.t_min if t_end is None else t_end
    for name, value in (("t_start", start), ("t_end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}={value!r} must be a finite number")
        process.check_time(float(value), name)
    if not end < start:
        raise ValueError(f"t_end={end!r} must be below t_start={start!r} (grids run from noisiest to cleanest)")
    return float(start), float(end)


def _positive(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{field}={value!r} must be a finite number > 0")
    return float(value)


def _finish(ts: Sequence[float], start: float, end: float, field: str = "grid") -> Grid:
    """Pin the ends exactly (round trips through lambda drift by an ulp) and check strict decrease."""
    out = [float(t) for t in ts]
    out[0], out[-1] = start, end
    for i in range(1, len(out)):
        if not out[i] < out[i - 1]:
            raise ValueError(f"{field}: times[{i}]={out[i]!r} is not below times[{i - 1}]={out[i - 1]!r}; "
                             "the grid is too fine for this process (try fewer steps)")
    return tuple(out)


def from_sigmas(process: NoiseProcess, sigmas: Sequence[float]) -> Grid:
    """Process times of VE noise levels sigma = sigma_t / alpha_t (noisiest first), each checked to be in range."""
    ts = []
    for i, s in enumerate(sigmas):
        t = process.t_of_sigma_ve(float(s))
        process.check_time(t, f"sigmas[{i}]")
        ts.append(min(max(t, process.t_min), process.t_top))
    return _finish(ts, ts[0], ts[-1], "sigmas")


# ----- the grids ------------------------------------------------------------------------------------------
def time_uniform(process: NoiseProcess, n: int, t_start: Optional[float] = None,
                 t_end: Optional[float] = None) -> Grid:
    """Uniform in the process's time (DPM-Solver 'time_uniform'; DDIM's default for discrete models)."""
    n = _check_n(n)
    start, end = _range(process, t_start, t_end)
    return _finish(np.linspace(start, end, n + 1), start, end)


def quadratic(process: NoiseProcess, n: int, t_start: Optional[float] = None,
              t_end: Optional[float] = None) -> Grid:
    """Uniform in sqrt(t) (DPM-Solver 'time_quadratic')."""
    n = _check_n(n)
    start, end = _range(process, t_start, t_end)
    return _finish(np.linspace(math.sqrt(start), math.sqrt(end), n + 1) ** 2, start, end)


def logsnr(process: NoiseProcess, n: int, t_start: Optional[float] = None,
           t_end: Optional[float] = None) -> Grid:
    """Uniform in half-logSNR lambda, i.e. uniform in log sigma_VE (DPM-Solver 'logSNR').

    This is not AYS's appendix 'LogSNR' (EDM with rho = 1, linear in sigma); see docs/grids.md.
    """
    n = _check_n(n)
    start, end = _range(process, t_start, t_end)
    lams = np.linspace(process.lambda_(start), process.lambda_(end), n + 1)
    return _finish([process.t_of_lambda(float(lam)) for lam in lams], start, end)


def edm(process: NoiseProcess, n: int, t_start: Optional[float] = None, t_end: Optional[float] = None,
        rho: float = 7.0) -> Grid:
    """Karras et al.'s rho schedule in sigma_VE: (s_max^(1/rho) + i/n (s_min^(1/rho) - s_max^(1/rho)))^rho."""
    n = _check_n(n)
    rho = _positive(rho, "rho")
    start, end = _range(process, t_start, t_end)
    s_max, s_min = process.sigma_ve(start), process.sigma_ve(end)
    u = np.linspace(0.0, 1.0, n + 1)
    sig = (s_max ** (1.0 / rho) + u * (s_min ** (1.0 / rho) - s_max ** (1.0 / rho))) ** rho
    return _finish([process.t_of_sigma_ve(float(s)) for s in sig], start, end)


def kl_optimal(process: NoiseProcess, n: int, t_start: Optional[float] = None, t_end: Optional[float] = None,
               c: float = 1.0) -> Grid:
    """The KL-optimal DDIM grid for data N(0, c^2 I) (AYS Theorem; docs/math.md §7): uniform in arctan(sigma_VE / c).

    For that data one DDIM (Euler) step from sigma_s to sigma_t scales the exact flow's output by
    cos(arctan(sigma_s/c) - arctan(sigma_t/c)), so equal angle steps maximise the final variance, which is
    always too small; ComfyUI's 'kl_optimal' scheduler is this grid with c = 1.
    """
    n = _check_n(n)
    c = _positive(c, "c")
    start, end = _range(process, t_start, t_end)
    theta = np.linspace(math.atan(process.sigma_ve(start) / c), math.atan(process.sigma_ve(end) / c), n + 1)
    return _finish([process.t_of_sigma_ve(float(c * math.tan(a))) for a in theta], start, end)


def loglinear_interp(sigmas: Sequence[float], n: int) -> tuple[float, ...]:
    """Resample a decreasing sigma table to n + 1 values, linearly in log sigma against the table position.

    This is AYS's rule for step counts it has no table for: position i/N of the table maps to position j/n.
    """
    n = _check_n(n)
    arr = np.asarray(sigmas, dtype=np.float64)
    if arr.ndim != 1 or len(arr) < 2 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError("sigmas must be a list of at least 2 finite positive numbers")
    if np.any(np.diff(arr) >= 0):
        raise ValueError("sigmas must be strictly decreasing (noisiest first)")
    if len(arr) == n + 1:
        return tuple(float(s) for s in arr)
    xs = np.linspace(0.0, 1.0, len(arr))
    out = np.exp(np.interp(np.linspace(0.0, 1.0, n + 1), xs, np.log(arr)))
    out[0], out[-1] = arr[0], arr[-1]
    return tuple(float(s) for s in out)


def _table(table: str) -> tuple[float, ...]:
    if table not in AYS_TABLES:
        raise ValueError(f"table={table!r} is unknown; published tables: {', '.join(sorted(AYS_TABLES))}")
    return AYS_TABLES[table]


def ays_sigmas(table: str, n: int) -> tuple[float, ...]:
    """A published AYS table (VE sigmas of its model), log-linearly interpolated to n steps (n + 1 values)."""
    return loglinear_interp(_table(table), n)


def ays_native_process(table: str) -> NoiseProcess:
    """The process a table's sigmas were optimised for: SD1.5 / SDXL are discrete scaled-linear VP, SVD is EDM."""
    _table(table)
    if table == "svd":
        return EDM(t_min=0.002, t_max=700.0)
    return VPDiscrete.scaled_linear()


def ays(table: str, n: int, process: NoiseProcess, t_start: Optional[float] = None,
        t_end: Optional[float] = None) -> Grid:
    """A published AYS table at n steps, as times of `process`.

    Without t_start / t_end the table's own noise levels are kept (they must fit the process's sigma range,
    up to rounding of the endpoints). With either given, the table's log-sigma shape is stretched affinely onto
    [sigma(t_end), sigma(t_start)], the only faithful way to move a schedule onto a different noise range.
    """
    sig = np.asarray(ays_sigmas(table, n), dtype=np.float64)
    lo, hi = process.sigma_ve(process.t_min), process.sigma_ve(process.t_max)
    if t_start is None and t_end is None:
        if sig[0] > hi * (1 + _ENDPOINT_SLACK) or sig[-1] < lo * (1 - _ENDPOINT_SLACK):
            raise ValueError(f"table={table!r} spans sigma [{sig[-1]}, {sig[0]}], outside the {process.name} range "
                             f"[{lo:.6g}, {hi:.6g}]; pass t_start / t_end to stretch it onto a range")
        sig = np.clip(sig, lo, hi)
        ts = [min(max(process.t_of_sigma_ve(float(s)), process.t_min), process.t_max) for s in sig]
        return _finish(ts, ts[0], ts[-1], f"table={table!r}")
    start, end = _range(process, t_start, t_end)
    log_new_hi, log_new_lo = math.log(process.sigma_ve(start)), math.log(process.sigma_ve(end))
    u = (np.log(sig) - math.log(sig[-1])) / (math.log(sig[0]) - math.log(sig[-1]))
    stretched = np.exp(log_new_lo + u * (log_new_hi - log_new_lo))
    return _finish([process.t_of_sigma_ve(float(s)) for s in stretched], start, end, f"table={table!r}")


# ----- flow-matching pipeline grids -----------------------------------------------------------------------
# num_train_timesteps of the SD3 / FLUX / Wan flow schedulers; their sigma ranges are set in 1/1000 units.
FLOW_TRAIN_STEPS = 1000


def flow_shift(sigma: float, shift: float) -> float:
    """The shifted flow sigma shift s / (1 + (shift - 1) s).

    SD3's static shift; FLUX's exponential time shift e^mu / (e^mu + 1/s - 1) is the same map with shift = e^mu.
    """
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def flow_unshift(sigma: float, shift: float) -> float:
    """The inverse of `flow_shift`."""
    return sigma / (shift - (shift - 1.0) * sigma)


def flux_mu(image_seq_len: float, base_seq_len: float = 256, max_seq_len: float = 4096,
            base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's dynamic-shift exponent mu, linear in the packed latent sequence length (diffusers' calculate_shift)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def _flow_sigma(process: NoiseProcess, t: float) -> float:
    """The flow sigma with the noise level of process time t: sigma_VE / (1 + sigma_VE) (t itself on flow)."""
    if isinstance(process, RectifiedFlow):
        return t
    sv = process.sigma_ve(t)
    return sv / (1.0 + sv)


def _time_of_flow_sigma(process: NoiseProcess, s: float) -> float:
    if isinstance(process, RectifiedFlow):
        # Pure noise (s = 1) has no finite lambda; it is stood for by t_top (processes.FLOW_T_TOP).
        return min(s, process.t_top)
    return process.t_of_sigma_ve(s / (1.0 - s))


def _time_arg(process: NoiseProcess, value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    process.check_time(float(value), name)
    return float(value)


def flow_shifted(process: NoiseProcess, n: int, shift: float, t_start: Optional[float] = None,
                 t_end: Optional[float] = None, native: Optional[tuple[float, float]] = None) -> Grid:
    """flow_shift(u, shift) for u uniform between the unshifted flow sigmas of t_start and t_end.

    `native` holds a pipeline's own unshifted first and last u; on the flow process they replace a t_start /
    t_end that is not given, so the grid is that pipeline's sigmas (its u = 1 lands on t_top). Elsewhere the
    defaults are the process's t_max / t_min.
    """
    n = _check_n(n)
    shift = _positive(shift, "shift")
    flow = isinstance(process, RectifiedFlow) and native is not None
    us: list[float] = []
    pinned: list[Optional[float]] = []   # the ends kept exactly; None where the pipeline's own end is used
    for name, value, default, k in (("t_start", t_start, process.t_max, 0), ("t_end", t_end, process.t_min, 1)):
        if value is None and flow:
            us.append(native[k])  # type: ignore[index]
            pinned.append(None)
        else:
            t = default if value is None else _time_arg(process, value, name)
            us.append(flow_unshift(_flow_sigma(process, t), shift))
            pinned.append(t)
    if pinned[0] is not None and pinned[1] is not None and not pinned[1] < pinned[0]:
        raise ValueError(f"t_end={pinned[1]!r} must be below t_start={pinned[0]!r} "
                         "(grids run from noisiest to cleanest)")
    ts = [_time_of_flow_sigma(process, flow_shift(float(u), shift)) for u in np.linspace(us[0], us[1], n + 1)]
    start = ts[0] if pinned[0] is None else pinned[0]
    end = ts[-1] if pinned[1] is None else pinned[1]
    process.check_time(start, "t_start")
    process.check_time(end, "t_end")
    return _finish(ts, start, end)


def _native_ends(kind: str, m: int, shift: float) -> tuple[float, float]:
    """A pipeline's first and last unshifted sigma with m sigmas before its final 0."""
    step = 1.0 / FLOW_TRAIN_STEPS
    if kind == "flow-shift":
        # FlowMatchEuler / FlowMatchHeun keep the shifted sigma_min of their 1000 training sigmas and shift the
        # inference sigmas again: the last sigma is flow_shift(flow_shift(1/1000)).
        return 1.0, flow_shift(step, shift)
    if kind == "flow-dynamic":
        return 1.0, 1.0 / m                     # FluxPipeline passes linspace(1, 1/m, m)
    if kind == "flow-dpm":
        return 1.0 - step, (1.0 - step) / m     # DPMSolverMultistep: 1 - linspace(1, 1/1000, m + 1), zero dropped
    if kind == "flow-unipc":
        return 1.0, float(np.linspace(1.0, step, m + 1)[m - 1])   # UniPCMultistep: linspace(1, 1/1000, m + 1)[:-1]
    raise ValueError(f"grid={kind!r} is not a flow pipeline grid")


FLOW_PIPELINE_GRIDS = ("flow-shift", "flow-dynamic", "flow-dpm", "flow-unipc")


def flow_pipeline(kind: str, process: NoiseProcess, n: int, t_start: Optional[float] = None,
                  t_end: Optional[float] = None, shift: float = 3.0) -> Grid:
    """A diffusers flow-matching schedule with n + 1 sigmas before its final 0 (num_inference_steps = n + 1).

    On the flow process with no t_start / t_end it is that scheduler's set_timesteps sigmas, a first sigma of 1
    mapped to t_top; see docs/grids.md for which scheduler each kind is.
    """
    n = _check_n(n)
    shift = _positive(shift, "shift")
    return flow_shifted(process, n, shift, t_start, t_end, native=_native_ends(kind, n + 1, shift))


def _flow_entry(kind: str) -> GridFn:
    def fn(process: NoiseProcess, n: int, t_start: Optional[float] = None, t_end: Optional[float] = None,
           shift: float = 3.0) -> Grid:
        return flow_pipeline(kind, process, n, t_start, t_end, shift)

    fn.__doc__ = f"diffusers' {kind} flow-matching sigmas (shift, default 3.0 as SD3)."
    return fn


def _flow_dynamic(process: NoiseProcess, n: int, t_start: Optional[float] = None, t_end: Optional[float] = None,
                  mu: Optional[float] = None, image_seq_len: Optional[float] = None) -> Grid:
    """FluxPipeline's sigmas: linspace(1, 1/m, m) under the exponential time shift e^mu (mu from image_seq_len)."""
    if mu is not None and image_seq_len is not None:
        raise ValueError("params.image_seq_len: give mu or image_seq_len, not both")
    if mu is None:
        seq = 4096.0 if image_seq_len is None else _positive(image_seq_len, "image_seq_len")
        mu = flux_mu(seq)
    elif isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu):
        raise ValueError(f"mu={mu!r} must be a finite number")
    return flow_pipeline("flow-dynamic", process, n, t_start, t_end, math.exp(mu))


def from_flow_sigmas(sigmas: Sequence[float], process: Union[str, NoiseProcess] = "flow") -> Grid:
    """A flow pipeline's sigmas (noisiest first) as times of the flow process.

    A trailing 0 is dropped (the step to sigma 0 is our final denoise, x = D(x_N, t_N)), and sigmas above t_top
    (the pipeline's pure-noise sigma 1) become t_top. Heun's repeated sigmas must be passed once each.
    """
    proc = processes.get(process)
    if not isinstance(proc, RectifiedFlow):
        raise ValueError(f"process={proc.name!r}: flow sigmas are times of the flow process")
    values = [float(s) for s in sigmas]
    if values and values[-1] == 0.0:
        values = values[:-1]
    if len(values) < 2:
        raise ValueError("sigmas must hold at least 2 nonzero values")
    ts = []
    for i, s in enumerate(values):
        if not math.isfinite(s) or s > 1.0:
            raise ValueError(f"sigmas[{i}]={s!r} must be a finite flow sigma in (0, 1]")
        t = min(s, proc.t_top)
        proc.check_time(t, f"sigmas[{i}]")
        ts.append(t)
    return _finish(ts, ts[0], ts[-1], "sigmas")


# ----- registry -------------------------------------------------------------------------------------------
def _ays_entry(table: str) -> GridFn:
    def fn(process: NoiseProcess, n: int, t_start: Optional[float] = None, t_end: Optional[float] = None) -> Grid:
        return ays(table, n, process, t_start, t_end)

    fn.__doc__ = f"Align Your Steps, published {table} table (log-linear interpolation to n steps)."
    return fn


_REGISTRY: dict[str, tuple[GridFn, tuple[str, ...]]] = {
    "time-uniform": (time_uniform, ()),
    "quadratic": (quadratic, ()),
    "logsnr": (logsnr, ()),
    "edm": (edm, ("rho",)),
    "kl-optimal": (kl_optimal, ("c",)),
    **{f"ays-{table}": (_ays_entry(table), ()) for table in AYS_TABLES},
    **{kind: (_flow_entry(kind), ("shift",)) for kind in FLOW_PIPELINE_GRIDS if kind != "flow-dynamic"},
    "flow-dynamic": (_flow_dynamic, ("mu", "image_seq_len")),
}


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str, process: str | NoiseProcess, n: int, t_start: Optional[float] = None,
        t_end: Optional[float] = None, **params: Any) -> Grid:
    """The grid registered under `name` for `process` with n steps; extra params (rho, c, shift, mu) go to it."""
    if name not in _REGISTRY:
        raise ValueError(f"grid={name!r} is unknown; known grids: {', '.join(names())}")
    fn, allowed = _REGISTRY[name]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        extra = f"; it takes {', '.join(allowed)}" if allowed else "; it takes no parameters"
        raise ValueError(f"params.{unknown[0]} is not a parameter of grid {name!r}{extra}")
    return fn(processes.get(process), n, t_start, t_end, **params)
