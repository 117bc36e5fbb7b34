"""Scaling-law fits (lmforge.scaling.fit) on synthetic IsoFLOP sweeps whose losses come from a known
L(N, D) = E + A/N^alpha + B/D^beta: the three approaches must recover what generated the data."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from lmforge.common import LmforgeError
from lmforge.scaling.fit import (
    ParametricFit,
    Run,
    approach1,
    approach2,
    fit_all,
    fit_power_law,
    parametric,
    plot_scaling,
    summary_lines,
)

CHINCHILLA_LIKE = {"E": 1.8, "A": 400.0, "B": 600.0, "alpha": 0.34, "beta": 0.28}
EQUAL_EXPONENTS = {"E": 1.8, "A": 400.0, "B": 600.0, "alpha": 0.30, "beta": 0.30}
BUDGETS = (1e17, 1e18, 1e19, 1e20)


def true_loss(t: dict, N, D):
    return t["E"] + t["A"] / np.asarray(N) ** t["alpha"] + t["B"] / np.asarray(D) ** t["beta"]


def true_optimum(t: dict, C: float) -> tuple[float, float]:
    """The law's minimum under C = 6ND, found numerically (not with the closed form under test)."""
    n = np.geomspace(1e3, 1e15, 200_001)
    loss = true_loss(t, n, C / (6 * n))
    i = int(np.argmin(loss))
    return float(n[i]), C / (6 * float(n[i]))


def allocation_exponent(t: dict) -> float:
    return t["beta"] / (t["alpha"] + t["beta"])


def isoflop_runs(t: dict, *, noise: float = 0.005, seed: int = 0, budgets=BUDGETS, sizes: int = 7,
                 span: float = 0.7) -> list[Run]:
    """Per budget, `sizes` model sizes evenly spaced in log over +-span decades around the true optimum
    (the centre moved by up to 0.15 decade at random, so no size sits exactly on it), D = C / (6N), and
    losses with multiplicative log-normal noise of `noise`."""
    rng = np.random.default_rng(seed)
    runs = []
    for C in budgets:
        centre = true_optimum(t, C)[0] * 10 ** rng.uniform(-0.15, 0.15)
        for n in centre * np.logspace(-span, span, sizes):
            d = C / (6 * n)
            loss = float(true_loss(t, n, d)) * math.exp(noise * rng.standard_normal())
            runs.append(Run(budget=C, params=n, tokens=d, flops=6 * n * d, loss=loss, name=f"{C:.0e}/{n:.3g}"))
    return runs


@pytest.fixture(scope="module")
def noisy_runs() -> list[Run]:
    return isoflop_runs(CHINCHILLA_LIKE)


@pytest.fixture(scope="module")
def noisy_fit(noisy_runs) -> ParametricFit:
    return parametric(noisy_runs, bootstrap=40, seed=0)


def widened(est, margin: float = 0.1) -> tuple[float, float]:
    """An interval grown by `margin` of its width on each side ("inside or near")."""
    w = est.hi - est.lo
    return est.lo - margin * w, est.hi + margin * w


def test_power_law_is_exact_on_a_power_law():
    x = np.array([1e2, 1e3, 1e5, 1e6])
    law = fit_power_law(x, 3.0 * x ** 0.7)
    assert law.k == pytest.approx(3.0, rel=1e-9) and law.a == pytest.approx(0.7, rel=1e-12)
    assert law(1e4) == pytest.approx(3.0 * 1e4 ** 0.7, rel=1e-9)


def test_parametric_recovers_the_law_and_its_intervals_contain_it(noisy_fit):
    t = CHINCHILLA_LIKE
    assert abs(noisy_fit.alpha - t["alpha"]) < 0.03 and abs(noisy_fit.beta - t["beta"]) < 0.03
    assert noisy_fit.E == pytest.approx(t["E"], rel=0.03)
    assert noisy_fit.a.value == pytest.approx(allocation_exponent(t), abs=0.02)
    for name in ("E", "A", "B", "alpha", "beta"):
        lo, hi = widened(noisy_fit.interval(name))
        assert lo <= t[name] <= hi, (name, noisy_fit.interval(name))
    lo, hi = widened(noisy_fit.a)
    assert lo <= allocation_exponent(t) <= hi
    assert noisy_fit.a.hi - noisy_fit.a.lo < 0.1  # an interval, not the whole line


