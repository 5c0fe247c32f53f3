"""Deployment files: the Kubernetes manifests in k8s/ and the image / VM cluster / runtime env
in cluster/. Offline and fast (no cluster, no Docker engine, no network).

- Kubernetes core kinds (Namespace, PersistentVolumeClaim, any Service/ConfigMap/...) and
  every pod template inside the Ray objects validate strictly (unknown fields are errors)
  against the Kubernetes JSON schemas bundled in ``kubernetes-validate``.
- RayCluster / RayJob validate with ``jsonschema`` against the ``openAPIV3Schema`` of the
  served version in KubeRay's CRDs (``../shared/reference/kuberay-crds/``; skipped when
  absent), read the way the API server reads them: objects are closed (unknown fields are
  errors, as ``kubectl apply`` reports them) unless ``x-kubernetes-preserve-unknown-fields``,
  ``x-kubernetes-int-or-string`` accepts an integer or a string, ``nullable`` admits null,
  ``x-kubernetes-list-type: set|map`` requires unique items / unique map keys, int32/int64
  formats are range-checked. CEL rules (``x-kubernetes-validations``) are not evaluated; the
  KubeRay operator's own admission checks that matter here are spelled out as tests.
- Project rules: image tags derive from pyproject.toml + constraints.txt, every Ray pod runs
  as uid 1000 without privilege escalation or capabilities, has requests and limits (GPU
  limits == requests), a memory-backed /dev/shm and the shared RWX volume at /mnt/moedist;
  no runtime env installs packages; each RayJob runs an existing jobs/ script with flags it
  accepts and fixed (retry-stable) arguments.
"""
from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: read the one key this needs by hand
    tomllib = None

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CLUSTER = REPO / "cluster"
# shared/ sits beside the checkout (../shared); a checkout may also carry its own copy.
CRD_DIRS = [REPO.parent / "shared/reference/kuberay-crds", REPO / "shared/reference/kuberay-crds"]

NAMESPACE = "moedist"
PVC_NAME = "moedist-data"
MOUNT_PATH = "/mnt/moedist"
RUN_AS = 1000
GPU = "nvidia.com/gpu"
# Kubernetes versions the manifests must be valid for (oldest supported, a recent one).
K8S_VERSIONS = ("1.30", "1.33")
# Runtime-env keys that install packages when a job starts.
INSTALLING_KEYS = {"pip", "uv", "conda"}
# Pod Security Standards "restricted": the only volume types allowed.
RESTRICTED_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}


def _load(text: str):
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _load_all(text: str) -> list:
    return [d for d in yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d is not None]


# ----------------------------------------------------------------------------- expectations


@functools.cache
def pins() -> dict[str, str]:
    """{'moedist': <pyproject version>, 'torch': ..., 'ray': ..., 'deepspeed': ...} from the repo."""
    text = (REPO / "pyproject.toml").read_text()
    if tomllib is not None:
        version = tomllib.loads(text)["project"]["version"]
    else:
        version = re.search(r'^version\s*=\s*"([^"]+)"', text, flags=re.MULTILINE).group(1)
    out = {"moedist": version}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def expected_tag() -> str:
    p = pins()
    return f"{p['moedist']}-torch{p['torch']}-ray{p['ray']}"


def split_image(ref: str) -> tuple[str, str | None]:
    """'reg:5000/team/moedist:TAG' -> ('reg:5000/team/moedist', 'TAG')."""
    if "@" in ref:
        ref = ref.split("@", 1)[0]
    last = ref.rsplit("/", 1)[-1]
    if ":" in last:
        return ref[: ref.rindex(":")], ref[ref.rindex(":") + 1 :]
    return ref, None


# ----------------------------------------------------------------------------- manifests


def k8s_files() -> list[Path]:
    return sorted(p for p in K8S.iterdir() if p.suffix in {".yaml", ".yml"})


def resource_files() -> list[Path]:
    """What `kubectl apply -f k8s/` reads: every *.yaml / *.yml (the kustomization is named
    `Kustomization`, no extension, precisely so that -f skips it)."""
    return k8s_files()


@functools.cache
def documents() -> tuple[tuple[str, dict], ...]:
    """(file name, object) for every object in k8s/ (kustomization excluded)."""
    return tuple((p.name, d) for p in resource_files() for d in _load_all(p.read_text()))


def of_kind(*kinds: str) -> list[tuple[str, dict]]:
    return [(f, d) for f, d in documents() if d.get("kind") in kinds]


