"""`ftserve serve`'s flags are generated from the settings' declarations: one flag per declared field, with the
field's default and range, and the objects the command receives equal the classes' own defaults when no flag is
given. Both sides are read from the objects (dataclass fields, click parameters), never from a list here."""

from __future__ import annotations

import dataclasses
import inspect

import click
import pytest
from click.testing import CliRunner

from ftserve.cli import main
from ftserve.cli.options import VLLM_PREFIX, from_settings
from ftserve.cli.serve import serve
from ftserve.engine import ENGINES
from ftserve.engine.declare import declared
from ftserve.engine.options import EngineOptions, flag
from ftserve.engine.vllm.adapters import VLLM_DEFAULT_RANK
from ftserve.server.settings import ServerSettings

SETTINGS = (EngineOptions, ServerSettings)
FLAG_FIELDS = [field for cls in SETTINGS for field in declared(cls)]


def options_named(name: str) -> list[click.Parameter]:
    return [param for param in serve.params if param.name == name]


@pytest.mark.parametrize("field", FLAG_FIELDS, ids=[field.name for field in FLAG_FIELDS])
def test_every_declared_setting_is_one_flag_with_its_default(field):
    found = options_named(field.name)
    assert len(found) == 1, f"{field.name}: {len(found)} options of `ftserve serve`"
    option = found[0]
    assert flag(field.name) in option.opts + option.secondary_opts
    assert option.default == field.default
    assert option.help.startswith(VLLM_PREFIX) == field.metadata["vllm"]


def test_serve_takes_the_objects_and_a_flag_for_nothing_else():
    own = [name for name in inspect.signature(serve.callback).parameters if name not in ("options", "settings")]
    names = [param.name for param in serve.params]
    assert sorted(names) == sorted(own + [field.name for field in FLAG_FIELDS])  # each name once
    assert "model_path" not in names  # a field not declared with `setting` is no flag


def run_probe(*args: str) -> tuple[EngineOptions, ServerSettings]:
    received = {}

    @click.command()
    @from_settings(options=EngineOptions, settings=ServerSettings)
    def probe(options: EngineOptions, settings: ServerSettings) -> None:
        received.update(options=options, settings=settings)

    result = CliRunner().invoke(probe, list(args))
    assert result.exit_code == 0, result.output
    return received["options"], received["settings"]


def test_no_flags_build_the_objects_the_classes_default_to():
    assert run_probe() == (EngineOptions(), ServerSettings())


def test_a_flag_reaches_its_field_and_max_queue_is_one_now():
    options, settings = run_probe("--max-queue", "7", "-tp", "2", "--no-enable-prefix-caching",
                                  "--max-connections", "3")
    assert (options.max_queue, options.tensor_parallel_size, options.enable_prefix_caching) == (7, 2, False)
    assert settings.max_connections == 3


BOUNDED = [field for field in FLAG_FIELDS if field.metadata["minimum"] is not None]


@pytest.mark.parametrize("field", BOUNDED, ids=[field.name for field in BOUNDED])
def test_a_value_below_the_declared_minimum_is_refused_before_any_work(field):
    below = field.metadata["minimum"] - (0 if field.metadata["open_minimum"] else 1)
    result = CliRunner().invoke(main, ["serve", "no-such-base", flag(field.name), str(below)])
    assert result.exit_code == 2 and flag(field.name) in result.output, result.output


def test_the_engine_entries_prepare_their_own_options(llama_dir):
    options = EngineOptions()
    assert ENGINES["torch"].prepare(str(llama_dir), options, {}) is options
    assert ENGINES["vllm"].prepare(str(llama_dir), options, {}).max_lora_rank == VLLM_DEFAULT_RANK
    given = dataclasses.replace(options, max_lora_rank=8)
    assert ENGINES["vllm"].prepare(str(llama_dir), given, {}).max_lora_rank == 8
    with pytest.raises(ValueError, match="tensor_parallel_size is a vLLM option"):
        ENGINES["torch"].check(dataclasses.replace(options, tensor_parallel_size=2))
    ENGINES["vllm"].check(dataclasses.replace(options, tensor_parallel_size=2))
