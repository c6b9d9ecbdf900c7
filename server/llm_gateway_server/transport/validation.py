"""Request validation on the protobuf messages, with field paths for `google.rpc.BadRequest`.

Every check collects a `FieldViolation` (e.g. `messages[2].content[0].image.mime_type`) so a
client sees all problems at once; `check_*` raise INVALID_ARGUMENT / INVALID_REQUEST. Limits are
the documented ranges of the proto comments.
"""

from __future__ import annotations

import collections
import math
import re

from google.protobuf import struct_pb2

from llm_gateway.v1 import llm_gateway_pb2 as pb

from ..errors import FieldViolation, invalid_request

MAX_MODEL_CHARS = 256
MAX_MESSAGES = 4096
MAX_PARTS_PER_MESSAGE = 256
MAX_TOOLS = 128
MAX_STOP_SEQUENCES = 16
MAX_STOP_CHARS = 256
MAX_METADATA_ENTRIES = 16
MAX_METADATA_CHARS = 256
MAX_END_USER_CHARS = 256
MAX_EMBED_INPUTS = 2048
MAX_EMBED_INPUT_CHARS = 8_000_000  # all inputs of one Embed call together
MAX_EMBED_VALUES = 4_194_304  # inputs x dimensions: 16 MiB of float32 in the answer
MAX_OUTPUT_TOKENS = 1_000_000
MAX_TTL_SECONDS = 30 * 24 * 3600
MAX_PAGE_SIZE = 1000
MAX_PAGE_TOKEN_CHARS = 512
MAX_IMAGE_BYTES = 20 * 1024 * 1024  # per image; OpenAI's documented limit (platform.openai.com, vision guide)
MAX_IMAGE_URL_CHARS = 28 * 1024 * 1024  # a data: URL carries the (20 MiB) bytes base64-encoded
IMAGE_MIME_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

ChatLike = pb.ChatRequest | pb.ChatStreamRequest


def _range(
    v: list[FieldViolation], msg: pb.GenerationOptions, name: str, low: float, high: float, low_open: bool = False
) -> None:
    if not msg.HasField(name):
        return
    value = getattr(msg, name)
    if isinstance(value, float) and not math.isfinite(value):
        v.append(FieldViolation(f"generation.{name}", "must be a finite number"))
    elif value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        v.append(FieldViolation(f"generation.{name}", f"must be in {bracket}{low:g}, {high:g}]"))


def _common(
    v: list[FieldViolation], model: str, end_user_id: str, metadata: dict[str, str], cache: pb.CacheOptions
) -> None:
    if not model.strip():
        v.append(FieldViolation("model", "required"))
    elif len(model) > MAX_MODEL_CHARS:
        v.append(FieldViolation("model", f"at most {MAX_MODEL_CHARS} characters"))
    if len(end_user_id) > MAX_END_USER_CHARS:
        v.append(FieldViolation("end_user_id", f"at most {MAX_END_USER_CHARS} characters"))
    if len(metadata) > MAX_METADATA_ENTRIES:
        v.append(FieldViolation("metadata", f"at most {MAX_METADATA_ENTRIES} entries"))
    for key, value in metadata.items():
        if not key or len(key) > MAX_METADATA_CHARS or len(value) > MAX_METADATA_CHARS:
            v.append(
                FieldViolation(
                    f"metadata[{key[:32]!r}]", f"keys 1-{MAX_METADATA_CHARS} chars, values at most {MAX_METADATA_CHARS}"
                )
            )
    if cache.HasField("ttl_seconds") and not 1 <= cache.ttl_seconds <= MAX_TTL_SECONDS:
        v.append(FieldViolation("cache.ttl_seconds", f"must be in [1, {MAX_TTL_SECONDS}]"))


def _image(v: list[FieldViolation], path: str, image: pb.ImagePart) -> None:
    source = image.WhichOneof("source")
    if source is None:
        v.append(FieldViolation(path, "set url or data"))
    elif source == "data":
        if not image.data:
            v.append(FieldViolation(f"{path}.data", "must not be empty"))
        elif len(image.data) > MAX_IMAGE_BYTES:
            v.append(FieldViolation(f"{path}.data", f"at most {MAX_IMAGE_BYTES} bytes"))
        if image.mime_type not in IMAGE_MIME_TYPES:
            v.append(
                FieldViolation(f"{path}.mime_type", f"required with data; one of {', '.join(sorted(IMAGE_MIME_TYPES))}")
            )
    elif not image.url.startswith(("https://", "http://", "data:image/")):
        v.append(FieldViolation(f"{path}.url", "must be an http(s) URL or a data:image/... URL"))
    elif len(image.url) > MAX_IMAGE_URL_CHARS:
        v.append(FieldViolation(f"{path}.url", f"at most {MAX_IMAGE_URL_CHARS} characters"))


