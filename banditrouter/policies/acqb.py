"""ACQB: anytime Contextual Queueing Bandit with MNL feedback (arXiv 2602.02061), as in ../shared/papers/ALGORITHMS.md.

The policy routes *and* schedules: given the waiting pool and the free slots of every model, it decides
which (job, model) pairs to serve now. Satisfaction is learned from implicit feedback (retrial -> 0,
accepted -> 1) with one logistic model per LLM on the context features z = [project(x), 1]:

    P(satisfied | x, k) = mu(z^T theta_k),  mu(u) = 1 / (1 + exp(-u))        (MNL with one offered item)
    posterior (Laplace):  theta_k ~ N(theta^_k, v^2 H_k^-1)
    each decision step t (anytime, no horizon):
        with probability eps_t = min(1, c * t^-1/2): a uniformly random feasible (job, model) pair
        otherwise: serve the feasible pair with the largest score  w_q * mu(z^T theta~_k) - w_c * c~_k(z)
    repeat while jobs and free slots remain (work-conserving).

What is the paper's and what is ours (each [ours] detail is a named ACQBConfig field):
- [paper] per-LLM (disjoint) logistic parameters, Laplace posterior sampling, forced exploration at the
  decaying rate c * t^-1/2, serving the feasible pair with the largest sampled success probability,
  work-conserving, anytime.
- [ours] the values of c, v and the prior precision; the online update (`update_rule`: one Newton step per
  batch on an accumulated Hessian, or a few IRLS iterations over a bounded window per arm whose evicted
  samples are folded into a Gaussian prior by the same Newton step); one posterior draw theta~_k per model per
  `schedule` call, shared by the call's steps (an independent draw per step would cost K d^2 per step).
- [ours] the preference: pairs are ranked by w_q * mu - w_c * c~_k, with c~_k(z) the model's expected
  normalised cost min(cost / tau, 1) for that context, learned by a ridge regression of c~ on z per model
  (`cost_ridge`) and clipped to [0, 1]. Satisfaction does not depend on the preference; with w_c = 0 the rule
  is the paper's.
- [ours] the satisfaction target: y = 0 for a retrial (`BanditBatch.retrial`), else the score clipped to
  [0, 1]: implicit signals arrive as scores 0/1; an explicit graded score in between enters the logistic
  likelihood as a fractional target (a quasi-likelihood: the same estimator, E[y | z] = mu(z^T theta)).
- [ours] t, the anytime counter: t = 1 + samples the parameters have learned from + decisions made since the
  parameters last changed (minus samples learned since; never below 0). Both counts are parameters, so a
  router installing the learner's weights continues at the learner's t instead of restarting at eps = 1.
  Only exploring decisions (explore=True) count.
- [ours] published weights: a decision reads theta^, R = L^-1 (chol_inv, float32), the cost coefficients and
  the counters, not the precision or cost Gram matrices (H, cost_A: 2 K d^2 float64) nor the IRLS window and
  prior. `serving_state_dict()` holds only the former (about 1/4 of the full state at d = 385), which routers
  install without a Cholesky per model; a policy loaded from it decides exactly as one loaded from
  `state_dict()` and refuses to learn (ServingOnlyError).

Propensity of an assignment (logged with it; the probability this job got this model at that step):

    eps_t / K_feasible + (1 - eps_t) * P_TS(model | job, feasible models at that step)

P_TS is exact (to quadrature accuracy, not Monte Carlo; config `propensity_nodes` instead of a number of
draws): given the job, the sampled utilities U_k = z^T theta~_k ~ N(z^T theta^_k, v^2 z^T H_k^-1 z) are
independent across models, and the scores mu(U_k) - (w_c / w_q) c~_k are each a monotone transform of one of
them, so P(model a ranks first) = integral of phi_a(u) prod_{k != a} P(mu(U_k) - b_k <= mu(u) - b_a) du, a 1-D
integral (`shifted_logistic_argmax_probability`). With w_c = 0 (the paper's rule) it is the integral of
lints.argmax_probability (tests/unit/test_acqb.py checks they agree); ours prunes the models that cannot
matter and batches all rows, which keeps a scheduling decision within its time budget. All models' P_TS
sum to 1 within 1e-4. With w_q = 0 the ranking is deterministic (P_TS is 0 or 1).

What it conditions on: the model, given that this job was served at that step. In a pool of several jobs
the job served first also depends on the draw (one theta~ ranks every job) and on the forced coin; the
propensity does not condition on that. It is exact for `select` (one job, all models free) and for a pool
of one job.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.linalg import cho_solve, solve_triangular
from scipy.special import expit, logit, ndtr

from banditrouter.policies.base import Assignment, BanditBatch, Decisions, Policy, StateError, deterministic
from banditrouter.reward import normalised_cost

UPDATE_RULES = ("newton", "irls")


@dataclass(frozen=True)
class ACQBConfig:
    c: float = 1.0
    """Forced exploration eps_t = min(1, c * t^-1/2) (paper's form; the value is ours). 0 turns it off."""
    forced_exploration: bool = True
    """False: pure Thompson sampling (no forced exploration, whatever c is), the queue-eval ablation (ours)."""
    v: float = 1.0
    """Posterior scale: theta~_k ~ N(theta^_k, v^2 H_k^-1) (paper's form; the value is ours)."""
    prior_precision: float = 1.0
    """lambda: H_k = lambda I + sum mu'(z^T theta) z z^T before and while learning (ours)."""
    update_rule: str = "newton"
    """"newton": one online Newton step per batch, theta <- theta - H^-1 g, with H accumulating
    mu'(z^T theta) z z^T at the estimate of the time. "irls": `irls_iters` IRLS iterations over the last
    `irls_window` samples of each model under a Gaussian prior that absorbs (by the Newton step) the samples
    leaving the window (ours; the paper names "online Newton / IRLS" without details)."""
    irls_iters: int = 3
    """IRLS iterations per update (update_rule irls; ours)."""
    irls_window: int = 256
    """Samples per model refitted by IRLS (update_rule irls; ours)."""
    cost_ridge: float = 1.0
    """Ridge prior of the per-model regression of normalised cost on z (ours)."""
    propensity_nodes: int = 4
    """Gauss-Legendre nodes per piece of the exact P_TS integral (ours; see the module docstring)."""

    def __post_init__(self) -> None:
        def positive(name: str, allow_zero: bool = False) -> None:
            val = getattr(self, name)
            number = isinstance(val, int | float | np.integer | np.floating) and not isinstance(val, bool)
            if not (number and np.isfinite(val) and (val >= 0 if allow_zero else val > 0)):
                raise ValueError(f"ACQB {name} must be a {'non-negative' if allow_zero else 'positive'} number, got {val}")

        positive("c", allow_zero=True)
        for name in ("v", "prior_precision", "cost_ridge"):
            positive(name)
        if self.update_rule not in UPDATE_RULES:
            raise ValueError(f"ACQB update_rule must be one of {UPDATE_RULES}, got {self.update_rule!r}")
        for name, low in (("irls_iters", 1), ("irls_window", 1), ("propensity_nodes", 2)):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int | np.integer) or val < low:
                raise ValueError(f"ACQB {name} must be an integer >= {low}, got {val!r}")
        if not isinstance(self.forced_exploration, bool | np.bool_):
            raise ValueError(f"ACQB forced_exploration must be true or false, got {self.forced_exploration!r}")


