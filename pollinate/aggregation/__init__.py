"""Aggregation rules as pure torch functions; nothing here imports Flower."""

from pollinate.aggregation.fedavg import normalised_weights, weighted_average

__all__ = ["normalised_weights", "weighted_average"]
