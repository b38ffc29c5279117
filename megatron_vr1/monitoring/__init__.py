"""Monitoring: metrics sinks (`sinks`: JSONL, TensorBoard, optional W&B; rank 0 writes) and the
`megatron-vr1 report` PNG (`report`, imported on use: it needs matplotlib)."""

from megatron_vr1.monitoring.sinks import (
    SECTIONS,
    JsonlSink,
    MetricsSink,
    MultiSink,
    NullSink,
    TensorBoardSink,
    WandbSink,
    check_key,
    make_sink,
)

__all__ = [
    "SECTIONS",
    "JsonlSink",
    "MetricsSink",
    "MultiSink",
    "NullSink",
    "TensorBoardSink",
    "WandbSink",
    "check_key",
    "make_sink",
]
