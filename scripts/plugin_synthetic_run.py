"""A synthetic learnscope run (event file) for the TensorBoard tab, and the tab's cost on it.

    python scripts/plugin_synthetic_run.py LOGDIR [--layers 150] [--steps 10000] [--measure]

Writes ``LOGDIR/events.out.tfevents.*`` with the tags a LossChangeAllocation and a
NeuralFeatureAnsatz write (per-layer LCA per step, cumulative, helped fraction,
parts, the run-level health scalars, NFA Pearson/null/SE/excess every ``nfa_every``
steps with a matrices image, and per-unit allocations as one 1-D tensor summary per
module and step), with TensorBoard's own writer and protos: no torch. ``--measure``
then serves the learnscope routes on it (werkzeug's test client, every point kept)
and prints each response's size (raw and gzip) and time.

The values are known in closed form so tests can check what the tab shows:
layer ``l``'s allocation at step ``s`` is ``lca_value(l, s)``.
"""

from __future__ import annotations

import argparse
import math
import struct
import time
import zlib
from pathlib import Path

from tensorboard.compat.proto import summary_pb2
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.tensor_pb2 import TensorProto
from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
from tensorboard.compat.proto.types_pb2 import DT_FLOAT
from tensorboard.summary.writer.event_file_writer import EventFileWriter

PARTS = ("gradient", "momentum")
# TensorBoard's data providers list a tensor summary only when its metadata says
# data_class = DATA_CLASS_TENSOR (torch's summary.tensor_proto does not set it)
UNIT_PLUGIN = "learnscope"


def module_name(layer: int) -> str:
    """A transformer-like qualified name: h.<block>.<attn.c_attn|attn.c_proj|mlp.c_fc|mlp.c_proj>."""
    kinds = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    return f"transformer.h.{layer // len(kinds)}.{kinds[layer % len(kinds)]}"


def lca_value(layer: int, step: int) -> float:
    """Layer ``layer``'s allocation on the update θ_step → θ_step+1: mostly helping, decaying."""
    scale = 0.02 * (1 + layer % 7) / (1 + step / 200)
    return -scale * (0.6 + math.sin(0.37 * step + layer)) + 0.001 * math.cos(1.3 * step * (layer + 1))


def unit_values(layer: int, step: int, units: int) -> list[float]:
    return [lca_value(layer, step) / units * (1 + math.sin(u + 0.01 * step)) for u in range(units)]


def png(width: int, height: int, pixel) -> bytes:
    """A greyscale PNG of ``pixel(x, y)`` ∈ [0, 255]."""
    raw = b"".join(b"\x00" + bytes(pixel(x, y) for x in range(width)) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def _scalar(tag: str, value: float) -> summary_pb2.Summary.Value:
    return summary_pb2.Summary.Value(tag=tag, simple_value=value)


def _unit_tensor(tag: str, values: list[float]) -> summary_pb2.Summary.Value:
    shape = TensorShapeProto(dim=[TensorShapeProto.Dim(size=len(values))])
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=UNIT_PLUGIN),
        data_class=summary_pb2.DATA_CLASS_TENSOR,
    )
    return summary_pb2.Summary.Value(
        tag=tag, metadata=metadata, tensor=TensorProto(dtype=DT_FLOAT, tensor_shape=shape, float_val=values)
    )


def _image(tag: str, data: bytes, width: int, height: int) -> summary_pb2.Summary.Value:
    image = summary_pb2.Summary.Image(height=height, width=width, colorspace=1, encoded_image_string=data)
    return summary_pb2.Summary.Value(tag=tag, image=image)


def _nfa_values(layers: int, step: int) -> list[summary_pb2.Summary.Value]:
    out = []
    for layer in range(layers):
        name = module_name(layer)
        for alpha, base in (("1", 0.3), ("0.5", 0.45)):
            pearson = base + 0.4 * (1 - math.exp(-step / 300)) * (1 + layer % 3) / 3
            null, se = 0.2 + 0.01 * (layer % 5), 0.01 + 0.002 * (layer % 4)
            out += [
                _scalar(f"nfa/{name}/pearson_a{alpha}", pearson),
                _scalar(f"nfa/{name}/null_a{alpha}", null),
                _scalar(f"nfa/{name}/null_se_a{alpha}", se),
                _scalar(f"nfa/{name}/excess_a{alpha}", pearson - null),
            ]
        if layer < 4:
            out.append(_image(f"nfa/{name}/matrices", png(48, 16, lambda x, y: (x * 5 + y * 3 + step) % 256), 48, 16))
    return out


