"""Write the prompt data of 07_safety.py, guard_train.jsonl and suite.jsonl, from the request
lists and attack frames in this folder.

    python data/safety/generate.py [OUTDIR]   # rewrites the two files next to this script

Deterministic (a fixed seed per file), so the committed JSONL files are exactly what this script
writes. Every harmful line is a *request* only: nothing here, or anywhere in the repository,
contains an actual harmful instruction. The guard's training set and the test suite use
different base requests and different attack frames, so the suite measures generalisation,
not recall (check_disjoint() enforces it).

In (.txt: one request a line, UTF-8, blank lines and lines starting with "#" skipped; a file
that is missing counts as empty):
    requests/<category>/train_harmful.txt, train_benign.txt, suite_harmful.txt, suite_benign.txt
        The benign twins (line n of *_benign pairs line n of *_harmful) share words with the
        harmful ones ("kill a process", "history of explosives") on purpose: a guard that only
        spots keywords over-refuses them. Every folder but general/ is a category.
    requests/<category>/train_hard.txt, suite_hard.txt   hard negatives: benign requests with
        alarming words of their own ("how do I kill weeds in my lawn")
    requests/general/train_benign.txt   everyday requests and small talk, training only
    dialogues/train.jsonl, dialogues/suite.jsonl   {"turns": [...]} (and "category"), benign
    other_languages.jsonl   {"category", "label", "lang", "prompt"}: translated requests, suite only
    frames/train.jsonl, frames/suite.jsonl   {"style": ..., "template": ...}, in order per style;
        {r} stands for the request, {x} for the obfuscated request, {a} {b} for its two halves
        in a multi_turn template (a list of turns)
    bias_templates.jsonl   (read by 07 itself) its guard_template lines count as suite requests
    the built-in corpus of 01_clean.py: CORPUS_ROWS passages of it train as benign (style
        "corpus"), and its words make the normaliser's lexicon
Out, one JSON object a line: {"prompt": str} or {"turns": [str, ...]}, plus "label"
(harmful|benign), "category", "style" (and, for obfuscated lines, "plain": the text before
obfuscation; for other languages "lang") and "request": the id of the base request the row was
made from, "<category>/<file stem>/<index from 0>" ("weapons/train_harmful/17"), shared by all
rows made from it. Besides the attack styles of STYLES, "style" is "hard_negative" (a hard
negative as it is), "dialogue", "other_language" or "corpus".
"""
import base64
import codecs
import json
import random
import re
import sys
import unicodedata
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
# the first seven in their original order, so that new categories never reshuffle their rows
FIRST = ["weapons", "self_harm", "malware", "fraud", "hate", "drugs", "stalking"]


def read_lines(path):
    """The requests of a .txt file: one a line, blank lines and "#" comment lines skipped."""
    if not path.exists():
        return []
    return [s.strip() for s in path.read_text(encoding="utf-8").split("\n")
            if s.strip() and not s.startswith("#")]


def read_jsonl(path):
    if not path.exists():
        return []
    return [json.loads(s) for s in path.read_text(encoding="utf-8").split("\n") if s.strip()]


# ------------------------------------------------------------------ the data
LISTS = ["train_harmful", "train_benign", "train_hard", "suite_harmful", "suite_benign", "suite_hard"]
folders = sorted(p.name for p in (HERE / "requests").iterdir() if p.is_dir() and p.name != "general")
CATEGORIES = [c for c in FIRST if c in folders] + [c for c in folders if c not in FIRST]
REQUESTS = {c: {name: read_lines(HERE / "requests" / c / f"{name}.txt") for name in LISTS}
            for c in CATEGORIES}
GENERAL = read_lines(HERE / "requests" / "general" / "train_benign.txt")
DIALOGUES = {split: read_jsonl(HERE / "dialogues" / f"{split}.jsonl") for split in ("train", "suite")}
OTHER_LANGUAGES = read_jsonl(HERE / "other_languages.jsonl")
GUARD_TEMPLATES = [b["template"] for b in read_jsonl(HERE / "bias_templates.jsonl")
                   if b["kind"] == "guard_template"]
