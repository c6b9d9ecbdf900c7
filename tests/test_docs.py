"""`make docs` (tools/build_docs.py): the HTML reference built from the proto comments and the
Python client's docstrings.

Builds into temporary directories, offline: the real contract with the pdoc pages once per module,
and a synthetic two-package contract (an `AdminService`-like second file, nested types, maps,
oneofs, streaming both ways, reserved numbers, HTML in comments) without pdoc.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from google.protobuf import descriptor_pb2

import llm_gateway_client

ROOT = Path(__file__).resolve().parents[1]
BUILD_DOCS = ROOT / "tools" / "build_docs.py"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
BLOCKS = {"p", "li", "ul", "ol", "div", "td", "th", "tr", "table", "section", "h1", "h2", "h3", "h4", "br", "pre"}


class _Page(HTMLParser):
    """The ids, hrefs and text of one HTML page; `text_by_id` holds each id'd element's own text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.hrefs: list[str] = []
        self.text_by_id: dict[str, list[str]] = {}
        self._stack: list[tuple[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        element_id = values.get("id")
        if element_id:
            self.ids.add(element_id)
            self.text_by_id.setdefault(element_id, [])
        if tag == "a" and values.get("href") is not None:
            self.hrefs.append(values["href"] or "")
        if tag not in VOID:
            self._stack.append((tag, element_id))
        if tag in BLOCKS:
            self.handle_data(" ")  # block boundaries separate words, as a browser renders them

    def handle_endtag(self, tag: str) -> None:
        if tag in BLOCKS:
            self.handle_data(" ")
        while self._stack:
            open_tag, _ = self._stack.pop()
            if open_tag == tag:
                break

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        for _, element_id in self._stack:
            if element_id:
                self.text_by_id[element_id].append(data)

    def text_of(self, element_id: str) -> str:
        return _norm("".join(self.text_by_id[element_id]))


def _norm(text: str) -> str:
    return " ".join(text.replace("`", "").split())


def _norm_comment(comment: str) -> str:
    """A proto comment as its rendered text reads: without list markers and backticks."""
    return _norm(re.sub(r"(?m)^\s*(?:[-*]|\d+[.)])\s+", "", comment))


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def _build(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BUILD_DOCS), "--out", str(out), *args], capture_output=True, text=True, check=False
    )


def _descriptors(proto_root: Path, tmp: Path) -> descriptor_pb2.FileDescriptorSet:
    out = tmp / "set.pb"
    files = sorted(str(path) for path in (proto_root / "llm_gateway").rglob("*.proto"))
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_root}", "--include_source_info"]
    subprocess.run([*command, f"--descriptor_set_out={out}", *files], check=True)
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


Comments = dict[tuple[int, ...], str]


def _enum(
    item: descriptor_pb2.EnumDescriptorProto, name: str, path: tuple[int, ...], comments: Comments
) -> Iterator[tuple[str, str]]:
    yield name, comments.get(path, "")
    for j, value in enumerate(item.value):
        yield f"{name}.{value.name}", comments.get((*path, 2, j), "")


def _message(
    item: descriptor_pb2.DescriptorProto, name: str, path: tuple[int, ...], comments: Comments
) -> Iterator[tuple[str, str]]:
    yield name, comments.get(path, "")
    for j, field in enumerate(item.field):
        yield f"{name}.{field.name}", comments.get((*path, 2, j), "")
    synthetic = {field.oneof_index for field in item.field if field.proto3_optional}
    for k, oneof in enumerate(item.oneof_decl):
        if k not in synthetic:
            yield f"{name}.{oneof.name}", comments.get((*path, 8, k), "")
    for k, nested in enumerate(item.nested_type):
        if not nested.options.map_entry:
            yield from _message(nested, f"{name}.{nested.name}", (*path, 3, k), comments)
    for k, nested_enum in enumerate(item.enum_type):
        yield from _enum(nested_enum, f"{name}.{nested_enum.name}", (*path, 4, k), comments)


def _elements(fds: descriptor_pb2.FileDescriptorSet) -> Iterator[tuple[str, str, str]]:
    """(page, anchor, comment) for every service, method, message, field, oneof, enum and value."""
    for file in fds.file:
        page = f"{file.package}.html"
        comments = {
            tuple(loc.path): "\n".join(c for c in (loc.leading_comments, loc.trailing_comments) if c.strip())
            for loc in file.source_code_info.location
        }
        for i, item in enumerate(file.message_type):
            for anchor, comment in _message(item, f"{file.package}.{item.name}", (4, i), comments):
                yield page, anchor, comment
        for i, enum in enumerate(file.enum_type):
            for anchor, comment in _enum(enum, f"{file.package}.{enum.name}", (5, i), comments):
                yield page, anchor, comment
        for i, service in enumerate(file.service):
            yield page, f"{file.package}.{service.name}", comments.get((6, i), "")
            for j, method in enumerate(service.method):
                yield page, f"{file.package}.{service.name}.{method.name}", comments.get((6, i, 2, j), "")


