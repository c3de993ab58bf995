"""cluster/: the cluster-launcher configs, the KubeRay manifests, the commands they run, and a real 2-node job.

- Cluster-launcher YAML: validated by Ray's own schema (ray/autoscaler/ray-schema.json, via the launcher's own
  prepare_config + validate_config).
- KubeRay manifests: validated against the vendored KubeRay ray.io/v1 schemas in tests/schemas/ (see the README
  there for versions and sources), strictly: an unknown field is an error, as with `kubectl apply --validate=strict`.
- Entrypoints: every command a manifest or config runs exists and starts (`--help`, config dry runs, Serve import).
- A local multi-node Ray (`ray start --head` + `ray start --address` on loopback) runs `dpsynth train` to a
  certificate through `ray job submit`.
"""

from __future__ import annotations

import copy
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from dpsynth.release import owner_path

jsonschema = pytest.importorskip("jsonschema")
referencing = pytest.importorskip("referencing")

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
SCHEMAS = Path(__file__).parent / "schemas"
LAUNCHER_CONFIGS = sorted(CLUSTER.glob("*.yaml"))
LAUNCHER_CONFIGS = [p for p in LAUNCHER_CONFIGS if "provider" in (yaml.safe_load(p.read_text()) or {})]
MANIFESTS = sorted((CLUSTER / "kuberay").glob("*.yaml"))
IMAGE_ROOT = "/home/ray/dpsynth"  # where cluster/Dockerfile puts this repository
BIN = Path(sys.executable).parent


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


# ---------------------------------------------------------------- cluster launcher (AWS, GCP)


def test_there_are_launcher_configs_for_aws_and_gcp():
    assert {yaml.safe_load(p.read_text())["provider"]["type"] for p in LAUNCHER_CONFIGS} == {"aws", "gcp"}


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_validates_against_rays_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    schema = json.loads((Path(__import__("ray.autoscaler").autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)  # as written
    validate_config(prepare_config(copy.deepcopy(raw)))  # as `ray up` fills it out and checks it


def test_launcher_schema_check_is_not_vacuous():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(LAUNCHER_CONFIGS[0].read_text())
    raw["available_node_types"]["gpu_worker"]["min_worker"] = 1  # typo
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(raw))


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_config_installs_the_project_like_the_readme_and_keeps_ports_closed(path):
    cfg = yaml.safe_load(path.read_text())
    setup = " && ".join(cfg["setup_commands"])
    assert "cd ~/dpsynth && make setup" in setup  # the README's own install (Makefile `setup`)
    assert cfg["file_mounts"] == {"~/dpsynth": "."}  # this checkout, on every node
    workers = {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}
    assert workers and all(v["resources"].get("GPU", 0) >= 1 and v["min_workers"] <= v["max_workers"] for v in workers.values())
    assert "security_group" not in cfg["provider"] and "firewall" not in json.dumps(cfg)  # nothing opened beyond the defaults
    starts = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    assert "0.0.0.0" not in starts  # the dashboard / job API stays on the head's loopback (SSH tunnel)


@pytest.mark.parametrize("path", LAUNCHER_CONFIGS, ids=lambda p: p.name)
def test_launcher_ray_start_flags_exist(path):
    from ray.scripts.scripts import start

    known = {opt for p in start.params for opt in p.opts}
    cfg = yaml.safe_load(path.read_text())
    for cmd in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"]:
        for part in cmd.split(";"):
            argv = shlex.split(part)
            if argv[:2] == ["ray", "start"]:
                flags = {a.split("=")[0] for a in argv[2:] if a.startswith("--")}
                assert flags <= known, flags - known


# ---------------------------------------------------------------- KubeRay manifests


def _strict(node):
    """Unknown fields are errors (kubectl --validate=strict), except where the schema preserves them."""
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@pytest.fixture(scope="module")
def kuberay_validators():
    from referencing import Registry, Resource

    resources = []
    for p in (SCHEMAS / "kuberay-1.5").glob("*.yaml"):
        schema = _strict(yaml.safe_load(p.read_text()))
        resources.append((schema["$id"], Resource.from_contents(schema)))
    core = json.loads((SCHEMAS / "kubernetes-1.35" / "core-v1.json").read_text())
    resources.append((core["$id"], Resource.from_contents(core)))
    registry = Registry().with_resources(resources)
    base = "https://dpsynth.invalid/kuberay-1.5/"

    def validator(kind: str):
        if kind == "PersistentVolumeClaim":
            schema = {"$ref": core["$id"] + "#/$defs/io.k8s.api.core.v1.PersistentVolumeClaim"}
        else:
            schema = {"$ref": base + {"RayCluster": "raycluster.yaml", "RayJob": "rayjob.yaml", "RayService": "rayservice.yaml"}[kind]}
        return jsonschema.Draft202012Validator(schema, registry=registry)

    return validator


def test_there_is_a_raycluster_rayjob_for_train_and_tune_a_rayservice_and_a_pvc():
    kinds = sorted((d["kind"], d["metadata"]["name"]) for p in MANIFESTS for d in _docs(p))
    assert kinds == [("PersistentVolumeClaim", "dpsynth-shared"), ("RayCluster", "dpsynth"), ("RayJob", "dpsynth-train"),
                     ("RayJob", "dpsynth-tune"), ("RayService", "dpsynth-sampler")]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_validates_against_the_crd_schema(path, kuberay_validators):
    for doc in _docs(path):
        assert doc["apiVersion"] == ("v1" if doc["kind"] == "PersistentVolumeClaim" else "ray.io/v1")
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in kuberay_validators(doc["kind"]).iter_errors(doc)]
        assert not errors, "\n".join(errors)


