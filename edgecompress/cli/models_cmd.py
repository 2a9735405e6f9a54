"""``edgecompress models``: the reference zoo with input shapes, parameters and MACs."""

from __future__ import annotations

import click
from rich.table import Table

from edgecompress import models as zoo
from edgecompress.cli._options import console, fmt_int
from edgecompress.loading import InputSpec, sample_inputs
from edgecompress.stats import count_macs, count_params


@click.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def command(as_json: bool) -> None:
    """List the reference models: name, input, parameters and MACs."""
    rows = []
    for name in zoo.list_models():
        spec = zoo.get_spec(name)
        module = zoo.create_model(name)
        inputs = sample_inputs(module, InputSpec(spec.input_shape, spec.input_dtype))
        rows.append({"name": name, "input_shape": list(spec.input_shape), "input_dtype": spec.input_dtype,
                     "params": count_params(module), "macs": count_macs(module, inputs)[0],
                     "description": spec.description})
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title="edgecompress model zoo")
    for col, justify in (("model", "left"), ("input", "left"), ("params", "right"), ("MACs", "right"), ("description", "left")):
        table.add_column(col, justify=justify)
    for r in rows:
        shape = "x".join(map(str, r["input_shape"])) + (f" {r['input_dtype']}" if r["input_dtype"] != "float32" else "")
        table.add_row(r["name"], shape, fmt_int(r["params"]), fmt_int(r["macs"]), r["description"])
    console.print(table)
