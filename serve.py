"""
Step 10, the last mile: serve the exported model over HTTP, through its safeguards.

    python serve.py                              # http://127.0.0.1:8000/ is the playground
    python serve.py --port 8080 --graph fp32     # --host 0.0.0.0 to be reached from outside
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "The history of", "max_tokens": 20, "temperature": 0, "stream": true}'

In:  data/02_tokenize/tokenizer.tiktoken + tokenizer.json; data/08_export/config.json and
     model_kv_int8.onnx (--graph fp16: model_kv_fp16.onnx, fp32: model_kv.onnx); the guard of
     07_safety.py as 08 exported it, data/08_export/guard.onnx + guard.json
Out: POST /v1/completions, GET /health, GET / (the playground); nothing on disk

The ideas, in the order the code uses them:
  1. A server needs ONNX Runtime, numpy and tiktoken, not PyTorch: the graph is the model.
     (08_export.py imports torch, so its decoding loop is repeated here, not imported.)
  2. Decoding is 08's ort_generate at batch 1, the same KV cache and sliding window, plus
     temperature and nucleus (top_p) sampling from a generator seeded by the request's seed.
  3. Text leaves in pieces: a token may end inside a UTF-8 character, and text that may be the
     start of a stop string is held back until it is known not to be one.
  4. The safeguards of step 9 (safeguards.py: the normaliser and the policy; the guard, as a
     graph) read the prompt on its way in and the completion before each piece of it leaves;
     flagged means the fixed refusal (finish_reason "content_filter").
  5. OpenAI's completions format, streamed as server-sent events, so curl and OpenAI-compatible
     clients work unchanged. A bad request gets a 4xx with a JSON error, never the server.
  6. Concurrency: a thread per connection (ThreadingHTTPServer) over ONE ONNX Runtime session,
     whose run() is thread-safe and releases the GIL while it computes. Each request keeps its
     own KV cache, so requests share only the weights, and a client that goes away ends only
     its own thread's loop (at the next piece written).

Deliberately left out: batching requests together (continuous batching, as vLLM does: the way
to keep a GPU busy), a limit on requests in flight, n > 1, logprobs, echo, /v1/models, chat
formatting (a base model has no turns), graceful shutdown and TLS (a proxy in front does it).
"""
import codecs
import importlib
import json
import secrets
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

import common
import safeguards
from common import UserError
from safeguards import REFUSAL

tok_lib = importlib.import_module("02_tokenize")

GRAPHS = {"int8": "model_kv_int8.onnx", "fp16": "model_kv_fp16.onnx", "fp32": "model_kv.onnx"}
MAX_BODY = 64 * 1024        # bytes of request body
MAX_PROMPT_TOKENS = 4096    # the model sees only the last block_size of them anyway
MAX_TOKENS = 1024           # completion tokens per request
MAX_STOPS = 4               # stop strings per request, as at OpenAI
TIMEOUT = 10                # seconds a client may stall while sending its request
OUTPUT_WINDOW = 500         # characters of the completion the output guard reads before each piece leaves


# ----------------------------------------------------------------------------- safeguards (step 9)

def safeguard(model, text, prompt=True):
    """What step 9's safeguards make of `text`, as 07_safety.py measured them. A prompt is
    normalised; the policy refuses it when it is not English or cannot be read; the guard
    judges the reading and, each on its own, the payloads decoded from it. A completion is
    normalised and judged by the guard alone, as 07 judges replies. Returns what the playground
    shows: the reading, the guard's highest P(harmful), the policy's reason, and whether it is
    flagged (the request then gets the refusal)."""
    guard = model["guard"]
    views = safeguards.guard_views([text], 1) if prompt else [safeguards.normalize(text)]   # a prompt is one turn
    why = safeguards.refused_by_policy([text]) if prompt else None   # as 07 applies it
    score = max(float(guard["sess"].run(None, {"ngram_ids": np.array(safeguards.ngram_buckets(v), np.int64)})[0][0])
                for v in views)
    return {"flagged": why is not None or score >= guard["threshold"], "reading": views[0],
            "score": round(score, 4), "policy": why}


# ----------------------------------------------------------------------------- the model

def session(path, threads):
    """An ONNX Runtime session of the graph at `path` (UserError when it is missing or damaged)."""
    import onnxruntime as ort
    if not path.is_file():
        raise UserError(f"{path}: not found; run 08_export.py first")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads   # 0: ONNX Runtime's default, one per core
    try:
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:   # a damaged or foreign file: ONNX Runtime has its own exception types
        raise UserError(f"{path}: not a readable ONNX graph ({type(e).__name__})") from None


