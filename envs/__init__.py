"""Gymnasium environments over routing logs, registered for gymnasium and RLlib."""

from envs.queueing import ENV_ID as QUEUEING_ENV_ID
from envs.queueing import RLLIB_ENV_NAME as QUEUEING_RLLIB_ENV_NAME
from envs.queueing import QueueingEnv, make_queueing_env
from envs.queueing import register as register_queueing
from envs.routing import ENV_ID, RLLIB_ENV_NAME, RoutingEnv, make_routing_env
from envs.routing import register as register_routing


def register() -> None:
    """Register every env (RoutingEnv, QueueingEnv) with gymnasium and, when Ray is installed, with RLlib."""
    register_routing()
    register_queueing()


__all__ = [
    "ENV_ID",
    "QUEUEING_ENV_ID",
    "QUEUEING_RLLIB_ENV_NAME",
    "RLLIB_ENV_NAME",
    "QueueingEnv",
    "RoutingEnv",
    "make_queueing_env",
    "make_routing_env",
    "register",
]
