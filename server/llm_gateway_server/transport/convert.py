"""Protobuf ↔ domain conversions. Requests are validated (`validation.py`) before conversion."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, cast

from google.protobuf import json_format

from llm_gateway.v1 import llm_gateway_pb2 as pb

from .. import domain as d

_ROLES = {
    pb.ROLE_SYSTEM: d.Role.SYSTEM,
    pb.ROLE_USER: d.Role.USER,
    pb.ROLE_ASSISTANT: d.Role.ASSISTANT,
    pb.ROLE_TOOL: d.Role.TOOL,
}
_ROLES_OUT = {v: k for k, v in _ROLES.items()}
_DETAIL: dict[int, Literal["auto", "low", "high"] | None] = {
    pb.IMAGE_DETAIL_UNSPECIFIED: None,
    pb.IMAGE_DETAIL_AUTO: "auto",
    pb.IMAGE_DETAIL_LOW: "low",
    pb.IMAGE_DETAIL_HIGH: "high",
}
_TOOL_MODES: dict[int, Literal["auto", "none", "required"] | None] = {
    pb.TOOL_CHOICE_MODE_UNSPECIFIED: None,
    pb.TOOL_CHOICE_MODE_AUTO: "auto",
    pb.TOOL_CHOICE_MODE_NONE: "none",
    pb.TOOL_CHOICE_MODE_REQUIRED: "required",
}
_FORMATS: dict[int, Literal["text", "json_object", "json_schema"]] = {
    pb.RESPONSE_FORMAT_TYPE_UNSPECIFIED: "text",
    pb.RESPONSE_FORMAT_TYPE_TEXT: "text",
    pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT: "json_object",
    pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA: "json_schema",
}
_STRATEGIES = {
    pb.ROUTING_STRATEGY_UNSPECIFIED: d.RoutingStrategy.CONFIGURED,
    pb.ROUTING_STRATEGY_PRIORITY: d.RoutingStrategy.PRIORITY,
    pb.ROUTING_STRATEGY_WEIGHTED: d.RoutingStrategy.WEIGHTED,
    pb.ROUTING_STRATEGY_LEAST_LATENCY: d.RoutingStrategy.LEAST_LATENCY,
    pb.ROUTING_STRATEGY_LOWEST_COST: d.RoutingStrategy.LOWEST_COST,
    pb.ROUTING_STRATEGY_LEAST_BUSY: d.RoutingStrategy.LEAST_BUSY,
}
_FINISH = {
    d.FinishReason.STOP: pb.FINISH_REASON_STOP,
    d.FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    d.FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
    d.FinishReason.CONTENT_FILTER: pb.FINISH_REASON_CONTENT_FILTER,
    d.FinishReason.OTHER: pb.FINISH_REASON_OTHER,
}
_OUTCOMES = {
    d.AttemptOutcome.SUCCESS: pb.ATTEMPT_OUTCOME_SUCCESS,
    d.AttemptOutcome.ERROR: pb.ATTEMPT_OUTCOME_ERROR,
    d.AttemptOutcome.SKIPPED: pb.ATTEMPT_OUTCOME_SKIPPED,
}
CAPABILITIES_IN = {
    pb.CAPABILITY_CHAT: d.Capability.CHAT,
    pb.CAPABILITY_STREAMING: d.Capability.STREAMING,
    pb.CAPABILITY_EMBEDDINGS: d.Capability.EMBEDDINGS,
    pb.CAPABILITY_TOOLS: d.Capability.TOOLS,
    pb.CAPABILITY_VISION: d.Capability.VISION,
    pb.CAPABILITY_JSON_MODE: d.Capability.JSON_MODE,
}
_CAPABILITIES_OUT = {v: k for k, v in CAPABILITIES_IN.items()}
_AVAILABILITY = {
    d.Availability.AVAILABLE: pb.AVAILABILITY_AVAILABLE,
    d.Availability.DEGRADED: pb.AVAILABILITY_DEGRADED,
    d.Availability.NOT_CONFIGURED: pb.AVAILABILITY_NOT_CONFIGURED,
}
_SOURCES = {
    d.ModelSource.CATALOG: pb.MODEL_SOURCE_CATALOG,
    d.ModelSource.CONFIG: pb.MODEL_SOURCE_CONFIG,
    d.ModelSource.PROVIDER: pb.MODEL_SOURCE_PROVIDER,
}


def _struct(message: Any) -> Mapping[str, Any]:
    return cast(Mapping[str, Any], json_format.MessageToDict(message))


# --- requests ----------------------------------------------------------------------------------


def _part(part: pb.ContentPart) -> d.ContentPart:
    if part.WhichOneof("part") == "text":
        return d.TextPart(part.text)
    image = part.image
    if image.WhichOneof("source") == "data":
        return d.ImagePart(data=image.data, mime_type=image.mime_type, detail=_DETAIL.get(image.detail))
    return d.ImagePart(url=image.url, mime_type=image.mime_type, detail=_DETAIL.get(image.detail))


def message_in(message: pb.Message) -> d.Message:
    """Proto Message → domain Message."""
    return d.Message(
        role=_ROLES[message.role],
        content=tuple(_part(p) for p in message.content),
        tool_calls=tuple(d.ToolCall(c.id, c.name, c.arguments) for c in message.tool_calls),
        tool_call_id=message.tool_call_id,
        name=message.name,
    )


def _generation(gen: pb.GenerationOptions) -> d.GenerationOptions:
    fmt = None
    if gen.HasField("response_format"):
        rf = gen.response_format
        fmt = d.ResponseFormat(
            type=_FORMATS.get(rf.type, "text"),
            schema_name=rf.json_schema.name,
            schema_description=rf.json_schema.description,
            schema=_struct(rf.json_schema.schema) if rf.json_schema.HasField("schema") else None,
            strict=rf.json_schema.strict,
        )
    return d.GenerationOptions(
        temperature=gen.temperature if gen.HasField("temperature") else None,
        top_p=gen.top_p if gen.HasField("top_p") else None,
        top_k=gen.top_k if gen.HasField("top_k") else None,
        max_output_tokens=gen.max_output_tokens if gen.HasField("max_output_tokens") else None,
        stop_sequences=tuple(gen.stop_sequences),
        seed=gen.seed if gen.HasField("seed") else None,
        presence_penalty=gen.presence_penalty if gen.HasField("presence_penalty") else None,
        frequency_penalty=gen.frequency_penalty if gen.HasField("frequency_penalty") else None,
        response_format=fmt,
        parallel_tool_calls=gen.parallel_tool_calls if gen.HasField("parallel_tool_calls") else None,
    )


def _routing(routing: pb.RoutingOptions) -> d.RoutingOptions:
    return d.RoutingOptions(
        provider=routing.provider,
        fallback=routing.fallback if routing.HasField("fallback") else True,
        fallback_models=tuple(routing.fallback_models),
        strategy=_STRATEGIES.get(routing.strategy, d.RoutingStrategy.CONFIGURED),
    )


def chat_request_in(request: pb.ChatRequest | pb.ChatStreamRequest) -> d.ChatRequest:
    """Proto ChatRequest / ChatStreamRequest → domain ChatRequest."""
    choice = None
    kind = request.tool_choice.WhichOneof("choice")
    if kind == "function_name":
        choice = d.ToolChoice(function_name=request.tool_choice.function_name)
    elif kind == "mode":
        choice = d.ToolChoice(mode=_TOOL_MODES.get(request.tool_choice.mode))
    return d.ChatRequest(
        model=request.model,
        messages=tuple(message_in(m) for m in request.messages),
        tools=tuple(
            d.Tool(
                name=t.name,
                description=t.description,
                parameters=_struct(t.parameters) if t.HasField("parameters") else None,
                strict=t.strict,
            )
            for t in request.tools
        ),
        tool_choice=choice,
        generation=_generation(request.generation),
        routing=_routing(request.routing),
        end_user_id=request.end_user_id,
    )


def count_tokens_request_in(request: pb.CountTokensRequest) -> d.ChatRequest:
    """Proto CountTokensRequest → the domain ChatRequest whose input is counted."""
    return d.ChatRequest(
        model=request.model,
        messages=tuple(message_in(m) for m in request.messages),
        tools=tuple(
            d.Tool(
                name=t.name,
                description=t.description,
                parameters=_struct(t.parameters) if t.HasField("parameters") else None,
            )
            for t in request.tools
        ),
        routing=_routing(request.routing),
    )


_TOKEN_METHODS = {
    d.TokenCountMethod.PROVIDER: pb.TOKEN_COUNT_METHOD_PROVIDER,
    d.TokenCountMethod.TOKENIZER: pb.TOKEN_COUNT_METHOD_TOKENIZER,
    d.TokenCountMethod.ESTIMATE: pb.TOKEN_COUNT_METHOD_ESTIMATE,
}


def count_tokens_out(count: d.TokenCount) -> pb.CountTokensResponse:
    """Domain TokenCount → proto CountTokensResponse."""
    return pb.CountTokensResponse(
        input_tokens=count.input_tokens,
        estimated=count.method is d.TokenCountMethod.ESTIMATE,
        method=_TOKEN_METHODS[count.method],
        tokenizer=count.tokenizer,
        model=count.model,
        provider=count.provider,
    )


def embed_request_in(request: pb.EmbedRequest) -> d.EmbedRequest:
    """Proto EmbedRequest → domain EmbedRequest."""
    return d.EmbedRequest(
        model=request.model,
        inputs=tuple(request.inputs),
        dimensions=request.dimensions if request.HasField("dimensions") else None,
        routing=_routing(request.routing),
        end_user_id=request.end_user_id,
    )


# --- responses ---------------------------------------------------------------------------------


def usage_out(usage: d.Usage) -> pb.Usage:
    """Domain Usage → proto Usage."""
    return pb.Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        total_tokens=usage.total_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        cache_creation_input_tokens=usage.cache_creation_input_tokens,
        reasoning_tokens=usage.reasoning_tokens,
        estimated=usage.estimated,
    )


def cost_out(cost: d.Cost) -> pb.Cost:
    """Domain Cost → proto Cost."""
    return pb.Cost(input_usd=cost.input_usd, output_usd=cost.output_usd, total_usd=cost.total_usd, priced=cost.priced)


def _attempts(attempts: tuple[d.Attempt, ...]) -> list[pb.Attempt]:
    return [
        pb.Attempt(
            provider=a.provider,
            model=a.model,
            outcome=_OUTCOMES[a.outcome],
            error_reason=a.error_reason,
            upstream_status=a.upstream_status,
            latency_ms=a.latency_ms,
        )
        for a in attempts
    ]


def _warnings(warnings: tuple[d.OptionWarning, ...]) -> list[pb.Warning]:
    return [pb.Warning(code=w.code, field=w.field, message=w.message) for w in warnings]


def _tool_calls(calls: tuple[d.ToolCall, ...]) -> list[pb.ToolCall]:
    return [pb.ToolCall(id=c.id, name=c.name, arguments=c.arguments) for c in calls]


def _content(parts: tuple[d.ContentPart, ...]) -> list[pb.ContentPart]:
    return [pb.ContentPart(text=p.text) for p in parts if isinstance(p, d.TextPart)]


def chat_response_out(response: d.ChatResponse) -> pb.ChatResponse:
    """Domain ChatResponse → proto ChatResponse."""
    return pb.ChatResponse(
        id=response.id,
        model=response.model,
        provider=response.provider,
        message=pb.Message(
            role=_ROLES_OUT[response.message.role],
            content=_content(response.message.content),
            tool_calls=_tool_calls(response.message.tool_calls),
        ),
        finish_reason=_FINISH[response.finish_reason],
        usage=usage_out(response.usage),
        cost=cost_out(response.cost),
        attempts=_attempts(response.attempts),
        warnings=_warnings(response.warnings),
        provider_finish_reason=response.provider_finish_reason,
        provider_response_id=response.provider_response_id,
    )


def stream_event_out(response_id: str, event: d.ChatStreamEvent) -> pb.ChatStreamResponse:
    """Domain stream event → proto ChatStreamResponse."""
    if isinstance(event, d.ChatStreamDelta):
        delta = event.delta
        return pb.ChatStreamResponse(
            id=response_id,
            model=event.model,
            provider=event.provider,
            delta=pb.ChatDelta(
                text=delta.text,
                tool_calls=[
                    pb.ToolCallDelta(index=f.index, id=f.id, name=f.name, arguments=f.arguments)
                    for f in delta.tool_calls
                ],
            ),
        )
    final = pb.ChatStreamFinal(
        finish_reason=_FINISH[event.finish_reason],
        usage=usage_out(event.usage),
        cost=cost_out(event.cost),
        tool_calls=_tool_calls(event.tool_calls),
        attempts=_attempts(event.attempts),
        warnings=_warnings(event.warnings),
        provider_finish_reason=event.provider_finish_reason,
        provider_response_id=event.provider_response_id,
    )
    return pb.ChatStreamResponse(id=response_id, model=event.model, provider=event.provider, final=final)


def embed_response_out(response: d.EmbedResponse) -> pb.EmbedResponse:
    """Domain EmbedResponse → proto EmbedResponse."""
    return pb.EmbedResponse(
        id=response.id,
        model=response.model,
        provider=response.provider,
        embeddings=[pb.Embedding(index=i, values=v) for i, v in enumerate(response.vectors)],
        usage=usage_out(response.usage),
        cost=cost_out(response.cost),
        attempts=_attempts(response.attempts),
    )


def model_out(view: d.ModelView) -> pb.Model:
    """Domain ModelView → proto Model."""
    info = view.info
    model = pb.Model(
        name=f"models/{info.id}",
        id=info.id,
        provider=info.provider,
        provider_model=info.provider_model,
        display_name=info.display_name,
        capabilities=sorted(_CAPABILITIES_OUT[c] for c in info.capabilities),
        context_window=info.context_window,
        max_output_tokens=info.max_output_tokens,
        equivalence_group=info.equivalence_group,
        equivalent_models=list(view.equivalent_models),
        availability=_AVAILABILITY[view.availability],
        source=_SOURCES[info.source],
    )
    if info.pricing is not None:
        model.pricing.CopyFrom(
            pb.Pricing(
                input_per_million_usd=info.pricing.input_per_million_usd,
                output_per_million_usd=info.pricing.output_per_million_usd,
                cached_input_per_million_usd=info.pricing.cached_input_per_million_usd,
                source=info.pricing.source,
            )
        )
    return model
