"""`QueueingEnv`: the discrete-time queueing environment of CQB-MNL (arXiv 2602.02061) over a routing log.

Each step t:
    1. jobs arrive: A_t ~ Poisson(lambda) (or Bernoulli(lambda), lambda <= 1); each job is a prompt row drawn
       uniformly from the table (its embedding, every model's satisfaction probability and cost);
    2. the policy serves waiting jobs: model k takes at most capacity_k of them this step;
    3. a served job's user is satisfied with probability p[row, k] (the job departs); otherwise the user
       retries with probability p_retry (the job re-enters the queue, at its back) or abandons (departs).
       Every service costs costs[row, k] USD.
    Q(t) = jobs waiting after step t's service.

Satisfaction models (`load_queue_table`):
    logged    p[row, k] = the logged score of model k on that prompt (real outcomes; RouterBench's are 0/1).
              A missing cell takes the model's mean over the table (unknown, not wrong).
    logistic  p[row, k] = mu(z^T theta*_k), z = [features(x), 1], theta*_k an L2-regularised logistic fit of
              model k's logged scores on the *full* table (every split), on the features the policies see (the
              raw embedding, or the learned projection with `features: projection`): the realizable case.

Paper vs ours: the discrete-time queue, success probability mu(x^T theta_k), retrial into the queue and the
largest-success-probability oracle are the paper's (ALGORITHMS.md, ACQB). Ours: jobs drawn from a routing
log, per-model capacities, the abandon branch (p_retry < 1), costs, the default p_retry = 0.5, the logistic
regularisation (lambda = 1.0, the 5-fold cross-validated best of 0.01..10 on RouterBench), and how the load is
defined:

    rho = lambda / mu_sat,  mu_sat = departures per step of the theta*-oracle with a saturated queue,

where the theta*-oracle ranks (job, model) pairs by mu(z^T theta*_k), theta* fitted per model on the full
table in both satisfaction models (`QueueTable.oracle_success`). In `logistic` mode that is the truth; in
`logged` mode it is a per-model logistic scorer fitted on the full table, on the policies' features (our
reading of the theta*-oracle there: a reference, not an upper bound; an online fit on the served prompts can
rank them better), so the oracle, like the learners, does not know a prompt's own 0/1 outcome (a clairvoyant
ranking by that outcome sustains a higher rate than any policy of this class can: queue-eval's `clairvoyant`
reference),

estimated by Monte Carlo (`service_rate`): a closed system holds `population` jobs (default 4 x the total
capacity, so every slot is busy every step and the oracle has a choice); each departure (satisfied or
abandoned) is replaced at once by a fresh job drawn from the table. Because replacements follow the table's
mix, every kind of job must be served at the rate it arrives, so the estimate is a throughput the oracle
sustains on *this* arrival mix (not the inflated rate of cherry-picking easy jobs from an ever-growing
backlog). It is an oracle-specific rate on purpose: rho = 0.9 means 10% headroom for the policy the
learners are compared with. Why p_retry < 1: RouterBench has prompts no model solves; with p_retry = 1
they never leave and no load is sustainable (`service_rate` raises).

Two interfaces over the same state:
- the direct API, what `banditrouter queue-eval` runs: `reset`, `waiting()` -> (jobs, rows) oldest first,
  `serve(jobs, arms)` -> `QueueOutcome`, `arrive()`, `queue_length`, `row_counts`;
- gymnasium: the observation shows the `max_queue` oldest waiting jobs (embeddings, a mask, the queue
  length); the action gives each slot a model (or K = do not serve); assignments past a model's capacity are
  dropped in slot order; reward = -Q(t). `reset` draws the first step's arrivals; `step` serves, then draws
  the next step's arrivals. The arrival and service draws come from two streams seeded by `reset(seed=...)`,
  so two policies run on one seed see the same arrivals.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.routing import register_everywhere

ENV_ID = "banditrouter/Queueing-v0"
RLLIB_ENV_NAME = "banditrouter-queueing"
SATISFACTION_MODELS = ("logged", "logistic")
ARRIVAL_PROCESSES = ("poisson", "bernoulli")
CONTEXT_SPLITS = ("test", "train", "all")
DEFAULT_P_RETRY = 0.5
"""Half of unsatisfied users regenerate, half give up (ours). Any value < 1 makes every job leave eventually
(an unsolvable prompt after 1 / (1 - p_retry) = 2 services on average); 1 would keep RouterBench's unsolved
prompts forever."""
DEFAULT_LOGISTIC_REG = 1.0
"""L2 weight of the theta* fit (the bias is not penalised). 5-fold CV log-likelihood on RouterBench (all rows,
MiniLM features): -0.616 at 0.01, -0.573 at 0.1, -0.567 at 0.3, -0.566 at 1, -0.566 at 3, -0.568 at 10."""
SATURATION_FACTOR = 4
"""The saturated system holds SATURATION_FACTOR x total capacity jobs."""
QUEUE_LENGTH_CAP = 1e7
"""The observation's queue length is clipped here (a bounded Box; the true length is `queue_length`)."""


