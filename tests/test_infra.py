"""Static checks of the deployment files in infra/, so that a typo fails CI and
not a user's `ray up` or `kubectl apply`.

Every checker returns a list of problems (empty = fine); the tests assert that
the shipped files have none, and feed the checkers mutated copies to show that
each kind of mistake is caught.

Where Ray ships its own validation it is used as-is: the cluster launcher's
JSON schema and `prepare_config`/`validate_config` (what `ray up` runs before
it calls AWS), botocore's EC2 RunInstances model for `node_config`, and the Ray
Jobs CLI's runtime_env parsing plus Ray's own working_dir packager for
`excludes`. KubeRay's CRD is not available offline, so its field names are
listed here from the ray.io/v1 API reference (KubeRay v1.5.1+, which added
`authOptions`); a field from a newer KubeRay must be added to those lists.

No network, no Ray cluster; the whole module runs in a few seconds.
"""
from __future__ import annotations

import copy
import functools
import re
import shlex
import zipfile
from pathlib import Path

import pytest
import ray
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
LAUNCHER = INFRA / "aws-cluster.yaml"
RAYCLUSTER = INFRA / "kuberay-raycluster.yaml"
RAYJOB = INFRA / "kuberay-rayjob.yaml"
SERVICEACCOUNT = INFRA / "kuberay-serviceaccount.yaml"
RUNTIME_ENV = INFRA / "runtime_env.yaml"
DOCKERFILE = INFRA / "Dockerfile"
CLUSTER_MD = INFRA / "CLUSTER.md"

# Entrypoints the cluster files may start. jobs/campaign.py is written by
# others and may not exist yet; the name is what we check against.
EXPECTED_JOB_SCRIPTS = {"jobs/campaign.py", "jobs/score.py", "jobs/train.py"}

RAY_VERSION = ray.__version__
CREDENTIAL_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN")


# ---------------------------------------------------------------- helpers ----

