"""Synthetic default corpus: valid XML, MDX and modern JavaScript documents.

    from data.synth import generate_corpus, diversity
    docs = generate_corpus(3000, seed=0)   # [(lang, text), ...], lang in xml/mdx/js

Document i depends only on (seed, i), so a larger corpus extends a smaller one.
Every document is built from small grammars over realistic vocabularies, so the
corpus is varied (see diversity()) yet always parses: tests run every document
through checkers/syntax.py.
"""
import random
import re

LANG_WEIGHTS = {"xml": 0.35, "mdx": 0.3, "js": 0.35}  # MDX documents are shorter
# Most documents are short (tens to a few hundred tokens: a small config, feed, icon, page or module), so a model
# with a small context sees whole documents, end and all, and learns to finish one: at 0.55 (and uniform counts)
# the tiny model wrote valid MDX/JS for 0.11/0.17 of validate.py's prompts, at 0.9 for 0.70/0.59 (1000 steps,
# commit 36a6d88). The long tenth keeps the variety test_diversity checks.
SHORT_SHARE = 0.9

WORDS = ("user account order item cart price total count index value name title label status "
         "config option setting cache queue task job worker event handler route path url request "
         "response payload token session client server node tree list map set key entry record row "
         "column table field schema model view state store action reducer effect hook theme color "
         "size width height offset margin layout page post comment author feed channel image icon "
         "button input form filter sort query result error message logger metric timer buffer stream "
         "file folder module package version build target source output report invoice customer "
         "product stock warehouse shipment address city country region zone profile avatar locale "
         "currency amount balance payment discount coupon category tag badge review rating vote score "
         "ticket issue project task milestone sprint release deploy cluster service endpoint "
         "header footer sidebar menu panel dialog modal toast tooltip chart graph series sample").split()
PROSE = ("the a this each every our your new simple fast small main default custom shared local "
         "remote quick careful optional returns creates updates removes stores loads renders keeps "
         "reads writes checks sends receives builds runs uses shows hides data values items results "
         "users pages files requests errors and or but with without for from into when before after "
         "because so only also then").split()


def _ident(rng, parts=None):
    words = [rng.choice(WORDS) for _ in range(parts or rng.choice((1, 2, 2, 3)))]
    name = words[0] + "".join(w.capitalize() for w in words[1:])
    return name + "Name" if name in JS_RESERVED else name


def _pascal(rng):
    return "".join(rng.choice(WORDS).capitalize() for _ in range(rng.choice((1, 2, 2, 3))))


def _sentence(rng, lo=4, hi=14):
    s = " ".join(rng.choice(PROSE + WORDS) for _ in range(rng.randint(lo, hi)))
    return s[0].upper() + s[1:] + rng.choice((".", ".", ".", "!", "?"))


def _count(rng, lo, hi):
    """lo..hi items, each further one less likely than stopping, so the likeliest next step, the one greedy
    decoding takes, is to close the element or block. (Uniform counts made a small model that cannot count
    repeat siblings until it ran out of tokens.)"""
    n = lo
    while n < hi and rng.random() < 0.4:
        n += 1
    return n


def _number(rng):
    return rng.choice((str(rng.randint(0, 9)), str(rng.randint(10, 9999)),
                       f"{rng.uniform(0, 100):.{rng.randint(1, 3)}f}"))


# ---------------------------------------------------------------- XML

