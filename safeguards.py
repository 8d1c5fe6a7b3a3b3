"""
The safeguards of step 9, as they are deployed: the normaliser, the policy for what it cannot
read, and the n-gram features the guard reads. 07_safety.py trains the guard and tests the whole
system with them; serve.py runs them on every request. Pure Python and the standard library, so
a server runs them without PyTorch.

  user text -> [normaliser] -> [guard on input] -> model -> [guard on output] -> user
                    | cannot read      | flagged                     | flagged
                    +-------------> fixed refusal <------------------+

In: data/safety/english_words.txt, english_bigrams.txt, stopwords.json (the lexicon)
"""
import base64
import binascii
import functools
import itertools
import json
import math
import re
import string
import unicodedata
import urllib.parse
import zlib
from pathlib import Path

SAFETY = Path(__file__).resolve().parent / "data" / "safety"   # the committed prompt data
REFUSAL = "Sorry, I can't help with that. If you are in danger or thinking about harming " \
          "yourself, please contact local emergency services or a crisis line."


# ----------------------------------------------------------------------------- 1. the normaliser
# An attacker hides a request from the guard in a form it cannot read: invisible or look-alike
# characters, an encoding (base64, hex, Morse, a Caesar shift, ...), another language. The
# normaliser works in two parts. First it cleans characters: what renders alike is made alike.
# Then it searches: each decoder proposes readings of spans of the text, and a reading replaces
# its span when it reads as English and the span did not. "Reads as English" is one measure for
# every decoder: the share of its words found in a lexicon (english_words.txt: the words of the
# built-in Wikipedia and Python corpora and of the guard's training requests); between readings
# of the same words, word order decides (the share of word pairs seen in those texts, a bigram
# language model). A new encoding is one more decoder; the judge stays the same.
# Text hidden in plain sight (in tag characters, in the first words of lines, as the last of many
# example questions) is not replaced but added beside the text, to be judged on its own.

WORDS = {w: int(n) for w, n in (line.split() for line in
                                (SAFETY / "english_words.txt").read_text(encoding="utf-8").splitlines())}
BIGRAMS = set((SAFETY / "english_bigrams.txt").read_text(encoding="utf-8").splitlines())
READS = 0.6   # a text "reads as English" when at least this share of its words are English words
ORDERED = 0.25   # ... in English word order when this share of its word pairs are common pairs
                 # (95% of the guard's training requests of six words or more have that)
# Letters of other scripts that look like Latin ones (from Unicode's confusables.txt, UTS #39),
# and small capitals: NFKC keeps them, as they are real letters. Mapping them in every text is
# right for a system that reads English only (see the policy below).
CONFUSABLES = str.maketrans(
    "аеорсхуіѕјһԁԛԝνκοαειρτυχωɑɡıȷɩɪʟɴʀᴀʙᴄᴅᴇғɢʜᴊᴋᴍᴏᴘꜱᴛᴜᴠᴡʏᴢօսհոցАВЕКМНОРСТХУЅІЈΑΒΕΖΗΙΚΜΝΟΡΤΥΧᎪᎬᎻᎢᎳᎷ",
    "aeopcxyisjhdqwvkoaeiptuxwagijiilnrabcdefghjkmopstuvwyzounhgABEKMHOPCTXYSIJABEZHIKMNOPTYXAEHTWM")
# squared, circled and negative letters and regional indicators (🅰, 🇦), which NFKC leaves alone
ENCLOSED = {c + i: 65 + i for c in (0x1F130, 0x1F150, 0x1F170, 0x1F1E6) for i in range(26)}
LEET = {"0": "o", "1": "il", "3": "e", "4": "a", "5": "s", "7": "t", "9": "g", "8": "b", "@": "a",
        "$": "s", "!": "i", "+": "t", "|": "li", "(": "c", "€": "e"}   # a sign may stand for two letters
LEET_STRONG = re.compile(r"[a-z][01345789@$!+|€]+[a-z]", re.I)   # "b0mb", "k!ll"; not "python3", "3d"
MORSE = dict(zip(".- -... -.-. -.. . ..-. --. .... .. .--- -.- .-.. -- -. --- .--. --.- .-. ... - ..- ...- "
                 ".-- -..- -.-- --.. ----- .---- ..--- ...-- ....- ..... -.... --... ---.. ----. .-.-.- --..-- "
                 "..--.. .----. -.-.-- -..-. -.--. -.--.- .-... ---... -.-.-. -...- .-.-. -....- .-..-. .--.-.".split(),
                 "abcdefghijklmnopqrstuvwxyz0123456789.,?'!/()&:;=+-\"@"))


