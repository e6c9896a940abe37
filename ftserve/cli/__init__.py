"""The `ftserve` command: one Click group; each command lives in a module beside this one and imports
heavy libraries only when it runs."""

import click

from ..version import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ftserve")
@click.option("-v", "--verbose", is_flag=True,
              help="Also show the libraries' progress bars and warnings (transformers, datasets, the Hub).")
def main(verbose: bool) -> None:
    """Train adapters with six methods, fold them into standalone models, serve many at once."""
    if not verbose:
        from .output import quiet_libraries

        quiet_libraries()


from .extras import SERVE, TRAIN, needs_extra  # noqa: E402
from .quickstart import quickstart  # noqa: E402

main.add_command(needs_extra(quickstart, "quickstart"))  # it asks for what its flags need itself

from .adapters import export, inspect_adapter  # noqa: E402
from .merge import merge, verify  # noqa: E402

main.add_command(merge)
main.add_command(export)
main.add_command(verify)
main.add_command(inspect_adapter)

from .serve import serve  # noqa: E402

main.add_command(needs_extra(serve, "serve", SERVE))

from .train import train  # noqa: E402

main.add_command(needs_extra(train, "train", TRAIN))