# Like a real schema, a tag is either a container (children on their own lines) or a leaf (text on one line),
# and a tag's or attribute's value has one kind. A model can then tell from the tag what follows it: with
# roles drawn per element, greedy decoding of the tiny model took a newline after every `>` (nesting being
# likelier than any one word of text) and nested until it ran out of tokens.
# name: (root, containers, leaves, attribute names, default namespace)
XML_DOMAINS = {
    "maven": ("project", "dependencies dependency build plugins plugin configuration properties modules parent "
              "executions execution goals repositories repository".split(),
              "groupId artifactId version scope packaging name description url module goal phase".split(),
              "id combine.children combine.self".split(), "http://maven.apache.org/POM/4.0.0"),
    "csproj": ("Project", "PropertyGroup ItemGroup Target".split(),
               "PackageReference ProjectReference Compile None Content TargetFramework OutputType Nullable "
               "ImplicitUsings RootNamespace AssemblyName Version LangVersion Exec Copy Message".split(),
               "Include Version Condition Sdk Name Command Text Importance Exclude Update".split(), None),
    "rss": ("rss", "channel item image".split(),
            "title link description language pubDate lastBuildDate guid category author enclosure comments "
            "source ttl url generator".split(), "version isPermaLink domain length type".split(), None),
    "atom": ("feed", "entry author contributor source".split(),
             "title subtitle id updated name email link summary content category published rights generator "
             "icon".split(), "href rel type term scheme label xml:lang".split(), "http://www.w3.org/2005/Atom"),
    "svg": ("svg", "g defs linearGradient clipPath symbol mask pattern text".split(),
            "rect circle ellipse line polyline polygon path tspan stop use title desc".split(),
            "x y width height cx cy r rx ry fill stroke stroke-width d points transform opacity "
            "viewBox offset stop-color font-size text-anchor".split(), "http://www.w3.org/2000/svg"),
    "spring": ("beans", "bean list map props constructor-arg property".split(),
               "value ref entry prop description import alias".split(), "id class name scope init-method "
               "destroy-method lazy-init key value-ref parent abstract".split(),
               "http://www.springframework.org/schema/beans"),
    "android": ("manifest", "application activity service receiver provider intent-filter".split(),
                "action category data meta-data uses-permission uses-feature uses-sdk".split(),
                "android:name android:label android:icon android:theme android:exported "
                "android:minSdkVersion android:value android:scheme android:host".split(), None),
    "plist": ("plist", "dict array".split(), "key string integer real true false date data".split(),
              "version".split(), None),
    "xslt": ("xsl:stylesheet", "xsl:template xsl:for-each xsl:if xsl:choose xsl:when xsl:otherwise".split(),
             "xsl:apply-templates xsl:value-of xsl:variable xsl:param xsl:sort xsl:output".split(),
             "match select test name mode order method indent".split(), "http://www.w3.org/1999/XSL/Transform"),
    "records": (None, [w + "s" for w in WORDS[::4]], WORDS, "id type name lang ref status created updated unit "
                "currency".split(), None),
}
PREFIXES = "ext app meta dc ns x media geo".split()


def _xml_value(rng, name):
    """A value of the kind that `name` always holds: a number, a flag, an identifier, a path or prose."""
    kind = sum(map(ord, name.split(":")[-1])) % 5
    if kind == 0:
        return _number(rng)
    if kind == 1:
        return rng.choice(("true", "false", "none", "auto",
                           "#" + "".join(rng.choice("0123456789abcdef") for _ in range(6))))
    if kind == 2:
        return _ident(rng) if rng.random() < 0.9 else f"{_ident(rng)} &amp; {_ident(rng)}"
    if kind == 3:
        return "/".join(rng.choice(WORDS) for _ in range(_count(rng, 1, 4)))
    s = _sentence(rng, 1, 1)[:-1] + "".join(" " + rng.choice(PROSE + WORDS) for _ in range(_count(rng, 0, 6))) + "."
    if rng.random() < 0.2:
        s = s.replace(" ", rng.choice((" &amp; ", " &lt; ", " &gt; ", " &#169; ", " &#x2014; ")), 1)
    return s


