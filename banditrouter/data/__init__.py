"""Routing logs: one in-memory form (`RoutingLog`) and the loaders that fill it."""

from banditrouter.data.loaders import DATASETS, DataError, load_dataset, load_jsonl, load_llmrouter, load_routerbench
from banditrouter.data.log import RoutingLog
from banditrouter.data.paths import resolve_data_dir

__all__ = [
    "DATASETS",
    "DataError",
    "RoutingLog",
    "load_dataset",
    "load_jsonl",
    "load_llmrouter",
    "load_routerbench",
    "resolve_data_dir",
]
