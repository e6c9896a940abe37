"""Two writers, one output: two `ftserve merge` processes started together into the same output folder.

Before the final rename re-checked the output, both could exit 0 while one merged model replaced the other
(about one run in two). Now exactly one wins each time, the loser exits 1 with a one-line `Error:`, no
temporary folder is left, and the output is the winner's, whole.
"""

import multiprocessing
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftserve.cli import main
from ftserve.files.atomic import OutputChangedError, atomic_output_dir

from support.engine import write_random_adapter
from support.files import tree_digest

ROUNDS = 12


def merge_in_lockstep(barrier, base, adapter, outputs, force, results) -> None:
    """One racing process: per output, wait for the other, then run `ftserve merge` through the CLI."""
    os.environ["OMP_NUM_THREADS"] = "1"
    runner = CliRunner()
    for out in outputs:
        barrier.wait(timeout=120)
        args = ["merge", base, adapter, "-o", out] + (["--force"] if force else [])
        result = runner.invoke(main, args)
        results.put((out, adapter, result.exit_code, result.output))


def race(base, adapters, outputs, force=False) -> dict[str, list[tuple[str, int, str]]]:
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(len(adapters)), context.Queue()
    processes = [context.Process(target=merge_in_lockstep, args=(barrier, str(base), str(a), outputs, force, results))
                 for a in adapters]
    for p in processes:
        p.start()
    runs: dict[str, list[tuple[str, int, str]]] = {out: [] for out in outputs}
    for _ in range(len(outputs) * len(adapters)):
        out, adapter, code, output = results.get(timeout=300)
        runs[out].append((adapter, code, output))
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    return runs


@pytest.fixture(scope="module")
def contenders(llama_dir, tmp_path_factory):
    """Two different adapters, and each one's merged model made alone, to tell whose output won."""
    root = tmp_path_factory.mktemp("race")
    adapters = [write_random_adapter(llama_dir, root / f"adapter{i}", "lora", seed=i) for i in range(2)]
    alone = {}
    for adapter in adapters:
        out = root / f"alone-{adapter.name}"
        assert CliRunner().invoke(main, ["merge", str(llama_dir), str(adapter), "-o", str(out)]).exit_code == 0
        alone[str(adapter)] = tree_digest(out)
    return adapters, alone


def check_one_winner(runs, alone, parent) -> None:
    for out, attempts in runs.items():
        codes = sorted(code for _, code, _ in attempts)
        assert codes == [0, 1], attempts
        (winner, _, _), = [a for a in attempts if a[1] == 0]
        (_, _, lost), = [a for a in attempts if a[1] == 1]
        assert lost.startswith("Error: ") and lost.count("\n") == 1, lost
        assert "while this command was writing it" in lost, lost
        assert tree_digest(Path(out)) == alone[winner]
    assert sorted(p.name for p in parent.iterdir()) == sorted(os.path.basename(o) for o in runs)


def test_two_merges_into_one_new_output_leave_exactly_one_winner(tmp_path, llama_dir, contenders):
    adapters, alone = contenders
    outputs = [str(tmp_path / f"merged{i}") for i in range(ROUNDS)]
    check_one_winner(race(llama_dir, adapters, outputs), alone, tmp_path)


def test_two_forced_merges_over_one_output_replace_only_what_they_saw(tmp_path, llama_dir, contenders):
    """Both were told to replace the existing output; the first to move it aside does, and the second finds
    the winner's output instead of the one it saw, so it replaces nothing."""
    adapters, alone = contenders
    outputs = [str(tmp_path / f"merged{i}") for i in range(ROUNDS)]
    for out in outputs:
        os.mkdir(out)
        with open(os.path.join(out, "config.json"), "w") as f:
            f.write("{}")
    check_one_winner(race(llama_dir, adapters, outputs, force=True), alone, tmp_path)


def test_an_output_that_appears_while_writing_is_left_alone(tmp_path):
    """Even an empty folder, which a plain rename would silently replace."""
    out = tmp_path / "out"
    with pytest.raises(OutputChangedError, match="appeared while this command was writing it"):
        with atomic_output_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
            out.mkdir()
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not any(out.iterdir())


def test_force_refuses_an_output_replaced_while_writing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine").write_text("seen at the start")
    with pytest.raises(OutputChangedError, match="replaced or removed by someone else"):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "config.json").write_text("{}")
            os.rename(out, tmp_path / "elsewhere")
            out.mkdir()
            (out / "theirs").write_text("written meanwhile")
    assert [p.name for p in out.iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "out"]


def test_force_with_nothing_at_the_start_replaces_nothing_at_the_end(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputChangedError, match="appeared while this command was writing it"):
        with atomic_output_dir(out, force=True) as tmp:
            (tmp / "config.json").write_text("{}")
            out.mkdir()
            (out / "theirs").write_text("written meanwhile")
    assert [p.name for p in out.iterdir()] == ["theirs"]