def cluster_specs() -> Iterator[tuple[str, dict]]:
    """(label, RayClusterSpec) of the RayCluster and of every RayJob's own cluster."""
    for f, d in of_kind("RayCluster"):
        yield f"{f}:{d['metadata']['name']}", d["spec"]
    for f, d in of_kind("RayJob"):
        if d["spec"].get("rayClusterSpec"):
            yield f"{f}:{d['metadata']['name']}", d["spec"]["rayClusterSpec"]


def ray_pod_templates() -> Iterator[tuple[str, dict]]:
    """(label, PodTemplateSpec) of every Ray head and worker group."""
    for label, spec in cluster_specs():
        yield f"{label}/head", spec["headGroupSpec"]["template"]
        for g in spec.get("workerGroupSpecs") or []:
            yield f"{label}/{g['groupName']}", g["template"]


def all_pod_templates() -> Iterator[tuple[str, dict]]:
    """Ray pods plus RayJob submitter pods."""
    yield from ray_pod_templates()
    for f, d in of_kind("RayJob"):
        if d["spec"].get("submitterPodTemplate"):
            yield f"{f}:{d['metadata']['name']}/submitter", d["spec"]["submitterPodTemplate"]


def containers(pod_spec: dict) -> list[dict]:
    return list(pod_spec.get("initContainers") or []) + list(pod_spec.get("containers") or [])


def has_gpu(pod_spec: dict) -> bool:
    return any(GPU in ((c.get("resources") or {}).get("limits") or {}) for c in containers(pod_spec))


_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
           "n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def quantity(q) -> float:
    """A Kubernetes resource quantity as a number ('500m' -> 0.5, '16Gi' -> 17179869184)."""
    m = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|)", str(q).strip())
    assert m, f"not a quantity: {q!r}"
    return float(m.group(1)) * _SUFFIX[m.group(2)]


# ----------------------------------------------------------------------------- CRD schemas


def crd_dir() -> Path:
    for d in CRD_DIRS:
        if (d / "ray.io_rayclusters.yaml").is_file() and (d / "ray.io_rayjobs.yaml").is_file():
            return d
    pytest.skip("KubeRay CRDs not found (../shared/reference/kuberay-crds)")


@functools.cache
def crd_schema(kind: str, version: str) -> dict:
    files = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
    crd = _load((crd_dir() / files[kind]).read_text())
    assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
    served = {v["name"]: v for v in crd["spec"]["versions"] if v.get("served")}
    assert version in served, f"{kind} {version} is not served by the CRD (served: {sorted(served)})"
    return structural(served[version]["schema"]["openAPIV3Schema"], top=True)


def structural(node: Any, top: bool = False) -> Any:
    """An OpenAPI v3 CRD schema as the API server applies it, in JSON-schema terms."""
    if isinstance(node, list):
        return [structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k in ("properties", "patternProperties"):
            out[k] = {name: structural(s) for name, s in v.items()}
        elif k == "x-kubernetes-validations" or k == "description":
            continue  # CEL is not evaluated here; descriptions are noise
        else:
            out[k] = structural(v)
    if out.get("x-kubernetes-embedded-resource"):
        props = out.setdefault("properties", {})
        for name in ("apiVersion", "kind"):
            props.setdefault(name, {"type": "string"})
        props.setdefault("metadata", {"type": "object"})
    # Structural schemas prune (kubectl: reject) fields they do not declare.
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
        and not top  # apiVersion/kind/metadata/status are always accepted at the top
    ):
        out["additionalProperties"] = False
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _int_or_string(validator, value, instance, schema):
    if value and not (isinstance(instance, (int, str)) and not isinstance(instance, bool)):
        yield jsonschema.ValidationError(f"{instance!r} is neither an integer nor a string")


def _list_type(validator, value, instance, schema):
    if not isinstance(instance, list):
        return
    if value == "set":
        seen = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate item {item!r} in a list-type=set")
            seen.append(item)
    elif value == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or []
        props = (schema.get("items") or {}).get("properties") or {}
        seen = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(item.get(k, (props.get(k) or {}).get("default")) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate entry for map keys {dict(zip(keys, key))}")
            seen.add(key)


_formats = jsonschema.FormatChecker()


@_formats.checks("int32")
def _int32(v) -> bool:
    return not isinstance(v, int) or -(2**31) <= v < 2**31


@_formats.checks("int64")
def _int64(v) -> bool:
    return not isinstance(v, int) or -(2**63) <= v < 2**63


CRDValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator,
    {"x-kubernetes-int-or-string": _int_or_string, "x-kubernetes-list-type": _list_type},
)


