// JSON-lines worker for checkers/syntax.py.
// Request  {"id": 1, "op": "mdx" | "js", "text": "..."}  ->  reply {"id": 1, "ok": true, "err": null}
// It only parses and compiles; nothing from the input is ever run.
// Requests are answered one at a time, in order, so the caller knows which one hung.
import readline from 'node:readline';
import vm from 'node:vm';

let mdx = null; // imported on first use, so the JS check works without node_modules

async function checkMdx(text) {
  mdx ??= await import('@mdx-js/mdx');
  try {
    await mdx.compile(text);
    return [true, null];
  } catch (e) {
    // some messages carry no position field, only "(3:1-3:7)" in the text
    const line = e.line ?? /\((\d+):\d+/.exec(e.reason || '')?.[1];
    const where = line ? `line ${line}: ` : '';
    return [false, where + (e.reason || e.message)];
  }
}

function syntaxError(e) {
  // V8 puts "file:line" on the first line of the stack of a SyntaxError
  const m = /^gen\.js:(\d+)/.exec(e.stack || '');
  return (m ? `line ${m[1]}: ` : '') + `${e.name}: ${e.message}`;
}

// null when V8 compiles text as a script or as an ES module, else the more telling of the two errors
function v8Compile(text) {
  try {
    new vm.Script(text, { filename: 'gen.js' }); // compiles, does not run
    return null;
  } catch (e) {
    // import/export only parse as a module; the constructor parses without linking or evaluating
    try {
      new vm.SourceTextModule(text, { identifier: 'gen.js' });
      return null;
    } catch (e2) {
      return /import|export|await/.test(e.message) ? e2 : e;
    }
  }
}

let jsx = null; // acorn + acorn-jsx + JSX -> JS, imported on first JSX document

async function withoutJsx(text) {
  if (!jsx) {
    const [{ Parser }, { default: acornJsx }, { buildJsx }, { toJs }] = await Promise.all([
      import('acorn'), import('acorn-jsx'), import('estree-util-build-jsx'), import('estree-util-to-js')]);
    jsx = { parser: Parser.extend(acornJsx()), buildJsx, toJs };
  }
  const parse = (sourceType) => jsx.parser.parse(text, { ecmaVersion: 'latest', sourceType, allowHashBang: true });
  let tree;
  try {
    tree = parse('module');
  } catch (e) {
    try {
      tree = parse('script'); // sloppy-mode code, e.g. `with`
    } catch {
      throw e;
    }
  }
  jsx.buildJsx(tree);
  return jsx.toJs(tree).value;
}

async function checkJs(text) {
  const err = v8Compile(text);
  if (!err) return [true, null];
  // V8 has no JSX: compile JSX to plain calls and check that instead, so early errors still count
  let plain = null;
  try {
    plain = await withoutJsx(text);
  } catch (e) {
    // a JSX document that acorn rejects too: its message is the informative one
    const jsxErr = /Unexpected token '<'/.test(err.message) && e.loc;
    return [false, jsxErr ? `line ${e.loc.line}: SyntaxError: ${e.message}` : syntaxError(err)];
  }
  const err2 = v8Compile(plain);
  return err2 ? [false, `${err2.name}: ${err2.message} (after compiling JSX)`] : [true, null];
}

let queue = Promise.resolve();
const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
rl.on('line', (line) => {
  queue = queue.then(async () => {
    let id = null;
    let ok = false;
    let err = null;
    try {
      const req = JSON.parse(line);
      id = req.id;
      [ok, err] = await (req.op === 'mdx' ? checkMdx(req.text) : checkJs(req.text));
    } catch (e) {
      err = `worker error: ${e.message}`;
    }
    process.stdout.write(JSON.stringify({ id, ok, err }) + '\n');
  });
});
rl.on('close', () => queue.then(() => process.exit(0)));
