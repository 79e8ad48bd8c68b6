"""The deployment files: ``ray_cluster.yaml`` (Ray's cluster launcher, AWS), ``deploy/kuberay/rayjob.yaml`` (a
KubeRay RayJob), ``deploy/Dockerfile`` and the README section "Running on a cluster".

No cluster is started. What is checked instead:

* the launcher file with Ray's own validation (``prepare_config`` + ``validate_config``, what ``ray up`` runs
  before it contacts the cloud), which rejects broken copies;
* the RayJob against a JSON schema written here from the fields of KubeRay's ``ray.io/v1`` RayJob CRD (the parts
  the manifest uses; stricter than the CRD in one way: unknown keys are errors, where the API server would drop
  them silently), and against the structure the pipeline needs (head without GPUs, a GPU worker group, one
  image, Ray's version, token authentication, the cluster deleted after the job);
* every pipeline command of the three places, after the shell steps it meets on its way: KubeRay's submitter
  line (``/bin/bash -ce``), ``ray job submit`` (``shlex.join`` of its arguments) and the job's shell
  (``/bin/sh -c``). A stand-in ``alm-pipeline`` on PATH records the argument lists those steps produce; each is
  then parsed by the real command line (click's parser: unknown options, types, required options) and turned
  into the command's config dataclass (its own checks). The stages must chain, stay in the bucket and fit the
  worker's GPUs.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "ray_cluster.yaml"
RAYJOB = ROOT / "deploy" / "kuberay" / "rayjob.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.dockerignore"
README = ROOT / "README.md"

BUCKET = "s3://YOUR-BUCKET/"  # the value a user replaces
GPUS_PER_WORKER = 8
DLAMI_SSM = "resolve:ssm:/aws/service/deeplearning/ami/"
PLACEHOLDERS = ("ami-0123", "fs-0123", "example.invalid", "/shared")  # fake values the old file held


def _ray_version() -> str:
    import ray

    return ray.__version__


def _ray_image() -> str:
    return f"rayproject/ray:{_ray_version()}-py311-gpu"


# --------------------------------------------------------------------------------------------------------------
# the pipeline commands: where they are, the shell steps on their way, the real command line


def _command_from(lines: list[str], start: str) -> str:
    """The shell command that begins with ``start`` in ``lines``: that line, and as many more as its quotes
    need."""
    for i, line in enumerate(lines):
        if start in line:
            text = line[line.index(start) :]
            for more in lines[i + 1 :]:
                try:
                    shlex.split(text)
                    return text
                except ValueError:  # a quote still open
                    text += "\n" + more
            shlex.split(text)
            return text
    raise AssertionError(f"no line with {start!r}")


def launcher_job_command() -> str:
    comments = [line[1:] for line in LAUNCHER.read_text().splitlines() if line.startswith("#")]
    return _command_from(comments, "ray job submit")


def readme_section() -> str:
    text = README.read_text()
    start = text.index("## Running on a cluster")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def readme_job_command() -> str:
    blocks = re.findall(r"```bash\n(.*?)```", readme_section(), flags=re.S)
    lines = [line for block in blocks for line in block.splitlines()]
    return _command_from(lines, "ray job submit")


# stands in for `ray job submit` in a shell line: prints the arguments it is given, as JSON
PRINT_ARGS = f"{shlex.quote(sys.executable)} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"


def _printed_words(line: str) -> list[str]:
    """Runs ``line`` with bash as KubeRay's submitter does (``/bin/bash -ce --``) and returns the arguments that
    PRINT_ARGS printed. No alm-pipeline is on PATH: an entrypoint that leaks out of its quotes fails here."""
    result = subprocess.run(
        ["/bin/bash", "-ce", "--", line],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    (printed,) = result.stdout.splitlines()
    return json.loads(printed)


def _after_dashes(words: list[str]) -> list[str]:
    assert "--" in words, words
    return words[words.index("--") + 1 :]


def job_entrypoint_from_launcher(command: str) -> list[str]:
    """``ray job submit [options] -- ENTRYPOINT...`` typed in a shell: the entrypoint's words."""
    assert command.startswith("ray job submit ")
    return _after_dashes(_printed_words(PRINT_ARGS + " " + command[len("ray job submit ") :]))


