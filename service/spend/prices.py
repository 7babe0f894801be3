"""Prices: Anthropic's per-token table, GPU hours from modal_vllm, and ``PRICES_FILE`` overrides.

Anthropic bills per million tokens, with separate prices for prompt-cache reads and writes, and a
few models switch every token of a request to a higher tier when the prompt is long. The table
below is Anthropic's published pricing page as of October 2026 (5-minute cache writes); it is not
fetched, so check it before budgeting and put changes in ``PRICES_FILE`` (TOML, docs/cost.md).

A model is looked up by its exact id, then as a dated or suffixed form of a listed id
(``claude-sonnet-4-5-20250929``, ``claude-opus-4-6[1m]``, ``claude-opus-4@20250514``), then by
family (``opus``, ``sonnet``, ``haiku``, ``fable``, ``mythos``: the most expensive current price
of that family), and last at the most expensive price in the table. Unknown models are
over-estimated on purpose: a budget must not be passed because a price was missing.

GPU-hour prices come from :mod:`modal_vllm.pricing` (the deployment's own table), overridable in
the same file.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from modal_vllm.pricing import GPU_PRICE_USD_PER_HOUR, price_usd_per_hour
from service.errors import ConfigError

PER_MILLION = 1_000_000
# Anthropic's cache multipliers, used when a price gives no cache figures of its own.
CACHE_READ_FACTOR = 0.1
CACHE_WRITE_FACTOR = 1.25


@dataclass(frozen=True, slots=True)
class TokenPrice:
    """USD per million tokens of one model.

    Attributes:
        input: Uncached input tokens.
        output: Output tokens.
        cache_read: Input tokens read from the prompt cache (default: 0.1 x input).
        cache_write: Input tokens written to the prompt cache (default: 1.25 x input).
        long_prompt_threshold: A request whose prompt (input + cache reads + cache writes)
            exceeds this many tokens pays ``long`` for every token, output included.
        long: The long-prompt price.
    """

    input: float
    output: float
    cache_read: float | None = None
    cache_write: float | None = None
    long_prompt_threshold: int | None = None
    long: TokenPrice | None = None

    def cost_usd(
        self, prompt_tokens: int, completion_tokens: int, cache_read_tokens: int = 0, cache_write_tokens: int = 0
    ) -> float:
        """What a request with these token counts costs."""
        prompt = prompt_tokens + cache_read_tokens + cache_write_tokens
        if self.long is not None and self.long_prompt_threshold is not None and prompt > self.long_prompt_threshold:
            return self.long.cost_usd(prompt_tokens, completion_tokens, cache_read_tokens, cache_write_tokens)
        cache_read = self.input * CACHE_READ_FACTOR if self.cache_read is None else self.cache_read
        cache_write = self.input * CACHE_WRITE_FACTOR if self.cache_write is None else self.cache_write
        micro_usd = (
            prompt_tokens * self.input
            + completion_tokens * self.output
            + cache_read_tokens * cache_read
            + cache_write_tokens * cache_write
        )
        return micro_usd / PER_MILLION


def _p(inp: float, out: float, read: float, write: float) -> TokenPrice:
    return TokenPrice(inp, out, read, write)


_OPUS_CURRENT = _p(5.00, 25.00, 0.50, 6.25)
_OPUS_4 = _p(15.00, 75.00, 1.50, 18.75)
_SONNET_4 = TokenPrice(3.00, 15.00, 0.30, 3.75, 200_000, _p(6.00, 22.50, 0.60, 7.50))  # >200K: 1M-context beta
_SONNET_46 = _p(3.00, 15.00, 0.30, 3.75)  # no long-context surcharge from 4.6 on

ANTHROPIC_PRICES: Mapping[str, TokenPrice] = MappingProxyType(
    {
        "claude-fable-5-1": _p(10.00, 50.00, 0.25, 12.50),
        "claude-mythos-5-1": _p(10.00, 50.00, 0.25, 12.50),
        "claude-fable-5": _p(10.00, 50.00, 1.00, 12.50),
        "claude-mythos-5": _p(10.00, 50.00, 1.00, 12.50),
        "claude-opus-5-5": _p(4.00, 20.00, 0.20, 5.00),
        "claude-opus-5": _OPUS_CURRENT,
        "claude-opus-4-8": _OPUS_CURRENT,
        "claude-opus-4-7": _OPUS_CURRENT,
        "claude-opus-4-6": _OPUS_CURRENT,
        "claude-opus-4-5": _OPUS_CURRENT,
        "claude-opus-4-1": _OPUS_4,
        "claude-opus-4": _OPUS_4,
        "claude-sonnet-5-5": _p(2.00, 10.00, 0.10, 2.50),  # cache reads cut to 0.05 x input on 2026-10-07
        "claude-sonnet-5": _p(2.00, 10.00, 0.20, 2.50),
        "claude-sonnet-4-6": _SONNET_46,
        "claude-sonnet-4-5": _SONNET_4,
        "claude-sonnet-4": _SONNET_4,
        "claude-haiku-5-5": TokenPrice(0.10, 0.50, 0.01, 0.125, 100_000, _p(0.50, 2.50, 0.05, 0.625)),
        "claude-haiku-4-5": _p(1.00, 5.00, 0.10, 1.25),
        "claude-3-5-haiku": _p(0.80, 4.00, 0.08, 1.00),
    }
)
"""Built-in Anthropic prices, USD per million tokens (input, output, cache read, 5-minute cache write)."""

FAMILY_PRICES: Mapping[str, TokenPrice] = MappingProxyType(
    {
        "fable": ANTHROPIC_PRICES["claude-fable-5-1"],
        "mythos": ANTHROPIC_PRICES["claude-mythos-5-1"],
        "opus": _OPUS_CURRENT,
        "sonnet": _SONNET_46,
        "haiku": ANTHROPIC_PRICES["claude-haiku-4-5"],
    }
)
"""For ids not in the table: the most expensive current price of the family the id names."""

# What may follow a listed id and still mean that model: a release date, a context variant, a
# cloud's version tag. "-9" may not: claude-opus-4-9 is not claude-opus-4.
_SUFFIX = re.compile(r"(-\d{8}|@\d{8}|\[[^\]]*\]|-latest)+$")


@dataclass(frozen=True, slots=True)
class PriceTable:
    """The prices the cost model uses.

    Attributes:
        anthropic: Per-token prices by model id.
        gpu_usd_per_hour: USD per GPU hour by GPU type (``L4``...).
    """

    anthropic: Mapping[str, TokenPrice] = field(default_factory=lambda: ANTHROPIC_PRICES)
    gpu_usd_per_hour: Mapping[str, float] = field(default_factory=lambda: GPU_PRICE_USD_PER_HOUR)

    def token_price(self, model: str) -> tuple[TokenPrice, str]:
        """The price of a model and how it was found.

        Returns:
            The price, and the table key it matched, ``family:<name>``, or ``most-expensive``.
        """
        if model in self.anthropic:
            return self.anthropic[model], model
        for key in sorted(self.anthropic, key=len, reverse=True):
            if model.startswith(key) and _SUFFIX.fullmatch(model[len(key) :]):
                return self.anthropic[key], key
        for family, price in FAMILY_PRICES.items():
            if family in model:
                return price, f"family:{family}"
        return max(self.anthropic.values(), key=lambda p: (p.output, p.input)), "most-expensive"

    def gpu_price(self, gpu: str) -> float:
        """USD per hour of a GPU type.

        Raises:
            ValueError: The type has no price; the message lists the priced ones.
        """
        return price_usd_per_hour(gpu, self.gpu_usd_per_hour)

    @classmethod
    def from_file(cls, path: str | Path) -> PriceTable:
        """The built-in prices with a ``PRICES_FILE`` (TOML) laid over them.

        Raises:
            ConfigError: The file cannot be read, is not TOML, or has a bad entry (named).
        """
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
            spec = _PricesFile.model_validate(data)
        except OSError as exc:
            raise ConfigError(f"PRICES_FILE={path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"PRICES_FILE={path}: not TOML: {exc}") from None
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors(include_url=False)
            )
            raise ConfigError(f"PRICES_FILE={path}: {problems}") from None
        anthropic = dict(ANTHROPIC_PRICES)
        for model, entry in spec.anthropic.items():
            anthropic[model] = entry.price()
        gpu = dict(GPU_PRICE_USD_PER_HOUR)
        gpu.update({k.upper(): v for k, v in spec.gpu_usd_per_hour.items()})
        return cls(MappingProxyType(anthropic), MappingProxyType(gpu))


Usd = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class _Tier(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input: Usd
    output: Usd
    cache_read: Usd | None = None
    cache_write: Usd | None = None


class _LongTier(_Tier):
    threshold_tokens: Annotated[int, Field(gt=0)]


class _Entry(_Tier):
    long_prompt: _LongTier | None = None

    def price(self) -> TokenPrice:
        long = self.long_prompt
        return TokenPrice(
            self.input,
            self.output,
            self.cache_read,
            self.cache_write,
            None if long is None else long.threshold_tokens,
            None if long is None else TokenPrice(long.input, long.output, long.cache_read, long.cache_write),
        )


class _PricesFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    anthropic: dict[str, _Entry] = {}
    gpu_usd_per_hour: dict[str, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = {}