def crd_errors(obj: dict) -> list[str]:
    group, version = obj["apiVersion"].split("/")
    assert group == "ray.io", obj["apiVersion"]
    schema = crd_schema(obj["kind"], version)
    v = CRDValidator(schema, format_checker=_formats)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"[:400] for e in v.iter_errors(obj)]


# ============================================================================ tests: files


def test_every_manifest_parses_into_named_objects():
    files = k8s_files()
    assert files, "k8s/ has no YAML"
    for p in files:
        docs = _load_all(p.read_text())
        assert docs, f"{p.name} is empty"
        for d in docs:
            assert isinstance(d, dict) and d.get("apiVersion") and d.get("kind"), f"{p.name}: not an object"
            if d["kind"] != "Kustomization":
                assert d.get("metadata", {}).get("name"), f"{p.name}: {d['kind']} without a name"
    kinds = {d["kind"] for _, d in documents()}
    assert {"Namespace", "PersistentVolumeClaim", "RayCluster", "RayJob"} <= kinds


def test_kustomization_lists_exactly_the_files_present():
    assert not (K8S / "kustomization.yaml").exists(), "`kubectl apply -f k8s/` would try to create it"
    kust = _load((K8S / "Kustomization").read_text())
    assert kust["kind"] == "Kustomization"
    listed = kust.get("resources") or []
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    assert set(listed) == {p.name for p in resource_files()}
    assert kust.get("namespace") in (None, NAMESPACE)
    # An image override in the kustomization must keep the tag scheme.
    for img in kust.get("images") or []:
        if "newTag" in img:
            assert img["newTag"] == expected_tag()