WORD = re.compile("[a-z]+")


def words(text):
    return WORD.findall(text.casefold().replace("'", "").replace("\u2019", ""))


def english(text):
    """The share of the words of `text` that are English words (0 when it has none)."""
    ws = words(text)
    return sum(w in WORDS for w in ws) / len(ws) if ws else 0.0


def fluency(text):
    """The share of the pairs of neighbouring words in `text` that are common words in an order
    English uses (english_bigrams.txt)."""
    ws = words(text)
    return sum(f"{a} {b}" in BIGRAMS for a, b in zip(ws, ws[1:])) / (len(ws) - 1) if len(ws) > 1 else 0.0


def _canonical(text):
    """One space between words, lower case: the form the guard reads."""
    return re.sub(r"\s+", " ", text).strip().casefold()


def clean(text, steps, hidden):
    """Characters that render alike made alike; text hidden in invisible characters appended to
    `hidden`; the name of each step that changed something appended to `steps`."""
    def step(name, new, old):
        if new != old:
            steps.append(name)
        return new

    def reveal(s):
        hidden.append(s)
        return " " + s + " "
    # Tag characters U+E0020..E007E mirror ASCII and render as nothing ("ASCII smuggling"); a
    # run of variation selectors after an emoji can carry any bytes, one selector per byte.
    text = step("tags", re.sub("[\U000E0020-\U000E007E]+",
                               lambda m: reveal("".join(chr(ord(c) - 0xE0000) for c in m.group(0))), text), text)
    text = step("selectors", re.sub("[\uFE00-\uFE0F\U000E0100-\U000E01EF]{4,}", lambda m: reveal(bytes(
        ord(c) - 0xFE00 if ord(c) < 0xFE10 else ord(c) - 0xE0100 + 16 for c in m.group(0)).decode("utf-8", "replace")),
        text), text)
    # Zero-width characters, soft hyphens, bidi controls (category Cf) and control characters:
    # invisible, so deleted; unless they stand between words instead of spaces ("tell\u200bme").
    invisible = lambda c: unicodedata.category(c) == "Cf" or (unicodedata.category(c) == "Cc" and c not in "\n\t\r")
    if re.search(r"[^ -~\n\t\r]", text):   # (printable ASCII has none of them)
        gone, spaced = "".join(c for c in text if not invisible(c)), "".join(" " if invisible(c) else c for c in text)
        text = step("invisible", spaced if english(spaced) > english(gone) + 0.2 else gone, text)
    if not text.isascii():
        text = step("nfkc", unicodedata.normalize("NFKC", text.translate(ENCLOSED)), text)   # ｆｕｌｌ, 𝐛𝐨𝐥𝐝
        text = step("marks", "".join(c for c in unicodedata.normalize("NFKD", text)       # accents, "Zalgo"
                                     if not unicodedata.combining(c)), text)
        text = step("confusables", text.translate(CONFUSABLES), text)
    return text


def leetspeak(text):
    """Leetspeak, word by word (a decoder, and a last pass once encodings are decoded). A word
    with leet signs between its letters ("b0mb") is decoded, to the English word it spells where a
    sign is ambiguous ("1" is i or l). When two words or more are leet, the text is leet
    throughout: every word with a letter is decoded ("7h3"), and so is a word of leet signs
    alone when it spells an English word ("70" = "to")."""
    tokens = {m.group(0): _core(m.group(0)) for m in re.finditer(r"\S*[01345789@$!+|(€]\S*", text)}
    spelt = {core: _spell(core) for core in tokens.values()
             # not a word, an e-mail address, 0x1f, or digits that are not leet ("sha256", a hash)
             if not (core.lower() in WORDS or "@" in core and "." in core or re.fullmatch("0x[0-9a-f]+", core, re.I))}
    spelt = {core: best for core, best in spelt.items() if not re.search("[0-9]", best)}
    letters = [c for c in spelt if re.search("[a-z]", c, re.I)]
    strong = sum(bool(LEET_STRONG.search(c)) or spelt[c] in WORDS for c in letters) >= 2

    def leet(token):
        core = tokens[token]
        if core in spelt and (LEET_STRONG.search(core) or strong and (core in letters or spelt[core] in WORDS)):
            return token.replace(core, spelt[core])
        return token
    return re.sub(r"\S*[01345789@$!+|(€]\S*", lambda m: leet(m.group(0)), text)