def job_entrypoint_from_kuberay(entrypoint: str) -> list[str]:
    """KubeRay's submitter (K8sJobMode) runs one bash line built around the entrypoint (ray-operator,
    ``BuildJobSubmitCommand``: ``if ! ray job status ... ; then ray job submit --address A --no-wait
    --submission-id ID -- <entrypoint> ; fi ; ray job logs ...``): the entrypoint's words."""
    line = (
        f"if true ; then {PRINT_ARGS} --address http://alm-pipeline-head-svc:8265 --no-wait "
        f"--submission-id alm-pipeline-abc -- {entrypoint.strip()} ; fi ; true"
    )
    return _after_dashes(_printed_words(line))


def run_job(words: list[str], tmp_path: Path, fail: str | None = None) -> tuple[int, list[list[str]]]:
    """What Ray does with a submitted entrypoint: ``ray job submit`` joins its words with ``shlex.join`` and the
    job supervisor runs the string with ``shell=True``. ``alm-pipeline`` is a stand-in that records its
    arguments (and fails for the command ``fail``). Returns the exit status and the recorded argument lists."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / "calls.jsonl"
    record.unlink(missing_ok=True)
    stand_in = bin_dir / "alm-pipeline"
    stand_in.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "with open(os.environ['ALM_RECORD'], 'a') as f:\n"
        "    f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "sys.exit(1 if sys.argv[1:2] == [os.environ.get('ALM_FAIL')] else 0)\n"
    )
    stand_in.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "ALM_RECORD": str(record), "ALM_FAIL": fail or ""}
    result = subprocess.run(
        shlex.join(words), shell=True, env=env, capture_output=True, text=True, timeout=60
    )
    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return result.returncode, calls


def parse_cli(argv: list[str]):
    """``alm-pipeline ARGV`` parsed by the real command line, without running it: click builds the context of
    the group and of the command (unknown options, bad types and missing required options raise), then the
    command's config dataclass is built from the parsed values (its ``__post_init__`` checks raise
    ``ValueError``). Returns (command name, config)."""
    import typer

    from alm_pipeline.cli.main import app
    from alm_pipeline.cli.options import build_config
    from alm_pipeline.pipeline.align_stage import AlignConfig
    from alm_pipeline.pipeline.teacher_cache import TeacherCacheConfig
    from alm_pipeline.trainer.config import TrainConfig

    configs = {"teacher-cache": TeacherCacheConfig, "align": AlignConfig, "train": TrainConfig}
    group = typer.main.get_command(app)
    ctx = group.make_context("alm-pipeline", list(argv))
    rest = [*(ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args), *ctx.args]
    name, command, args = group.resolve_command(ctx, rest)
    assert name in configs, f"the pipeline runs teacher-cache, align and train, not {name!r}"
    params = command.make_context(name, args, parent=ctx).params
    return name, build_config(configs[name], params)


def pipeline_problems(configs: list[tuple[str, object]], gpus_per_node: int, nodes: int) -> list[str]:
    """What is wrong with the three parsed stages as a cluster job (empty: nothing)."""
    names = [name for name, _ in configs]
    if names != ["teacher-cache", "align", "train"]:
        return [f"stages {names}, expected teacher-cache, align, train"]
    (_, cache), (_, align), (_, train) = configs
    problems = []
    paths = {
        "teacher-cache --data": cache.corpus.path,
        "teacher-cache --output": cache.output,
        "align --cache": align.cache,
        "align --output": align.output,
        "train --aligned": train.data.aligned,
        "train --output": train.output,
    }
    problems += [f"{k} {v!r} is not in the bucket" for k, v in paths.items() if not str(v).startswith(BUCKET)]
    if align.cache != cache.output:
        problems.append(f"align reads {align.cache}, teacher-cache writes {cache.output}")
    sets = [f"{align.output.rstrip('/')}/{tok}" for tok in align.student_tokenizers]
    if train.data.aligned not in sets:
        problems.append(f"train reads {train.data.aligned}, align writes {sets}")
    wanted = cache.max_concurrency * (cache.num_gpus_per_actor or 0)
    if not 0 < wanted <= gpus_per_node:
        problems.append(f"teacher-cache asks for {wanted:g} GPUs; a worker has {gpus_per_node}")
    if not train.distributed.use_gpu or train.distributed.num_workers > gpus_per_node * nodes:
        problems.append(
            f"train: {train.distributed.num_workers} workers, use_gpu={train.distributed.use_gpu}; "
            f"{nodes} worker(s) of {gpus_per_node} GPUs"
        )
    if not train.checkpoint.resume:
        problems.append("train without --resume: a resubmitted job would refuse the run it left")
    return problems


def _parsed(calls: list[list[str]]):
    return [parse_cli(argv) for argv in calls]


# --------------------------------------------------------------------------------------------------------------
# ray_cluster.yaml


def load_launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def ray_validate(config: dict) -> dict:
    """Ray's own checks of a cluster-launcher config, as ``ray up`` runs them before contacting the cloud."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def launcher_problems(config: dict, text: str = "") -> list[str]:
    """What the pipeline needs of the launcher file beyond Ray's schema (empty: nothing)."""
    problems = [f"placeholder {p!r} in the file" for p in PLACEHOLDERS if p in text]
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    for name, node in types.items():
        if not str(node["node_config"].get("ImageId", "")).startswith(DLAMI_SSM):
            problems.append(f"{name}: ImageId is not the Deep Learning AMI's public SSM parameter")
    if head.get("resources", {}).get("GPU", 0):
        problems.append("the head has GPUs")
    gpu_types = [n for n, node in types.items() if node.get("resources", {}).get("GPU") == GPUS_PER_WORKER]
    if not gpu_types:
        problems.append(f"no worker type with {GPUS_PER_WORKER} GPUs")
    if config.get("docker", {}).get("image") != _ray_image():
        problems.append(f"docker image {config.get('docker', {}).get('image')!r}, expected {_ray_image()!r}")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config.get(key, []) if "ray start" in c]
        if len(starts) != 1:
            problems.append(f"{key}: {len(starts)} `ray start` commands")
            continue
        before = starts[0].split("ray start")[0]
        limit = re.search(r"ulimit -n (\d+)", before)
        if not limit or int(limit.group(1)) < 65536:
            problems.append(f"{key}: no `ulimit -n` of at least 65536 before `ray start`")
        if "RAY_AUTH_MODE=token" not in before:
            problems.append(f"{key}: Ray starts without RAY_AUTH_MODE=token")
    mounts = config.get("file_mounts", {})
    if mounts.get("~/.ray/auth_token") != "~/.ray/auth_token":
        problems.append("the auth token is not copied to the nodes")
    checkout = [remote for remote, local in mounts.items() if local in (".", "./")]
    installs = " ".join(config.get("setup_commands", []))
    if not checkout or f'pip install --quiet "{checkout[0].replace("~", "$HOME")}[vllm]"' not in installs:
        problems.append("setup_commands do not pip-install the copied checkout")
    if ".gitignore" not in config.get("rsync_filter", []):
        problems.append("the checkout is copied with what .gitignore ignores (.venv, .models)")
    return problems


