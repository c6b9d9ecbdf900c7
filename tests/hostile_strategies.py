"""Hypothesis strategies for hostile gateway requests (used by tests/test_hostile_inputs.py).

Every strategy builds real `llm_gateway.v1` messages from the generated classes. Hostile values:
empty, odd and huge strings (huge ones are a drawn unit repeated, so they cost a few choices, not
millions), every enum value plus unknown numbers (proto3 enums are open: any int32 is accepted on
the wire), optional scalars at their type's bounds and NaN/±Inf, deep `google.protobuf.Struct`s
(built in place: copying a message deeper than the runtime's limit fails), thousands of messages,
tools, inputs and metadata entries (one drawn element replicated, so a 4096-message request costs
one draw), invalid images, extreme routing and cache options, and raw byte strings that are not
(or not quite) valid messages.

Sizes stay below the gateway's default `max_message_bytes` (32 MiB): huge strings are at most
~200 KB in ordinary fields and a few MB in one field of a rare "huge" case; replicated elements
are mostly small, and a request that would still pass the limit is filtered out (`_bounded`).

The strategy factories called inside draws (`texts()`, `models()`, `enums(...)`...) are cached
(`functools.cache`; strategies are immutable and their arguments hashable): a strategy object is
validated once, where building a new one in every draw made hypothesis validate it again each
time (about a sixth of the hostile module's run time). The draws, and so the examples, are the same.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf import struct_pb2
from hypothesis import strategies as st

from llm_gateway.v1 import llm_gateway_pb2 as pb

T = TypeVar("T")
Draw = Callable[[st.SearchStrategy[Any]], Any]

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Requests are kept below this (the server's max_message_bytes default is 32 MiB).
MAX_REQUEST_BYTES = 30 * 1024 * 1024

# Models the emulators answer without waiting (their docstrings list the scenarios); "hang",
# "stall-stream", "slow-*" and "paced-*" are left out: they would only measure timeouts.
OPENAI_SCENARIOS = (
    "gpt-4o-mini",
    "emulated-model",
    "tools",
    "no-usage",
    "length",
    "context-length",
    "content-filter",
    "quota",
    "missing-model",
    "malformed",
    "truncated",
    "stream-error",
    "drop-stream",
    "drop",
    "status-400",
    "status-401",
    "status-403",
    "status-404",
    "status-413",
    "status-422",
    "status-429",
    "status-500",
    "status-502",
    "status-503",
    "status-529",
    "flaky-500-1",
)
OLLAMA_SCENARIOS = (
    "ollama/llama3.2",
    "ollama/llama3.2:latest",
    "ollama/tools",
    "ollama/length",
    "ollama/status-500",
    "ollama/status-400",
    "ollama/missing-model",
    "ollama/stream-error",
    "ollama/truncated",
    "ollama/ratelimited-5",
    "ollama/nomic-embed-text",
)
CATALOG_MODELS = (
    "gpt-4o",
    "o3-mini",
    "text-embedding-3-small",
    "llama3.2",
    "llava",
    "nomic-embed-text",
    "claude-haiku-4-5",  # anthropic: not configured
    "llama-3.1-8b-instant",  # groq: not configured
    "openai/gpt-oss-20b",  # a catalog id that looks like provider/model
)
ODD_MODELS = (
    "",
    " ",
    "/",
    "openai/",
    "/gpt-4o-mini",
    "ollama/",
    "openai//x",
    "models/gpt-4o-mini",
    "nope/x",
    "anthropic/claude-haiku-4-5",
    "groq/x",
    "OPENAI/gpt-4o-mini",
    "gpt-4o-mini\x00",
    "gpt-4o-mini\n",
    "*",
    "gpt-*",
    "../../etc/passwd",
    "%s%s%n",
    "x" * 256,
    "x" * 257,
)
_SLOW_SCENARIOS = ("hang", "stall-stream", "slow-", "paced-")
PROVIDERS = ("", "openai", "ollama", "anthropic", "groq", "nope", "OpenAI", " openai", "openai\x00", "x" * 300)
ODD_TEXTS = (
    "",
    " ",
    "\x00",
    "\x00" * 64,
    "\n\r\t",
    "\u202e\u2066",  # bidi overrides
    "\ufeff",
    "\U0010ffff",
    "💥" * 8,
    "null",
    "{}",
    '{"a":',
    "]]>",
    "${jndi:ldap://x}",
    "%s%n%x",
    "\\u0000",
    "data:",
    "Bearer ",
)

# Surrogates cannot go into a protobuf string: every text strategy excludes category Cs.
_CHARS = st.characters(exclude_categories=("Cs",))
small_texts = st.text(_CHARS, max_size=24)


def _repeated(unit: str, length: int) -> str:
    return (unit * (length // max(len(unit), 1) + 1))[:length] if unit else ""


@functools.cache
def huge_texts(max_chars: int = 200_000) -> st.SearchStrategy[str]:
    """A drawn unit repeated to a drawn length (up to `max_chars` characters)."""
    return st.builds(
        _repeated,
        st.text(_CHARS, min_size=1, max_size=8),
        st.one_of(st.integers(0, max_chars), st.sampled_from([max_chars, 4096, 65_536, 65_537])),
    )


@functools.cache
def texts(max_chars: int = 200_000) -> st.SearchStrategy[str]:
    """Short, odd, or huge text."""
    # Listed twice: short text is drawn about twice as often as huge text.
    return st.one_of(small_texts, small_texts, st.sampled_from(ODD_TEXTS), huge_texts(max_chars))


@functools.cache
def int32s() -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from([0, 1, -1, INT32_MAX, INT32_MIN, 1000, 1001, 1_000_000, 1_000_001]),
        st.integers(INT32_MIN, INT32_MAX),
    )


@functools.cache
def int64s() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([0, -1, INT64_MAX, INT64_MIN, 2**53 + 1]), st.integers(INT64_MIN, INT64_MAX))


@functools.cache
def doubles() -> st.SearchStrategy[float]:
    specials = [math.nan, math.inf, -math.inf, -0.0, 5e-324, 1.7976931348623157e308, -1e308, 2.0000001, -2.0000001]
    return st.one_of(st.sampled_from(specials), st.floats(allow_nan=True, allow_infinity=True))


@functools.cache
def enums(enum_type: Any) -> st.SearchStrategy[int]:
    """Every defined value of a protobuf enum, then unknown numbers (any int32)."""
    defined = sorted(enum_type.values())
    return st.one_of(
        st.sampled_from(defined),
        st.sampled_from([-1, max(defined) + 1, INT32_MAX, INT32_MIN]),
        st.integers(INT32_MIN, INT32_MAX),
    )


def optional(strategy: st.SearchStrategy[T]) -> st.SearchStrategy[T | None]:
    return st.one_of(st.none(), strategy)


@functools.cache
def models() -> st.SearchStrategy[str]:
    """Model names: emulator scenarios, catalog ids, odd names and random text."""

    def fast(name: str) -> bool:
        return not name.rsplit("/", 1)[-1].startswith(_SLOW_SCENARIOS)

    return st.one_of(
        st.sampled_from(OPENAI_SCENARIOS),
        st.sampled_from(OLLAMA_SCENARIOS),
        st.sampled_from(CATALOG_MODELS),
        st.sampled_from(ODD_MODELS),
        st.builds(lambda p, m: f"{p}/{m}", st.sampled_from(PROVIDERS), small_texts),
        texts(4096),
    ).filter(fast)


tool_names = st.one_of(st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True), texts(1000))

# ---------------------------------------------------------------------------------------------
# google.protobuf.Struct
# ---------------------------------------------------------------------------------------------

_json_leaves = st.one_of(st.none(), st.booleans(), doubles(), texts(20_000))
_finite_json_leaves = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False), texts(2000))


def _json(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(small_texts, inner, max_size=4)),
        max_leaves=16,
    )


json_objects = st.dictionaries(st.one_of(small_texts, st.sampled_from(ODD_TEXTS)), _json(_json_leaves), max_size=6)
finite_json_objects = st.dictionaries(small_texts, _json(_finite_json_leaves), max_size=6)


def _leaf(value: struct_pb2.Value, kind: str) -> None:
    if kind == "nan":
        value.number_value = math.nan
    elif kind == "inf":
        value.number_value = math.inf
    elif kind == "-inf":
        value.number_value = -math.inf
    elif kind == "string":
        value.string_value = "leaf"
    elif kind == "null":
        value.null_value = struct_pb2.NULL_VALUE
    else:
        value.struct_value.SetInParent()


def fill_struct(draw: Draw, target: struct_pb2.Struct, plausible: bool = False) -> None:
    """Fills `target` in place: a JSON-like object, sometimes with one deep branch (through
    structs, lists or both). Plausible: finite numbers, depth within the runtime's nesting limit;
    else NaN/Inf anywhere and depths around the limit or far past it."""
    target.update(draw(finite_json_objects if plausible else json_objects))
    if plausible:
        depth = draw(st.one_of(st.just(0), st.integers(0, 20)))
    else:
        depth = draw(st.one_of(st.just(0), st.integers(0, 48), st.sampled_from([30, 31, 32, 33, 34, 40, 100, 2000])))
    if not depth:
        return
    via = draw(st.sampled_from(["struct", "list", "mixed"]))
    leaf = draw(st.sampled_from(["struct", "string", "null"] if plausible else ["nan", "inf", "-inf", "struct"]))
    node = target
    value = None
    for level in range(depth):
        value = node.fields["deep"]
        if via == "list" or (via == "mixed" and level % 2):
            value = value.list_value.values.add()
        if level < depth - 1:
            node = value.struct_value
    if value is not None:
        _leaf(value, leaf)


# ---------------------------------------------------------------------------------------------
# Conversation pieces, filled in place into the request being built. `plausible=True` keeps the
# structure valid (so the request gets past validation to routing, the cache and the providers)
# with hostile values where the contract allows any; `plausible=False` lets anything through.
# ---------------------------------------------------------------------------------------------

IMAGE_MIMES = ("image/png", "image/jpeg", "image/gif", "image/webp")
BAD_MIMES = ("", "image/PNG", "text/plain", "image/svg+xml", "image/png; charset=x", "application/octet-stream", "*/*")
IMAGE_URLS = (
    "",
    "https://",
    "https://example.invalid/a.png",
    "http://127.0.0.1:1/a.png",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "ftp://x/a.png",
    "data:",
    "data:image/png",
    "data:image/png;base64,",
    "data:image/png;base64,!!!!",
    "data:image/png;base64,iVBORw0KGgo=",
    "data:image/;base64,AAAA",
    "data:image/png;base64;base64,AAAA",
    "data:text/plain;base64,AAAA",
    "data:image/png," + "A" * 100,
)
PLAUSIBLE_URL_PREFIXES = ("https://", "http://", "data:image/")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
valid_names = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)


@functools.cache
def random_bytes(max_size: int) -> st.SearchStrategy[bytes]:
    """Small drawn bytes, or a seeded pseudo-random blob (reproducible) up to `max_size` bytes."""
    return st.one_of(
        st.binary(max_size=64),
        st.builds(lambda seed, n: random.Random(seed).randbytes(n), st.integers(0, 2**32), st.integers(0, max_size)),
    )


@functools.cache
@st.composite
def image_urls(draw: Draw) -> str:
    kind = draw(st.sampled_from(["fixed", "https", "data", "text"]))
    if kind == "fixed":
        return str(draw(st.sampled_from(IMAGE_URLS)))
    if kind == "https":
        return "https://" + str(draw(texts(4096)))
    if kind == "data":
        mime = draw(st.one_of(st.sampled_from(IMAGE_MIMES), st.sampled_from(BAD_MIMES)))
        payload = draw(random_bytes(200_000))
        encoded = base64.b64encode(payload).decode()
        if draw(st.booleans()):
            encoded = encoded[: draw(st.integers(0, len(encoded)))] + str(draw(st.sampled_from(["", "=", "!", "\x00"])))
        return f"data:{mime};base64,{encoded}"
    return str(draw(texts(4096)))


@functools.cache
def _mimes(plausible: bool) -> st.SearchStrategy[str]:
    if plausible:
        return st.sampled_from(IMAGE_MIMES)
    return st.one_of(st.sampled_from(IMAGE_MIMES), st.sampled_from(BAD_MIMES), small_texts)


def fill_image(draw: Draw, image: pb.ImagePart, plausible: bool = False) -> None:
    if draw(st.booleans()):
        url = draw(image_urls())
        if plausible and not url.startswith(PLAUSIBLE_URL_PREFIXES):
            url = "https://" + url
        image.url = url
        if draw(st.booleans()):
            image.mime_type = draw(_mimes(plausible))
    else:
        data = draw(random_bytes(300_000))
        if draw(st.booleans()):
            data = PNG_MAGIC + data
        image.data = data or b"\x00"
        image.mime_type = draw(_mimes(plausible))
    if draw(st.booleans()):
        image.detail = draw(st.sampled_from(sorted(pb.ImageDetail.values())) if plausible else enums(pb.ImageDetail))


@functools.cache
def roles() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from([pb.ROLE_USER, pb.ROLE_SYSTEM, pb.ROLE_ASSISTANT, pb.ROLE_TOOL]), enums(pb.Role))


def fill_message(draw: Draw, message: pb.Message, text: st.SearchStrategy[str], plausible: bool = False) -> None:
    if plausible:
        _fill_plausible_message(draw, message, text)
        return
    message.role = draw(roles())
    for _ in range(draw(st.integers(0, 3))):
        part = message.content.add()
        kind = draw(st.sampled_from(["text", "text", "image", "empty"]))
        if kind == "text":
            part.text = draw(text)
        elif kind == "image":
            fill_image(draw, part.image)
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        message.tool_calls.add(id=draw(small_texts), name=draw(tool_names), arguments=draw(texts(20_000)))
    if draw(st.booleans()):
        message.tool_call_id = draw(small_texts)
    if draw(st.booleans()):
        message.name = draw(st.one_of(valid_names, small_texts))


def _fill_plausible_message(draw: Draw, message: pb.Message, text: st.SearchStrategy[str]) -> None:
    """A valid message: user (text and images), system, assistant (text and/or tool calls) or a
    tool answer; hostile text and images."""
    role = draw(st.sampled_from([pb.ROLE_USER, pb.ROLE_USER, pb.ROLE_SYSTEM, pb.ROLE_ASSISTANT, pb.ROLE_TOOL]))
    message.role = role
    parts = draw(st.integers(0 if role == pb.ROLE_ASSISTANT else 1, 3))
    for _ in range(parts):
        part = message.content.add()
        if role == pb.ROLE_USER and draw(st.integers(0, 3)) == 3:
            fill_image(draw, part.image, plausible=True)
        else:
            part.text = draw(text)
    if role == pb.ROLE_ASSISTANT and (not parts or draw(st.booleans())):
        for _ in range(draw(st.integers(1, 3))):
            message.tool_calls.add(
                id=draw(st.text(_CHARS, min_size=1, max_size=40)), name=draw(valid_names), arguments=draw(texts(20_000))
            )
    if role == pb.ROLE_TOOL:
        message.tool_call_id = draw(st.text(_CHARS, min_size=1, max_size=40))
    if draw(st.integers(0, 3)) == 0:
        message.name = draw(valid_names)


def fill_tool(draw: Draw, tool: pb.Tool, name: str | None = None, plausible: bool = False) -> None:
    tool.name = draw(valid_names if plausible else tool_names) if name is None else name
    tool.description = draw(texts(20_000))
    if draw(st.booleans()):
        fill_struct(draw, tool.parameters, plausible)
    tool.strict = draw(st.booleans())


@functools.cache
def _in_range(low: float, high: float, ints: bool = False) -> st.SearchStrategy[Any]:
    if ints:
        return st.one_of(st.sampled_from([int(low), int(high)]), st.integers(int(low), int(high)))
    return st.one_of(st.sampled_from([low, high]), st.floats(low, high))


def fill_generation(draw: Draw, gen: pb.GenerationOptions, plausible: bool = False) -> None:
    floats = {"temperature": (0.0, 2.0), "top_p": (5e-324, 1.0), "presence_penalty": (-2.0, 2.0)}
    floats["frequency_penalty"] = (-2.0, 2.0)
    for name, (low, high) in floats.items():
        value = draw(optional(_in_range(low, high) if plausible else doubles()))
        if value is not None:
            setattr(gen, name, value)
    for name, (low, high) in {"top_k": (1, 1000), "max_output_tokens": (1, 1_000_000)}.items():
        value = draw(optional(_in_range(low, high, ints=True) if plausible else int32s()))
        if value is not None:
            setattr(gen, name, value)
    seed = draw(optional(int64s()))
    if seed is not None:
        gen.seed = seed
    if plausible:
        stop = st.text(_CHARS, min_size=1, max_size=256)
        stops = draw(st.one_of(st.lists(stop, max_size=3), st.builds(lambda s: [s] * 16, stop)))
    else:
        stops = draw(st.one_of(st.lists(texts(400), max_size=4), st.builds(lambda n: ["s"] * n, st.integers(15, 40))))
    gen.stop_sequences.extend(stops)
    if draw(st.booleans()):
        types = st.sampled_from(sorted(pb.ResponseFormatType.values()))
        gen.response_format.type = draw(types if plausible else enums(pb.ResponseFormatType))
        if draw(st.booleans()) or (plausible and gen.response_format.type == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA):
            schema = gen.response_format.json_schema
            schema.name = draw(valid_names if plausible else tool_names)
            schema.description = draw(texts(2000))
            schema.strict = draw(st.booleans())
            if plausible or draw(st.booleans()):
                fill_struct(draw, schema.schema, plausible)
                schema.schema.fields["type"].string_value = "object"
    parallel = draw(optional(st.booleans()))
    if parallel is not None:
        gen.parallel_tool_calls = parallel


def fill_routing(draw: Draw, routing: pb.RoutingOptions, plausible: bool = False) -> None:
    routing.provider = draw(
        st.sampled_from(PROVIDERS[:3]) if plausible else st.one_of(st.sampled_from(PROVIDERS), small_texts)
    )
    fallback = draw(optional(st.booleans()))
    if fallback is not None:
        routing.fallback = fallback
    scenarios = st.sampled_from(OPENAI_SCENARIOS + OLLAMA_SCENARIOS)
    fallbacks = draw(
        st.one_of(
            st.lists(scenarios if plausible else models(), max_size=3),
            st.builds(lambda m, n: [m] * n, scenarios, st.integers(50, 3000)),
        )
    )
    routing.fallback_models.extend(fallbacks)
    if draw(st.booleans()):
        routing.strategy = draw(
            st.sampled_from(sorted(pb.RoutingStrategy.values())) if plausible else enums(pb.RoutingStrategy)
        )


def fill_cache(draw: Draw, cache: pb.CacheOptions, plausible: bool = False) -> None:
    cache.mode = draw(st.sampled_from(sorted(pb.CacheMode.values())) if plausible else enums(pb.CacheMode))
    ttl = draw(optional(_in_range(1, 30 * 24 * 3600, ints=True) if plausible else int32s()))
    if ttl is not None:
        cache.ttl_seconds = ttl


@functools.cache
def metadata_maps(plausible: bool = False) -> st.SearchStrategy[dict[str, str]]:
    if plausible:
        key = st.text(_CHARS, min_size=1, max_size=256)
        return st.one_of(
            st.dictionaries(key, st.text(_CHARS, max_size=256), max_size=4),
            st.builds(lambda v: {f"k{i}": v for i in range(16)}, st.text(_CHARS, max_size=256)),
        )
    return st.one_of(
        st.dictionaries(st.one_of(small_texts, st.sampled_from(ODD_TEXTS)), texts(2000), max_size=4),
        st.builds(lambda n, v: {f"k{i}": v for i in range(n)}, st.integers(15, 3000), small_texts),
    )


@functools.cache
def end_user_ids(plausible: bool) -> st.SearchStrategy[str]:
    if plausible:
        return st.one_of(st.just(""), st.text(_CHARS, max_size=256), st.just("u" * 256))
    return st.one_of(st.just(""), texts(5000))


# ---------------------------------------------------------------------------------------------
# Whole requests
# ---------------------------------------------------------------------------------------------

ANSWERING_MODELS = ("gpt-4o-mini", "emulated-model", "ollama/llama3.2", "tools", "ollama/tools", "no-usage", "length")
PLAUSIBLE_MODELS = OPENAI_SCENARIOS + OLLAMA_SCENARIOS + CATALOG_MODELS
plausible_models = st.one_of(st.sampled_from(ANSWERING_MODELS), st.sampled_from(PLAUSIBLE_MODELS))


def _copies(element_size: int, count: int) -> int:
    """How many of `count` copies of an element of at least `element_size` bytes to put in a
    request: all of them, unless they alone pass `MAX_REQUEST_BYTES`; then just enough to pass it.
    Such a request is over the limit either way, so `_bounded` rejects it just the same (and every
    later draw is unchanged), without building it whole: 6000 copies of a 300 KB message were 2 GB
    to copy, and to serialize, for a request that was never sent."""
    if element_size <= 0:
        return count
    return min(count, MAX_REQUEST_BYTES // element_size + 1)


def _fill_chat_like(draw: Draw, request: Any) -> None:
    """Fills a ChatRequest / ChatStreamRequest / CountTokensRequest in place: plausible (valid
    structure, hostile values) or wild (anything), in one of a few shapes."""
    plausible = draw(st.booleans())
    request.model = draw(plausible_models if plausible else models())
    shape = draw(st.sampled_from(["few"] * 7 + ["many_messages", "many_tools", "huge"]))
    if shape == "many_messages":
        message = pb.Message()
        fill_message(draw, message, small_texts, plausible)
        limits = [1000, 4095, 4096] if plausible else [1000, 4095, 4096, 4097, 6000]
        count = draw(st.sampled_from(limits))
        request.messages.extend([message] * _copies(message.ByteSize(), count))
    else:
        huge = draw(huge_texts(6_000_000)) if shape == "huge" else None
        for index in range(draw(st.integers(1 if plausible else 0, 4))):
            fill_message(draw, request.messages.add(), texts(), plausible)
            if huge is not None and index == 0:
                request.messages[0].content.add(text=huge)
        if plausible and request.messages[-1].role != pb.ROLE_USER and draw(st.booleans()):
            request.messages.add(role=pb.ROLE_USER, content=[pb.ContentPart(text=draw(texts()))])
    if shape == "many_tools":
        count = draw(st.sampled_from([127, 128] if plausible else [127, 128, 129, 1000, 3000]))
        template = pb.Tool()
        fill_tool(draw, template, name="t", plausible=plausible)
        unique = plausible or draw(st.booleans())
        for i in range(_copies(template.ByteSize(), count)):  # each copy is at least the template's size
            tool = request.tools.add()
            tool.CopyFrom(template)
            tool.name = f"tool_{i}" if unique else "dup"
    else:
        for i in range(draw(st.integers(0, 3))):
            fill_tool(draw, request.tools.add(), name=f"f{i}" if plausible else None, plausible=plausible)
    if isinstance(request, pb.CountTokensRequest):
        if draw(st.booleans()):
            fill_routing(draw, request.routing, plausible)
        return
    if draw(st.booleans()):
        names = [t.name for t in request.tools[:3]]
        if draw(st.booleans()) or (plausible and not names):
            modes = st.sampled_from(sorted(pb.ToolChoiceMode.values()))
            request.tool_choice.mode = draw(modes if plausible else enums(pb.ToolChoiceMode))
        else:
            request.tool_choice.function_name = draw(st.sampled_from(names) if plausible else tool_names)
    if draw(st.booleans()):
        fill_generation(draw, request.generation, plausible)
    if draw(st.booleans()):
        fill_routing(draw, request.routing, plausible)
    if draw(st.booleans()):
        fill_cache(draw, request.cache, plausible)
    request.end_user_id = draw(end_user_ids(plausible))
    request.metadata.update(draw(metadata_maps(plausible)))


def _bounded(request: Any) -> bool:
    """Whether `request` serializes to at most `MAX_REQUEST_BYTES` (exactly `ByteSize() <= MAX`).

    upb's `ByteSize()` serializes the whole message, and the replicated shapes can be far over the
    limit (6000 copies of a 300 KB message: 2 GB, 10-15 s to serialize just to be rejected, and the
    filter retries). Each element of a repeated message field serializes inside the request with
    at least its own bytes, so a running sum of element sizes is a lower bound of the request's
    size: once it passes the limit the answer is no, after serializing little more than the limit.
    Otherwise the exact `ByteSize()` decides.
    """
    lower_bound = 0
    for field, value in request.ListFields():
        if field.is_repeated and field.message_type is not None and not field.message_type.GetOptions().map_entry:
            for element in value:
                lower_bound += element.ByteSize()
                if lower_bound > MAX_REQUEST_BYTES:
                    return False
    return bool(request.ByteSize() <= MAX_REQUEST_BYTES)


@st.composite
def _chat_requests(draw: Draw) -> pb.ChatRequest:
    request = pb.ChatRequest()
    _fill_chat_like(draw, request)
    return request


@st.composite
def _chat_stream_requests(draw: Draw) -> pb.ChatStreamRequest:
    request = pb.ChatStreamRequest()
    _fill_chat_like(draw, request)
    return request


@st.composite
def _count_tokens_requests(draw: Draw) -> pb.CountTokensRequest:
    request = pb.CountTokensRequest()
    _fill_chat_like(draw, request)
    return request


def chat_requests() -> st.SearchStrategy[pb.ChatRequest]:
    return _chat_requests().filter(_bounded)


def chat_stream_requests() -> st.SearchStrategy[pb.ChatStreamRequest]:
    return _chat_stream_requests().filter(_bounded)


def count_tokens_requests() -> st.SearchStrategy[pb.CountTokensRequest]:
    return _count_tokens_requests().filter(_bounded)


EMBED_MODELS = ("text-embedding-3-small", "emulated-model", "ollama/nomic-embed-text", "nomic-embed-text")


@st.composite
def _embed_requests(draw: Draw) -> pb.EmbedRequest:
    plausible = draw(st.booleans())
    request = pb.EmbedRequest(
        model=draw(st.sampled_from(EMBED_MODELS) if plausible else st.one_of(st.sampled_from(EMBED_MODELS), models()))
    )
    shape = draw(st.sampled_from(["few"] * 5 + ["many", "huge"]))
    one = st.text(_CHARS, min_size=1, max_size=24) if plausible else small_texts
    if shape == "many":
        request.inputs.extend(
            [draw(one)] * draw(st.sampled_from([2047, 2048] if plausible else [2047, 2048, 2049, 5000]))
        )
    elif shape == "huge":
        size = 2_000_000 if plausible else 4_000_000
        request.inputs.extend([draw(huge_texts(size)) or "x" for _ in range(draw(st.integers(1, 3)))])
    else:
        request.inputs.extend(
            draw(st.lists(texts().filter(bool) if plausible else texts(), min_size=int(plausible), max_size=5))
        )
    if plausible:
        dimensions = draw(optional(_in_range(1, 16384, ints=True)))
        if dimensions is not None and dimensions * len(request.inputs) > 4_194_304:
            dimensions = None
    else:
        dimensions = draw(optional(st.one_of(int32s(), st.sampled_from([1, 16384, 16385, 2048]))))
    if dimensions is not None:
        request.dimensions = dimensions
    if draw(st.booleans()):
        fill_routing(draw, request.routing, plausible)
    if draw(st.booleans()):
        fill_cache(draw, request.cache, plausible)
    request.end_user_id = draw(end_user_ids(plausible))
    request.metadata.update(draw(metadata_maps(plausible)))
    return request


def embed_requests() -> st.SearchStrategy[pb.EmbedRequest]:
    return _embed_requests().filter(_bounded)


@dataclass(frozen=True)
class IssuedToken:
    """A `next_page_token` the server issued for these filters."""

    provider: str
    capability: int
    token: str

    def body(self) -> dict[str, Any] | None:
        """The token's JSON body, when it is urlsafe base64 of a JSON object (as it is today)."""
        try:
            decoded = json.loads(base64.urlsafe_b64decode(self.token + "=" * (-len(self.token) % 4)))
        except ValueError:
            return None
        return decoded if isinstance(decoded, dict) else None