# ========================================================================================================
# Satisfaction models
# ========================================================================================================
def fill_missing(table: np.ndarray, what: str = "scores") -> np.ndarray:
    """NaN cells take their column's mean (a model's mean over the table); a column with no value is an error."""
    t = np.asarray(table, dtype=np.float64)
    if t.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (prompts, models) table, got shape {t.shape}")
    missing = np.isnan(t)
    if missing.all(axis=0).any():
        raise ValueError(f"{what}: model column(s) {np.flatnonzero(missing.all(axis=0)).tolist()} hold no value at all")
    if not missing.any():
        return t.copy()
    return np.where(missing, np.nanmean(t, axis=0, keepdims=True), t)


def _with_bias(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"features must be a 2-D array, got shape {f.shape}")
    return np.hstack([f, np.ones((len(f), 1))])


def fit_logistic(
    features: np.ndarray, labels: np.ndarray, reg: float = DEFAULT_LOGISTIC_REG, max_iter: int = 100, tol: float = 1e-8
) -> np.ndarray:
    """theta (d + 1,) minimising sum_i logloss(mu(z_i^T theta), y_i) + reg/2 |theta[:-1]|^2, z_i = [x_i, 1]
    (the bias, last, is not penalised). Newton's method with step halving; labels in [0, 1] (a fractional
    label is a quasi-likelihood target). Rows with a NaN label are skipped."""
    z = _with_bias(features)
    y = np.asarray(labels, dtype=np.float64).ravel()
    if len(y) != len(z):
        raise ValueError(f"{len(z)} feature rows but {len(y)} labels")
    keep = ~np.isnan(y)
    z, y = z[keep], y[keep]
    if len(y) == 0:
        raise ValueError("no observed labels to fit")
    if (y < 0).any() or (y > 1).any():
        raise ValueError("labels must lie in [0, 1]")
    if not (np.isfinite(reg) and reg > 0):
        raise ValueError(f"reg must be a positive number, got {reg}")
    d = z.shape[1]
    penalty = np.full(d, float(reg))
    penalty[-1] = 1e-8  # bias: (almost) free; the tiny ridge keeps H positive definite when y is constant

    def loss(theta: np.ndarray) -> float:
        u = z @ theta
        return float(np.sum(np.logaddexp(0.0, u) - y * u) + 0.5 * np.sum(penalty * theta * theta))

    theta = np.zeros(d)
    current = loss(theta)
    for _ in range(max_iter):
        mu = 1.0 / (1.0 + np.exp(-(z @ theta)))
        g = z.T @ (mu - y) + penalty * theta
        H = (z * (mu * (1.0 - mu))[:, None]).T @ z + np.diag(penalty)
        step = np.linalg.solve(H, g)
        scale = 1.0
        while True:  # halve until the objective does not increase (Newton on a convex loss: rarely needed)
            candidate = theta - scale * step
            new = loss(candidate)
            if new <= current + 1e-12 or scale < 1e-6:
                break
            scale /= 2
        theta, current = candidate, new
        if np.max(np.abs(scale * step)) < tol:
            break
    return theta