def test_launcher_passes_rays_own_validation():
    prepared = ray_validate(load_launcher())
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["gpu_worker"]["max_workers"] == 2


def _set(config: dict, path: str, value) -> dict:
    broken = copy.deepcopy(config)
    *parents, last = path.split(".")
    node = broken
    for key in parents:
        node = node[key]
    node[last] = value
    return broken


@pytest.mark.parametrize(
    ("path", "value", "error"),
    [
        ("setup_comands", ["true"], "Additional properties are not allowed"),  # a misspelled key
        ("docker.imag", "rayproject/ray", "Additional properties are not allowed"),
        ("available_node_types.gpu_worker.resources", {"GPU": "8"}, "is not of type 'integer'"),
        ("head_node_type", "gpu_head", "must be one of `available_node_types`"),
        ("available_node_types.gpu_worker.min_workers", 3, "smaller than the sum of `min_workers`"),
    ],
)
def test_rays_validation_rejects_broken_copies(path, value, error):
    with pytest.raises(Exception, match=re.escape(error)):
        ray_validate(_set(load_launcher(), path, value))


def test_launcher_has_real_values_token_auth_ulimit_and_the_checkout():
    assert launcher_problems(load_launcher(), LAUNCHER.read_text()) == []


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        ("available_node_types.head.node_config.ImageId", "ami-0123456789abcdef0", "ImageId is not the Deep"),
        ("available_node_types.gpu_worker.resources", {"CPU": 4, "GPU": 1}, "no worker type with 8 GPUs"),
        ("available_node_types.head.resources", {"GPU": 1}, "the head has GPUs"),
        ("docker.image", "rayproject/ray:2.9.0-py311-gpu", "docker image"),
        ("worker_start_ray_commands", ["ray start --address=$RAY_HEAD_IP:6379"], "no `ulimit -n`"),
        ("head_start_ray_commands", ["ulimit -n 65536 && ray start --head"], "without RAY_AUTH_MODE=token"),
        ("setup_commands", ["pip install alm-pipeline"], "do not pip-install the copied checkout"),
        ("rsync_filter", [], "with what .gitignore ignores"),
        ("file_mounts", {"~/alm-pipeline": "."}, "the auth token is not copied"),
    ],
)
def test_launcher_checks_catch_broken_copies(path, value, problem):
    broken = _set(load_launcher(), path, value)
    assert any(problem in p for p in launcher_problems(broken)), launcher_problems(broken)