# ========================================================================================================
# Choice model and propensities
# ========================================================================================================
def mnl_choice_probabilities(z: np.ndarray, thetas: np.ndarray, assortment) -> np.ndarray:
    """MNL with an outside option (the user retries): P(pick j | z, S) = exp(z^T theta_j) / (1 + sum_{k in S}
    exp(z^T theta_k)) for j in S. `z`: (n, d) or (d,); `thetas`: (K, d); `assortment`: model indices S.
    Returns (n, |S|) (or (|S|,) for one z). With one offered model this is the logistic mu(z^T theta_k)."""
    z = np.asarray(z, dtype=np.float64)
    single = z.ndim == 1
    s = np.asarray(assortment, dtype=np.int64).reshape(-1)
    if s.size == 0 or len(np.unique(s)) != s.size or s.min() < 0 or s.max() >= len(thetas):
        raise ValueError(f"assortment must be distinct model indices in [0, {len(thetas)}), got {s.tolist()}")
    u = np.atleast_2d(z) @ np.asarray(thetas, dtype=np.float64)[s].T  # (n, |S|)
    top = np.maximum(u.max(axis=1, keepdims=True), 0.0)  # the outside option has utility 0
    e = np.exp(u - top)
    p = e / (np.exp(-top) + e.sum(axis=1, keepdims=True))
    return p[0] if single else p