def load_yaml(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs[0] if len(docs) == 1 else docs


def pyproject_requirements() -> dict[str, Requirement]:
    """name -> Requirement for [project].dependencies of pyproject.toml."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: fall back to the installed metadata
        from importlib.metadata import requires

        reqs = [r for r in requires("tidal-ray") or [] if "extra ==" not in r]
    else:
        reqs = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for r in reqs:
        req = Requirement(r)
        out[req.name.lower()] = req
    return out


def requires_python() -> SpecifierSet:
    try:
        import tomllib
    except ImportError:
        return SpecifierSet(">=3.10")
    return SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])


_PIP_OPTIONS_WITH_VALUE = {"--index-url", "-i", "--extra-index-url", "-c", "--constraint", "-r",
                           "--requirement", "--find-links", "-f", "--target", "-t"}


def pip_installs(commands) -> list[dict]:
    """Every `pip install` in a list of shell commands, as
    {"requirements": {name: Requirement}, "index_urls": [..], "command": str}."""
    found = []
    for cmd in commands or []:
        for part in re.split(r"&&|;|\|\|", cmd):
            try:
                words = shlex.split(part)
            except ValueError:
                continue
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    rest, reqs, idx = words[i + 2:], {}, []
                    j = 0
                    while j < len(rest):
                        w = rest[j]
                        if w in _PIP_OPTIONS_WITH_VALUE:
                            if w in ("--index-url", "-i", "--extra-index-url"):
                                idx.append(rest[j + 1] if j + 1 < len(rest) else "")
                            j += 2
                            continue
                        if not w.startswith("-"):
                            req = Requirement(w)
                            reqs[req.name.lower()] = req
                        j += 1
                    found.append({"requirements": reqs, "index_urls": idx, "command": part.strip()})
                    break
    return found


def pinned_version(req: Requirement) -> str | None:
    specs = list(req.specifier)
    if len(specs) == 1 and specs[0].operator == "==":
        return specs[0].version
    return None


def image_tag(image: str) -> str:
    name = image.rsplit("/", 1)[-1]
    return name.split(":", 1)[1] if ":" in name else ""


def check_image(image: str, where: str, *, gpu: bool | None = None) -> list[str]:
    """A Ray image tag must be `<ray version>-py<XY>[-cpu|-gpu|-cuNNN]`."""
    tag = image_tag(image)
    m = re.fullmatch(r"(\d+\.\d+\.\d+)-py(\d)(\d+)(?:-(cpu|gpu|cu\d+))?", tag)
    if not m:
        return [f"{where}: image {image!r} has no '<ray version>-py<XY>-<cpu|gpu>' tag"]
    problems = []
    if m.group(1) != RAY_VERSION:
        problems.append(f"{where}: image {image!r} is Ray {m.group(1)}, installed Ray is {RAY_VERSION}")
    py = f"{m.group(2)}.{m.group(3)}"
    if not requires_python().contains(py):
        problems.append(f"{where}: image {image!r} is Python {py}, outside requires-python {requires_python()}")
    platform = m.group(4) or "cpu"
    if gpu is True and platform == "cpu":
        problems.append(f"{where}: image {image!r} is a CPU image on a GPU node")
    return problems


def check_dependency_pins(installs: list[dict], where: str, *, gpu: bool) -> list[str]:
    """The pip installs that build a node must match pyproject: Ray pinned to the
    installed version, torch pinned (CPU wheel index on CPU nodes, PyPI's CUDA
    build on GPU nodes), every other dependency present with pyproject's spec."""
    problems = []
    reqs: dict[str, Requirement] = {}
    torch_index: list[str] = []
    for inst in installs:
        reqs.update(inst["requirements"])
        if "torch" in inst["requirements"]:
            torch_index = inst["index_urls"]
    project = pyproject_requirements()
    for name, want in project.items():
        have = reqs.get(name)
        if have is None:
            problems.append(f"{where}: dependency {name!r} from pyproject.toml is not installed")
            continue
        if name == "torch":
            v = pinned_version(have)
            if v is None:
                problems.append(f"{where}: torch is not pinned with == ({have})")
            elif not want.specifier.contains(v, prereleases=True):
                problems.append(f"{where}: torch {v} does not satisfy pyproject's {want}")
            cpu_index = any("/whl/cpu" in u for u in torch_index)
            if gpu and cpu_index:
                problems.append(f"{where}: GPU node installs torch from the CPU wheel index")
            if not gpu and not cpu_index:
                problems.append(f"{where}: CPU node installs torch without the CPU wheel index")
            continue
        if name == "ray":
            v = pinned_version(have)
            if v != RAY_VERSION or pinned_version(want) != RAY_VERSION:
                problems.append(f"{where}: ray pin {have} / pyproject {want} / installed {RAY_VERSION} differ")
            missing = set(want.extras) - set(have.extras)
            if missing:
                problems.append(f"{where}: ray installed without extras {sorted(missing)}")
            continue
        if str(have.specifier) != str(want.specifier):
            problems.append(f"{where}: {name} is {have}, pyproject.toml says {want}")
    return problems


def makefile_torch_pin() -> str | None:
    mk = ROOT / "Makefile"
    if not mk.exists():
        return None
    m = re.search(r"^TORCH_SPEC\s*\?=\s*torch==(\S+)", mk.read_text(), re.M)
    return m.group(1) if m else None


# ------------------------------------------------ cluster launcher (ray up) --

@functools.lru_cache(maxsize=None)
def _ray_schema_validator():
    """The JSON schema `ray up` validates cluster configs against."""
    import json

    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    return jsonschema.Draft7Validator(schema)


@functools.lru_cache(maxsize=None)
def _run_instances_shape():
    """botocore's input model of EC2 RunInstances, which node_config feeds."""
    import botocore.session

    return botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape


LAUNCHER_REQUIRED = ("cluster_name", "max_workers", "idle_timeout_minutes", "provider", "auth",
                     "docker", "available_node_types", "head_node_type", "file_mounts",
                     "setup_commands", "head_setup_commands", "worker_setup_commands",
                     "head_start_ray_commands", "worker_start_ray_commands")
NODE_TYPE_REQUIRED = ("node_config", "resources", "min_workers", "max_workers")


def check_launcher(cfg) -> list[str]:
    if not isinstance(cfg, dict):
        return ["launcher config is not a mapping"]
    problems = [f"missing top-level key {k!r}" for k in LAUNCHER_REQUIRED if k not in cfg]

    # Ray's own schema (the one `ray up` validates against): unknown or misspelt
    # keys at the top level and inside node types are rejected there.
    for err in _ray_schema_validator().iter_errors(cfg):
        problems.append(f"ray-schema.json: {'/'.join(map(str, err.path)) or '<top>'}: {err.message}")
    if problems:
        return problems

    # What `ray up` does before talking to AWS.
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(cfg)))
    except Exception as e:  # noqa: BLE001 - any rejection is a problem to report
        problems.append(f"ray validate_config: {type(e).__name__}: {e}")

    provider = cfg["provider"]
    if provider.get("type") != "aws":
        problems.append(f"provider.type is {provider.get('type')!r}, expected 'aws'")
    region = provider.get("region") or ""
    if not re.fullmatch(r"[a-z]{2}(-[a-z]+)+-\d", region):
        problems.append(f"provider.region {region!r} is not an AWS region name")
    for az in str(provider.get("availability_zone", "")).split(","):
        if not az.strip().startswith(region) or len(az.strip()) != len(region) + 1:
            problems.append(f"availability zone {az!r} is not in region {region!r}")
    if not isinstance(provider.get("cache_stopped_nodes"), bool):
        problems.append("provider.cache_stopped_nodes must be set (true/false)")
    if not cfg["auth"].get("ssh_user"):
        problems.append("auth.ssh_user is missing")
    if not (isinstance(cfg["idle_timeout_minutes"], (int, float)) and cfg["idle_timeout_minutes"] > 0):
        problems.append("idle_timeout_minutes must be > 0 so idle GPU workers are released")

    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    if head not in types:
        problems.append(f"head_node_type {head!r} is not one of available_node_types {sorted(types)}")
        return problems

    import botocore.validate

    run_instances = _run_instances_shape()
    gpu_types = []
    for name, nt in types.items():
        for k in NODE_TYPE_REQUIRED:
            if k not in nt:
                problems.append(f"node type {name!r}: missing {k!r}")
        if any(k not in nt for k in NODE_TYPE_REQUIRED):
            continue
        lo, hi = nt["min_workers"], nt["max_workers"]
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
            problems.append(f"node type {name!r}: need 0 <= min_workers ({lo}) <= max_workers ({hi})")
        report = botocore.validate.ParamValidator().validate(
            {**nt["node_config"], "MinCount": 1, "MaxCount": 1}, run_instances)
        if report.has_errors():
            problems.append(f"node type {name!r}: node_config is not valid for EC2 RunInstances:\n"
                            + report.generate_report())
        if not nt["node_config"].get("InstanceType"):
            problems.append(f"node type {name!r}: node_config.InstanceType missing")
        if name != head:
            if "IamInstanceProfile" not in nt["node_config"]:
                problems.append(f"node type {name!r}: no IamInstanceProfile, workers could not reach S3")
            if nt["resources"].get("GPU", 0) >= 1:
                gpu_types.append(name)
    if not gpu_types:
        problems.append("no worker node type advertises a GPU resource")
    for name in gpu_types:
        nt = types[name]
        if nt["min_workers"] != 0:
            problems.append(f"GPU node type {name!r}: min_workers must be 0 (scale to zero between cycles)")
        if nt["node_config"].get("InstanceMarketOptions", {}).get("MarketType") != "spot":
            problems.append(f"GPU node type {name!r}: InstanceMarketOptions.MarketType is not 'spot'")
    worker_max = sum(nt.get("max_workers", 0) for n, nt in types.items() if n != head)
    if cfg["max_workers"] < worker_max:
        problems.append(f"max_workers ({cfg['max_workers']}) < sum of worker types' max_workers ({worker_max})")
    if types[head].get("max_workers", 0) != 0:
        problems.append(f"head type {head!r} should not also launch workers (max_workers 0)")

    # Versions: images and pip pins agree with the installed Ray and pyproject.
    docker = cfg["docker"]
    head_image = types[head].get("docker", {}).get("head_image") or docker.get("head_image") or docker.get("image")
    if not head_image:
        problems.append("docker: no head image")
    else:
        problems += check_image(head_image, "docker.head_image")
    for name in gpu_types:
        img = types[name].get("docker", {}).get("worker_image") or docker.get("worker_image") or docker.get("image")
        if not img:
            problems.append(f"docker: no image for {name!r}")
        else:
            problems += check_image(img, f"docker image of {name!r}", gpu=True)
    head_cmds = cfg["setup_commands"] + cfg["head_setup_commands"]
    problems += check_dependency_pins(pip_installs(head_cmds), "head setup", gpu=False)
    for name in gpu_types:
        cmds = types[name].get("worker_setup_commands") or (cfg["setup_commands"] + cfg["worker_setup_commands"])
        problems += check_dependency_pins(pip_installs(cmds), f"{name!r} setup", gpu=True)

    # Token auth: every node runs with RAY_AUTH_MODE=token and the client's token.
    start = " ".join(cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"])
    run_opts = " ".join(docker.get("run_options", []))
    if "RAY_AUTH_MODE=token" not in run_opts and start.count("RAY_AUTH_MODE=token") < 2:
        problems.append("RAY_AUTH_MODE=token is set neither in docker.run_options nor on both ray start commands")
    if not any(str(remote).endswith(".ray/auth_token") for remote in cfg["file_mounts"]):
        problems.append("file_mounts does not copy the auth token (~/.ray/auth_token) to the nodes")
    if "--head" not in " ".join(cfg["head_start_ray_commands"]):
        problems.append("head_start_ray_commands has no `ray start --head`")
    if "$RAY_HEAD_IP" not in " ".join(cfg["worker_start_ray_commands"]):
        problems.append("worker_start_ray_commands does not join $RAY_HEAD_IP")
    return problems


# ------------------------------------------------------------------ KubeRay --

RAYCLUSTER_SPEC_FIELDS = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
                          "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
                          "rayVersion", "workerGroupSpecs", "authOptions"}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_FIELDS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas",
                       "idleTimeoutSeconds", "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
