"""Clean a dataset: normalize text, redact PII, filter by length and language, drop exact and near duplicates.

Contract: :func:`clean` takes rows of one shape and :class:`CleanOptions` and returns ``(new_rows, report)``; the
input rows are never mutated. Every string field of the row's shape (text; prompt and completion; each message's
content) goes through, in order and each step only when enabled: HTML stripping (stdlib ``html.parser``; script and
style content dropped, entities unescaped), control-character removal (C0/C1 controls except tab and newline), NFKC
normalization, whitespace normalization (runs of spaces collapsed, trailing spaces and more than one blank line
removed, ends stripped) and PII redaction (emails -> ``[EMAIL]``, phone numbers -> ``[PHONE]``, API keys and tokens
-> ``[SECRET]``). Rows are then dropped, first reason wins: ``empty`` (a text, prompt, completion or user/assistant
message is empty; empty system messages are removed instead), ``too_short`` / ``too_long`` (total characters of the
shape fields outside ``[min_chars, max_chars]``), ``language`` (only when ``languages`` is set: the detected language
is not listed; rows under 20 characters are kept because detection is unreliable there, and "unknown" may be listed
to keep undetectable rows), ``duplicate`` (same :func:`~llmos.data.rows.row_content_key` as an earlier row) and
``near_duplicate`` (MinHash/LSH estimated Jaccard similarity of word 3-shingles at or above ``near_threshold`` with an
earlier kept row). The first occurrence is always kept, and the result is deterministic.

The report is ``{"rows_in", "rows_out", "dropped": {...}, "modified": {...}, "pii": {"email", "phone", "secret"}}``:
``modified`` counts rows changed by each step, ``pii`` counts redacted spans.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any

import numpy as np
import numpy.typing as npt

from llmos.data.rows import Row, dataset_shape, row_content_key
from llmos.errors import InvalidInputError

LANGUAGES = ("en", "fr", "de", "es", "it", "pt", "nl")
MIN_DETECT_CHARS = 20
NUM_PERM = 128
MINHASH_SEED = 1_234_567
MERSENNE_31 = (1 << 31) - 1


@dataclass
class CleanOptions:
    """Which cleaning steps run; see the module docstring for what each does."""

    strip_html: bool = True
    strip_control: bool = True
    normalize_unicode: bool = True
    normalize_whitespace: bool = True
    dedup_exact: bool = True
    dedup_near: bool = True
    near_threshold: float = 0.8
    min_chars: int = 1
    max_chars: int = 100_000
    languages: tuple[str, ...] | None = None
    redact_pii: bool = True

    def validate(self) -> None:
        if not 0.0 < self.near_threshold <= 1.0:
            raise InvalidInputError(
                f"near_threshold must be in (0, 1], not {self.near_threshold}", param="near_threshold"
            )
        if self.min_chars < 0:
            raise InvalidInputError(f"min_chars must be at least 0, not {self.min_chars}", param="min_chars")
        if self.max_chars < self.min_chars:
            raise InvalidInputError(
                f"max_chars ({self.max_chars}) must be at least min_chars ({self.min_chars})", param="max_chars"
            )
        if self.languages is not None:
            unknown = [code for code in self.languages if code not in (*LANGUAGES, "unknown")]
            if unknown or not self.languages:
                raise InvalidInputError(
                    f"languages must list codes from {', '.join(LANGUAGES)} (or 'unknown'); got {list(self.languages)}",
                    param="languages",
                )


def _wordset(words: str) -> frozenset[str]:
    return frozenset(words.split())


# --- HTML -------------------------------------------------------------------------------------------------------------

_HTML_HINT = re.compile(
    r"</?[A-Za-z][A-Za-z0-9-]*(?:\s[^<>]*)?/?>|<!--|&(?:[A-Za-z]{2,8}|#\d{1,7}|#x[0-9A-Fa-f]{1,6});"
)
_BLOCK_TAGS = _wordset(
    "address article aside blockquote br dd div dl dt figcaption footer form h1 h2 h3 h4 h5 h6 header hr li main nav "
    "ol p pre section table td th tr ul"
)


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self.skip += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self.skip = max(0, self.skip - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.parts.append(data)


def strip_html(text: str) -> str:
    """Text content of an HTML fragment; plain text without tags or entities is returned unchanged."""
    if not _HTML_HINT.search(text):
        return text
    parser = _TextExtractor()
    parser.feed(text)
    parser.close()
    return "".join(parser.parts)


# --- control characters, unicode, whitespace ------------------------------------------------------------------------


def strip_control(text: str) -> str:
    """Remove C0/C1 control characters except tab and newline (carriage returns become newlines)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "".join(ch for ch in text if ch in "\t\n" or unicodedata.category(ch) != "Cc")