_offsets = st.one_of(
    st.integers(-(10**30), 10**30),
    st.sampled_from([0, -1, 10**18, 2**63]),
    doubles(),
    st.sampled_from(["1", "x", "1" * 5000, None, True, [], {}]),
)


def _forge(body: dict[str, Any], key: str, value: Any, drop: bool) -> str:
    """`body` with `key` set to `value` (or removed), re-encoded like the issued token."""
    forged = dict(body)
    if drop:
        forged.pop(key, None)
    else:
        forged[key] = value
    raw = json.dumps(forged, separators=(",", ":")).encode()  # NaN/Infinity as JSON5-style literals
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _mutate(token: str, cut: int, extra: str) -> str:
    return token[: cut % (len(token) + 1)] + extra


def page_tokens(issued: list[IssuedToken]) -> st.SearchStrategy[str]:
    """Random text, base64 of junk, real tokens (possibly used with other filters) and mutations
    of them."""
    pieces: list[st.SearchStrategy[str]] = [
        small_texts,
        texts(2000),
        st.builds(
            lambda raw: base64.urlsafe_b64encode(raw).decode().rstrip("="),
            st.one_of(st.binary(max_size=300), st.sampled_from([b"[" * 300, b"{}", b"null", b'"x"', b"[1]"])),
        ),
    ]
    if issued:
        tokens = [t.token for t in issued]
        pieces.append(st.sampled_from(tokens))
        pieces.append(st.builds(_mutate, st.sampled_from(tokens), st.integers(0, 200), small_texts))
    return st.one_of(*pieces)