AUTOSCALER_FIELDS = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                     "upscalingMode", "version", "env", "envFrom", "volumeMounts"}
AUTH_FIELDS = {"mode", "secretName", "enableK8sTokenAuth"}
RAYJOB_SPEC_FIELDS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
                      "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "deletionPolicy",
                      "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
                      "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
                      "shutdownAfterJobFinishes", "suspend", "schedule"}
POD_TEMPLATE_FIELDS = {"metadata", "spec"}
POD_SPEC_FIELDS = {"activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "containers",
                   "dnsConfig", "dnsPolicy", "enableServiceLinks", "ephemeralContainers", "hostAliases",
                   "hostIPC", "hostNetwork", "hostPID", "hostUsers", "hostname", "imagePullSecrets",
                   "initContainers", "nodeName", "nodeSelector", "os", "overhead", "preemptionPolicy",
                   "priority", "priorityClassName", "readinessGates", "resourceClaims", "resources",
                   "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates",
                   "securityContext", "serviceAccount", "serviceAccountName", "setHostnameAsFQDN",
                   "shareProcessNamespace", "subdomain", "terminationGracePeriodSeconds", "tolerations",
                   "topologySpreadConstraints", "volumes"}
CONTAINER_FIELDS = {"args", "command", "env", "envFrom", "image", "imagePullPolicy", "lifecycle",
                    "livenessProbe", "name", "ports", "readinessProbe", "resizePolicy", "resources",
                    "restartPolicy", "securityContext", "startupProbe", "stdin", "stdinOnce",
                    "terminationMessagePath", "terminationMessagePolicy", "tty", "volumeDevices",
                    "volumeMounts", "workingDir"}
RESOURCE_FIELDS = {"limits", "requests", "claims"}


def _unknown(d, allowed, where) -> list[str]:
    if not isinstance(d, dict):
        return [f"{where}: expected a mapping, got {type(d).__name__}"]
    return [f"{where}: unknown field {k!r}" for k in d if k not in allowed]


def _check_pod(template, where, *, gpu: bool) -> list[str]:
    problems = _unknown(template, POD_TEMPLATE_FIELDS, f"{where}.template")
    spec = (template or {}).get("spec") if isinstance(template, dict) else None
    if not isinstance(spec, dict):
        return problems + [f"{where}.template.spec missing"]
    problems += _unknown(spec, POD_SPEC_FIELDS, f"{where}.template.spec")
    if not spec.get("serviceAccountName"):
        problems.append(f"{where}: no serviceAccountName (IRSA role for S3)")
    containers = spec.get("containers") or []
    if not containers:
        return problems + [f"{where}: no containers"]
    for i, c in enumerate(containers):
        cw = f"{where}.containers[{i}]"
        problems += _unknown(c, CONTAINER_FIELDS, cw)
        if not c.get("name") or not c.get("image"):
            problems.append(f"{cw}: name and image are required")
        problems += _unknown(c.get("resources", {}), RESOURCE_FIELDS, f"{cw}.resources")
        for env in c.get("env", []) or []:
            if env.get("name") in CREDENTIAL_NAMES and "value" in env:
                problems.append(f"{cw}: credential {env['name']} set as a literal env value")
    ray_c = containers[0]  # KubeRay runs Ray in the first container
    if ray_c.get("image"):
        problems += check_image(ray_c["image"], f"{where} image", gpu=gpu or None)
    res = ray_c.get("resources", {}) or {}
    limits, requests = res.get("limits", {}) or {}, res.get("requests", {}) or {}
    if gpu:
        n = limits.get("nvidia.com/gpu")
        if not (isinstance(n, int) and n >= 1):
            problems.append(f"{where}: GPU group without resources.limits['nvidia.com/gpu'] >= 1")
        elif "nvidia.com/gpu" in requests and requests["nvidia.com/gpu"] != n:
            problems.append(f"{where}: nvidia.com/gpu requests must equal limits")
    if "cpu" not in limits or "memory" not in limits:
        problems.append(f"{where}: set cpu and memory limits (Ray sizes the node from them)")
    return problems


