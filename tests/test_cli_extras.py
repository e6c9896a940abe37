"""A command whose optional dependency is missing says in one `Error:` line which extra to install.

Each case runs the real CLI in a subprocess where one package looks uninstalled: a ``sitecustomize`` on
PYTHONPATH puts ``None`` in ``sys.modules`` under its name, which is what Python's import system reads as "not
importable" (``import x`` raises ModuleNotFoundError, ``importlib.util.find_spec("x")`` is None, so transformers'
own availability checks agree). Nothing is uninstalled."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ftserve.cli.extras import PACKAGES, SERVE, TRAIN

ROOT = Path(__file__).resolve().parent.parent
BLOCKER = "import os, sys\nsys.modules.update(dict.fromkeys(filter(None, os.environ['BLOCK'].split(',')), None))\n"


def run_without(tmp_path, module: str, *args: str) -> subprocess.CompletedProcess:
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "BLOCK": module, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(blocker), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "ftserve.cli", *args], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from ftserve.testing import build_tokenizer, tiny_llama

    folder = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    return folder


CASES = [  # (command, module made missing, the extra the message must name)
    *[("serve", module, "serve") for module in SERVE],
    *[("train", module, "train") for module in TRAIN],
    *[("quickstart", module, "quickstart") for module in (*TRAIN, *SERVE)],
    ("quickstart-smollm2", "gguf", "quickstart"),
]


@pytest.mark.parametrize("command,module,extra", CASES, ids=[f"{c}-without-{m}" for c, m, _ in CASES])
def test_a_missing_optional_package_is_one_error_line_naming_the_extra(tmp_path, tiny_base, command, module, extra):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "the cat sat"}\n')
    args = {"serve": ["serve", str(tiny_base), "--port", "0"],
            "train": ["train", str(tiny_base), str(data), "-o", str(tmp_path / "out"), "--max-steps", "1"],
            "quickstart": ["quickstart", "--model", "tiny", "-o", str(tmp_path / "qs")],
            "quickstart-smollm2": ["quickstart", "--model", "smollm2", "-o", str(tmp_path / "qs")]}[command]
    result = run_without(tmp_path, module, *args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert PACKAGES[module] in errors[0] and f"finetuning-toolkit[{extra}]" in errors[0], errors[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "qs" / "adapters").exists()  # no work was done


def test_help_works_without_the_optional_packages(tmp_path):
    result = run_without(tmp_path, ",".join([*SERVE, *TRAIN, "gguf"]), "train", "--help")
    assert result.returncode == 0 and "--max-steps" in result.stdout, result.stderr


def _requirements(extras: dict[str, list[str]], extra: str) -> set[str]:
    """The package names an extra brings, its own extras (``finetuning-toolkit[serve,train]``) followed."""
    names = set()
    for requirement in extras[extra]:
        name = requirement.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip()
        if name.startswith("finetuning-toolkit["):
            for inner in name.removeprefix("finetuning-toolkit[").rstrip("]").split(","):
                names |= _requirements(extras, inner)
        else:
            names.add(name)
    return names


@pytest.mark.parametrize("extra,modules", [("serve", SERVE), ("train", TRAIN),
                                           ("quickstart", (*SERVE, *TRAIN, "gguf", "openai")),
                                           ("test", (*SERVE, *TRAIN))])
def test_each_extra_holds_what_its_commands_import(extra, modules):
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {PACKAGES[m] for m in modules} <= _requirements(extras, extra)
