"""deploy/ agrees with the code: every `ftserve serve` command line in a Dockerfile, compose.yaml or a manifest
uses flags the command has, with values it accepts; probes and the Prometheus scrape hit routes the real server
answers without the API key, while the key, read from a secret file as deploy/ mounts it, guards /v1; ports,
volumes, secrets and Service selectors line up; a multi-node group's workers run the leader's engine settings.

The validators (kubernetes-validate, hadolint, the compose schema) run in CI's deploy stage, deploy/validate.py.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from click.testing import CliRunner
from support.engine import write_random_adapter
from support.processes import ServerProcess

from ftserve.cli import main
from ftserve.cli.serve import serve

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PORT = 8000
# vLLM's scale flags of issue 11 (item 1), which deploy/ uses; `ftserve serve --engine vllm` brings them, so
# they may be missing from a checkout that predates it. True: the flag takes a value.
PENDING_VLLM_FLAGS: dict[str, bool] = {}  # flags deploy/ may use before `ftserve serve` has them: none now
SERVING_ONLY = {"--served-model-name", "--host", "--port", "--enable-adapter-api", "--adapter-root",
                "--shutdown-timeout"}  # what a headless worker, which serves no HTTP, leaves out


def docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


MANIFESTS = {path.relative_to(DEPLOY).as_posix(): docs(path) for path in sorted((DEPLOY / "k8s").rglob("*.yaml"))}
COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def dockerfile(name: str) -> dict[str, list[str]]:
    """Each instruction of deploy/NAME (continuations joined, comments dropped) by keyword."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in (DEPLOY / name).read_text().splitlines()
                                           if not line.lstrip().startswith("#")))
    instructions: dict[str, list[str]] = {}
    for line in filter(str.strip, text.splitlines()):
        keyword, _, rest = line.strip().partition(" ")
        instructions.setdefault(keyword.upper(), []).append(rest.strip())
    return instructions


DOCKERFILES = {name: dockerfile(name) for name in ("Dockerfile", "Dockerfile.cpu")}


def image_command(name: str) -> list[str]:
    return json.loads(DOCKERFILES[name]["ENTRYPOINT"][-1]) + json.loads(DOCKERFILES[name]["CMD"][-1])


LWS_NAME = "leaderworkerset.sigs.k8s.io/name"


def pod_specs() -> list[tuple[str, dict, dict]]:
    """(where, pod template metadata, pod spec) of every workload in deploy/k8s."""
    found = []
    for file, documents in MANIFESTS.items():
        for doc in documents:
            spec = doc.get("spec", {})
            templates = {"template": spec["template"]} if "template" in spec else {}
            templates.update(spec.get("leaderWorkerTemplate", {}))
            for key, template in templates.items():
                if isinstance(template, dict) and "spec" in template:
                    meta = {**template.get("metadata", {})}
                    if doc["kind"] == "LeaderWorkerSet":  # the label LWS adds to every pod of the set
                        meta["labels"] = {**meta.get("labels", {}), LWS_NAME: doc["metadata"]["name"]}
                    found.append((f"{file}:{doc['kind']}.{key}", meta, template["spec"]))
    return found


def containers() -> list[tuple[str, dict, dict]]:
    return [(f"{where}:{c['name']}", c, spec) for where, _, spec in pod_specs() for c in spec["containers"]]


def serve_commands() -> list[tuple[str, list[str], dict | None, dict | None]]:
    """(where, the arguments after `ftserve serve`, its container, its pod spec) wherever deploy/ runs it."""
    found = []
    for name in DOCKERFILES:
        found.append((name, image_command(name), None, None))
    for service_name, service in COMPOSE["services"].items():
        if "build" in service:
            entrypoint = json.loads(DOCKERFILES[Path(service["build"]["dockerfile"]).name]["ENTRYPOINT"][-1])
            found.append((f"compose.yaml:{service_name}", entrypoint + service["command"], None, None))
    for where, container, spec in containers():
        found.append((where, container.get("command", []) + container.get("args", []), container, spec))
    commands = [(where, argv[2:], c, s) for where, argv, c, s in found if argv[:2] == ["ftserve", "serve"]]
    assert len(commands) == 7, [where for where, *_ in found]  # 2 images, 2 compose services, 2 pods, 1 worker
    return commands


