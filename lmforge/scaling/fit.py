"""Scaling-law fits: Chinchilla's three ways (Hoffmann et al. 2022) of turning an IsoFLOP sweep into the
compute-optimal model size N_opt(C) and training tokens D_opt(C), each with bootstrap intervals.

This file is long because the three approaches share their data handling, bootstrap and reporting,
and the plots draw all three on the same axes; split up, each piece would import the others.

Conventions. N is the weights of the matrix multiplies (every linear layer, the output head included;
the input token table, a lookup, left out: see lmforge.scaling.sweep), D the training tokens, C compute
in FLOPs, the loss the final validation loss in nats per token. Runs with the same `budget` form one
IsoFLOP curve, and C of that curve is its nominal budget. The closed forms use C ~ 6·N·D; the runs' own
`flops` also count attention, so an allocation "under C = 6ND" is that shorthand's, not the sweep's
exact accounting (at equal C the exact rule trains fewer tokens: attention is 5-20% of C in the sweep's
small models). Approach 1's D_opt is its best run's actual tokens; approach 2's is C / (6 N*).

* Approach 1, lowest loss per budget: each budget's best run gives a point (C, N_opt, D_opt), and power
  laws N_opt = k_N·C^a, D_opt = k_D·C^b are fitted by least squares in log-log (a and b separately: a + b
  is near 1 only if the runs sit on C = 6ND). Chinchilla takes the envelope of whole training curves;
  with one final loss per run, the minimum over a budget's runs is the same idea at the grid's resolution.
* Approach 2, IsoFLOP parabolas: per budget with 3 or more distinct sizes, loss = p0 + p1·ln N +
  p2·(ln N)^2; the vertex ln N* = -p1 / (2·p2) is that budget's N_opt and D* = C / (6·N*) (the budget's
  C, under C = 6ND). A parabola opening downwards (p2 <= 0) has no minimum, and one whose vertex lies outside the
  sizes sampled only extrapolates one: such a budget is left out,
  with a warning in the result. Then the same power laws as approach 1.
* Approach 3, parametric: L(N, D) = E + A/N^alpha + B/D^beta, fitted as Hoffmann et al. and Epoch AI's
  replication (Besiroglu et al. 2024) do: minimise sum_i Huber_delta(LSE(a - alpha·ln N_i, b - beta·ln D_i,
  e) - ln L_i) over (a, b, e, alpha, beta), with A = e^a, B = e^b, E = e^e, by L-BFGS-B with the analytic
  gradient. The Huber loss on log-loss makes a run that went wrong count linearly, not quadratically.
  Starts: Hoffmann's grid (alpha, beta in {0, 0.5, .., 2}, e in {-1, -.5, .., 1}, a, b in {0, 5, .., 25}:
  4,500 points) is scored in one vectorised pass, and L-BFGS-B runs from the best grid point of each of
  its 25 (alpha, beta) pairs: one start per basin of exponents instead of 4,500 runs of the optimiser.
  Minimising L under C = 6ND gives N_opt = G·(C/6)^(beta/(alpha+beta)), D_opt = (C/6)^(alpha/(alpha+beta))/G
  with G = (alpha·A / (beta·B))^(1/(alpha+beta)), so a = beta/(alpha+beta) and b = alpha/(alpha+beta).

Uncertainty is a bootstrap throughout, and every interval is a percentile interval (90% by default: the
5th and 95th percentiles of the resampled estimates). Approaches 1 and 2 resample runs with replacement
within each budget (the budgets are the design, the runs the noise); approach 3 resamples all runs
together and refits each resample from the full-data optimum and the best grid start. Approach 1's interval only
reflects which run wins a budget under noise, not the spacing of the sizes (its real resolution).

Approach 3 also predicts the loss of an unseen (N, D) with a prediction interval: each bootstrap fit's
prediction times exp(r) for every log-residual r of the full fit (scaled by sqrt(n / (n - 5)), as
residuals of a 5-parameter fit understate the noise), and the percentiles of all those products. Both
the uncertainty of the parameters and the run-to-run noise of a single new run are in it.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.common import LmforgeError

LEVEL = 0.9  # the coverage of every interval unless told otherwise
DELTA = 1e-3  # Huber's delta on log-loss, as Hoffmann et al.
BOOTSTRAP_FRONTIER = 200  # resamples of approaches 1 and 2 (a fit is a few polyfits: cheap)
BOOTSTRAP_PARAMETRIC = 100  # resamples of approach 3 (each a few L-BFGS-B runs)
N_PARAMS = 5  # E, A, B, alpha, beta

# Published fits, for comparison only: their E, A and B are in nats per token of their corpus and tokenizer.
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
EPOCH = {"E": 1.82, "A": 482.0, "B": 2085.4, "alpha": 0.3478, "beta": 0.3658}
# Chinchilla's Table 2: (a, b) of approaches 1, 2 and 3.
CHINCHILLA_EXPONENTS = {1: (0.50, 0.50), 2: (0.49, 0.51), 3: (0.46, 0.54)}

# L-BFGS-B's box on (a', b', e, alpha, beta) (a' and b' centred: see _minimise): it only rules out negative
# exponents (a loss that grows with size) and overflow.
BOUNDS = [(-100.0, 100.0), (-100.0, 100.0), (-20.0, 10.0), (0.0, 4.0), (0.0, 4.0)]


@dataclass(frozen=True)
class Run:
    """One finished run of a sweep."""

    budget: float  # the IsoFLOP budget the run belongs to (FLOPs): the grid's nominal C
    params: float  # N: weights of the matrix multiplies (input token table excluded)
    tokens: float  # D: training tokens
    flops: float  # the run's actual training FLOPs (attention included)
    loss: float  # final validation loss, nats per token
    name: str = ""

    @classmethod
    def from_record(cls, record: dict) -> Run:
        """A run from a sweep's scaling.json record (other keys ignored)."""
        try:
            return cls(budget=float(record["budget"]), params=float(record["params"]),
                       tokens=float(record["tokens"]), flops=float(record["flops"]), loss=float(record["loss"]),
                       name=str(record.get("name", "")))
        except KeyError as e:
            raise LmforgeError(f"run record {record.get('name', '?')!r} has no {e.args[0]!r}") from None