_BREAKS = np.array([-4.0, -2.0, 0.0, 2.0, 4.0])
"""Where each competitor's CDF F_k passes Phi(c): the piece boundaries of the P_TS quadrature."""
_RANGE = 8.5
"""The chosen model's utility is integrated over m_a +- _RANGE s_a (the mass outside is below 2e-17)."""
_NEGLIGIBLE = 1e-15


@functools.lru_cache(maxsize=8)
def _gauss_legendre(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(nodes)


def _competitor_cdf(u: np.ndarray, delta: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """F_k(u) = P(mu(U_k) <= mu(u) + delta_k), U_k ~ N(mean_k, sd_k^2). `u`: (..., P); `delta`, `mean`, `sd`:
    (..., K); returns (..., P, K). Where mu(u) + delta_k leaves (0, 1) the threshold logit(.) is -inf or +inf
    (F_k = 0 or 1); with delta_k = 0 it is u itself (no round trip through mu, which saturates in floating
    point). A competitor with mean -inf has F_k = 1."""
    u, delta, mean, sd = u[..., :, None], delta[..., None, :], mean[..., None, :], sd[..., None, :]
    if (delta == 0).all():
        return ndtr((u - mean) / sd)
    with np.errstate(divide="ignore"):
        thr = np.where(delta == 0, u, logit(np.clip(expit(u) + delta, 0.0, 1.0)))
    return ndtr((thr - mean) / sd)


def _utility_at(c: np.ndarray, delta: np.ndarray, mean: np.ndarray, sd: np.ndarray) -> np.ndarray:
    """(..., K, len(c)): the chosen model's utility u at which F_k(u) = Phi(c) (NaN where no u gives it)."""
    v = mean[..., None] + sd[..., None] * c
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(delta[..., None] == 0, v, logit(expit(v) - delta[..., None]))


def shifted_logistic_argmax_probability(
    mean: np.ndarray, sd: np.ndarray, shift: np.ndarray, feasible: np.ndarray, arms: np.ndarray, nodes: int = 4
) -> np.ndarray:
    """P(arms[i] maximises mu(U_k) - shift[i, k] over the feasible k), U_k ~ N(mean[i, k], sd[i, k]^2) independent.

    P = integral of phi_a(u) prod_{k != a, feasible} F_k(u) du, F_k(u) = P(mu(U_k) <= mu(u) + delta_k),
    delta_k = shift_k - shift_a: F_k(u) = Phi((logit(mu(u) + delta_k) - m_k) / s_k), 0 or 1 where mu(u) + delta_k
    leaves (0, 1). With no shift it is the integral of lints.argmax_probability. Per row, competitors with
    F_k >= 1 - 1e-15 over the range are dropped (they never win), the range m_a +- 8.5 s_a starts where every
    F_k has passed Phi(-8.5), and Gauss-Legendre (`nodes` per piece) runs between the utilities at which each
    kept F_k passes Phi(c), c in _BREAKS, or saturates, and the chosen model's density passes c s_a (the
    construction of lints.argmax_probability mapped through the monotone mu). The pieces of all rows are
    evaluated in one ragged batch."""
    mean, sd = np.asarray(mean, np.float64), np.maximum(np.asarray(sd, np.float64), 1e-12)
    b, feas, arms = np.asarray(shift, np.float64), np.asarray(feasible, bool), np.asarray(arms, np.int64)
    n = len(arms)
    rows = np.arange(n)
    m_a, s_a = mean[rows, arms][:, None], sd[rows, arms][:, None]
    d = b - b[rows, arms][:, None]
    comp = feas.copy()
    comp[rows, arms] = False
    lo, hi = m_a - _RANGE * s_a, m_a + _RANGE * s_a
    ends = _competitor_cdf(np.hstack([lo, hi]), d, mean, sd)  # (n, 2, K)
    dead = (comp & (ends[:, 1] < _NEGLIGIBLE)).any(axis=1) | ~feas[rows, arms]  # some competitor always wins
    keep = comp & (ends[:, 0] < 1 - _NEGLIGIBLE)  # the others never win: F_k = 1 over the range
    start = np.where(keep, _utility_at(np.array([-_RANGE]), d, mean, sd)[..., 0], np.nan)
    lo = np.fmax(lo, np.nanmax(np.where(np.isfinite(start), start, -np.inf), axis=1, keepdims=True))
    with np.errstate(divide="ignore"):
        edges = np.where((d != 0)[..., None], logit(np.clip(np.stack([-d, 1 - d], axis=-1), 0, 1)), np.nan)
    bp = np.concatenate([_utility_at(_BREAKS, d, mean, sd), edges], axis=2)
    bp = np.where(keep[..., None], bp, np.nan).reshape(n, -1)
    bp = np.concatenate([lo, hi, m_a + s_a * _BREAKS, bp], axis=1)
    bp = np.sort(np.where((bp >= lo) & (bp <= hi), bp, np.nan), axis=1)  # NaN (outside or unused) sorts last
    left, right = bp[:, :-1], bp[:, 1:]
    r, j = np.nonzero(right > left)  # the pieces of every row, flattened
    x, w = _gauss_legendre(nodes)
    half = (right[r, j] - left[r, j]) / 2
    t = ((right[r, j] + left[r, j]) / 2)[:, None] + half[:, None] * x  # (pieces, nodes): values of u
    zt = (t - m_a[r]) / s_a[r]
    density = np.exp(-0.5 * zt * zt) / (np.sqrt(2 * np.pi) * s_a[r])
    m_keep, d_keep = np.where(keep, mean, -np.inf), np.where(keep, d, 0.0)  # a dropped competitor: F_k = 1
    cdf = _competitor_cdf(t, d_keep[r], m_keep[r], sd[r])
    contrib = (half[:, None] * w * density * cdf.prod(axis=2)).sum(axis=1)
    prob = np.bincount(r, weights=contrib, minlength=n)
    return np.where(dead, 0.0, np.clip(prob, 0.0, 1.0))


# ========================================================================================================
# The policy
# ========================================================================================================
class ACQB(Policy):
    name = "acqb"
    queue_aware = True
    learns_from_propensities = False

    def __init__(self, models, context_dim, tau, seed=0, features=None, **config):
        super().__init__(models, context_dim, tau, seed, features=features)
        self.config = ACQBConfig(**config)
        k, d = self.n_arms, self.projected_dim + 1
        self.feature_dim = d
        lam, eye = self.config.prior_precision, np.eye(d)
        self.theta = np.zeros((k, d))
        self.H = np.repeat(eye[None] * lam, k, axis=0)
        self.cost_A = np.repeat(eye[None] * self.config.cost_ridge, k, axis=0)
        self.cost_b = np.zeros((k, d))
        self.cost_beta = np.zeros((k, d))
        self.samples_learned = 0
        self.decisions_pending = 0
        if self.config.update_rule == "irls":
            w = self.config.irls_window
            self.prior_theta = np.zeros((k, d))
            self.prior_H = self.H.copy()
            self.window_z = np.zeros((k, w, d))
            self.window_y = np.zeros((k, w))
            self.window_n = np.zeros(k, dtype=np.int64)
        # R_k = L_k^-1 with H_k = L_k L_k^T, so H_k^-1 = R_k^T R_k: refreshed on update, never per decision. Kept in
        # float32: a decision reads all K d^2 of it twice (the draw, the widths), and at d = 385 that is the cost.
        self.chol_inv = np.repeat(eye[None] / np.sqrt(lam), k, axis=0).astype(np.float32)

    # -- features and the posterior ---------------------------------------------------------------------
    def features(self, contexts: np.ndarray) -> np.ndarray:
        """z = [project(x), 1] (n, projected_dim + 1)."""
        x = np.asarray(contexts, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.context_dim:
            raise ValueError(f"contexts must have shape (n, {self.context_dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("contexts hold non-finite values")
        f = np.asarray(self.project(x), dtype=np.float64)
        return np.hstack([f, np.ones((len(f), 1))])

    @property
    def t(self) -> int:
        """The anytime step counter of the next decision (>= 1); see the module docstring."""
        return 1 + self.samples_learned + self.decisions_pending

    def epsilon(self, t: int | np.ndarray) -> float | np.ndarray:
        """eps_t = min(1, c t^-1/2), or 0 without forced exploration (t: one step or an array of steps)."""
        off = not self.config.forced_exploration or self.config.c == 0
        if np.ndim(t) == 0:  # the per-step case of schedule(): plain floats
            return 0.0 if off else min(1.0, self.config.c / math.sqrt(t))
        t = np.asarray(t, dtype=np.float64)
        return np.zeros_like(t) if off else np.minimum(1.0, self.config.c / np.sqrt(t))

    def expected_cost(self, z: np.ndarray) -> np.ndarray:
        """(n, K) c~_k(z): predicted normalised cost, clipped to [0, 1]."""
        return np.clip(z @ self.cost_beta.T, 0.0, 1.0)

    def utility_sd(self, z: np.ndarray) -> np.ndarray:
        """(n, K) v sqrt(z^T H_k^-1 z) = v ||R_k z||: the width of the sampled utility z^T theta~_k."""
        k, d = self.n_arms, self.feature_dim
        rz = (self.chol_inv.reshape(k * d, d) @ z.T.astype(np.float32)).reshape(k, d, len(z))  # one GEMM, all models
        return self.config.v * np.sqrt(np.square(rz).sum(axis=1).T.astype(np.float64))  # (einsum with dtype= is slow)

    def sample_theta(self) -> np.ndarray:
        """theta~_k = theta^_k + v R_k^T e_k, e_k ~ N(0, I): one draw per model, covariance v^2 H_k^-1."""
        e = self.rng.standard_normal((self.n_arms, 1, self.feature_dim), dtype=np.float32)
        return self.theta + self.config.v * np.matmul(e, self.chol_inv)[:, 0, :]

    def predict_satisfaction(self, contexts: np.ndarray) -> np.ndarray:
        """(n, K) mu(z^T theta^_k): each model offered alone (MNL with a one-item assortment)."""
        z = self.features(contexts)
        return np.column_stack([mnl_choice_probabilities(z, self.theta, [k])[:, 0] for k in range(self.n_arms)])

    @staticmethod
    def _scores(u: np.ndarray, cost: np.ndarray, prefs: np.ndarray) -> np.ndarray:
        return prefs[:, :1] * expit(u) - prefs[:, 1:] * cost  # w_q mu(u) - w_c c~

    def ts_probability(
        self, z: np.ndarray, prefs: np.ndarray, cost: np.ndarray, feasible: np.ndarray, arms: np.ndarray
    ) -> np.ndarray:
        """P_TS(arms[i] | job i): the probability that the job's sampled scores rank arms[i] first among its
        feasible models (exact, see the module docstring)."""
        n = len(arms)
        out = np.zeros(n)
        if n == 0:
            return out
        mean, sd = z @ self.theta.T, self.utility_sd(z)
        wq, wc = prefs[:, 0], prefs[:, 1]
        fixed = wq == 0  # cost only: a deterministic ranking (first index on ties, as argmax)
        if fixed.any():
            best = np.where(feasible[fixed], -cost[fixed], -np.inf).argmax(axis=1)
            out[fixed] = (best == arms[fixed]).astype(float)
        rest = ~fixed
        if rest.any():
            shift = wc[rest, None] * cost[rest] / wq[rest, None]  # w_q mu - w_c c~ ranks as mu - shift
            out[rest] = shifted_logistic_argmax_probability(
                mean[rest], sd[rest], shift, feasible[rest], arms[rest], self.config.propensity_nodes
            )
        return out

    # ====================================================================================================
    # ALGO LOGIC: decisions
    # ====================================================================================================
    def values(self, contexts, preferences, *, explore=False) -> np.ndarray:
        """w_q mu(z^T theta^_k) - w_c c~_k(z): the score of each model at the posterior mean."""
        x, p = self._check_inputs(contexts, preferences)
        z = self.features(x)
        return self._scores(z @ self.theta.T, self.expected_cost(z), p)

    def arm_probabilities(self, contexts, preferences, *, explore=False) -> np.ndarray:
        """While learning, eps_t / K + (1 - eps_t) P_TS(k) for every model k, all models free (what `select`
        logs as the propensity of the model it draws; draws nothing, counts no step)."""
        if not explore:
            return super().arm_probabilities(contexts, preferences)
        x, p = self._check_inputs(contexts, preferences)
        z = self.features(x)
        n, k = len(z), self.n_arms
        cost, eps, feasible = self.expected_cost(z), self.epsilon(self.t + np.arange(n)), np.ones((n, k), bool)
        return np.column_stack(
            [self._propensity(eps, k, self.ts_probability(z, p, cost, feasible, np.full(n, a))) for a in range(k)]
        )

    def select(self, contexts, preferences, *, explore=False) -> Decisions:
        """One job per row, decided independently with every model free (the one-job case of `schedule`)."""
        x, p = self._check_inputs(contexts, preferences)
        z = self.features(x)
        n, k = len(z), self.n_arms
        cost = self.expected_cost(z)
        if not explore:
            return deterministic(self._scores(z @ self.theta.T, cost, p).argmax(axis=1), self.version)
        mean, sd = z @ self.theta.T, self.utility_sd(z)
        # per row an independent draw of the utilities: the marginal of z^T theta~_k, one scalar per model
        u = mean + sd * self.rng.standard_normal((n, k))
        arms = self._scores(u, cost, p).argmax(axis=1)
        eps = self.epsilon(self.t + np.arange(n))
        forced = self.rng.random(n) < eps
        arms = np.where(forced, self.rng.integers(0, k, size=n), arms)
        self.decisions_pending += n
        p_ts = self.ts_probability(z, p, cost, np.ones((n, k), bool), arms)
        return Decisions(arms, self._propensity(eps, k, p_ts), self.version)

    def schedule(self, contexts, preferences, free, *, explore=True) -> list[Assignment]:
        """Serve the waiting pool: per step, with probability eps_t a uniformly random feasible (job, model)
        pair, else the feasible pair with the largest w_q mu(z^T theta~_k) - w_c c~_k; until no job or no free
        slot is left. explore=False: theta^ instead of theta~, no forced exploration, propensity 1."""
        slots = self._check_free(free)
        if np.ndim(contexts) == 2 and len(contexts) == 0:
            return []
        x, p = self._check_inputs(contexts, preferences)
        z = self.features(x)
        n, k = len(z), self.n_arms
        cost = self.expected_cost(z)
        theta = self.sample_theta() if explore else self.theta
        score = self._scores(z @ theta.T, cost, p)
        work = np.where(slots > 0, score, -np.inf)  # -inf: job served or model full
        alive = np.ones(n, dtype=bool)
        forced_on = explore and self.config.forced_exploration and self.config.c > 0
        steps = min(n, int(slots.sum()))
        jobs, arms = np.empty(steps, np.int64), np.empty(steps, np.int64)
        eps, feasible = np.zeros(steps), np.zeros((steps, k), dtype=bool)
        for s in range(steps):
            feasible[s] = slots > 0
            if forced_on:
                eps[s] = self.epsilon(self.t)
            if forced_on and self.rng.random() < eps[s]:
                j = int(self.rng.choice(np.flatnonzero(alive)))
                a = int(self.rng.choice(np.flatnonzero(feasible[s])))
            else:
                j, a = divmod(int(work.argmax()), k)
            jobs[s], arms[s] = j, a
            alive[j] = False
            work[j] = -np.inf
            slots[a] -= 1
            if slots[a] == 0:
                work[:, a] = -np.inf
            if explore:
                self.decisions_pending += 1
        if not explore:
            props = np.ones(steps)
        else:
            p_ts = self.ts_probability(z[jobs], p[jobs], cost[jobs], feasible, arms)
            props = self._propensity(eps, feasible.sum(axis=1), p_ts)
        return [Assignment(int(j), int(a), float(q), self.version) for j, a, q in zip(jobs, arms, props, strict=True)]

    @staticmethod
    def _propensity(eps, n_feasible, p_ts) -> np.ndarray:
        prop = eps / n_feasible + (1 - eps) * p_ts
        return np.clip(prop, np.finfo(np.float64).tiny, 1.0)

    def _check_free(self, free) -> np.ndarray:
        f = np.asarray(free)
        if f.shape != (self.n_arms,):
            raise ValueError(f"free must hold one slot count per model, shape ({self.n_arms},), got {f.shape}")
        if f.dtype.kind not in "iuf" or not np.isfinite(f).all() or (f < 0).any() or (f != np.round(f)).any():
            raise ValueError(f"free slot counts must be non-negative integers, got {f.tolist()}")
        return f.astype(np.int64)

    # ====================================================================================================
    # ALGO LOGIC: learning
    # ====================================================================================================
    def update(self, batch: BanditBatch) -> dict[str, float]:
        """Learn satisfaction (and expected cost) of the chosen models. All-or-nothing: the new per-model
        arrays are built aside and installed together. A policy loaded from a serving blob has no H or cost
        Gram matrix to learn from: ServingOnlyError."""
        self._check_trainable("learn (update)")
        n = len(batch)
        if n == 0:
            return {}
        arms = np.asarray(batch.arms)
        if arms.dtype.kind not in "iu" or (arms < 0).any() or (arms >= self.n_arms).any():
            raise ValueError(f"arms must be model indices in [0, {self.n_arms})")
        z = self.features(batch.contexts)
        y = np.clip(np.asarray(batch.scores, dtype=np.float64), 0.0, 1.0)
        if batch.retrial is not None:
            retrial = np.asarray(batch.retrial)
            if retrial.shape != (n,):
                raise ValueError(f"retrial must have {n} entries, got shape {retrial.shape}")
            y = np.where(retrial.astype(bool), 0.0, y)
        c = normalised_cost(batch.costs, self.tau)
        mu_before = expit(np.einsum("nd,nd->n", z, self.theta[arms]))
        log_loss = -np.mean(y * np.log(np.maximum(mu_before, 1e-12)) + (1 - y) * np.log(np.maximum(1 - mu_before, 1e-12)))

        new: dict[int, dict[str, np.ndarray]] = {}
        for a in np.unique(arms):
            m = arms == a
            za, ya, ca = z[m], y[m], c[m]
            if self.config.update_rule == "newton":
                theta, H, L = self._newton_step(self.theta[a], self.H[a], za, ya)
                st = {"theta": theta, "H": H}
            else:
                st, L = self._irls_update(int(a), za, ya)
            st["chol_inv"] = solve_triangular(L, np.eye(len(L)), lower=True).astype(np.float32)
            A = self.cost_A[a] + za.T @ za
            bc = self.cost_b[a] + za.T @ ca
            st.update(cost_A=A, cost_b=bc, cost_beta=cho_solve((np.linalg.cholesky(A), True), bc))
            new[int(a)] = st
        for a, st in new.items():
            for key, val in st.items():
                getattr(self, key)[a] = val
        self.samples_learned += n
        self.decisions_pending = max(0, self.decisions_pending - n)
        self.version += 1
        return {
            "mean_reward": float(batch.rewards(self.tau).mean()),
            "satisfaction": float(y.mean()),
            "log_loss": float(log_loss),
        }

    @staticmethod
    def _newton_step(theta, H, z, y) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """H <- H + sum mu'(z^T theta) z z^T;  theta <- theta - H^-1 sum (mu(z^T theta) - y) z. Returns the new
        theta, H and the Cholesky factor L of H."""
        mu = expit(z @ theta)
        H = H + (z * (mu * (1 - mu))[:, None]).T @ z
        L = np.linalg.cholesky(H)
        return theta - cho_solve((L, True), z.T @ (mu - y)), H, L

    def _irls_update(self, a: int, z, y) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Append to model a's window; samples leaving it enter the prior (theta_0, H_0) by a Newton step; then
        `irls_iters` Newton (IRLS) iterations on  1/2 (theta - theta_0)^T H_0 (theta - theta_0) + log-loss(window)."""
        cap = self.config.irls_window
        wz = np.concatenate([self.window_z[a, : self.window_n[a]], z])
        wy = np.concatenate([self.window_y[a, : self.window_n[a]], y])
        theta0, H0 = self.prior_theta[a], self.prior_H[a]
        if len(wz) > cap:
            out = len(wz) - cap
            theta0, H0, _ = self._newton_step(theta0, H0, wz[:out], wy[:out])
            wz, wy = wz[out:], wy[out:]
        theta = self.theta[a]
        for _ in range(self.config.irls_iters):
            mu = expit(wz @ theta)
            G = H0 + (wz * (mu * (1 - mu))[:, None]).T @ wz
            g = H0 @ (theta - theta0) + wz.T @ (mu - wy)
            theta = theta - cho_solve((np.linalg.cholesky(G), True), g)
        mu = expit(wz @ theta)
        H = H0 + (wz * (mu * (1 - mu))[:, None]).T @ wz
        nz, ny = np.zeros_like(self.window_z[a]), np.zeros_like(self.window_y[a])
        nz[: len(wz)], ny[: len(wy)] = wz, wy
        state = {
            "theta": theta,
            "H": H,
            "prior_theta": theta0,
            "prior_H": H0,
            "window_z": nz,
            "window_y": ny,
            "window_n": np.int64(len(wz)),
        }
        return state, np.linalg.cholesky(H)

    # ====================================================================================================
    # state
    # ====================================================================================================
    def _params(self):
        params = {
            "theta": self.theta.copy(),
            "H": self.H.copy(),
            "cost_A": self.cost_A.copy(),
            "cost_b": self.cost_b.copy(),
            "counters": np.array([self.samples_learned, self.decisions_pending], dtype=np.int64),
        }
        if self.config.update_rule == "irls":
            params.update(
                prior_theta=self.prior_theta.copy(),
                prior_H=self.prior_H.copy(),
                window_z=self.window_z.copy(),
                window_y=self.window_y.copy(),
                window_n=self.window_n.copy(),
            )
        return params

    def _load_params(self, params):
        """Validated and derived (Cholesky factors, cost coefficients) aside, then installed together."""
        p = {k: np.asarray(v) for k, v in params.items()}
        for key in ("counters", "window_n"):
            if key in p and (p[key].dtype.kind not in "iu" or (p[key] < 0).any()):
                raise StateError(f"parameter {key!r} must hold non-negative integers")
        if "window_n" in p and (p["window_n"] > self.config.irls_window).any():
            raise StateError(f"window_n exceeds irls_window {self.config.irls_window}")
        f = {k: v.astype(np.float64) for k, v in p.items() if k not in ("counters", "window_n")}
        try:
            chol_inv = np.stack([_inverse_cholesky(h) for h in f["H"]]).astype(np.float32)
            cost_beta = np.stack(
                [cho_solve((np.linalg.cholesky(A), True), b) for A, b in zip(f["cost_A"], f["cost_b"], strict=True)]
            )
            if "prior_H" in f:
                np.linalg.cholesky(f["prior_H"])
        except np.linalg.LinAlgError:
            raise StateError("checkpoint precision matrices are not symmetric positive definite") from None
        for key in ("H", "cost_A", "prior_H"):
            if key in f and not np.allclose(f[key], np.swapaxes(f[key], 1, 2), rtol=1e-8, atol=1e-10):
                raise StateError(f"parameter {key!r} is not symmetric")
        for key, val in f.items():
            setattr(self, key, val)
        if "window_n" in p:
            self.window_n = p["window_n"].astype(np.int64)
        self.chol_inv, self.cost_beta = chol_inv, cost_beta
        self.samples_learned, self.decisions_pending = (int(v) for v in p["counters"])

    def serving_state_dict(self):
        """What a decision reads: theta^, chol_inv (R_k = L_k^-1, float32, as the policy keeps it), cost_beta and
        the counters (t), plus the projection when there is one; marked `"serving": True`. Not H, cost_A,
        cost_b nor the IRLS prior and window: only learning reads those (`state_dict()` keeps them)."""
        return self._state(self._all_serving_params(), serving=True)

    def _serving_params(self):
        return {
            "theta": self.theta.copy(),
            "chol_inv": self.chol_inv.copy(),
            "cost_beta": self.cost_beta.copy(),
            "counters": np.array([self.samples_learned, self.decisions_pending], dtype=np.int64),
        }

    def _load_serving_params(self, params):
        """Validated aside (the precision's factor must be what it claims: lower triangular, positive diagonal,
        so R^T R is positive definite), then installed together. The learning state is dropped: a serving
        policy cannot update, and a router does not carry 2 K d^2 float64 it never reads."""
        p = {k: np.asarray(v) for k, v in params.items()}
        if p["counters"].dtype.kind not in "iu" or (p["counters"] < 0).any():
            raise StateError("parameter 'counters' must hold non-negative integers")
        for key in ("theta", "chol_inv", "cost_beta"):
            if p[key].dtype.kind != "f":
                raise StateError(f"parameter {key!r} must hold floating-point values, got dtype {p[key].dtype}")
        R = p["chol_inv"]
        if (np.triu(R, 1) != 0).any() or not (np.diagonal(R, axis1=1, axis2=2) > 0).all():
            raise StateError("parameter 'chol_inv' is not lower triangular with a positive diagonal (an inverse Cholesky factor)")
        self.theta = p["theta"].astype(np.float64)
        self.chol_inv = R.astype(np.float32)
        self.cost_beta = p["cost_beta"].astype(np.float64)
        self.samples_learned, self.decisions_pending = (int(v) for v in p["counters"])
        self.H = self.cost_A = self.cost_b = None
        if self.config.update_rule == "irls":
            self.prior_theta = self.prior_H = self.window_z = self.window_y = self.window_n = None

    def _config(self):
        return asdict(self.config)


def _inverse_cholesky(H: np.ndarray) -> np.ndarray:
    """R = L^-1 for H = L L^T (so H^-1 = R^T R); raises LinAlgError when H is not positive definite."""
    L = np.linalg.cholesky(H)
    return solve_triangular(L, np.eye(len(H)), lower=True)
