"""Transport-neutral domain types shared by every layer.

The servicer converts protobuf to and from these; the router and the provider adapters see only
these. Adapters never see protobuf, the servicer never sees an SDK. All types are immutable
dataclasses; token counts are integers (tokens), money is USD (float), times are milliseconds
unless a name says otherwise.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal


class Role(enum.StrEnum):
    """Author of a message."""

    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class FinishReason(enum.StrEnum):
    """Why generation stopped, normalised across providers."""

    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"
    OTHER = "other"


class Capability(enum.StrEnum):
    """Something a model can do (mirrors the proto `Capability`)."""

    CHAT = "chat"
    STREAMING = "streaming"
    EMBEDDINGS = "embeddings"
    TOOLS = "tools"
    VISION = "vision"
    JSON_MODE = "json_mode"


class RoutingStrategy(enum.StrEnum):
    """How the router picks among deployments (mirrors the proto `RoutingStrategy`)."""

    CONFIGURED = "configured"
    PRIORITY = "priority"
    WEIGHTED = "weighted"
    LEAST_LATENCY = "least_latency"
    LOWEST_COST = "lowest_cost"
    LEAST_BUSY = "least_busy"


class AttemptOutcome(enum.StrEnum):
    """Outcome of one attempt at one deployment."""

    SUCCESS = "success"
    ERROR = "error"
    SKIPPED = "skipped"


# --- content ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextPart:
    """A text content part."""

    text: str


@dataclass(frozen=True, slots=True)
class ImagePart:
    """An image content part: exactly one of `url` (https or data URL) and `data` (raw bytes)."""

    url: str | None = None
    data: bytes | None = None
    mime_type: str = ""
    detail: Literal["auto", "low", "high"] | None = None


ContentPart = TextPart | ImagePart


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call requested by the model; `arguments` is JSON text, passed through as given."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A streamed fragment of the tool call at position `index` (id and name on the first one)."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(frozen=True, slots=True)
class Message:
    """One conversation message."""

    role: Role
    content: tuple[ContentPart, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    name: str = ""

    @property
    def text(self) -> str:
        """The concatenated text parts (images omitted)."""
        return "".join(p.text for p in self.content if isinstance(p, TextPart))


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call; `parameters` is a JSON Schema object (None: no arguments)."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] | None = None
    strict: bool = False


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """Tool use mode, or a forced function (`function_name`). Both unset means auto."""

    mode: Literal["auto", "none", "required"] | None = None
    function_name: str | None = None


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """Output format: free text, any JSON object, or JSON matching `schema`."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    schema_name: str = ""
    schema_description: str = ""
    schema: Mapping[str, Any] | None = None
    strict: bool = False


@dataclass(frozen=True, slots=True)
class GenerationOptions:
    """Sampling and output options; None means "provider default"."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_output_tokens: int | None = None
    stop_sequences: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None


@dataclass(frozen=True, slots=True)
class RoutingOptions:
    """Per-request routing controls."""

    provider: str = ""
    fallback: bool = True
    fallback_models: tuple[str, ...] = ()
    strategy: RoutingStrategy = RoutingStrategy.CONFIGURED


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A chat request as the router sees it (unary and streaming alike)."""

    model: str
    messages: tuple[Message, ...]
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice | None = None
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    routing: RoutingOptions = field(default_factory=RoutingOptions)
    end_user_id: str = ""


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one call (tokens). `estimated` when the provider reported none."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        """input_tokens + output_tokens."""
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Cost:
    """Estimated cost in USD from catalog prices; `priced` False when the model has no price."""

    input_usd: float = 0.0
    output_usd: float = 0.0
    priced: bool = False

    @property
    def total_usd(self) -> float:
        """input_usd + output_usd."""
        return self.input_usd + self.output_usd


@dataclass(frozen=True, slots=True)
class OptionWarning:
    """An option the provider could not honour as given (e.g. dropped)."""

    code: str
    field: str
    message: str


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt at one deployment; `latency_ms` is wall time, `upstream_status` 0 when none."""

    provider: str
    model: str
    outcome: AttemptOutcome
    latency_ms: float
    error_reason: str = ""
    upstream_status: int = 0


@dataclass(frozen=True, slots=True)
class ProviderChatResult:
    """What an adapter returns for a unary chat. `usage` None when the provider reported none."""

    model: str
    text: str
    tool_calls: tuple[ToolCall, ...]
    finish_reason: FinishReason
    provider_finish_reason: str
    usage: Usage | None
    response_id: str = ""