def _xml_element(rng, domain, prefix, depth, out, indent):
    _, containers, leaves, attrs, _ = domain
    container = depth > 0 and rng.random() < 0.5
    tag = rng.choice(containers if container else leaves)
    if prefix and rng.random() < 0.15:
        tag = f"{prefix}:{tag.split(':')[-1]}"
    names = rng.sample(attrs, k=min(len(attrs), _count(rng, 0, 3)))
    a = "".join(f' {n}="{_xml_value(rng, n)}"' for n in names)
    pad = "  " * indent
    if not container:
        if names and rng.random() < 0.4:
            out.append(f"{pad}<{tag}{a}/>")
        elif rng.random() < 0.05:
            raw = rng.choice(("if (a < b && c > d) {", "x = <y>;", "<b>raw</b> &"))
            out.append(f"{pad}<{tag}{a}><![CDATA[{raw} {_sentence(rng, 2, 6)}]]></{tag}>")
        else:
            out.append(f"{pad}<{tag}{a}>{_xml_value(rng, tag)}</{tag}>")
        return
    out.append(f"{pad}<{tag}{a}>")
    for _ in range(_count(rng, 1, 5)):
        r = rng.random()
        if r < 0.07:
            out.append(f"{pad}  <!-- {_sentence(rng, 2, 8)} -->")
        elif r < 0.1:
            out.append(f"{pad}  <?{rng.choice(('render', 'php-style', 'build'))} {_ident(rng)}=\"{_number(rng)}\"?>")
        else:
            _xml_element(rng, domain, prefix, depth - 1, out, indent + 1)
    out.append(f"{pad}</{tag}>")


def gen_xml(rng, short=False):
    domain = XML_DOMAINS[rng.choice(sorted(XML_DOMAINS))]
    root, _, _, attrs, ns = domain
    root = root or _ident(rng, 1) + rng.choice(("s", "List", "Set", "Data", "Export"))
    out = []
    if rng.random() < 0.7:
        out.append(f'<?xml version="1.0" encoding="{rng.choice(("UTF-8", "utf-8"))}"?>')
    if rng.random() < 0.15 and not short:
        out.append(f'<?xml-stylesheet type="text/xsl" href="{rng.choice(WORDS)}.xsl"?>')
    if rng.random() < 0.3:
        out.append(f"<!-- {_sentence(rng, 3, 10)} -->")
    prefix = rng.choice(PREFIXES) if rng.random() < 0.4 else None
    decl = ""
    if root.startswith("xsl:"):
        decl += f' xmlns:xsl="{ns}" version="1.0"'
    elif ns:
        decl += f' xmlns="{ns}"'
    if root == "manifest" or any(a.startswith("android:") for a in attrs):
        decl += ' xmlns:android="http://schemas.android.com/apk/res/android"'
    if prefix:
        decl += f' xmlns:{prefix}="urn:{rng.choice(WORDS)}:{prefix}:{rng.randint(1, 9)}"'
    if root == "svg":
        decl += f' viewBox="0 0 {rng.randint(16, 512)} {rng.randint(16, 512)}"'
    out.append(f"<{root}{decl}>")
    for _ in range(_count(rng, 1, 6)):
        _xml_element(rng, domain, prefix, 1 if short else rng.randint(0, 4), out, 1)
    out.append(f"</{root}>")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- JavaScript

