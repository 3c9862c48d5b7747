"""Plugins: Python files or installed packages that register auxiliary targets for every command.

    maetok --plugin my_targets.py tokenizer train model.aux_targets=[{name: hog}, {name: my_target}] ...
    maetok pilot --plugin my_targets.py --variants maetok --target-sets "hog;hog,my_target"

A plugin file registers targets when it is imported (`@register_target("name")`, examples/
domain_targets_plugin.py). An installed package does the same from the entry point group `maetok.targets`,
which the command line loads at every start: the entry point names a module (imported) or a function (called).
Each plugin must register at least one target. A training run records the plugins whose targets it uses in its
maetok-run.json (a pilot in its pilot_results.json), and a resumed run loads them again and says so.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
import sys
import traceback
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Iterable

from .config import ConfigError
from .tokenizer.targets import TARGETS

log = logging.getLogger("maetok.plugins")
ENTRY_POINT_GROUP = "maetok.targets"


@dataclass(frozen=True)
class LoadedPlugin:
    """A plugin this process has loaded, and the targets it registered."""
    kind: str               # "file" or "entry_point"
    source: str             # the file's absolute path, or the entry point's name
    targets: tuple[str, ...]

    def record(self) -> dict[str, Any]:
        """What a run saves of it (JSON), for `reload_plugins`."""
        return {self.kind: self.source, "targets": list(self.targets)}


# Loaded plugins by (kind, source): a plugin is imported once per process, so that a second --plugin naming it (or
# a resumed run's record of it) does not register its targets twice, which the registry refuses.
LOADED: dict[tuple[str, str], LoadedPlugin] = {}


def split_plugin_options(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without its `--plugin FILE` / `--plugin=FILE` options, the files in order), so that --plugin may
    stand before or after the command's name. A --plugin without a file is left for the parser to refuse."""
    rest, files, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--plugin" and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            files.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith("--plugin="):
            files.append(arg.partition("=")[2])
        else:
            rest.append(arg)
        i += 1
    return rest, files


def load_plugins(files: Iterable[str | Path] = (), installed: bool = True) -> list[LoadedPlugin]:
    """The command line's start: every installed `maetok.targets` entry point (when `installed`), then each
    plugin file in order. ConfigError (one line) for a plugin that cannot be loaded."""
    loaded = []
    if installed:
        loaded += [load_entry_point(ep) for ep in entry_points(group=ENTRY_POINT_GROUP)]
    loaded += [load_plugin_file(path) for path in files]
    return loaded


def load_plugin_file(path: str | Path) -> LoadedPlugin:
    """Import the plugin file at `path` (once per process) and return what it registered."""
    file = Path(path).expanduser().resolve()
    key = ("file", str(file))
    if key in LOADED:
        return LOADED[key]
    if not file.is_file():
        raise ConfigError(f"plugin {path}: no such file" if not file.exists() else
                          f"plugin {path}: not a file; give the path of a Python file")
    # A name of its own per path: two plugins both called targets.py must not replace each other in sys.modules.
    digest = hashlib.sha1(str(file).encode()).hexdigest()[:8]
    module_name = f"maetok_plugin_{re.sub(r'[^0-9A-Za-z_]', '_', file.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"plugin {path}: cannot be imported as Python (a .py file is expected)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look their module up there while it runs

    def run() -> None:
        spec.loader.exec_module(module)

    try:
        return _register(key, f"plugin {path}", run, where=str(file))
    except ConfigError:
        sys.modules.pop(module_name, None)
        raise


def load_entry_point(ep) -> LoadedPlugin:
    """Load one `maetok.targets` entry point: import its module, and call it when it names a function."""
    key = ("entry_point", ep.name)
    if key in LOADED:
        return LOADED[key]

    def run() -> None:
        loaded = ep.load()
        if callable(loaded):
            loaded()

    return _register(key, f"plugin {ep.name} (entry point {ep.value!r} of group {ENTRY_POINT_GROUP})", run,
                     where=None, package=ep.module)