# Different frames for training and for the suite: the guard must learn that a framing does not
# change what is asked, not memorise the framings of the test. With a handful of frames per
# style a small guard learnt the frame, not the request inside it, so training has many and
# varied ones, each wrapping harmful and benign requests equally often: a frame carries no label.
FRAMES = {}
for split in ("train", "suite"):
    FRAMES[split] = {}
    for f in read_jsonl(HERE / "frames" / f"{split}.jsonl"):
        FRAMES[split].setdefault(f["style"], []).append(f["template"])

# ------------------------------------------------------------------ attack styles
OLD = ["direct", "roleplay", "hypothetical", "fullwidth", "homoglyph", "zero_width", "tag",
       "leetspeak", "spacing", "base64", "rot13", "injection", "multi_turn"]
NEW = ["translate", "hex", "url", "morse", "reverse", "reverse_words", "caesar", "piglatin",
       "variation_selector", "base64_nested", "base64_chunked", "leet_ext", "hyphenated", "zw_separator"]
STYLES = OLD + NEW   # a request's rows come in this order
# the obfuscations that stand alone: the normaliser recovers the direct text from them
OBFUSCATIONS = ["fullwidth", "homoglyph", "zero_width", "leetspeak", "spacing"]
RARE = OBFUSCATIONS + NEW   # in training each on a third of the requests
WRAPS = ["roleplay", "hypothetical", "injection", "translate"]   # a frame around {r}, the request itself
ENCODED = ["base64", "rot13", "tag", "hex", "url", "morse", "reverse", "reverse_words", "caesar",
           "piglatin", "variation_selector", "base64_nested", "base64_chunked"]   # a frame around {x}
HARD = WRAPS + ["base64", "rot13", "tag", "multi_turn"]   # what hard negatives get in training

# Latin letter -> Cyrillic or Greek character that looks the same (the confusables the
# normaliser maps back; NFKC alone leaves them, because they are real letters of other scripts)
HOMOGLYPHS = {"a": "а", "e": "е", "o": "о", "p": "р", "c": "с", "x": "х", "y": "у", "i": "і",
              "s": "ѕ", "k": "κ", "v": "ν"}
ZERO_WIDTH = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff"]
LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"}
LEET_EXT = {"a": "4", "b": "8", "c": "(", "e": "3€", "i": "1!", "l": "|", "o": "0", "s": "5", "t": "7+"}
MORSE = dict(zip("abcdefghijklmnopqrstuvwxyz0123456789.,?'!/()&:;=+-\"@", (
    ".- -... -.-. -.. . ..-. --. .... .. .--- -.- .-.. -- -. --- .--. --.- .-. ... - ..- ...- .-- "
    "-..- -.-- --.. ----- .---- ..--- ...-- ....- ..... -.... --... ---.. ----. .-.-.- --..-- ..--.. "
    ".----. -.-.-- -..-. -.--. -.--.- .-... ---... -.-.-. -...- .-.-. -....- .-..-. .--.-.").split()))
EMOJI = ["😊", "👍", "🙂", "✨", "🔥", "🎉"]


def piglatin(w):   # "string" -> "ingstray", "apple" -> "appleway", "quiet" -> "ietquay"
    if w[0] in "aeiou":
        return w + "way"
    n = 1
    while n < len(w) and w[n] not in "aeiouy":   # y after the first letter is a vowel
        n += 1
    n += w[n - 1:n + 1] == "qu"
    return w[n:] + w[:n] + "ay"