def as_runs(runs: Iterable) -> list[Run]:
    """Runs (or sweep records) checked: every number finite, and budget, N, D and the loss > 0."""
    out = [r if isinstance(r, Run) else Run.from_record(r) for r in runs]
    for i, r in enumerate(out):
        for what in ("budget", "params", "tokens", "loss"):
            value = getattr(r, what)
            if not (math.isfinite(value) and value > 0):
                raise LmforgeError(f"run {r.name or '#' + str(i)}: {what} must be a finite number > 0, got {value}")
    return out


def _by_budget(runs: list[Run]) -> dict[float, list[Run]]:
    groups: dict[float, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.budget, []).append(r)
    return dict(sorted(groups.items()))


@dataclass(frozen=True)
class Estimate:
    """A point estimate and its bootstrap interval (nan bounds: fitted without a bootstrap)."""

    value: float
    lo: float
    hi: float

    def __str__(self) -> str:
        if math.isnan(self.lo):
            return f"{self.value:.4g}"
        return f"{self.value:.4g} [{self.lo:.4g}, {self.hi:.4g}]"


def _estimate(value: float, samples, level: float) -> Estimate:
    samples = np.asarray(samples, dtype=float)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return Estimate(float(value), math.nan, math.nan)
    tail = 50.0 * (1.0 - level)
    lo, hi = np.percentile(samples, [tail, 100.0 - tail])
    return Estimate(float(value), float(lo), float(hi))


# ---------------------------------------------------------------- power laws: approaches 1 and 2

@dataclass(frozen=True)
class PowerLaw:
    """y = k · x^a."""

    k: float
    a: float

    def __call__(self, x):
        return self.k * np.asarray(x, dtype=float) ** self.a


def _line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least-squares intercept and slope of y on x."""
    xc = x - x.mean()
    slope = float((xc * (y - y.mean())).sum() / (xc * xc).sum())
    return float(y.mean() - slope * x.mean()), slope


def fit_power_law(x, y) -> PowerLaw:
    """y = k · x^a by least squares on (ln x, ln y)."""
    x, y = np.asarray(x, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    if len(x) != len(y) or len(x) < 2:
        raise LmforgeError(f"a power law needs two or more (x, y) pairs, got {len(x)} x and {len(y)} y")
    if not ((x > 0).all() and (y > 0).all()):
        raise LmforgeError("a power law is fitted in log-log: every x and y must be > 0")
    if np.ptp(np.log(x)) == 0:
        raise LmforgeError("a power law needs two or more distinct x")
    log_k, a = _line(np.log(x), np.log(y))
    return PowerLaw(math.exp(log_k), a)


def _frontier_params(budgets, n_opt, d_opt) -> tuple[float, float, float, float]:
    """(ln k_N, a, ln k_D, b) of the two power laws through the per-budget optima."""
    lc = np.log(budgets)
    return (*_line(lc, np.log(n_opt)), *_line(lc, np.log(d_opt)))


@dataclass(frozen=True)
class Parabola:
    """One budget's IsoFLOP curve in approach 2: loss = p2·x^2 + p1·x + p0 with x = ln N."""

    budget: float
    coef: tuple[float, float, float]  # (p2, p1, p0), np.polyfit's order
    n_opt: float  # the vertex
    d_opt: float  # C / (6 N*)
    loss_opt: float
    n_range: tuple[float, float]  # the smallest and largest size sampled

    def __call__(self, n):
        return np.polyval(self.coef, np.log(np.asarray(n, dtype=float)))