def check_raycluster_spec(spec, where="spec") -> list[str]:
    problems = _unknown(spec, RAYCLUSTER_SPEC_FIELDS, where)
    if not isinstance(spec, dict):
        return problems
    for k in ("rayVersion", "headGroupSpec", "workerGroupSpecs"):
        if k not in spec:
            problems.append(f"{where}: missing {k!r}")
    if spec.get("rayVersion") is not None and str(spec["rayVersion"]) != RAY_VERSION:
        problems.append(f"{where}.rayVersion {spec['rayVersion']!r} != installed Ray {RAY_VERSION}")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append(f"{where}.enableInTreeAutoscaling must be true")
    problems += _unknown(spec.get("autoscalerOptions", {}), AUTOSCALER_FIELDS, f"{where}.autoscalerOptions")
    auth = spec.get("authOptions")
    if not isinstance(auth, dict) or auth.get("mode") != "token":
        problems.append(f"{where}.authOptions.mode must be 'token'")
    else:
        problems += _unknown(auth, AUTH_FIELDS, f"{where}.authOptions")

    head = spec.get("headGroupSpec")
    if isinstance(head, dict):
        problems += _unknown(head, HEAD_GROUP_FIELDS, f"{where}.headGroupSpec")
        problems += _check_start_params(head, f"{where}.headGroupSpec")
        problems += _check_pod(head.get("template"), f"{where}.headGroupSpec", gpu=False)

    groups = spec.get("workerGroupSpecs") or []
    if not isinstance(groups, list) or not groups:
        problems.append(f"{where}.workerGroupSpecs must be a non-empty list")
        groups = []
    names = [g.get("groupName") for g in groups if isinstance(g, dict)]
    if len(set(names)) != len(names):
        problems.append(f"{where}: duplicate worker groupName")
    gpu_groups = 0
    for i, g in enumerate(groups):
        gw = f"{where}.workerGroupSpecs[{i}]"
        problems += _unknown(g, WORKER_GROUP_FIELDS, gw)
        if not isinstance(g, dict):
            continue
        for k in ("groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"):
            if k not in g:
                problems.append(f"{gw}: missing {k!r}")
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo <= hi):
            problems.append(f"{gw}: need 0 <= minReplicas ({lo}) <= maxReplicas ({hi})")
        elif "replicas" in g and not (lo <= g["replicas"] <= hi):
            problems.append(f"{gw}: replicas {g['replicas']} outside [{lo}, {hi}]")
        problems += _check_start_params(g, gw)
        containers = (((g.get("template") or {}).get("spec") or {}).get("containers") or [{}])
        is_gpu = "nvidia.com/gpu" in str(containers[0].get("resources", {}))
        if is_gpu:
            gpu_groups += 1
            if lo != 0:
                problems.append(f"{gw}: GPU group minReplicas must be 0 (scale to zero between cycles)")
        problems += _check_pod(g.get("template"), gw, gpu=is_gpu)
    if not gpu_groups:
        problems.append(f"{where}: no worker group requests nvidia.com/gpu")
    return problems


def _check_start_params(group, where) -> list[str]:
    params = group.get("rayStartParams")
    if params is None:
        return []
    if not isinstance(params, dict):
        return [f"{where}.rayStartParams must be a mapping"]
    # The CRD types this map[string]string: an unquoted number is rejected.
    return [f"{where}.rayStartParams[{k!r}] must be a string, got {v!r}"
            for k, v in params.items() if not isinstance(v, str)]


def check_raycluster(doc) -> list[str]:
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion {doc.get('apiVersion')!r} != 'ray.io/v1'")
    if doc.get("kind") != "RayCluster":
        problems.append(f"kind {doc.get('kind')!r} != 'RayCluster'")
    if not (doc.get("metadata") or {}).get("name"):
        problems.append("metadata.name missing")
    return problems + check_raycluster_spec(doc.get("spec"))


def check_runtime_env(env: dict, where: str) -> list[str]:
    from ray.runtime_env import RuntimeEnv

    if not isinstance(env, dict):
        return [f"{where}: runtime_env is not a mapping"]
    problems = [f"{where}: unknown runtime_env field {k!r}" for k in env if k not in RuntimeEnv.known_fields]
    try:
        RuntimeEnv(**env)
    except Exception as e:  # noqa: BLE001
        problems.append(f"{where}: Ray rejects it: {type(e).__name__}: {e}")
    for k in (env.get("env_vars") or {}):
        if k in CREDENTIAL_NAMES:
            problems.append(f"{where}: credential {k} in env_vars (use IAM roles)")
    return problems


def check_entrypoint(entrypoint: str, where: str) -> list[str]:
    words = shlex.split(entrypoint or "")
    if len(words) < 2 or words[0] not in ("python", "python3"):
        return [f"{where}: entrypoint should be `python jobs/<name>.py ...`, got {entrypoint!r}"]
    script = words[1]
    problems = []
    if not (script.startswith("jobs/") and script.endswith(".py")):
        problems.append(f"{where}: entrypoint script {script!r} is not a jobs/*.py file")
    if script not in EXPECTED_JOB_SCRIPTS:
        problems.append(f"{where}: entrypoint script {script!r} is not one of {sorted(EXPECTED_JOB_SCRIPTS)}")
    if (ROOT / script).exists() and not (ROOT / script).is_file():
        problems.append(f"{where}: {script} exists but is not a file")
    return problems