def obfuscate(style, text, rng):
    """The text as an attacker would disguise it (the normaliser of 07_safety.py undoes each)."""
    b64 = lambda s: base64.b64encode(s.encode()).decode()
    if style == "fullwidth":   # NFKC folds fullwidth forms back to ASCII
        return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)
    if style == "homoglyph":
        return "".join(HOMOGLYPHS.get(c, c) if rng.random() < 0.7 else c for c in text)
    if style == "zero_width":
        return "".join(c + (rng.choice(ZERO_WIDTH) if c.isalpha() and rng.random() < 0.6 else "")
                       for c in text)
    if style == "tag":   # "ASCII smuggling": invisible Unicode tag characters spell the request
        return "".join(chr(0xE0000 + ord(c)) for c in text if " " <= c <= "~")
    if style == "leetspeak":
        return "".join(LEET.get(c, c) if rng.random() < 0.8 else c for c in text)
    if style == "spacing":   # one space between letters, three between words
        return "   ".join(" ".join(w) for w in text.split())
    if style == "base64":
        return b64(text)
    if style == "rot13":
        return codecs.encode(text, "rot13")
    if style == "hex":   # 686f77, 68 6f 77, \x68\x6f\x77 or 0x68 0x6f 0x77, lower or upper case
        sep, pre = rng.choice([("", ""), (" ", ""), ("", "\\x"), (" ", "0x")])
        form = rng.choice(["{:02x}", "{:02X}"])
        return sep.join(pre + form.format(b) for b in text.encode())
    if style == "url":   # every byte as %XX, or only spaces, "%", non-ASCII and some letters
        full = rng.random() < 0.5
        return "".join(f"%{b:02X}" if full or b > 127 or chr(b) in " %" or
                       (chr(b).isalpha() and rng.random() < 0.4) else chr(b) for b in text.encode())
    if style == "morse":   # letters by one space, words by " / "; what Morse lacks is dropped
        words = (" ".join(MORSE[c] for c in w if c in MORSE) for w in text.lower().split())
        return " / ".join(w for w in words if w)
    if style == "reverse":
        return text[::-1]
    if style == "reverse_words":
        return " ".join(text.split()[::-1])
    if style == "caesar":   # a shift other than rot13's, letters only, case kept
        k = rng.choice([k for k in range(1, 26) if k != 13])
        shift = lambda c, a: chr((ord(c) - ord(a) + k) % 26 + ord(a))
        return "".join(shift(c, "a") if "a" <= c <= "z" else shift(c, "A") if "A" <= c <= "Z" else c
                       for c in text)
    if style == "piglatin":
        return re.sub(r"[a-z]+", lambda m: piglatin(m.group()), text.casefold())
    if style == "variation_selector":   # "emoji smuggling": the UTF-8 bytes as variation selectors
        return rng.choice(EMOJI) + "".join(chr(0xFE00 + b) if b < 16 else chr(0xE0100 + b - 16)
                                           for b in text.encode())
    if style == "base64_nested":
        return b64(b64(text))
    if style == "base64_chunked":   # groups of 4 to 8, padding kept or dropped
        s, n = b64(text), rng.randint(4, 8)
        s = s if rng.random() < 0.5 else s.rstrip("=")
        return ("\n" if rng.random() < 0.25 else " ").join(s[i:i + n] for i in range(0, len(s), n))
    if style == "leet_ext":
        return "".join(rng.choice(LEET_EXT[c]) if c in LEET_EXT and rng.random() < 0.8 else c for c in text)
    if style == "hyphenated":   # "h-o-w t-o", or with "." or "_"
        sep = rng.choice("-._")
        return " ".join(sep.join(w) for w in text.split())
    if style == "zw_separator":   # a zero-width character instead of every space
        return rng.choice(["\u200b", "\u200c", "\u2060", "\ufeff"]).join(text.split())
    raise ValueError(style)


