"""The Kubernetes manifests in deploy/k8s, validated against the Kubernetes API schemas
(kubernetes-validate, offline; no cluster is available here). The JobSet is a custom
resource: its Job templates are validated as batch/v1 Jobs, and its shape checked here."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from torchloom.scheduler import KubernetesScheduler, SlurmScheduler, cordon_patch

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
VERSION = "1.33.0"


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


@pytest.mark.parametrize("name", ["weaver.yaml", "follower.yaml"])
def test_core_manifests_are_valid_kubernetes_objects(name):
    found = docs(name)
    assert found
    for doc in found:
        kubernetes_validate.validate(doc, VERSION, strict=True)


def test_the_weaver_runs_twice_against_the_nats_cluster_with_a_token():
    weaver = next(d for d in docs("weaver.yaml") if d["metadata"]["name"] == "torchloom-weaver")
    assert weaver["spec"]["replicas"] == 2  # a leader and a standby (the KV lease)
    container = weaver["spec"]["template"]["spec"]["containers"][0]
    assert "--nats-url" in container["command"] and "up" in container["command"]
    assert any(e["name"] == "TORCHLOOM_UI_TOKEN" for e in container["env"])


def test_the_jobset_gives_every_group_what_torchloom_and_torchft_need():
    (jobset,) = docs("training-jobset.yaml")
    assert jobset["kind"] == "JobSet" and jobset["apiVersion"].startswith("jobset.x-k8s.io/")
    (group,) = jobset["spec"]["replicatedJobs"]
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "group"},
           "spec": group["template"]["spec"]}  # fmt: skip
    kubernetes_validate.validate(job, VERSION, strict=True)
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"TORCHLOOM_NATS_URL", "TORCHFT_LIGHTHOUSE", "TORCHLOOM_JOB", "REPLICA_GROUP_ID",
            "NUM_REPLICA_GROUPS", "TORCHLOOM_HOST"} <= set(env)  # fmt: skip
    assert int(env["NUM_REPLICA_GROUPS"]["value"]) == group["replicas"]
    index = env["REPLICA_GROUP_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert "jobset.sigs.k8s.io/job-index" in index


def test_an_invalid_manifest_is_refused():
    (jobset,) = docs("training-jobset.yaml")
    bad = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "g"},
           "spec": {**jobset["spec"]["replicatedJobs"][0]["template"]["spec"], "parallelism": "two"}}  # fmt: skip
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSION, strict=True)


def test_nats_values_ask_for_a_three_server_jetstream_cluster():
    values = yaml.safe_load((K8S / "nats-values.yaml").read_text())
    assert values["config"]["cluster"] == {"enabled": True, "replicas": 3}
    assert values["config"]["jetstream"]["enabled"] is True


def test_kubernetes_adapter_selects_a_groups_pods_by_jobset_labels_and_cordons_like_kubectl():
    k = KubernetesScheduler(jobset="mnist", namespace="torchloom")
    assert k.selector(1) == ("jobset.sigs.k8s.io/jobset-name=mnist,jobset.sigs.k8s.io/job-index=1")
    assert cordon_patch() == {"spec": {"unschedulable": True}}


def test_slurm_adapter_runs_one_node_one_task_and_keeps_off_drained_nodes(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda _: "/usr/bin/srun")
    argv = SlurmScheduler(partition="gpu").argv(
        name="torchloom-j-r0", script=["train.py", "--ft"], nproc=4, exclude=["n2", "n1"]
    )
    assert argv[:6] == ["srun", "--job-name=torchloom-j-r0", "--nodes=1", "--ntasks=1",
                        "--cpus-per-task=4", "--kill-on-bad-exit=1"]  # fmt: skip
    assert "--partition=gpu" in argv and "--exclude=n1,n2" in argv
    assert argv[-2:] == ["train.py", "--ft"] and "--nproc-per-node=4" in argv
