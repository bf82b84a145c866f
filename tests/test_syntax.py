"""checkers/syntax.py: real lxml, tree-sitter, V8 and @mdx-js/mdx (one Node worker for the whole session)."""
import time

import pytest

from checkers.syntax import (check_js, check_mdx, check_mdx_approx, check_py, check_xml, mdx_exact, node_available,
                             valid_prefix)

needs_node = pytest.mark.skipif(not node_available(), reason="node is not installed")


def test_xml_valid_and_invalid():
    assert check_xml('<?xml version="1.0"?>\n<root a="1"><b/>text &amp; more</root>') == (True, None)
    ok, err = check_xml("<root>\n  <b>\n</root>")
    assert not ok and err.startswith("line 3:") and "mismatch" in err
    assert check_xml("   ") == (False, "empty document")


def test_xml_xxe_does_not_leak(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-42")
    docs = [
        f'<!DOCTYPE x [<!ENTITY e SYSTEM "file://{secret}">]><x>&e;</x>',
        f'<!DOCTYPE x [<!ENTITY % p SYSTEM "file://{secret}"> %p;]><x/>',
        f'<!DOCTYPE x SYSTEM "file://{secret}"><x>&e;</x>',
    ]
    for doc in docs:
        ok, err = check_xml(doc)
        assert not ok, doc
        assert "TOP-SECRET" not in err


def test_xml_billion_laughs_and_deep_nesting_fail_fast():
    ents = "".join(f'<!ENTITY l{i} "{("&l%d;" % (i - 1)) * 10}">' for i in range(1, 10))
    laughs = f'<!DOCTYPE x [<!ENTITY l0 "lol">{ents}]><x>&l9;</x>'
    deep = "<a>" * 10_000 + "</a>" * 10_000
    t0 = time.time()
    ok1, err1 = check_xml(laughs)
    ok2, err2 = check_xml(deep)
    assert time.time() - t0 < 2
    assert not ok1 and err1.startswith("line 1:")
    assert not ok2 and "depth" in err2


def test_js_tree_sitter_and_line_numbers():
    assert check_js("function add(a, b) {\n  return a + b;\n}\n") == (True, None)
    assert check_js("import fs from 'node:fs';\nexport const x = 1;\n") == (True, None)
    ok, err = check_js("const a = 1;\nconst b = ;\n")
    assert not ok and err.startswith("line 2:")
    ok, err = check_js("function f( {")
    assert not ok and err.startswith("line 1:")


@needs_node
def test_js_v8_catches_early_errors():
    # tree-sitter accepts these; V8's parser does not
    ok, err = check_js("let a = 1;\nlet a = 2;\n")
    assert not ok and err.startswith("line 2:") and "already been declared" in err
    ok, err = check_js('"use strict";\nwith (o) {}\n')
    assert not ok and "strict mode" in err.lower()


@needs_node
def test_js_with_jsx():
    # V8 has no JSX; the worker compiles it away first, so JSX passes and early errors still fail
    jsx = "import R from 'react';\nexport const B = ({x}) => <R.Fragment><a href={x}/></R.Fragment>;\n"
    assert check_js(jsx) == (True, None)
    ok, err = check_js("const A = () => <div>{1}</div>;\nlet a = 1;\nlet a = 2;\n")
    assert not ok and err.startswith("line 3:") and "already been declared" in err
    assert check_js("const A = () => <div>;\n")[0] is False


def test_synthetic_corpus_is_valid():
    from data.synth import generate_corpus
    docs = generate_corpus(60, seed=3)
    checks = {"xml": check_xml, "js": check_js}
    bad = [(lang, checks[lang](t)) for lang, t in docs if lang in checks]
    bad += [("mdx", r) for r in check_mdx([t for lang, t in docs if lang == "mdx"])]
    assert [b for b in bad if not b[1][0]] == []


@needs_node
def test_mdx_real_compiler():
    assert mdx_exact(), "MDX compiler missing: run `npm ci --prefix checkers`"
    good = ("import {Chart} from './chart.js'\n\n# Title {1 + 1}\n\n<Chart data={[1, 2]} />\n\n"
            "```js\nif (a < b) {\n```\n")
    res = check_mdx([good, "# T\n\n<Note>\nunclosed\n", "a {b\n", "x <3 y", "<!-- c -->"])
    assert res[0] == (True, None)
    assert [ok for ok, _ in res[1:]] == [False] * 4
    assert res[1][1].startswith("line ") and "closing tag" in res[1][1]
    assert "closing brace" in res[2][1]
    assert check_mdx([]) == []


def test_mdx_approximate_fallback_agrees_on_simple_cases():
    cases = {
        "# T\n\n<Note>x</Note>\n": True,
        "import {A} from './a.js'\n\n<A\n  x=\"1\"\n/>\n": True,
        "```\n<unclosed {\n```\n": True,
        "a < b\n": True,
        "# T\n\n<Note>\nunclosed\n": False,
        "a {b\n": False,
        "x <3 y": False,
        "<!-- c -->": False,
        "import {A from './a.js'\n\nhi\n": False,
    }
    for text, want in cases.items():
        ok, err = check_mdx_approx(text)
        assert ok == want, (text, err)
        assert ok or "approximate" in err


@needs_node
def test_node_worker_restarts_after_dying():
    from checkers import syntax
    assert check_js("let a = 1;") == (True, None)
    old = syntax._worker.proc
    old.kill()
    old.wait()
    assert check_js("let a = 1;") == (True, None)
    assert "already been declared" in check_js("let a = 1;\nlet a = 2;")[1]
    assert syntax._worker.proc is not old


def test_valid_prefix_tells_cut_short_from_wrong():
    cases = [("xml", "<a>\n  <b>text", True), ("xml", "<a>\n<b></c>\n<d>", False),
             ("xml", "<a>\n  <b x=1>and more", False),
             ("js", "function f(a) {\n  return a +", True),
             ("js", "function f(a) {\n  return a + ;\n  let x = 1;\n  if (x) {", False),
             ("mdx", "# T\n\n<Note>\nunclosed", True), ("mdx", "a <3 b\n\nmore\n\n<Note>", False),
             ("py", "def f(a):\n    xs = [a,\n          2", True), ("py", "def f(a):\n", True),
             ("py", "def f(a):\n    return )\n    x = [", False), ("py", "def f(a):\nreturn a", False)]
    for lang, text, want in cases:
        ok, err = check_mdx([text])[0] if lang == "mdx" else check_xml(text) if lang == "xml" else \
            check_py(text) if lang == "py" else check_js(text)
        assert not ok and valid_prefix(lang, text, err) == want, (lang, text, err)


def test_python_is_parsed_never_run(tmp_path):
    assert check_py("def f(n):\n    return n + 1\n") == (True, None)
    assert check_py("def f(n):\n    return n +\n") == (False, "line 2: invalid syntax")
    assert check_py("x = 1\0") == (False, "line 1: source code string cannot contain null bytes")
    marker = tmp_path / "ran"
    assert check_py(f"open({str(marker)!r}, 'w')\n")[0] and not marker.exists()  # parsed, not executed
    assert not check_py("(" * 300 + ")" * 300)[0]  # too deeply nested: an error, not a crash