@dataclass(frozen=True, slots=True)
class ChatDelta:
    """Incremental stream content: text and/or tool-call fragments."""

    text: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass(frozen=True, slots=True)
class ProviderStreamEnd:
    """The end of an adapter's stream; adapters raise instead when the upstream ended badly."""

    model: str
    finish_reason: FinishReason
    provider_finish_reason: str
    usage: Usage | None
    response_id: str = ""


ProviderStreamEvent = ChatDelta | ProviderStreamEnd


@dataclass(frozen=True, slots=True)
class ChatResponse:
    """The router's answer to a unary chat."""

    id: str
    model: str
    provider: str
    message: Message
    finish_reason: FinishReason
    provider_finish_reason: str
    usage: Usage
    cost: Cost
    attempts: tuple[Attempt, ...]
    warnings: tuple[OptionWarning, ...] = ()
    provider_response_id: str = ""


@dataclass(frozen=True, slots=True)
class ChatStreamFinal:
    """The last event of a successful stream."""

    model: str
    provider: str
    finish_reason: FinishReason
    provider_finish_reason: str
    usage: Usage
    cost: Cost
    tool_calls: tuple[ToolCall, ...]
    attempts: tuple[Attempt, ...]
    warnings: tuple[OptionWarning, ...] = ()
    provider_response_id: str = ""


@dataclass(frozen=True, slots=True)
class ChatStreamDelta:
    """A delta as the router emits it, with the deployment that produced it."""

    model: str
    provider: str
    delta: ChatDelta


ChatStreamEvent = ChatStreamDelta | ChatStreamFinal


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """An embedding request."""

    model: str
    inputs: tuple[str, ...]
    dimensions: int | None = None
    routing: RoutingOptions = field(default_factory=RoutingOptions)
    end_user_id: str = ""


@dataclass(frozen=True, slots=True)
class ProviderEmbedResult:
    """What an adapter returns for embeddings: one vector per input, in input order."""

    model: str
    vectors: tuple[tuple[float, ...], ...]
    usage: Usage | None


@dataclass(frozen=True, slots=True)
class EmbedResponse:
    """The router's answer to an embedding request."""

    id: str
    model: str
    provider: str
    vectors: tuple[tuple[float, ...], ...]
    usage: Usage
    cost: Cost
    attempts: tuple[Attempt, ...]


class TokenCountMethod(enum.StrEnum):
    """How a token count was obtained."""

    PROVIDER = "provider"
    TOKENIZER = "tokenizer"
    ESTIMATE = "estimate"


@dataclass(frozen=True, slots=True)
class TokenCount:
    """Input tokens of a request (tokens); `tokenizer` names the encoding for TOKENIZER counts."""

    input_tokens: int
    method: TokenCountMethod
    tokenizer: str = ""
    model: str = ""
    provider: str = ""


# --- models ----------------------------------------------------------------------------------


class ModelSource(enum.StrEnum):
    """Where a model entry comes from."""

    CATALOG = "catalog"
    CONFIG = "config"
    PROVIDER = "provider"


class Availability(enum.StrEnum):
    """Whether the gateway can serve a model now."""

    AVAILABLE = "available"
    DEGRADED = "degraded"
    NOT_CONFIGURED = "not_configured"


@dataclass(frozen=True, slots=True)
class Pricing:
    """USD per million tokens, and where the figures come from (price list and date)."""

    input_per_million_usd: float
    output_per_million_usd: float
    cached_input_per_million_usd: float = 0.0
    source: str = ""


@dataclass(frozen=True, slots=True)
class LiveModel:
    """A model from a provider's live list; `capabilities` None when the provider does not say."""

    id: str
    display_name: str = ""
    capabilities: frozenset[Capability] | None = None
    context_window: int = 0
    max_output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A routable model: `id` is what clients send, `provider_model` what the provider gets."""

    id: str
    provider: str
    provider_model: str
    display_name: str = ""
    capabilities: frozenset[Capability] = frozenset()
    context_window: int = 0
    max_output_tokens: int = 0
    pricing: Pricing | None = None
    equivalence_group: str = ""
    source: ModelSource = ModelSource.CATALOG


@dataclass(frozen=True, slots=True)
class ModelView:
    """A model as listed to clients: the entry plus live facts (availability, equivalents)."""

    info: ModelInfo
    availability: Availability
    equivalent_models: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ModelPage:
    """One page of a model listing; `next_page_token` empty on the last page."""

    models: tuple[ModelView, ...]
    next_page_token: str
    total_size: int
