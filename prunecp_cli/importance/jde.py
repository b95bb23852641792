"""Self-adaptive differential evolution over integer vectors (jDE, Brest et al. 2006).

:func:`jde_integer_search` maximises any integer fitness within box bounds; it knows nothing of
models or channels. The ``cluster`` importance uses it to pick the number of clusters per layer
(algorithms.md §4). :class:`DEGeneration` records one generation, :class:`DEResult` the outcome.

References:
    Brest, Greiner, Bošković, Mernik & Žumer (2006), "Self-adapting control parameters in
    differential evolution", IEEE Trans. Evolutionary Computation 10(6).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DEGeneration:
    """One generation of :func:`jde_integer_search`.

    Attributes:
        generation: 0 for the initial population, then 1, 2, ...
        best_genes: Best individual of the population after selection.
        best_fitness: Its fitness.
        mean_fitness: Mean of the population's finite fitness values.
        evaluations: Distinct fitness evaluations so far.
    """

    generation: int
    best_genes: np.ndarray
    best_fitness: float
    mean_fitness: float
    evaluations: int


@dataclass(frozen=True)
class DEResult:
    """Outcome of :func:`jde_integer_search`.

    Attributes:
        best_genes: ``int64[D]`` best individual found.
        best_fitness: Its fitness.
        history: One :class:`DEGeneration` per generation, the initial population first.
        evaluations: Number of ``fitness`` calls (distinct gene vectors).
        cache_hits: Number of individuals whose fitness came from the cache.
    """

    best_genes: np.ndarray
    best_fitness: float
    history: tuple[DEGeneration, ...]
    evaluations: int
    cache_hits: int


def jde_integer_search(
    fitness: Callable[[np.ndarray], float],
    lower: np.ndarray,
    upper: np.ndarray,
    *,
    population: int = 20,
    generations: int = 30,
    seed: int | np.random.Generator,
    tau: float = 0.1,
    verbose_callback: Callable[[DEGeneration], None] | None = None,
) -> DEResult:
    """Maximise an integer fitness with self-adaptive differential evolution (jDE, Brest et al. 2006).

    DE/rand/1/bin with synchronous generations. Each individual carries its own ``F`` (start 0.5)
    and ``CR`` (start 0.9). For every trial, ``F`` is re-drawn uniformly from ``[0.1, 1.0]`` with
    probability ``tau`` and ``CR`` from ``[0, 1]`` with probability ``tau``; the mutant
    ``x_r1 + F (x_r2 - x_r3)`` (r1, r2, r3 distinct and different from the target) is crossed
    binomially with the target (one gene always from the mutant), rounded and clipped to
    ``[lower, upper]``. The trial replaces the target, with its ``F`` and ``CR``, if its fitness is
    ``>=`` the target's (greedy selection). Fitness values are cached by gene tuple, so identical
    individuals are evaluated once. A NaN fitness counts as ``-inf``.

    Args:
        fitness: Maps ``int64[D]`` genes to a float to maximise.
        lower: ``[D]`` inclusive integer lower bounds.
        upper: ``[D]`` inclusive integer upper bounds.
        population: Population size, at least 4.
        generations: Number of generations after the initial population.
        seed: Integer seed or NumPy generator; a fixed seed gives identical results.
        tau: Probability of re-drawing ``F`` and ``CR``.
        verbose_callback: Called with each :class:`DEGeneration` as it completes (e.g. to print it
            under ``--verbose``).

    Returns:
        The best individual, its fitness and the per-generation history.

    Raises:
        ValueError: If the bounds are inconsistent or ``population < 4``.
    """
    lo = np.asarray(lower).reshape(-1)
    hi = np.asarray(upper).reshape(-1)
    if lo.shape != hi.shape or lo.size == 0 or np.any(lo > hi):
        raise ValueError(f"bounds must be non-empty, of equal length and lower <= upper; got {lo} and {hi}")
    if np.any(lo != np.round(lo)) or np.any(hi != np.round(hi)):
        raise ValueError("integer search needs integer bounds")
    lo, hi = lo.astype(np.int64), hi.astype(np.int64)
    if population < 4:
        raise ValueError(f"population={population}: DE/rand/1 needs at least 4 individuals")
    if generations < 0 or not 0.0 <= tau <= 1.0:
        raise ValueError(f"generations={generations} must be >= 0 and tau={tau} in [0, 1]")
    rng = np.random.default_rng(seed)
    dim = lo.size
    cache: dict[tuple[int, ...], float] = {}
    hits = 0

    def evaluate(genes: np.ndarray) -> float:
        nonlocal hits
        key = tuple(int(g) for g in genes)
        if key in cache:
            hits += 1
        else:
            value = float(fitness(genes.copy()))
            cache[key] = -math.inf if math.isnan(value) else value
        return cache[key]

    pop = rng.integers(lo, hi + 1, size=(population, dim))
    fit = np.array([evaluate(ind) for ind in pop])
    f_param = np.full(population, 0.5)
    cr_param = np.full(population, 0.9)
    history: list[DEGeneration] = []

    def record(generation: int) -> None:
        best = int(np.argmax(fit))
        finite = fit[np.isfinite(fit)]
        entry = DEGeneration(
            generation=generation,
            best_genes=pop[best].copy(),
            best_fitness=float(fit[best]),
            mean_fitness=float(finite.mean()) if finite.size else -math.inf,
            evaluations=len(cache),
        )
        history.append(entry)
        if verbose_callback is not None:
            verbose_callback(entry)

    record(0)
    for generation in range(1, generations + 1):
        new_f = np.where(rng.random(population) < tau, 0.1 + 0.9 * rng.random(population), f_param)
        new_cr = np.where(rng.random(population) < tau, rng.random(population), cr_param)
        trials = np.empty_like(pop)
        for i in range(population):
            r1, r2, r3 = rng.choice(np.delete(np.arange(population), i), size=3, replace=False)
            mutant = pop[r1] + new_f[i] * (pop[r2] - pop[r3])
            cross = rng.random(dim) < new_cr[i]
            cross[rng.integers(dim)] = True
            trial = np.where(cross, mutant, pop[i])
            trials[i] = np.clip(np.rint(trial), lo, hi).astype(np.int64)
        trial_fit = np.array([evaluate(t) for t in trials])
        better = trial_fit >= fit
        pop[better], fit[better] = trials[better], trial_fit[better]
        f_param = np.where(better, new_f, f_param)
        cr_param = np.where(better, new_cr, cr_param)
        record(generation)
    final = history[-1]
    return DEResult(
        best_genes=final.best_genes,
        best_fitness=final.best_fitness,
        history=tuple(history),
        evaluations=len(cache),
        cache_hits=hits,
    )
