"""Syntax checks for generated XML, JavaScript, MDX and Python. Nothing here runs the checked text.

    from checkers.syntax import check_xml, check_js, check_mdx, check_py, valid_prefix
    check_xml("<a><b/></a>")                  # (True, None)
    check_js("let x = ;")                     # (False, "line 1: ...")
    check_py("def f():\n    return 1\n")     # (True, None)
    check_mdx(["# Hi\n\n<Note>x</Note>\n"])   # [(True, None)]
    valid_prefix("xml", "<a><b>", err)        # True: only cut short

XML: lxml with entities, DTD loading and network off; documents that declare or use entities
other than the predefined five are rejected (XXE, billion laughs), as is nesting deeper than
libxml2's default limit of 256.
JS: tree-sitter-javascript, then V8's own parser (`new vm.Script`) in the Node worker.
Python: the interpreter's own parser (ast.parse; codeop for "only cut short"), never compile to run.
MDX: the real @mdx-js/mdx 3 compiler in one persistent Node worker (checkers/node_worker.mjs,
installed with `npm ci --prefix checkers`). Without it, an approximate check; mdx_exact() says which.
Set SHEIKH_NO_NODE=1 to force the Node-free path.
"""
import ast
import atexit
import codeop
import json
import os
import queue
import re
import shutil
import subprocess
import threading
from pathlib import Path

import tree_sitter_javascript
from lxml import etree
from tree_sitter import Language, Parser

HERE = Path(__file__).resolve().parent
NODE_TIMEOUT = 20.0  # seconds per document; a real compile takes milliseconds


# -----------------------------------------------------------------------------
# XML

def check_xml(text):
    if not text.strip():
        return False, "empty document"
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             huge_tree=False, dtd_validation=False)
    try:
        root = etree.fromstring(text.encode("utf-8"), parser)
    except etree.XMLSyntaxError as e:
        return False, f"line {e.lineno}: {e.msg}"
    # Well-formed, but entities are how XXE and billion laughs work, and we never resolve them:
    # a document must stand alone with only the predefined entities (what defusedxml enforces too).
    dtd = root.getroottree().docinfo.internalDTD
    if dtd is not None and any(True for _ in dtd.iterentities()):
        return False, "line 1: entity declarations are not allowed (XXE / entity expansion)"
    for ent in root.iter(etree.Entity):
        return False, f"line {ent.sourceline}: reference to undeclared or external entity {ent.text}"
    return True, None


# -----------------------------------------------------------------------------
# JavaScript

JS_PARSER = Parser(Language(tree_sitter_javascript.language()))


def check_js(text):
    tree = JS_PARSER.parse(text.encode("utf-8"))
    if tree.root_node.has_error:
        bad = (_error_nodes(tree.root_node, []) or [tree.root_node])[0]
        line = bad.start_point[0] + 1
        if bad.is_missing:
            return False, f"line {line}: missing {bad.type!r}"
        near = bad.text.decode("utf-8", "replace")[:40].replace("\n", " ")
        return False, f"line {line}: syntax error near {near!r}"
    if node_available():
        return _node_check("js", [text])[0]
    return True, None


def _error_nodes(node, out):
    if node.type == "ERROR" or node.is_missing:
        out.append(node)
    for child in node.children:
        if child.has_error or child.is_missing:
            _error_nodes(child, out)
    return out


def check_py(text):
    try:
        ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:  # ValueError: a NUL byte
        return False, f"line {getattr(e, 'lineno', None) or 1}: {getattr(e, 'msg', str(e))}"
    return True, None


# -----------------------------------------------------------------------------
# documents cut short

def valid_prefix(lang, text, err):
    """For a text that failed its check with err: is its only problem that it stops early, i.e. is
    there no error before its end? For generations that ran out of tokens: XML by the position of
    the error, MDX (which accepts almost any prose) by the kind of error, JS by where tree-sitter's
    error nodes end."""
    last_line = text.rstrip().count("\n") + 1
    m = re.match(r"line (\d+):", err or "")
    at_end = bool(m) and int(m.group(1)) >= last_line
    if lang == "xml":  # libxml2 reports a cut-off document at its very last character
        m = re.search(r"line (\d+), column (\d+)$", err or "")
        lines = text.split("\n")
        return bool(m) and int(m.group(1)) == len(lines) and int(m.group(2)) > len(lines[-1])
    if lang == "mdx":  # an unclosed flow element or expression is what a cut-off document looks like
        return at_end or "end of file" in err or (err.split(": ", 1)[-1].startswith("Expected a closing tag")
                                                  and "before the end of" not in err)
    if lang == "py":  # codeop answers "incomplete" (None) where more lines could still make it valid
        try:
            codeop.compile_command(text, symbol="exec")
        except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError):
            return False
        return True
    data = text.encode("utf-8")
    bad = _error_nodes(JS_PARSER.parse(data).root_node, [])
    if not bad:  # tree-sitter is happy, V8 is not
        return at_end or "end of input" in err
    return all(n.end_byte >= len(data.rstrip()) for n in bad)