def test_parametric_recovers_equal_exponents():
    t = EQUAL_EXPONENTS
    fit = parametric(isoflop_runs(t, seed=1), bootstrap=0)
    assert abs(fit.alpha - t["alpha"]) < 0.03 and abs(fit.beta - t["beta"]) < 0.03
    assert fit.E == pytest.approx(t["E"], rel=0.05)
    assert fit.a.value == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("t", [CHINCHILLA_LIKE, EQUAL_EXPONENTS], ids=["chinchilla-like", "alpha=beta"])
def test_approaches_1_and_2_recover_the_allocation_exponents(t):
    runs = isoflop_runs(t)
    a_true = allocation_exponent(t)
    for fit in (approach1(runs), approach2(runs)):
        assert fit.a.value == pytest.approx(a_true, abs=0.06), fit.approach
        assert fit.b.value == pytest.approx(1 - a_true, abs=0.06), fit.approach
        lo, hi = widened(fit.a)
        assert lo <= a_true <= hi, (fit.approach, fit.a)
    # approach 1's optimum of each budget is that budget's lowest-loss run
    fit1 = approach1(runs, bootstrap=0)
    for C, n in zip(fit1.budgets, fit1.n_opt):
        assert n == min((r for r in runs if r.budget == C), key=lambda r: r.loss).params


def test_without_noise_the_fits_are_exact():
    t = CHINCHILLA_LIKE
    runs = isoflop_runs(t, noise=0.0)
    fit = parametric(runs, bootstrap=0)
    for name in ("E", "A", "B", "alpha", "beta"):
        assert getattr(fit, name) == pytest.approx(t[name], rel=1e-4), name
    C = 3e21
    n_true, d_true = true_optimum(t, C)
    n_opt, d_opt = fit.optimal(C)
    assert n_opt == pytest.approx(n_true, rel=1e-3) and d_opt == pytest.approx(d_true, rel=1e-3)
    assert fit.tokens_per_param(C).value == pytest.approx(d_true / n_true, rel=2e-3)
    # approach 2: the vertices sit on the true optima (up to the parabola's approximation), D* = C / (6 N*)
    fit2 = approach2(runs, bootstrap=0)
    for p in fit2.parabolas:
        assert p.n_opt == pytest.approx(true_optimum(t, p.budget)[0], rel=0.05)
        assert p.d_opt == pytest.approx(p.budget / (6 * p.n_opt), rel=1e-12)
    assert fit2.a.value == pytest.approx(allocation_exponent(t), abs=0.005)


def test_huber_loss_shrugs_off_a_gross_outlier(noisy_runs):
    clean = parametric(noisy_runs, bootstrap=0)
    bad = list(noisy_runs)
    bad[10] = dataclasses.replace(bad[10], loss=bad[10].loss * 1.5)  # a run that went wrong
    robust = parametric(bad, bootstrap=0)
    squares = parametric(bad, bootstrap=0, delta=1.0)  # every residual < 1: plain least squares
    assert abs(robust.alpha - clean.alpha) < 0.01 and abs(robust.beta - clean.beta) < 0.01
    assert robust.E == pytest.approx(clean.E, rel=0.02)
    # the outlier is gross enough to matter: least squares is dragged far off
    assert abs(squares.alpha - clean.alpha) > 0.05


def test_prediction_interval_covers_a_held_out_run(noisy_fit):
    C = 4 * max(BUDGETS)
    n, d = true_optimum(CHINCHILLA_LIKE, C)
    truth = float(true_loss(CHINCHILLA_LIKE, n, d))
    pred = noisy_fit.predict(n, d)
    assert pred.loss == pytest.approx(truth, rel=0.02)
    assert pred.lo <= truth <= pred.hi
    assert pred.lo < pred.loss < pred.hi and pred.hi / pred.lo < 1.1
    # vectorised, and a wider level gives a wider interval
    many = noisy_fit.predict(np.array([n, n / 2]), np.array([d, d * 2]), level=0.99)
    assert many.loss.shape == many.lo.shape == (2,)
    assert many.lo[0] < pred.lo and many.hi[0] > pred.hi


