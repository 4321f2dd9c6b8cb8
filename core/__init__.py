"""Layer 1, the core both sides speak: plan format, cut-tensor codecs, wire framing, graph cutting and
extraction, ONNX I/O, sessions, telemetry publishing, the model zoo and the errors.

It imports no other SplitPoint layer, so the edge, the server, the profiler and the partitioner can all
depend on it without depending on each other.
"""
