"""Checks of what the tools made: merge verification, GGUF checks and fidelity, answer checks for eval."""