class _JS:
    """Tiny random JS grammar; every declared binding in a document has a unique name."""

    def __init__(self, rng):
        self.rng, self.used, self.scope = rng, set(), [[]]

    def fresh(self, pascal=False):
        base = _pascal(self.rng) if pascal else _ident(self.rng)
        name, i = base, 2
        while name in self.used or name in JS_RESERVED:
            name, i = f"{base}{i}", i + 1
        self.used.add(name)
        self.scope[-1].append(name)
        return name

    def ref(self):
        names = [n for s in self.scope for n in s]
        return self.rng.choice(names) if names and self.rng.random() < 0.8 else _ident(self.rng)

    def string(self):
        r, s = self.rng.random(), _sentence(self.rng, 1, 5)
        if r < 0.4:
            return "'" + s.replace("'", "") + "'"
        if r < 0.7:
            return '"' + s + '"'
        return f"`{s[:-1]} ${{{self.ref()}}}`"

    def expr(self, depth=2, aw=False):
        rng = self.rng
        if depth <= 0:
            return rng.choice((self.ref, self.ref, self.string, lambda: _number(rng),
                               lambda: rng.choice(("null", "true", "false", "undefined", "[]", "{}"))))()
        e = lambda: self.expr(depth - 1, aw)
        r = rng.random()
        if r < 0.12:
            # parenthesise logical operands: `a ?? b && c` is a SyntaxError
            wrap = lambda x: f"({x})" if any(op in x for op in (" ?? ", " && ", " || ", " ? ")) else x
            return (f"{wrap(e())} {rng.choice(('+', '-', '*', '/', '%', '===', '!==', '<', '>=', '&&', '||', '??'))} "
                    f"{wrap(e())}")
        if r < 0.24:
            return (f"{self.ref()}{rng.choice(('.', '?.'))}{_ident(rng, 1)}"
                    f"({', '.join(e() for _ in range(rng.randint(0, 2)))})")
        if r < 0.32:
            body = self.expr(depth - 1)  # the arrow is not async: no await inside
            body = f"({body})" if body.startswith("{") else body
            return (f"{self.ref()}.{rng.choice(('map', 'filter', 'find', 'some', 'every'))}"
                    f"(({_ident(rng, 1)}) => {body})")
        if r < 0.4:
            return (f"[{', '.join(e() for _ in range(rng.randint(0, 3)))}"
                    f"{', ...' + self.ref() if rng.random() < 0.3 else ''}]")
        if r < 0.5:
            keys = rng.sample(WORDS, rng.randint(1, 3))
            return ("{ " + ", ".join(f"{k}: {e()}" for k in keys)
                    + (f", ...{self.ref()}" if rng.random() < 0.3 else "") + " }")
        if r < 0.58:
            return f"{e()} ? {e()} : {e()}"
        if r < 0.64:
            return f"new {_pascal(rng)}({e()})"
        if r < 0.7 and aw:
            return f"await {self.ref()}.{_ident(rng, 1)}({e()})"
        if r < 0.76:
            return f"`{_sentence(rng, 1, 4)[:-1]} ${{{e()}}} {rng.choice(WORDS)}`"
        if r < 0.8:
            return f"typeof {self.ref()} === '{rng.choice(('string', 'number', 'object', 'function'))}'"
        return f"{self.ref()}{rng.choice(('.', '?.'))}{_ident(rng, 1)}"

    def block(self, depth, aw, fn, pad):
        self.scope.append([])
        lines = [self.stmt(depth, aw, fn, pad + "  ") for _ in range(_count(self.rng, 1, 4))]
        if fn and self.rng.random() < 0.6:
            lines.append(f"{pad}  return {self.expr(2, aw)};")
        self.scope.pop()
        return "{\n" + "\n".join(lines) + f"\n{pad}}}"

    def params(self):
        r = self.rng.random()
        if r < 0.2:
            names = [self.fresh() for _ in range(self.rng.randint(1, 3))]
            return "{ " + ", ".join(names) + " }"
        ps = [self.fresh() for _ in range(self.rng.randint(0, 3))]
        if ps and self.rng.random() < 0.3:
            ps[-1] = f"{ps[-1]} = {_number(self.rng)}"
        if self.rng.random() < 0.1:
            ps.append("..." + self.fresh())
        return ", ".join(ps)

    def stmt(self, depth, aw, fn, pad):
        rng = self.rng
        r = rng.random() if depth > 0 else rng.random() * 0.45
        if r < 0.2:
            kind = rng.choice(("const", "const", "let"))
            return f"{pad}{kind} {self.fresh()} = {self.expr(2, aw)};"
        if r < 0.28:
            a, b = self.fresh(), self.fresh()
            if rng.random() < 0.5:
                return f"{pad}const {{ {a}, {b} = {_number(rng)} }} = {self.ref()};"
            return f"{pad}const [{a}, , ...{b}] = {self.ref()};"
        if r < 0.4:
            return f"{pad}{self.ref()}{rng.choice(('.', '?.'))}{_ident(rng, 1)}({self.expr(1, aw)});"
        if r < 0.45:
            return f"{pad}console.{rng.choice(('log', 'warn', 'error', 'info'))}({self.expr(1, aw)});"
        if r < 0.57:
            s = f"{pad}if ({self.expr(1, aw)}) " + self.block(depth - 1, aw, fn, pad)
            if rng.random() < 0.4:
                s += " else " + self.block(depth - 1, aw, fn, pad)
            return s
        if r < 0.65:
            self.scope.append([])
            v = self.fresh()
            s = f"{pad}for (const {v} of {self.ref()}) " + self.block(depth - 1, aw, fn, pad)
            self.scope.pop()
            return s
        if r < 0.7:
            self.scope.append([])
            v = self.fresh()
            s = f"{pad}for (let {v} = 0; {v} < {self.ref()}.length; {v}++) " + self.block(depth - 1, aw, fn, pad)
            self.scope.pop()
            return s
        if r < 0.78:
            s = f"{pad}try " + self.block(depth - 1, aw, fn, pad)
            self.scope.append([])
            s += f" catch ({self.fresh()}) " + self.block(depth - 1, aw, fn, pad)
            self.scope.pop()
            if rng.random() < 0.3:
                s += " finally " + self.block(depth - 1, aw, fn, pad)
            return s
        if r < 0.84:
            cases = rng.sample(WORDS, rng.randint(1, 3))
            body = "".join(f"{pad}  case '{c}':\n{pad}    {self.ref()}.{_ident(rng, 1)}();\n{pad}    break;\n"
                           for c in cases)
            return (f"{pad}switch ({self.ref()}) {{\n{body}{pad}  default:\n"
                    f"{pad}    throw new Error({self.string()});\n{pad}}}")
        if r < 0.92:
            return self.function(depth - 1, pad)
        return f"{pad}{self.ref()} {rng.choice(('=', '+=', '??=', '||='))} {self.expr(2, aw)};"

    def jsdoc(self, pad, params):
        lines = [f"{pad}/**", f"{pad} * {_sentence(self.rng)}"]
        for p in params:
            lines.append(f"{pad} * @param "
                         f"{{{self.rng.choice(('string', 'number', 'Object', 'Array<string>', 'boolean'))}}} {p}")
        lines.append(f"{pad} * @returns {{{self.rng.choice(('Promise<void>', 'number', 'string', 'Object'))}}}")
        return "\n".join(lines) + f"\n{pad} */\n"

    def function(self, depth, pad, export=""):
        rng = self.rng
        name, aw = self.fresh(), rng.random() < 0.35
        self.scope.append([])
        ps = self.params()
        names = [p.split("=")[0].strip(" .") for p in ps.split(",") if p and "{" not in ps]
        doc = self.jsdoc(pad, names) if rng.random() < 0.3 else ""
        body = self.block(depth, aw, True, pad)
        self.scope.pop()
        if rng.random() < 0.35:
            return f"{doc}{pad}{export}const {name} = {'async ' if aw else ''}({ps}) => {body};"
        return f"{doc}{pad}{export}{'async ' if aw else ''}function {name}({ps}) {body}"

    def klass(self, export=""):
        rng = self.rng
        name = self.fresh(pascal=True)
        ext = f" extends {_pascal(rng)}" if rng.random() < 0.3 else ""
        lines = [f"{export}class {name}{ext} {{"]
        priv = _ident(rng, 1)
        lines.append(f"  #{priv} = {self.expr(0)};")
        if rng.random() < 0.5:
            lines.append(f"  static {_ident(rng)} = {_number(rng)};")
        self.scope.append([])
        ps = self.params()
        sup = "    super();\n" if ext else ""
        lines.append(f"  constructor({ps}) {{\n{sup}    this.#{priv} = {self.ref()};\n  }}")
        self.scope.pop()
        methods = set()
        for _ in range(rng.randint(1, 3)):
            m = _ident(rng)
            if m in methods or m == "constructor":
                continue
            methods.add(m)
            aw = rng.random() < 0.3
            kind = rng.choice(("", "", "static ", "get ")) if not aw else "async "
            self.scope.append([])
            ps = "" if kind == "get " else self.params()
            body = self.block(1, aw, True, "  ")
            self.scope.pop()
            lines.append(f"  {kind}{m}({ps}) {body}")
        lines.append("}")
        return "\n".join(lines)

    def component(self, export=""):
        rng = self.rng
        name = self.fresh(pascal=True)
        self.scope.append([])
        a, b = self.fresh(), self.fresh()
        tag, item = rng.choice(("div", "section", "article", "main", "aside")), _ident(rng, 1)
        inner = rng.choice((
            f"<ul>\n        {{{b}.map(({item}) => (\n"
            f"          <li key={{{item}.id}}>{{{item}.{rng.choice(WORDS)}}}</li>\n"
            f"        ))}}\n      </ul>",
            f"{{{b} ? <{_pascal(rng)} {rng.choice(WORDS)}={{{b}}} /> : <p>{_sentence(rng, 2, 5)}</p>}}",
            f"<button type=\"button\" onClick={{() => {b}?.({a})}}>\n        {_sentence(rng, 1, 3)}\n      </button>",
            f"<>\n        <span>{{{a}}}</span>\n        <small>{_sentence(rng, 1, 4)}</small>\n      </>",
        ))
        self.scope.pop()
        return (f"{export}function {name}({{ {a}, {b} }}) {{\n  return (\n"
                f"    <{tag} className=\"{rng.choice(WORDS)}-{rng.choice(WORDS)}\">\n"
                f"      <h2>{{{a}}}</h2>\n      {inner}\n    </{tag}>\n  );\n}}")


