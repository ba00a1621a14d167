"""The Weaver: the central controller. Never imports torch."""

from torchloom.weaver.control import ControlSettings
from torchloom.weaver.service import Weaver
from torchloom.weaver.state import LivenessConfig

__all__ = ["ControlSettings", "LivenessConfig", "Weaver"]