def test_prediction_interval_includes_run_to_run_noise(noisy_runs, noisy_fit):
    """At a measured (N, D) the parameters are well pinned down: a new run's loss varies mostly by the
    noise, so a 90% prediction interval must cover about 90% of fresh noisy runs there (an interval from
    the parameters' uncertainty alone covers under half)."""
    run = noisy_runs[10]
    truth = float(true_loss(CHINCHILLA_LIKE, run.params, run.tokens))
    fresh = truth * np.exp(0.005 * np.random.default_rng(1).standard_normal(2000))
    pred = noisy_fit.predict(run.params, run.tokens)
    assert 0.8 <= np.mean((fresh >= pred.lo) & (fresh <= pred.hi)) <= 0.99


def test_saved_fit_predicts_identically(noisy_fit):
    loaded = ParametricFit.from_dict(json.loads(json.dumps(noisy_fit.to_dict())))
    N, D = np.array([1e8, 3e9]), np.array([1e10, 2e11])
    a, b = noisy_fit.predict(N, D), loaded.predict(N, D)
    assert np.array_equal(a.loss, b.loss) and np.array_equal(a.lo, b.lo) and np.array_equal(a.hi, b.hi)
    assert loaded.tokens_per_param(1e21) == noisy_fit.tokens_per_param(1e21)
    assert loaded.interval("alpha") == noisy_fit.interval("alpha")
    with pytest.raises(LmforgeError):
        ParametricFit.from_dict({"format": "something else"})


def test_clear_errors(noisy_runs):
    one_budget = [r for r in noisy_runs if r.budget == BUDGETS[0]]
    for fit in (approach1, approach2):
        with pytest.raises(LmforgeError, match="two or more budgets"):
            fit(one_budget)
    for bad_loss in (0.0, -1.0, math.nan):
        runs = list(noisy_runs)
        runs[3] = dataclasses.replace(runs[3], loss=bad_loss)
        for fit in (approach1, approach2, parametric, fit_all):
            with pytest.raises(LmforgeError, match="loss must be"):
                fit(runs)
    with pytest.raises(LmforgeError, match="more runs"):
        parametric(noisy_runs[:5])
    # fit_all runs what it can: one budget still supports the parametric fit, the others are reported
    result = fit_all(one_budget, bootstrap=0)
    assert result["approach1"] is None and result["approach2"] is None
    assert result["approach3"] is not None and set(result["errors"]) == {"approach1", "approach2"}


def test_approach2_leaves_out_a_budget_without_a_minimum(noisy_runs):
    runs = list(noisy_runs)
    sizes = [1e6, 3e6, 1e7, 3e7]
    # a fifth budget whose loss peaks in the middle: its parabola opens downwards
    runs += [Run(budget=3e20, params=n, tokens=3e20 / (6 * n), flops=3e20, loss=loss)
             for n, loss in zip(sizes, [2.5, 2.7, 2.7, 2.5])]
    fit = approach2(runs, bootstrap=20)
    assert 3e20 not in fit.budgets and len(fit.budgets) == len(BUDGETS)
    assert any("3e+20" in w and "no minimum" in w for w in fit.warnings)


def test_summary_and_plots(noisy_runs, tmp_path):
    result = fit_all(noisy_runs, bootstrap=10)
    lines = summary_lines(result, budgets=[1e18, 1e21])
    text = "\n".join(lines)
    assert "do not transfer" in text and "406.4" in text and "2085" in text  # Chinchilla's and Epoch's fits
    assert str(result["approach3"].a) in text and str(result["approach1"].b) in text
    ratio_rows = lines[lines.index("compute-optimal tokens per parameter D/N at C:") + 2:][:2]
    assert [float(row.split()[0]) for row in ratio_rows] == [1e18, 1e21]
    assert str(result["approach2"].tokens_per_param(1e21)) in ratio_rows[1]
    paths = plot_scaling(noisy_runs, result, tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["frontier.png", "isoflop.png", "parametric.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