def option(name: str):
    return next((p for p in serve.params if name in p.opts + p.secondary_opts), None)


def parse(argv: list[str]) -> tuple[str, dict[str, str | bool]]:
    """BASE and {flag: value} of `ftserve serve` arguments (last one wins, as in click); flags still pending
    are parsed by the arity PENDING_VLLM_FLAGS gives them."""
    base, flags, tokens = None, {}, iter(argv)
    for token in tokens:
        if not token.startswith("--"):
            assert base is None, f"a second positional argument {token!r} in {argv}"
            base = token
            continue
        param = option(token)
        takes_value = PENDING_VLLM_FLAGS[token] if param is None and token in PENDING_VLLM_FLAGS else \
            param is not None and not param.is_flag
        flags[token] = next(tokens) if takes_value else True
    return base, flags


SERVE_COMMANDS = serve_commands()


def test_every_flag_in_deploy_is_one_ftserve_serve_has():
    help_text = CliRunner().invoke(main, ["serve", "--help"]).output
    used = {flag for _, argv, *_ in SERVE_COMMANDS for flag in parse(argv)[1]}
    unknown = {flag for flag in used if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text)}
    assert unknown <= set(PENDING_VLLM_FLAGS), f"not `ftserve serve` flags: {sorted(unknown - set(PENDING_VLLM_FLAGS))}"


@pytest.mark.parametrize("where,argv", [(where, argv) for where, argv, *_ in SERVE_COMMANDS])
def test_every_value_is_one_the_flag_accepts(where, argv):
    base, flags = parse(argv)
    assert base and base.startswith("/cache/models/"), f"{where}: BASE {base!r} is not a model in the model cache"
    for flag, value in flags.items():
        param = option(flag)
        if param is None or param.is_flag or re.fullmatch(r"\$\(\w+\)", value) or flag == "--adapter-root":
            continue  # pending, a switch, filled in by Kubernetes, or a folder that exists in the container only
        param.type.convert(value, param, None)  # click's own check: raises BadParameter naming the flag
    assert flags.get("--engine", "torch") == ("torch" if "cpu" in where else "vllm"), where
    if "--headless" not in flags:
        assert flags["--port"] == str(PORT) and flags["--host"] == "0.0.0.0", where
        assert flags.get("--enable-adapter-api") and flags["--adapter-root"] == "/adapters", where


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_exposes_and_checks_the_port_it_serves(name):
    instructions = DOCKERFILES[name]
    assert instructions["EXPOSE"] == [str(PORT)]
    assert instructions["USER"] and not instructions["USER"][-1].startswith(("0", "root"))
    (check,) = instructions["HEALTHCHECK"]
    assert re.search(rf"http://127\.0\.0\.1:{PORT}/health'", check), check
    volumes = json.loads(instructions["VOLUME"][-1])
    base, flags = parse(image_command(name)[2:])
    assert flags["--adapter-root"] in volumes and "/" + Path(base).parts[1] in volumes
    assert not any(re.search(r"API_KEY\s*=", env) for env in instructions.get("ENV", [])), "a key baked in"


