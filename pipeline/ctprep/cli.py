"""The ``ctprep`` command line. Each command lives beside the code it drives;
this module only registers them, so importing it stays cheap."""

from __future__ import annotations

import typer

from ctprep.inventory import inventory
from ctprep.synth.cli import demo_data
from ctprep.runner_cli import build_shards, status
from ctprep.runner_cli import compact_shards
from ctprep_train.inference_cli import classify, embed

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Offline CT preprocessing: raw CT-RATE / OmniAbnorm-CT -> zarr -> WebDataset shards.",
)
app.command("demo-data")(demo_data)
app.command("build-shards")(build_shards)
app.command("status")(status)
app.command("compact")(compact_shards)
app.command("inventory")(inventory)
app.command("embed")(embed)
app.command("classify")(classify)

if __name__ == "__main__":
    app()
