"""Motion baselines in the displacement-field representation: copy the last field, linear extrapolation, and a PCA motion model driven by a breathing surrogate."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medct.errors import MedCTError
from medct.synthesis.motion.sequence import MIN_PHASES


def copy_last(observed: np.ndarray, k: int) -> np.ndarray:
    """(k, ...) the last observed field repeated: no motion from now on."""
    return np.repeat(np.asarray(observed[-1:]), k, axis=0)


def linear_extrapolation(observed: np.ndarray, k: int) -> np.ndarray:
    """(k, ...) u_{M-1} + j (u_{M-1} - u_{M-2}), j = 1..k: the last velocity kept."""
    obs = np.asarray(observed)
    v = obs[-1] - obs[-2]
    return np.stack([obs[-1] + (j + 1) * v for j in range(k)])


def estimate_period(signal: np.ndarray, min_lag: int = 2) -> int:
    """The lag (samples) at which the signal best repeats: argmin over lags of the mean squared
    difference s[t] - s[t - lag], over lags up to 2/3 of the length (enough overlap to judge)."""
    s = np.asarray(signal, np.float64)
    lags = range(min_lag, max(min_lag + 1, (2 * len(s)) // 3 + 1))
    err = [np.mean((s[lag:] - s[:-lag]) ** 2) if lag < len(s) else np.inf for lag in lags]
    return int(list(lags)[int(np.argmin(err))])


@dataclass
class PCAMotionModel:
    """PCA motion model of the observed fields with a breathing surrogate (as the surrogate-driven
    models of Low et al., Med Phys 2005, and the PCA baselines of Lai et al. 2025):

      u(t) = mean + sum_i c_i(t) V_i,   c_i(t) = a_i + b_i s(t) + d_i s'(t)

    V: the first `n_components` principal components of the observed fields; the surrogate s is the
    first component's score (the dominant breathing mode) and s' its time derivative (inhale and
    exhale differ: hysteresis). Future surrogate values repeat the observed breathing with its
    estimated period (`estimate_period`), as a periodic surrogate would be forecast.
    """

    n_components: int = 3
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    components: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (c, D)
    coef: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (3, c): [a; b; d]
    surrogate: np.ndarray = field(default_factory=lambda: np.zeros(0))
    period: int = 0
    shape: tuple[int, ...] = ()

    def fit(self, observed: np.ndarray) -> PCAMotionModel:
        obs = np.asarray(observed, np.float64)
        m = len(obs)
        if m < MIN_PHASES:
            raise MedCTError(f"The PCA motion model needs at least {MIN_PHASES} observed phases, got {m}.")
        self.shape = obs.shape[1:]
        x = obs.reshape(m, -1)
        self.mean = x.mean(axis=0)
        _, sv, vt = np.linalg.svd(x - self.mean, full_matrices=False)
        c = int(min(self.n_components, m - 1, int((sv > sv.max(initial=0.0) * 1e-9).sum()) or 1))
        self.components = vt[:c]
        scores = (x - self.mean) @ self.components.T  # (M, c)
        self.surrogate = scores[:, 0]
        design = np.stack([np.ones(m), self.surrogate, np.gradient(self.surrogate)], axis=1)
        rows = slice(1, -1) if m >= 5 else slice(None)  # central differences only: the ends are one-sided
        self.coef = np.linalg.lstsq(design[rows], scores[rows], rcond=None)[0]  # (3, c)
        self.period = estimate_period(self.surrogate)
        return self

    def predict(self, k: int) -> np.ndarray:
        """(k, ...) the next k fields."""
        s = list(self.surrogate)
        m = len(s)
        for _ in range(k + 1):  # one more than asked, so that the last derivative is central too
            s.append(s[-self.period])
        ext = np.asarray(s)
        design = np.stack([np.ones(len(ext)), ext, np.gradient(ext)], axis=1)[m : m + k]
        scores = design @ self.coef
        return (self.mean + scores @ self.components).reshape(k, *self.shape).astype(np.float32)