def _register(key: tuple[str, str], what: str, run, where: str | None, package: str = "") -> LoadedPlugin:
    """Run a plugin's import; on any failure undo what it registered and raise one ConfigError line.
    `package`: an installed plugin's module, which may have been imported (and registered its targets) before."""
    before = dict(TARGETS)
    try:
        run()
    except Exception as e:  # the plugin's own code: any error is its author's, reported in one line
        TARGETS.clear()
        TARGETS.update(before)
        raise ConfigError(f"{what} raised {type(e).__name__} while loading{_line_in(e, where)}: {e}") from e
    registered = tuple(name for name, factory in TARGETS.items() if before.get(name) is not factory)
    if not registered and package:
        registered = tuple(name for name, factory in TARGETS.items()
                           if getattr(factory, "__module__", "").partition(".")[0] == package.partition(".")[0])
    if not registered:
        raise ConfigError(f"{what} registered no auxiliary target; decorate a factory with "
                          f"@register_target(\"name\") from maetok.tokenizer.targets (see examples/"
                          f"domain_targets_plugin.py)")
    plugin = LOADED[key] = LoadedPlugin(key[0], key[1], registered)
    log.info("%s: registered auxiliary target%s %s", what, "s" * (len(registered) > 1), ", ".join(registered))
    return plugin


def _line_in(error: BaseException, file: str | None) -> str:
    """' (line N)': the last line of `file` the error passed through (or, for a SyntaxError, where it is)."""
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__) if frame.filename == file]
    if isinstance(error, SyntaxError) and error.filename == file and error.lineno:
        lines.append(error.lineno)
    return f" (line {lines[-1]})" if lines else ""


def plugins_for_targets(names: Iterable[str]) -> list[dict[str, Any]]:
    """The records of the loaded plugins that registered any of the target `names` (a run saves these)."""
    wanted = set(names)
    return [p.record() for p in LOADED.values() if wanted & set(p.targets)]


def plugins_for_config(cfg: Any) -> list[dict[str, Any]]:
    """The plugin records a run config needs: those of its auxiliary targets, when its model uses them."""
    model = getattr(cfg, "model", None)
    if not getattr(model, "uses_aux", False):
        return []
    return plugins_for_targets(t.name for t in model.aux_targets)


def reload_plugins(records: Iterable[dict[str, Any]] | None, recorded_in: str | Path) -> None:
    """Load again the plugins a run recorded (`plugins_for_targets`) when it is resumed, logging each. One whose
    targets are registered already (e.g. by --plugin with its new path) is not loaded again; one that is gone
    otherwise is refused in one line."""
    for record in records or []:
        targets = list(record.get("targets", []))
        kind = "file" if "file" in record else "entry_point"
        source = str(record.get(kind, ""))
        if (kind, source) in LOADED:
            continue
        if targets and all(name in TARGETS for name in targets):
            log.info("resume: targets %s of plugin %s (recorded in %s) are registered already; not loading it",
                     ", ".join(targets), source, recorded_in)
            continue
        if not (Path(source).is_file() if kind == "file" else _installed(source)):
            what = "file" if kind == "file" else f"entry point of group {ENTRY_POINT_GROUP}"
            raise ConfigError(f"{recorded_in} records plugin {source} (targets {', '.join(targets)}), and that "
                              f"{what} is not there any more; put it back, or give its new path with --plugin")
        plugin = load_plugin_file(source) if kind == "file" else load_entry_point(_entry_point(source))
        log.info("resume: loaded plugin %s again (recorded in %s): %s", source, recorded_in,
                 ", ".join(plugin.targets))


def _entry_point(name: str):
    return next(ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name)


def _installed(name: str) -> bool:
    return any(ep.name == name for ep in entry_points(group=ENTRY_POINT_GROUP))


__all__ = ["ENTRY_POINT_GROUP", "LOADED", "LoadedPlugin", "load_entry_point", "load_plugin_file", "load_plugins",
           "plugins_for_config", "plugins_for_targets", "reload_plugins", "split_plugin_options"]
