"""Federated training (Flower 1.42): ServerApp/ClientApp, held-out-aware strategies, checkpoints."""