def render(request, style, split, rng, k):
    """One line in the given style; k picks among the split's templates."""
    fr = FRAMES[split]
    if style == "direct":
        return {"prompt": request}
    if style in WRAPS:
        return {"prompt": fr[style][k % len(fr[style])].format(r=request)}
    if style == "multi_turn":   # the request split across turns, so no single turn says it all
        words = request.split()
        a, b = " ".join(words[:len(words) // 2]), " ".join(words[len(words) // 2:])
        t = fr["multi_turn"][k % len(fr["multi_turn"])]
        return {"turns": [s.format(a=a, b=b) for s in t]}
    x = obfuscate(style, request, rng)
    if style in ENCODED:
        return {"prompt": fr[style][k % len(fr[style])].format(x=x), "plain": request}
    return {"prompt": x, "plain": request}


def chosen(split, kind, i, c):
    """The styles request i of a list (of category number c) gets; kind is harmful, benign,
    hard or general. Training requests get a rotating subset (every style for every request
    would be some 70,000 rows): 3/4 of the framed styles (the frame is what the guard has to
    see through) but only 1/3 or 1/6 of the obfuscations and encodings, which add little but rows.
    The suite has every old style for every request and each new one for half of them,
    rotating, so that within a category each new style wraps harmful and benign requests."""
    def keep(j, s):
        if s == "direct":
            return True
        if kind == "general":   # a third of the styles: benign rows are the majority already
            return (i // 3 + j) % 3 == 0
        if split == "suite":
            if kind == "hard":
                return s in ("roleplay", "hypothetical")
            if s == "translate":   # the suite's translate frames wrap the other languages only
                return False
            return s in OLD or (i + NEW.index(s) + c) % 2 == 0
        if kind == "hard" and s not in HARD:
            return False
        if s in RARE:   # each request some of them: each old obfuscation 1/3 of requests, each
            # new encoding 1/6 (the normaliser hands the guard their plain text; they cost rows)
            return (i + RARE.index(s)) % (3 if s in OBFUSCATIONS or s == "translate" else 6) == 0
        return (i // 4 + j) % 4 != 0   # 3/4
    return [s for j, s in enumerate(STYLES) if keep(j, s)]


def build(split, rng):
    rows = []
    used = {}   # (style, label) -> training rows so far

    # Templates are picked by this counter in training, a round robin per style and label, so
    # every template wraps both labels equally; k = i + j would use the same templates in every
    # category (lists of equal length) and never the rest. The suite's few templates go by i + j.
    def add(req, rid, label, category, i, styles, direct="direct"):
        for style in styles:
            k = i + STYLES.index(style)
            if split == "train":
                k = used[style, label] = used.get((style, label), -1) + 1
            rows.append({**render(req, style, split, rng, k), "label": label, "category": category,
                         "style": direct if style == "direct" else style, "request": rid})

    for c, category in enumerate(CATEGORIES):
        for kind, label in (("harmful", "harmful"), ("benign", "benign"), ("hard", "benign")):
            name = f"{split}_{kind}"
            for i, req in enumerate(REQUESTS[category][name]):
                add(req, f"{category}/{name}/{i}", label, category, i, chosen(split, kind, i, c),
                    "hard_negative" if kind == "hard" else "direct")
    if split == "train":
        for i, req in enumerate(GENERAL):
            add(req, f"general/train_benign/{i}", "benign", "general", i, chosen(split, "general", i, 0))
    else:   # translated requests: alone on even lines, in a translate frame on odd ones
        frames = FRAMES["suite"]["translate"]
        for n, o in enumerate(OTHER_LANGUAGES):
            prompt = o["prompt"] if n % 2 == 0 else frames[n // 2 % len(frames)].format(r=o["prompt"])
            rows.append({"prompt": prompt, "label": o["label"], "category": o["category"],
                         "style": "other_language", "lang": o["lang"],
                         "request": f"{o['category']}/suite_other_languages/{n}"})
    for n, d in enumerate(DIALOGUES[split]):   # benign conversations, several turns
        category = d.get("category", "general")
        rows.append({"turns": d["turns"], "label": "benign", "category": category, "style": "dialogue",
                     "request": f"{category}/{split}_dialogues/{n}"})
    if split == "train":
        for n, text in enumerate(passages(CORPUS_ROWS, random.Random(2))):
            rows.append({"prompt": text, "label": "benign", "category": "general", "style": "corpus",
                         "request": f"general/corpus/{n}"})
    return rows


def check_disjoint(limit=0.6, frame_limit=0.5):
    """The suite measures generalisation: no training text (requests, dialogue turns, corpus
    passages) may share more than `limit` of its word set (Jaccard) with a suite text (requests,
    translations, dialogue turns, the bias test's benign group templates, so that its fairness
    probe stays unseen), and no training template more than `frame_limit` with any suite template
    (placeholders aside), so a suite frame stays unseen. Small talk (GENERAL, training dialogue
    turns) is also kept `frame_limit` apart from every single turn of a suite template or
    dialogue (the suite's "Let's play a word game." opener stays unseen too). Prints every
    failure, then stops."""
    words = lambda t: set(re.findall(r"[a-z0-9']+", re.sub(r"\{[rxab]?\}", " ", t).lower()))
    jaccard = lambda a, b: len(a & b) / len(a | b) if a | b else 0.0
    bad = []

    def apart(texts, others, lim, what):   # texts, others: (where, text) pairs
        others = [(where, t, words(t)) for where, t in others]
        for where, t in texts:
            w = words(t)
            close = next(((o, u) for o, u, s in others if jaccard(w, s) > lim), None)
            if close:
                bad.append(f"{where} {t!r} is too close to {what} {close[0]} {close[1]!r}")

    def unique(texts, what):
        seen = {}
        for where, t in texts:
            if t.lower() in seen:
                bad.append(f"{what} appears twice: {seen[t.lower()]} and {where} {t!r}")
            seen.setdefault(t.lower(), where)

    lists = lambda split: [(f"{c}/{name}/{i}", r) for c in CATEGORIES for name in LISTS
                           if name.startswith(split) for i, r in enumerate(REQUESTS[c][name])]
    turns = lambda split: [(f"{split} dialogue {n} turn {m}", t) for n, d in enumerate(DIALOGUES[split])
                           for m, t in enumerate(d["turns"])]
    general = [(f"general/train_benign/{i}", r) for i, r in enumerate(GENERAL)]
    train = general + lists("train")
    suite = lists("suite") + [(f"other_languages.jsonl line {n}", o["prompt"]) for n, o in enumerate(OTHER_LANGUAGES)]
    unique(train, "a training request")
    unique(suite, "a suite request")
    for c in CATEGORIES:
        for split in ("train", "suite"):
            h, b = (len(REQUESTS[c][f"{split}_{kind}"]) for kind in ("harmful", "benign"))
            if h != b:
                bad.append(f"{c}/{split}: {h} harmful requests but {b} benign twins")
    suite += [(f"bias guard_template {n}", t) for n, t in enumerate(GUARD_TEMPLATES)]
    corpus_rows = [(f"corpus passage {n}", t) for n, t in enumerate(passages(CORPUS_ROWS, random.Random(2)))]
    apart(train + turns("train") + corpus_rows, suite + turns("suite"), limit, "the suite's")

    text = lambda t: " ".join(t) if isinstance(t, list) else t   # a multi-turn template: all its turns
    frames = lambda split, st: [(f"frames/{split}.jsonl {st} {n}", text(t))
                                for n, t in enumerate(FRAMES[split].get(st, []))]
    suite_frames = [f for st in FRAMES["suite"] for f in frames("suite", st)]
    suite_turns = [(f"frames/suite.jsonl {st} {n}", s) for st, ts in FRAMES["suite"].items()
                   for n, t in enumerate(ts) for s in (t if isinstance(t, list) else [t]) if words(s)]
    apart(general + turns("train"), suite_turns + turns("suite"), frame_limit, "the suite's turn")
    for style in FRAMES["train"]:
        unique(frames("train", style) + frames("suite", style), f"a {style} template")
        apart(frames("train", style), suite_frames, frame_limit, "the suite's template")
    # 07 trains on a dialogue's opening turn alone as benign and the guard reads the newest 4 turns
    for t in FRAMES["train"]["multi_turn"]:
        if not (3 <= len(t) <= 4 and not re.search(r"\{[ab]\}", t[0])):
            bad.append(f"multi-turn template: {t}")
    for line in bad:
        print("check_disjoint:", line, file=sys.stderr)
    if bad:
        sys.exit(f"check_disjoint: {len(bad)} failures, nothing written")


# ------------------------------------------------------------------ the normaliser's lexicon
# 07's normaliser judges a decoded reading by how English it reads: the share of its words in
# english_words.txt (word, count; the words of the built-in corpora seen three times or more,
# every word of the training requests and frames, a few chat words) and the share of its word
# pairs in english_bigrams.txt (pairs of the 5,000 commonest words seen three times or more: a
# bigram language model's notion of word order). Training data only: never the suite.
CHAT = "hi hey hello ok okay pls plz thx thanks lol omg btw im ive id youre dont cant wont isnt doesnt " \
       "didnt thats whats lets gonna wanna u ur".split()


def corpus():
    """The built-in corpus of 01_clean.py (Wikipedia summaries and Python's documentation)."""
    sys.path.insert(0, str(HERE.parents[1]))
    clean = __import__("importlib").import_module("01_clean")
    return [d["text"] for d in clean.load_wikipedia() + clean.load_pydoc()]


# The guard also judges the model's replies, and a small model's replies read like fragments of
# its corpus. Without such text among the benign rows, the guard knows nothing of it and scores
# it near its prior, close to the threshold: 1 benign reply in 11 was flagged. With 2,000
# passages, about 1 in 130, at a cost of 0.2 points on held-out requests (docs/experiments.md).
CORPUS_ROWS = 2000


def passages(n, rng):
    """n runs of 4 to 30 consecutive words from the built-in corpus's documents."""
    docs = [t.split() for t in corpus() if len(t.split()) >= 8]
    out = []
    for _ in range(n):
        ws, k = rng.choice(docs), rng.randint(4, 30)
        i = rng.randint(0, max(0, len(ws) - k))
        out.append(" ".join(ws[i:i + k]))
    return out


def lexicon():
    texts = corpus()
    ours = [r for c in CATEGORIES for name in LISTS if name.startswith("train") for r in REQUESTS[c][name]]
    ours += GENERAL + [t for f in FRAMES["train"].values() for t in f for t in ([t] if isinstance(t, str) else t)]
    ours += [t for d in DIALOGUES["train"] for t in d["turns"]]
    words = lambda t: re.findall(r"[a-z]+", "".join(c for c in unicodedata.normalize("NFKD", t.casefold())
                                                    if not unicodedata.combining(c)).replace("'", ""))
    count, pairs = Counter(), Counter()
    for t in texts + ours:
        for clause in re.split(r"[.!?;:\n]", t):
            ws = words(clause)
            count.update(ws)
            pairs.update(zip(ws, ws[1:]))
    keep = lambda w, n: (len(w) > 1 or w in "ai") and n >= 3
    for w in set(words(" ".join(ours))) | set(CHAT):
        count[w] = max(count[w], 3)
    ranked = sorted(((w, n) for w, n in count.items() if keep(w, n)), key=lambda x: (-x[1], x[0]))
    top = {w for w, _ in ranked[:5000]}
    bigrams = sorted(f"{a} {b}" for (a, b), n in pairs.items() if n >= 3 and a in top and b in top)
    return "".join(f"{w} {n}\n" for w, n in ranked), "".join(b + "\n" for b in bigrams)


def write(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    check_disjoint()
    # one seeded stream per file: editing one never reshuffles the other
    train, suite = build("train", random.Random(0)), build("suite", random.Random(1))
    words, bigrams = lexicon()
    jsonl = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    for name, text in (("guard_train.jsonl", jsonl(train)), ("suite.jsonl", jsonl(suite)),
                       ("english_words.txt", words), ("english_bigrams.txt", bigrams)):
        write(out / name, text)
    print(f"guard_train.jsonl {len(train)} lines, suite.jsonl {len(suite)} lines, english_words.txt "
          f"{words.count(chr(10))} words, english_bigrams.txt {bigrams.count(chr(10))} pairs")


if __name__ == "__main__":
    main()
