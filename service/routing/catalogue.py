"""The model catalogue: names that mean the same model on every provider.

``MODELS_FILE`` (TOML, read with :mod:`tomllib`)::

    default = "qwen2.5-7b"            # used when a request names no model

    [models."qwen2.5-7b"]
    modal = "Qwen/Qwen2.5-7B-Instruct"
    vastai = "Qwen/Qwen2.5-7B-Instruct"
    anthropic = "claude-haiku-4-5"

A request's ``model`` is a catalogue name (routed to the providers that map it, each with its own
id), or a provider's own model id (routed to the providers that serve it). Without a file the
catalogue is each provider's default model under the provider's name, which is today's behaviour:
an empty ``model`` goes to every provider with its default.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from service.config import KNOWN_PROVIDERS
from service.errors import ConfigError


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    """One name and its provider model ids, in chain order."""

    name: str
    routes: tuple[tuple[str, str], ...]

    def model_for(self, provider: str) -> str | None:
        """This name's model id on ``provider``, or None when it is not routed there."""
        return next((m for p, m in self.routes if p == provider), None)


@dataclass(frozen=True, slots=True)
class Catalogue:
    """Every catalogue name; ``default`` is the entry used when a request names no model."""

    entries: Mapping[str, CatalogueEntry] = field(default_factory=dict)
    default: str = ""
    from_file: bool = False

    def lookup(self, model: str | None) -> CatalogueEntry | None:
        """The entry a request's model refers to (the default for an empty one), if any."""
        if not model:
            return self.entries.get(self.default) if self.default else None
        return self.entries.get(model)

    def ordered(self) -> list[CatalogueEntry]:
        """Entries with the default first."""
        first = [self.entries[self.default]] if self.default in self.entries else []
        return first + [e for n, e in self.entries.items() if n != self.default]


def default_catalogue(defaults: Sequence[tuple[str, str]]) -> Catalogue:
    """Without a file: each provider's default model, named after the model id itself."""
    entries: dict[str, list[tuple[str, str]]] = {}
    for provider, model in defaults:
        entries.setdefault(model, []).append((provider, model))
    return Catalogue({n: CatalogueEntry(n, tuple(r)) for n, r in entries.items()})


def load_catalogue(path: str, chain: Sequence[str]) -> Catalogue:
    """Reads ``MODELS_FILE``; raises ConfigError naming the file, the entry and what is wrong."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"MODELS_FILE={path}: cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"MODELS_FILE={path}: not valid TOML: {exc}") from None
    unknown = set(data) - {"default", "models"}
    if unknown:
        raise ConfigError(
            f"MODELS_FILE={path}: unknown top-level keys {sorted(unknown)}; use 'default' and [models.<name>]"
        )
    models = data.get("models", {})
    if not isinstance(models, dict) or not models:
        raise ConfigError(f"MODELS_FILE={path}: no [models.<name>] tables")
    entries: dict[str, CatalogueEntry] = {}
    for name, table in models.items():
        if not isinstance(table, dict) or not table:
            raise ConfigError(f"MODELS_FILE={path}: [models.{name!r}] must map providers to model ids")
        bad = [p for p, m in table.items() if not isinstance(m, str) or not m]
        if bad:
            raise ConfigError(f"MODELS_FILE={path}: [models.{name!r}] {bad[0]} must be a non-empty model id string")
        typos = sorted(set(table) - set(KNOWN_PROVIDERS))
        if typos:
            raise ConfigError(
                f"MODELS_FILE={path}: [models.{name!r}] names unknown providers {typos}; "
                f"known: {', '.join(KNOWN_PROVIDERS)}"
            )
        # Providers not in this gateway's chain are kept out of the routes (a shared file may name
        # providers one deployment does not configure).
        entries[name] = CatalogueEntry(name, tuple((p, table[p]) for p in chain if p in table))
    default = data.get("default", "")
    if default and default not in entries:
        raise ConfigError(f"MODELS_FILE={path}: default = {default!r} is not one of {sorted(entries)}")
    return Catalogue(entries, default, from_file=True)