def test_kustomize_builds_the_same_objects():
    """`kubectl apply -k k8s/` input: kustomize must build, in the moedist namespace."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl not installed")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    built = _load_all(out.stdout)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in built) == sorted(
        (d["kind"], d["metadata"]["name"]) for _, d in documents()
    )
    assert built[0]["kind"] == "Namespace"  # created before what lives in it
    for d in built:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, d["metadata"]["name"]


def test_objects_live_in_the_moedist_namespace():
    ((_, ns),) = of_kind("Namespace")
    assert ns["metadata"]["name"] == NAMESPACE
    # Pod Security Admission enforces what the pod rules below check.
    assert ns["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce") == "restricted"
    for f, d in documents():
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, f"{f}: {d['kind']} {d['metadata']['name']}"


# ============================================================================ tests: schemas


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_core_kinds_validate_against_kubernetes_schemas(k8s_version):
    # Everything but KubeRay's kinds: core and built-in groups (v1, apps/v1, networking.k8s.io/v1,
    # ...); another custom resource would have no schema here and fail, on purpose.
    core = [(f, d) for f, d in documents() if d["apiVersion"].rpartition("/")[0] != "ray.io"]
    assert {d["kind"] for _, d in core} >= {"Namespace", "PersistentVolumeClaim"}
    for f, d in core:
        try:
            kubernetes_validate.validate(d, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{f}: {d['kind']} invalid for Kubernetes {k8s_version}: {'.'.join(map(str, e.path))}: {e.message}")


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
def test_pod_templates_validate_strictly_as_kubernetes_pod_templates(k8s_version):
    """The CRD schemas embed PodTemplateSpec; the strict core schema also catches misspelt
    fields that the API server would silently prune from a custom resource."""
    for label, tpl in all_pod_templates():
        obj = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t", "namespace": NAMESPACE}, "template": tpl}
        try:
            kubernetes_validate.validate(obj, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{label}: invalid pod template for Kubernetes {k8s_version}: {'.'.join(map(str, e.path))}: {e.message}")


def test_ray_objects_validate_against_the_kuberay_crds():
    objs = of_kind("RayCluster", "RayJob")
    assert objs
    for f, d in objs:
        errors = crd_errors(d)
        assert not errors, f"{f}: {d['kind']} {d['metadata']['name']}:\n" + "\n".join(errors[:20])


def test_the_crd_check_rejects_what_the_api_server_would():
    """The schema conversion is strict enough to matter."""
    ((_, cluster),) = of_kind("RayCluster")
    import copy

    bad = copy.deepcopy(cluster)
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["securtyContext"] = {}
    assert any("securtyContext" in e for e in crd_errors(bad))
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "4"
    assert crd_errors(bad)
    bad = copy.deepcopy(cluster)
    bad["spec"]["workerGroupSpecs"][0]["maxReplicas"] = 2**40  # int32
    assert crd_errors(bad)
    bad = copy.deepcopy(cluster)
    bad["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # values are strings
    assert crd_errors(bad)
    bad = copy.deepcopy(cluster)
    vols = bad["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    vols.append(dict(vols[0]))  # duplicate map key "name"
    assert any("duplicate" in e for e in crd_errors(bad))
    bad = copy.deepcopy(cluster)
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = [4]
    assert crd_errors(bad)
    ok = copy.deepcopy(cluster)
    ok["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] = 4  # int-or-string
    assert not crd_errors(ok)


# ============================================================================ tests: KubeRay's own admission rules


def test_kuberay_operator_rules():
    """The checks the KubeRay operator makes before it creates anything (validation.go)."""
    for f, d in of_kind("RayCluster", "RayJob"):
        name = d["metadata"]["name"]
        limit = 53 if d["kind"] == "RayCluster" else 47
        assert len(name) <= limit and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), f"{f}: bad name {name!r}"
    for label, spec in cluster_specs():
        assert spec["headGroupSpec"]["template"]["spec"]["containers"], label
        assert spec.get("rayVersion") == pins()["ray"], f"{label}: rayVersion must be the pinned Ray"
        if (spec.get("authOptions") or {}).get("mode") == "token":
            assert tuple(map(int, spec["rayVersion"].split(".")[:2])) >= (2, 52), label
        autoscaling = bool(spec.get("enableInTreeAutoscaling"))
        v2 = ((spec.get("autoscalerOptions") or {}).get("version")) == "v2"
        groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs") or []]
        for gname, g in groups:
            params = g.get("rayStartParams") or {}
            assert not (g.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(params)), (label, gname)
            assert "labels" not in params, (label, gname)
            if v2:
                assert g["template"]["spec"].get("restartPolicy") in (None, "Never"), (label, gname)
        for g in spec.get("workerGroupSpecs") or []:
            assert g["template"]["spec"]["containers"], (label, g["groupName"])
            if not autoscaling:
                assert "minReplicas" in g and "maxReplicas" in g
            assert 0 <= g.get("minReplicas", 0) <= g.get("replicas", 0) <= g["maxReplicas"], (label, g["groupName"])
            assert not g.get("suspend"), (label, g["groupName"])
    for f, d in of_kind("RayJob"):
        s = d["spec"]
        selector = s.get("clusterSelector") or {}
        assert bool(s.get("rayClusterSpec")) != bool(selector), f"{f}: exactly one of rayClusterSpec / clusterSelector"
        if s.get("suspend"):
            assert s.get("shutdownAfterJobFinishes") and not selector, f"{f}: only an owned cluster can be suspended"
        if selector:
            assert not s.get("backoffLimit"), f"{f}: backoffLimit is incompatible with clusterSelector"
        assert isinstance(_load(s.get("runtimeEnvYAML") or "{}"), dict), f"{f}: runtimeEnvYAML is not a YAML mapping"


# ============================================================================ tests: project rules


def test_image_tags_follow_the_scheme_everywhere():
    tag = expected_tag()
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}", tag), tag
    refs: list[tuple[str, str]] = []
    for label, tpl in all_pod_templates():
        refs += [(f"{label}/{c['name']}", c["image"]) for c in containers(tpl["spec"])]
    for label, spec in cluster_specs():
        if (spec.get("autoscalerOptions") or {}).get("image"):
            refs.append((f"{label}/autoscaler", spec["autoscalerOptions"]["image"]))
    docker = _load((CLUSTER / "ray-cluster.yaml").read_text())["docker"]
    refs += [(f"ray-cluster.yaml docker.{k}", docker[k]) for k in ("image", "head_image", "worker_image") if k in docker]
    assert len(refs) >= 5
    for where, ref in refs:
        repo, got = split_image(ref)
        assert repo.rsplit("/", 1)[-1] == "moedist", f"{where}: {ref} is not the moedist image"
        assert got == tag, f"{where}: {ref} should be tagged {tag} (pyproject version + constraints pins)"


def test_image_tag_script_prints_the_tag():
    out = subprocess.run(["sh", str(CLUSTER / "image-tag.sh")], check=False, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected_tag()


def test_version_labels_match_pyproject():
    for f, d in documents():
        v = d["metadata"].get("labels", {}).get("app.kubernetes.io/version")
        if v is not None:
            assert v == pins()["moedist"], f"{f}: app.kubernetes.io/version {v}"


def test_every_container_has_requests_and_limits_and_gpu_limits_equal_requests():
    for label, tpl in all_pod_templates():
        for c in containers(tpl["spec"]):
            res = c.get("resources") or {}
            req, lim = res.get("requests") or {}, res.get("limits") or {}
            for r in ("cpu", "memory"):
                assert r in req and r in lim, f"{label}/{c['name']}: {r} needs a request and a limit"
                assert quantity(req[r]) <= quantity(lim[r]), f"{label}/{c['name']}: {r} request above limit"
            if GPU in req or GPU in lim:
                assert req.get(GPU) is not None and quantity(req[GPU]) == quantity(lim.get(GPU, -1)), (
                    f"{label}/{c['name']}: GPU limits must equal requests"
                )
                assert quantity(lim[GPU]) >= 1
    for label, spec in cluster_specs():
        res = (spec.get("autoscalerOptions") or {}).get("resources") or {}
        for r in ("cpu", "memory"):
            assert r in (res.get("requests") or {}) and r in (res.get("limits") or {}), f"{label}/autoscaler: {r}"


def test_gpus_only_on_worker_groups():
    for label, spec in cluster_specs():
        head = spec["headGroupSpec"]
        assert not has_gpu(head["template"]["spec"]), f"{label}: the head must not take a GPU"
        assert (head.get("rayStartParams") or {}).get("num-gpus", "0") == "0"
        assert any(has_gpu(g["template"]["spec"]) for g in spec.get("workerGroupSpecs") or []), f"{label}: no GPU group"


def test_autoscaling_is_on_with_bounds():
    for label, spec in cluster_specs():
        assert spec.get("enableInTreeAutoscaling") is True, label
        for g in spec["workerGroupSpecs"]:
            assert "minReplicas" in g and "maxReplicas" in g and g["maxReplicas"] >= 1, (label, g["groupName"])


def test_shm_is_memory_backed_and_sized_for_the_object_store():
    """Ray's object store (30% of memory by default) and NCCL live in /dev/shm; the runtime's
    default is 64 MiB. Memory-backed, it counts against the memory limit."""
    for label, tpl in ray_pod_templates():
        spec = tpl["spec"]
        vols = {v["name"]: v for v in spec.get("volumes") or []}
        for c in spec["containers"]:
            if c is not spec["containers"][0] and GPU not in ((c.get("resources") or {}).get("limits") or {}):
                continue  # the Ray container, and any other container that holds a GPU
            mounts = [m for m in c.get("volumeMounts") or [] if m["mountPath"] == "/dev/shm"]
            assert mounts, f"{label}/{c['name']}: /dev/shm not mounted"
            empty = vols[mounts[0]["name"]].get("emptyDir")
            assert empty and empty.get("medium") == "Memory" and empty.get("sizeLimit"), (
                f"{label}: /dev/shm must be an emptyDir with medium Memory and a sizeLimit"
            )
            mem = quantity(c["resources"]["limits"]["memory"])
            assert 0.3 * mem <= quantity(empty["sizeLimit"]) < mem, f"{label}: /dev/shm sizeLimit vs memory limit"


def test_pods_run_as_non_root_without_privileges():
    dockerfile_user = dockerfile_instructions("USER")[-1].split(":")[0]
    assert dockerfile_user == str(RUN_AS)
    for label, tpl in all_pod_templates():
        spec = tpl["spec"]
        psc = spec.get("securityContext") or {}
        assert psc.get("runAsNonRoot") is True, f"{label}: pod runAsNonRoot"
        assert (psc.get("seccompProfile") or {}).get("type") in ("RuntimeDefault", "Localhost"), f"{label}: seccomp"
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(host), f"{label}: {host}"
        for v in spec.get("volumes") or []:
            kinds = set(v) - {"name"}
            assert kinds <= RESTRICTED_VOLUME_TYPES, f"{label}: volume {v['name']} of type {kinds}"
        for c in containers(spec):
            sc = c.get("securityContext") or {}
            where = f"{label}/{c['name']}"
            assert sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation must be false"
            assert not sc.get("privileged"), where
            caps = sc.get("capabilities") or {}
            assert "ALL" in (caps.get("drop") or []), f"{where}: capabilities must drop ALL"
            assert set(caps.get("add") or []) <= {"NET_BIND_SERVICE"}, where
            assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", psc.get("runAsUser")) == RUN_AS, f"{where}: runs as uid {RUN_AS}"
    for label, spec in cluster_specs():
        sc = (spec.get("autoscalerOptions") or {}).get("securityContext") or {}
        assert sc.get("runAsNonRoot") is True and sc.get("allowPrivilegeEscalation") is False, f"{label}/autoscaler"
        assert "ALL" in ((sc.get("capabilities") or {}).get("drop") or []), f"{label}/autoscaler"


def test_shared_volume_is_rwx_and_mounted_at_the_same_path_in_every_ray_pod():
    """Submitter pods only talk HTTP to the dashboard and do not mount it."""
    pvcs = {d["metadata"]["name"]: d for _, d in of_kind("PersistentVolumeClaim")}
    assert PVC_NAME in pvcs
    assert pvcs[PVC_NAME]["spec"]["accessModes"] == ["ReadWriteMany"]
    for label, tpl in ray_pod_templates():
        spec = tpl["spec"]
        names = [v["name"] for v in spec.get("volumes") or [] if (v.get("persistentVolumeClaim") or {}).get("claimName") == PVC_NAME]
        assert len(names) == 1, f"{label}: the {PVC_NAME} claim must be a volume"
        ray_container = spec["containers"][0]
        paths = [m["mountPath"] for m in ray_container.get("volumeMounts") or [] if m["name"] == names[0]]
        assert paths == [MOUNT_PATH], f"{label}: {PVC_NAME} must be mounted at {MOUNT_PATH}"
        for c in containers(spec):
            for m in c.get("volumeMounts") or []:
                if m["name"] == names[0]:
                    assert m["mountPath"] == MOUNT_PATH and not m.get("subPath"), f"{label}/{c['name']}"


def test_rayjobs_retry_a_bounded_number_of_times_and_clean_up():
    jobs = of_kind("RayJob")
    assert {d["metadata"]["name"] for _, d in jobs} >= {"moedist-extract", "moedist-tune-hm4sr", "moedist-train-mamex"}
    for f, d in jobs:
        s = d["spec"]
        assert 1 <= s.get("backoffLimit", 0) <= 5, f"{f}: backoffLimit"
        assert s.get("shutdownAfterJobFinishes") is True, f"{f}: shutdownAfterJobFinishes"
        assert s.get("ttlSecondsAfterFinished", 0) > 0, f"{f}: ttlSecondsAfterFinished"
        assert s.get("rayClusterSpec"), f"{f}: brings its own cluster (see the file's header)"


def _entrypoint(d: dict) -> list[str]:
    return shlex.split(d["spec"]["entrypoint"])


@functools.cache
def script_options(script: str) -> frozenset[str]:
    """The --options a jobs/ script accepts, from its own `--help` (the scripts share parsers)."""
    out = subprocess.run([sys.executable, script, "--help"], cwd=REPO, check=False, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, f"{script} --help failed:\n{out.stderr[-2000:]}"
    text = out.stdout
    section = re.split(r"^(?:options|optional arguments):\s*$", text, flags=re.MULTILINE)
    assert len(section) > 1, f"{script} --help has no options section"
    return frozenset(re.findall(r"^\s{2}(?:-\w[ ,\w]*?, )?(--[a-z0-9][a-z0-9-]*)", section[-1], flags=re.MULTILINE)) | frozenset(
        re.findall(r", (--[a-z0-9][a-z0-9-]*)", section[-1])
    )


# Options that name where a run lives: given when a script has them, so every retry of a
# RayJob writes to (and resumes from) the same place on the shared volume.
RUN_IDENTITY = ("--storage", "--name", "--run-dir")


def test_rayjob_entrypoints_run_existing_job_scripts_with_options_they_accept():
    for f, d in of_kind("RayJob"):
        argv = _entrypoint(d)
        assert argv[0] in ("python", "python3"), f"{f}: entrypoint must be `python jobs/<script>.py ...`"
        script = argv[1]
        assert re.fullmatch(r"jobs/[a-z0-9_]+\.py", script), f"{f}: {script}"
        assert (REPO / script).is_file(), f"{f}: {script} does not exist"
        accepted = script_options(script)
        for arg in argv[2:]:
            if arg.startswith("--"):
                assert arg.split("=", 1)[0] in accepted, f"{f}: {script} has no {arg} option ({sorted(accepted)})"
        for flag in RUN_IDENTITY:
            if flag in accepted:
                assert flag in argv, f"{f}: pass {flag} so that a retry finds the same run"


def test_rayjob_config_overrides_name_real_keys():
    """`section.key=value` arguments must be ExperimentConfig keys (the CLI rejects others)."""
    import dataclasses

    from moedist.train.config import ExperimentConfig

    for f, d in of_kind("RayJob"):
        for arg in _entrypoint(d)[2:]:
            m = re.fullmatch(r"([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)=.*", arg)
            if not m:
                continue
            node = ExperimentConfig
            for part in m.group(1).split("."):
                fields = {fl.name: fl for fl in dataclasses.fields(node)} if dataclasses.is_dataclass(node) else {}
                assert part in fields, f"{f}: {m.group(1)} is not an ExperimentConfig key"
                node = fields[part].type
                if isinstance(node, str):  # postponed annotations: resolve the dataclass by name
                    node = getattr(sys.modules[ExperimentConfig.__module__], node, node)


def test_rayjob_arguments_are_fixed_and_on_the_shared_volume():
    """A retried job must run the same command (same run, so it resumes), and every path it
    names must be on the volume all pods share."""
    for f, d in of_kind("RayJob"):
        text = d["spec"]["entrypoint"]
        assert not re.search(r"[$`]|\b(date|uuid|uuidgen|random)\b", text), f"{f}: entrypoint must not vary per attempt"
        argv = _entrypoint(d)
        for arg in argv[2:]:
            value = arg.split("=", 1)[-1]
            if value.startswith("/"):
                assert value == MOUNT_PATH or value.startswith(MOUNT_PATH + "/"), f"{f}: {value} is not on {MOUNT_PATH}"
        for flag in ("--storage", "--run-dir", "--data"):
            if flag in argv:
                value = argv[argv.index(flag) + 1]
                assert value.startswith(MOUNT_PATH + "/"), f"{f}: {flag} {value} must be on {MOUNT_PATH}"


def runtime_envs() -> list[tuple[str, dict]]:
    envs = [("cluster/runtime_env.yaml", _load((CLUSTER / "runtime_env.yaml").read_text()))]
    for f, d in of_kind("RayJob"):
        envs.append((f"{f} runtimeEnvYAML", _load(d["spec"].get("runtimeEnvYAML") or "{}")))
    return envs


def test_no_runtime_env_installs_packages():
    for where, env in runtime_envs():
        assert isinstance(env, dict), where
        assert not INSTALLING_KEYS & set(env), f"{where}: {INSTALLING_KEYS & set(env)} installs packages at job start"
        assert all(isinstance(v, str) for v in (env.get("env_vars") or {}).values()), f"{where}: env_vars must be strings"
        assert "RAY_AUTH_MODE" not in (env.get("env_vars") or {}), f"{where}: leave auth to the cluster"
        assert env.get("working_dir"), f"{where}: `python jobs/...` needs a working_dir"
    # Kubernetes jobs and VM jobs see the same environment variables.
    variables = {where: env.get("env_vars") for where, env in runtime_envs()}
    assert len({tuple(sorted(v.items())) for v in variables.values()}) == 1, variables


# ============================================================================ tests: cluster/


def dockerfile_lines() -> list[str]:
    """Instructions of cluster/Dockerfile, continuation lines joined, comments dropped."""
    out, cur = [], ""
    for raw in (CLUSTER / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or not line:
            continue
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    assert not cur, "Dockerfile ends inside a continuation"
    return out


def dockerfile_instructions(name: str) -> list[str]:
    return [line.split(None, 1)[1] for line in dockerfile_lines() if line.split(None, 1)[0].upper() == name]


def dockerfile_args() -> dict[str, str]:
    args = {}
    for a in dockerfile_instructions("ARG"):
        k, _, v = a.partition("=")
        args[k.strip()] = v.strip().strip('"')
    return args


def test_dockerfile_pins_its_base_image_matching_the_torch_build():
    args = dockerfile_args()
    (base,) = dockerfile_instructions("FROM")
    base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), base.split()[0])
    repo, tag = split_image(base)
    assert tag and tag != "latest" and re.match(r"\d+\.\d+\.\d+", tag), f"base image {base} must be pinned to a version tag"
    if repo == "nvidia/cuda":
        cuda = tag.split("-")[0]
        import importlib.metadata as md

        try:
            local = md.version("torch").partition("+")[2]  # e.g. cu130
        except md.PackageNotFoundError:
            local = ""
        if local.startswith("cu"):
            want = f"{local[2:-1]}.{local[-1]}"  # cu130 -> 13.0
            assert cuda.startswith(want + "."), f"base CUDA {cuda} does not match torch's {local}"


def test_dockerfile_build_args_match_the_pins():
    args, p = dockerfile_args(), pins()
    assert args["MOEDIST_VERSION"] == p["moedist"]
    assert args["TORCH_VERSION"] == p["torch"]
    assert args["RAY_VERSION"] == p["ray"]
    assert args["DEEPSPEED_VERSION"] == p["deepspeed"]
    labels = " ".join(dockerfile_instructions("LABEL"))
    assert "org.opencontainers.image.version=" in labels and "${MOEDIST_VERSION}" in labels
    assert any(re.search(r"\bMOEDIST_VERSION=\$\{?MOEDIST_VERSION", e) for e in dockerfile_instructions("ENV"))


def test_dockerfile_installs_the_pinned_stack_at_build_time_as_non_root_user():
    runs = dockerfile_instructions("RUN")
    installs = [cmd for run in runs for cmd in re.split(r"&&|;", run) if re.search(r"\bpip3? install\b", cmd)]
    assert installs
    for cmd in installs:
        assert re.search(r"(-c|--constraint)[ =]constraints\.txt\b", cmd), f"pip install without -c constraints.txt: {cmd}"
    ds = [c for c in installs if re.search(r"\bdeepspeed\b", c)]
    assert ds and all("--no-build-isolation" in c for c in ds)
    assert any("DS_BUILD_OPS=0" in run for run in runs if "deepspeed" in run)
    assert any(re.search(r"\btorch torchvision\b", c) for c in installs), "torch + torchvision first"
    copied = " ".join(dockerfile_instructions("COPY"))
    for needed in ("constraints.txt", "pyproject.toml", "moedist", "jobs"):
        assert needed in copied, f"the image needs {needed}"
    user = dockerfile_instructions("USER")
    assert user and re.fullmatch(r"[1-9][0-9]*(:[0-9]+)?", user[-1].strip()), "final USER must be a numeric non-root uid"
    lines = dockerfile_lines()
    last_user = max(i for i, l in enumerate(lines) if l.upper().startswith("USER "))
    assert not any(l.upper().startswith("RUN ") for l in lines[last_user:]), "nothing may run as root after USER"
    for start in dockerfile_instructions("ENTRYPOINT") + dockerfile_instructions("CMD"):
        assert "pip" not in start


def test_dockerignore_keeps_what_the_image_copies():
    ignore = [l.strip() for l in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines() if l.strip() and not l.startswith("#")]
    if ignore and ignore[0] == "*":  # an allow-list
        allowed = {l[1:].rstrip("/") for l in ignore if l.startswith("!")}
        for copy in dockerfile_instructions("COPY"):
            for src in copy.split()[:-1]:
                if not src.startswith("--"):
                    assert src.rstrip("/") in allowed, f"COPY {src} is excluded by Dockerfile.dockerignore"
    for big in (".venv", "data", "runs", ".git"):
        assert f"!{big}" not in ignore


def test_vm_cluster_config_installs_nothing_at_start_and_uses_the_image():
    cfg = _load((CLUSTER / "ray-cluster.yaml").read_text())
    import importlib.util

    spec = importlib.util.find_spec("ray")
    schema_path = Path(spec.origin).parent / "autoscaler/ray-schema.json" if spec and spec.origin else None
    if schema_path and schema_path.is_file():
        import json

        jsonschema.validate(cfg, json.loads(schema_path.read_text()))
        # What `ray up` does first: merge the provider's defaults and validate the result.
        from ray.autoscaler._private.util import prepare_config, validate_config

        merged = prepare_config(cfg)
        validate_config(merged)
        assert merged["setup_commands"] == merged["head_setup_commands"] == merged["worker_setup_commands"] == []
    # Provider defaults pip-install Ray/boto3 unless these are given explicitly.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert key in cfg, f"ray-cluster.yaml must set {key} (the provider default installs packages)"
    commands = [c for k, v in cfg.items() if k.endswith("_commands") for c in v or []]
    for c in commands:
        assert not re.search(r"\b(pip3?|uv|conda|mamba)\b.*\binstall\b", c), f"installs at start: {c}"
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0
    workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
    assert workers and all(t.get("min_workers", 0) <= t["max_workers"] for t in workers)
    assert any(f"{MOUNT_PATH}:{MOUNT_PATH}" in o for o in cfg["docker"].get("run_options", [])), "shared volume in the container"