def test_launcher_checks_catch_placeholders():
    old_style = (
        LAUNCHER.read_text() + "\n# mount -t nfs4 fs-0123456789.efs.us-east-1.amazonaws.com:/ /shared\n"
    )
    assert "placeholder 'fs-0123' in the file" in launcher_problems(load_launcher(), old_style)


# --------------------------------------------------------------------------------------------------------------
# deploy/Dockerfile


def test_dockerfile_builds_on_rays_image_of_the_pinned_version():
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert base == _ray_image() == load_launcher()["docker"]["image"]
    from packaging.requirements import Requirement

    pins = [
        Requirement(d)
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ]
    (ray_pin,) = [r for r in pins if r.name == "ray"]
    assert ray_pin.specifier.contains(_ray_version()), (ray_pin, _ray_version())
    allowed = DOCKERIGNORE.read_text().splitlines()
    assert "*" in allowed  # everything else stays out of the build context (.venv, .models)
    for sources in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, flags=re.M):
        for source in sources.split():
            assert (ROOT / source).exists(), source
            assert f"!{source}" in allowed or f"!{source}/" in allowed, source


# --------------------------------------------------------------------------------------------------------------
# deploy/kuberay/rayjob.yaml

_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_STRING_MAP = {"type": "object", "additionalProperties": _STR}  # rayStartParams: strings only
_COUNT = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}  # int32 fields
_QUANTITY = {  # a Kubernetes quantity: 8, "8", "500m", "32Gi"
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?([KMGTPE]i|[mkMGTPE])?$"},
    ]
}
_RESOURCE_LIST = {"type": "object", "additionalProperties": _QUANTITY}
_CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "additionalProperties": False,
    "properties": {
        "name": _STR,
        "image": _STR,
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "resources": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"requests": _RESOURCE_LIST, "limits": _RESOURCE_LIST},
        },
        "env": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {"name": _STR, "value": _STR, "valueFrom": {"type": "object"}},
            },
        },
        "envFrom": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "prefix": _STR,
                    "secretRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {"name": _STR, "optional": _BOOL},
                    },
                },
            },
        },
        "volumeMounts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "mountPath"],
                "additionalProperties": False,
                "properties": {"name": _STR, "mountPath": _STR, "readOnly": _BOOL},
            },
        },
    },
}
_POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "additionalProperties": False,
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "additionalProperties": False,
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                "serviceAccountName": _STR,
                "nodeSelector": _STRING_MAP,
                "tolerations": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "key": _STR,
                            "operator": {"enum": ["Exists", "Equal"]},
                            "value": _STR,
                            "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
                        },
                    },
                },
                "volumes": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "name": _STR,
                            "emptyDir": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {"medium": {"enum": ["", "Memory"]}, "sizeLimit": _QUANTITY},
                            },
                        },
                    },
                },
            },
        },
    },
}
# Written from the fields of KubeRay's RayJob (ray.io/v1: RayJobSpec, RayClusterSpec, HeadGroupSpec,
# WorkerGroupSpec, AuthOptions), for the fields this manifest uses and a few neighbours.
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
        },
        "spec": {
            "type": "object",
            "required": ["entrypoint", "rayClusterSpec"],
            "additionalProperties": False,
            "properties": {
                "entrypoint": _STR,
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "shutdownAfterJobFinishes": _BOOL,
                "ttlSecondsAfterFinished": _COUNT,
                "activeDeadlineSeconds": {**_COUNT, "minimum": 1},
                "backoffLimit": _COUNT,
                "runtimeEnvYAML": _STR,
                "entrypointNumCpus": {"type": "number", "minimum": 0},
                "entrypointNumGpus": {"type": "number", "minimum": 0},
                "metadata": _STRING_MAP,
                "suspend": _BOOL,
                "rayClusterSpec": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "additionalProperties": False,
                    "properties": {
                        "rayVersion": _STR,
                        "enableInTreeAutoscaling": _BOOL,
                        "authOptions": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"mode": {"enum": ["disabled", "token"]}, "secretName": _STR},
                        },
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["template"],
                            "additionalProperties": False,
                            "properties": {
                                "rayStartParams": _STRING_MAP,
                                "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                                "template": _POD_TEMPLATE,
                            },
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["groupName", "minReplicas", "maxReplicas", "template"],
                                "additionalProperties": False,
                                "properties": {
                                    "groupName": _STR,
                                    "replicas": _COUNT,
                                    "minReplicas": _COUNT,
                                    "maxReplicas": _COUNT,
                                    "numOfHosts": {**_COUNT, "minimum": 1},
                                    "rayStartParams": _STRING_MAP,
                                    "template": _POD_TEMPLATE,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def load_rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _gpus(container: dict) -> int:
    """GPUs of a container: its nvidia.com/gpu limit (Kubernetes takes extended resources from the limits; a
    request, if given, must equal the limit)."""
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def rayjob_problems(job: dict) -> list[str]:
    """What the pipeline needs of the RayJob beyond the schema (empty: nothing)."""
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    problems = []
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("the cluster is not deleted after the job (shutdownAfterJobFinishes)")
    if spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
        problems.append("submissionMode is not K8sJobMode")
    if cluster.get("rayVersion") != _ray_version():
        problems.append(f"rayVersion {cluster.get('rayVersion')!r}, the package pins {_ray_version()}")
    if cluster.get("authOptions", {}).get("mode") != "token":
        problems.append("Ray token authentication is off (authOptions.mode)")
    head = cluster["headGroupSpec"]
    if any(_gpus(c) for c in _containers(head)) or head.get("rayStartParams", {}).get("num-gpus") != "0":
        problems.append("the head has GPUs")
    groups = cluster.get("workerGroupSpecs", [])
    gpu_groups = [g for g in groups if any(_gpus(c) == GPUS_PER_WORKER for c in _containers(g))]
    if not gpu_groups:
        problems.append(f"no worker group with {GPUS_PER_WORKER} GPUs (nvidia.com/gpu)")
    for group in groups:
        if not group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]:
            problems.append(f"{group['groupName']}: replicas outside minReplicas..maxReplicas")
        for c in _containers(group):
            resources = c.get("resources", {})
            gpu = [resources.get(k, {}).get("nvidia.com/gpu") for k in ("limits", "requests")]
            if gpu[1] is not None and gpu[0] != gpu[1]:
                problems.append(f"{group['groupName']}: nvidia.com/gpu requests differ from limits")
            if gpu[0] is not None and not any(
                m["mountPath"] == "/dev/shm" for m in c.get("volumeMounts", [])
            ):
                problems.append(f"{group['groupName']}: no /dev/shm volume for Ray's object store and NCCL")
    images = {c["image"] for g in [head, *groups] for c in _containers(g)}
    if len(images) != 1:
        problems.append(f"head and workers run different images: {sorted(images)}")
    elif next(iter(images)).startswith("rayproject/"):
        problems.append("a public Ray image: it has no alm-pipeline (build deploy/Dockerfile)")
    for g in [head, *groups]:
        for c in _containers(g):
            secrets = [e.get("secretRef", {}).get("name") for e in c.get("envFrom", [])]
            if "alm-pipeline-storage" not in secrets:
                problems.append(f"{c['name']}: no bucket credentials (Secret alm-pipeline-storage)")
    return problems


def test_rayjob_matches_the_crd_fields():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(load_rayjob(), RAYJOB_SCHEMA)


@pytest.mark.parametrize(
    ("path", "value", "error"),
    [
        ("spec.shutdownAfterJobFinish", True, "Additional properties are not allowed"),
        ("spec.submissionMode", "K8SJobMode", "is not one of"),
        ("spec.rayClusterSpec.headGroupSpec.rayStartParams", {"num-gpus": 0}, "is not of type 'string'"),
        ("spec.rayClusterSpec.authOptions", {"mode": "tokens"}, "is not one of"),
        ("spec.ttlSecondsAfterFinished", -1, "less than the minimum"),
        ("apiVersion", "ray.io/v1alpha1", "was expected"),
    ],
)
def test_schema_rejects_broken_rayjob_copies(path, value, error):
    jsonschema = pytest.importorskip("jsonschema")
    with pytest.raises(jsonschema.ValidationError, match=re.escape(error)):
        jsonschema.validate(_set(load_rayjob(), path, value), RAYJOB_SCHEMA)


def test_rayjob_structure():
    assert rayjob_problems(load_rayjob()) == []


def _worker_container(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def _head_container(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _break(change):
    def apply(job: dict) -> dict:
        job = copy.deepcopy(job)
        change(job)
        return job

    return apply


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda j: j["spec"].update(shutdownAfterJobFinishes=False), "not deleted after the job"),
        (
            lambda j: _head_container(j)["resources"]["limits"].update({"nvidia.com/gpu": "1"}),
            "head has GPUs",
        ),
        (lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"].update(rayStartParams={}), "head has GPUs"),
        (lambda j: _worker_container(j)["resources"]["limits"].pop("nvidia.com/gpu"), "no worker group with"),
        (lambda j: _worker_container(j)["resources"]["requests"].update({"nvidia.com/gpu": "4"}), "differ"),
        (lambda j: _worker_container(j).update(image="rayproject/ray:2.60.0-py311-gpu"), "different images"),
        (lambda j: j["spec"]["rayClusterSpec"].update(rayVersion="2.9.0"), "rayVersion"),
        (lambda j: j["spec"]["rayClusterSpec"].pop("authOptions"), "token authentication is off"),
        (lambda j: _worker_container(j).pop("envFrom"), "no bucket credentials"),
        (lambda j: _worker_container(j)["volumeMounts"].pop(), "no /dev/shm volume"),
        (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas=2), "replicas outside"),
    ],
)
def test_rayjob_checks_catch_broken_copies(change, problem):
    broken = _break(change)(load_rayjob())
    assert any(problem in p for p in rayjob_problems(broken)), rayjob_problems(broken)