def read_config(path, keys, kind):
    """The `keys` of the JSON file at `path`, each converted by `kind`."""
    if not path.is_file():
        raise UserError(f"{path}: not found; run " + ("07_safety.py, then " if "guard" in path.name else "")
                        + "08_export.py first")
    try:
        d = json.loads(path.read_text())
        return {k: kind(d[k]) for k in keys}
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def load_model(data, graph="int8", threads=0):
    """The tokenizer, the KV graph and the guard in ONNX Runtime sessions, and the configs 08
    wrote beside them."""
    try:
        enc = tok_lib.load_tokenizer(Path(data) / "02_tokenize")
    except ValueError as e:
        raise UserError(f"{e}; run 02_tokenize.py first") from None
    out = Path(data) / "08_export"
    cfg = read_config(out / "config.json", ("block_size", "n_layer", "n_head", "n_embd", "vocab_used"), int)
    guard = {**read_config(out / "guard.json", ("threshold",), float),
             "sess": session(out / "guard.onnx", 1)}   # one thread: a sum of a few dozen weights
    eot = enc.encode_single_token(tok_lib.EOT) if tok_lib.EOT in enc.special_tokens_set else None
    return {"sess": session(out / GRAPHS[graph], threads), "enc": enc, "cfg": cfg, "eot": eot,
            "name": GRAPHS[graph].removesuffix(".onnx"), "guard": guard}


