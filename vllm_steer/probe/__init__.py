"""Answer probes ("action confidence") over reasoning trajectories on prefix-cached forks.

Modules: ``choices`` (answer variants), ``config`` (``ProbeConfig``), ``prompts``,
``forks`` (fork points, fork text and steering), ``point`` (one point's requests and
reading, round by round), ``job`` (a batch job's requests and readings, by stage),
``reading``, ``drivers`` (sync/async runs, ``probe``, ``probe_once``), ``live`` (probes of
served requests: points decided as a sequence grows, early exit), ``live_run`` (their
drivers: ``LiveRun`` on an async engine, ``live_generate`` on ``vllm.LLM``), ``sweep``,
``questions`` (question files), ``plot``, ``monitor`` (``vllm-steer monitor``), ``cli``.
"""

from vllm_steer.probe.choices import ChoiceSet, ProbeError
from vllm_steer.probe.config import ProbeConfig
from vllm_steer.probe.drivers import probe, probe_once, run_job, run_job_async
from vllm_steer.probe.forks import fork_spec, replay_spec
from vllm_steer.probe.job import ProbeJob, Trajectory
from vllm_steer.probe.live import LiveProbeConfig, StopWhen
from vllm_steer.probe.live_run import LiveResult, live_generate
from vllm_steer.probe.prompts import build_prompt
from vllm_steer.probe.reading import Reading
from vllm_steer.probe.sweep import SweepResult, sweep
from vllm_steer.stats import pearson

__all__ = [
    "ChoiceSet", "LiveProbeConfig", "LiveResult", "ProbeConfig", "ProbeError", "ProbeJob",
    "Reading", "StopWhen", "SweepResult", "Trajectory", "build_prompt", "fork_spec",
    "live_generate", "pearson", "probe", "probe_once", "replay_spec", "run_job",
    "run_job_async", "sweep",
]
