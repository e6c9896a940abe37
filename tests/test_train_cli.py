"""`ftserve train` end to end on a tiny Llama: every method lowers the loss and writes a folder that reloads; the
method's rule fired; Ctrl-C keeps the last completed step as a checkpoint and --resume continues to the
uninterrupted run's adapter, a second Ctrl-C stops at once, a rerun after an interrupt that kept nothing starts
afresh; a run without --load-in-4bit shows no library's noise; YAML settings with flags over them; every bad input gets its one-line error and writes nothing; and
--deploy-to loads the adapter into a running `ftserve serve`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, TrainerCallback

from ftserve import load_adapter, read_adapter
from ftserve.cli import main
from ftserve.methods import METHODS as REGISTRY
from ftserve.testing import toy_sentences
from ftserve.train.run import Interrupted, train
from ftserve.train.settings import TrainSettings

from support.cases import METHODS, start_step
from support.processes import ONE_THREAD, ServerProcess

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8
K = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    (folder / "text.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in toy_sentences(48)))
    chat = [{"messages": [{"role": "user", "content": s}, {"role": "assistant", "content": s.upper()[:20]}]}
            for s in toy_sentences(24, seed=1)]
    (folder / "chat.jsonl").write_text("".join(json.dumps(row) + "\n" for row in chat))
    return folder


def run_cli(*args: str):
    return CliRunner().invoke(main, ["train", *args], catch_exceptions=False)


def common(steps: int = STEPS) -> list[str]:
    return ["--max-steps", str(steps), "--lr", "1e-2", "--batch-size", "4", "--logging-steps", "2",
            "--lr-scheduler", "constant", "--seed", "0"]


@torch.no_grad()
def mean_loss(model, tokenizer, texts: list[str]) -> float:
    model.eval()
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(**batch, labels=labels).loss.item()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_to_a_folder_that_reloads_with_a_lower_loss(method, llama_dir, data, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "adapter"
    extra = [f"--setting={key}={value}" for key, value in start_step(method, K).items()]
    quick = REGISTRY[method].quickstart_settings  # a rank and a learning rate that learn in a few steps
    result = run_cli(str(llama_dir), str(data / "text.jsonl"), "-o", str(out), "--method", method, *common(),
                     "--rank", str(int(quick["rank"])), "--lr", str(quick["lr"]), *extra)
    assert result.exit_code == 0, result.output
    assert f"ftserve merge {llama_dir} {out} -o {out}-merged" in result.output
    assert "loss" in result.output and "tok/s" in result.output and "eta" in result.output
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "loss.png", "training_log.json",
            "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not (tmp_path / "adapter.checkpoints").exists()
    folder = read_adapter(out)
    assert folder.extra["steps_done"] == STEPS
    for state in folder.modules.values():
        assert set(REGISTRY[method].snapshot_keys) <= set(state)  # Delta-LoRA's snapshot after step K+1
    tokenizer = AutoTokenizer.from_pretrained(out)
    texts = [json.loads(line)["text"] for line in (data / "text.jsonl").read_text().splitlines()[:16]]
    before = mean_loss(AutoModelForCausalLM.from_pretrained(llama_dir), tokenizer, texts)
    after = mean_loss(load_adapter(AutoModelForCausalLM.from_pretrained(llama_dir), out), tokenizer, texts)
    assert after < before - 0.01, (before, after)
    card = (out / "README.md").read_text()
    assert "ftserve serve" in card and "Final training loss" in card


class CtrlC(TrainerCallback):
    """Presses Ctrl-C (a real SIGINT to this process, ``times`` times) once step ``at`` is logged; at 0, as
    training begins."""

    def __init__(self, at: int, times: int = 1) -> None:
        self.at, self.times = at, times

    def press(self) -> None:
        for _ in range(self.times):
            os.kill(os.getpid(), signal.SIGINT)

    def on_train_begin(self, args, state, control, **kwargs):
        if self.at == 0:
            self.press()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step == self.at and "loss" in logs:
            self.press()


def assert_same_adapter(expected, got) -> None:
    expected, got = read_adapter(expected).modules, read_adapter(got).modules
    for name, state in expected.items():
        for key, tensor in state.items():
            torch.testing.assert_close(got[name][key], tensor, rtol=1e-5, atol=1e-7, msg=f"{name}.{key}")


CHAT_RUN = dict(method="delta-lora", settings={"delta_start_step": K}, max_steps=6, lr=1e-2, batch_size=4,
                lr_scheduler="constant", seed=0, logging_steps=1)


def test_ctrl_c_keeps_the_last_completed_step_and_resume_gives_the_uninterrupted_adapter(llama_dir, data, tmp_path):
    settings = dict(base=str(llama_dir), data=str(data / "chat.jsonl"), **CHAT_RUN)
    straight = train(TrainSettings(output=str(tmp_path / "straight"), **settings), echo=lambda line: None)
    out = tmp_path / "adapter"
    lines = []
    with pytest.raises(Interrupted, match=r"interrupted at step 3; the last complete checkpoint is .*checkpoint-3; "
                                          r"resume with the same command and --resume"):
        train(TrainSettings(output=str(out), **settings), echo=lines.append, callbacks=(CtrlC(3),))
    assert "Ctrl-C: stopping, keeping the last completed step as a checkpoint" in lines[-1]
    checkpoints = tmp_path / "adapter.checkpoints"
    assert not out.exists() and [p.name for p in checkpoints.iterdir()] == ["checkpoint-3"]
    assert json.loads((checkpoints / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {p.name for p in (checkpoints / "checkpoint-3").iterdir()}

    result = run_cli(str(llama_dir), str(data / "chat.jsonl"), "-o", str(out), "--method", "delta-lora")
    assert result.exit_code == 1 and "pass --resume to continue it, or --force to start again" in result.output
    train(TrainSettings(output=str(out), resume="latest", **settings), echo=lambda line: None)
    assert json.loads((out / "ftserve_config.json").read_text())["training"]["global_step"] == 6
    assert_same_adapter(straight, out)


def test_a_second_ctrl_c_stops_at_once_and_keeps_nothing_more(llama_dir, data, tmp_path):
    settings = dict(base=str(llama_dir), data=str(data / "chat.jsonl"), **CHAT_RUN)
    with pytest.raises(Interrupted, match=r"^stopped at once at step 3 by a second Ctrl-C; nothing was kept$"):
        train(TrainSettings(output=str(tmp_path / "adapter"), **settings), echo=lambda line: None,
              callbacks=(CtrlC(3, times=2),))
    assert list(tmp_path.iterdir()) == []


def test_a_rerun_after_an_interrupt_that_kept_nothing_is_not_refused(llama_dir, data, tmp_path):
    settings = dict(base=str(llama_dir), data=str(data / "chat.jsonl"), **CHAT_RUN)
    out = tmp_path / "adapter"
    with pytest.raises(Interrupted, match=r"^interrupted at step 0; nothing was kept \(no step had completed\)$"):
        train(TrainSettings(output=str(out), **settings), echo=lambda line: None, callbacks=(CtrlC(0),))
    assert list(tmp_path.iterdir()) == []
    stale = tmp_path / "adapter.checkpoints" / "checkpoint-2"  # a save cut short: no trainer_state.json
    stale.mkdir(parents=True)
    (stale / "adapter_model.safetensors").write_bytes(b"")
    result = run_cli(str(llama_dir), str(data / "chat.jsonl"), "-o", str(out), *common(2))
    assert result.exit_code == 0, result.output
    assert read_adapter(out).extra["steps_done"] == 2 and not (tmp_path / "adapter.checkpoints").exists()


def train_process(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ftserve.cli", "train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **ONE_THREAD})


def test_ctrl_c_on_the_command_line_keeps_the_last_step_and_resume_continues_it(llama_dir, data, tmp_path):
    """The user's Ctrl-C: SIGINT to a real `ftserve train` once it printed step 3. The step in flight is
    abandoned; the last completed one (3, unless the machine let the run finish one more before the signal came)
    is the checkpoint that --resume continues to the uninterrupted run's adapter."""
    args = [str(llama_dir), str(data / "text.jsonl"), *common(12), "--logging-steps", "1"]
    straight = tmp_path / "straight"
    assert run_cli(*args[:2], "-o", str(straight), *args[2:]).exit_code == 0
    out = tmp_path / "adapter"
    process = train_process(*args, "-o", str(out))
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("step 3/"):
            process.send_signal(signal.SIGINT)
            break
    rest, _ = process.communicate(timeout=120)  # a hang guard, not a speed test
    assert process.returncode == 130, "".join(lines) + rest
    stopped = re.search(r"^Error: interrupted at step (\d+); the last complete checkpoint is (\S+checkpoint-(\d+)); "
                        r"resume with the same command and --resume$", rest, re.M)
    assert stopped and stopped[1] == stopped[3] and int(stopped[1]) >= 3, rest
    assert json.loads((Path(stopped[2]) / "trainer_state.json").read_text())["global_step"] == int(stopped[1])
    assert "Traceback" not in rest and not out.exists()

    resumed = run_cli(*args[:2], "-o", str(out), *args[2:], "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert f"step {int(stopped[1]) + 1}/12" in resumed.output and "step 1/12" not in resumed.output
    assert_same_adapter(straight, out)


def test_a_run_without_4bit_prints_nothing_of_bitsandbytes_or_other_libraries(llama_dir, data, tmp_path):
    """bitsandbytes is imported only for QLoRA (peft imports it whenever it is installed, and its import warns
    on CPUs with AVX512-BF16); no library warning reaches the output (--save-steps 1 makes the trainer rotate
    checkpoints, which warns about mtime on fast saves)."""
    probe = ("import json, runpy, sys; sys.argv = ['ftserve', *sys.argv[1:]]\n"
             "try: runpy.run_module('ftserve.cli', run_name='__main__')\n"
             "finally: print(json.dumps(sorted(m for m, v in sys.modules.items() if v and m.startswith('bitsandb'))))")
    result = subprocess.run([sys.executable, "-c", probe, "train", str(llama_dir), str(data / "chat.jsonl"), "-o",
                             str(tmp_path / "adapter"), *common(3), "--save-steps", "1", "--eval-fraction", "0.2"],
                            capture_output=True, text=True, env={**os.environ, **ONE_THREAD}, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = (result.stderr + result.stdout).splitlines()
    assert not [line for line in lines if re.search("bitsandbytes|kernels", line, re.I)], lines
    ours = ("lora on ", "step ", "wrote ", "ftserve merge ", "ftserve serve ")
    assert [line for line in lines if not line.startswith(ours)] == ["[]"], lines


def test_a_yaml_config_holds_the_settings_and_flags_override_it(llama_dir, data, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(f"base: {llama_dir}\ndata: {data / 'chat.jsonl'}\nmethod: lora+\nrank: 4\n"
                      f"settings: {{loraplus_lr_ratio: 4}}\nmax_steps: 50\nlr: 1.0e-2\nbatch_size: 4\n"
                      f"eval_fraction: 0.25\npacking: true\nmax_seq_len: 64\n")
    out = tmp_path / "adapter"
    result = run_cli("--config", str(config), "-o", str(out), "--max-steps", "3", "--logging-steps", "1")
    assert result.exit_code == 0, result.output
    written, ours = (json.loads((out / name).read_text()) for name in ("adapter_config.json", "ftserve_config.json"))
    assert written["r"] == 4 and ours["method"] == "lora+"
    assert ours["loraplus_lr_ratio"] == 4
    assert ours["training"]["global_step"] == 3
    assert any("eval_loss" in entry for entry in json.loads((out / "training_log.json").read_text()))


BAD = [
    ("missing-data", lambda d: ["missing.jsonl"], "missing.jsonl: no such data file"),
    ("malformed-line", lambda d: [str(d / "bad.jsonl")], "bad.jsonl line 2: not valid JSON"),
    ("unknown-shape", lambda d: [str(d / "shape.jsonl")], "rows of no known shape"),
    ("no-assistant", lambda d: [str(d / "noassistant.jsonl")], "noassistant.jsonl line 1: a chat row with no "
                                                               "assistant turn"),
    ("setting-of-another-method", lambda d: [str(d / "text.jsonl"), "--setting", "loraplus_lr_ratio=4"],
     "LoRA has no setting 'loraplus_lr_ratio'; its settings: none"),
    ("unknown-method", lambda d: [str(d / "text.jsonl"), "--method", "ia3"], "unknown method 'ia3'"),
    ("bad-rank", lambda d: [str(d / "text.jsonl"), "--rank", "0"], "rank must be an integer >= 1; got 0"),
    ("both-evals", lambda d: [str(d / "text.jsonl"), "--eval-fraction", "0.1", "--eval-data", str(d / "text.jsonl")],
     "give --eval-data or --eval-fraction, not both"),
    ("bad-yaml-key", lambda d: [str(d / "text.jsonl"), "--config", str(d / "typo.yaml")],
     "typo.yaml: unknown setting 'lerning_rate'"),
]


@pytest.mark.parametrize("case, args, message", BAD, ids=[case for case, _, _ in BAD])
def test_bad_input_gets_one_line_and_writes_nothing(case, args, message, llama_dir, data, tmp_path):
    (data / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (data / "shape.jsonl").write_text('{"question": "a"}\n')
    (data / "noassistant.jsonl").write_text('{"messages": [{"role": "user", "content": "a"}]}\n')
    (data / "typo.yaml").write_text("lerning_rate: 0.1\n")
    out = tmp_path / "adapter"
    result = run_cli(str(llama_dir), *args(data), "-o", str(out), "--max-steps", "1")
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and message in result.output and result.output.count("\n") == 1, \
        result.output
    assert list(tmp_path.iterdir()) == []


def test_a_file_with_three_bad_rows_reports_all_three_before_training(llama_dir, tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]})
    bad_role = good.replace('"user"', '"bot"')
    empty = good.replace('"ok"', '""')
    path = tmp_path / "rows.jsonl"
    path.write_bytes(f"{good}\n".encode() + b'{"text": "caf\xe9"}\n' + f"{bad_role}\n{good}\n{empty}\n".encode())
    offset = len(good) + 1 + len('{"text": "caf')
    result = run_cli(str(llama_dir), str(path), "-o", str(tmp_path / "adapter"), "--max-steps", "1")
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"Error: {path}: 3 bad rows, nothing was trained; fix them and run again:",
        f"  {path} line 2: not valid UTF-8 (byte 0xe9 at byte offset {offset} of the file); save the file as UTF-8",
        f"  {path} line 3: message 1 has the role 'bot'; the roles are system, user, assistant, tool",
        f"  {path} line 5: message 2 (assistant) has empty content"]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_an_existing_output_folder_needs_force(llama_dir, data, tmp_path):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli(str(llama_dir), str(data / "text.jsonl"), "-o", str(out), "--max-steps", "1")
    assert result.exit_code == 1 and f"{out} already exists; pass --force to replace it" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_deploy_to_loads_the_adapter_into_a_running_server(llama_dir, data, tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    server = ServerProcess([str(llama_dir), "--enable-adapter-api", "--adapter-root", str(root), "--api-key",
                            "secret", "--dtype", "float32"], tmp_path / "server.log", env=ONE_THREAD)
    try:
        server.wait_ready()
        result = run_cli(str(llama_dir), str(data / "text.jsonl"), "-o", str(root / "toy"), *common(2),
                         "--deploy-to", server.url, "--api-key", "secret", "--adapter-name", "toy-v1")
        assert result.exit_code == 0, result.output
        assert "loaded as 'toy-v1'" in result.output
        client = server.client(api_key="secret")
        assert "toy-v1" in [m.id for m in client.models.list().data]
        answer = client.completions.create(model="toy-v1", prompt="the cat", max_tokens=4, temperature=0)
        assert answer.model == "toy-v1" and answer.choices[0].text

        refused = run_cli(str(llama_dir), str(data / "text.jsonl"), "-o", str(root / "toy2"), *common(1),
                          "--deploy-to", server.url, "--api-key", "wrong")
        assert refused.exit_code == 1 and "the server refused the adapter (401" in refused.output
        assert (root / "toy2" / "adapter_config.json").exists()  # trained and kept; only the load failed
    finally:
        server.stop()


def test_eval_data_is_evaluated_every_eval_steps_and_at_the_end(llama_dir, data, tmp_path):
    out = tmp_path / "adapter"
    result = run_cli(str(llama_dir), str(data / "chat.jsonl"), "-o", str(out), *common(5), "--eval-data",
                     str(data / "chat.jsonl"), "--eval-steps", "2")
    assert result.exit_code == 0, result.output
    steps = [e["step"] for e in json.loads((out / "training_log.json").read_text()) if "eval_loss" in e]
    assert steps == [2, 4, 5]
    assert "eval loss" in result.output


def test_a_dataset_id_in_the_local_cache_trains_offline(llama_dir, datasets_cache, tmp_path):
    out = tmp_path / "adapter"
    result = run_cli(str(llama_dir), "someone/toy-rows", "-o", str(out), *common(2))
    assert result.exit_code == 0, result.output
    assert "someone/toy-rows" in (out / "README.md").read_text()
    assert read_adapter(out).extra["steps_done"] == 2