@dataclass
class FrontierFit:
    """N_opt(C) and D_opt(C) as power laws through per-budget optima (approach 1 or 2)."""

    approach: int
    budgets: np.ndarray  # C of each optimum
    n_opt: np.ndarray
    d_opt: np.ndarray
    n_law: PowerLaw
    d_law: PowerLaw
    samples: np.ndarray  # (resamples, 4): ln k_N, a, ln k_D, b of each bootstrap fit
    level: float = LEVEL
    parabolas: list[Parabola] = field(default_factory=list)  # approach 2 only
    warnings: list[str] = field(default_factory=list)

    @property
    def a(self) -> Estimate:
        """The exponent of N_opt ∝ C^a."""
        return _estimate(self.n_law.a, self.samples[:, 1], self.level)

    @property
    def b(self) -> Estimate:
        """The exponent of D_opt ∝ C^b."""
        return _estimate(self.d_law.a, self.samples[:, 3], self.level)

    def optimal(self, C):
        """(N_opt, D_opt) at compute C, from the two power laws."""
        return self.n_law(C), self.d_law(C)

    def tokens_per_param(self, C: float) -> Estimate:
        """D_opt / N_opt at compute C, with its bootstrap interval."""
        lc = math.log(C)
        s = self.samples
        ratios = np.exp(s[:, 2] + s[:, 3] * lc - s[:, 0] - s[:, 1] * lc)
        return _estimate(float(self.d_law(C) / self.n_law(C)), ratios, self.level)

    def to_dict(self) -> dict:
        """A JSON-serialisable summary (points, laws, intervals, parabolas, warnings)."""
        return {"approach": self.approach, "budgets": self.budgets.tolist(), "n_opt": self.n_opt.tolist(),
                "d_opt": self.d_opt.tolist(), "k_n": self.n_law.k, "a": self.n_law.a, "k_d": self.d_law.k,
                "b": self.d_law.a, "level": self.level, "a_interval": _json_interval(self.a),
                "b_interval": _json_interval(self.b), "bootstrap": len(self.samples),
                "parabolas": [{"budget": p.budget, "coef": list(p.coef), "n_opt": p.n_opt, "d_opt": p.d_opt,
                               "loss_opt": p.loss_opt} for p in self.parabolas],
                "warnings": list(self.warnings)}


def _json_interval(est: Estimate) -> list | None:
    return None if math.isnan(est.lo) else [est.lo, est.hi]


def _edge_warning(budget: float, sizes: np.ndarray, n_opt: float) -> str | None:
    """A budget whose optimum is at or past an end of its sizes: its N_opt is then a bound, not an estimate."""
    if sizes.min() < n_opt < sizes.max():
        return None
    side = "smallest" if n_opt <= sizes.min() else "largest"
    return (f"budget {budget:.3g}: the optimum (N = {n_opt:.3g}) is at or beyond the {side} size sampled; "
            "add sizes on that side")


def _frontier(approach, budgets, n_opt, d_opt, samples, level, parabolas=(), warnings=()) -> FrontierFit:
    budgets, n_opt, d_opt = (np.asarray(v, dtype=float) for v in (budgets, n_opt, d_opt))
    lkn, a, lkd, b = _frontier_params(budgets, n_opt, d_opt)
    return FrontierFit(approach, budgets, n_opt, d_opt, PowerLaw(math.exp(lkn), a), PowerLaw(math.exp(lkd), b),
                       np.asarray(samples, dtype=float).reshape(-1, 4), level, list(parabolas), list(warnings))


def approach1(runs, *, bootstrap: int = BOOTSTRAP_FRONTIER, seed: int = 0, level: float = LEVEL) -> FrontierFit:
    """Approach 1: per budget the run with the lowest loss; power laws in C through those runs' N and D.
    Intervals: `bootstrap` resamples of the runs within each budget (percentile, `level` coverage)."""
    groups = _by_budget(as_runs(runs))
    if len(groups) < 2:
        raise LmforgeError(f"approach 1 fits a power law in compute and needs runs at two or more budgets, "
                           f"got {len(groups)}")
    budgets = np.array(list(groups))
    arrays = [np.array([(r.params, r.tokens, r.loss) for r in g]).T for g in groups.values()]  # (3, runs)
    best = [int(np.argmin(loss)) for _, _, loss in arrays]
    n_opt = [p[i] for (p, _, _), i in zip(arrays, best)]
    d_opt = [t[i] for (_, t, _), i in zip(arrays, best)]
    warnings = [_edge_warning(C, p, n) for C, (p, _, _), n in zip(budgets, arrays, n_opt) if len(set(p)) > 1]
    warnings = [w for w in warnings if w]
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        nb, db = [], []
        for p, t, loss in arrays:
            idx = rng.integers(0, len(loss), len(loss))
            j = idx[np.argmin(loss[idx])]
            nb.append(p[j])
            db.append(t[j])
        samples.append(_frontier_params(budgets, nb, db))
    return _frontier(1, budgets, n_opt, d_opt, samples, level, warnings=warnings)


