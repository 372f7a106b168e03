"""Initialization of converted layers by distillation from the original network."""
