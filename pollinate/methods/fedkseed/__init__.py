"""FedKSeed: zeroth-order fine-tuning that speaks in (seed, scalar) pairs (docs/methods.md, "FedKSeed")."""