def _core(token):
    """The word in a token: without the punctuation around it, unless that punctuation is leet
    too ("(an" = "can", "!f" = "if"; but "this!" ends a sentence and "(see" opens a bracket)."""
    core = token.strip(".,;:?\"')")
    if core.endswith("!") and core.rstrip("!").lower() in WORDS:
        core = core.rstrip("!")
    if core.startswith("(") and _spell(core) not in WORDS:
        core = core.lstrip("(")
    return core


def _spell(core):
    """The decoding of a leet word that is the commonest English word."""
    options = [""]
    for c in core.lower():
        options = [o + x for o in options for x in LEET.get(c, c)][:32]
    return max(options, key=lambda o: WORDS.get(o, 0))


# Each decoder: text -> [(start, end, reading)], its readings of spans that may be encoded.

def _clauses(text, stops=".:;!?\n\"()"):
    """The clauses of `text` that do not read as English, with enough words (four of two
    letters or more) to tell a cipher from chance: one of the 25 Caesar shifts of a clause of
    three short words often reads as English ("pyplot as plt" -> "ajawze ld awe")."""
    return [m for m in re.finditer(rf"[^{re.escape(stops)}]+", text)
            if sum(len(w) > 1 for w in words(m.group(0))) >= 4 and english(m.group(0)) < READS]


def _text(b):
    """Decoded bytes as text, or None when they are not printable UTF-8."""
    try:
        s = b.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return s if s.strip() and sum(c.isprintable() or c in "\n\t" for c in s) >= 0.95 * len(s) else None


SIGN = re.compile("[A-Z0-9]")   # a capital or a digit: a sign that letters may be base64


def base64_readings(text):
    """Base64, standard or URL-safe, with or without padding, whole or split into groups."""
    out = []
    for m in re.finditer(r"[A-Za-z0-9+/_=-]+(?:\s+[A-Za-z0-9+/_=-]+)*", text):
        toks = list(re.finditer(r"\S+", m.group(0)))
        glued = "".join(t.group(0) for t in toks)   # tokens i..j-1 glued: glued[at[i]:at[j]]
        at = [0, *itertools.accumulate(len(t.group(0)) for t in toks)]
        found = None
        for i in range(min(len(toks), 8)):   # the payload may follow a few plain words ...
            sign = SIGN.search(glued, at[i] + 1)   # after the first letter
            for j in range(min(len(toks), i + 64), i, -1):   # ... or come before some
                if not sign or at[j] <= sign.start():
                    break   # no capital or digit: plain words, not an encoding
                s = glued[at[i]:at[j]].rstrip("=").replace("-", "+").replace("_", "/")
                if len(s) < 12 or len(s) % 4 == 1:
                    continue   # too short, or a length no base64 has
                try:
                    r = _text(base64.b64decode(s + "=" * (-len(s) % 4), validate=True))
                except binascii.Error:
                    continue
                if r:
                    found = (m.start() + toks[i].start(), m.start() + toks[j - 1].end(), r)
                    break
            if found:
                out.append(found)
                break
    return out


def hex_readings(text):
    """Bytes as hex: 68656c6c6f, 68 65 6c, \\x68\\x65, 0x68 0x65."""
    out = []
    for m in re.finditer(r"(?:(?:0x|\\x)?[0-9A-Fa-f]{2}[\s,:]*){6,}", text):
        s = re.sub(r"0x|\\x" if re.match(r"0x|\\x", m.group(0)) else "^$", "", m.group(0))
        s = re.sub(r"[\s,:]", "", s)
        r = _text(bytes.fromhex(s)) if len(s) % 2 == 0 else None
        if r:
            out.append((m.start(), m.end(), r))
    return out


def url_readings(text):
    """Percent-encoding: %68%6F%77."""
    return [(m.start(), m.end(), urllib.parse.unquote_plus(m.group(0)))
            for m in re.finditer(r"\S*%[0-9A-Fa-f]{2}\S*%[0-9A-Fa-f]{2}\S*", text)]