@st.composite
def _forged_for_its_filters(draw: Draw, issued: list[IssuedToken]) -> pb.ListModelsRequest:
    """The filters of a real token, with that token's body re-encoded after one field got a
    hostile value (offsets: huge, negative, NaN/Infinity, strings, lists...)."""
    token = draw(st.sampled_from(issued))
    body = token.body() or {}
    keys = sorted(body) or ["o"]
    key = draw(st.sampled_from(keys))
    value = draw(st.one_of(_offsets, small_texts))
    forged = _forge(body, key, value, draw(_rarely()))
    page_size = draw(st.one_of(st.just(0), st.integers(0, 1000)))
    return pb.ListModelsRequest(
        provider=token.provider, capability=token.capability, page_size=page_size, page_token=forged
    )


@functools.cache
def _rarely() -> st.SearchStrategy[bool]:
    return st.sampled_from([False, False, False, True])


def list_models_requests(issued: list[IssuedToken]) -> st.SearchStrategy[pb.ListModelsRequest]:
    anything = st.builds(
        pb.ListModelsRequest,
        provider=st.one_of(st.sampled_from(PROVIDERS), texts(1000)),
        capability=enums(pb.Capability),
        page_size=st.one_of(st.sampled_from([0, 1, 1000, 1001, -1]), int32s()),
        page_token=st.one_of(st.just(""), page_tokens(issued)),
    )
    return st.one_of(anything, _forged_for_its_filters(issued)) if issued else anything


