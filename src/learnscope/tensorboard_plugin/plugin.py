"""The ``learnscope`` TensorBoard tab: a dynamic plugin (an ES module in an iframe).

Routes, under ``/data/plugin/learnscope/``:

* ``index.js``, ``style.css``: the frontend (fixed names, package data; no path parameter);
* ``runs``: the sections of the runs holding learnscope tags (one per learnscope
  callback: the run's first LCA and NFA roots together, then each further root, e.g.
  ``LossChangeAllocation(name="lca_val")``), with their LCA modules and NFA layers;
* ``lca?run=R&root=K``: the LCA view of section K of run R (see :meth:`Reader.lca`);
  ``root`` may be left out for the run's main section;
* ``nfa?run=R&root=K``: the NFA view;
* ``units?run=R&root=K&layer=M``: module M's per-unit allocations (a units × steps matrix);
* ``image?run=R&root=K&layer=L&step=S``: layer L's matrices image at step S (PNG).

Safety: every route reads only through ``context.data_provider`` with the request's
experiment id; ``run``, ``root`` and ``layer`` must be names the provider itself lists
for the experiment, ``step`` a decimal integer of at most 12 digits. Anything else gets a
400 with a one-line message (never a traceback).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Collection
from importlib import resources
from typing import Any

from tensorboard import plugin_util
from tensorboard.backend import http_util
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from learnscope.tensorboard_plugin.reader import Reader
from learnscope.tensorboard_plugin.tags import RunIndex

__all__ = ["PLUGIN_NAME", "LearnscopePlugin"]

PLUGIN_NAME = "learnscope"
#: the frontend's files: route → (file in static/, content type); nothing else is served
_STATIC = {"/index.js": ("index.js", "text/javascript"), "/style.css": ("style.css", "text/css")}
_MAX_ARG = 1024  # characters: longer than any run or layer name TensorBoard would list
_CACHED_VIEWS = 16  # LCA/NFA views kept, each valid until TensorBoard loads a later step


class BadRequest(ValueError):
    """A request parameter is missing, malformed or unknown (answered with a 400)."""


class LearnscopePlugin(base_plugin.TBPlugin):
    """The learnscope tab: LCA and NFA per layer, read from TensorBoard's data provider."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._provider = context.data_provider
        self._views: OrderedDict[tuple[object, ...], dict[str, object]] = OrderedDict()
        self._lock = threading.Lock()

    def get_plugin_apps(self) -> dict[str, Callable[..., Any]]:
        apps: dict[str, Callable[..., Any]] = {route: _static_app(*spec) for route, spec in _STATIC.items()}
        apps.update(
            {
                "/runs": self._route(self._runs),
                "/lca": self._route(self._lca),
                "/nfa": self._route(self._nfa),
                "/units": self._route(self._units),
                "/image": self._route(self._image),
            }
        )
        return apps

    def is_active(self) -> bool:
        return False  # data_plugin_names decides: the tab is offered where scalars are

    def data_plugin_names(self) -> tuple[str, ...]:
        return ("scalars", PLUGIN_NAME)

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(es_module_path="/index.js", tab_name="learnscope")

    def _route(self, handler: Callable[[Reader, Any], Any]) -> Callable[..., Any]:
        """A WSGI app around ``handler(reader, request)``: JSON (or bytes) back, a 400
        with the message on :class:`BadRequest`."""

        @wrappers.Request.application
        def app(request: wrappers.Request) -> wrappers.Response:
            reader = Reader(
                self._provider, plugin_util.context(request.environ), plugin_util.experiment_id(request.environ)
            )
            try:
                body = handler(reader, request)
            except BadRequest as error:
                return http_util.Respond(request, str(error), "text/plain", code=400)
            if isinstance(body, bytes):
                return http_util.Respond(request, body, "image/png")
            return http_util.Respond(request, body, "application/json")

        return app

    def _runs(self, reader: Reader, request: wrappers.Request) -> dict[str, object]:
        runs = [
            {
                "name": run if first else f"{run} · {root}",
                "run": run,
                "root": root,
                "roots": [r for r, writer in index.roots.items() if writer is not None],
                "lca": index.lca_modules,
                "nfa": index.nfa_layers,
                "units": sorted(index.units),
                "max_step": index.max_step,
            }
            for run, sections in reader.indices().items()
            for first, (root, index) in zip([True, *[False] * len(sections)], sections.items())
        ]
        return {"runs": runs}

    def _lca(self, reader: Reader, request: wrappers.Request) -> dict[str, object]:
        run, root, index = _run(reader, request)
        return self._view(("lca", reader.experiment_id, run, root, index.max_step), lambda: reader.lca(run, index))

    def _nfa(self, reader: Reader, request: wrappers.Request) -> dict[str, object]:
        run, root, index = _run(reader, request)
        return self._view(("nfa", reader.experiment_id, run, root, index.max_step), lambda: reader.nfa(run, index))

    def _view(self, key: tuple[object, ...], compute: Callable[[], dict[str, object]]) -> dict[str, object]:
        """A view computed once per run and last loaded step (a large run's LCA view
        reads every point of hundreds of series)."""
        with self._lock:
            if key in self._views:
                self._views.move_to_end(key)
                return self._views[key]
        view = compute()
        with self._lock:
            self._views[key] = view
            while len(self._views) > _CACHED_VIEWS:
                self._views.popitem(last=False)
        return view

    def _units(self, reader: Reader, request: wrappers.Request) -> dict[str, object]:
        run, _, index = _run(reader, request)
        module = _arg(request, "layer", index.units)
        return {"layer": module, **reader.units(run, *index.units[module])}

    def _image(self, reader: Reader, request: wrappers.Request) -> bytes:
        run, _, index = _run(reader, request)
        layer = _arg(request, "layer", index.images)
        step = _arg(request, "step")
        if not (step.isascii() and step.isdigit() and len(step) <= 12):
            raise BadRequest("step must be a non-negative decimal integer of at most 12 digits")
        image = reader.image(run, index.images[layer], int(step))
        if image is None or not image.startswith(b"\x89PNG"):
            raise BadRequest("no matrices image of this layer at this step")
        return image


def _arg(request: wrappers.Request, name: str, allowed: Collection[str] | None = None) -> str:
    """The one value of query parameter ``name``; it must be in ``allowed`` when given."""
    values = request.args.getlist(name)
    if len(values) != 1:
        raise BadRequest(f"give the parameter '{name}' exactly once")
    value = values[0]
    if len(value) > _MAX_ARG:
        raise BadRequest(f"'{name}' is longer than {_MAX_ARG} characters")
    if allowed is not None and value not in allowed:
        raise BadRequest(f"unknown {name}: not one of the names this experiment lists (see the 'runs' route)")
    return value


def _run(reader: Reader, request: wrappers.Request) -> tuple[str, str, RunIndex]:
    """The requested run (one the provider lists with learnscope tags), section (its
    ``root``; the main one when the parameter is absent) and the section's tags."""
    name = _arg(request, "run")
    indices = reader.indices([name])
    if name not in indices:
        raise BadRequest("unknown run: not a run of this experiment with learnscope tags (see the 'runs' route)")
    sections = indices[name]
    root = _arg(request, "root", sections) if "root" in request.args else next(iter(sections))
    return name, root, sections[root]


def _static_app(filename: str, content_type: str) -> Callable[..., Any]:
    @wrappers.Request.application
    def app(request: wrappers.Request) -> wrappers.Response:
        body = (resources.files(__package__) / "static" / filename).read_bytes()
        return http_util.Respond(request, body, content_type)

    return app