def fit_satisfaction(features: np.ndarray, scores: np.ndarray, reg: float = DEFAULT_LOGISTIC_REG) -> np.ndarray:
    """theta* (K, d + 1): one `fit_logistic` per model column of `scores` (NaN cells skipped)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or len(s) != len(features):
        raise ValueError(f"scores {s.shape} do not match {len(features)} feature rows")
    return np.stack([fit_logistic(features, s[:, k], reg) for k in range(s.shape[1])])


def logistic_success(features: np.ndarray, thetas: np.ndarray) -> np.ndarray:
    """(n, K) mu(z^T theta*_k), z = [features, 1]."""
    u = _with_bias(features) @ np.asarray(thetas, dtype=np.float64).T
    return 1.0 / (1.0 + np.exp(-u))


# ========================================================================================================
# The oracle's rule and its sustainable rate
# ========================================================================================================
def greedy_assignment(utility: np.ndarray, capacity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The theta*-oracle's rule (the paper's): repeatedly serve the (job, model) pair with the largest utility
    among waiting jobs and models with a free slot, until jobs or slots run out (work-conserving).

    `utility`: (n, K), one row per job in queue order (oldest first): ties go to the older job, then to the
    lower model index. Returns (jobs, arms) in the order served."""
    u = np.asarray(utility, dtype=np.float64)
    cap = np.asarray(capacity, dtype=np.int64).copy()
    n, k = u.shape
    total = int(min(n, cap.sum()))
    if total == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # Only the top `total` jobs of a column (by utility, then age) can ever be served by that model: every
    # job above a served one was taken first, and at most total - 1 pairs are served before it.
    if n > 2 * total:
        v = -np.partition(-u, total - 1, axis=0)[total - 1]
        eq = u == v
        cand = np.flatnonzero(((u > v) | (eq & (np.cumsum(eq, axis=0) <= total))).any(axis=1))
    else:
        cand = np.arange(n)
    order = np.argsort(-u[cand].ravel(), kind="stable")
    used = np.zeros(n, dtype=bool)
    jobs_out, arms_out = [], []
    for idx in order.tolist():
        j, a = divmod(idx, k)
        j = int(cand[j])
        if cap[a] == 0 or used[j]:
            continue
        used[j] = True
        cap[a] -= 1
        jobs_out.append(j)
        arms_out.append(a)
        if len(jobs_out) == total:
            break
    return np.asarray(jobs_out, dtype=np.int64), np.asarray(arms_out, dtype=np.int64)


@dataclass(frozen=True)
class ServiceRate:
    """mu_sat: departures per step of the theta*-oracle with a saturated queue (Monte Carlo)."""

    rate: float
    stderr: float
    """Standard error from 10 batch means."""
    population: int
    steps: int
    warmup: int
    seed: int


def check_capacity(capacity, n_models: int) -> np.ndarray:
    """An int for every model, or one int per model; non-negative integers, at least one slot in all."""
    c = np.asarray(capacity)
    if c.ndim == 0:
        c = np.full(n_models, c.item())
    if c.shape != (n_models,):
        raise ValueError(f"capacity must be one integer or {n_models} integers (one per model), got shape {c.shape}")
    if c.dtype.kind not in "iuf" or not np.isfinite(c.astype(np.float64)).all() or (c < 0).any() or (c != np.round(c)).any():
        raise ValueError(f"capacity must hold non-negative integers, got {c.tolist()}")
    if c.sum() < 1:
        raise ValueError("capacity must give at least one slot in all")
    return c.astype(np.int64)


def service_rate(
    success: np.ndarray,
    capacity,
    p_retry: float = DEFAULT_P_RETRY,
    *,
    utility: np.ndarray | None = None,
    population: int | None = None,
    steps: int = 4000,
    warmup: int = 1000,
    seed: int = 0,
) -> ServiceRate:
    """Monte Carlo of the saturated theta*-oracle (see the module docstring): a closed system of `population`
    jobs, each departure replaced by a fresh uniform draw from the table; the oracle serves by
    `greedy_assignment` on `utility` (default: the success probabilities). Returns departures per step after
    `warmup` steps, with a batch-means standard error."""
    p = np.asarray(success, dtype=np.float64)
    n, k = p.shape
    cap = check_capacity(capacity, k)
    u = p if utility is None else np.asarray(utility, dtype=np.float64)
    if u.shape != p.shape:
        raise ValueError(f"utility {u.shape} does not match success {p.shape}")
    if not 0 <= p_retry <= 1:
        raise ValueError(f"p_retry must lie in [0, 1], got {p_retry}")
    unsolved = int((p.max(axis=1) <= 0).sum())
    if p_retry >= 1 and unsolved:
        raise ValueError(
            f"{unsolved} prompts have satisfaction probability 0 with every model: with p_retry = 1 they never leave "
            "and no load is sustainable; use p_retry < 1"
        )
    if steps < 10 or warmup < 0:
        raise ValueError("service_rate needs steps >= 10 and warmup >= 0")
    m = int(population if population is not None else SATURATION_FACTOR * cap.sum())
    if m < cap.sum():
        raise ValueError(f"population {m} is smaller than the total capacity {int(cap.sum())}: the queue would not be saturated")
    rng = np.random.default_rng(seed)
    rows = rng.integers(n, size=m)
    departures = np.zeros(steps)
    for t in range(warmup + steps):
        jobs, arms = greedy_assignment(u[rows], cap)
        sat = rng.random(len(jobs)) < p[rows[jobs], arms]
        retry = ~sat & (rng.random(len(jobs)) < p_retry)
        leave = np.zeros(m, dtype=bool)
        leave[jobs[~retry]] = True
        back = np.zeros(m, dtype=bool)
        back[jobs[retry]] = True
        # queue order: untouched jobs, then the retried ones (re-entered), then fresh replacements
        rows = np.concatenate([rows[~leave & ~back], rows[jobs[retry]], rng.integers(n, size=int(leave.sum()))])
        if t >= warmup:
            departures[t - warmup] = leave.sum()
    batches = departures[: steps - steps % 10].reshape(10, -1).mean(axis=1)
    return ServiceRate(float(departures.mean()), float(batches.std(ddof=1) / np.sqrt(10)), m, steps, warmup, seed)


