"""Gymnasium environments over routing logs, registered for gymnasium and RLlib."""

from envs.routing import ENV_ID, RLLIB_ENV_NAME, RoutingEnv, make_routing_env, register

__all__ = ["ENV_ID", "RLLIB_ENV_NAME", "RoutingEnv", "make_routing_env", "register"]