def _parabola(budget: float, sizes: np.ndarray, loss: np.ndarray) -> Parabola | None:
    """The IsoFLOP parabola of one budget, or None when it opens downwards (no minimum)."""
    coef = np.polyfit(np.log(sizes), loss, 2)
    if coef[0] <= 0:
        return None
    x = -coef[1] / (2.0 * coef[0])
    n = math.exp(x)
    return Parabola(float(budget), tuple(float(c) for c in coef), n, budget / (6.0 * n),
                    float(np.polyval(coef, x)), (float(sizes.min()), float(sizes.max())))


def approach2(runs, *, bootstrap: int = BOOTSTRAP_FRONTIER, seed: int = 0, level: float = LEVEL) -> FrontierFit:
    """Approach 2: a parabola in ln N per budget, its vertex N* and D* = C / (6 N*); power laws in C
    through the vertices. Budgets with fewer than 3 distinct sizes, whose parabola has no minimum, or
    whose minimum lies outside the sizes sampled, are left out with a warning. Intervals: `bootstrap`
    resamples of the runs within each budget (a resample with fewer than 3 distinct sizes is drawn
    again; a budget whose resampled parabola opens downwards is left out of that resample)."""
    groups = _by_budget(as_runs(runs))
    warnings, used = [], []
    for C, g in groups.items():
        sizes, loss = np.array([r.params for r in g]), np.array([r.loss for r in g])
        if len(set(sizes)) < 3:
            warnings.append(f"budget {C:.3g}: {len(set(sizes))} distinct sizes, a parabola needs 3; left out")
            continue
        par = _parabola(C, sizes, loss)
        if par is None:
            warnings.append(f"budget {C:.3g}: the loss curve opens downwards (no minimum); left out")
            continue
        if (w := _edge_warning(C, sizes, par.n_opt)) is not None:
            # a vertex outside the sizes is the parabola's extrapolation, not a measured optimum
            warnings.append(w.replace("; add", "; its vertex is an extrapolation, left out: add"))
            continue
        used.append((par, sizes, loss))
    if len(used) < 2:
        reasons = "; ".join(warnings) or "all runs are at one budget"
        raise LmforgeError(f"approach 2 needs IsoFLOP parabolas at two or more budgets, got {len(used)} ({reasons})")
    budgets = np.array([p.budget for p, _, _ in used])
    rng = np.random.default_rng(seed)
    samples, short = [], 0
    for _ in range(bootstrap):
        cb, nb = [], []
        for par, sizes, loss in used:
            while True:  # a vertex needs three distinct sizes; the resample is drawn again until it has them
                idx = rng.integers(0, len(loss), len(loss))
                if len(set(sizes[idx])) >= 3:
                    break
            p = _parabola(par.budget, sizes[idx], loss[idx])
            if p is not None:
                cb.append(p.budget)
                nb.append(p.n_opt)
        if len(cb) < len(used):
            short += 1
        if len(cb) >= 2:
            cb = np.array(cb)
            samples.append(_frontier_params(cb, nb, cb / (6.0 * np.array(nb))))
    if short:
        warnings.append(f"{short} of {bootstrap} bootstrap resamples had a budget without a minimum "
                        "and were fitted without it")
    parabolas = [p for p, _, _ in used]
    return _frontier(2, budgets, [p.n_opt for p in parabolas], [p.d_opt for p in parabolas], samples, level,
                     parabolas, warnings)


# ---------------------------------------------------------------- approach 3: parametric L(N, D)

def hoffmann_grid() -> np.ndarray:
    """Hoffmann et al.'s 4,500 initialisations, rows (a, b, e, alpha, beta)."""
    exps, es, coefs = np.arange(0.0, 2.01, 0.5), np.arange(-1.0, 1.01, 0.5), np.arange(0.0, 25.1, 5.0)
    return np.array([(a, b, e, al, be) for al, be, e, a, b in itertools.product(exps, exps, es, coefs, coefs)])


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    ar = np.abs(r)
    return np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta))


def _log_law(theta: np.ndarray, lN: np.ndarray, lD: np.ndarray) -> np.ndarray:
    """ln L for rows of theta (..., 5) at every run: LSE(a - alpha ln N, b - beta ln D, e), vectorised."""
    a, b, e, al, be = (theta[..., i, None] for i in range(N_PARAMS))
    return np.logaddexp(np.logaddexp(a - al * lN, b - be * lD), e)