def morse_readings(text):
    """International Morse: letters apart by a space, words by a slash, a bar or a wide gap."""
    out = []
    for m in re.finditer(r"[.\-_·−–/| ]{8,}", text):
        code = m.group(0).translate(str.maketrans("_·−–", "-.--"))
        r = " ".join("".join(MORSE.get(c, "?") for c in w.split()) for w in re.split(r"\s*[/|]\s*|\s{3,}", code.strip()))
        if r.count("?") < len(r) / 4:
            out.append((m.start(), m.end(), r))
    return out


_a = string.ascii_lowercase
SHIFTS = [str.maketrans(_a + _a.upper(), _a[k:] + _a[:k] + (_a[k:] + _a[:k]).upper()) for k in range(26)]


def _shift(s, k):
    return s.translate(SHIFTS[k])


def caesar_readings(text):
    """Every Caesar shift (ROT13 is one of them): the one under which the clauses that are not
    English read most as English, applied to each of them (a message has one key)."""
    clauses = _clauses(text)
    if not clauses:
        return []
    k = max(range(1, 26), key=lambda k: english(_shift(" ".join(m.group(0) for m in clauses), k)))
    return [(m.start(), m.end(), _shift(m.group(0), k)) for m in clauses]


def reversed_readings(text):
    """Characters reversed, word order reversed, each word reversed; the word order also of
    clauses whose words are English but whose order is not (six words or more)."""
    stops = ":\n\"()<>[]{}|"
    clauses = [m for m in re.finditer(rf"[^{re.escape(stops)}]+", text)
               if len(m.group(0).split()) >= 6 and fluency(m.group(0)) < 0.3] + _clauses(text, stops)
    return [(m.start(), m.end(), r) for m in clauses for s in (m.group(0),)
            for r in (s[::-1], " ".join(s.split()[::-1]), " ".join(w[::-1] for w in s.split()))]


def piglatin_readings(text):
    """Pig latin ("owhay otay" = "how to"): a word's leading consonants moved to its end before
    "ay" ("way" after a vowel). Each word may be several English words ("owhay": how or who);
    the sequence chosen is the most probable under the bigram model (Viterbi)."""
    def options(w):
        stem = w[:-2]
        out = [stem[-k:] + stem[:-k] for k in (1, 2, 3) if len(stem) > k and stem[-k] not in "aeiou"]
        out += [stem[:-1]] if stem.endswith(("w", "y", "h")) else []
        return (out or [stem]) if w.endswith("ay") else []

    def unpig(ws):
        best = {"": (0.0, [])}   # last word -> (log score, words so far)
        for w in ws:
            best = {o: max((sc + math.log(WORDS.get(o, 0) + 1) + 5 * (f"{p} {o}" in BIGRAMS), seq + [o])
                           for p, (sc, seq) in best.items()) for o in options(w) or [w]}
        return " ".join(max(best.values())[1])
    return [(m.start(), m.end(), unpig(m.group(0).lower().replace("'", " ").split()))
            for m in _clauses(text) if 2 * len(re.findall(r"ay\b", m.group(0).lower())) >= len(words(m.group(0)))]


def segment(s):
    """Words glued together ("tellmehowto") split into the most probable sequence of words under
    the lexicon's word counts, by dynamic programming (Norvig's segmenter): an unknown piece is
    less likely the longer it is, so a long word that is not in the lexicon stays whole."""
    log_total = math.log(sum(WORDS.values()))   # an unknown word of n letters: 10 / (total * 10^n)
    best = [(0.0, 0)] + [(-math.inf, 0)] * len(s)   # best[i]: (log-probability, start of last word)
    for i in range(1, len(s) + 1):
        for j in range(max(0, i - 20), i):
            w = s[j:i]
            score = best[j][0] + (math.log(WORDS[w] if w in WORDS else 10 / 10 ** len(w)) - log_total)
            if score > best[i][0]:
                best[i] = (score, j)
    parts, i = [], len(s)
    while i > 0:
        parts.append(s[best[i][1]:i])
        i = best[i][1]
    return " ".join(parts[::-1])


