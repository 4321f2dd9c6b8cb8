"""SplitPoint: split an ONNX model between an edge device and a server, chosen from measurements.

The namespace root. Each layer is a top-level folder of the repository, mapped here once installed;
each imports only the layers below it (``docs/architecture.md``, enforced by ``lint-imports``):

5. ``splitpoint.app``          (``app/``)          the CLI, demo, bench and orchestrator
4. ``splitpoint.edge``, ``splitpoint.server``      (``edge/``, ``server/``)  run: never each other
3. ``splitpoint.partitioner``  (``partitioner/``)  decide: cost model, Pareto search, planner
2. ``splitpoint.profiles``     (``profiles/``)     measure: profiler, device and network profiles
1. ``splitpoint.core``         (``core/``)         what both sides speak: plan, codecs, wire, graph cutting
"""

__version__ = "0.1.0"
