"""BaRP: Bandit-feedback Routing with Preferences (arXiv 2510.07429), as in ../shared/papers/ALGORITHMS.md.

    pi(a | x, w) = softmax(g([h(x); phi(w)]))          h: frozen MiniLM embedding (the context)
                                                        phi: MLP on w = (w_q, w_c);  g: MLP head
    r = w_q * q_a - w_c * min(c_a / tau, 1)            only the chosen arm's (q_a, c_a) is ever seen
    L = -(r - b) * log pi(a | x, w) - beta * H(pi(. | x, w)),   b = leave-one-out batch-mean baseline

Our departures from the paper's summary, each a named BaRPConfig field: the baseline is the leave-one-out
batch mean taken under each sample's own preference (`baseline`), greedy decisions use a Polyak average of the
parameters (`ema_decay`), and lr is 1e-3. Training preferences are drawn by
`banditrouter.training.train_bandit` (arcsine by default, for every bandit learner alike).

Training samples a ~ pi (explore=True, true propensities); serving takes argmax_a pi(a | x, w)
(explore=False, propensity 1) or samples. When samples were logged by another policy version (the online
learner), each term is weighted by the clipped importance ratio pi(a) / propensity; for on-policy samples
the ratio is exactly 1. Sizes, learning rate and the clip are [ours], named in BaRPConfig.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from banditrouter.policies.base import BanditBatch, Decisions, Policy, StateError, deterministic
from banditrouter.reward import normalised_cost


@dataclass(frozen=True)
class BaRPConfig:
    pref_hidden: int = 32
    """Hidden width of the preference encoder phi (not published; ours)."""
    pref_dim: int = 32
    """Output width of phi (not published; ours)."""
    hidden: int = 256
    """Hidden width of the decision head g (not published; ours)."""
    lr: float = 1e-3
    """Adam learning rate. The summary reports 1e-4 over 100 epochs; 1e-3 reaches the same policy in
    fewer steps on RouterBench's ~2k training prompts (ours)."""
    entropy_beta: float = 0.05
    """beta: weight of the entropy bonus (paper)."""
    max_importance_weight: float = 10.0
    """Clip for pi(a)/propensity when learning from another policy version's decisions (ours)."""
    grad_clip: float = 1.0
    """Max gradient norm per step (ours)."""
    baseline: str = "preference_batch_mean"
    """Both baselines leave sample i out of its own b_i (leave-one-out), so b_i does not depend on the arm
    sample i drew and the gradient stays unbiased; a plain batch mean includes r_i, which shrinks every
    advantage by (1 - 1/B) and makes it exactly 0 for a batch of one (then only the entropy term acts and
    the policy drifts toward uniform). A batch of one has no other sample: b = 0.
    "batch_mean" (paper's, made leave-one-out): b_i = mean of the other samples' rewards.
    "preference_batch_mean" (ours): b_i = w_q,i * mean_{j != i}(q_j) - w_c,i * mean_{j != i}(c~_j), the
    other samples' outcomes scored under sample i's own preference; it removes the variance that mixing
    preferences in one batch adds (with one shared b, every arm looks bad when w_c is high)."""
    ema_decay: float = 0.995
    """Polyak averaging (ours): when > 0, greedy decisions (explore=False: serving, evaluation) use an
    exponential moving average of the parameters, theta_bar <- d * theta_bar + (1 - d) * theta, while
    exploration samples from the live parameters. REINFORCE's last iterate is noisy; the average is not.
    0 turns it off."""


class BaRPNet(nn.Module):
    def __init__(self, context_dim: int, n_arms: int, cfg: BaRPConfig):
        super().__init__()
        self.pref = nn.Sequential(nn.Linear(2, cfg.pref_hidden), nn.ReLU(), nn.Linear(cfg.pref_hidden, cfg.pref_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(context_dim + cfg.pref_dim, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, n_arms))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([x, self.pref(w)], dim=-1))  # logits of pi(. | x, w)