JS_RESERVED = set("break case catch class const continue debugger default delete do else export extends finally for "
                  "function if import in instanceof new return super switch this throw try typeof var void while "
                  "with yield let static enum await implements package protected interface private public null "
                  "true false undefined arguments eval".split())


def gen_js(rng, short=False):
    g = _JS(rng)
    out = []
    if rng.random() < 0.4:
        out.append(f"// {_sentence(rng)}")
    if rng.random() < 0.3:
        out.append("'use strict';")
    for _ in range(rng.randint(0, 1) if short else rng.randint(0, 3)):
        r, mod = rng.random(), rng.choice(("react", "node:fs/promises", "node:path", "./utils.js", "../lib/api.js",
                                           "lodash-es", "zod"))
        if r < 0.5:
            out.append(f"import {{ {', '.join(g.fresh() for _ in range(rng.randint(1, 3)))} }} from '{mod}';")
        elif r < 0.8:
            out.append(f"import {g.fresh(pascal=True)} from '{mod}';")
        else:
            out.append(f"import * as {g.fresh()} from '{mod}';")
    out.append("")
    jsx = rng.random() < 0.3
    depth = 1 if short else 2
    for _ in range(rng.randint(1, 3) if short else rng.randint(2, 6)):
        export = rng.choice(("", "", "export "))
        r = rng.random()
        if r < 0.25 and not short:
            out.append(g.klass(export))
        elif r < 0.35 and jsx:
            out.append(g.component(export))
        elif r < 0.7:
            out.append(g.function(depth, "", export))
        else:
            out.append(g.stmt(depth, True, False, ""))
        out.append("")
    if g.scope[0] and rng.random() < 0.3:
        names = [n for n in g.scope[0] if n[0].isupper()] or g.scope[0]
        out.append(f"export default {rng.choice(names)};")
    return "\n".join(out).strip() + "\n"