def test_compose_serves_the_image_port_and_reads_the_key_from_a_secret():
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (target,) = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    host, port = target.split(":")
    for name in ("ftserve-cpu", "ftserve-gpu"):
        service = COMPOSE["services"][name]
        assert [p.split(":")[-1] for p in service["ports"]] == [str(PORT)] and port == str(PORT)
        assert host in service["networks"]["default"]["aliases"]
        (secret,) = service["secrets"]
        assert secret in COMPOSE["secrets"]
        assert service["environment"]["FTSERVE_API_KEY_FILE"] == f"/run/secrets/{secret}"
        mounts = {volume.split(":")[1] for volume in service["volumes"]}
        assert {"/adapters", "/cache"} <= mounts
        grace = int(service["stop_grace_period"].removesuffix("m")) * 60
        assert grace > float(parse(service["command"])[1]["--shutdown-timeout"]), "SIGKILL before the drain ends"
    assert COMPOSE["services"]["ftserve-gpu"]["profiles"] == ["gpu"]
    assert (DEPLOY / COMPOSE["services"]["prometheus"]["volumes"][0].split(":")[0]).resolve() == \
        DEPLOY / "prometheus.yml"


def by_kind(kind: str) -> list[dict]:
    return [doc for documents in MANIFESTS.values() for doc in documents if doc["kind"] == kind]


def test_kubernetes_ports_volumes_secrets_and_selectors_line_up():
    claims = {doc["metadata"]["name"] for doc in by_kind("PersistentVolumeClaim")}
    (secret,) = by_kind("Secret")
    fetch = next(c for _, c, _ in containers() if c.get("command", [])[:2] == ["hf", "download"])
    for where, argv, container, spec in SERVE_COMMANDS:
        if container is None:
            continue
        base, flags = parse(argv)
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
        assert base == fetch["command"][fetch["command"].index("--local-dir") + 1], f"{where}: not the fetched model"
        assert {"/cache", "/adapters", "/dev/shm"} <= set(mounts), where
        assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory", where
        for path in ("/cache", "/adapters"):
            assert mounts[path]["persistentVolumeClaim"]["claimName"] in claims, where
        resources = container["resources"]
        gpus = int(flags["--tensor-parallel-size"])
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == str(gpus), where
        assert "memory" in resources["limits"], where
        if "--headless" in flags:
            assert "ports" not in container and "readinessProbe" not in container, f"{where}: a worker serves nothing"
            continue
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": PORT} and flags["--port"] == str(PORT), where
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, f"{where}: {probe}"
        assert container["startupProbe"]["failureThreshold"] * container["startupProbe"]["periodSeconds"] >= 1800
        env = {e["name"]: e.get("value") for e in container["env"]}
        key_dir, key_name = env["FTSERVE_API_KEY_FILE"].rsplit("/", 1)
        assert mounts[key_dir]["secret"]["secretName"] == secret["metadata"]["name"], where
        assert key_name in secret["stringData"], where
        assert spec["terminationGracePeriodSeconds"] > float(flags["--shutdown-timeout"]), where
    for service in by_kind("Service"):
        selected = [(meta, spec) for _, meta, spec in pod_specs()
                    if service["spec"]["selector"].items() <= meta.get("labels", {}).items()]
        assert selected, f"Service {service['metadata']['name']} selects no pod template"
        for _, spec in selected:
            (port,) = service["spec"]["ports"]
            assert port["port"] == PORT
            assert any(p["name"] == port["targetPort"] for c in spec["containers"] for p in c.get("ports", []))


