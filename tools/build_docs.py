"""Builds the HTML reference documentation (`make docs`) into one directory, offline.

- `<package>.html` (e.g. `llm_gateway.v1.html`): the gRPC contract, one page per proto package,
  rendered from the comments of every `.proto` file under `protos/llm_gateway/` (found by glob, so a
  new file or package is picked up without changes here). protoc (grpcio-tools) compiles them
  with `--include_source_info`; every service, method, message, field, oneof, enum and enum value
  gets an anchor (its full protobuf name), and type names link to their definitions, across files
  and packages.
- `python/`: the Python client's API (`llm_gateway_client`) from its docstrings, by pdoc.
- `index.html`: links both.

Usage: ``python tools/build_docs.py [--out build/docs] [--proto-root protos] [--no-python]``.
The output directory is replaced on every build; a non-empty directory that this script did not
write is refused rather than deleted.
"""

from __future__ import annotations

import argparse
import html
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "build" / "docs"
DEFAULT_PROTO_ROOT = ROOT / "protos"
PROTO_SUBDIR = "llm_gateway"  # every .proto below <proto root>/llm_gateway is documented
CLIENT_SRC = ROOT / "clients" / "python" / "src"
CLIENT_MODULE = "llm_gateway_client"
CLIENT_NAMES = (
    "GatewayClient",
    "AsyncGatewayClient",
    "GatewayCallError",
    "ChatStream",
    "AsyncChatStream",
    "build_chat_request",
    "build_chat_stream_request",
)
MARKER = ".build_docs"  # written into the output directory; only such a directory is replaced
TITLE = "LLM Gateway"

FDP = descriptor_pb2.FieldDescriptorProto
# SourceCodeInfo path components (descriptor.proto field numbers).
FILE_PACKAGE, FILE_MESSAGE, FILE_ENUM, FILE_SERVICE, FILE_SYNTAX = 2, 4, 5, 6, 12
MSG_FIELD, MSG_NESTED, MSG_ENUM, MSG_ONEOF = 2, 3, 4, 8
ENUM_VALUE = 2
SERVICE_METHOD = 2

CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --accent: #0969da; --code: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
code, pre { font: 13px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
code { background: var(--code); padding: 0 .25em; border-radius: 4px; }
nav { position: fixed; top: 0; bottom: 0; left: 0; width: 290px; overflow-y: auto; padding: 1em;
      border-right: 1px solid var(--line); font-size: 13px; background: #fafbfc; }
nav ul { list-style: none; padding-left: .9em; margin: .2em 0; }
nav > ul { padding-left: 0; }
nav .section { margin-top: .6em; font-weight: 600; color: var(--muted); }
main { margin-left: 290px; padding: 1em 2.5em 4em; max-width: 1100px; }
@media (max-width: 800px) { nav { position: static; width: auto; border-right: 0; } main { margin-left: 0; } }
h1 { font-size: 1.8em; margin: .4em 0; }
h2 { font-size: 1.4em; margin-top: 1.8em; padding-bottom: .2em; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.15em; margin: 1.6em 0 .3em; }
h3 .kind, .kind { color: var(--muted); font-weight: 400; font-size: .85em; }
section.element { margin-bottom: 1.5em; }
section.element:target, tr:target { background: #fff8c5; }
table { border-collapse: collapse; width: 100%; margin: .4em 0 1em; }
th, td { text-align: left; vertical-align: top; padding: .3em .6em; border-bottom: 1px solid var(--line); }
th { font-size: 13px; color: var(--muted); font-weight: 600; }
td p, li p { margin: 0 0 .4em; }
td.num { white-space: nowrap; color: var(--muted); }
.muted, .fullname { color: var(--muted); font-size: 13px; }
.badge { display: inline-block; font-size: 11px; padding: 0 .4em; border: 1px solid var(--line);
         border-radius: 8px; color: var(--muted); margin-left: .3em; }
.badge.deprecated { color: #9a6700; border-color: #d4a72c; }
.signature { background: var(--code); padding: .4em .7em; border-radius: 6px; display: block; }
"""


# --------------------------------------------------------------------------------------------
# Loading the descriptors
# --------------------------------------------------------------------------------------------


def proto_files(proto_root: Path) -> list[Path]:
    """Every .proto file under `<proto_root>/llm_gateway`, sorted."""
    return sorted((proto_root / PROTO_SUBDIR).rglob("*.proto"))


def load_descriptors(proto_root: Path) -> descriptor_pb2.FileDescriptorSet:
    """Compiles the contract with protoc (grpcio-tools), comments included."""
    files = proto_files(proto_root)
    if not files:
        raise SystemExit(f"no .proto files under {proto_root / PROTO_SUBDIR}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptors.pb"
        command = [
            sys.executable,
            "-m",
            "grpc_tools.protoc",  # its __main__ adds the well-known types to the include path
            f"-I{proto_root.resolve()}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *(str(path.resolve()) for path in files),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"protoc failed:\n{result.stderr}")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


# --------------------------------------------------------------------------------------------
# The symbol table: every documented element, its page, anchor and source location
# --------------------------------------------------------------------------------------------


@dataclass
class Symbol:
    full_name: str  # without the leading dot; also the HTML id
    kind: str  # message, enum, service, method, field, oneof, value
    page: str  # file name of the HTML page that defines it
    file: str  # the .proto file (virtual path)


@dataclass
class Contract:
    files: list[descriptor_pb2.FileDescriptorProto]
    symbols: dict[str, Symbol] = field(default_factory=dict)
    locations: dict[str, dict[tuple[int, ...], descriptor_pb2.SourceCodeInfo.Location]] = field(default_factory=dict)
    map_entries: dict[str, descriptor_pb2.DescriptorProto] = field(default_factory=dict)
    used_by: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))

    def pages(self) -> dict[str, list[descriptor_pb2.FileDescriptorProto]]:
        pages: dict[str, list[descriptor_pb2.FileDescriptorProto]] = {}
        for file in self.files:
            pages.setdefault(page_name(file), []).append(file)
        return pages


def page_name(file: descriptor_pb2.FileDescriptorProto) -> str:
    return f"{file.package or Path(file.name).stem}.html"


def qualify(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def build_contract(descriptor_set: descriptor_pb2.FileDescriptorSet) -> Contract:
    contract = Contract(files=list(descriptor_set.file))
    for file in contract.files:
        page = page_name(file)
        contract.locations[file.name] = {tuple(loc.path): loc for loc in file.source_code_info.location}

        def add(full_name: str, kind: str, page: str = page, file: str = file.name) -> None:
            contract.symbols[full_name] = Symbol(full_name, kind, page, file)

        def add_enum(enum: descriptor_pb2.EnumDescriptorProto, full_name: str) -> None:
            add(full_name, "enum")
            for value in enum.value:
                add(f"{full_name}.{value.name}", "value")

        def add_message(message: descriptor_pb2.DescriptorProto, full_name: str) -> None:
            if message.options.map_entry:
                contract.map_entries[full_name] = message
                return
            add(full_name, "message")
            for item in message.field:
                add(f"{full_name}.{item.name}", "field")
            for oneof in real_oneofs(message):
                add(f"{full_name}.{oneof.name}", "oneof")
            for nested in message.nested_type:
                add_message(nested, f"{full_name}.{nested.name}")
            for enum in message.enum_type:
                add_enum(enum, f"{full_name}.{enum.name}")

        for message in file.message_type:
            add_message(message, qualify(file.package, message.name))
        for enum in file.enum_type:
            add_enum(enum, qualify(file.package, enum.name))
        for service in file.service:
            service_name = qualify(file.package, service.name)
            add(service_name, "service")
            for method in service.method:
                add(f"{service_name}.{method.name}", "method")

    # Back-references: which fields and methods use each message or enum.
    for file in contract.files:
        for message_name, message in walk_messages(file):
            for item in message.field:
                if item.type_name:
                    target = map_value_type(contract, item) or item.type_name.lstrip(".")
                    contract.used_by[target].append((f"{message_name}.{item.name}", "field"))
        for service in file.service:
            service_name = qualify(file.package, service.name)
            for method in service.method:
                method_name = f"{service_name}.{method.name}"
                contract.used_by[method.input_type.lstrip(".")].append((method_name, "request"))
                contract.used_by[method.output_type.lstrip(".")].append((method_name, "response"))
    return contract


def walk_messages(
    file: descriptor_pb2.FileDescriptorProto,
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    def walk(
        message: descriptor_pb2.DescriptorProto, full_name: str
    ) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
        if message.options.map_entry:
            return
        yield full_name, message
        for nested in message.nested_type:
            yield from walk(nested, f"{full_name}.{nested.name}")

    for message in file.message_type:
        yield from walk(message, qualify(file.package, message.name))


def real_oneofs(message: descriptor_pb2.DescriptorProto) -> list[descriptor_pb2.OneofDescriptorProto]:
    """The oneofs written in the source (not the synthetic ones of proto3 `optional` fields)."""
    synthetic = {item.oneof_index for item in message.field if item.proto3_optional}
    return [oneof for i, oneof in enumerate(message.oneof_decl) if i not in synthetic]


def map_value_type(contract: Contract, item: descriptor_pb2.FieldDescriptorProto) -> str | None:
    entry = contract.map_entries.get(item.type_name.lstrip("."))
    if entry is None:
        return None
    value = entry.field[1]
    return value.type_name.lstrip(".") or None


# --------------------------------------------------------------------------------------------
# Comments to HTML
# --------------------------------------------------------------------------------------------

LIST_ITEM = re.compile(r"^\s*(?:[-*]|\d+[.)])\s+")
BANNER_LINE = re.compile(r"^[\s\-=*/#~_]*$")


def clean_comment(text: str) -> str:
    """A comment as protoc gives it (each line still has its leading space), dedented."""
    lines = [line.rstrip() for line in text.splitlines()]
    return textwrap.dedent("\n".join(lines)).strip("\n")


def comment_of(loc: descriptor_pb2.SourceCodeInfo.Location | None) -> str:
    if loc is None:
        return ""
    parts = [clean_comment(loc.leading_comments), clean_comment(loc.trailing_comments)]
    return "\n\n".join(part for part in parts if part.strip())


def banner_title(detached: str) -> str | None:
    """`// ----\\n// Title\\n// ----` section banners: the title; None for other comments."""
    lines = detached.splitlines()
    rules = [line for line in lines if line.strip() and BANNER_LINE.match(line)]
    if not rules:
        return None
    title = " ".join(line.strip() for line in lines if not BANNER_LINE.match(line))
    return title or None


def doc_blocks(text: str) -> list[tuple[str, list[str]]]:
    """Splits a comment into ("p", lines) paragraphs and ("ul", items) lists; blank lines separate
    blocks, `- `, `* ` and `1. ` start list items, indented lines continue the item."""
    blocks: list[tuple[str, list[str]]] = []
    for block in re.split(r"\n\s*\n", text.strip()):
        kind = ""
        for line in block.splitlines():
            if LIST_ITEM.match(line):
                item = LIST_ITEM.sub("", line, count=1).strip()
                if kind == "ul":
                    blocks[-1][1].append(item)
                else:
                    blocks.append(("ul", [item]))
                    kind = "ul"
            elif kind == "ul" and line.startswith((" ", "\t")):
                blocks[-1][1][-1] += " " + line.strip()
            elif kind == "p":
                blocks[-1][1].append(line.strip())
            else:
                blocks.append(("p", [line.strip()]))
                kind = "p"
    return blocks


class Renderer:
    def __init__(self, contract: Contract, page: str) -> None:
        self.contract = contract
        self.page = page

    # links --------------------------------------------------------------------------------

    def href(self, full_name: str) -> str:
        symbol = self.contract.symbols[full_name]
        prefix = "" if symbol.page == self.page else symbol.page
        return f"{prefix}#{full_name}"

    def link(self, full_name: str, text: str | None = None) -> str:
        label = html.escape(text if text is not None else full_name)
        if full_name not in self.contract.symbols:
            return f'<span title="{html.escape(full_name)} (not in this reference)">{label}</span>'
        return f'<a href="{html.escape(self.href(full_name))}" title="{html.escape(full_name)}">{label}</a>'

    def type_link(self, type_name: str, package: str) -> str:
        """A field or method type: the short name inside its own package, the full name outside it."""
        full_name = type_name.lstrip(".")
        text = full_name[len(package) + 1 :] if package and full_name.startswith(package + ".") else full_name
        return self.link(full_name, text)

    def resolve(self, token: str, package: str, scopes: Sequence[str]) -> str | None:
        """A name written in backticks in a comment, when it names an element of this reference."""
        token = token.strip().removesuffix("()")
        if not re.fullmatch(r"\.?[A-Za-z_][\w.]*", token):
            return None
        token = token.lstrip(".")
        for scope in scopes:  # members of the element the comment belongs to (fields, values)
            candidate = f"{scope}.{token}"
            if candidate in self.contract.symbols:
                return candidate
        for candidate in (token, qualify(package, token)):
            symbol = self.contract.symbols.get(candidate)
            if symbol is not None and (symbol.kind in {"message", "enum", "service", "method"} or "." in token):
                return candidate
        return None

    # text ---------------------------------------------------------------------------------

    def inline(self, text: str, package: str, scopes: Sequence[str]) -> str:
        out: list[str] = []
        for i, part in enumerate(re.split(r"`([^`\n]+)`", text)):
            if i % 2 == 0:
                out.append(html.escape(part))
                continue
            target = self.resolve(part, package, scopes)
            code = f"<code>{html.escape(part)}</code>"
            out.append(f'<a href="{html.escape(self.href(target))}">{code}</a>' if target else code)
        return "".join(out)

    def doc(self, text: str, package: str, scopes: Sequence[str] = ()) -> str:
        """Paragraphs (blank-line separated) and `-` / `1.` lists; `code` spans, linked when they
        name an element of the contract."""
        html_blocks: list[str] = []
        for kind, lines in doc_blocks(text):
            if kind == "p":
                html_blocks.append(f"<p>{self.inline(' '.join(lines), package, scopes)}</p>")
            else:
                items = "".join(f"<li>{self.inline(item, package, scopes)}</li>" for item in lines)
                html_blocks.append(f"<ul>{items}</ul>")
        return "\n".join(html_blocks)

    def comment(self, file: str, path: tuple[int, ...], package: str, scopes: Sequence[str] = ()) -> str:
        text = comment_of(self.contract.locations[file].get(path))
        return self.doc(text, package, scopes) if text else ""

    # elements -----------------------------------------------------------------------------

    def field_type(self, item: descriptor_pb2.FieldDescriptorProto, package: str) -> str:
        entry = self.contract.map_entries.get(item.type_name.lstrip("."))
        if entry is not None:
            key, value = entry.field[0], entry.field[1]
            return f"map&lt;{self.field_type(key, package)}, {self.field_type(value, package)}&gt;"
        if item.type_name:
            return self.type_link(item.type_name, package)
        return html.escape(FDP.Type.Name(item.type).removeprefix("TYPE_").lower())

    def field_label(
        self, item: descriptor_pb2.FieldDescriptorProto, message: descriptor_pb2.DescriptorProto, syntax: str
    ) -> str:
        labels: list[str] = []
        if item.type_name.lstrip(".") in self.contract.map_entries:
            labels.append("map")
        elif item.label == FDP.LABEL_REPEATED:
            labels.append("repeated")
        elif item.label == FDP.LABEL_REQUIRED:
            labels.append("required")
        elif item.proto3_optional or (syntax == "proto2" and item.label == FDP.LABEL_OPTIONAL):
            labels.append("optional")
        if item.HasField("oneof_index") and not item.proto3_optional:
            labels.append(f"oneof {message.oneof_decl[item.oneof_index].name}")
        return ", ".join(labels)

    def message(
        self,
        file: descriptor_pb2.FileDescriptorProto,
        message: descriptor_pb2.DescriptorProto,
        full_name: str,
        path: tuple[int, ...],
    ) -> str:
        package, syntax = file.package, file.syntax or "proto2"
        deprecated = ' <span class="badge deprecated">deprecated</span>' if message.options.deprecated else ""
        parts = [
            f'<section class="element message" id="{html.escape(full_name)}">',
            f'<h3><span class="kind">message</span> {html.escape(display_name(full_name, package))}{deprecated}</h3>',
            f'<div class="fullname">{html.escape(full_name)}</div>',
            self.comment(file.name, path, package, [full_name]),
        ]
        if message.field:
            rows: list[str] = []
            for j, item in enumerate(message.field):
                field_name = f"{full_name}.{item.name}"
                badges = ' <span class="badge deprecated">deprecated</span>' if item.options.deprecated else ""
                label = self.field_label(item, message, syntax)
                rows.append(
                    f'<tr id="{html.escape(field_name)}">'
                    f'<td><a href="#{html.escape(field_name)}"><code>{html.escape(item.name)}</code></a>{badges}</td>'
                    f"<td><code>{self.field_type(item, package)}</code></td>"
                    f'<td class="num">{item.number}</td>'
                    f'<td class="num">{html.escape(label)}</td>'
                    f"<td>{self.comment(file.name, (*path, MSG_FIELD, j), package, [full_name])}</td></tr>"
                )
            parts.append(
                "<table><thead><tr><th>Field</th><th>Type</th><th>Number</th><th>Label</th><th>Description</th>"
                f"</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            )
        else:
            parts.append('<p class="muted">No fields.</p>')
        oneofs = real_oneofs(message)
        if oneofs:
            items = []
            for oneof in oneofs:
                k = list(message.oneof_decl).index(oneof)
                members = [item for item in message.field if item.HasField("oneof_index") and item.oneof_index == k]
                links = ", ".join(self.link(f"{full_name}.{item.name}", item.name) for item in members)
                oneof_name = f"{full_name}.{oneof.name}"
                items.append(
                    f'<li id="{html.escape(oneof_name)}"><code>oneof {html.escape(oneof.name)}</code> '
                    f"(at most one of {links})"
                    f"{self.comment(file.name, (*path, MSG_ONEOF, k), package, [full_name])}</li>"
                )
            parts.append(f"<p><strong>Oneofs</strong></p><ul>{''.join(items)}</ul>")
        reserved = describe_reserved(
            [(r.start, r.end - 1) for r in message.reserved_range], list(message.reserved_name)
        )
        if reserved:
            parts.append(f'<p class="muted">Reserved: {html.escape(reserved)}</p>')
        parts.append(self.used_by(full_name, package))
        parts.append("</section>")
        for k, nested in enumerate(message.nested_type):
            if not nested.options.map_entry:
                parts.append(self.message(file, nested, f"{full_name}.{nested.name}", (*path, MSG_NESTED, k)))
        for k, enum in enumerate(message.enum_type):
            parts.append(self.enum(file, enum, f"{full_name}.{enum.name}", (*path, MSG_ENUM, k)))
        return "\n".join(part for part in parts if part)

    def enum(
        self,
        file: descriptor_pb2.FileDescriptorProto,
        enum: descriptor_pb2.EnumDescriptorProto,
        full_name: str,
        path: tuple[int, ...],
    ) -> str:
        package = file.package
        deprecated = ' <span class="badge deprecated">deprecated</span>' if enum.options.deprecated else ""
        rows = []
        for j, value in enumerate(enum.value):
            value_name = f"{full_name}.{value.name}"
            badges = ' <span class="badge deprecated">deprecated</span>' if value.options.deprecated else ""
            rows.append(
                f'<tr id="{html.escape(value_name)}">'
                f'<td><a href="#{html.escape(value_name)}"><code>{html.escape(value.name)}</code></a>{badges}</td>'
                f'<td class="num">{value.number}</td>'
                f"<td>{self.comment(file.name, (*path, ENUM_VALUE, j), package, [full_name])}</td></tr>"
            )
        reserved = describe_reserved([(r.start, r.end) for r in enum.reserved_range], list(enum.reserved_name))
        parts = [
            f'<section class="element enum" id="{html.escape(full_name)}">',
            f'<h3><span class="kind">enum</span> {html.escape(display_name(full_name, package))}{deprecated}</h3>',
            f'<div class="fullname">{html.escape(full_name)}</div>',
            self.comment(file.name, path, package, [full_name]),
            "<table><thead><tr><th>Value</th><th>Number</th><th>Description</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>",
            f'<p class="muted">Reserved: {html.escape(reserved)}</p>' if reserved else "",
            self.used_by(full_name, package),
            "</section>",
        ]
        return "\n".join(part for part in parts if part)

    def service(
        self,
        file: descriptor_pb2.FileDescriptorProto,
        service: descriptor_pb2.ServiceDescriptorProto,
        full_name: str,
        path: tuple[int, ...],
    ) -> str:
        package = file.package
        parts = [
            f'<section class="element service" id="{html.escape(full_name)}">',
            f'<h3><span class="kind">service</span> {html.escape(display_name(full_name, package))}</h3>',
            f'<div class="fullname">{html.escape(full_name)}</div>',
            self.comment(file.name, path, package, [full_name]),
        ]
        rows = []
        for j, method in enumerate(service.method):
            method_name = f"{full_name}.{method.name}"
            request = ("stream " if method.client_streaming else "") + self.type_link(method.input_type, package)
            response = ("stream " if method.server_streaming else "") + self.type_link(method.output_type, package)
            kind = {
                (False, False): "unary",
                (False, True): "server streaming",
                (True, False): "client streaming",
                (True, True): "bidirectional streaming",
            }[(method.client_streaming, method.server_streaming)]
            badges = f'<span class="badge">{kind}</span>'
            if method.options.deprecated:
                badges += '<span class="badge deprecated">deprecated</span>'
            rows.append(
                f'<tr id="{html.escape(method_name)}"><td>'
                f'<a href="#{html.escape(method_name)}"><code>{html.escape(method.name)}</code></a>{badges}'
                f'<code class="signature">rpc {html.escape(method.name)}({request}) returns ({response})</code>'
                f'<div class="fullname">/{html.escape(full_name)}/{html.escape(method.name)}</div></td>'
                f"<td>{self.comment(file.name, (*path, SERVICE_METHOD, j), package, [full_name])}</td></tr>"
            )
        parts.append(
            f"<table><thead><tr><th>Method</th><th>Description</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        )
        parts.append("</section>")
        return "\n".join(part for part in parts if part)

    def used_by(self, full_name: str, package: str) -> str:
        uses = self.contract.used_by.get(full_name)
        if not uses:
            return ""
        links = []
        for user, role in sorted(set(uses), key=lambda use: (use[1] == "field", use[0])):
            text = display_name(user, package)
            links.append(f"{self.link(user, text)}{'' if role == 'field' else f' ({role})'}")
        return f'<p class="muted">Used by: {", ".join(links)}</p>'


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def display_name(full_name: str, package: str) -> str:
    return full_name[len(package) + 1 :] if package and full_name.startswith(package + ".") else full_name


def describe_reserved(ranges: list[tuple[int, int]], names: list[str]) -> str:
    """Reserved numbers (inclusive ranges) and names, e.g. `5, 8 to 10; names: foo`."""
    numbers = [
        str(start) if start == end else f"{start} to {'max' if end >= 2**29 - 2 else end}" for start, end in ranges
    ]
    parts = [", ".join(numbers)] if numbers else []
    if names:
        parts.append("names: " + ", ".join(names))
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Pages
# --------------------------------------------------------------------------------------------


def html_page(title: str, nav: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<nav>{nav}</nav>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


@dataclass
class TopLevel:
    line: int
    kind: str
    index: int
    name: str
    path: tuple[int, ...]


def top_level_in_source_order(file: descriptor_pb2.FileDescriptorProto, contract: Contract) -> list[TopLevel]:
    locations = contract.locations[file.name]
    elements: list[TopLevel] = []
    names: list[tuple[str, int, list[str]]] = [
        ("service", FILE_SERVICE, [item.name for item in file.service]),
        ("message", FILE_MESSAGE, [item.name for item in file.message_type]),
        ("enum", FILE_ENUM, [item.name for item in file.enum_type]),
    ]
    for kind, number, items in names:
        for i, name in enumerate(items):
            path = (number, i)
            loc = locations.get(path)
            line = loc.span[0] if loc is not None and loc.span else 10**9 + len(elements)
            elements.append(TopLevel(line, kind, i, qualify(file.package, name), path))
    return sorted(elements, key=lambda element: element.line)


def render_package_page(
    contract: Contract, page: str, files: list[descriptor_pb2.FileDescriptorProto], python_built: bool
) -> str:
    renderer = Renderer(contract, page)
    package = files[0].package
    python_link = f' · <a href="python/{CLIENT_MODULE}.html">Python client</a>' if python_built else ""
    body: list[str] = [
        f'<p class="muted"><a href="index.html">Reference index</a>{python_link}</p>',
        f"<h1>Package <code>{html.escape(package or page.removesuffix('.html'))}</code></h1>",
    ]
    nav: list[str] = [
        f'<p><a href="index.html"><strong>{html.escape(TITLE)}</strong></a><br>'
        f"<code>{html.escape(package)}</code></p><ul>"
    ]
    for file in files:
        file_id = f"file:{file.name}"
        locations = contract.locations[file.name]
        header = [comment_of(locations.get((FILE_SYNTAX,))), comment_of(locations.get((FILE_PACKAGE,)))]
        header_text = "\n\n".join(text for text in header if text)
        body.append(f'<h2 id="{html.escape(file_id)}">{html.escape(file.name)}</h2>')
        if header_text:
            body.append(renderer.doc(header_text, package))
        if file.dependency:
            deps = ", ".join(f"<code>{html.escape(dep)}</code>" for dep in file.dependency)
            body.append(f'<p class="muted">Imports: {deps}</p>')
        nav.append(f'<li><a href="#{html.escape(file_id)}">{html.escape(Path(file.name).name)}</a><ul>')
        for element in top_level_in_source_order(file, contract):
            loc = locations.get(element.path)
            for detached in loc.leading_detached_comments if loc is not None else ():
                text = clean_comment(detached)
                title = banner_title(text)
                if title is not None:
                    section_id = f"file:{file.name}:{re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')}"
                    body.append(f'<h2 id="{html.escape(section_id)}">{html.escape(title)}</h2>')
                    nav.append(
                        f'<li class="section"><a href="#{html.escape(section_id)}">{html.escape(title)}</a></li>'
                    )
                elif text.strip():
                    body.append(f'<div class="muted">{renderer.doc(text, package)}</div>')
            if element.kind == "service":
                service = file.service[element.index]
                body.append(renderer.service(file, service, element.name, element.path))
                methods = "".join(
                    f"<li>{renderer.link(f'{element.name}.{m.name}', m.name)}</li>" for m in service.method
                )
                nav.append(
                    f"<li>{renderer.link(element.name, display_name(element.name, package))}<ul>{methods}</ul></li>"
                )
            elif element.kind == "message":
                message = file.message_type[element.index]
                body.append(renderer.message(file, message, element.name, element.path))
                nav.append(f"<li>{renderer.link(element.name, display_name(element.name, package))}</li>")
            else:
                body.append(renderer.enum(file, file.enum_type[element.index], element.name, element.path))
                nav.append(f"<li>{renderer.link(element.name, display_name(element.name, package))}</li>")
        nav.append("</ul></li>")
    nav.append("</ul>")
    return html_page(f"{package} · {TITLE} reference", "".join(nav), "\n".join(body))


def render_index(contract: Contract, python_built: bool) -> str:
    renderer = Renderer(contract, "index.html")
    body = [
        f"<h1>{html.escape(TITLE)} reference</h1>",
        "<p>Generated by <code>make docs</code> (<code>tools/build_docs.py</code>) from the comments of the "
        "protobuf contract and the docstrings of the Python client.</p>",
        "<h2>gRPC contract</h2>",
    ]
    nav = [f"<p><strong>{html.escape(TITLE)}</strong></p><ul>"]
    for page, files in contract.pages().items():
        package = files[0].package
        counts: dict[str, int] = defaultdict(int)
        for symbol in contract.symbols.values():
            if symbol.page == page:
                counts[symbol.kind] += 1
        names = ", ".join(f"<code>{html.escape(file.name)}</code>" for file in files)
        body.append(
            f'<h3><a href="{html.escape(page)}">Package <code>{html.escape(package)}</code></a></h3>'
            f'<p class="muted">{names}: {plural(counts["service"], "service")}, {plural(counts["method"], "method")}, '
            f"{plural(counts['message'], 'message')}, {plural(counts['enum'], 'enum')}.</p>"
        )
        nav.append(f'<li><a href="{html.escape(page)}">{html.escape(package)}</a></li>')
        for file in files:
            for service in file.service:
                service_name = qualify(package, service.name)
                items = []
                for method in service.method:
                    method_name = f"{service_name}.{method.name}"
                    comment = comment_of(contract.locations[file.name].get(method_path(file, service, method)))
                    first = comment.split("\n\n")[0].replace("\n", " ")
                    items.append(
                        f"<li>{renderer.link(method_name, method.name)}: {renderer.inline(first, package, ())}</li>"
                    )
                body.append(f"<p>{renderer.link(service_name, service.name)}</p><ul>{''.join(items)}</ul>")
    body.append("<h2>Python client</h2>")
    if python_built:
        page = f"python/{CLIENT_MODULE}.html"
        links = "".join(f'<li><a href="{page}#{name}"><code>{name}</code></a></li>' for name in CLIENT_NAMES)
        body.append(
            f'<p><a href="{page}"><code>{CLIENT_MODULE}</code></a>: the typed sync and asyncio client over the '
            f"generated stubs (from its docstrings, by pdoc).</p><ul>{links}</ul>"
        )
        body.append(
            f'<p>The command line, <code>llm-gateway-client</code>: <a href="python/{CLIENT_MODULE}/cli.html">'
            f"<code>{CLIENT_MODULE}.cli</code></a>.</p>"
        )
        nav.append(f'<li><a href="{page}">Python client</a></li>')
    else:
        body.append('<p class="muted">Not built (<code>--no-python</code>).</p>')
    nav.append("</ul>")
    return html_page(f"{TITLE} reference", "".join(nav), "\n".join(body))


def method_path(
    file: descriptor_pb2.FileDescriptorProto,
    service: descriptor_pb2.ServiceDescriptorProto,
    method: descriptor_pb2.MethodDescriptorProto,
) -> tuple[int, ...]:
    return (FILE_SERVICE, list(file.service).index(service), SERVICE_METHOD, list(service.method).index(method))


# --------------------------------------------------------------------------------------------
# Python client (pdoc)
# --------------------------------------------------------------------------------------------


def build_python(out: Path) -> None:
    if str(CLIENT_SRC) not in sys.path:
        sys.path.insert(0, str(CLIENT_SRC))  # document the working tree's client
    try:
        import pdoc  # noqa: PLC0415  (optional: only this part of the build needs it)
        import pdoc.render  # noqa: PLC0415
    except ImportError as error:
        raise SystemExit("pdoc is not installed: run `make setup` (it is in the dev extras)") from error
    # The default template is self-contained (no CDN) while math and mermaid stay off.
    pdoc.render.configure(
        docformat="google", math=False, mermaid=False, search=True, show_source=True, footer_text=f"{TITLE}"
    )
    pdoc.pdoc(CLIENT_MODULE, f"{CLIENT_MODULE}.cli", output_directory=out)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def prepare_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise SystemExit(f"{out} exists and is not a directory")
        if any(out.iterdir()) and not (out / MARKER).exists():
            raise SystemExit(f"{out} is not empty and was not written by {Path(__file__).name}: refusing to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by tools/build_docs.py; replaced on every build\n")


def build(out: Path, proto_root: Path = DEFAULT_PROTO_ROOT, python: bool = True) -> list[Path]:
    """Writes the documentation into `out` (replacing it); returns the HTML pages written."""
    contract = build_contract(load_descriptors(proto_root))
    prepare_out(out)
    for page, files in contract.pages().items():
        (out / page).write_text(render_package_page(contract, page, files, python), encoding="utf-8")
    if python:
        build_python(out / "python")
    (out / "index.html").write_text(render_index(contract, python), encoding="utf-8")
    return sorted(out.rglob("*.html"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (replaced; default build/docs)")
    parser.add_argument(
        "--proto-root", type=Path, default=DEFAULT_PROTO_ROOT, help="protoc include root (default protos)"
    )
    parser.add_argument("--no-python", action="store_true", help="skip the Python client pages (pdoc)")
    args = parser.parse_args(argv)
    pages = build(args.out, args.proto_root, python=not args.no_python)
    size = sum(path.stat().st_size for path in args.out.rglob("*") if path.is_file())
    print(f"wrote {len(pages)} HTML pages ({size / 1024:.0f} KiB) to {args.out}; open {args.out / 'index.html'}")
    for page in pages:
        print(f"  {page.relative_to(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