# ---------------------------------------------------------------- MDX

MDX_COMPONENTS = ("Callout Note Warning Tabs Tab Card CardGrid Badge Steps Step Figure Video CodeGroup "
                  "Alert Chart").split()


def _md_inline(rng):
    s = _sentence(rng, 4, 16)
    words = s.split(" ")
    for _ in range(rng.randint(0, 2)):
        i = rng.randrange(len(words))
        words[i] = rng.choice((f"**{words[i]}**", f"_{words[i]}_", f"`{_ident(rng)}()`",
                               f"[{words[i]}](/{rng.choice(WORDS)}/{rng.choice(WORDS)})"))
    return " ".join(words)


def gen_mdx(rng, short=False):
    out, comps, exported = [], rng.sample(MDX_COMPONENTS, rng.randint(1, 4)), []
    if rng.random() < 0.6:
        out += ["---", f"title: {_sentence(rng, 2, 6)[:-1]}",
                f"date: 2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                f"tags: [{', '.join(rng.sample(WORDS, 3))}]", "---", ""]
    out.append(f"import {{ {', '.join(comps)} }} from "
               f"'{rng.choice(('@/components', '../components/docs', '@site/src/ui'))}'")
    if rng.random() < 0.4:
        name = _ident(rng)
        exported.append(name)
        out.append(f"export const {name} = {{ {', '.join(f'{k}: {_number(rng)}' for k in rng.sample(WORDS, 2))} }}")
    out += ["", f"# {_sentence(rng, 2, 6)[:-1]}", ""]
    n = _count(rng, 1, 4) if short else rng.randint(4, 14)
    jsx_at = rng.randrange(n) if short else -1  # a short page shows off at least one component
    for k in range(n):
        r = 0.7 + 0.15 * rng.random() if k == jsx_at else rng.random()
        if r < 0.25:
            out += [_md_inline(rng), ""]
        elif r < 0.35:
            out += [f"{'#' * rng.randint(2, 4)} {_sentence(rng, 1, 5)[:-1]}", ""]
        elif r < 0.45:
            mark = rng.choice(("-", "*", "1."))
            out += [f"{mark} {_md_inline(rng)}" for _ in range(rng.randint(2, 5))] + [""]
        elif r < 0.55:
            cols = rng.sample(WORDS, rng.randint(2, 4))
            out += ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
            for _ in range(rng.randint(1, 4)):
                out.append("| " + " | ".join(rng.choice((_number(rng), rng.choice(WORDS))) for _ in cols) + " |")
            out.append("")
        elif r < 0.7:
            js_rng = random.Random(rng.random())
            code = gen_js(js_rng, short=short).strip().splitlines()[:rng.randint(3, 6 if short else 12)]
            out += ["```" + rng.choice(("js", "jsx", "javascript")), *code, "```", ""]
        elif r < 0.85:
            c = rng.choice(comps)
            props = " ".join(rng.choice((f'{k}="{rng.choice(WORDS)}"', f"{k}={{{_number(rng)}}}",
                                         f"{k}={{[{_number(rng)}, {_number(rng)}]}}",
                                         f"{k}={{{exported[0]}.{k}}}" if exported else k))
                             for k in rng.sample(WORDS, rng.randint(0, 3)))
            props = (" " + props) if props else ""
            if rng.random() < 0.3:
                out += [f"<{c}{props} />", ""]
            else:
                out += [f"<{c}{props}>", "", _md_inline(rng), "", f"</{c}>", ""]
        else:
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            s = f"{_sentence(rng, 2, 6)[:-1]} {{{a} + {b}}} {rng.choice(WORDS)}"
            out += [f"{s} and {{'{rng.choice(WORDS)}'.toUpperCase()}}.", ""]
    return "\n".join(out).rstrip() + "\n"


GENERATORS = {"xml": gen_xml, "mdx": gen_mdx, "js": gen_js}


def generate_doc(i, seed=0):
    """Document i of the corpus with this seed, as (lang, text)."""
    rng = random.Random(f"sheikh-synth:{seed}:{i}")
    lang = rng.choices(list(LANG_WEIGHTS), list(LANG_WEIGHTS.values()))[0]
    return lang, GENERATORS[lang](rng, short=rng.random() < SHORT_SHARE)


def generate_corpus(n_docs, seed=0):
    """Return n_docs (lang, text) pairs; document i is a function of (seed, i) only."""
    return [generate_doc(i, seed) for i in range(n_docs)]


def diversity(docs):
    """Counts that show how varied the corpus is (stored in meta.json)."""
    from lxml import etree
    import tree_sitter
    import tree_sitter_javascript
    parser = tree_sitter.Parser(tree_sitter.Language(tree_sitter_javascript.language()))
    tags, attrs, node_types, comps, words = set(), set(), set(), set(), set()
    xml_parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    for lang, text in docs:
        words.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))
        if lang == "xml":
            root = etree.fromstring(text.encode(), xml_parser)
            for el in root.iter(tag=etree.Element):
                tags.add(etree.QName(el).localname)
                attrs.update(etree.QName(a).localname for a in el.attrib)
        elif lang == "js":
            stack = [parser.parse(text.encode()).root_node]
            while stack:
                n = stack.pop()
                node_types.add(n.type)
                stack.extend(n.children)
        else:
            comps.update(re.findall(r"^<([A-Z][A-Za-z]*)", text, re.M))
    return {"docs": len(docs), "xml_tag_names": len(tags), "xml_attr_names": len(attrs),
            "js_ast_node_types": len(node_types), "mdx_components": len(comps), "distinct_identifiers": len(words)}