def _assert_elements_documented(out: Path, fds: descriptor_pb2.FileDescriptorSet) -> int:
    pages: dict[str, _Page] = {}
    missing: list[str] = []
    count = 0
    for page_name, anchor, comment in _elements(fds):
        page = pages.get(page_name) or pages.setdefault(page_name, _parse(out / page_name))
        count += 1
        if anchor not in page.ids:
            missing.append(f"{page_name}#{anchor}: no anchor")
        elif _norm_comment(comment) not in page.text_of(anchor):
            missing.append(f"{page_name}#{anchor}: comment {comment!r} not in its section")
    assert not missing, "\n".join(missing)
    return count


def _assert_links_resolve(out: Path, pages: list[Path]) -> int:
    parsed: dict[Path, _Page] = {}

    def page_at(path: Path) -> _Page:
        return parsed.get(path) or parsed.setdefault(path, _parse(path))

    broken: list[str] = []
    checked = 0
    for path in pages:
        for href in page_at(path).hrefs:
            parts = urlsplit(href)
            assert not parts.scheme and not parts.netloc, f"{path.name}: external link {href}"
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            checked += 1
            if not target.is_file():
                broken.append(f"{path.relative_to(out)}: {href} (no such page)")
            elif parts.fragment and unquote(parts.fragment) not in page_at(target).ids:
                broken.append(f"{path.relative_to(out)}: {href} (no such anchor)")
    assert not broken, "\n".join(broken)
    return checked


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "site"
    result = _build(out)
    assert result.returncode == 0, result.stderr
    assert "HTML pages" in result.stdout
    return out


def test_every_contract_element_appears_with_its_comment(docs: Path, tmp_path: Path) -> None:
    fds = _descriptors(ROOT / "protos", tmp_path)
    count = _assert_elements_documented(docs, fds)
    assert count > 250  # 6 methods, 34 messages with their fields, 12 enums with their values
    page = _parse(docs / "llm_gateway.v1.html")
    chat = page.text_of("llm_gateway.v1.LLMGatewayService.ChatStream")
    assert "rpc ChatStream(ChatStreamRequest) returns (stream ChatStreamResponse)" in chat
    assert "/llm_gateway.v1.LLMGatewayService/ChatStream" in chat
    assert "map<string, string>" in page.text_of("llm_gateway.v1.ChatRequest.metadata")
    assert "optional" in page.text_of("llm_gateway.v1.GenerationOptions.temperature")
    assert "oneof part" in page.text_of("llm_gateway.v1.ContentPart.text")
    assert "google.protobuf.Struct" in _norm("".join(page.text))  # an imported type, named in full
    assert "file:llm_gateway/v1/llm_gateway.proto:conversation-content" in page.ids  # a // --- banner
    assert all(" " not in anchor for anchor in page.ids)


def test_every_link_resolves(docs: Path) -> None:
    ours = [docs / "index.html", *sorted(docs.glob("*.html"))]
    assert _assert_links_resolve(docs, ours) > 500
    index = _parse(docs / "index.html")
    assert "llm_gateway.v1.html" in index.hrefs
    assert "python/llm_gateway_client.html" in index.hrefs


def test_python_client_pages(docs: Path) -> None:
    page_path = docs / "python" / "llm_gateway_client.html"
    page = _parse(page_path)
    for name in ("GatewayClient", "AsyncGatewayClient", "GatewayCallError", "ChatStream", "AsyncChatStream"):
        assert name in page.ids, name
        summary = inspect.getdoc(getattr(llm_gateway_client, name)).splitlines()[0]  # type: ignore[union-attr]
        assert _norm(summary) in page.text_of(name), name
    assert (docs / "python" / "llm_gateway_client" / "cli.html").is_file()


def test_pages_load_nothing_from_the_network(docs: Path) -> None:
    remote = re.compile(r"<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)\s*=\s*[\"']?(?:https?:)?//", re.I)
    for path in docs.rglob("*.html"):
        text = path.read_text(encoding="utf-8")
        assert not remote.search(text), path
        assert not re.search(r"url\(\s*[\"']?(?:https?:)?//|@import\s", text), path


SYNTHETIC_BASE = """\
// Base file header: <b>not bold</b> & "quoted".
syntax = "proto3";

package llm_gateway.v1;

import "google/protobuf/struct.proto";

// ---------------------------------------------------------------------------
// Things
// ---------------------------------------------------------------------------

// A thing; see `Outer.Inner` and `Kind`. Comment with <script>alert(1)</script> & more.
//
// - first item
// - second item,
//   continued
message Thing {
  // The name (a < b && c > d).
  string name = 1;
  // Labels keyed by name.
  map<string, Thing> children = 2;
  // Present or not.
  optional int32 size = 3;
  // Old field.
  string legacy = 4 [deprecated = true];
  reserved 5, 8 to 10;
  reserved "old_name";
  // Free-form.
  google.protobuf.Struct extra = 11;
}

// Holds nested types.
message Outer {
  // A nested message.
  message Inner {
    // The inner value; see `value` (a sibling) and `Thing.name`.
    string value = 1;
  }
  // A nested enum.
  enum Mode {
    // Unset.
    MODE_UNSPECIFIED = 0;
    // Fast.
    MODE_FAST = 1;
  }
  // Exactly one of these.
  oneof choice {
    // An inner.
    Inner inner = 1;
    // A mode.
    Mode mode = 2;
  }
  // Repeated things.
  repeated Thing things = 3;
}

// The kind of a thing.
enum Kind {
  // Unset.
  KIND_UNSPECIFIED = 0;
  // Big.
  KIND_BIG = 1;
}
"""

