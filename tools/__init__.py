"""Offline helper tools for the ReMatch reference implementation (not imported by the model code)."""