def _objective(theta, lN, lD, lL, delta, scale):
    """The Huber objective and its gradient for one theta. `scale` (1 / (n·delta^2)) measures residuals
    in units of delta and averages over runs, so L-BFGS-B's tolerances mean the same for every delta and n
    (unscaled, the sum is ~1e-4 and its default ftol would stop far from the optimum)."""
    a, b, e, al, be = theta
    t1, t2 = a - al * lN, b - be * lD
    top = np.maximum(np.maximum(t1, t2), e)
    w1, w2, w3 = np.exp(t1 - top), np.exp(t2 - top), np.exp(e - top)
    total = w1 + w2 + w3
    r = top + np.log(total) - lL
    g = np.clip(r, -delta, delta) / total  # Huber's derivative times the LSE's softmax denominator
    g1, g2 = g * w1, g * w2
    grad = np.array([g1.sum(), g2.sum(), g @ w3, -(g1 @ lN), -(g2 @ lD)])
    return float(_huber(r, delta).sum()) * scale, grad * scale


def _minimise(starts, lN, lD, lL, delta) -> tuple[np.ndarray, float]:
    """L-BFGS-B from each start; the best (theta, Huber sum).

    The optimiser works on a' = a - alpha·mean(ln N) and b' = b - beta·mean(ln D) against centred logs:
    the same function, but a and alpha no longer move along a long thin valley (ln N is ~10-20, so a
    change of alpha must be matched by a change of a 15 times larger), which saves about a third of
    the iterations."""
    from scipy.optimize import minimize

    mN, mD = lN.mean(), lD.mean()
    shift = np.array([mN, mD])
    scale = 1.0 / (len(lL) * delta * delta)
    best_x, best_f = None, math.inf
    for x0 in starts:
        x0 = np.array(x0, dtype=float)
        x0[:2] -= x0[3:] * shift
        res = minimize(_objective, x0, args=(lN - mN, lD - mD, lL, delta, scale), jac=True, method="L-BFGS-B",
                       bounds=BOUNDS, options={"ftol": 1e-14, "gtol": 1e-10, "maxiter": 500})
        if np.isfinite(res.fun) and res.fun < best_f:
            best_x, best_f = res.x.copy(), float(res.fun)
    if best_x is None:
        raise LmforgeError("the parametric fit found no finite optimum from any start")
    best_x[:2] += best_x[3:] * shift
    return best_x, best_f / scale


def _ranked_starts(inits: np.ndarray, lN, lD, lL, delta) -> np.ndarray:
    """The best start of each (alpha, beta) pair among `inits`, best first (one vectorised scoring pass)."""
    scores = _huber(_log_law(inits, lN, lD) - lL, delta).sum(axis=-1)
    scores = np.where(np.isfinite(scores), scores, np.inf)
    chosen: dict[tuple, int] = {}
    for i in np.argsort(scores, kind="stable"):
        chosen.setdefault((round(inits[i, 3], 9), round(inits[i, 4], 9)), int(i))
    return inits[sorted(chosen.values(), key=lambda i: scores[i])]


def _natural(theta: np.ndarray) -> np.ndarray:
    """(a, b, e, alpha, beta) -> (E, A, B, alpha, beta)."""
    a, b, e, al, be = np.moveaxis(np.asarray(theta, dtype=float), -1, 0)
    return np.stack([np.exp(e), np.exp(a), np.exp(b), al, be], axis=-1)


@dataclass(frozen=True)
class Prediction:
    """A predicted loss and its prediction interval (floats, or arrays for array inputs)."""

    loss: object
    lo: object
    hi: object