# -----------------------------------------------------------------------------
# Node worker: one process, JSON lines, answers in order

_worker = None
_lock = threading.Lock()


def node_available():
    return not os.environ.get("SHEIKH_NO_NODE") and shutil.which("node") is not None


def mdx_exact():
    """True when check_mdx uses the real MDX compiler, False when it falls back to the approximation."""
    return node_available() and (HERE / "node_modules" / "@mdx-js" / "mdx" / "package.json").exists()


class _Worker:
    def __init__(self):
        # --experimental-vm-modules: lets the JS check parse ES modules (vm.SourceTextModule)
        cmd = ["node", "--experimental-vm-modules", "--no-warnings", "--max-old-space-size=1024",
               str(HERE / "node_worker.mjs")]
        self.proc = subprocess.Popen(cmd, cwd=HERE, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.replies = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.replies.put(json.loads(line))
        self.replies.put(None)  # the worker exited

    def close(self):
        self.proc.kill()
        self.proc.wait()


def _stop_worker():
    global _worker
    if _worker is not None:
        _worker.close()
        _worker = None


atexit.register(_stop_worker)


def _node_check(op, texts):
    """Results for texts, in order. A document that hangs or crashes the worker fails alone;
    the worker is restarted and the rest are sent again."""
    global _worker
    results = [None] * len(texts)
    pending = list(range(len(texts)))
    with _lock:
        while pending:
            if _worker is not None and _worker.proc.poll() is not None:
                _stop_worker()  # died between calls (killed from outside): not this document's fault
            if _worker is None:
                _worker = _Worker()
            try:
                for i in pending:
                    _worker.proc.stdin.write((json.dumps({"id": i, "op": op, "text": texts[i]}) + "\n").encode())
                _worker.proc.stdin.flush()
                while pending:
                    reply = _worker.replies.get(timeout=NODE_TIMEOUT)
                    if reply is None:
                        raise BrokenPipeError
                    results[reply["id"]] = (reply["ok"], reply["err"])
                    pending.remove(reply["id"])
            except queue.Empty:
                results[pending.pop(0)] = (False, f"{op} check timed out after {NODE_TIMEOUT:.0f}s")
                _stop_worker()
            except (BrokenPipeError, OSError):
                results[pending.pop(0)] = (False, f"{op} check crashed the Node worker")
                _stop_worker()
    return results


# -----------------------------------------------------------------------------
# MDX

def check_mdx(texts):
    if mdx_exact():
        return _node_check("mdx", list(texts))
    return [check_mdx_approx(t) for t in texts]


FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,}).*?(?:^ {0,3}\1[`~]*[ \t]*$|\Z)", re.M | re.S)
INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
TAG = re.compile(r"<(/?)([A-Za-z_$][\w.:$-]*)?((?:\s+[^<>{}]*?|\s*\{[^{}]*\}\s*)*?)(/?)>")


def check_mdx_approx(text):
    """Rough MDX 3 check without Node: ESM blocks parse as JS, braces balance, JSX tags nest,
    no HTML comments. It misses errors inside expressions and attribute values."""
    body = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    body = INLINE_CODE.sub(lambda m: " " * len(m.group(0)), body)
    lines = body.split("\n")
    esm = [n for n, line in enumerate(lines) if re.match(r"(import|export)\s", line)]
    for n in esm:  # each import/export paragraph must be valid JS
        block = []
        for line in lines[n:]:
            if not line.strip():
                break
            block.append(line)
        tree = JS_PARSER.parse("\n".join(block).encode())
        if tree.root_node.has_error:
            return False, f"line {n + 1}: could not parse import/export (approximate check)"
        for k in range(n, n + len(block)):
            lines[k] = ""
    body = "\n".join(lines)
    stack, depth, pos = [], 0, 0
    while pos < len(body):
        c, line = body[pos], body.count("\n", 0, pos) + 1 if body[pos] in "{}<" else 0
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                return False, f"line {line}: unexpected '}}' (approximate check)"
        elif c == "<" and depth == 0 and body[pos + 1:pos + 2].strip():
            m = TAG.match(body, pos)
            if not m:
                return False, f"line {line}: '<' starts no valid tag (approximate check)"
            closing, name, _, selfclose = m.groups()
            if closing:
                if not stack or stack[-1] != (name or ""):
                    return False, f"line {line}: unexpected closing tag </{name or ''}> (approximate check)"
                stack.pop()
            elif not selfclose:
                stack.append(name or "")
            pos = m.end()
            continue
        pos += 1
    n = len(lines)
    if depth > 0:
        return False, f"line {n}: unclosed '{{' (approximate check)"
    if stack:
        return False, f"line {n}: expected a closing tag for <{stack[-1]}> (approximate check)"
    return True, None
