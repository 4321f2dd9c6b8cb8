"""Graph cutting: an index over the ONNX graph, every valid cut of a DAG, and head/tail extraction.

It lives in the core because both the profiler (which times real segments) and the partitioner (which
plans cuts) need it, and neither may import the other.
"""

from .cuts import Cut, enumerate_cuts, resolve_cut
from .index import GraphIndex
from .model import ModelHandle, open_model

__all__ = ["Cut", "GraphIndex", "ModelHandle", "enumerate_cuts", "open_model", "resolve_cut"]
