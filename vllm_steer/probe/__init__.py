"""Answer probes ("action confidence") over reasoning trajectories on prefix-cached forks."""

from vllm_steer.probe.choices import ChoiceSet, ProbeError
from vllm_steer.probe.job import ProbeConfig, ProbeJob, Trajectory, replay_spec
from vllm_steer.probe.reading import Reading
from vllm_steer.probe.run import (
    SweepResult,
    build_prompt,
    pearson,
    probe,
    probe_once,
    run_job_async,
    sweep,
)

__all__ = [
    "ChoiceSet", "ProbeConfig", "ProbeError", "ProbeJob", "Reading", "SweepResult",
    "Trajectory", "build_prompt", "pearson", "probe", "probe_once", "replay_spec",
    "run_job_async", "sweep",
]
