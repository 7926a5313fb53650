"""The ``unetflow`` command line: flags -> frozen config -> ``run.*``.

Each command lives in a module of its own (segment, data, model, train) that imports
only :mod:`unetflow.cli.common`; this package creates the group and registers them.
Heavy libraries are imported inside commands so that ``unetflow --help`` is instant.
Every :class:`~unetflow.errors.UnetflowError` becomes one line on stderr and exit 1.
"""

from __future__ import annotations

import click

from unetflow import __version__
from unetflow.cli import data, model, segment, train


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="unetflow")
def main() -> None:
    """Run (and train) a U-Net over microscopy images too big for one GPU.

    Images are Zarr arrays (v2 or v3), 2-D (Y, X) or 3-D (Z, Y, X), optionally with a
    leading channel axis. Work is cut into blocks that line up with the output's
    chunks, run on a Dask cluster, and written back as a chunked Zarr v3 array.
    """


for command in (segment.segment, data.info, data.convert, data.preview, model.model,
                train.train, train.sample, train.evaluate, train.demo):
    main.add_command(command)

if __name__ == "__main__":  # pragma: no cover
    main()
