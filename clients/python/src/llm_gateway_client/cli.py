"""`llm-gateway-client`: a command line for humans.

llm-gateway-client chat --model gpt-4o-mini "Hello"            # unary
llm-gateway-client chat --model m --stream "Tell me a story"    # streamed
llm-gateway-client models [--provider openai]
llm-gateway-client embed --model text-embedding-3-small "a" "b"
llm-gateway-client --tls-ca ca.pem [--tls-cert client.pem --tls-key client.key] chat ...   # TLS / mTLS
llm-gateway-client admin keys|teams|usage|spend ...             # the admin API (see admin_cli)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format

from llm_gateway.v1 import llm_gateway_pb2 as pb

from . import admin_cli
from .client import DEFAULT_TARGET, GatewayCallError, GatewayClient


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-gateway-client", description="Call an LLM Gateway.")
    parser.add_argument("--target", default=os.environ.get("LLM_GATEWAY_TARGET", DEFAULT_TARGET), help="host:port")
    parser.add_argument("--api-key", default=os.environ.get("LLM_GATEWAY_API_KEY"), help="gateway key (optional)")
    parser.add_argument(
        "--timeout", type=float, default=None, help="deadline per call, seconds (default: 120; admin commands: 10)"
    )
    parser.add_argument("--tls", action="store_true", help="TLS with gRPC's default roots (implied by --tls-*)")
    parser.add_argument("--tls-ca", default=None, metavar="FILE", help="PEM CA bundle for the server certificate")
    parser.add_argument("--tls-cert", default=None, metavar="FILE", help="PEM client certificate (mTLS)")
    parser.add_argument("--tls-key", default=None, metavar="FILE", help="PEM client private key (mTLS)")
    commands = parser.add_subparsers(dest="command", required=True)
    chat = commands.add_parser("chat", help="send one prompt")
    chat.add_argument("--model", required=True)
    chat.add_argument("--provider", default="", help="route only to this provider")
    chat.add_argument("--system", default=None, help="system prompt")
    chat.add_argument("--stream", action="store_true", help="use ChatStream")
    chat.add_argument("--max-tokens", type=int, default=None, help="max output tokens")
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--stop", action="append", default=[], help="stop sequence (repeatable)")
    chat.add_argument("prompt")
    models = commands.add_parser("models", help="list models")
    models.add_argument("--provider", default="")
    embed = commands.add_parser("embed", help="embed texts")
    embed.add_argument("--model", required=True)
    embed.add_argument("inputs", nargs="+")
    admin_cli.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 on success, 1 on a failed call (status and ErrorInfo on stderr)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "admin":
        return admin_cli.run(args)
    try:
        client = GatewayClient(
            args.target,
            api_key=args.api_key,
            timeout_s=args.timeout if args.timeout is not None else 120.0,
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
    except ValueError as error:
        parser.error(str(error))
    except OSError as error:
        parser.error(f"cannot read {error.filename}: {error.strerror}")
    with client:
        try:
            if args.command == "chat":
                options: dict[str, Any] = {"system": args.system, "provider": args.provider}
                generation = pb.GenerationOptions(stop_sequences=args.stop)
                if args.max_tokens is not None:
                    generation.max_output_tokens = args.max_tokens
                if args.temperature is not None:
                    generation.temperature = args.temperature
                options["generation"] = generation
                if args.stream:
                    for event in client.chat_stream(args.model, args.prompt, **options):
                        if event.WhichOneof("event") == "delta":
                            print(event.delta.text, end="", flush=True)
                        else:
                            print()
                            print(json_format.MessageToJson(event, indent=None), file=sys.stderr)
                else:
                    reply = client.chat(args.model, args.prompt, **options)
                    print("".join(p.text for p in reply.message.content))
                    print(json_format.MessageToJson(reply, indent=None), file=sys.stderr)
            elif args.command == "models":
                for model in client.list_models(args.provider):
                    print(f"{model.id}\t{model.provider}\t{pb.Availability.Name(model.availability)}")
            else:
                embedded = client.embed(args.model, args.inputs)
                for embedding in embedded.embeddings:
                    print(f"{embedding.index}\t{len(embedding.values)} dims\t{list(embedding.values[:4])}")
        except GatewayCallError as error:
            print(f"error: {error.code.name} {error.reason}: {error.message} {error.metadata}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