class BaRP(Policy):
    name = "barp"
    learns_from_propensities = True

    def __init__(self, models, context_dim, tau, seed=0, features=None, **config):
        super().__init__(models, context_dim, tau, seed, features=features)
        self.config = BaRPConfig(**config)
        if self.config.baseline not in ("batch_mean", "preference_batch_mean"):
            raise ValueError(f"unknown baseline {self.config.baseline!r}: use batch_mean or preference_batch_mean")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = BaRPNet(self.projected_dim, self.n_arms, self.config)  # h(x): the (projected) embedding
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=self.config.lr)
        self.generator = torch.Generator().manual_seed(seed)
        self.averaged = None
        if self.config.ema_decay > 0:
            self.averaged = torch.optim.swa_utils.AveragedModel(
                self.net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(self.config.ema_decay)
            )

    # ====================================================================================================
    # ALGO LOGIC
    # ====================================================================================================
    def probabilities(self, contexts, preferences, averaged: bool = False) -> np.ndarray:
        """pi(. | x, w) of the live parameters, or of their average (when averaging is on)."""
        x, p = self._check_inputs(contexts, preferences)
        x = self.project(x)
        net = self.averaged.module if averaged and self.averaged is not None else self.net
        with torch.no_grad():
            return torch.softmax(net(torch.from_numpy(x), torch.from_numpy(p).float()), dim=-1).numpy()

    def values(self, contexts, preferences, *, explore=False) -> np.ndarray:
        """pi(. | x, w): of the averaged parameters for the greedy choice, of the live ones while exploring."""
        return self.probabilities(contexts, preferences, averaged=not explore)

    def arm_probabilities(self, contexts, preferences, *, explore=False) -> np.ndarray:
        if not explore:
            return super().arm_probabilities(contexts, preferences)
        return self.probabilities(contexts, preferences).astype(np.float64)

    def select(self, contexts, preferences, *, explore=False) -> Decisions:
        if not explore:
            return deterministic(self.probabilities(contexts, preferences, averaged=True).argmax(axis=1), self.version)
        probs = self.probabilities(contexts, preferences)
        t = torch.from_numpy(probs)
        arms = torch.multinomial(t, 1, generator=self.generator).squeeze(1).numpy()
        return Decisions(arms, probs[np.arange(len(arms)), arms].astype(np.float64), self.version)

    def update(self, batch: BanditBatch) -> dict[str, float]:
        if len(batch) == 0:
            return {}
        x = torch.from_numpy(np.asarray(self.project(np.asarray(batch.contexts, dtype=np.float32)), dtype=np.float32))
        w = torch.from_numpy(np.asarray(batch.preferences, dtype=np.float32))
        arms = torch.from_numpy(np.asarray(batch.arms, dtype=np.int64))
        r = torch.from_numpy(batch.rewards(self.tau)).float()  # r = w_q q - w_c c~
        logp_all = torch.log_softmax(self.net(x, w), dim=-1)
        logp = logp_all.gather(1, arms[:, None]).squeeze(1)  # log pi(a | x, w)
        entropy = -(logp_all.exp() * logp_all).sum(dim=1)  # H(pi(. | x, w))
        rho = logp.detach().exp() / torch.from_numpy(np.asarray(batch.propensities, np.float32))
        rho = rho.clamp(max=self.config.max_importance_weight)  # 1 when on-policy
        advantage = r - self._baseline(batch, w)
        loss = -(rho * advantage * logp).mean() - self.config.entropy_beta * entropy.mean()
        self.optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(self.net.parameters(), self.config.grad_clip)
        self.optimizer.step()
        if self.averaged is not None:
            self.averaged.update_parameters(self.net)
        self.version += 1
        return {"loss": loss.item(), "mean_reward": r.mean().item(), "entropy": entropy.mean().item()}

    def _baseline(self, batch: BanditBatch, w: torch.Tensor) -> torch.Tensor:
        """Leave-one-out: b_i never includes sample i's own outcome (see BaRPConfig.baseline)."""
        q = torch.from_numpy(np.asarray(batch.scores, dtype=np.float32))
        c = torch.from_numpy(normalised_cost(batch.costs, self.tau).astype(np.float32))
        n = len(q)
        if n == 1:
            return torch.zeros(1)
        loo = lambda v: (v.sum() - v) / (n - 1)  # mean of the other n - 1 samples, per sample
        if self.config.baseline == "batch_mean":
            return loo(w[:, 0] * q - w[:, 1] * c)  # b_i = mean_{j != i} r_j
        return w[:, 0] * loo(q) - w[:, 1] * loo(c)  # b_i = w_i . (mean_{j != i} q, -mean_{j != i} c~)

    # ====================================================================================================
    # state
    # ====================================================================================================
    def take_random_state(self, other):
        super().take_random_state(other)
        self.generator = other.generator

    def training_state(self):
        """Adds Adam's per-parameter moments and step counts, the torch Generator that samples arms, and the
        EMA's `n_averaged`, so a restored learner continues exactly (see Policy.training_state)."""
        arrays, meta = super().training_state()
        arrays["generator"] = self.generator.get_state().numpy().copy()
        opt = self.optimizer.state_dict()
        for i, st in opt["state"].items():
            for k, v in st.items():
                arrays[f"optimizer.{i}.{k}"] = v.detach().numpy().copy() if torch.is_tensor(v) else np.asarray(v)
        meta["optimizer"] = {
            "param_groups": [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in opt["param_groups"]],
            "stepped": sorted(int(i) for i in opt["state"]),
        }
        if self.averaged is not None:
            arrays["averaged.n_averaged"] = self.averaged.n_averaged.numpy().copy()
        return arrays, meta

    def load_training_state(self, arrays, meta):
        super().load_training_state(arrays, meta)
        gen = arrays.get("generator")
        ref = self.generator.get_state()
        if gen is None or gen.dtype != np.uint8 or tuple(gen.shape) != tuple(ref.shape):
            raise StateError("training state holds no torch Generator state of the right shape")
        opt_meta = meta.get("optimizer") or {}
        groups, stepped = opt_meta.get("param_groups"), opt_meta.get("stepped", [])
        current = self.optimizer.state_dict()
        if not isinstance(groups, list) or [g.get("params") for g in groups] != [g["params"] for g in current["param_groups"]]:
            raise StateError("training state's optimizer does not fit this network")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        state = {}
        for i in stepped:
            st = {k.split(".", 2)[2]: v for k, v in arrays.items() if k.startswith(f"optimizer.{i}.")}
            if not 0 <= i < len(params) or {"step", "exp_avg", "exp_avg_sq"} - set(st):
                raise StateError(f"training state's optimizer entry {i} is incomplete")
            for k in ("exp_avg", "exp_avg_sq"):
                if tuple(st[k].shape) != tuple(params[i].shape) or not np.isfinite(st[k]).all():
                    raise StateError(f"optimizer {k} of parameter {i} has shape {st[k].shape}, expected {tuple(params[i].shape)}")
            state[i] = {k: torch.from_numpy(np.array(v)) for k, v in st.items()}
        n_avg = arrays.get("averaged.n_averaged")
        if self.averaged is not None and (n_avg is None or n_avg.size != 1):
            raise StateError("training state holds no EMA count")
        groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in groups]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.generator.set_state(torch.from_numpy(gen.copy()))
        if self.averaged is not None:
            self.averaged.n_averaged.fill_(int(n_avg.reshape(())))

    def _params(self):
        params = {k: v.detach().numpy().copy() for k, v in self.net.state_dict().items()}
        if self.averaged is not None:
            params.update({f"averaged.{k}": v.detach().numpy().copy() for k, v in self.averaged.module.state_dict().items()})
        return params

    def _load_params(self, params):
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in params.items()}
        self.net.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("averaged.")})
        if self.averaged is not None:
            self.averaged.module.load_state_dict(
                {k[len("averaged.") :]: v for k, v in tensors.items() if k.startswith("averaged.")}
            )
            self.averaged.n_averaged.fill_(1)  # the next update averages instead of copying
        # New parameters, fresh moments: clear Adam's state in place (the same optimizer object, still bound to
        # the same parameter tensors, which load_state_dict copied into). A learner continuing its own training
        # restores the moments afterwards with load_training_state.
        self.optimizer.state.clear()

    def _config(self):
        return asdict(self.config)