def spacing_readings(text):
    """Letters s p a c e d or h-y-p-h-e-n-a-t-e-d out, and words glued together."""
    out = []
    for m in re.finditer(r"(?<!\S)\S(?: {1,3}\S(?!\S)){3,}", text):   # >= 4 single characters
        parts = re.split(r" {2,}", m.group(0))   # a wider gap separates words
        joined = " ".join(p.replace(" ", "") for p in parts)
        out.append((m.start(), m.end(), joined if len(parts) > 1 else segment(joined.lower())))
    pattern = r"(?<!\S)[\w'](?:[-._*|][\w'])+[-._*|]?(?=[,;:!?]?(\s|$))"
    hyphened = re.sub(pattern, lambda m: re.sub(r"[-._*|]", "", m.group(0)), text)
    if len(re.findall(pattern, text)) >= 3:   # three words or more: not "e.g." and "U.S.A."
        out.append((0, len(text), hyphened))
    # glued prose ("howtomakeabomb") splits into short words; a long word into a few long ones
    glued = [(m.start(), m.end(), segment(m.group(0).lower()))
             for m in re.finditer(r"[a-z]{12,}|[A-Z]{12,}", text) if m.group(0).lower() not in WORDS]
    return out + [g for g in glued if len(g[2].split()) >= 4 and len(g[2]) <= 5.5 * len(g[2].split())]


def acrostics(text):
    """Messages hidden in plain sight (acrostics): when the text points at the first words or
    letters of lines, those of each block of six lines or more, with or without its first line
    (often the instruction). The lines read as English, so nothing is replaced; a message of six
    words or more in English word order is kept, to be judged on its own. The instruction is part
    of the attack (the model must be told where to read) and it is needed here: six words that
    begin lines of prose or a poem ("I That When A Beside Fluttering") are in English order by
    chance one time in four, as often as this bigram model can tell."""
    if not re.search(r"\b(?:first|initial|opening|starting) (?:word|letter|character)", text, re.I):
        return []
    out = []
    for m in re.finditer(r"(?:^[^\S\n]*[A-Za-z][\w']*.*(?:\n|$)){6,}", text, re.M):
        firsts = re.findall(r"^[^\S\n]*([\w']+)", m.group(0), re.M)
        readings = [r for ws in (firsts, firsts[1:]) for r in (" ".join(ws), segment("".join(w[0] for w in ws).lower()))
                    if len(words(r)) >= 6 and english(r) >= READS]
        best = max(readings, key=fluency, default="")
        if best and fluency(best) >= ORDERED:
            out.append(best)
    return out


def last_request(text):
    """The last user line of a transcript of example exchanges (three user lines or more, each
    but the last answered: "Q: ... A: ...", "User: ... Assistant: ..."): the request the model is
    asked to answer. A many-shot prompt buries it among harmless examples, whose words would
    outweigh its own if only the whole text were judged."""
    asks = re.findall(r"^[^\S\n]*(?:user|human|q|question)[^\S\n]*:[^\S\n]*(.+)$", text, re.M | re.I)
    answers = re.findall(r"^[^\S\n]*(?:assistant|ai|a|answer|bot)[^\S\n]*:", text, re.M | re.I)
    return asks[-1:] if len(asks) >= 3 and len(answers) >= len(asks) - 1 else []


DECODERS = {"leetspeak": lambda text: [(0, len(text), leetspeak(text))], "base64": base64_readings, "hex": hex_readings, "url": url_readings, "morse": morse_readings,
            "caesar": caesar_readings, "reversed": reversed_readings, "pig_latin": piglatin_readings,
            "spacing": spacing_readings}
LAYERED = {"base64", "hex", "url"}   # their output may itself be encoded: base64 of base64


def normalize(text, steps=None, payloads=None):
    """The text as the guard should read it: cleaned, each encoded span replaced by its most
    English reading; returns the canonical (lower-case) text. The names of the steps that changed
    something are appended to `steps` when a list is passed, and what was hidden or encoded,
    decoded and normalised, to `payloads`."""
    out, more_steps, more_payloads = _read(text, 0)
    if steps is not None:
        steps += more_steps
    if payloads is not None:
        payloads += more_payloads
    return out


