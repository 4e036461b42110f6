"""Executors: the multiprocess default with its GPU limit, and the Kubernetes settings."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml
from dagster import (
    DagsterInstance,
    Definitions,
    asset,
    define_asset_job,
    execute_job,
    multiprocess_executor,
)
from dagster._core.definitions.reconstruct import ReconstructableJob

from pipelines import executors
from pipelines.definitions import defs
from pipelines.executors import GPU_BOUND_ASSETS, GPU_OP_TAGS, multiprocess_config, untagged_gpu_assets

K8S_DIR = Path(executors.__file__).resolve().parent / "k8s"
INTERVALS_ENV = "NEWSLXMERT_TEST_INTERVALS_DIR"


def _record_interval(name: str, seconds: float) -> None:
    started = time.time()
    time.sleep(seconds)
    Path(os.environ[INTERVALS_ENV], name).write_text(f"{started} {time.time()}")


@asset(op_tags=GPU_OP_TAGS)
def gpu_step_a():
    _record_interval("gpu_step_a", 1.5)


@asset(op_tags=GPU_OP_TAGS)
def gpu_step_b():
    _record_interval("gpu_step_b", 1.5)


@asset
def cpu_step():
    _record_interval("cpu_step", 1.5)


def gpu_limited_job():
    """Three independent steps, two tagged gpu, under the pipeline's multiprocess settings."""
    config = dict(multiprocess_config(), max_concurrent=3)
    job = define_asset_job("gpu_limited_job", executor_def=multiprocess_executor.configured(config))
    return Definitions(assets=[gpu_step_a, gpu_step_b, cpu_step], jobs=[job]).resolve_job_def("gpu_limited_job")


def test_default_executor_is_multiprocess_with_gpu_limit(monkeypatch):
    monkeypatch.delenv(executors.EXECUTOR_ENV, raising=False)
    monkeypatch.delenv(executors.GPU_STEPS_ENV, raising=False)

    executor = executors.executor_from_env()

    assert executor.name == "multiprocess"
    assert multiprocess_config()["tag_concurrency_limits"] == [{"key": "dagster/concurrency_key", "value": "gpu", "limit": 1}]
    assert defs.resolve_job_def("nytimes800k_article_stages_job").executor_def.name == "multiprocess"


def test_gpu_steps_setting_is_read_and_checked(monkeypatch):
    monkeypatch.setenv(executors.GPU_STEPS_ENV, "2")
    assert multiprocess_config()["tag_concurrency_limits"][0]["limit"] == 2

    monkeypatch.setenv(executors.GPU_STEPS_ENV, "zero")
    with pytest.raises(ValueError, match="NEWSLXMERT_GPU_STEPS"):
        multiprocess_config()


def test_unknown_executor_name_is_rejected(monkeypatch):
    monkeypatch.setenv(executors.EXECUTOR_ENV, "celery")

    with pytest.raises(ValueError, match="multiprocess, in_process or k8s"):
        executors.executor_from_env()


def test_gpu_steps_never_overlap(tmp_path, monkeypatch):
    monkeypatch.setenv(INTERVALS_ENV, str(tmp_path))

    with DagsterInstance.get() as instance:
        # Step processes import this file by path: the tests folder is not a package.
        result = execute_job(ReconstructableJob.for_file(__file__, "gpu_limited_job"), instance=instance)

    assert result.success
    intervals = {path.name: tuple(map(float, path.read_text().split())) for path in tmp_path.iterdir()}
    assert set(intervals) == {"gpu_step_a", "gpu_step_b", "cpu_step"}
    (first_start, first_end), (second_start, _) = sorted([intervals["gpu_step_a"], intervals["gpu_step_b"]])
    assert second_start >= first_end, f"gpu steps overlapped: {intervals}"


def test_gpu_bound_assets_carry_the_gpu_tag():
    from pipelines.definitions import all_assets

    untagged = untagged_gpu_assets(all_assets)

    assert untagged == [], f"add op_tags={GPU_OP_TAGS} to these GPU-bound assets: {untagged}"


def test_untagged_gpu_asset_is_reported():
    @asset(key=["nytimes800k", "region_features"])
    def plain_regions():
        return None

    @asset(key=["newsimages", "face_features"], op_tags=GPU_OP_TAGS)
    def tagged_faces():
        return None

    assert untagged_gpu_assets([plain_regions, tagged_faces]) == ["nytimes800k/region_features"]


# ---------------------------------------------------------------- Kubernetes


FAKE_KUBECONFIG = """\
apiVersion: v1
kind: Config
clusters:
  - name: offline
    cluster: {server: "https://127.0.0.1:6443"}
users:
  - name: tester
    user: {token: not-a-secret}
contexts:
  - name: offline
    context: {cluster: offline, user: tester}
current-context: offline
"""


@pytest.fixture
def kubeconfig(tmp_path, monkeypatch):
    """A kubeconfig naming a cluster that is never contacted: the tests only build objects."""
    pytest.importorskip("dagster_k8s", reason="dagster-k8s is not installed; pip install -e '.[k8s]'")
    path = tmp_path / "kubeconfig"
    path.write_text(FAKE_KUBECONFIG)
    monkeypatch.setenv("NEWSLXMERT_IMAGE", "registry.example.org/newslxmert:1.0")
    return path


