"""What a call costs in tokens: the reservation before it, the charge after it.

Reserve-then-settle: before a call the tenant's token bucket gives up a *reservation*, the
prompt's estimated tokens plus the answer's ``max_tokens``; after it the reservation is replaced by
the *charge*, what the upstream really consumed. Estimates err on the high side, because an
estimate that is too low is a limit a tenant can walk around:

* text: one token per 3 UTF-8 bytes of the serialized request (English runs near 4 characters
  per token, so this overcounts; a CJK character is 3 bytes and about one token), plus a fixed
  overhead per message for the chat template's role markers;
* images: a fixed :data:`IMAGE_TOKENS` each (their URL or inline bytes are not text);
* tools and the response format are part of the serialized request, so they count too.

The charge, in order (:func:`charge`): the usage the upstream reported; the whole reservation when
a provider served the call without reporting usage (unknown is not free); nothing when no provider
was ever asked; the prompt plus the answer relayed so far (``relayed_chars`` / 4) for a stream cut
short; the whole reservation for a unary call cut short after its answer began (the gateway cannot
know how much the upstream generated); the prompt alone when it failed before any answer.
"""

from __future__ import annotations

from typing import Any

from service.observe.telemetry import RpcStats

BYTES_PER_TOKEN = 3
MESSAGE_OVERHEAD_TOKENS = 4  # role markers and separators of a chat template
IMAGE_TOKENS = 1600  # a large image on Anthropic (~1,600) and OpenAI high detail (~1,100)
CHARS_PER_TOKEN_RELAYED = 4  # answer text relayed to the caller, converted back to tokens


def estimate_prompt_tokens(request: Any) -> int:
    """A conservative token count of everything a provider will read from ``request`` (proto)."""
    images = 0
    image_bytes = 0
    for message in request.messages:
        for part in message.parts:
            if part.HasField("image_url"):
                images += 1
                image_bytes += len(part.image_url.url)
    text_bytes = max(0, int(request.ByteSize()) - image_bytes)
    return -(-text_bytes // BYTES_PER_TOKEN) + MESSAGE_OVERHEAD_TOKENS * len(request.messages) + IMAGE_TOKENS * images


def reservation(prompt_tokens: int, max_tokens: int, capacity: int) -> int:
    """The tokens a call sets aside: prompt + max_tokens, never more than a full bucket (so that a
    large call is admitted when the tenant's minute is untouched, and only then)."""
    return min(prompt_tokens + max_tokens, capacity)


def charge(stats: RpcStats | None, reserved: int, prompt_tokens: int) -> int:
    """What the finished call consumed upstream (see the module docstring for the rules).

    Args:
        stats: The call's figures from the router (None: the call never reached the router).
        reserved: The tokens set aside before the call.
        prompt_tokens: The prompt estimate the reservation was made of.
    """
    if stats is None:
        return 0
    if stats.usage_reported:
        return stats.prompt_tokens + stats.completion_tokens
    if stats.provider:
        return reserved  # served, but the upstream said nothing of its usage
    if not stats.started:
        return 0
    if stats.relayed_chars:
        return prompt_tokens + -(-stats.relayed_chars // CHARS_PER_TOKEN_RELAYED)
    if stats.answer_began:
        return reserved
    return prompt_tokens