# ========================================================================================================
# The environment
# ========================================================================================================
@dataclass(frozen=True)
class QueueOutcome:
    """What one `serve` did: per served job, its prompt row, the model, the true satisfaction probability, and
    which of satisfied / retried / abandoned happened (exactly one per job), and the cost of the service."""

    jobs: np.ndarray
    rows: np.ndarray
    arms: np.ndarray
    success: np.ndarray
    satisfied: np.ndarray
    retried: np.ndarray
    abandoned: np.ndarray
    costs: np.ndarray

    def __len__(self) -> int:
        return len(self.jobs)


class QueueingEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(
        self,
        contexts: np.ndarray,
        success: np.ndarray,
        costs: np.ndarray,
        *,
        capacity=1,
        arrival_rate: float | None = None,
        load: float | None = None,
        arrivals: str = "poisson",
        p_retry: float = DEFAULT_P_RETRY,
        models: tuple[str, ...] | None = None,
        max_queue: int = 64,
        max_steps: int = 1000,
        rate: ServiceRate | None = None,
        utility: np.ndarray | None = None,
        rate_seed: int = 0,
    ):
        """Give exactly one of `arrival_rate` (lambda, jobs per step) and `load` (rho; lambda = rho x mu_sat,
        with mu_sat from `rate` or computed by `service_rate` with `utility` and `rate_seed`). Without
        `utility`, mu_sat is that of an oracle ranking by `success` itself (in `logged` mode: a clairvoyant);
        `from_table` passes the theta*-oracle's `oracle_success`."""
        super().__init__()
        x = np.asarray(contexts, dtype=np.float32)
        p = np.asarray(success, dtype=np.float64)
        c = np.asarray(costs, dtype=np.float64)
        if x.ndim != 2 or p.ndim != 2 or len(x) != len(p) or c.shape != p.shape:
            raise ValueError(f"contexts {x.shape}, success {p.shape} and costs {c.shape} do not match")
        if len(p) == 0 or p.shape[1] < 2:
            raise ValueError("a queueing env needs at least one prompt and two models")
        if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
            raise ValueError("success probabilities must be finite and lie in [0, 1] (fill missing cells first)")
        if not np.isfinite(c).all() or (c < 0).any():
            raise ValueError("costs must be finite and non-negative (fill missing cells first)")
        if arrivals not in ARRIVAL_PROCESSES:
            raise ValueError(f"arrivals must be one of {ARRIVAL_PROCESSES}, got {arrivals!r}")
        if not (isinstance(p_retry, int | float) and 0 <= p_retry <= 1):
            raise ValueError(f"p_retry must lie in [0, 1], got {p_retry!r}")
        if int(max_queue) < 1 or int(max_steps) < 1:
            raise ValueError("max_queue and max_steps must be positive")
        n, k = p.shape
        self.contexts, self.success, self.costs = np.clip(x, -1.0, 1.0), p, c
        self.models = tuple(models) if models else tuple(f"arm{i}" for i in range(k))
        if len(self.models) != k:
            raise ValueError(f"{len(self.models)} model names for {k} models")
        self.capacity = check_capacity(capacity, k)
        self.arrivals, self.p_retry = arrivals, float(p_retry)
        self.max_queue, self.max_steps = int(max_queue), int(max_steps)
        if (arrival_rate is None) == (load is None):
            raise ValueError("give exactly one of arrival_rate (lambda) and load (rho)")
        self.rate = rate
        if load is not None:
            if not (np.isfinite(load) and load > 0):
                raise ValueError(f"load must be a positive number, got {load}")
            if self.rate is None:
                self.rate = service_rate(p, self.capacity, self.p_retry, utility=utility, seed=rate_seed)
            arrival_rate = float(load) * self.rate.rate
        if not (np.isfinite(arrival_rate) and arrival_rate > 0):
            raise ValueError(f"the arrival rate must be a positive number, got {arrival_rate}")
        if arrivals == "bernoulli" and arrival_rate > 1:
            raise ValueError(
                f"Bernoulli arrivals bring at most one job per step, but lambda = {arrival_rate:.3g}: use arrivals "
                "'poisson', or lower the load or the capacities"
            )
        self.arrival_rate = float(arrival_rate)
        self.load = self.arrival_rate / self.rate.rate if self.rate is not None and self.rate.rate > 0 else None
        if self.load is not None and self.load >= 1:
            warnings.warn(f"load rho = {self.load:.3f} >= 1: the oracle itself cannot keep the queue bounded", stacklevel=2)

        d = x.shape[1]
        self.observation_space = spaces.Dict(
            {
                "contexts": spaces.Box(-1.0, 1.0, shape=(self.max_queue, d), dtype=np.float32),
                "mask": spaces.MultiBinary(self.max_queue),
                "queue_length": spaces.Box(0.0, QUEUE_LENGTH_CAP, shape=(1,), dtype=np.float32),
            }
        )
        self.action_space = spaces.MultiDiscrete(np.full(self.max_queue, k + 1, dtype=np.int64))
        self._arrival_rng = self._service_rng = None
        self._init_state()

    # -- construction from a table ----------------------------------------------------------------------
    @classmethod
    def from_table(cls, table: QueueTable, **kwargs: Any) -> QueueingEnv:
        """The env over `table`; with a load, mu_sat is the theta*-oracle's (it ranks by `oracle_success`)."""
        kwargs.setdefault("utility", table.oracle_success)
        return cls(table.contexts, table.success, table.costs, models=table.models, **kwargs)

    @property
    def n_models(self) -> int:
        return self.success.shape[1]

    # -- state ------------------------------------------------------------------------------------------
    def _init_state(self) -> None:
        size = 1024
        self._buf_job = np.empty(size, np.int64)  # waiting jobs in queue order; dead entries are skipped
        self._buf_alive = np.zeros(size, dtype=bool)
        self._n_buf = 0
        self._job_row = np.empty(size, np.int64)
        self._job_pos = np.empty(size, np.int64)
        self._next_job = 0
        self._counts = np.zeros(len(self.success), np.int64)
        self._queue_length = 0
        self.t = 0
        self.totals = {"arrived": 0, "served": 0, "satisfied": 0, "retried": 0, "abandoned": 0, "cost": 0.0}

    @property
    def queue_length(self) -> int:
        return self._queue_length

    @property
    def row_counts(self) -> np.ndarray:
        """(n_prompts,) waiting jobs per prompt row (read-only view)."""
        v = self._counts.view()
        v.flags.writeable = False
        return v

    def job_rows(self, jobs) -> np.ndarray:
        return self._job_row[np.asarray(jobs, dtype=np.int64)]

    def waiting(self, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(job ids, prompt rows) of the waiting jobs, oldest (re-)entry first; the `limit` oldest ones if given."""
        idx = np.flatnonzero(self._buf_alive[: self._n_buf])
        jobs = self._buf_job[idx if limit is None else idx[:limit]]
        return jobs, self._job_row[jobs]

    def _append(self, jobs: np.ndarray) -> None:
        m = len(jobs)
        if self._n_buf + m > len(self._buf_job):
            alive = np.flatnonzero(self._buf_alive[: self._n_buf])
            size = len(self._buf_job)
            while len(alive) + m > size // 2:
                size *= 2
            buf, live = np.empty(size, np.int64), np.zeros(size, dtype=bool)
            buf[: len(alive)] = self._buf_job[alive]
            live[: len(alive)] = True
            self._buf_job, self._buf_alive, self._n_buf = buf, live, len(alive)
            self._job_pos[buf[: len(alive)]] = np.arange(len(alive))
        pos = np.arange(self._n_buf, self._n_buf + m)
        self._buf_job[pos] = jobs
        self._buf_alive[pos] = True
        self._job_pos[jobs] = pos
        self._n_buf += m

    def _new_jobs(self, rows: np.ndarray) -> np.ndarray:
        m = len(rows)
        if self._next_job + m > len(self._job_row):
            size = max(2 * len(self._job_row), self._next_job + m)
            self._job_row = np.concatenate([self._job_row, np.empty(size - len(self._job_row), np.int64)])
            self._job_pos = np.concatenate([self._job_pos, np.empty(size - len(self._job_pos), np.int64)])
        jobs = np.arange(self._next_job, self._next_job + m, dtype=np.int64)
        self._job_row[jobs] = rows
        self._next_job += m
        return jobs

    # -- the direct API ---------------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        s = self.np_random.integers(0, 2**63 - 1, size=2)
        self._arrival_rng, self._service_rng = np.random.default_rng(int(s[0])), np.random.default_rng(int(s[1]))
        self._init_state()
        arrived = self.arrive()
        return self._obs(), {"arrivals": arrived, "queue_length": self.queue_length}

    def arrive(self) -> np.ndarray:
        """Draw this step's arrivals; returns their job ids (prompt rows: `job_rows`)."""
        if self._arrival_rng is None:
            raise RuntimeError("call reset() first")
        if self.arrivals == "poisson":
            m = int(self._arrival_rng.poisson(self.arrival_rate))
        else:
            m = int(self._arrival_rng.random() < self.arrival_rate)
        rows = self._arrival_rng.integers(len(self.success), size=m)
        jobs = self._new_jobs(rows)
        self._append(jobs)
        np.add.at(self._counts, rows, 1)
        self._queue_length += m
        self.totals["arrived"] += m
        return jobs

    def serve(self, jobs, arms) -> QueueOutcome:
        """Serve waiting `jobs` on `arms` (model indices) and end the step. Each job at most once, model k at
        most capacity[k] times. Satisfied and abandoning jobs leave; retrying ones re-enter at the back."""
        if self._service_rng is None:
            raise RuntimeError("call reset() first")
        jobs = np.asarray(jobs, dtype=np.int64).ravel()
        arms = np.asarray(arms, dtype=np.int64).ravel()
        if len(jobs) != len(arms):
            raise ValueError(f"{len(jobs)} jobs but {len(arms)} arms")
        if len(jobs):
            if (jobs < 0).any() or (jobs >= self._next_job).any() or not self._buf_alive[self._job_pos[jobs]].all():
                raise ValueError("serve() got a job that is not waiting")
            if len(np.unique(jobs)) != len(jobs):
                raise ValueError("serve() got the same job twice")
            if (arms < 0).any() or (arms >= self.n_models).any():
                raise ValueError(f"arms must be model indices in [0, {self.n_models})")
            over = np.bincount(arms, minlength=self.n_models) > self.capacity
            if over.any():
                raise ValueError(f"models {np.flatnonzero(over).tolist()} were given more jobs than their capacity")
        rows = self._job_row[jobs]
        p = self.success[rows, arms]
        sat = self._service_rng.random(len(jobs)) < p
        retry = ~sat & (self._service_rng.random(len(jobs)) < self.p_retry)
        abandon = ~sat & ~retry
        cost = self.costs[rows, arms]
        self._buf_alive[self._job_pos[jobs]] = False
        gone = ~retry
        np.subtract.at(self._counts, rows[gone], 1)
        self._queue_length -= int(gone.sum())
        self._append(jobs[retry])
        self.t += 1
        tot = self.totals
        tot["served"] += len(jobs)
        tot["satisfied"] += int(sat.sum())
        tot["retried"] += int(retry.sum())
        tot["abandoned"] += int(abandon.sum())
        tot["cost"] += float(cost.sum())
        return QueueOutcome(jobs, rows, arms, p, sat, retry, abandon, cost)

    # -- gymnasium --------------------------------------------------------------------------------------
    def _obs(self) -> dict[str, np.ndarray]:
        jobs, rows = self.waiting()
        rows = rows[: self.max_queue]
        ctx = np.zeros(self.observation_space["contexts"].shape, dtype=np.float32)
        ctx[: len(rows)] = self.contexts[rows]
        mask = np.zeros(self.max_queue, dtype=np.int8)
        mask[: len(rows)] = 1
        q = min(self.queue_length, QUEUE_LENGTH_CAP)
        return {"contexts": ctx, "mask": mask, "queue_length": np.array([q], dtype=np.float32)}

    def step(self, action):
        if self._arrival_rng is None:
            raise RuntimeError("call reset() before step()")
        a = np.asarray(action)
        if not self.action_space.contains(a.astype(np.int64)) or a.shape != (self.max_queue,):
            raise ValueError(f"action {action!r} is not in {self.action_space}")
        a = a.astype(np.int64)
        jobs, _ = self.waiting()
        jobs = jobs[: self.max_queue]
        free = self.capacity.copy()
        pick_jobs, pick_arms, dropped = [], [], 0
        for slot in range(len(jobs)):
            arm = int(a[slot])
            if arm == self.n_models:
                continue
            if free[arm] == 0:
                dropped += 1
                continue
            free[arm] -= 1
            pick_jobs.append(int(jobs[slot]))
            pick_arms.append(arm)
        out = self.serve(pick_jobs, pick_arms)
        reward = -float(self.queue_length)
        info = {
            "served": len(out),
            "satisfied": int(out.satisfied.sum()),
            "retried": int(out.retried.sum()),
            "abandoned": int(out.abandoned.sum()),
            "cost": float(out.costs.sum()),
            "dropped": dropped,
            "queue_length": self.queue_length,
        }
        self.arrive()
        return self._obs(), reward, False, self.t >= self.max_steps, info


# ========================================================================================================
# Tables from routing logs
# ========================================================================================================
@dataclass(frozen=True)
class QueueTable:
    """The job pool: raw contexts (what policies are given), true satisfaction probabilities and costs."""

    contexts: np.ndarray
    success: np.ndarray
    costs: np.ndarray
    models: tuple[str, ...]
    satisfaction: str
    tau: float
    """The policies' cost scale: the cost_scale quantile of the training log's per-call cost."""
    theta: np.ndarray | None = None
    """theta* (K, f + 1), fitted on the full table in both satisfaction models (None for a table built
    without it: then the oracle knows `success` itself)."""
    features: str = "none"
    name: str = ""
    n_fit: int = 0
    """Rows theta* was fitted on (the full table)."""
    belief: np.ndarray | None = None
    """(n, K) what the theta*-oracle knows: mu(z^T theta*_k). In `logistic` mode it is `success`; in `logged`
    mode it is a per-model logistic scorer fitted on the full table, on these features (not an upper bound on
    what a learner can rank), not the prompt's 0/1 outcome."""

    @property
    def oracle_success(self) -> np.ndarray:
        """The success probabilities the theta*-oracle ranks by (and the routing regret counts)."""
        return self.success if self.belief is None else self.belief


def table_from_arrays(
    pool_contexts: np.ndarray,
    pool_scores: np.ndarray,
    pool_costs: np.ndarray,
    *,
    models: tuple[str, ...],
    satisfaction: str,
    tau: float,
    fit_features: np.ndarray | None = None,
    fit_scores: np.ndarray | None = None,
    pool_features: np.ndarray | None = None,
    reg: float = DEFAULT_LOGISTIC_REG,
    features: str = "none",
    name: str = "",
) -> QueueTable:
    """theta* is fitted on (fit_features, fit_scores) (default: the pool itself) in both models, and the
    theta*-oracle knows mu([pool_features, 1] theta*) (`belief`). `logged`: success = the pool's scores
    (missing cells: the model's mean), so the oracle does not know a prompt's own outcome. `logistic`:
    success = the oracle's belief (the realizable case)."""
    if satisfaction not in SATISFACTION_MODELS:
        raise ValueError(f"satisfaction must be one of {SATISFACTION_MODELS}, got {satisfaction!r}")
    costs = fill_missing(pool_costs, "costs")
    pool_features = pool_contexts if pool_features is None else pool_features
    fx = pool_features if fit_features is None else fit_features
    fs = pool_scores if fit_scores is None else fit_scores
    theta = fit_satisfaction(fx, fs, reg)
    belief = logistic_success(pool_features, theta)
    success = fill_missing(pool_scores, "scores") if satisfaction == "logged" else belief
    x = np.asarray(pool_contexts, dtype=np.float32)
    return QueueTable(x, success, costs, tuple(models), satisfaction, float(tau), theta, features, name, len(fx), belief)


def load_queue_table(
    dataset: str = "routerbench",
    *,
    contexts: str = "test",
    satisfaction: str = "logged",
    features=None,
    reg: float = DEFAULT_LOGISTIC_REG,
    data_dir=None,
    test_fraction: float = 0.3,
    limit: int | None = None,
    progress: bool = False,
) -> QueueTable:
    """Jobs are the `contexts` split's prompts (test, train or all); theta* (logistic) is fitted on the full
    table (train + test); `features`: None for the raw embedding, or a banditrouter.features.Projection (the
    policies' features, which theta* then uses too). Embeddings come from the on-disk cache."""
    from banditrouter.embeddings import Embedder
    from banditrouter.pipeline import load_split
    from banditrouter.reward import cost_scale

    if contexts not in CONTEXT_SPLITS:
        raise ValueError(f"contexts must be one of {CONTEXT_SPLITS}, got {contexts!r}")
    emb = Embedder()
    kw = dict(data_dir=data_dir, test_fraction=test_fraction, embedder=emb, progress=progress)
    train = load_split(dataset, "train", **kw)
    test = load_split(dataset, "test", **kw)
    models = train.log.models
    test_log = test.log.with_models(models)
    all_x = np.vstack([train.contexts, test.contexts])
    all_s = np.vstack([train.log.scores, test_log.scores])
    all_c = np.vstack([train.log.costs, test_log.costs])
    n_train = len(train.log)
    pick = {"train": np.arange(n_train), "test": np.arange(n_train, len(all_x)), "all": np.arange(len(all_x))}[contexts]
    if limit is not None and limit < len(pick):
        pick = np.sort(np.random.default_rng(0).choice(pick, size=limit, replace=False))
    feat = all_x if features is None else features.apply(all_x)
    return table_from_arrays(
        all_x[pick],
        all_s[pick],
        all_c[pick],
        models=models,
        satisfaction=satisfaction,
        tau=cost_scale(train.log.costs),
        fit_features=feat,
        fit_scores=all_s,
        pool_features=feat[pick],
        reg=reg,
        features="none" if features is None else "projection",
        name=f"{dataset}:{contexts}",
    )


def synthetic_table(
    n: int = 500, dim: int = 8, n_arms: int = 3, seed: int = 0, satisfaction: str = "logged", reg: float = DEFAULT_LOGISTIC_REG
) -> QueueTable:
    """A small table from banditrouter.synthetic (for tests and smoke runs), with 0/1 logged outcomes."""
    from banditrouter.reward import cost_scale
    from banditrouter.synthetic import make_synthetic

    x, log = make_synthetic(n=n, dim=dim, n_arms=n_arms, seed=seed, noisy=True)
    kw = dict(models=log.models, satisfaction=satisfaction, tau=cost_scale(log.costs), reg=reg, name="synthetic")
    return table_from_arrays(x, log.scores, log.costs, **kw)


_ENV_KEYS = ("capacity", "arrival_rate", "load", "arrivals", "p_retry", "max_queue", "max_steps", "rate_seed")


def make_queueing_env(config: dict | None = None) -> QueueingEnv:
    """Build from a plain config dict (what gym.make and RLlib pass):

    {"synthetic": {"n": 500, "dim": 8, "n_arms": 3, "seed": 0}}                       # a synthetic table
    {"dataset": "routerbench", "contexts": "test", "data_dir": None, "limit": None}    # a logged dataset
    optional: "satisfaction" (logged | logistic), "logistic_reg", "features" (none | projection),
              "capacity" (int or per-model list), "load" (rho, default 0.9) or "arrival_rate" (lambda),
              "arrivals" (poisson | bernoulli), "p_retry", "max_queue", "max_steps", "rate_seed"
    """
    config = dict(config or {})
    known = {"synthetic", "dataset", "contexts", "data_dir", "limit", "satisfaction", "logistic_reg", "features", *_ENV_KEYS}
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown queueing env config keys {unknown}; known: {sorted(known)}")
    satisfaction = config.get("satisfaction", "logged")
    reg = float(config.get("logistic_reg", DEFAULT_LOGISTIC_REG))
    if "synthetic" in config:
        table = synthetic_table(**config["synthetic"], satisfaction=satisfaction, reg=reg)
    else:
        projection = None
        if config.get("features", "none") == "projection":
            projection = train_split_projection(config.get("dataset", "routerbench"), data_dir=config.get("data_dir"))
        elif config.get("features", "none") != "none":
            raise ValueError(f"features must be 'none' or 'projection', got {config['features']!r}")
        table = load_queue_table(
            config.get("dataset", "routerbench"),
            contexts=config.get("contexts", "test"),
            satisfaction=satisfaction,
            features=projection,
            reg=reg,
            data_dir=config.get("data_dir"),
            limit=config.get("limit"),
        )
    kwargs = {k: config[k] for k in _ENV_KEYS if k in config}
    if "arrival_rate" not in kwargs and "load" not in kwargs:
        kwargs["load"] = 0.9
    if isinstance(kwargs.get("capacity"), list):
        kwargs["capacity"] = np.asarray(kwargs["capacity"])
    return QueueingEnv.from_table(table, **kwargs)


def train_split_projection(dataset: str, *, data_dir=None, seed: int = 0, out_dim: int = 64, progress: bool = False):
    """The learned projection (banditrouter.features) trained on `dataset`'s train split, cached on disk."""
    from banditrouter.features import load_or_train_projection
    from banditrouter.pipeline import load_split

    train = load_split(dataset, "train", data_dir=data_dir, progress=progress)
    return load_or_train_projection(train, dataset, seed=seed, out_dim=out_dim, progress=progress)


def register() -> None:
    """Register with gymnasium (`gym.make(ENV_ID, config=...)`) and, when Ray is installed, with RLlib."""
    register_everywhere(ENV_ID, RLLIB_ENV_NAME, make_queueing_env)
