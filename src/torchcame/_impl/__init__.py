"""CAME step implementations: reference (per tensor), multi-tensor (foreach) and fused.

All share one signature, ``step_*(params, grads, states, args)``, and give the same result.
"""
