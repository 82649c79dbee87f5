"""Baselines that no maintained package runs here, implemented on lords' tensors (see each module's check)."""
