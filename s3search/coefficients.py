"""Float64 weights of one exponential-integrator step, for every derivative scheme.

A step s -> t integrates the model output V (data D or noise eps) against an exponential kernel in the
normalised log-SNR variable u = (lambda - lambda_s) / h, u in [0, 1]:

    x_t = decay * x_s + pref * omega * int_0^1 exp(-omega (1 - u)) V(u) du + noise

(data form: omega = (1 + eta) h; noise form: omega = -h; see integrator.py). V is known at nodes u_j (0 for the
current time, negative for earlier ones, 1 for a corrector's new evaluation). Every scheme below returns weights
w_j so that the integral is approximated by sum_j w_j V_j; the weights always sum to K_0 = 1 - exp(-omega).

The trapezoidal rule is the exception: it is not a quadrature of the exponential kernel but Heun's rule on the
flow velocity, whose weights depend on where the step lies (lambda_s), not only on its length.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["kernel_moments", "taylor_weights", "dpmpp_weights", "unipc_weights", "trapezoid_weights",
           "step_weights"]


_SERIES_TERMS = 40
_INV_FACTORIAL = np.array([1.0 / math.factorial(j) for j in range(_SERIES_TERMS + 8)])


def kernel_moments(omega: float, n: int) -> np.ndarray:
    """K_k = omega * int_0^1 exp(-omega (1 - u)) u^k du for k = 0 .. n-1."""
    moments = np.empty(n)
    if abs(omega) < 1.0:
        # Series K_k = omega k! sum_m (-omega)^m / (m + k + 1)!: the recurrence below loses digits for small
        # |omega|. One matrix product, since a Python loop here costs a visible share of a small model's call.
        powers = (-omega) ** np.arange(_SERIES_TERMS, dtype=np.float64)
        index = np.arange(_SERIES_TERMS)[None, :] + np.arange(n)[:, None] + 1
        factorials = np.array([math.factorial(k) for k in range(n)], dtype=np.float64)
        return omega * factorials * (_INV_FACTORIAL[index] @ powers)
    moments[0] = -math.expm1(-omega)
    # Integration by parts: omega I_k = 1 - k I_{k-1}, with K_k = omega I_k.
    for k in range(1, n):
        moments[k] = 1.0 - k * moments[k - 1] / omega
    return moments


def taylor_weights(omega: float, nodes: Sequence[float]) -> np.ndarray:
    """Exact integral of the polynomial interpolating V at the nodes (DEIS / SA-Solver / exact phi_k)."""
    u = np.asarray(nodes, dtype=np.float64)
    vandermonde = np.vander(u, N=len(u), increasing=True)  # [j, k] = u_j^k
    return np.linalg.solve(vandermonde.T, kernel_moments(omega, len(u)))


def dpmpp_weights(omega: float, nodes: Sequence[float]) -> np.ndarray:
    """DPM-Solver++ multistep coefficients, as in the dpm-solver and k-diffusion code.

    Order 2 is the 2M midpoint rule K_0 [V_0 + (V_0 - V_1) / (2 r)]. Order 3 is K_0 V_0 + K_1 d1 + (K_2 / 2) d2:
    the reference 3M uses half the exact coefficient on the second difference (exact integration is "taylor").
    """
    n = len(nodes)
    K = kernel_moments(omega, max(n, 1))
    e = np.eye(n)
    if n == 1:
        return K[0] * e[0]
    r0 = -nodes[1]
    d1_0 = (e[0] - e[1]) / r0
    if n == 2:
        return K[0] * (e[0] + d1_0 / 2.0)
    r1 = nodes[1] - nodes[2]
    d1_1 = (e[1] - e[2]) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return K[0] * e[0] + K[1] * d1 + 0.5 * K[2] * d2


def unipc_weights(omega: float, nodes: Sequence[float], variant: str, corrector: bool) -> np.ndarray:
    """UniPC's UniP (predictor) or UniC (corrector, last node = 1) weights with B(h) = bh1 or bh2.

    Follows uni_pc.py: hh = -omega, g_i = i! * hh * phi_{i+1}(hh) / B(h), rho solves R rho = g with R_ik = r_k^(i-1),
    and the simplified rho = 1/2 for a second-order predictor and a first-order corrector.
    """
    n = len(nodes)
    e = np.eye(n)
    hh = -omega
    h_phi_1 = math.expm1(hh)
    base = -h_phi_1 * e[0]
    if n == 1:
        return base
    B = hh if variant == "bh1" else h_phi_1
    rks = np.asarray(nodes[1:], dtype=np.float64)  # previous nodes (negative), then 1 for a corrector node
    diffs = [(e[k + 1] - e[0]) / rks[k] for k in range(n - 1)]
    # Right-hand side g_i = i! (phi_k terms) / B for i = 1 .. n-1, built with uni_pc.py's recurrence.
    order = n - 1 if corrector else n
    g, h_phi_k, fact = [], h_phi_1 / hh - 1.0, 1
    for i in range(1, order + 1):
        g.append(h_phi_k * fact / B)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    all_rks = np.append(rks[:-1], 1.0) if corrector else np.append(rks, 1.0)
    R = np.stack([all_rks ** (i - 1) for i in range(1, order + 1)])
    if corrector:
        rho = np.array([0.5]) if order == 1 else np.linalg.solve(R, np.array(g))
    else:
        rho = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], np.array(g[:-1]))
    return base - B * sum(r * d for r, d in zip(rho, diffs))


def _flow_time(lam: float) -> float:
    """sigma / (alpha + sigma) = 1 / (1 + e^lam), in the form that neither overflows nor loses digits."""
    if lam >= 0:
        small = math.exp(-lam)
        return small / (1.0 + small)
    return 1.0 / (1.0 + math.exp(lam))


def trapezoid_weights(lam_s: float, h: float) -> np.ndarray:
    """Data-form weights (current point, corrector's point) of the trapezoidal rule in flow coordinates.

    With flow times a (at s) and b (at t), state y = x / (alpha + sigma) and velocity v = (y - D) / a, the step
    y_t = y_s + (b - a) (v_s + v_t) / 2, with v_t at the Euler (DDIM) prediction, expands to
    (b / a) y_s + w'_s D_s + w'_t D_t. The y_s coefficient is sigma_t / sigma_s in the original coordinates, the
    data form's decay at eta = 0, so only the D weights differ: w = w' / (1 - b), since pref = alpha_t.
    """
    a, b = _flow_time(lam_s), _flow_time(lam_s + h)
    one_minus_b = _flow_time(-(lam_s + h))
    w_s = (a - b) * (2.0 * b - a) / (2.0 * a * b * one_minus_b)
    w_t = (a - b) / (2.0 * b * one_minus_b)
    return np.array([w_s, w_t])


def step_weights(derivative: str, omega: float, nodes: Sequence[float], corrector: bool,
                 lam_s: float | None = None) -> np.ndarray:
    """Weights of one step; `lam_s` (the step's starting lambda) is needed by the trapezoidal corrector only,
    whose omega is then h (a corrected trapezoidal step is an eta = 0 data-form step)."""
    if derivative == "trapezoid":
        if not corrector:
            return taylor_weights(omega, nodes)  # Euler in flow time is DDIM
        if lam_s is None or list(nodes) != [0.0, 1.0]:
            raise ValueError("the trapezoidal corrector needs lam_s and the nodes [0, 1]")
        return trapezoid_weights(lam_s, omega)
    if derivative == "taylor":
        return taylor_weights(omega, nodes)
    if derivative == "dpmpp":
        return dpmpp_weights(omega, nodes)
    if derivative in ("bh1", "bh2"):
        return unipc_weights(omega, nodes, derivative, corrector)
    raise ValueError(f"derivative={derivative!r} is unknown")