CAMPAIGN_ACTIONS = ("init", "run", "status", "export", "import-labels")


def check_campaign_args(args: list[str], where: str) -> list[str]:
    """Arguments after `jobs/campaign.py`: an action and an s3:// campaign URI,
    and, once jobs/campaign.py exists, accepted by the real `tidal-ray campaign`
    parser (jobs/campaign.py forwards its arguments to it)."""
    problems = []
    if not args or args[0] not in CAMPAIGN_ACTIONS:
        problems.append(f"{where}: campaign action must be one of {CAMPAIGN_ACTIONS}, got {args[:1]}")
    positional = [a for a in args[1:] if not a.startswith("-")]
    if not positional or not positional[0].startswith("s3://"):
        problems.append(f"{where}: the campaign URI (s3://...) must follow the action")
    if (ROOT / "jobs" / "campaign.py").is_file():
        import contextlib
        import io

        from tidal_ray.cli import build_parser

        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                build_parser().parse_args(["campaign", *args])
        except SystemExit:
            problems.append(f"{where}: `tidal-ray campaign` rejects {shlex.join(args)!r}: "
                            + err.getvalue().strip().splitlines()[-1])
    return problems


def check_rayjob(doc) -> list[str]:
    problems = []
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"apiVersion {doc.get('apiVersion')!r} != 'ray.io/v1'")
    if doc.get("kind") != "RayJob":
        problems.append(f"kind {doc.get('kind')!r} != 'RayJob'")
    spec = doc.get("spec")
    problems += _unknown(spec, RAYJOB_SPEC_FIELDS, "spec")
    if not isinstance(spec, dict):
        return problems
    for k in ("entrypoint", "runtimeEnvYAML", "rayClusterSpec"):
        if k not in spec:
            problems.append(f"spec: missing {k!r}")
    problems += check_entrypoint(spec.get("entrypoint", ""), "spec.entrypoint")
    words = shlex.split(spec.get("entrypoint", ""))
    if words[1:2] == ["jobs/campaign.py"]:
        if words[2:3] != ["run"]:
            problems.append("spec.entrypoint: the RayJob should run `jobs/campaign.py run CAMPAIGN_URI`")
        problems += check_campaign_args(words[2:], "spec.entrypoint")
    try:
        env = yaml.safe_load(spec.get("runtimeEnvYAML", "")) or {}
    except yaml.YAMLError as e:
        problems.append(f"spec.runtimeEnvYAML is not YAML: {e}")
    else:
        problems += check_runtime_env(env, "spec.runtimeEnvYAML")
        wd = env.get("working_dir", "")
        if not re.match(r"(s3|https)://.+\.zip$", str(wd)):
            problems.append(f"spec.runtimeEnvYAML.working_dir {wd!r} should be an s3:// or https:// .zip "
                            "(a RayJob has no local directory to upload)")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("spec.shutdownAfterJobFinishes must be true (GPUs are released when the job ends)")
    ttl = spec.get("ttlSecondsAfterFinished")
    if not (isinstance(ttl, int) and ttl >= 0):
        problems.append(f"spec.ttlSecondsAfterFinished must be an int >= 0, got {ttl!r}")
    return problems + check_raycluster_spec(spec.get("rayClusterSpec"), "spec.rayClusterSpec")


# ------------------------------------------------------------- runtime_env --

# Paths (relative to the repo root) that `--working-dir .` must not upload,
# and paths it must keep.
MUST_SKIP = [".venv/bin/python", ".venv/lib/python3.11/site-packages/torch/__init__.py",
             ".git/HEAD", "tidal-demo/campaign/campaign.json", "benchmarks/out/score.json",
             "campaigns/digits/campaign.json", "pool/part-0.parquet", "labeled.parquet",
             "tidal_ray/__pycache__/cli.cpython-311.pyc"]
MUST_KEEP = ["tidal_ray/cli.py", "tidal_ray/models/__init__.py", "jobs/campaign.py", "jobs/score.py",
             "pyproject.toml", "infra/runtime_env.yaml", "benchmarks/score_throughput.py"]


def packaged_files(excludes: list[str], tmp: Path) -> set[str]:
    """Build the working_dir zip exactly as `ray job submit --working-dir` does
    (Ray's packager, .gitignore not consulted) from a tree of MUST_SKIP and
    MUST_KEEP files, and return the paths that made it in."""
    from ray._private.runtime_env.packaging import create_package

    tree = tmp / "repo"
    for rel in MUST_SKIP + MUST_KEEP:
        p = tree / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    out = tmp / "pkg.zip"
    create_package(str(tree), out, include_gitignore=False, excludes=list(excludes))
    with zipfile.ZipFile(out) as z:
        return {n for n in z.namelist() if not n.endswith("/")}


def check_runtime_env_file(env, tmp: Path) -> list[str]:
    problems = check_runtime_env(env, "runtime_env.yaml")
    if problems:
        return problems
    if "working_dir" in env:
        problems.append("runtime_env.yaml: leave working_dir to `--working-dir .`")
    got = packaged_files(env.get("excludes", []), tmp)
    problems += [f"runtime_env.yaml: excludes let {p} into the upload" for p in MUST_SKIP if p in got]
    problems += [f"runtime_env.yaml: excludes drop {p} from the upload" for p in MUST_KEEP if p not in got]
    return problems


# ------------------------------------------------------------------- tests ---

@pytest.fixture(scope="module")
def launcher():
    return load_yaml(LAUNCHER)


@pytest.fixture(scope="module")
def raycluster():
    return load_yaml(RAYCLUSTER)


@pytest.fixture(scope="module")
def rayjob():
    return load_yaml(RAYJOB)


def test_every_infra_yaml_parses_and_is_checked():
    files = sorted(p.name for p in INFRA.glob("*.y*ml"))
    assert files == sorted(p.name for p in (LAUNCHER, RAYCLUSTER, RAYJOB, SERVICEACCOUNT, RUNTIME_ENV)), \
        "a new YAML in infra/ needs a checker in tests/test_infra.py"
    for p in INFRA.glob("*.y*ml"):
        assert load_yaml(p), p


