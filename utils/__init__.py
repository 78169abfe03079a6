"""Base-model constitutional-AI bootstrap: all importable logic lives in this package.

Scripts in ``scripts/`` are thin entry points over these modules. Pure modules (prompts,
critic scoring maths, qc, dedup, stats, verifiable checks) import no torch.
"""