def kv_step(sess, ids, past):
    """08's kv_step at batch 1: one call of the KV graph; returns (last logits, present)."""
    names = [f"past_key_values.{i}.{kv}" for i in range(len(past) // 2) for kv in ("key", "value")]
    logits, *present = sess.run(None, {"input_ids": np.array([ids], np.int64), **dict(zip(names, past))})
    return logits[0, -1].astype(np.float64), present


def pick(logits, temperature, top_p, rng):
    """The next token: argmax at temperature 0 (as 08), else a draw from the smallest set of
    most likely tokens whose probabilities add up to top_p (nucleus sampling, Holtzman 2019)."""
    if temperature == 0:
        return int(logits.argmax())
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = order[:np.searchsorted(np.cumsum(p[order]), top_p) + 1]
    return int(rng.choice(keep, p=p[keep] / p[keep].sum()))


def decode(model, ids, max_tokens, temperature=0, top_p=1, seed=None):
    """Yield max_tokens new token ids: 08's ort_generate at batch 1, with sampling. Once the
    context overflows block_size, keep the newest block_size // 2 tokens and prefill them again."""
    cfg, rng, idx = model["cfg"], np.random.default_rng(seed), list(ids)
    bs, head_dim = cfg["block_size"], cfg["n_embd"] // cfg["n_head"]
    empty = [np.zeros((1, cfg["n_head"], 0, head_dim), np.float32)] * (2 * cfg["n_layer"])   # 08's empty_cache
    start, past = max(0, len(idx) - bs), None
    for _ in range(max_tokens):
        if len(idx) - start > bs:
            start, past = len(idx) - bs // 2, None
        if past is None:
            logits, past = kv_step(model["sess"], idx[start:], empty)
        else:
            logits, past = kv_step(model["sess"], idx[-1:], past)
        if cfg["vocab_used"]:   # padding rows of the embedding are never emitted
            logits[cfg["vocab_used"]:] = -np.inf
        idx.append(pick(logits, temperature, top_p, rng))
        yield idx[-1]


# ----------------------------------------------------------------------------- a completion

def held_back(text, stops):
    """Length of the longest end of `text` that could still grow into a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def newest(text):
    """The newest OUTPUT_WINDOW characters of `text`, from the start of a word: what the output
    guard reads. A bounded window keeps its cost per piece constant however long the completion
    grows; 07 judges replies of --max-new-tokens tokens, shorter than this."""
    return text if len(text) <= OUTPUT_WINDOW else text[-OUTPUT_WINDOW:].split(" ", 1)[-1]


def complete(model, req):
    """Yield the completion in pieces, {"text": ...}; the last also has finish_reason ("stop",
    "length", or "content_filter" when a safeguard flagged), usage and what the safeguards saw.
    A stream sends each piece as a chunk; a plain response joins them."""
    enc, stops = model["enc"], req["stop"]
    ids = enc.encode_ordinary(req["prompt"])
    seen, usage = {"prompt": safeguard(model, req["prompt"]), "completion": None}, {"prompt_tokens": len(ids)}

    def last(text, reason):
        usage["completion_tokens"] = n
        usage["total_tokens"] = len(ids) + n
        return {"text": text, "finish_reason": reason, "usage": usage, "safeguards": seen}

    n, text, sent, cut, reason = 0, "", 0, -1, "length"
    if seen["prompt"]["flagged"]:
        yield last(REFUSAL, "content_filter")
        return
    utf8 = codecs.getincrementaldecoder("utf-8")("replace")   # bytes in, characters out once whole
    for tok in decode(model, ids, req["max_tokens"], req["temperature"], req["top_p"], req["seed"]):
        if tok == model["eot"]:   # the model ended the document
            reason = "stop"
            break
        n += 1
        text += utf8.decode(enc.decode_single_token_bytes(tok))
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut >= 0:   # a stop string ends the completion, and is not part of it
            text, reason = text[:cut], "stop"
            break
        ready = len(text) - held_back(text, stops)
        if ready > sent:   # the output guard reads what is about to leave, with what came before it
            seen["completion"] = safeguard(model, newest(text[:ready]), prompt=False)
            if seen["completion"]["flagged"]:
                yield last(REFUSAL, "content_filter")
                return
            yield {"text": text[sent:ready]}
            sent = ready
    if cut < 0:   # a character left incomplete at the end becomes U+FFFD, as in tiktoken
        text += utf8.decode(b"", final=True)
    if len(text) > sent or seen["completion"] is None:   # what the last piece sent was judged already
        seen["completion"] = safeguard(model, newest(text), prompt=False)
    yield last(REFUSAL, "content_filter") if seen["completion"]["flagged"] else last(text[sent:], reason)


# ----------------------------------------------------------------------------- the request

class RequestError(Exception):
    """A bad request: its HTTP status, a message and the field at fault, sent back as JSON."""

    def __init__(self, status, message, param=None):
        super().__init__(message)
        self.status, self.param = status, param


# Fields OpenAI clients may send that change nothing here, and fields accepted only at their
# neutral value (clients send some by default). Any other field is an error, as at OpenAI: a
# misspelt "max_token" must not be silently ignored.
IGNORED = {"model", "user", "stream_options"}
NEUTRAL = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "suffix": None, "logit_bias": {},
           "presence_penalty": 0, "frequency_penalty": 0}


def field(body, name, default, kinds, ok, what):
    """body[name] (absent or JSON null: the default), checked for type and range."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds) or not ok(v):   # True is an int
        raise RequestError(400, f"{name} must be {what}, got {json.dumps(v)[:50]}", name)
    return v


def parse_request(body, enc):
    """The checked fields of a completion request; RequestError naming the first wrong one."""
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    known = {"prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream"} | IGNORED
    for k in body:
        if k not in known and k not in NEUTRAL or k in NEUTRAL and body[k] not in (NEUTRAL[k], None):
            raise RequestError(400, f"{k}: not supported" if k in NEUTRAL else f"unknown field {k!r}", k)
    number = (int, float)
    stop = field(body, "stop", [], (str, list), lambda v: v != "" if isinstance(v, str) else len(v) <= MAX_STOPS
                 and all(isinstance(s, str) and s for s in v), f"a non-empty string or a list of up to {MAX_STOPS}")
    req = {"prompt": field(body, "prompt", "", (str,), bool, "a non-empty string"),
           "max_tokens": field(body, "max_tokens", 16, (int,), lambda v: 1 <= v <= MAX_TOKENS,
                               f"an integer in [1, {MAX_TOKENS}]"),
           "temperature": field(body, "temperature", 1.0, number, lambda v: 0 <= v <= 2, "a number in [0, 2]"),
           "top_p": field(body, "top_p", 1.0, number, lambda v: 0 < v <= 1, "a number in (0, 1]"),
           "seed": field(body, "seed", None, (int,), lambda v: 0 <= v < 2**63, "an integer >= 0"),
           "stream": field(body, "stream", False, (bool,), lambda v: True, "true or false"),
           "stop": [stop] if isinstance(stop, str) else stop}
    if not req["prompt"] or len(enc.encode_ordinary(req["prompt"])) > MAX_PROMPT_TOKENS:
        raise RequestError(400, f"prompt must be a string of 1 to {MAX_PROMPT_TOKENS} tokens", "prompt")
    return req


# ----------------------------------------------------------------------------- the server

class Handler(BaseHTTPRequestHandler):
    """One instance per connection, each in its own thread; HTTP/1.0, so one request each."""
    timeout = TIMEOUT
    default_request_version = "HTTP/1.0"   # what a request line we cannot read is answered in (0.9 has no headers)

    def send(self, status, body, ctype="application/json"):
        body = json.dumps(body).encode() if ctype == "application/json" else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def fail(self, status, message, param=None):
        kind = "invalid_request_error" if status < 500 else "server_error"
        self.send(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def send_error(self, code, message=None, explain=None):
        """The errors the base class answers itself (a malformed request line, headers too long,
        a method with no do_ method, HTTP/2), as JSON too, and 4xx: they are the client's."""
        if code == 501:
            code, message = 405, f"no {self.command} here: GET /, /health; POST /v1/completions"
        elif code == 505:
            code, message = 400, "HTTP/1.0 or HTTP/1.1 only"
        self.close_connection = True
        self.fail(code, message or "bad request")

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/health":   # the port opens once the model is loaded: answering is being ready
            self.send(200, {"status": "ok", "model": self.server.model["name"]})
        elif path == "/":
            self.send(200, PAGE.encode(), "text/html; charset=utf-8")
        else:
            self.fail(405 if path == "/v1/completions" else 404, f"no GET {path}")

    def read_json(self):
        """The request's body as JSON, or a RequestError saying what is wrong with it."""
        try:
            n = int(self.headers["Content-Length"])
        except (TypeError, ValueError):
            raise RequestError(411, "a Content-Length header with the body's size is required") from None
        if n > MAX_BODY:   # read it all the same (up to a point): closing a connection on unread
            self.rfile.read(min(n, 16 * MAX_BODY))   # bytes resets it, and the client loses this answer
        if not 0 <= n <= MAX_BODY:
            raise RequestError(413 if n > 0 else 400, f"the body must be 0 to {MAX_BODY} bytes, not {n}")
        body = self.rfile.read(n)   # a client that stalls raises TimeoutError after TIMEOUT s
        if len(body) < n:
            raise RequestError(400, f"the body ended after {len(body)} of its {n} bytes")
        if self.headers.get_content_type() != "application/json":
            raise RequestError(415, "Content-Type must be application/json")
        try:
            return json.loads(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError(400, "the body is not UTF-8") from None
        except (ValueError, RecursionError) as e:
            raise RequestError(400, f"the body is not valid JSON ({e})"[:200]) from None

    def do_POST(self):
        if urlsplit(self.path).path != "/v1/completions":
            return self.fail(404, f"no POST {self.path}")
        try:
            req = parse_request(self.read_json(), self.server.model["enc"])
        except RequestError as e:
            return self.fail(e.status, str(e), e.param)
        except TimeoutError:
            return self.fail(408, f"the body did not arrive within {TIMEOUT} s")
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
                "created": int(time.time()), "model": self.server.model["name"]}
        pieces = complete(self.server.model, req)
        try:
            if req["stream"]:
                return self.stream(head, pieces)
            pieces = list(pieces)
            end = pieces[-1]
            self.send(200, {**head, "choices": [{"text": "".join(p["text"] for p in pieces), "index": 0,
                            "logprobs": None, "finish_reason": end["finish_reason"]}],
                            "usage": end["usage"], "safeguards": end["safeguards"]})
        except ConnectionError:   # the client went away: its loop ends here, and nothing else does
            self.log_message("client disconnected; generation stopped")

    def stream(self, head, pieces):
        """Server-sent events: a chunk per piece of text, then [DONE]. The last chunk also has
        usage and what the safeguards saw (not in OpenAI's format; clients ignore extra fields)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        for p in pieces:
            chunk = {**head, "choices": [{"text": p["text"], "index": 0, "logprobs": None,
                                          "finish_reason": p.get("finish_reason")}]}
            if "usage" in p:
                chunk.update(usage=p["usage"], safeguards=p["safeguards"])
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


class Server(ThreadingHTTPServer):
    daemon_threads = True      # Ctrl-C does not wait for open streams
    request_queue_size = 128   # connections not yet accepted: the default 5 drops a burst of 16 (retried 1 s later)


def make_server(model, host="127.0.0.1", port=8000):
    """The server, bound and ready for serve_forever(); port 0 picks a free one."""
    server = Server((host, port), Handler)
    server.model = model
    return server


PAGE = """<!doctype html><meta charset="utf-8"><title>serve.py playground</title>
<style>body{font:15px system-ui,sans-serif;max-width:48em;margin:2em auto}textarea,pre{width:100%}
pre{white-space:pre-wrap;background:#eee;padding:.5em;min-height:4em}input{width:5em}td,th{padding:0 .5em;text-align:left}</style>
<h1>Playground</h1>
<p>This is a <b>base model</b>: it continues text. It does not answer questions or follow instructions:
write the beginning of a text, and it writes what might come next. The safeguards read the prompt
on its way in and the completion on its way out.</p>
<form id="form"><textarea id="prompt" rows="4">The history of</textarea><br>
max tokens <input id="max_tokens" type="number" value="64" min="1">
temperature <input id="temperature" type="number" value="0.8" min="0" max="2" step="0.1">
top_p <input id="top_p" type="number" value="0.95" min="0.05" max="1" step="0.05">
seed <input id="seed" type="number" min="0" placeholder="random"> <button>Complete</button></form>
<pre id="out"></pre><p id="status"></p>
<table><tr><th>the safeguards saw<th>the normaliser's reading<th>the guard's score<th>flagged</tr><tbody id="seen"></table>
<script>
const $ = id => document.getElementById(id), esc = s => String(s).replace(/[&<>]/g, c => `&#${c.charCodeAt(0)};`);
$("form").onsubmit = async e => {   // stream the completion: read server-sent events as they arrive
  e.preventDefault(); $("out").textContent = $("status").textContent = $("seen").innerHTML = "";
  const body = {prompt: $("prompt").value, stream: true};
  for (const k of ["max_tokens", "temperature", "top_p", "seed"]) if ($(k).value !== "") body[k] = Number($(k).value);
  const r = await fetch("/v1/completions", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  if (!r.ok) return $("status").textContent = "error: " + (await r.json()).error.message;
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  for (let buf = "", chunks = 0, part; !(part = await reader.read()).done; ) {
    const events = (buf += part.value).split("\\n\\n"); buf = events.pop();
    for (const ev of events.filter(ev => ev !== "data: [DONE]")) {
      const c = JSON.parse(ev.slice(6)), ch = c.choices[0], refused = ch.finish_reason === "content_filter";
      $("out").textContent = (refused ? "" : $("out").textContent) + ch.text;   // a refusal replaces the text
      $("out").dataset.chunks = ++chunks;
      if (!c.safeguards) continue;
      $("status").textContent = `finish_reason: ${ch.finish_reason}` + (refused ? " (flagged: the fixed refusal)" : "") +
        `; ${c.usage.prompt_tokens} prompt + ${c.usage.completion_tokens} completion tokens`;
      $("seen").innerHTML = ["prompt", "completion"].filter(k => c.safeguards[k]).map(k => { const s = c.safeguards[k];
        return `<tr><td>${k}<td>${esc(s.reading)}<td>${s.score}<td>${s.flagged ? "<b>yes</b>" : "no"}${s.policy ? " (policy: " + s.policy + ")" : ""}`; }).join("");
    }
  }
};
</script>
"""


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = common.ArgumentParser(description="Serve the exported model: /v1/completions (OpenAI's format), "
                                           "/health, and a playground page at /.")
    a = ap.add_argument
    a("--data", default="data", help="data folder: reads 02_tokenize/ and 08_export/")
    a("--graph", default="int8", choices=sorted(GRAPHS), help="which KV-cache graph to serve (default int8)")
    a("--host", default="127.0.0.1", help="address to listen on (default loopback; 0.0.0.0: all)")
    a("--port", type=common.number(int, lambda v: 0 <= v < 65536, "a port in [0, 65535]"), default=8000,
      help="port (default 8000; 0 picks a free one)")
    a("--threads", type=common.natural_int, default=0, help="ONNX Runtime threads (0: one per core)")
    return ap.parse_args(argv)


def run(argv=None):
    args = parse_args(argv)
    model = load_model(args.data, args.graph, args.threads)
    try:
        server = make_server(model, args.host, args.port)
    except OSError as e:
        raise UserError(f"--host {args.host} --port {args.port}: {e.strerror}") from None
    print(f"serving {model['name']} at http://{args.host}:{server.server_port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv=None):
    common.main(__file__, run, argv)


if __name__ == "__main__":
    main()
