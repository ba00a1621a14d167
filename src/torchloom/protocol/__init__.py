"""The wire protocol: message structs, names, the knob registry, codec. Pure, no I/O."""

from torchloom.protocol.codec import MAX_MESSAGE_BYTES, decode, encode, from_builtins, to_builtins
from torchloom.protocol.config import resolve_values, select_snapshot
from torchloom.protocol.knobs import BUILTIN_KNOBS, KnobSpec, coerce, coerce_all
from torchloom.protocol.messages import (
    CHANGE_OPS,
    LIMITED_OPS,
    SCHEMA_VERSION,
    CheckpointOrder,
    CheckpointRecord,
    ConfigSnapshot,
    ControlReply,
    ControlRequest,
    DesiredConfig,
    ErrorInfo,
    HistoryEvent,
    JoinInfo,
    MetricPoint,
    RankEvent,
    RegistryEntry,
    Telemetry,
)

__all__ = [
    "BUILTIN_KNOBS",
    "CHANGE_OPS",
    "LIMITED_OPS",
    "MAX_MESSAGE_BYTES",
    "SCHEMA_VERSION",
    "CheckpointOrder",
    "CheckpointRecord",
    "ConfigSnapshot",
    "ControlReply",
    "ControlRequest",
    "DesiredConfig",
    "ErrorInfo",
    "HistoryEvent",
    "JoinInfo",
    "KnobSpec",
    "MetricPoint",
    "RankEvent",
    "RegistryEntry",
    "Telemetry",
    "coerce",
    "coerce_all",
    "decode",
    "encode",
    "from_builtins",
    "resolve_values",
    "select_snapshot",
    "to_builtins",
]
