"""The synthetic corpus: deterministic, diverse, and every document passes the checkers validate.py uses."""
import pytest

from checkers.syntax import JS_PARSER, check_js, check_mdx, check_xml, mdx_exact, node_available
from data.synth import diversity, generate_corpus, generate_doc

N = 400


@pytest.fixture(scope="module")
def docs():
    return generate_corpus(N, seed=0)


def has_jsx(text):
    stack = [JS_PARSER.parse(text.encode()).root_node]
    while stack:
        n = stack.pop()
        if n.type.startswith("jsx_"):
            return True
        stack.extend(n.children)
    return False


def test_deterministic_and_prefix_stable(docs):
    assert generate_corpus(50, seed=0) == docs[:50]
    assert generate_doc(123, seed=0) == docs[123]
    assert generate_corpus(50, seed=1) != docs[:50]
    assert len({text for _, text in docs}) == N  # no duplicates for dedup to drop


def test_language_mix(docs):
    counts = {lang: sum(d[0] == lang for d in docs) for lang in ("xml", "mdx", "js")}
    assert sum(counts.values()) == N
    assert all(c > N * 0.2 for c in counts.values()), counts


def test_xml_valid(docs):
    bad = [(i, check_xml(t)[1]) for i, (lang, t) in enumerate(docs) if lang == "xml" and not check_xml(t)[0]]
    assert bad == []


def test_js_valid(docs):
    # V8 cannot compile JSX, so documents with JSX are checked by tree-sitter alone
    bad, jsx = [], 0
    for i, (lang, text) in enumerate(docs):
        if lang != "js":
            continue
        if has_jsx(text):
            jsx += 1
            ok, err = (not JS_PARSER.parse(text.encode()).root_node.has_error), "tree-sitter error"
        else:
            ok, err = check_js(text)
        if not ok:
            bad.append((i, err))
    assert bad == []
    assert jsx > 5


def test_mdx_valid(docs):
    texts = [t for lang, t in docs if lang == "mdx"]
    results = check_mdx(texts)
    bad = [(i, err) for i, (ok, err) in enumerate(results) if not ok]
    assert bad == []
    if node_available():
        assert mdx_exact(), "Node is here but @mdx-js/mdx is not: run `npm ci --prefix checkers`"


def test_features_present(docs):
    text = {lang: "\n".join(t for l, t in docs if l == lang) for lang in ("xml", "mdx", "js")}
    for needle in ("<![CDATA[", "<!--", "&amp;", "<?xml ", "xmlns:", "&#"):
        assert needle in text["xml"], needle
    for needle in ("class ", "async ", "await ", "=> ", "`", "${", "...", "/**", "@param", "import ", "export ", "?.",
                   "#"):
        assert needle in text["js"], needle
    for needle in ("---\ntitle:", "import {", "export const", "```", "| --- |", "\n# ", "\n- ", "={", "/>"):
        assert needle in text["mdx"], needle


def test_diversity(docs):
    d = diversity(docs)
    assert d["docs"] == N
    assert d["xml_tag_names"] >= 100
    assert d["js_ast_node_types"] >= 100
    assert d["mdx_components"] >= 10
    # 400 mostly short documents (SHORT_SHARE) hold about 2,400 distinct words and identifiers; 3,000 hold 12,000
    assert d["distinct_identifiers"] >= 2000