SYNTHETIC_ADMIN = """\
syntax = "proto3";

// Admin package comment.
package llm_gateway.admin.v1;

import "llm_gateway/v1/base.proto";

// Operator endpoints.
service AdminService {
  // Streams things in and out.
  rpc Sync(stream llm_gateway.v1.Thing) returns (stream SyncResponse);
  // Uploads things.
  rpc Upload(stream llm_gateway.v1.Thing) returns (SyncResponse) {
    option deprecated = true;
  }
}

// The answer to `AdminService.Sync`.
message SyncResponse {
  // The thing's kind.
  llm_gateway.v1.Kind kind = 1;
}
"""


def test_new_proto_files_escaping_and_every_construct(tmp_path: Path) -> None:
    protos = tmp_path / "protos"
    (protos / "llm_gateway" / "v1").mkdir(parents=True)
    (protos / "llm_gateway" / "admin" / "v1").mkdir(parents=True)
    (protos / "llm_gateway" / "v1" / "base.proto").write_text(SYNTHETIC_BASE)
    (protos / "llm_gateway" / "admin" / "v1" / "admin.proto").write_text(SYNTHETIC_ADMIN)
    out = tmp_path / "site"
    for _ in range(2):  # the second build replaces the first
        result = _build(out, "--proto-root", str(protos), "--no-python")
        assert result.returncode == 0, result.stderr

    fds = _descriptors(protos, tmp_path)
    assert _assert_elements_documented(out, fds) > 20
    pages = sorted(out.glob("*.html"))
    assert [p.name for p in pages] == ["index.html", "llm_gateway.admin.v1.html", "llm_gateway.v1.html"]
    _assert_links_resolve(out, pages)

    base_html = (out / "llm_gateway.v1.html").read_text()
    assert "<script>alert" not in base_html and "<b>not bold" not in base_html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; more" in base_html
    base = _parse(out / "llm_gateway.v1.html")
    thing = base.text_of("llm_gateway.v1.Thing")
    assert "map<string, Thing>" in base.text_of("llm_gateway.v1.Thing.children")
    assert "optional" in base.text_of("llm_gateway.v1.Thing.size")
    assert "deprecated" in base.text_of("llm_gateway.v1.Thing.legacy")
    assert "Reserved: 5, 8 to 10; names: old_name" in thing
    assert "google.protobuf.Struct" in base.text_of("llm_gateway.v1.Thing.extra")
    assert not any("ChildrenEntry" in anchor for anchor in base.ids)  # map entries are not types
    assert "<ul><li>first item</li><li>second item, continued</li></ul>" in base_html
    assert "oneof choice" in base.text_of("llm_gateway.v1.Outer.inner")
    assert '<a href="#llm_gateway.v1.Outer.Inner"><code>Outer.Inner</code></a>' in base_html
    assert '<a href="#llm_gateway.v1.Outer.Inner.value"><code>value</code></a>' in base_html
    assert '<a href="#llm_gateway.v1.Thing.name"><code>Thing.name</code></a>' in base_html
    assert "Used by: llm_gateway.admin.v1.AdminService.Sync (request)" in thing

    admin_html = (out / "llm_gateway.admin.v1.html").read_text()
    admin = _parse(out / "llm_gateway.admin.v1.html")
    sync = admin.text_of("llm_gateway.admin.v1.AdminService.Sync")
    assert "rpc Sync(stream llm_gateway.v1.Thing) returns (stream SyncResponse)" in sync
    assert "bidirectional streaming" in sync
    assert "client streaming" in admin.text_of("llm_gateway.admin.v1.AdminService.Upload")
    assert "deprecated" in admin.text_of("llm_gateway.admin.v1.AdminService.Upload")
    assert 'href="llm_gateway.v1.html#llm_gateway.v1.Thing"' in admin_html  # across pages
    assert "Admin package comment." in _norm("".join(admin.text))
    index = _parse(out / "index.html")
    assert {"llm_gateway.v1.html", "llm_gateway.admin.v1.html"} <= set(index.hrefs)
    assert "llm_gateway.admin.v1.html#llm_gateway.admin.v1.AdminService.Sync" in index.hrefs


def test_refuses_to_replace_a_directory_it_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "precious"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _build(out, "--no-python")
    assert result.returncode != 0
    assert "refusing" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