def write_run(logdir: str | Path, layers: int = 12, steps: int = 50, nfa_every: int = 10, unit_layers: int = 2,
              units: int = 16, relative_error: float = 0.002) -> Path:  # fmt: skip
    """Write the synthetic run into ``logdir``; returns the event file's path."""
    writer = EventFileWriter(str(logdir), max_queue_size=64, flush_secs=3600)
    cumulative = [0.0] * layers
    parts = [[0.0] * len(PARTS) for _ in range(layers)]
    total = 0.0
    for step in range(steps):
        values = []
        for layer in range(layers):
            name, value = module_name(layer), lca_value(layer, step)
            cumulative[layer] += value
            parts[layer][0] += 0.7 * value
            parts[layer][1] += 0.3 * value
            total += value
            values += [
                _scalar(f"lca/layer/{name}", value),
                _scalar(f"lca/layer_cumulative/{name}", cumulative[layer]),
                _scalar(f"lca/helped_fraction/{name}", 0.5 + 0.3 * math.tanh(-value * 50)),
            ]
            values += [_scalar(f"lca/part_cumulative/{p}/{name}", parts[layer][i]) for i, p in enumerate(PARTS)]
            if layer < unit_layers:
                values.append(_unit_tensor(f"lca/unit/{name}", unit_values(layer, step, units)))
        values += [_scalar("lca/total", total), _scalar("lca/cumulative_relative_error", relative_error)]
        values += [_scalar("lca/capped_steps", 0.0), _scalar("lca/skipped_steps", 0.0)]
        if step % nfa_every == 0 or step == steps - 1:
            values += _nfa_values(layers, step)
        writer.add_event(Event(wall_time=1.7e9 + step, step=step, summary=summary_pb2.Summary(value=values)))
    writer.close()
    return Path(writer.get_logdir())


def measure(logdir: str) -> None:
    """Serve the routes on ``logdir`` (every point kept) and print size and time of each."""
    import gzip

    from tensorboard.backend import application
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from werkzeug import test as werkzeug_test
    from werkzeug import wrappers

    from learnscope.tensorboard_plugin import LearnscopePlugin

    start = time.perf_counter()
    multiplexer = plugin_event_multiplexer.EventMultiplexer(tensor_size_guidance={"scalars": 0, UNIT_PLUGIN: 0})
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    print(f"loading the event file into TensorBoard's multiplexer: {time.perf_counter() - start:.1f} s")
    provider = data_provider.MultiplexerDataProvider(multiplexer, logdir)
    plugin = LearnscopePlugin(base_plugin.TBContext(logdir=logdir, data_provider=provider))
    client = werkzeug_test.Client(application.TensorBoardWSGI([plugin]), wrappers.Response)
    runs = client.get("/data/plugin/learnscope/runs").get_json()["runs"]
    run = runs[0]["name"]
    for route in ("runs", "lca", "nfa", "units"):
        query = {"run": run} if route != "runs" else {}
        if route == "units":
            query["layer"] = runs[0]["units"][0]
        start = time.perf_counter()
        response = client.get(f"/data/plugin/learnscope/{route}", query_string=query)
        elapsed = time.perf_counter() - start
        body = response.get_data()
        print(f"/{route}: HTTP {response.status_code}, {len(body) / 1e6:.2f} MB JSON "
              f"({len(gzip.compress(body, 3)) / 1e6:.2f} MB gzip), {elapsed:.2f} s")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logdir")
    parser.add_argument("--layers", type=int, default=150)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--nfa-every", type=int, default=500)
    parser.add_argument("--measure", action="store_true", help="time the tab's routes on the run")
    args = parser.parse_args()
    start = time.perf_counter()
    path = write_run(args.logdir, args.layers, args.steps, args.nfa_every)
    print(f"wrote {path} ({sum(f.stat().st_size for f in path.glob('events*')) / 1e6:.1f} MB) in "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    if args.measure:
        measure(args.logdir)


if __name__ == "__main__":
    main()