def get_model_requests() -> st.SearchStrategy[pb.GetModelRequest]:
    names = st.one_of(
        models(),
        st.builds(lambda m: "models/" + m, models()),
        st.sampled_from(["models/", "models/models/gpt-4o-mini", "models//", "ollama/llama3.2:latest", "openai/x"]),
        texts(300_000),
    )
    return st.builds(pb.GetModelRequest, name=names)


# ---------------------------------------------------------------------------------------------
# Raw bodies
# ---------------------------------------------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire: int, payload: bytes = b"") -> bytes:
    return _varint(number << 3 | wire) + payload


CRAFTED_BODIES = (
    b"",
    b"\x00",
    b"\xff" * 16,
    _field(1, 2, _varint(2) + b"\xff\xfe"),  # string field 1 with invalid UTF-8
    _field(1, 2, _varint(3) + b"\xed\xa0\x80"),  # an encoded surrogate
    _field(1, 2, _varint(2**40)),  # length past the end
    _field(1, 2, _varint(2**64 - 1)),  # length overflowing
    _field(1, 0, b"\xff" * 11),  # a varint of 11 bytes
    _field(2, 3),  # start group, never ended
    _field(2, 4),  # end group without start
    _field(0, 0, b"\x01"),  # field number 0
    _field(2**29 - 1, 0, b"\x01"),  # largest field number, unknown
    _field(1, 6, b"\x00"),  # wire type 6 does not exist
    _field(1, 7, b"\x00"),  # wire type 7 does not exist
    _field(1, 5, b"\x00"),  # fixed32 cut short
    _field(3, 0, _varint(1)),  # a message field sent as a varint
    _field(2, 2, _varint(1) + b"\x08"),  # messages[0] with a truncated varint inside
    b"\x12\x00" * 5000,  # 5000 empty messages
    _field(2, 3) * 200 + _field(2, 4) * 200,  # 200 nested groups
    _field(99, 3) * 200 + _field(99, 4) * 200,  # nested unknown groups
)