def _message(v: list[FieldViolation], i: int, message: pb.Message) -> None:
    path = f"messages[{i}]"
    if message.role == pb.ROLE_UNSPECIFIED or message.role not in pb.Role.values():
        v.append(FieldViolation(f"{path}.role", "required: ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL"))
    if len(message.content) > MAX_PARTS_PER_MESSAGE:
        v.append(FieldViolation(f"{path}.content", f"at most {MAX_PARTS_PER_MESSAGE} parts"))
    for j, part in enumerate(message.content):
        kind = part.WhichOneof("part")
        if kind is None:
            v.append(FieldViolation(f"{path}.content[{j}]", "set text or image"))
        elif kind == "image":
            if message.role != pb.ROLE_USER:
                v.append(FieldViolation(f"{path}.content[{j}].image", "images are allowed in user messages only"))
            _image(v, f"{path}.content[{j}].image", part.image)
    if message.role in (pb.ROLE_SYSTEM, pb.ROLE_USER, pb.ROLE_TOOL) and not message.content:
        v.append(FieldViolation(f"{path}.content", "at least one part is required"))
    if message.role == pb.ROLE_ASSISTANT and not message.content and not message.tool_calls:
        v.append(FieldViolation(f"{path}", "an assistant message needs content or tool_calls"))
    if message.tool_calls and message.role != pb.ROLE_ASSISTANT:
        v.append(FieldViolation(f"{path}.tool_calls", "only assistant messages carry tool calls"))
    for j, call in enumerate(message.tool_calls):
        if not call.id:
            v.append(FieldViolation(f"{path}.tool_calls[{j}].id", "required"))
        if not _NAME.match(call.name):
            v.append(FieldViolation(f"{path}.tool_calls[{j}].name", "1-64 chars of [A-Za-z0-9_-]"))
    if message.role == pb.ROLE_TOOL and not message.tool_call_id:
        v.append(FieldViolation(f"{path}.tool_call_id", "required for tool messages"))
    if message.name and not _NAME.match(message.name):
        v.append(FieldViolation(f"{path}.name", "1-64 chars of [A-Za-z0-9_-]"))


def _finite_struct(v: list[FieldViolation], path: str, struct: struct_pb2.Struct) -> None:
    """Adds a violation when a Struct holds a NaN or infinite number: JSON has neither, so the
    provider's JSON body could not carry it (json_format refuses it)."""
    pending: list[struct_pb2.Value] = list(struct.fields.values())
    while pending:
        value = pending.pop()
        kind = value.WhichOneof("kind")
        if kind == "number_value" and not math.isfinite(value.number_value):
            v.append(FieldViolation(path, "must not contain NaN or infinite numbers (JSON has none)"))
            return
        if kind == "struct_value":
            pending.extend(value.struct_value.fields.values())
        elif kind == "list_value":
            pending.extend(value.list_value.values)


def _generation(v: list[FieldViolation], gen: pb.GenerationOptions) -> None:
    _range(v, gen, "temperature", 0.0, 2.0)
    _range(v, gen, "top_p", 0.0, 1.0, low_open=True)
    _range(v, gen, "top_k", 1, 1000)
    _range(v, gen, "max_output_tokens", 1, MAX_OUTPUT_TOKENS)
    _range(v, gen, "presence_penalty", -2.0, 2.0)
    _range(v, gen, "frequency_penalty", -2.0, 2.0)
    if len(gen.stop_sequences) > MAX_STOP_SEQUENCES:
        v.append(FieldViolation("generation.stop_sequences", f"at most {MAX_STOP_SEQUENCES}"))
    for i, stop in enumerate(gen.stop_sequences):
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            v.append(FieldViolation(f"generation.stop_sequences[{i}]", f"1-{MAX_STOP_CHARS} characters"))
    fmt = gen.response_format
    if fmt.type not in pb.ResponseFormatType.values():
        v.append(FieldViolation("generation.response_format.type", "unknown value"))
    if fmt.type == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        if not fmt.json_schema.HasField("schema"):
            v.append(FieldViolation("generation.response_format.json_schema.schema", "required for JSON_SCHEMA"))
        _finite_struct(v, "generation.response_format.json_schema.schema", fmt.json_schema.schema)
        if fmt.json_schema.name and not _NAME.match(fmt.json_schema.name):
            v.append(FieldViolation("generation.response_format.json_schema.name", "1-64 chars of [A-Za-z0-9_-]"))


