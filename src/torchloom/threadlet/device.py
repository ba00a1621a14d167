"""Device health samples for failure prediction, taken on the Threadlet's I/O thread.

On a rank with an NVIDIA GPU the sample comes from NVML (``nvidia-ml-py``):
temperature, power, SM clock, hardware/thermal throttling, ECC error counts,
pages pending retirement, and memory use. XID errors are not read here (NVML's
event sets need a blocking wait and, on most hosts, root); the failure policy's XID
rule applies to samples that carry an ``xid`` field (e.g. from a log-scraping exporter). On a CPU host it comes from psutil: CPU use, memory and swap use,
load per CPU, and the hottest sensor where the kernel exposes one. Every read
that fails is left out of the sample instead of failing it.

The ``TORCHLOOM_DEVICE_TRACE`` test aid (:func:`trace_from_env`) overlays a
synthetic degradation on the sample — the failure-prediction tests and ``torchloom sim``
use it; real degradation was not available on the machines this was built on.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("torchloom.threadlet")

ENV_DEVICE_TRACE = "TORCHLOOM_DEVICE_TRACE"
"""Also :data:`torchloom.chaos.ENV_DEVICE_TRACE`, the builder's side."""

Sample = dict[str, float]


def degradation(elapsed_s: float, *, rate: float = 1.0, base_temp_c: float = 70.0) -> Sample:
    """A GPU on its way out, ``elapsed_s`` seconds into its decline (``rate`` speeds it up).

    Temperature climbs from ``base_temp_c`` by 2 °C/s (to 105 °C), corrected ECC errors grow
    quadratically, and from 8 s on the board throttles. The shape follows the
    precursors reported for GPU failures in large fleets (thermal excursions and a
    rising corrected-error rate before uncorrectable errors; e.g. Kokolis et al.,
    "Revisiting Reliability in Large-Scale Machine Learning Research Clusters", 2024).
    """
    t = max(0.0, elapsed_s * rate)
    return {
        "temp_c": min(105.0, base_temp_c + 2.0 * t),
        "ecc_corrected": float(int(0.5 * t * t)),
        "throttle_hw": 1.0 if t >= 8.0 else 0.0,
    }


def trace_from_env(
    replica_id: str, env: Mapping[str, str] | None = None
) -> Callable[[float], Sample] | None:
    """The synthetic degradation for this replica group, from ``TORCHLOOM_DEVICE_TRACE``.

    Format: ``REPLICA:AFTER_S[:RATE]`` items separated by commas — replica group
    ``REPLICA`` starts degrading ``AFTER_S`` seconds after the Threadlet starts.

    Returns:
        ``overlay(now_s)`` giving the fields to put over the real sample (empty
        before the start), or None when this replica group has no trace.
    """
    spec = (env if env is not None else os.environ).get(ENV_DEVICE_TRACE, "")
    for item in filter(None, (x.strip() for x in spec.split(","))):
        parts = item.split(":")
        if parts[0] != replica_id or len(parts) < 2:
            continue
        start = time.time() + float(parts[1])
        rate = float(parts[2]) if len(parts) > 2 else 1.0
        return lambda now: degradation(now - start, rate=rate) if now >= start else {}
    return None


class DeviceSampler:
    """Reads the health of one device (an NVML GPU index, or the CPU host).

    Args:
        device: the rank's device id: an NVML UUID (``GPU-…``) or ``cpu:<host>``.
        overlay: a synthetic trace to lay over each sample (tests, simulation).
    """

    def __init__(self, *, device: str, overlay: Callable[[float], Sample] | None = None) -> None:
        self._overlay = overlay
        self._nvml: Any = None
        self._handle: Any = None
        if device.startswith("GPU-"):
            try:
                import pynvml

                pynvml.nvmlInit()
                self._handle = pynvml.nvmlDeviceGetHandleByUUID(device)
                self._nvml = pynvml
            except Exception as exc:  # no driver, no library, no such device
                log.info("torchloom: NVML not available (%s); sampling the host instead", exc)
                self._nvml = None

    @property
    def source(self) -> str:
        return "nvml" if self._nvml is not None else "host"

    def sample(self, now: float) -> Sample:
        """One sample; fields whose read failed are absent."""
        out = self._nvml_sample() if self._nvml is not None else _host_sample()
        if self._overlay is not None:
            out.update(self._overlay(now))
        return out

    def _nvml_sample(self) -> Sample:
        n, h = self._nvml, self._handle
        out: Sample = {}
        reads: dict[str, Callable[[], float]] = {
            "temp_c": lambda: n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU),
            "power_w": lambda: n.nvmlDeviceGetPowerUsage(h) / 1000.0,
            "sm_clock_mhz": lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
            "throttle_hw": lambda: float(
                bool(
                    n.nvmlDeviceGetCurrentClocksEventReasons(h)
                    & (
                        n.nvmlClocksEventReasonHwSlowdown
                        | n.nvmlClocksEventReasonHwThermalSlowdown
                        | n.nvmlClocksEventReasonSwThermalSlowdown
                    )
                )
            ),
            "ecc_corrected": lambda: n.nvmlDeviceGetTotalEccErrors(
                h, n.NVML_MEMORY_ERROR_TYPE_CORRECTED, n.NVML_VOLATILE_ECC
            ),
            "ecc_uncorrected": lambda: n.nvmlDeviceGetTotalEccErrors(
                h, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC
            ),
            "retired_pages_pending": lambda: float(
                n.nvmlDeviceGetRetiredPagesPendingStatus(h) == n.NVML_FEATURE_ENABLED
            ),
            "mem_used_frac": lambda: _frac(n.nvmlDeviceGetMemoryInfo(h)),
        }
        for name, read in reads.items():
            try:
                out[name] = float(read())
            except Exception:  # not supported on this board or driver
                continue
        return out


def _frac(mem: Any) -> float:
    return float(mem.used) / float(mem.total) if mem.total else 0.0


def _host_sample() -> Sample:
    import psutil

    out: Sample = {}
    try:
        out["cpu_util"] = psutil.cpu_percent(interval=None) / 100.0
        out["mem_used_frac"] = psutil.virtual_memory().percent / 100.0
        out["swap_used_frac"] = psutil.swap_memory().percent / 100.0
        out["load_per_cpu"] = os.getloadavg()[0] / (os.cpu_count() or 1)
    except (OSError, RuntimeError):
        pass
    try:
        temps = psutil.sensors_temperatures()
        readings = [t.current for entries in temps.values() for t in entries if t.current]
        if readings:
            out["temp_c"] = float(max(readings))
    except (AttributeError, OSError, RuntimeError):
        pass
    return out
