"""Full-information supervised router: the strong offline reference.

Trained on every model's outcome for every training prompt (never a bandit learner). One MLP trunk over
the prompt embedding predicts, per model, the probability of a correct answer (BCE on observed cells) and
the log cost (MSE). At decision time it picks argmax_a w_q * q^_a - w_c * min(c^_a / tau, 1): the same
reward BaRP maximises, so one trained model serves every trade-off, like BaRP.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from banditrouter.policies.base import BanditBatch, Policy, deterministic
from banditrouter.reward import normalised_cost


@dataclass(frozen=True)
class SupervisedConfig:
    hidden: int = 256
    """Hidden width of the shared trunk."""
    dropout: float = 0.1
    """Dropout in the trunk (the training set is small)."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 1e-4
    """Adam weight decay."""
    cost_floor: float = 1e-9
    """Costs are regressed as log(max(c, floor))."""


class SupervisedNet(nn.Module):
    def __init__(self, context_dim: int, n_arms: int, cfg: SupervisedConfig):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(context_dim, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.hidden),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
        )
        self.score_head = nn.Linear(cfg.hidden, n_arms)
        self.cost_head = nn.Linear(cfg.hidden, n_arms)

    def forward(self, x):
        h = self.trunk(x)
        return self.score_head(h), self.cost_head(h)


class SupervisedRouter(Policy):
    name = "supervised"
    full_information = True

    def __init__(self, models, context_dim, tau, seed=0, features=None, **config):
        super().__init__(models, context_dim, tau, seed, features=features)
        self.config = SupervisedConfig(**config)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = SupervisedNet(self.projected_dim, self.n_arms, self.config)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)

    def predict(self, contexts) -> tuple[np.ndarray, np.ndarray]:
        """(n, K) predicted score and cost for raw contexts (projected here when the policy has features)."""
        x = torch.from_numpy(np.asarray(self.project(np.asarray(contexts, dtype=np.float32)), dtype=np.float32))
        self.net.eval()
        with torch.no_grad():
            s, c = self.net(x)
        return torch.sigmoid(s).numpy().astype(np.float64), torch.exp(c).numpy().astype(np.float64)

    def values(self, contexts, preferences, *, explore=False):
        """w_q q^_a - w_c min(c^_a / tau, 1): the predicted reward of each arm."""
        x, p = self._check_inputs(contexts, preferences)
        q, c = self.predict(x)
        return p[:, :1] * q - p[:, 1:] * normalised_cost(c, self.tau)

    def select(self, contexts, preferences, *, explore=False):
        return deterministic(self.values(contexts, preferences).argmax(axis=1), self.version)

    def update(self, batch: BanditBatch) -> dict[str, float]:
        """One gradient step on (context, arm) -> (score, cost) samples; full information means the batch
        holds every arm of each prompt."""
        if len(batch) == 0:
            return {}
        self.net.train()
        x = torch.from_numpy(np.asarray(self.project(np.asarray(batch.contexts, dtype=np.float32)), dtype=np.float32))
        arms = torch.from_numpy(np.asarray(batch.arms, dtype=np.int64))[:, None]
        s_logit, log_c = (t.gather(1, arms).squeeze(1) for t in self.net(x))
        q = torch.from_numpy(np.asarray(batch.scores, dtype=np.float32))
        target_c = torch.log(torch.from_numpy(np.maximum(batch.costs, self.config.cost_floor)).float())
        bce = nn.functional.binary_cross_entropy_with_logits(s_logit, q)
        mse = nn.functional.mse_loss(log_c, target_c)
        loss = bce + mse
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.version += 1
        return {"loss": loss.item(), "bce": bce.item(), "cost_mse": mse.item()}

    def _params(self):
        return {k: v.detach().numpy().copy() for k, v in self.net.state_dict().items()}

    def _load_params(self, params):
        self.net.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)).float() for k, v in params.items()})

    def _config(self):
        return asdict(self.config)
