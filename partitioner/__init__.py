"""Layer 3, decide: the cost model, the Pareto search, fidelity runs and the planner.

Reads measured profiles (``splitpoint.profiles``) and the core's graph cutting; writes nothing but
plans (through ``splitpoint.core.plandir``). Nothing here opens a socket.
"""