@pytest.mark.parametrize("manifest, mutate, where", [
    ("raycluster.yaml", lambda s: s["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(resource={}), "resource"),
    ("raycluster.yaml", lambda s: s["workerGroupSpecs"][0].update(minReplicas="two"), "two"),
    ("raycluster.yaml", lambda s: s["workerGroupSpecs"][0].pop("groupName"), "groupName"),
    ("raycluster.yaml", lambda s: s["headGroupSpec"]["template"]["spec"]["tolerations"].append({"key": "x", "efect": "NoSchedule"})
     if "tolerations" in s["headGroupSpec"]["template"]["spec"] else s["headGroupSpec"]["template"]["spec"].update(nodeSelektor={}), "Selektor|efect"),
    ("raycluster.yaml", lambda s: s.update(rayVerison="2.60.0"), "rayVerison"),
    ("rayjob-train.yaml", lambda s: s.update(submisionMode=s.pop("submissionMode")), "submisionMode"),
    ("rayjob-train.yaml", lambda s: s.update(deletionStrategy={"onSuccess": {"policy": "DeleteClusters"}, "onFailure": {"policy": "DeleteNone"}}), "DeleteClusters"),
    ("rayjob-train.yaml", lambda s: s.update(deletionStrategy={"onSuccess": {"policy": "DeleteCluster"}}), "not valid under any"),  # needs onFailure too
    ("rayjob-train.yaml", lambda s: s["rayClusterSpec"].update(rayVerison="2.60.0"), "rayVerison"),
    ("rayservice-sampler.yaml", lambda s: s.update(serveConfig=s.pop("serveConfigV2")), "serveConfig"),  # the v1alpha1 name
    ("rayservice-sampler.yaml", lambda s: s.pop("rayClusterConfig"), "rayClusterConfig"),
])
def test_kuberay_schema_check_is_not_vacuous(manifest, mutate, where, kuberay_validators):
    doc = _docs(CLUSTER / "kuberay" / manifest)[0]
    mutate(doc["spec"])
    errors = [e.message for e in kuberay_validators(doc["kind"]).iter_errors(doc)]
    assert errors and any(__import__("re").search(where, m) for m in errors), errors


def test_jobs_and_service_run_on_the_same_cluster_spec():
    spec = _docs(CLUSTER / "kuberay" / "raycluster.yaml")[0]["spec"]
    for name, key in (("rayjob-train.yaml", "rayClusterSpec"), ("rayjob-tune.yaml", "rayClusterSpec"),
                      ("rayservice-sampler.yaml", "rayClusterConfig")):
        assert _docs(CLUSTER / "kuberay" / name)[0]["spec"][key] == spec, name


def test_gpu_workers_request_gpus_select_gpu_nodes_and_share_storage():
    spec = _docs(CLUSTER / "kuberay" / "raycluster.yaml")[0]["spec"]
    (group,) = spec["workerGroupSpecs"]
    pod = group["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1" and pod["nodeSelector"] and pod["tolerations"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    for pod in (spec["headGroupSpec"]["template"]["spec"], pod):
        claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
        assert claims == ["dpsynth-shared"]
        assert any(m["mountPath"] == "/mnt/shared" for m in pod["containers"][0]["volumeMounts"])
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"  # nothing exposed outside the cluster
    pvc = _docs(CLUSTER / "kuberay" / "pvc.yaml")[0]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


# ---------------------------------------------------------------- the commands they run


def _cli_help(*argv: str) -> str:
    """Run the `dpsynth` entry point in-process (what the console script calls) with --help."""
    from click.testing import CliRunner

    from dpsynth.cli import app
    from typer.main import get_command

    result = CliRunner().invoke(get_command(app), [*argv, "--help"], prog_name="dpsynth", terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def dpsynth_commands() -> str:
    out = subprocess.run([str(BIN / "dpsynth"), "--help"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr  # the installed console script itself starts
    return out.stdout


def _entrypoints() -> list[tuple[str, list[str]]]:
    out = []
    for p in MANIFESTS:
        for d in _docs(p):
            if d["kind"] == "RayJob":
                out.append((p.name, shlex.split(d["spec"]["entrypoint"])))
    return out


@pytest.mark.parametrize("name, argv", _entrypoints(), ids=[n for n, _ in _entrypoints()])
def test_rayjob_entrypoint_exists_and_starts(name, argv, dpsynth_commands):
    assert argv[0] == "dpsynth"
    sub = argv[1]
    if f" {sub} " not in dpsynth_commands:
        pytest.skip(f"`dpsynth {sub}` does not exist yet (being built in another issue); `dpsynth --help` lists no '{sub}'")
    usage = _cli_help(sub)
    for flag in (a for a in argv[2:] if a.startswith("-")):
        assert flag in usage, f"{name}: `dpsynth {sub}` has no option {flag}"
    config = argv[argv.index("-c") + 1]
    assert config.startswith(IMAGE_ROOT + "/")
    local = ROOT / config[len(IMAGE_ROOT) + 1:]
    assert local.is_file(), f"{name} runs {config}, which is not in the repository"


def test_cluster_job_config_is_valid_and_keeps_ledger_and_checkpoints_on_shared_storage():
    from dpsynth.config import load_config

    cfg = load_config(CLUSTER / "job.yaml")  # the dry run of every entrypoint's config
    assert str(cfg.privacy.ledger).startswith("/mnt/shared/") and str(cfg.scaling.storage_path).startswith("/mnt/shared/")
    assert str(cfg.output_dir).startswith("/mnt/shared/") and cfg.scaling.use_gpu and cfg.scaling.num_workers >= 2


def test_sampler_service_imports_and_its_args_validate(monkeypatch):
    import importlib

    from serve.app import auth_on, parse_config

    (doc,) = _docs(CLUSTER / "kuberay" / "rayservice-sampler.yaml")
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    for app_cfg in serve_cfg["applications"]:
        module, attr = app_cfg["import_path"].split(":")
        assert callable(getattr(importlib.import_module(module), attr))
        monkeypatch.setenv("DPSYNTH_SERVE_TOKEN", "t0ken")
        cfg = parse_config(app_cfg["args"])  # what build_app validates first
        assert cfg.gpus_per_replica >= 1 and auth_on(cfg)  # reachable from other pods: token auth is on
        monkeypatch.delenv("DPSYNTH_SERVE_TOKEN")
        with pytest.raises(Exception, match="DPSYNTH_SERVE_TOKEN"):
            auth_on(parse_config(app_cfg["args"]))
    assert serve_cfg["http_options"]["host"] == "0.0.0.0"  # inside the pod; the serve Service is ClusterIP
    envs = [e["name"] for e in doc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]]
    assert "DPSYNTH_SERVE_TOKEN" in envs


# ---------------------------------------------------------------- a real 2-node cluster on loopback


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalCluster:
    """Two Ray nodes on this host, started with `ray start --block` in their own sessions and stopped by pid:
    `ray stop` would stop every Ray on the machine, other people's included."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.temp_dir = Path("/tmp") / f"dps-{uuid.uuid4().hex[:8]}"  # short: Ray's socket paths have a length limit
        (self.gcs, self.dashboard, self.client, *self.agent_ports) = _free_ports(3 + 8)
        # Token auth (Ray's default) with a token of our own, handed to every process through the environment:
        # nothing is read from or written to ~/.ray/auth_token. `ray job submit` authenticates the same way.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex,
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_USAGE_STATS_ENABLED": "0",
                    "PYTHONPATH": str(ROOT)}
        self.procs: list[subprocess.Popen] = []

    def _agent_flags(self, i: int) -> list[str]:
        a = self.agent_ports[4 * i: 4 * i + 4]
        return [f"--dashboard-agent-listen-port={a[0]}", f"--dashboard-agent-grpc-port={a[1]}",
                f"--metrics-export-port={a[2]}", f"--runtime-env-agent-port={a[3]}"]

    def _start(self, args: list[str], log: str) -> None:
        out = open(self.tmp / log, "w")
        self.procs.append(subprocess.Popen([str(BIN / "ray"), "start", "--block", "--num-cpus=1", "--disable-usage-stats",
                                            *args], stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                           start_new_session=True))

    def _nodes_alive(self) -> int:
        out = subprocess.run([str(BIN / "python"), "-c",
                              "import ray; ray.init(address='127.0.0.1:%d', logging_level='ERROR');"
                              "print(sum(n['Alive'] for n in ray.nodes()))" % self.gcs],
                             capture_output=True, text=True, env=self.env, timeout=120)
        return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0

    def start(self) -> None:
        self._start(["--head", "--node-ip-address=127.0.0.1", f"--port={self.gcs}", f"--temp-dir={self.temp_dir}",
                     "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard}",
                     f"--ray-client-server-port={self.client}", *self._agent_flags(0)], "head.log")
        self._wait(lambda: self._http_ok(), 120, "head dashboard")
        self._start([f"--address=127.0.0.1:{self.gcs}", "--node-ip-address=127.0.0.1", *self._agent_flags(1)], "worker.log")
        self._wait(lambda: self._nodes_alive() >= 2, 120, "second node")

    def _http_ok(self) -> bool:
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{self.dashboard}/api/version",
                                     headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return r.status == 200
        except Exception:
            return False

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            if ok():
                return
            time.sleep(1)
        logs = "\n".join((self.tmp / n).read_text()[-3000:] for n in ("head.log", "worker.log") if (self.tmp / n).exists())
        raise RuntimeError(f"{what} did not come up:\n{logs}")

    def stop(self) -> None:
        import psutil

        victims = []
        for p in self.procs:
            try:
                root = psutil.Process(p.pid)
                victims += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for proc in psutil.process_iter(["cmdline"]):  # anything else of ours that escaped the process tree
            try:
                if str(self.temp_dir) in " ".join(proc.info["cmdline"] or []):
                    victims.append(proc)
            except psutil.Error:
                continue
        for v in victims:
            try:
                v.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(victims, timeout=15)
        for v in alive:
            try:
                v.kill()
            except psutil.Error:
                pass
        subprocess.run(["rm", "-rf", str(self.temp_dir)], check=False)


@pytest.mark.slow
def test_two_node_local_cluster_runs_a_training_job_through_ray_job_submit(tmp_path, tiny_model_dir):
    from conftest import make_rows

    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in make_rows(240)))
    run_dir, ledger = tmp_path / "run", tmp_path / "shared" / "ledger.sqlite"
    (job_dir / "job.yaml").write_text(yaml.safe_dump({
        "data": {"source": str(tmp_path / "reviews.jsonl"), "text_column": "review", "label_column": "sentiment"},
        "model": {"base": tiny_model_dir, "max_length": 72},
        "lora": {"r": 2},
        "privacy": {"ledger": str(ledger)},
        "training": {"batch_size": 16, "steps": 6, "learning_rate": 0.01},
        "scaling": {"address": "auto", "num_workers": 2, "storage_path": str(tmp_path / "shared" / "checkpoints"),
                    "checkpoint_every": 2},
        "sampling": {"label_proportions": "uniform"},
        "output_dir": str(run_dir),
    }))
    cluster = LocalCluster(tmp_path)
    try:
        cluster.start()
        sid = f"dpsynth-test-{uuid.uuid4().hex[:6]}"
        submit = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{cluster.dashboard}", "--submission-id", sid,
             "--working-dir", str(job_dir), "--", "dpsynth", "train", "-c", "job.yaml", "--quiet"],
            capture_output=True, text=True, env=cluster.env, timeout=600)
        logs = submit.stdout[-6000:] + submit.stderr[-3000:]
        status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", f"http://127.0.0.1:{cluster.dashboard}", sid],
                                capture_output=True, text=True, env=cluster.env, timeout=120)
        assert submit.returncode == 0 and f"Job '{sid}' succeeded" in status.stdout + status.stderr, \
            logs + status.stdout + status.stderr
    finally:
        cluster.stop()
    cert = json.loads((run_dir / "certificate.json").read_text())
    metrics = json.loads(owner_path(run_dir, "metrics.json").read_text())
    assert cert["mechanism"]["workers"] == 2 and cert["mechanism"]["steps"] == 6
    assert len(set(metrics["worker_nodes"])) == 2  # one Ray Train worker on each node
    from dpsynth.privacy import Ledger

    (run,) = Ledger(ledger).runs()
    assert run["status"] == "closed" and run["certificate"] == cert  # the ledger on the shared path holds the spend
    assert not (tmp_path / "shared" / "checkpoints" / "run-train").exists()  # scratch cleaned once certified
