"""Validate everything in deploy/ that can be checked without a cluster, a Docker daemon or the network.

    python -m pip install -r deploy/validate-requirements.txt && python deploy/validate.py
    python deploy/validate.py --self-test     # each of a list of mistakes, made in a copy, must fail

(.ci/deploy_stage does this in a virtual environment of its own.) The checks, each tool working offline from
what its wheel ships:

- every Kubernetes manifest (deploy/k8s/**/*.yaml) with ``kubernetes-validate --strict`` against the
  Kubernetes versions below. It has no schema for custom resources and only warns about them, so a
  LeaderWorkerSet is checked here instead: its top-level fields against deploy/schemas/, our own schema, and
  its leader and worker pod templates as core ``PodTemplate`` objects, strictly. Any other kind it does not
  know (a misspelt ``kind:``, say) fails;
- the Dockerfiles with hadolint;
- deploy/compose.yaml against the compose specification that check-jsonschema vendors;
- ``docker build`` of Dockerfile.cpu, only where a Docker daemon answers (skipped with a message otherwise).

That the manifests agree with the code (flags ``ftserve serve`` has, probe paths the server serves, ports) is
tests/test_deploy.py's job, in the default test suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

DEPLOY = Path(__file__).resolve().parent
REPO = DEPLOY.parent
# The oldest Kubernetes the manifests support (the preStop `sleep` action is on by default from 1.30) and the
# newest that kubernetes-validate ships schemas for.
KUBERNETES = ("1.30", "1.37")
DOCKERFILES = ("Dockerfile", "Dockerfile.cpu")
SCHEMAS = {("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset.schema.json"}


def pod_templates(doc: dict) -> dict[str, dict]:
    """A LeaderWorkerSet's pod templates by their place in it (the leader's is optional)."""
    spec = doc.get("spec", {}).get("leaderWorkerTemplate", {})
    return {f"leaderWorkerTemplate.{key}": spec[key] for key in ("leaderTemplate", "workerTemplate") if key in spec}


def check_custom(deploy: Path, doc: dict, where: str) -> list[str]:
    schema = json.loads((deploy / "schemas" / SCHEMAS[(doc.get("apiVersion"), doc.get("kind"))]).read_text())
    problems = [f"{where}: {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]
    for path, template in pod_templates(doc).items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{doc['metadata']['name']}"},
                   "template": template}
        for version in KUBERNETES:
            try:
                kubernetes_validate.validate(wrapped, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{where}: spec.{path} as a Kubernetes {version} PodTemplate: "
                                f"{'.'.join(map(str, exc.path)) or '(top)'}: {exc.message}")
    return problems


def check_kubernetes(deploy: Path) -> list[str]:
    files = sorted((deploy / "k8s").rglob("*.yaml"))
    if not files:
        return ["no manifests under deploy/k8s"]
    problems = []
    # --quiet: failures and warnings only; the warning for each custom resource is answered just below.
    for version in KUBERNETES:
        result = run(["kubernetes-validate", "--strict", "--quiet", "-k", version, *map(str, files)])
        if result.returncode:
            problems.append(f"kubernetes-validate --strict -k {version} failed (exit {result.returncode})")
    for path in files:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is None:
                continue
            where = f"{path.relative_to(deploy.parent)}[{i}] {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            if (doc.get("apiVersion"), doc.get("kind")) in SCHEMAS:
                found = check_custom(deploy, doc, where)
                problems += found
                if not found:
                    print(f"{where}: its fields match deploy/schemas/ and its pod templates are valid PodTemplates")
                continue
            try:
                kubernetes_validate.validate(doc, KUBERNETES[0], strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{where}: kind {doc.get('kind')} of {doc.get('apiVersion')} is neither a "
                                f"Kubernetes kind nor one of ours ({sorted(k for _, k in SCHEMAS)})")
            except kubernetes_validate.ValidationError:
                pass  # reported by the command above
    return problems


def check_dockerfiles(deploy: Path) -> list[str]:
    result = run(["hadolint", *(str(deploy / name) for name in DOCKERFILES)])
    return [f"hadolint found problems (exit {result.returncode})"] if result.returncode else []


def check_compose(deploy: Path) -> list[str]:
    result = run(["check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(deploy / "compose.yaml")])
    return [f"compose.yaml does not follow the compose specification (exit {result.returncode})"] \
        if result.returncode else []


def check_docker_build(deploy: Path) -> list[str]:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "info"], capture_output=True, check=False).returncode:
        print("SKIP docker build of deploy/Dockerfile.cpu: no Docker daemon answers here", flush=True)
        return []
    result = run([docker, "build", "-f", str(deploy / "Dockerfile.cpu"), "-t", "ftserve:cpu-ci", str(deploy.parent)])
    return [f"docker build of Dockerfile.cpu failed (exit {result.returncode})"] if result.returncode else []


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    """``cmd`` with its tool from this Python's environment first (a virtual environment need not be active)."""
    tool = shutil.which(cmd[0], path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if tool is None:
        sys.exit(f"{cmd[0]} is not installed: python -m pip install -r {DEPLOY / 'validate-requirements.txt'}")
    print("$", " ".join(c.replace(f"{REPO}/", "") for c in cmd), flush=True)
    return subprocess.run([tool, *cmd[1:]], cwd=REPO, check=False)


# (file, text, replacement, check): one mistake each, which that check must catch in a copy of deploy/.
MISTAKES = [
    ("k8s/deployment.yaml", "readinessProbe:", "readinesProbe:", check_kubernetes),
    ("k8s/service.yaml", "kind: Service", "kind: Servcie", check_kubernetes),
    ("k8s/multinode/leaderworkerset.yaml", "readinessProbe:", "readinesProbe:", check_kubernetes),
    ("k8s/multinode/leaderworkerset.yaml", "  workerTemplate:", "  workerTemplat:", check_kubernetes),
    ("k8s/multinode/leaderworkerset.yaml", "restartPolicy: RecreateGroupOnPodRestart", "restartPolicy: Always",
     check_kubernetes),
    ("Dockerfile.cpu", "FROM python:3.12-slim-bookworm", "FROM python", check_dockerfiles),
    ("compose.yaml", "    shm_size: 16gb", "    shm_sise: 16gb", check_compose),
]


def self_test() -> int:
    """Each of MISTAKES, made in a fresh copy of deploy/, must fail its check: the validators are not vacuous."""
    missed = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, (name, text, replacement, check) in enumerate(MISTAKES):
            copy = Path(tmp) / f"case{case}" / "deploy"
            shutil.copytree(DEPLOY, copy, ignore=shutil.ignore_patterns("__pycache__"))
            original = (copy / name).read_text()
            assert text in original, f"{name} no longer contains {text!r}: update MISTAKES"
            (copy / name).write_text(original.replace(text, replacement, 1))
            print(f"-- {name}: {text.strip()!r} -> {replacement.strip()!r} must fail {check.__name__}", flush=True)
            caught = check(copy)
            for problem in caught:
                print("caught:", problem)
            if not caught:
                missed.append(f"{name}: {text.strip()!r} -> {replacement.strip()!r} passed {check.__name__}")
            shutil.rmtree(copy.parent)
    for miss in missed:
        print("FAIL", miss)
    print(f"self-test: {len(MISTAKES) - len(missed)} of {len(MISTAKES)} mistakes caught")
    return 1 if missed else 0


def main(argv: list[str]) -> int:
    """Checks deploy/ beside this file; with ``--self-test``, that a copy with a mistake fails instead."""
    if argv == ["--self-test"]:
        return self_test()
    deploy = DEPLOY
    problems = []
    for check in (check_kubernetes, check_dockerfiles, check_compose, check_docker_build):
        problems += check(deploy)
    for problem in problems:
        print("FAIL", problem)
    print(f"{deploy}: {len(problems)} problem(s)" if problems else f"{deploy}: every check passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