def check_chat(request: ChatLike) -> None:
    """Validates a Chat / ChatStream request.

    Raises:
        GatewayError: INVALID_ARGUMENT / INVALID_REQUEST with every violation.
    """
    v: list[FieldViolation] = []
    _common(v, request.model, request.end_user_id, dict(request.metadata), request.cache)
    if not request.messages:
        v.append(FieldViolation("messages", "at least one message is required"))
    elif len(request.messages) > MAX_MESSAGES:
        v.append(FieldViolation("messages", f"at most {MAX_MESSAGES}"))
    else:
        for i, message in enumerate(request.messages):
            _message(v, i, message)
    if len(request.tools) > MAX_TOOLS:
        v.append(FieldViolation("tools", f"at most {MAX_TOOLS}"))
    names = [t.name for t in request.tools]
    counts = collections.Counter(names)
    for i, tool in enumerate(request.tools):
        if not _NAME.match(tool.name):
            v.append(FieldViolation(f"tools[{i}].name", "1-64 chars of [A-Za-z0-9_-]"))
        elif counts[tool.name] > 1:
            v.append(FieldViolation(f"tools[{i}].name", "tool names must be unique"))
        _finite_struct(v, f"tools[{i}].parameters", tool.parameters)
    choice = request.tool_choice
    if choice.WhichOneof("choice") == "function_name" and choice.function_name not in names:
        v.append(FieldViolation("tool_choice.function_name", "must name one of the request's tools"))
    if choice.WhichOneof("choice") == "mode" and choice.mode not in pb.ToolChoiceMode.values():
        v.append(FieldViolation("tool_choice.mode", "unknown value"))
    _generation(v, request.generation)
    if request.routing.strategy not in pb.RoutingStrategy.values():
        v.append(FieldViolation("routing.strategy", "unknown value"))
    if v:
        raise invalid_request(v)


def check_embed(request: pb.EmbedRequest) -> None:
    """Validates an Embed request.

    Raises:
        GatewayError: INVALID_ARGUMENT / INVALID_REQUEST with every violation.
    """
    v: list[FieldViolation] = []
    _common(v, request.model, request.end_user_id, dict(request.metadata), request.cache)
    if not request.inputs:
        v.append(FieldViolation("inputs", "at least one input is required"))
    elif len(request.inputs) > MAX_EMBED_INPUTS:
        v.append(FieldViolation("inputs", f"at most {MAX_EMBED_INPUTS}"))
    for i, text in enumerate(request.inputs):
        if not text:
            v.append(FieldViolation(f"inputs[{i}]", "must not be empty"))
    if sum(len(t) for t in request.inputs) > MAX_EMBED_INPUT_CHARS:
        v.append(FieldViolation("inputs", f"at most {MAX_EMBED_INPUT_CHARS} characters in all"))
    if request.HasField("dimensions"):
        if not 1 <= request.dimensions <= 16384:
            v.append(FieldViolation("dimensions", "must be in [1, 16384]"))
        elif len(request.inputs) * request.dimensions > MAX_EMBED_VALUES:
            v.append(
                FieldViolation(
                    "dimensions",
                    f"inputs x dimensions is {len(request.inputs) * request.dimensions}; at most {MAX_EMBED_VALUES} "
                    "values per call (send fewer inputs or fewer dimensions)",
                )
            )
    if v:
        raise invalid_request(v)


def check_list_models(request: pb.ListModelsRequest) -> None:
    """Validates a ListModels request: a known capability value (an unknown one used to answer an
    unfiltered list) and a page size in range.

    Raises:
        GatewayError: INVALID_ARGUMENT / INVALID_REQUEST with every violation.
    """
    v: list[FieldViolation] = []
    if request.capability not in pb.Capability.values():
        v.append(FieldViolation("capability", f"unknown value {request.capability}"))
    if not 0 <= request.page_size <= MAX_PAGE_SIZE:
        v.append(FieldViolation("page_size", f"must be between 0 and {MAX_PAGE_SIZE}"))
    if len(request.provider) > MAX_MODEL_CHARS:
        v.append(FieldViolation("provider", f"at most {MAX_MODEL_CHARS} characters"))
    if len(request.page_token) > MAX_PAGE_TOKEN_CHARS:
        v.append(FieldViolation("page_token", f"at most {MAX_PAGE_TOKEN_CHARS} characters"))
    if v:
        raise invalid_request(v)


def check_count_tokens(request: pb.CountTokensRequest) -> None:
    """Validates a CountTokens request (model, messages and tools as for Chat).

    Raises:
        GatewayError: INVALID_ARGUMENT / INVALID_REQUEST with every violation.
    """
    v: list[FieldViolation] = []
    _common(v, request.model, "", {}, pb.CacheOptions())
    if not request.messages:
        v.append(FieldViolation("messages", "at least one message is required"))
    elif len(request.messages) > MAX_MESSAGES:
        v.append(FieldViolation("messages", f"at most {MAX_MESSAGES}"))
    else:
        for i, message in enumerate(request.messages):
            _message(v, i, message)
    if len(request.tools) > MAX_TOOLS:
        v.append(FieldViolation("tools", f"at most {MAX_TOOLS}"))
    for i, tool in enumerate(request.tools):
        if not _NAME.match(tool.name):
            v.append(FieldViolation(f"tools[{i}].name", "1-64 chars of [A-Za-z0-9_-]"))
        _finite_struct(v, f"tools[{i}].parameters", tool.parameters)
    if v:
        raise invalid_request(v)
