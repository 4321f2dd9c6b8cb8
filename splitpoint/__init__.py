"""SplitPoint: split an ONNX model between an edge device and a server, chosen from measurements.

The root package is the shared core that both sides speak: plan format, cut-tensor codecs,
wire framing, telemetry, the model zoo and the CLI entry point. The edge daemon, the server,
the partitioner and the profiler live in the sub-packages ``splitpoint.edge``,
``splitpoint.server``, ``splitpoint.partitioner`` and ``splitpoint.profiles``.
"""

__version__ = "0.1.0"
