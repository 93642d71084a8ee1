"""banditrouter: route each LLM request to the model that best fits the caller's quality/cost trade-off,
and learn from bandit feedback while serving.

The core package holds what serving (`deployments/`), online learning (`learner/`) and offline training
(`envs/`) share: routing logs and their loaders, the policy contract and the policies, the reward,
evaluation and the CLI. Heavy dependencies (torch, sentence-transformers, ray) are imported inside the
modules that need them, never here.
"""

__version__ = "0.1.0"