@dataclass
class ParametricFit:
    """L(N, D) = E + A / N^alpha + B / D^beta (approach 3), with its bootstrap fits."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    samples: np.ndarray  # (resamples, 5): E, A, B, alpha, beta of each bootstrap fit
    residuals: np.ndarray  # ln(measured loss) - ln(fitted loss) of every run of the full fit
    delta: float = DELTA
    level: float = LEVEL
    objective: float = math.nan  # the Huber sum at the optimum
    warnings: list[str] = field(default_factory=list)

    NAMES = ("E", "A", "B", "alpha", "beta")

    @property
    def params(self) -> np.ndarray:
        return np.array([self.E, self.A, self.B, self.alpha, self.beta])

    def loss(self, N, D):
        """L(N, D), elementwise."""
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    def optimal(self, C):
        """(N_opt, D_opt) minimising L at compute C under C = 6ND (closed form)."""
        return _optimal(self.params, np.asarray(C, dtype=float))

    def interval(self, name: str, level: float | None = None) -> Estimate:
        """One of E, A, B, alpha, beta, or the allocation exponents a, b, with its bootstrap interval."""
        level = self.level if level is None else level
        if name in ("a", "b"):
            def exponent(p):
                return p[..., 4 if name == "a" else 3] / (p[..., 3] + p[..., 4])
            return _estimate(float(exponent(self.params)), exponent(self.samples), level)
        i = self.NAMES.index(name)
        return _estimate(float(self.params[i]), self.samples[:, i], level)

    @property
    def a(self) -> Estimate:
        """N_opt ∝ C^a with a = beta / (alpha + beta)."""
        return self.interval("a")

    @property
    def b(self) -> Estimate:
        """D_opt ∝ C^b with b = alpha / (alpha + beta)."""
        return self.interval("b")

    def tokens_per_param(self, C: float, level: float | None = None) -> Estimate:
        """D_opt / N_opt at compute C (under C = 6ND), with its bootstrap interval."""
        n, d = _optimal(self.params, np.float64(C))
        ns, ds = _optimal(self.samples, np.float64(C))
        return _estimate(float(d / n), ds / ns, self.level if level is None else level)

    def predict(self, N, D, *, level: float = LEVEL) -> Prediction:
        """The loss of a new run of N parameters and D tokens: the full fit's prediction, and a prediction
        interval from every (bootstrap fit, residual) pair (see the module docstring)."""
        N, D = np.broadcast_arrays(np.asarray(N, dtype=float), np.asarray(D, dtype=float))
        fits = self.samples if len(self.samples) else self.params[None]
        E, A, B, al, be = (fits[:, i, None] for i in range(N_PARAMS))
        preds = E + A / N.ravel() ** al + B / D.ravel() ** be  # (fits, points)
        n = len(self.residuals)
        noise = np.exp(self.residuals * math.sqrt(n / max(n - N_PARAMS, 1)))
        draws = (preds[:, None, :] * noise[None, :, None]).reshape(-1, preds.shape[1])
        tail = 50.0 * (1.0 - level)
        lo, hi = np.percentile(draws, [tail, 100.0 - tail], axis=0)
        point = self.loss(N, D)
        if N.ndim == 0:
            return Prediction(float(point), float(lo[0]), float(hi[0]))
        return Prediction(point, lo.reshape(N.shape), hi.reshape(N.shape))

    def to_dict(self) -> dict:
        """JSON-serialisable, bootstrap fits and residuals included: from_dict's fit predicts with
        intervals without the runs."""
        return {"format": "lmforge-scaling-parametric", "version": 1,
                **{k: float(v) for k, v in zip(self.NAMES, self.params)},
                "delta": self.delta, "level": self.level, "objective": self.objective,
                "samples": self.samples.tolist(), "residuals": self.residuals.tolist(),
                "warnings": list(self.warnings)}

    @classmethod
    def from_dict(cls, d: dict) -> ParametricFit:
        if not isinstance(d, dict) or d.get("format") != "lmforge-scaling-parametric" or d.get("version") != 1:
            raise LmforgeError("not a saved parametric scaling fit (format lmforge-scaling-parametric, version 1)")
        try:
            samples = np.asarray(d["samples"], dtype=float).reshape(-1, N_PARAMS)
            return cls(*(float(d[k]) for k in cls.NAMES), samples=samples,
                       residuals=np.asarray(d["residuals"], dtype=float), delta=float(d["delta"]),
                       level=float(d["level"]), objective=float(d["objective"]), warnings=list(d["warnings"]))
        except (KeyError, TypeError, ValueError) as e:
            raise LmforgeError(f"saved parametric scaling fit is incomplete or malformed: {e}") from None


def _optimal(p: np.ndarray, C: np.ndarray):
    """Closed-form (N_opt, D_opt) under C = 6ND for parameter rows p (..., 5) (E, A, B, alpha, beta)."""
    _, A, B, al, be = np.moveaxis(np.asarray(p, dtype=float), -1, 0)
    G = (al * A / (be * B)) ** (1.0 / (al + be))
    return G * (C / 6.0) ** (be / (al + be)), (C / 6.0) ** (al / (al + be)) / G


def parametric(runs, *, delta: float = DELTA, bootstrap: int = BOOTSTRAP_PARAMETRIC, seed: int = 0,
               inits=None, level: float = LEVEL) -> ParametricFit:
    """Approach 3: fit L(N, D) = E + A/N^alpha + B/D^beta by Huber loss (delta on ln L) with L-BFGS-B.
    `inits`: rows (a, b, e, alpha, beta) to start from (default Hoffmann's grid); the best of each
    (alpha, beta) pair is optimised. Intervals: `bootstrap` resamples of all runs, each refitted from the
    full-data optimum and the best grid start."""
    runs = as_runs(runs)
    if len(runs) <= N_PARAMS:
        raise LmforgeError(f"the parametric fit has {N_PARAMS} parameters and needs more runs than that, "
                           f"got {len(runs)}")
    if not delta > 0:
        raise LmforgeError(f"Huber's delta must be > 0, got {delta}")
    lN, lD, lL = (np.log([getattr(r, k) for r in runs]) for k in ("params", "tokens", "loss"))
    grid = hoffmann_grid() if inits is None else np.asarray(inits, dtype=float).reshape(-1, N_PARAMS)
    starts = _ranked_starts(grid, lN, lD, lL, delta)
    theta, objective = _minimise(starts, lN, lD, lL, delta)
    residuals = lL - _log_law(theta, lN, lD)
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(runs), len(runs))
        t, _ = _minimise([theta, starts[0]], lN[idx], lD[idx], lL[idx], delta)
        samples.append(t)
    warnings = []
    if len(_by_budget(runs)) < 2:
        warnings.append("all runs are at one budget: N and D move together and the fit is poorly determined")
    for name, i in (("ln E", 2), ("alpha", 3), ("beta", 4)):
        lo, hi = BOUNDS[i]
        if min(theta[i] - lo, hi - theta[i]) < 1e-6:
            warnings.append(f"{name} = {theta[i]:.4g} is at the edge of the search box [{lo}, {hi}]: the data do "
                            "not determine it")
    p = _natural(theta)
    return ParametricFit(*map(float, p), samples=_natural(np.array(samples).reshape(-1, N_PARAMS)),
                         residuals=residuals, delta=delta, level=level, objective=objective, warnings=warnings)


# ---------------------------------------------------------------- all three, the summary and the plots

APPROACHES = {"approach1": approach1, "approach2": approach2, "approach3": parametric}


def fit_all(runs, *, bootstrap: int | None = None, seed: int = 0, level: float = LEVEL, delta: float = DELTA) -> dict:
    """The three approaches on the same runs: {"runs", "budgets", "approach1", "approach2", "approach3",
    "errors"}. An approach these runs cannot support (LmforgeError) is None, with its reason in "errors",
    and the others still run; if none can, the first error is raised. `bootstrap` overrides every
    approach's default number of resamples."""
    runs = as_runs(runs)
    result: dict = {"runs": len(runs), "budgets": list(_by_budget(runs)), "level": level, "errors": {}}
    for name, fit in APPROACHES.items():
        kw = {"seed": seed, "level": level, **({"delta": delta} if name == "approach3" else {})}
        if bootstrap is not None:
            kw["bootstrap"] = bootstrap
        try:
            result[name] = fit(runs, **kw)
        except LmforgeError as e:
            result[name], result["errors"][name] = None, str(e)
    if all(result[name] is None for name in APPROACHES):
        raise LmforgeError(next(iter(result["errors"].values())))
    return result


def summary_lines(result: dict, budgets=None) -> list[str]:
    """fit_all's result as text: the allocation exponents of each approach, approach 3's parameters beside
    the published ones, and the compute-optimal tokens per parameter at `budgets` (default: the sweep's)."""
    pct = round(100 * result["level"])
    lines = [f"{result['runs']} runs at {len(result['budgets'])} budgets; intervals are {pct}% bootstrap "
             "percentile intervals",
             "", f"{'N_opt ~ C^a, D_opt ~ C^b':36} {'a':>24} {'b':>24}  Chinchilla a, b"]
    labels = {"approach1": "approach 1 (lowest loss per budget)", "approach2": "approach 2 (IsoFLOP parabolas)",
              "approach3": "approach 3 (parametric L(N, D))"}
    for i, (name, label) in enumerate(labels.items(), 1):
        fit = result.get(name)
        ref = "{:.2f}, {:.2f}".format(*CHINCHILLA_EXPONENTS[i])
        if fit is None:
            lines.append(f"{label:36} not fitted: {result['errors'].get(name, 'not run')}")
        else:
            lines.append(f"{label:36} {str(fit.a):>24} {str(fit.b):>24}  {ref}")
    epoch_a = EPOCH["beta"] / (EPOCH["alpha"] + EPOCH["beta"])
    lines.append(f"{'':36} Epoch AI's refit of Chinchilla's data: a = {epoch_a:.2f}, b = {1 - epoch_a:.2f}")
    fit3 = result.get("approach3")
    if fit3 is not None:
        lines += ["", "approach 3: L(N, D) = E + A / N^alpha + B / D^beta",
                  f"{'':8} {'this fit':>28} {'Chinchilla':>11} {'Epoch AI':>10}"]
        for k in ParametricFit.NAMES:
            lines.append(f"{k:8} {str(fit3.interval(k)):>28} {CHINCHILLA[k]:>11.4g} {EPOCH[k]:>10.4g}")
        lines.append("E, A and B are in nats per token of the corpus and tokenizer they were fitted on and do not "
                     "transfer between them; only the exponents are (roughly) comparable.")
        rms = math.sqrt(float(np.mean(fit3.residuals ** 2)))
        lines.append(f"the fit's log-residuals: rms {rms:.4f} (about {100 * rms:.2f}% of the loss)")
    fits = [(n, result[n]) for n in labels if result.get(n) is not None]
    lines += ["", "compute-optimal tokens per parameter D/N at C:",
              f"{'C (FLOPs)':>12}" + "".join(f"{'approach ' + n[-1]:>26}" for n, _ in fits)]
    for C in budgets if budgets is not None else result["budgets"]:
        lines.append(f"{C:>12.3g}" + "".join(f"{str(f.tokens_per_param(C)):>26}" for _, f in fits))
    for name, fit in fits:
        lines += [f"warning ({name}): {w}" for w in fit.warnings]
    return lines


def plot_scaling(runs, result: dict, out_dir) -> list[Path]:
    """isoflop.png (loss against N per budget, approach 2's parabolas and minima), frontier.png (N_opt and
    D_opt against C: every approach's optima and fitted laws) and parametric.png (approach 3: measured
    against predicted loss, and the residuals against N); a figure whose approach is missing is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = as_runs(runs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = _by_budget(runs)
    cmap = plt.get_cmap("viridis")
    colour = {C: cmap(0.85 * i / max(len(groups) - 1, 1)) for i, C in enumerate(groups)}
    fit1, fit2, fit3 = (result.get(k) for k in ("approach1", "approach2", "approach3"))
    written = []

    def save(fig, name):
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(7, 5))
    parabolas = {p.budget: p for p in (fit2.parabolas if fit2 else [])}
    for C, g in groups.items():
        ax.scatter([r.params for r in g], [r.loss for r in g], color=colour[C], s=22, label=f"C = {C:.3g}")
        if C in parabolas:
            p = parabolas[C]
            n = np.geomspace(min(p.n_range[0], p.n_opt), max(p.n_range[1], p.n_opt), 100)
            ax.plot(n, p(n), color=colour[C], lw=1)
            ax.scatter([p.n_opt], [p.loss_opt], color=colour[C], marker="*", s=140, edgecolor="black", zorder=3)
    ax.set(xscale="log", xlabel="N (matrix-multiply parameters)", ylabel="validation loss (nats/token)",
           title="IsoFLOP curves: runs, approach 2 parabolas and their minima (*)")
    ax.legend(fontsize=8)
    save(fig, "isoflop.png")

    if fit1 or fit2 or fit3:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        cs = np.geomspace(min(groups) / 2, max(groups) * 10, 100)
        styles = [(fit1, "o", "C0", "approach 1"), (fit2, "s", "C1", "approach 2")]
        for ax, i, what in ((axes[0], 0, "N_opt (parameters)"), (axes[1], 1, "D_opt (tokens)")):
            for fit, marker, col, label in styles:
                if fit is None:
                    continue
                exponent = (fit.a if i == 0 else fit.b).value
                ax.scatter(fit.budgets, fit.n_opt if i == 0 else fit.d_opt, marker=marker, color=col)
                ax.plot(cs, fit.optimal(cs)[i], color=col, lw=1, label=f"{label}: C^{exponent:.3f}")
            if fit3 is not None:
                exponent = (fit3.a if i == 0 else fit3.b).value
                ax.plot(cs, fit3.optimal(cs)[i], "k--", lw=1, label=f"approach 3: C^{exponent:.3f}")
            ax.set(xscale="log", yscale="log", xlabel="C (FLOPs)", ylabel=what, title=f"compute-optimal {what}")
            ax.legend(fontsize=8)
        save(fig, "frontier.png")

    if fit3 is not None:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
        for C, g in groups.items():
            n, d, loss = (np.array([getattr(r, k) for r in g]) for k in ("params", "tokens", "loss"))
            pred = fit3.loss(n, d)
            left.scatter(pred, loss, color=colour[C], s=22, label=f"C = {C:.3g}")
            right.scatter(n, 100 * (loss / pred - 1), color=colour[C], s=22)
        lo = min(r.loss for r in runs)
        hi = max(r.loss for r in runs)
        left.plot([lo, hi], [lo, hi], "k-", lw=0.8, label="y = x")
        left.set(xlabel="approach 3 prediction (nats/token)", ylabel="measured loss (nats/token)",
                 title=f"L = {fit3.E:.3g} + {fit3.A:.3g}/N^{fit3.alpha:.3f} + {fit3.B:.3g}/D^{fit3.beta:.3f}")
        left.legend(fontsize=8)
        right.axhline(0, color="black", lw=0.8)
        right.set(xscale="log", xlabel="N (matrix-multiply parameters)", ylabel="measured / predicted - 1 (%)",
                  title="residuals of the parametric fit")
        right.xaxis.set_minor_formatter(plt.NullFormatter())  # a span under a decade labels every minor tick
        save(fig, "parametric.png")
    return written
