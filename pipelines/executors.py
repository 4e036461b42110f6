"""The executor that runs the steps of every job, chosen by ``NEWSLXMERT_EXECUTOR``.

- ``multiprocess`` (default): each step in its own process on this machine. Steps tagged
  ``dagster/concurrency_key: gpu`` (region and face extraction, translation, training,
  evaluation) run at most ``NEWSLXMERT_GPU_STEPS`` (default 1) at a time within a run, so
  two GPU steps never share one device's memory. The same tag names the instance-wide
  pool ``gpu``, which limits GPU steps across concurrent runs (``concurrency: pools:`` in
  ``$DAGSTER_HOME/dagster.yaml``, or ``dagster instance concurrency set gpu 1``).
- ``in_process``: every step in the run's process, for debugging with breakpoints.
- ``k8s``: dagster-k8s's ``k8s_job_executor``, one Kubernetes Job per step, configured by
  ``pipelines/k8s/executor.yaml`` (or the file in ``NEWSLXMERT_K8S_EXECUTOR_CONFIG``).
  Needs the ``k8s`` extra: ``pip install -e '.[k8s]'``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dagster import in_process_executor, multiprocess_executor

EXECUTOR_ENV = "NEWSLXMERT_EXECUTOR"
GPU_STEPS_ENV = "NEWSLXMERT_GPU_STEPS"
MAX_CONCURRENT_ENV = "NEWSLXMERT_MAX_CONCURRENT_STEPS"
K8S_CONFIG_ENV = "NEWSLXMERT_K8S_EXECUTOR_CONFIG"

CONCURRENCY_KEY_TAG = "dagster/concurrency_key"
GPU_POOL = "gpu"
# Op tags that a GPU-bound asset sets: @asset(op_tags=GPU_OP_TAGS, ...).
GPU_OP_TAGS = {CONCURRENCY_KEY_TAG: GPU_POOL}

# Assets whose compute runs on the GPU when one is present.
GPU_BOUND_ASSETS = (
    ("nytimes800k", "region_features"),
    ("nytimes800k", "face_features"),
    ("nytimes800k", "pretrained_model"),
    ("nytimes800k", "evaluation"),
    ("newsimages", "translated_articles"),
    ("newsimages", "region_features"),
    ("newsimages", "face_features"),
    ("newsimages", "finetuned_model"),
    ("newsimages", "evaluation"),
)

K8S_EXECUTOR_CONFIG = Path(__file__).resolve().parent / "k8s" / "executor.yaml"


def untagged_gpu_assets(assets_defs) -> list[str]:
    """Keys of the GPU-bound assets among ``assets_defs`` whose op lacks the gpu concurrency tag."""
    gpu_keys = {"/".join(path) for path in GPU_BOUND_ASSETS}
    untagged = []
    for assets_def in assets_defs:
        if not getattr(assets_def, "is_executable", False):
            continue
        for key in assets_def.keys:
            name = key.to_user_string()
            if name in gpu_keys and assets_def.op.tags.get(CONCURRENCY_KEY_TAG) != GPU_POOL:
                untagged.append(name)
    return sorted(untagged)


def _positive_int_env(name: str, default: int | None) -> int | None:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer; set it to a whole number of steps") from None
    if value < 1:
        raise ValueError(f"{name}={raw!r} must be at least 1")
    return value


def multiprocess_config() -> dict[str, Any]:
    """Configuration of the multiprocess executor from the environment."""
    config: dict[str, Any] = {
        "tag_concurrency_limits": [
            {"key": CONCURRENCY_KEY_TAG, "value": GPU_POOL, "limit": _positive_int_env(GPU_STEPS_ENV, 1)},
        ],
    }
    max_concurrent = _positive_int_env(MAX_CONCURRENT_ENV, None)
    if max_concurrent is not None:
        config["max_concurrent"] = max_concurrent
    return config


def load_k8s_executor_config(path: Path | str | None = None) -> dict[str, Any]:
    """Read the k8s executor's settings (a YAML mapping) from ``path`` or the default file."""
    import yaml

    path = Path(path or os.environ.get(K8S_CONFIG_ENV) or K8S_EXECUTOR_CONFIG)
    if not path.is_file():
        raise FileNotFoundError(f"k8s executor settings {path} not found; set {K8S_CONFIG_ENV} to a YAML file")
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(config, dict):
        raise ValueError(f"k8s executor settings {path} must be a YAML mapping, got {type(config).__name__}")
    return config


def k8s_executor(path: Path | str | None = None):
    """dagster-k8s's ``k8s_job_executor`` with the settings file applied.

    The settings are checked against the executor's schema here, when the code location
    loads, rather than when the first run starts.
    """
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError:
        raise ImportError(f"{EXECUTOR_ENV}=k8s needs dagster-k8s; install it with pip install -e '.[k8s]'") from None
    from dagster._config import validate_config

    settings = load_k8s_executor_config(path)
    result = validate_config(k8s_job_executor.config_schema.config_type, settings)
    if not result.success:
        messages = "; ".join(error.message for error in result.errors)
        raise ValueError(f"invalid k8s executor settings in {path or K8S_EXECUTOR_CONFIG}: {messages}")
    return k8s_job_executor.configured(settings, name="k8s")


def executor_from_env():
    """The executor named by ``NEWSLXMERT_EXECUTOR``: multiprocess (default), in_process or k8s."""
    name = os.environ.get(EXECUTOR_ENV, "multiprocess").strip().lower()
    if name == "multiprocess":
        return multiprocess_executor.configured(multiprocess_config(), name="multiprocess")
    if name == "in_process":
        return in_process_executor
    if name == "k8s":
        return k8s_executor()
    raise ValueError(f"{EXECUTOR_ENV}={name!r} is not an executor; use multiprocess, in_process or k8s")