# --------------------------------------------------------------------------------------------------------------
# the pipeline commands, in the three places


def _calls_of(where: str, tmp_path: Path, fail: str | None = None) -> tuple[int, list[list[str]]]:
    if where == "ray_cluster.yaml":
        words = job_entrypoint_from_launcher(launcher_job_command())
    elif where == "README.md":
        words = job_entrypoint_from_launcher(readme_job_command())
    else:
        words = job_entrypoint_from_kuberay(load_rayjob()["spec"]["entrypoint"])
    assert words[:2] == ["bash", "-c"] and len(words) == 3, words  # one script: nothing left outside it
    return run_job(words, tmp_path, fail)


def _worker_gpus(where: str) -> tuple[int, int]:
    """GPUs per worker node and worker nodes, as the file declares them."""
    if where == "rayjob.yaml":
        group = load_rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
        return max(_gpus(c) for c in _containers(group)), group["maxReplicas"]
    worker = load_launcher()["available_node_types"]["gpu_worker"]
    return worker["resources"]["GPU"], worker["max_workers"]


@pytest.mark.parametrize("where", ["ray_cluster.yaml", "rayjob.yaml", "README.md"])
def test_pipeline_commands_run_the_three_stages_and_parse(where, tmp_path):
    status, calls = _calls_of(where, tmp_path)
    assert status == 0
    assert [argv[0] for argv in calls] == ["teacher-cache", "align", "train"]
    configs = _parsed(calls)
    gpus, nodes = _worker_gpus("rayjob.yaml" if where == "rayjob.yaml" else "ray_cluster.yaml")
    assert pipeline_problems(configs, gpus, nodes) == []
    (_, cache), _, (_, train) = configs
    assert cache.engine == "vllm" and cache.dtype == "bfloat16" and train.compute.bf16