@functools.lru_cache(maxsize=1 << 16)   # the guard reads each turn of a dialogue several times
def _read(text, depth):
    """normalize(), as (text, steps, payloads)."""
    steps, payloads, hidden = [], [], []
    text = clean(text, steps, hidden)
    # judged on their own too, like hidden characters: an acrostic's message, a transcript's request
    for name, found in (("acrostic", acrostics(text)), ("last_request", last_request(text))):
        hidden += found
        steps += [name] * bool(found)
    payloads += [_read(h, depth + 1)[0] for h in hidden]
    score = lambda t: english(t) + fluency(t)
    for _ in range(8):   # rounds: the decoder whose best reading gains most has its readings applied
        found = {}
        for name, propose in DECODERS.items():
            for s, e, reading in propose(text):
                if name in LAYERED and depth < 3:
                    reading = _read(reading, depth + 1)[0]
                # a byte encoding decodes exactly, so its reading is taken if it reads as English;
                # the other decoders guess, and a guess must read better than the span did
                gain = score(reading) - score(text[s:e])
                if english(reading) >= READS and (gain > 0.2 or name in LAYERED and reading != text[s:e]):
                    found.setdefault(name, []).append((gain, s, e, reading))
        if not found:
            break
        name = max(found, key=lambda n: (n in LAYERED, max(found[n])[0]))   # exact first
        steps.append(name)
        end = len(text)
        for _, s, e, reading in sorted(found[name], key=lambda x: (-x[2], -x[0])):   # from the end
            if e <= end:   # spans that overlap one already taken are proposed again next round
                payloads.append(_canonical(reading))
                # a space between the reading and what stands beside it, but not before punctuation
                left = "" if s == 0 or text[s - 1] in " \n\t(\"'" else " "
                right = "" if text[e:e + 1] in ("", " ", "\n", "\t") or text[e] in ".,;:!?)\"'" else " "
                text, end = text[:s] + left + reading + right + text[e:], s
    new = leetspeak(text)
    if new != text:
        steps.append("leetspeak")
    return _canonical(new), tuple(steps), tuple(payloads)


# ----------------------------------------------------------------------------- 2. the policy
# The policy for what the system cannot read. The guard was taught English; a request in another
# language, or one whose letters no decoder turns into English, would reach the model unjudged.
# So the deployed system refuses both, and says why. It is counted like any other refusal: a
# harmful request refused this way is an attack stopped, a benign one is an over-refusal.
# the commonest words of six other languages, leaving out those that are English words too ("die")
STOPWORDS = {k: set(v) for k, v in json.loads((SAFETY / "stopwords.json").read_text(encoding="utf-8")).items()}


def unsupported(text):
    """Why the system will not read this (normalised) text, or None: "language" when clauses in
    another language (two of its commonest words or more, most words not English) make up a third
    of the words; "unreadable" when most words of three letters or more are not English."""
    ws = words(text)
    foreign = 0
    for clause in re.split(r"[.:;!?\n\"«»()]", text):
        cw = words(clause)
        hits = max(sum(w in sw for w in cw) for sw in STOPWORDS.values()) if len(cw) >= 4 else 0
        if hits >= 2 and hits >= len(cw) / 6 and english(clause) < 0.5:
            foreign += len(cw)
    if ws and foreign >= len(ws) / 3:
        return "language"
    long = [w for w in ws if len(w) >= 3]
    if len(long) >= 4 and sum(w not in WORDS for w in long) > len(long) / 2:
        return "unreadable"
    return None


def refused_by_policy(turns):
    """The reason the policy refuses the first user turn it cannot read, or None."""
    return next((u for u in map(unsupported, map(normalize, turns)) if u), None)


# ----------------------------------------------------------------------------- 3. what the guard reads

def guard_views(turns, window):
    """What the guard reads for a (partial) conversation: the newest `window` user turns,
    normalised and joined, so a request split across turns is judged as one; then, each on its
    own, the payloads the normaliser decoded. What an attacker hid (tag characters, base64,
    ROT13) is what they want the model to act on, so it is judged without the innocent text
    they wrapped it in ("Hi! Lovely day." + a hidden request); the text is flagged when any
    view is."""
    payloads = []
    return ["\n".join(normalize(t, payloads=payloads) for t in turns[-window:])] + payloads


# The guard's features: the hashed words and pairs of words of a text (the hashing trick: each
# n-gram indexes one of NGRAM_BUCKETS weights of the guard, and a text's logit is the sum of its
# n-grams' weights, so no vocabulary is stored). serve.py hashes with this same function.
NGRAM_BUCKETS = 1 << 20


def ngram_buckets(text):
    """The sorted buckets of the distinct words and word pairs of `text`."""
    ws = re.findall(r"[a-z0-9']+", text.lower())
    return sorted({zlib.crc32(g.encode()) % NGRAM_BUCKETS for g in ws + [f"{a} {b}" for a, b in zip(ws, ws[1:])]})
