"""Answer probes ("action confidence") over reasoning trajectories on prefix-cached forks.

Public: ``probe`` (fork trajectories every N tokens or at reasoning steps and read each
point), ``probe_once``,
``sweep`` (a vector's scale against the reading), ``live_generate`` (live probes of
generating requests, with early exit), their configs and results.

Modules: ``choices`` (answer variants), ``config`` (``ProbeConfig``), ``prompts``,
``triggers`` (when to fork: every N tokens or reasoning steps, decided as tokens arrive),
``forks`` (where a fork goes, its text and steering), ``point`` (one point's requests and
reading, round by round), ``job`` (a batch job's requests and readings, by stage),
``reading``, ``drivers`` (sync/async runs, ``probe``, ``probe_once``), ``live_state``
(engine-free state of probes of served requests: points decided as a sequence grows,
early exit), ``live_drivers`` (their drivers: ``LiveRun`` on an async engine,
``live_generate`` on ``vllm.LLM``), ``sweep``, ``questions`` (question files), ``plot``,
``monitor`` (``vllm-steer monitor``), ``cli``.
"""

from vllm_steer.probe.choices import ProbeError
from vllm_steer.probe.config import ProbeConfig
from vllm_steer.probe.drivers import probe, probe_once
from vllm_steer.probe.job import Trajectory
from vllm_steer.probe.live_drivers import LiveResult, live_generate
from vllm_steer.probe.live_state import LiveProbeConfig, StopWhen
from vllm_steer.probe.prompts import build_prompt
from vllm_steer.probe.reading import Reading
from vllm_steer.probe.sweep import SweepResult, sweep
from vllm_steer.probe.triggers import DEFAULT_MARKERS

__all__ = [
    "DEFAULT_MARKERS", "LiveProbeConfig", "LiveResult", "ProbeConfig", "ProbeError",
    "Reading", "StopWhen", "SweepResult", "Trajectory", "build_prompt", "live_generate",
    "probe", "probe_once", "sweep",
]