def normalize_unicode(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


_SPACES = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_whitespace(text: str) -> str:
    """Collapse runs of spaces and tabs, strip line ends, keep at most one blank line, strip the ends."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


# --- PII --------------------------------------------------------------------------------------------------------------

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_SECRETS = [
    re.compile(r"\bBearer\s+[A-Za-z0-9._~+/=-]{16,}"),
    re.compile(r"\bsk-(?:proj-|ant-|live-|test-)?[A-Za-z0-9_-]{20,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}\b"),
    re.compile(r"\bllmos_[0-9a-f]{12}_[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])"),
    re.compile(r"\b[0-9a-fA-F]{32,}\b"),
]
# base64 / url-safe tokens: long, and a mix of lower case, upper case and digits (so long words and paths survive)
_TOKEN = re.compile(r"(?<![A-Za-z0-9+/_-])[A-Za-z0-9+/_-]{32,}={0,2}(?![A-Za-z0-9+/_=-])")
_PHONES = [
    # international: +CC then groups, e.g. +44 20 7946 0958, +49-151-1234-5678, +33 (0)1 23 45 67 89
    re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,5}\)?){2,6}(?![\w])"),
    # US: (555) 123-4567, 555-123-4567, 555.123.4567, 1-555-123-4567
    re.compile(r"(?<![\w+])(?:1[ .-]?)?(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\w)"),
]


def _digits(text: str) -> int:
    return sum(ch.isdigit() for ch in text)


def _is_token(text: str) -> bool:
    core = text.rstrip("=")
    return any(c.islower() for c in core) and any(c.isupper() for c in core) and any(c.isdigit() for c in core)


def redact(text: str) -> tuple[str, dict[str, int]]:
    """Replace emails, phone numbers and secrets; return the new text and how many of each were replaced."""
    counts = {"email": 0, "phone": 0, "secret": 0}

    def sub(pattern: re.Pattern[str], kind: str, text: str, check: Callable[[str], bool] | None = None) -> str:
        def replace(match: re.Match[str]) -> str:
            found = match.group(0)
            if check is not None and not check(found):
                return found
            counts[kind] += 1
            if kind == "secret" and found.startswith("Bearer"):
                return "Bearer [SECRET]"
            return {"email": "[EMAIL]", "phone": "[PHONE]", "secret": "[SECRET]"}[kind]

        return pattern.sub(replace, text)

    for pattern in _SECRETS:
        text = sub(pattern, "secret", text)
    text = sub(_TOKEN, "secret", text, _is_token)
    text = sub(_EMAIL, "email", text)
    for pattern in _PHONES:
        text = sub(pattern, "phone", text, lambda s: 9 <= _digits(s) <= 15)
    return text, counts


# --- language ---------------------------------------------------------------------------------------------------------

_STOPWORDS: dict[str, frozenset[str]] = {
    "en": _wordset(
        "the and of to in is it that was for on are with as his they be at this have from or had by not but what "
        "all were we when your can there an which their if do will each about how up out them then she many some "
        "so these would other into has more her two like him see time could no than been who its now my made over "
        "did down only way find use may long very after where just"
    ),
    "fr": _wordset(
        "le la les de des du et est un une en que qui dans pour pas sur au aux avec ce cette il elle ils elles nous "
        "vous je tu son sa ses leur leurs mais ou donc ne plus par se sont été être avoir fait comme tout très bien "
        "aussi était ont sans chez entre"
    ),
    "de": _wordset(
        "der die das und ist nicht ein eine einen einem einer zu den dem des mit von sich auf für im auch es sie er "
        "wir ich ihr war wird werden sind hat haben noch nach bei aus wie aber oder wenn dass nur schon über vor "
        "kann durch diese dieser mehr sehr"
    ),
    "es": _wordset(
        "el la los las de del y que en un una es por con para no se su sus al lo como más pero fue ha han son este "
        "esta estos esto muy también ya entre cuando todo sobre sin hay ser está están porque donde yo él ella"
    ),
    "it": _wordset(
        "il lo la gli le di del della dei delle e che in un una è per con non si sono al alla nel nella come più ma "
        "anche questo questa era ha hanno essere molto tutto quando dove perché già sul sulla dal dalla io lui lei "
        "loro"
    ),
    "pt": _wordset(
        "o a os as de do da dos das e que em um uma é para com não se por mais mas como foi são ao na no nas nos "
        "seu sua seus suas ele ela eles isso este esta também muito já quando onde porque ser está estão tem têm "
        "pelo pela"
    ),
    "nl": _wordset(
        "de het een en van is dat die in te niet op met voor zijn er aan ook als maar om bij dan door naar nog "
        "wordt werd worden kan heeft hebben wat wel geen uit over zo deze dit was waren meer veel ik jij hij zij "
        "wij"
    ),
}
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def detect_language(text: str) -> str:
    """Guess the language of ``text`` from stopword frequencies: one of en, fr, de, es, it, pt, nl, or "unknown".

    A stopword shared by several languages counts for each of them with weight ``1 / number of languages``.
    Fewer than two stopwords, or fewer than 10% of the words being stopwords, gives "unknown".
    """
    words = [w.lower() for w in _WORD.findall(text)]
    if not words:
        return "unknown"
    scores = dict.fromkeys(LANGUAGES, 0.0)
    matched = 0
    for word in words:
        langs = [code for code in LANGUAGES if word in _STOPWORDS[code]]
        if langs:
            matched += 1
            for code in langs:
                scores[code] += 1.0 / len(langs)
    if matched < 2 or matched / len(words) < 0.1:
        return "unknown"
    best = max(LANGUAGES, key=lambda code: scores[code])
    return best


# --- MinHash near-duplicate detection ---------------------------------------------------------------------------------


def _permutations(num_perm: int = NUM_PERM, seed: int = MINHASH_SEED) -> tuple[npt.NDArray[np.uint64], ...]:
    rng = np.random.default_rng(seed)
    a = rng.integers(1, MERSENNE_31, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, MERSENNE_31, size=num_perm, dtype=np.uint64)
    return a, b


_PERM_A, _PERM_B = _permutations()


def shingles(text: str) -> set[str]:
    """Word 3-shingles of the lower-cased text; texts of one or two words give one shingle, empty text none."""
    words = re.findall(r"\w+", text.lower())
    if len(words) < 3:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + 3]) for i in range(len(words) - 2)}


def minhash(items: set[str]) -> npt.NDArray[np.uint64]:
    """A 128-value MinHash signature: ``min((a * h(x) + b) mod p)`` with ``p = 2^31 - 1``, one seeded (a, b) pair per
    permutation (a universal hash family), over blake2b hashes of the items reduced mod p."""
    hashes = np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest(), "little") % MERSENNE_31
            for s in sorted(items)
        ),
        dtype=np.uint64,
        count=len(items),
    )
    # a, b, h < 2^31, so a * h + b < 2^63: exact in uint64, no overflow before the modulus
    values = (np.outer(_PERM_A, hashes) + _PERM_B[:, None]) % np.uint64(MERSENNE_31)
    result: npt.NDArray[np.uint64] = values.min(axis=1)
    return result


def _bands(threshold: float) -> tuple[int, int]:
    """(bands, rows per band), bands * rows = 128, with an LSH threshold (1/b)^(1/r) well below ``threshold``."""
    best = (NUM_PERM, 1)
    for rows in (1, 2, 4, 8, 16, 32):
        bands = NUM_PERM // rows
        if (1.0 / bands) ** (1.0 / rows) <= threshold - 0.05:
            best = (bands, rows)
    return best


class NearDuplicateIndex:
    """LSH index over MinHash signatures; :meth:`add` answers whether a similar text was added before."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.bands, self.rows = _bands(threshold)
        self.buckets: dict[tuple[int, bytes], list[int]] = {}
        self.signatures: list[npt.NDArray[np.uint64]] = []

    def add(self, text: str) -> bool:
        """Return True (and keep nothing) if ``text`` is a near duplicate of an added text, else add it."""
        items = shingles(text)
        if not items:
            return False
        signature = minhash(items)
        keys = [(band, signature[band * self.rows : (band + 1) * self.rows].tobytes()) for band in range(self.bands)]
        seen: set[int] = set()
        for key in keys:
            for candidate in self.buckets.get(key, ()):
                if candidate in seen:
                    continue
                seen.add(candidate)
                if float(np.mean(self.signatures[candidate] == signature)) >= self.threshold:
                    return True
        index = len(self.signatures)
        self.signatures.append(signature)
        for key in keys:
            self.buckets.setdefault(key, []).append(index)
        return False


# --- the pipeline -----------------------------------------------------------------------------------------------------


def _shape_fields(row: Row, shape: str) -> list[str]:
    if shape == "text":
        return [row["text"]]
    if shape == "completion":
        return [row["prompt"], row["completion"]]
    return [m["content"] for m in row["messages"]]


def _with_fields(row: Row, shape: str, values: list[str]) -> Row:
    new = dict(row)
    if shape == "text":
        new["text"] = values[0]
    elif shape == "completion":
        new["prompt"], new["completion"] = values
    else:
        new["messages"] = [{**m, "content": v} for m, v in zip(row["messages"], values, strict=True)]
    return new


def _is_empty(row: Row, shape: str) -> tuple[bool, Row]:
    """Whether the row counts as empty; for chat, empty system messages are removed from the returned row."""
    if shape != "chat":
        return any(not v for v in _shape_fields(row, shape)), row
    messages = [m for m in row["messages"] if m["content"] or m["role"] != "system"]
    if not messages or any(not m["content"] for m in messages):
        return True, row
    if len(messages) != len(row["messages"]):
        row = {**row, "messages": messages}
    return False, row


def clean(rows: list[Row], options: CleanOptions | None = None) -> tuple[list[Row], dict[str, Any]]:
    """Clean ``rows``; see the module docstring. Returns the kept rows (new dicts, input order) and the report."""
    options = options or CleanOptions()
    options.validate()
    shape = dataset_shape(rows)
    dropped = dict.fromkeys(("empty", "too_short", "too_long", "language", "duplicate", "near_duplicate"), 0)
    modified = dict.fromkeys(("html", "control", "unicode", "whitespace", "pii"), 0)
    pii = {"email": 0, "phone": 0, "secret": 0}
    steps: list[tuple[str, Callable[[str], str]]] = []
    if options.strip_html:
        steps.append(("html", strip_html))
    if options.strip_control:
        steps.append(("control", strip_control))
    if options.normalize_unicode:
        steps.append(("unicode", normalize_unicode))
    if options.normalize_whitespace:
        steps.append(("whitespace", normalize_whitespace))
    seen: set[str] = set()
    near = NearDuplicateIndex(options.near_threshold) if options.dedup_near else None
    kept: list[Row] = []
    for row in rows:
        values = list(_shape_fields(row, shape))
        for name, step in steps:
            new_values = [step(v) for v in values]
            if new_values != values:
                modified[name] += 1
                values = new_values
        if options.redact_pii:
            redacted = False
            for i, value in enumerate(values):
                values[i], counts = redact(value)
                for kind, n in counts.items():
                    pii[kind] += n
                    redacted = redacted or n > 0
            modified["pii"] += int(redacted)
        new_row = _with_fields(row, shape, values)
        empty, new_row = _is_empty(new_row, shape)
        if empty:
            dropped["empty"] += 1
            continue
        chars = sum(len(v) for v in _shape_fields(new_row, shape))
        if chars < options.min_chars:
            dropped["too_short"] += 1
            continue
        if chars > options.max_chars:
            dropped["too_long"] += 1
            continue
        joined = "\n".join(_shape_fields(new_row, shape))
        if (
            options.languages is not None
            and len(joined) >= MIN_DETECT_CHARS
            and detect_language(joined) not in options.languages
        ):
            dropped["language"] += 1
            continue
        if options.dedup_exact:
            key = row_content_key(new_row)
            if key in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(key)
        if near is not None and near.add(joined):
            dropped["near_duplicate"] += 1
            continue
        kept.append(new_row)
    report: dict[str, Any] = {
        "rows_in": len(rows),
        "rows_out": len(kept),
        "dropped": dropped,
        "modified": modified,
        "pii": pii,
    }
    return kept, report