def test_the_three_places_hold_the_same_pipeline(tmp_path):
    runs = [_calls_of(where, tmp_path)[1] for where in ("ray_cluster.yaml", "rayjob.yaml", "README.md")]
    assert runs[0] == runs[1] == runs[2]


def test_a_failing_stage_stops_the_job(tmp_path):
    """set -e inside the job: align fails, train never starts, and the job fails."""
    status, calls = _calls_of("rayjob.yaml", tmp_path, fail="align")
    assert status != 0
    assert [argv[0] for argv in calls] == ["teacher-cache", "align"]


def test_an_entrypoint_outside_one_quoted_script_is_caught():
    """Without the quotes, KubeRay's submitter shell would run `;`-separated stages itself, in the submitter pod:
    bash finds no alm-pipeline there and the line fails."""
    bare = "alm-pipeline teacher-cache --teacher x ; alm-pipeline align --cache y --student-tokenizer bytes"
    with pytest.raises(AssertionError):
        job_entrypoint_from_kuberay(bare)


def test_renamed_flags_and_bad_values_fail_the_parse(tmp_path):
    _, calls = _calls_of("rayjob.yaml", tmp_path)
    teacher = calls[0]
    renamed = [("--gpus-per-actor" if a == "--num-gpus-per-actor" else a) for a in teacher]
    with pytest.raises(Exception, match="No such option: --gpus-per-actor"):
        parse_cli(renamed)
    bad_engine = [("vlm" if a == "vllm" else a) for a in teacher]
    with pytest.raises(ValueError, match="unknown --engine 'vlm'"):
        parse_cli(bad_engine)
    no_cache = [a for a in calls[1] if a not in ("--cache", calls[1][calls[1].index("--cache") + 1])]
    with pytest.raises(Exception, match=r"Missing (parameter: cache|option '--cache')"):
        parse_cli(no_cache)


def test_pipeline_checks_catch_broken_chains(tmp_path):
    _, calls = _calls_of("rayjob.yaml", tmp_path)
    configs = _parsed(calls)
    local = [[("runs/x" if a.startswith(f"{BUCKET}alm/runs") else a) for a in argv] for argv in calls]
    assert any("not in the bucket" in p for p in pipeline_problems(_parsed(local), 8, 1))
    other_cache = [[a.replace("caches/smollm2-1.7b", "caches/other") for a in calls[0]], calls[1], calls[2]]
    assert any("align reads" in p for p in pipeline_problems(_parsed(other_cache), 8, 1))
    assert any("teacher-cache asks for 8 GPUs" in p for p in pipeline_problems(configs, 4, 2))
    assert any("train: 8 workers" in p for p in pipeline_problems(configs, 4, 1))
    fresh = [calls[0], calls[1], [a for a in calls[2] if a != "--resume"]]
    assert any("train without --resume" in p for p in pipeline_problems(_parsed(fresh), 8, 1))
    assert pipeline_problems(configs[::-1], 8, 1) == [
        "stages ['train', 'align', 'teacher-cache'], expected teacher-cache, align, train"
    ]