def _nested_submessages(depth: int) -> bytes:
    """Field 2 (messages) nested `depth` times: only the outer one has that type, the rest are
    parsed as unknown bytes or fail to parse as `Message`."""
    body = b""
    for _ in range(depth):
        body = _field(2, 2, _varint(len(body)) + body)
    return body


@st.composite
def raw_bodies(draw: Draw, valid: st.SearchStrategy[bytes]) -> bytes:
    """Random bytes, crafted wire-format traps, or a valid body with a few mutations."""
    kind = draw(st.sampled_from(["random", "crafted", "mutated", "mutated", "nested", "valid_plus"]))
    if kind == "random":
        return bytes(draw(random_bytes(1_000_000)))
    if kind == "crafted":
        return bytes(draw(st.sampled_from(CRAFTED_BODIES)))
    if kind == "nested":
        return _nested_submessages(draw(st.integers(1, 300)))
    body = bytearray(draw(valid))
    if kind == "valid_plus":
        return bytes(body) + bytes(draw(st.sampled_from(CRAFTED_BODIES)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        at = draw(st.integers(0, max(len(body), 1) - 1)) if body else 0
        if op == "flip" and body:
            body[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            body[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and body:
            del body[at : at + draw(st.integers(1, 8))]
        elif op == "truncate":
            del body[at:]
    return bytes(body)