def test_no_credentials_in_infra():
    for p in [*INFRA.glob("*.y*ml"), DOCKERFILE]:
        text = p.read_text()
        for name in CREDENTIAL_NAMES + ("aws_secret_access_key",):
            assert not re.search(rf"\b{name}\b\s*[:=]", text), f"{p.name} sets {name}"
        assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text), f"{p.name} contains an AWS access key id"


def test_launcher_config_is_valid(launcher):
    assert check_launcher(launcher) == []


def test_launcher_versions_match_installed_and_pyproject(launcher):
    ray_pin = pinned_version(pyproject_requirements()["ray"])
    assert ray_pin == RAY_VERSION, f"pyproject pins ray {ray_pin}, installed {RAY_VERSION}"
    torch_pins = {pinned_version(i["requirements"]["torch"])
                  for i in pip_installs(launcher["head_setup_commands"] + launcher["worker_setup_commands"])
                  if "torch" in i["requirements"]}
    assert len(torch_pins) == 1, torch_pins
    mk = makefile_torch_pin()
    if mk is not None:
        assert torch_pins == {mk}, f"Makefile pins torch {mk}, launcher {torch_pins}"


def _parent(cfg, path):
    """The dict holding the last key of ``path``, and that key."""
    *parents, last = path
    for key in parents:
        cfg = cfg[key]
    return cfg, last


def _drop(path):
    def f(cfg):
        d, last = _parent(cfg, path)
        del d[last]
    return f


def _set(path, value):
    def f(cfg):
        d, last = _parent(cfg, path)
        d[last] = value
    return f


def _rename(path, new):
    def f(cfg):
        d, last = _parent(cfg, path)
        d[new] = d.pop(last)
    return f


def _replace_in(path, old, new):
    def f(cfg):
        *parents, last = path
        d = cfg
        for k in parents:
            d = d[k]
        d[last] = [c.replace(old, new) for c in d[last]] if isinstance(d[last], list) else d[last].replace(old, new)
    return f


W, H = "ray.worker.gpu", "ray.head.cpu"
LAUNCHER_MUTATIONS = {
    "no provider": (_drop(["provider"]), "provider"),
    "no available_node_types": (_drop(["available_node_types"]), "available_node_types"),
    "typo top-level key": (_rename(["idle_timeout_minutes"], "idle_timeout_minute"), "'idle_timeout_minute'"),
    "head type not defined": (_set(["head_node_type"], "ray.head.default"), "head_node_type"),
    "typo node type key": (_rename(["available_node_types", W, "min_workers"], "min_worker"), "'min_worker'"),
    "no node_config": (_drop(["available_node_types", W, "node_config"]), "node_config"),
    "no resources": (_drop(["available_node_types", W, "resources"]), "resources"),
    "min > max": (_set(["available_node_types", W, "min_workers"], 5), "min_workers"),
    "GPU min not 0": (_set(["available_node_types", W, "min_workers"], 1), "scale to zero"),
    "no GPU resource": (_set(["available_node_types", W, "resources"], {"CPU": 8}), "GPU"),
    "global max too small": (_set(["max_workers"], 2), "max_workers"),
    "typo EC2 field": (_rename(["available_node_types", W, "node_config", "InstanceMarketOptions"],
                               "InstanceMarketOption"), '"InstanceMarketOption"'),
    "bad EC2 value": (_set(["available_node_types", W, "node_config", "InstanceMarketOptions"],
                           {"MarketType": "spot", "SpotOptions": {"MaxPrice": 1.5}}), "MaxPrice"),
    "on-demand GPU": (_drop(["available_node_types", W, "node_config", "InstanceMarketOptions"]), "spot"),
    "no worker IAM profile": (_drop(["available_node_types", W, "node_config", "IamInstanceProfile"]),
                              "IamInstanceProfile"),
    "zone of another region": (_set(["provider", "availability_zone"], "us-east-1a"), "availability zone"),
    "no idle timeout": (_set(["idle_timeout_minutes"], 0), "idle_timeout_minutes"),
    "old ray image": (_set(["docker", "worker_image"], "rayproject/ray:2.9.0-py311-gpu"), "2.9.0"),
    "CPU image on GPU node": (_set(["docker", "worker_image"], f"rayproject/ray:{RAY_VERSION}-py311-cpu"),
                              "CPU image"),
    "untagged image": (_set(["docker", "head_image"], "rayproject/ray"), "tag"),
    "wrong ray pin": (_replace_in(["setup_commands"], f"=={RAY_VERSION}", "==2.9.0"), "ray pin"),
    "ray without extras": (_replace_in(["setup_commands"], "ray[train,data,default]", "ray"), "extras"),
    "dependency missing": (_replace_in(["setup_commands"], '"pyarrow>=14"', ""), "pyarrow"),
    "dependency spec drift": (_replace_in(["setup_commands"], '"numpy>=1.24"', '"numpy>=1.20"'), "numpy"),
    "torch unpinned": (_replace_in(["worker_setup_commands"], '"torch==2.13.0"', "torch"), "torch"),
    "CPU torch on GPU node": (_set(["worker_setup_commands"],
                                   ['pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu']),
                              "CPU wheel index"),
    "no token mount": (_set(["file_mounts"], {}), "auth token"),
    "no RAY_AUTH_MODE": (_set(["docker", "run_options"], ["--ulimit nofile=65536:65536"]), "RAY_AUTH_MODE"),
}


@pytest.mark.parametrize("name", sorted(LAUNCHER_MUTATIONS))
def test_launcher_checker_catches(launcher, name):
    mutate, expect = LAUNCHER_MUTATIONS[name]
    cfg = copy.deepcopy(launcher)
    mutate(cfg)
    problems = check_launcher(cfg)
    assert problems, f"checker missed: {name}"
    assert any(expect in p for p in problems), problems