def test_a_multinode_group_runs_one_engine():
    (lws,) = by_kind("LeaderWorkerSet")
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["leaderTemplate"]["metadata"]["labels"]["role"] == "leader"
    (leader,), (worker,) = (template[key]["spec"]["containers"] for key in ("leaderTemplate", "workerTemplate"))
    _, lead = parse(leader["args"])
    base, work = parse(worker["args"])
    assert work.pop("--headless") is True and "--headless" not in lead
    assert parse(leader["args"])[0] == base
    assert {flag: value for flag, value in lead.items() if flag not in SERVING_ONLY} == work
    # TP = GPUs per node, PP = nodes, and the nodes are the group's pods; LWS fills these in on every pod.
    assert work["--pipeline-parallel-size"] == work["--nnodes"] == "$(LWS_GROUP_SIZE)"
    assert work["--node-rank"] == "$(LWS_WORKER_INDEX)" and work["--master-addr"] == "$(LWS_LEADER_ADDRESS)"
    assert work["--distributed-executor-backend"] == "mp"
    for container in (leader, worker):
        env = {e["name"]: e for e in container["env"]}
        assert env["VLLM_HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


# The server as deploy/ runs it: the key from a secret file, the adapter API confined to the adapters volume.

KEY = "k8s-secret-key"


@pytest.fixture(scope="module")
def deployed(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("deployed")
    (root / "api-key").write_text(KEY + "\n")  # as `kubectl create secret --from-file` of an editor's file
    adapters = root / "adapters"
    write_random_adapter(llama_dir, adapters / "my-task", "lora", seed=3)
    proc = ServerProcess([str(llama_dir), "--served-model-name", "base", "--enable-adapter-api",
                          "--adapter-root", str(adapters)], root / "server.log",
                         env={"FTSERVE_API_KEY_FILE": str(root / "api-key")})
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


def probe_paths() -> set[str]:
    paths = {c[probe]["httpGet"]["path"] for _, c, _ in containers() for probe in
             ("startupProbe", "readinessProbe", "livenessProbe") if probe in c}
    paths |= {re.search(r"127\.0\.0\.1:\d+(/[\w/]*)", d["HEALTHCHECK"][0]).group(1) for d in DOCKERFILES.values()}
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    return paths | {job["metrics_path"] for job in prometheus["scrape_configs"]}


def test_probes_and_the_scraper_need_no_key_but_v1_does(deployed):
    assert probe_paths() == {"/health", "/metrics"}
    for path in probe_paths():
        assert httpx.get(deployed.url + path).status_code == 200, path
    assert httpx.get(deployed.url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        deployed.client(api_key="not-" + KEY).models.list()


@pytest.mark.parametrize("name", DOCKERFILES)
def test_the_image_health_check_passes_on_a_serving_server_only(name, deployed, tmp_path):
    (check,) = DOCKERFILES[name]["HEALTHCHECK"]
    argv = json.loads(check[check.index("CMD") + 3:])
    argv = [sys.executable, *argv[1:]]  # python or python3: this interpreter
    up = [a.replace(f"127.0.0.1:{PORT}", deployed.url.removeprefix("http://")) for a in argv]
    assert subprocess.run(up, check=False).returncode == 0
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        down = [a.replace(f"127.0.0.1:{PORT}", f"127.0.0.1:{s.getsockname()[1]}") for a in argv]
    assert subprocess.run(down, capture_output=True, check=False).returncode == 1


def test_an_adapter_added_at_runtime_as_deploy_readme_says(deployed):
    """deploy/README.md's curl: the folder's name relative to the adapters volume, then the openai client."""
    response = httpx.post(deployed.url + "/v1/load_lora_adapter", json={"lora_name": "my-task", "lora_path": "my-task"},
                          headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text
    client = deployed.client(api_key=KEY)
    assert {m.id for m in client.models.list().data} == {"base", "my-task"}
    answer = client.completions.create(model="my-task", prompt="the cat", max_tokens=4, temperature=0)
    assert answer.model == "my-task" and answer.usage.completion_tokens == 4
    readme = (DEPLOY / "README.md").read_text()
    assert '"lora_path": "my-task"' in readme and "/v1/load_lora_adapter" in readme


def test_the_key_file_is_read_once_and_must_hold_a_key(llama_dir, tmp_path):
    empty, key = tmp_path / "empty", tmp_path / "key"
    empty.write_text("\n")
    key.write_text(KEY)
    cases = [(["--api-key-file", str(empty)], {}, "is empty"),
             (["--api-key-file", str(tmp_path / "missing")], {}, "cannot read the API key from"),
             (["--api-key-file", str(key)], {"FTSERVE_API_KEY": KEY}, "not both"),
             ([], {"FTSERVE_API_KEY_FILE": str(empty)}, "is empty")]
    for args, env, message in cases:
        result = CliRunner().invoke(main, ["serve", str(llama_dir), *args], env=env)
        assert result.exit_code == 2 and message in result.output, (args, env, result.output)
