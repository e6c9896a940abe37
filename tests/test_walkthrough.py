"""The train-then-deploy walk-through (README.md's three commands, docs/pipeline.md's steps), block by block as
written, in one folder, on the tiny Llama:
train with the library, inspect, export, merge with --verify, serve the adapter with a key from the environment,
and call it with the openai client. Only the download is replaced (by the tiny model saved where it would go),
the server's port is a free one, and the Python blocks and `ftserve` commands run in this process (the
server in its own)."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

from click.testing import CliRunner
from support.processes import ServerProcess

from ftserve.cli import main
from ftserve.testing import save_tiny_model, toy_sentences

ROOT = Path(__file__).resolve().parent.parent
PAGES = (ROOT / "README.md", ROOT / "docs" / "pipeline.md")


def blocks() -> dict[str, str]:
    """The code of every ```-block the pages mark with ``<!-- walkthrough: NAME -->``, by NAME."""
    found = [block for page in PAGES
             for block in re.findall(r"<!-- walkthrough: (\w+) -->\n```\w*\n(.*?)```", page.read_text(), re.DOTALL)]
    assert len(dict(found)) == len(found), "a walkthrough block's name is used twice"
    return dict(found)


def test_the_three_command_pipeline_serves_trains_deploys_and_answers(tmp_path, monkeypatch):
    serve, train, call = blocks()["pipeline"].splitlines()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FTSERVE_API_KEY", "k" * 32)
    save_tiny_model("models/base", "llama")
    Path("data.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in toy_sentences(16)))
    folder, _, serve = serve.partition(" && ")
    subprocess.run(["bash", "-c", folder], check=True)
    argv = shlex.split(serve)
    assert argv[:2] == ["ftserve", "serve"] and Path("adapters").is_dir()
    server = ServerProcess(argv[2:], tmp_path / "server.log", cwd=tmp_path).wait_ready()
    try:
        argv = [a.replace("http://127.0.0.1:8000", server.url) for a in shlex.split(train)]
        assert argv[:2] == ["ftserve", "train"] and server.url in argv
        result = CliRunner().invoke(main, argv[1:])
        assert result.exit_code == 0, result.output
        assert "loaded as 'my-task'" in result.output
        assert Path("adapters/my-task/adapter_model.safetensors").is_file()
        request = call.replace("http://127.0.0.1:8000", server.url)
        assert request != call and request.startswith("curl ")
        answer = subprocess.run(["bash", "-c", request], capture_output=True, text=True, check=True, timeout=120)
        body = json.loads(answer.stdout)
        assert body["model"] == "my-task" and body["choices"][0]["text"], body
    finally:
        server.stop()


def test_the_walkthrough_trains_converts_serves_and_answers(tmp_path, monkeypatch, capsys):
    steps = blocks()
    assert list(steps) == ["pipeline", "fetch", "train", "convert", "serve", "call"]
    monkeypatch.chdir(tmp_path)
    assert shlex.split(steps["fetch"])[-2:] == ["--local-dir", "models/base"]
    save_tiny_model("models/base", "llama")

    exec(steps["train"], {})
    assert Path("adapters/my-task/adapter_config.json").is_file()

    for line in steps["convert"].splitlines():
        argv = shlex.split(line)
        assert argv[0] == "ftserve", line
        result = CliRunner().invoke(main, argv[1:])
        assert result.exit_code == 0, f"{line}:\n{result.output}"
    assert Path("adapters/my-task-lora/adapter_model.safetensors").is_file()
    assert Path("models/my-task/config.json").is_file()

    export, serve = steps["serve"].splitlines()
    name, _, command = export.removeprefix("export ").partition("=")
    key = subprocess.run(["bash", "-c", f"echo {command}"], capture_output=True, text=True, check=True).stdout.strip()
    assert len(key) == 64
    monkeypatch.setenv(name, key)
    argv = shlex.split(serve)
    assert argv[:2] == ["ftserve", "serve"]
    server = ServerProcess(argv[2:], tmp_path / "server.log", cwd=tmp_path).wait_ready()
    try:
        call = steps["call"].replace("http://127.0.0.1:8000/v1", server.url + "/v1")
        assert call != steps["call"]
        capsys.readouterr()
        exec(call, {})
        assert capsys.readouterr().out.splitlines()[0] == "['base', 'my-task']"
    finally:
        server.stop()