def test_serviceaccount_uses_an_iam_role():
    sa = load_yaml(SERVICEACCOUNT)
    assert sa["apiVersion"] == "v1" and sa["kind"] == "ServiceAccount"
    arn = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::[^:]+:role/.+", arn), arn


def _service_accounts(spec):
    pods = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    return {p["spec"].get("serviceAccountName") for p in pods}


def test_raycluster_is_valid(raycluster):
    assert check_raycluster(raycluster) == []
    assert _service_accounts(raycluster["spec"]) == {load_yaml(SERVICEACCOUNT)["metadata"]["name"]}


def test_rayjob_is_valid(rayjob):
    assert check_rayjob(rayjob) == []
    assert _service_accounts(rayjob["spec"]["rayClusterSpec"]) == {load_yaml(SERVICEACCOUNT)["metadata"]["name"]}


def test_rayjob_cluster_mirrors_raycluster(raycluster, rayjob):
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"], \
        "change infra/kuberay-rayjob.yaml's rayClusterSpec together with infra/kuberay-raycluster.yaml"


def test_rayjob_entrypoint_script():
    spec = load_yaml(RAYJOB)["spec"]
    script = shlex.split(spec["entrypoint"])[1]
    assert script == "jobs/campaign.py"
    assert script.startswith("jobs/") and script.endswith(".py")


HEAD = ["spec", "headGroupSpec"]
GPU = ["spec", "workerGroupSpecs", 0]
GPU_C = GPU + ["template", "spec", "containers", 0]
RAYCLUSTER_MUTATIONS = {
    "wrong apiVersion": (_set(["apiVersion"], "ray.io/v1alpha1"), "apiVersion"),
    "wrong kind": (_set(["kind"], "RayClustr"), "kind"),
    "no headGroupSpec": (_drop(["spec", "headGroupSpec"]), "headGroupSpec"),
    "no workerGroupSpecs": (_drop(["spec", "workerGroupSpecs"]), "workerGroupSpecs"),
    "autoscaling off": (_set(["spec", "enableInTreeAutoscaling"], False), "enableInTreeAutoscaling"),
    "typo spec field": (_rename(["spec", "enableInTreeAutoscaling"], "enableInTreeAutoScaling"),
                        "'enableInTreeAutoScaling'"),
    "typo group field": (_rename(GPU + ["minReplicas"], "minReplica"), "'minReplica'"),
    "min > max": (_set(GPU + ["minReplicas"], 9), "minReplicas"),
    "GPU min not 0": (_set(GPU + ["minReplicas"], 1), "scale to zero"),
    "no GPU limit": (_drop(GPU_C + ["resources", "limits", "nvidia.com/gpu"]), "nvidia.com/gpu"),
    "GPU request != limit": (_set(GPU_C + ["resources", "requests", "nvidia.com/gpu"], 2), "requests"),
    "old image": (_set(GPU_C + ["image"], "rayproject/ray:2.9.0-py311-gpu"), "2.9.0"),
    "rayVersion drift": (_set(["spec", "rayVersion"], "2.9.0"), "rayVersion"),
    "typo container field": (_rename(GPU_C + ["resources"], "resource"), "'resource'"),
    "typo pod field": (_rename(GPU + ["template", "spec", "tolerations"], "toleration"), "'toleration'"),
    "no service account": (_drop(GPU + ["template", "spec", "serviceAccountName"]), "serviceAccountName"),
    "token auth off": (_drop(["spec", "authOptions"]), "authOptions"),
    "numeric rayStartParam": (_set(HEAD + ["rayStartParams", "num-cpus"], 0), "must be a string"),
    "credential literal": (_set(GPU_C + ["env"], [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]), "credential"),
}


@pytest.mark.parametrize("name", sorted(RAYCLUSTER_MUTATIONS))
def test_raycluster_checker_catches(raycluster, name):
    mutate, expect = RAYCLUSTER_MUTATIONS[name]
    doc = copy.deepcopy(raycluster)
    mutate(doc)
    problems = check_raycluster(doc)
    assert problems, f"checker missed: {name}"
    assert any(expect in p for p in problems), problems


RAYJOB_MUTATIONS = {
    "wrong kind": (_set(["kind"], "RayCluster"), "kind"),
    "no entrypoint": (_drop(["spec", "entrypoint"]), "entrypoint"),
    "entrypoint outside jobs/": (_set(["spec", "entrypoint"], "python tidal_ray/cli.py campaign run"),
                                 "jobs/*.py"),
    "unexpected job script": (_set(["spec", "entrypoint"], "python jobs/campain.py run s3://b/c"),
                              "not one of"),
    "no campaign URI": (_set(["spec", "entrypoint"], "python jobs/campaign.py run"), "campaign URI"),
    "local campaign URI": (_set(["spec", "entrypoint"], "python jobs/campaign.py run campaigns/digits"),
                           "s3://"),
    "not a run": (_set(["spec", "entrypoint"], "python jobs/campaign.py status s3://b/c"), "`jobs/campaign.py run"),
    "unknown action": (_set(["spec", "entrypoint"], "python jobs/campaign.py start s3://b/c"), "action"),
    "CLI rejects arguments": (_set(["spec", "entrypoint"], "python jobs/campaign.py run s3://b/c --cycles 3"),
                              "rejects"),
    "typo spec field": (_rename(["spec", "shutdownAfterJobFinishes"], "shutdownAfterJobFinished"),
                        "'shutdownAfterJobFinished'"),
    "cluster kept": (_set(["spec", "shutdownAfterJobFinishes"], False), "shutdownAfterJobFinishes"),
    "bad ttl": (_set(["spec", "ttlSecondsAfterFinished"], "10m"), "ttlSecondsAfterFinished"),
    "runtime env not YAML": (_set(["spec", "runtimeEnvYAML"], "working_dir: [unclosed"), "not YAML"),
    "runtime env typo": (_set(["spec", "runtimeEnvYAML"], "working_dir: s3://b/c.zip\nenv_var: {}\n"),
                         "'env_var'"),
    "local working_dir": (_set(["spec", "runtimeEnvYAML"], "working_dir: .\n"), "working_dir"),
    "non-string env var": (_set(["spec", "runtimeEnvYAML"],
                                "working_dir: s3://b/c.zip\nenv_vars: {WORKERS: 4}\n"), "env_vars"),
    "cluster spec typo": (_rename(["spec", "rayClusterSpec", "workerGroupSpecs", 0, "maxReplicas"],
                                  "maxReplica"), "'maxReplica'"),
}