def test_k8s_executor_settings_validate(kubeconfig, monkeypatch):
    from dagster._config import process_config
    from dagster_k8s import k8s_job_executor

    settings = executors.load_k8s_executor_config()
    processed = process_config(k8s_job_executor.config_schema.config_type, settings)
    monkeypatch.setenv(executors.EXECUTOR_ENV, "k8s")

    assert processed.success, processed.errors
    assert processed.value["job_image"] == "registry.example.org/newslxmert:1.0"
    assert executors.executor_from_env().name == "k8s"


def test_k8s_executor_rejects_invalid_settings(kubeconfig, tmp_path):
    broken = tmp_path / "executor.yaml"
    broken.write_text(yaml.safe_dump({"job_namespace": "newslxmert", "max_concurent": 3}))

    with pytest.raises(ValueError, match="max_concurent"):
        executors.k8s_executor(broken)


def test_k8s_per_step_settings_name_real_ops(kubeconfig):
    settings = executors.load_k8s_executor_config()
    gpu_ops = {"__".join(path) for path in GPU_BOUND_ASSETS}
    image_ops = {"nytimes800k__images", "newsimages__images"}

    assert set(settings["per_step_k8s_config"]) == gpu_ops | image_ops


def _step_pod_spec(kubeconfig: Path, op_name: str):
    """The Kubernetes Job that the executor would create for one step, built without a cluster."""
    from dagster._config import process_config
    from dagster._core.definitions.job_base import InMemoryJob
    from dagster._core.executor.init import InitExecutorContext
    from dagster_k8s import K8sRunLauncher, k8s_job_executor
    from dagster_k8s.container_context import K8sContainerContext
    from dagster_k8s.job import UserDefinedDagsterK8sConfig, construct_dagster_k8s_job

    settings = dict(executors.load_k8s_executor_config(), load_incluster_config=False, kubeconfig_file=str(kubeconfig))
    processed = process_config(k8s_job_executor.config_schema.config_type, settings)
    assert processed.success, processed.errors

    instance_settings = yaml.safe_load((K8S_DIR / "dagster.yaml").read_text())
    launcher_settings = dict(instance_settings["run_launcher"]["config"], load_incluster_config=False, kubeconfig_file=str(kubeconfig))
    launcher_processed = process_config(K8sRunLauncher.config_type(), launcher_settings)
    assert launcher_processed.success, launcher_processed.errors
    launcher = K8sRunLauncher(**launcher_processed.value)

    job_def = defs.resolve_job_def("nytimes800k_article_stages_job")
    init_context = InitExecutorContext(
        job=InMemoryJob(job_def), executor_def=k8s_job_executor, executor_config=processed.value, instance=DagsterInstance.ephemeral()
    )
    step_executor = k8s_job_executor.executor_creation_fn(init_context)
    handler = step_executor._step_handler  # noqa: SLF001 - the handler holds the merged settings

    # The same merge as K8sStepHandler._get_container_context, minus the run's own tags.
    container_context = handler._executor_container_context.merge(  # noqa: SLF001
        K8sContainerContext(run_k8s_config=UserDefinedDagsterK8sConfig.from_dict(handler._per_step_k8s_config.get(op_name, {})))  # noqa: SLF001
    )
    job_config = container_context.get_k8s_job_config(handler._executor_image, launcher)  # noqa: SLF001
    k8s_job = construct_dagster_k8s_job(
        job_config=job_config,
        args=["dagster", "api", "execute_step"],
        job_name="dagster-step-test",
        pod_name="dagster-step-test",
        component="step_worker",
        user_defined_k8s_config=container_context.run_k8s_config,
    )
    return container_context, k8s_job.spec.template.spec


def test_k8s_gpu_step_pod_requests_a_gpu(kubeconfig):
    container_context, pod = _step_pod_spec(kubeconfig, "nytimes800k__region_features")
    (container,) = pod.containers

    assert container_context.namespace == "newslxmert"
    assert container.image == "registry.example.org/newslxmert:1.0"
    assert str(container.resources.limits["nvidia.com/gpu"]) == "1"
    assert pod.node_selector == {"newslxmert/accelerator": "gpu"}
    assert [mount.mount_path for mount in container.volume_mounts if mount.name == "data"] == ["/data"]
    assert {"name": "NEWSLXMERT_DATA_ROOT", "value": "/data"} in [{"name": e.name, "value": e.value} for e in container.env]
    assert [source.secret_ref.name for source in container.env_from if source.secret_ref] == ["newslxmert-mongo"]


def test_k8s_cpu_step_pod_has_no_gpu(kubeconfig):
    _, pod = _step_pod_spec(kubeconfig, "nytimes800k__articles")
    (container,) = pod.containers

    assert "nvidia.com/gpu" not in (container.resources.limits or {})
    assert container.resources.requests == {"cpu": "2", "memory": "8Gi"}
