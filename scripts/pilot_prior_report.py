"""Held-out pairwise accuracy of a PILOT checkpoint's prior, with references; and a short online run."""

import json
import sys

import numpy as np

from banditrouter.data import load_dataset
from banditrouter.pipeline import load_split
from banditrouter.policies import BanditBatch, load_checkpoint, make_policy, untrained_like
from banditrouter.prior import mean_order_accuracy, pairwise_accuracy, preference_pairs, untrained_prior

dataset, ckpt = sys.argv[1], sys.argv[2]
pol = load_checkpoint(ckpt, expect="pilot")
train_log = load_dataset(dataset, "train").with_models(pol.models)
test = load_split(dataset, "test", progress=False)
log = test.log.with_models(pol.models)
x = test.contexts
out = {
    "dataset": dataset,
    "n_test": len(log),
    "n_test_pairs": int(len(preference_pairs(log.scores)[0])),
    "prior_calibrated": pairwise_accuracy(pol.prior, log, x),
    "prior_cosine": pairwise_accuracy(pol.prior, log, x, calibrated=False),
    "untrained_prior": pairwise_accuracy(untrained_prior(pol.models, pol.context_dim, pol.prior.dim), log, x, calibrated=False),
    "train_mean_order": mean_order_accuracy(train_log, log),
    "prior_train_pairwise_accuracy": pol.prior.meta["train_pairwise_accuracy"],
    "prior_train_seconds": pol.prior.meta["train_seconds"],
}


# online over the test stream in a seeded random order, w = (1, 0), one update per prompt: mean score
def online(p, order, n=None):
    p, got = untrained_like(p), []
    for i in order[:n]:
        r = np.array([i])
        a = p.select(x[r], np.array([[1.0, 0.0]]), explore=True).arms
        s, c = log.scores[r, a], log.costs[r, a]
        if np.isfinite(s).all() and np.isfinite(c).all():
            p.update(BanditBatch(x[r], np.array([[1.0, 0.0]]), a, np.ones(1), s, c))
        got.append(s[0])
    return np.asarray(got, dtype=float)


order = np.random.default_rng(0).permutation(len(log))
lin = make_policy("linucb", pol.models, pol.context_dim, pol.tau)
cold = make_policy("pilot", pol.models, pol.context_dim, pol.tau, prior_dim=pol.prior.dim)
for name, p in (("pilot", pol), ("pilot_untrained_prior", cold), ("linucb", lin)):
    s = online(p, order)
    out[f"online_{name}"] = {"first_100": round(float(np.nanmean(s[:100])), 4), "all": round(float(np.nanmean(s)), 4)}
out["best_single_test"] = round(float(np.nanmax(np.nanmean(log.scores, axis=0))), 4)
out["oracle_test"] = round(float(np.nanmean(np.nanmax(log.scores, axis=1))), 4)
print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}, indent=1))