@pytest.mark.parametrize("name", sorted(RAYJOB_MUTATIONS))
def test_rayjob_checker_catches(rayjob, name):
    mutate, expect = RAYJOB_MUTATIONS[name]
    doc = copy.deepcopy(rayjob)
    mutate(doc)
    problems = check_rayjob(doc)
    assert problems, f"checker missed: {name}"
    assert any(expect in p for p in problems), problems


def test_runtime_env_as_the_jobs_cli_reads_it(tmp_path):
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

    env = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV))
    assert check_runtime_env_file(env, tmp_path) == []
    assert env["env_vars"].get("AWS_REGION"), "set AWS_REGION for the bucket's region"
    # With --working-dir . the CLI adds working_dir; Ray must still accept the result.
    both = parse_runtime_env_args(runtime_env=str(RUNTIME_ENV), working_dir=str(ROOT))
    assert check_runtime_env(both, "runtime_env.yaml + --working-dir") == []


RUNTIME_ENV_MUTATIONS = {
    "venv uploaded": (lambda e: e["excludes"].remove(".venv/"), ".venv/"),
    "outputs uploaded": (lambda e: e["excludes"].remove("benchmarks/out/"), "benchmarks/out/"),
    "parquet uploaded": (lambda e: e["excludes"].remove("*.parquet"), ".parquet"),
    "campaigns uploaded": (lambda e: e["excludes"].remove("campaigns/"), "campaigns/"),
    "code dropped": (lambda e: e["excludes"].append("jobs/"), "jobs/campaign.py"),
    "typo field": (lambda e: e.__setitem__("exclude", e.pop("excludes")), "'exclude'"),
    "excludes not a list": (lambda e: e.__setitem__("excludes", ".venv/"), "excludes"),
    "credentials": (lambda e: e["env_vars"].__setitem__("AWS_SECRET_ACCESS_KEY", "x"), "credential"),
}


@pytest.mark.parametrize("name", sorted(RUNTIME_ENV_MUTATIONS))
def test_runtime_env_checker_catches(tmp_path, name):
    mutate, expect = RUNTIME_ENV_MUTATIONS[name]
    env = load_yaml(RUNTIME_ENV)
    mutate(env)
    problems = check_runtime_env_file(env, tmp_path)
    assert problems, f"checker missed: {name}"
    assert any(expect in p for p in problems), problems


def test_dockerfile_pins_match():
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms, "Dockerfile has no FROM"
    assert check_image(froms[-1], "Dockerfile FROM", gpu=True) == []
    run = " ".join(re.findall(r"^RUN\s+((?:.*\\\n)*.*)", text, re.M)).replace("\\\n", " ")
    assert check_dependency_pins(pip_installs([run]), "Dockerfile", gpu=True) == []


def test_dockerfile_checker_catches_drift():
    text = DOCKERFILE.read_text().replace(f"=={RAY_VERSION}", "==2.9.0")
    run = " ".join(re.findall(r"^RUN\s+((?:.*\\\n)*.*)", text, re.M)).replace("\\\n", " ")
    assert any("ray pin" in p for p in check_dependency_pins(pip_installs([run]), "Dockerfile", gpu=True))


def test_images_agree_across_files(launcher, raycluster):
    """Same Ray and Python in every image the cluster files name."""
    images = [launcher["docker"]["head_image"], launcher["docker"]["worker_image"],
              re.findall(r"^FROM\s+(\S+)", DOCKERFILE.read_text(), re.M)[-1]]
    spec = raycluster["spec"]
    for tpl in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
        images.append(tpl["spec"]["containers"][0]["image"])
    prefixes = {re.match(r"\d+\.\d+\.\d+-py\d+", image_tag(i)).group(0) for i in images}
    assert len(prefixes) == 1, prefixes
    assert prefixes.pop().startswith(RAY_VERSION + "-py")


def test_cluster_md_points_at_real_files():
    text = CLUSTER_MD.read_text()
    for ref in set(re.findall(r"\binfra/[\w.-]+", text)):
        assert (ROOT / ref).exists(), f"CLUSTER.md mentions {ref}, which does not exist"
    for script in set(re.findall(r"\bjobs/[\w.-]+\.py\b", text)):
        assert script in EXPECTED_JOB_SCRIPTS, f"CLUSTER.md runs {script}"
    joined = text.replace("\\\n", " ")  # shell line continuations
    commands = [c for c in re.findall(r"python jobs/campaign\.py ([^\n`]*)", joined) if "..." not in c]
    assert len(commands) >= 2, "CLUSTER.md should show complete `init` and `run` commands"
    for c in commands:
        assert check_campaign_args(shlex.split(c), "CLUSTER.md") == [], c
    assert "RAY_AUTH_MODE=token" in text and "ray get-auth-token" in text


def test_checker_helpers_parse_pip_commands():
    got = pip_installs(['pip install --no-cache-dir "torch==2.13.0" --index-url https://x/whl/cpu && echo ok',
                        "python -m pip install -U 'ray[data]==2.60.0' numpy"])
    assert [sorted(g["requirements"]) for g in got] == [["torch"], ["numpy", "ray"]]
    assert got[0]["index_urls"] == ["https://x/whl/cpu"]
    assert pinned_version(got[1]["requirements"]["ray"]) == "2.60.0"
    assert pinned_version(got[1]["requirements"]["numpy"]) is None
