from __future__ import annotations

import pytest

from llmos.data.cleaning import CleanOptions, clean, detect_language, minhash, redact, shingles, strip_html
from llmos.errors import InvalidInputError

NOTHING = CleanOptions(
    strip_html=False,
    strip_control=False,
    normalize_unicode=False,
    normalize_whitespace=False,
    dedup_exact=False,
    dedup_near=False,
    redact_pii=False,
)


def options(**changes: object) -> CleanOptions:
    values = {**NOTHING.__dict__, **changes}
    return CleanOptions(**values)


def test_html_is_stripped_and_entities_unescaped() -> None:
    html = "<div><h1>Title</h1><p>Fish &amp; chips</p><script>var x = 1;</script><style>p {}</style>end</div>"
    assert strip_html(html) == "\n\nTitle\n\nFish & chips\nend\n"
    assert strip_html("a < b and c > d") == "a < b and c > d"
    rows, report = clean([{"text": html}, {"text": "plain"}], options(strip_html=True, normalize_whitespace=True))
    assert rows == [{"text": "Title\n\nFish & chips\nend"}, {"text": "plain"}]
    assert report["modified"]["html"] == 1
    assert report["modified"]["whitespace"] == 1


def test_control_unicode_and_whitespace() -> None:
    rows, report = clean(
        [{"prompt": "ﬁne\x00  tuning\r\n\r\n\r\n\r\nnow\t ", "completion": "Ｆｕｌｌ width", "id": 9}],
        CleanOptions(),
    )
    assert rows == [{"prompt": "fine tuning\n\nnow", "completion": "Full width", "id": 9}]
    assert report["modified"] == {"html": 0, "control": 1, "unicode": 1, "whitespace": 1, "pii": 0}


def test_redact_pii_kinds() -> None:
    text = (
        "Mail ana.lopez@example.org or call +44 20 7946 0958 / (555) 123-4567. "
        "Keys: sk-proj-abcdefghijklmnopqrstuvwxyz123456, AKIAIOSFODNN7EXAMPLE, "
        "ghp_abcdefghijklmnopqrstuvwxyz0123456789AB, llmos_0123456789ab_abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQ, "
        "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig123, digest d41d8cd98f00b204e9800998ecf8427e."
    )
    redacted, counts = redact(text)
    assert counts == {"email": 1, "phone": 2, "secret": 6}
    assert redacted == (
        "Mail [EMAIL] or call [PHONE] / [PHONE]. Keys: [SECRET], [SECRET], [SECRET], [SECRET], "
        "Authorization: Bearer [SECRET], digest [SECRET]."
    )


def test_redact_leaves_ordinary_numbers_and_words() -> None:
    text = (
        "On 2024-01-15 it cost 1,000,000 euros, version 1.2.3, room 555-1234, population 123456789, "
        "path /usr/local/lib/python3.11/site-packages, Pneumonoultramicroscopicsilicovolcanoconiosis."
    )
    assert redact(text) == (text, {"email": 0, "phone": 0, "secret": 0})


def test_clean_counts_pii_in_chat_messages() -> None:
    rows = [{"messages": [{"role": "user", "content": "I am bob@corp.io"}, {"role": "assistant", "content": "Hi"}]}]
    cleaned, report = clean(rows, options(redact_pii=True))
    assert cleaned[0]["messages"][0] == {"role": "user", "content": "I am [EMAIL]"}
    assert rows[0]["messages"][0]["content"] == "I am bob@corp.io"  # input untouched
    assert report["pii"] == {"email": 1, "phone": 0, "secret": 0}
    assert report["modified"]["pii"] == 1


def test_exact_and_near_duplicates_keep_first_occurrence() -> None:
    base = "The harbour master counted forty two boats leaving the bay before the storm arrived on Tuesday evening"
    rows = [
        {"text": base, "id": 0},
        {"text": base, "id": 1},  # exact duplicate (extra fields do not count)
        {"text": base + " again", "id": 2},  # near duplicate
        {"text": "  " + base + "  ", "id": 3},  # a duplicate once whitespace is normalized
        {"text": "A completely different sentence about baking bread with rye flour and caraway seeds", "id": 4},
    ]
    cleaned, report = clean(rows, CleanOptions())
    assert [r["id"] for r in cleaned] == [0, 4]
    assert report["dropped"]["duplicate"] == 2
    assert report["dropped"]["near_duplicate"] == 1
    assert (report["rows_in"], report["rows_out"]) == (5, 2)
    cleaned, report = clean(rows, CleanOptions(dedup_near=False))
    assert [r["id"] for r in cleaned] == [0, 2, 4]


def test_similar_but_different_questions_are_not_near_duplicates() -> None:
    rows = [{"text": "What is the capital of France?"}, {"text": "What is the capital of Spain?"}]
    cleaned, report = clean(rows, CleanOptions())
    assert len(cleaned) == 2 and report["dropped"]["near_duplicate"] == 0


def test_minhash_estimates_jaccard() -> None:
    words = [f"w{i}" for i in range(200)]
    a = shingles(" ".join(words))
    b = shingles(" ".join(words[:150] + [f"x{i}" for i in range(50)]))
    exact = len(a & b) / len(a | b)
    estimate = float((minhash(a) == minhash(b)).mean())
    assert abs(estimate - exact) < 0.15
    assert (minhash(a) == minhash(set(a))).all()  # deterministic


def test_detect_language() -> None:
    samples = {
        "en": "The cat is sleeping on the chair because it was a long day for all of them.",
        "fr": "Le chat dort sur la chaise parce que la journée a été longue pour tout le monde.",
        "de": "Die Katze schläft auf dem Stuhl, weil es für sie ein langer Tag war und sie müde ist.",
        "es": "El gato duerme en la silla porque fue un día muy largo para todos los de la casa.",
        "it": "Il gatto dorme sulla sedia perché è stata una giornata molto lunga per tutti loro.",
        "pt": "O gato dorme na cadeira porque foi um dia muito longo para todos eles e para ela.",
        "nl": "De kat slaapt op de stoel omdat het een lange dag was voor iedereen in het huis.",
    }
    for code, text in samples.items():
        assert detect_language(text) == code, text
    assert detect_language("x = f(3) + 42 ** 7") == "unknown"


def test_language_filter_keeps_short_rows() -> None:
    rows = [
        {"text": "The weather was cold and the road was covered with snow for most of the week."},
        {"text": "Das Wetter war kalt und die Straße war die ganze Woche mit Schnee bedeckt."},
        {"text": "Danke!"},  # too short to judge: kept
    ]
    cleaned, report = clean(rows, options(languages=("en",)))
    assert [r["text"] for r in cleaned] == [rows[0]["text"], "Danke!"]
    assert report["dropped"]["language"] == 1


def test_length_and_empty_filters() -> None:
    rows = [
        {"prompt": "   ", "completion": "answer"},
        {"prompt": "q", "completion": "a"},
        {"prompt": "question", "completion": "x" * 50},
        {"prompt": "question", "completion": "fine answer"},
    ]
    cleaned, report = clean(rows, options(normalize_whitespace=True, min_chars=5, max_chars=40))
    assert cleaned == [{"prompt": "question", "completion": "fine answer"}]
    assert report["dropped"] == {
        "empty": 1,
        "too_short": 1,
        "too_long": 1,
        "language": 0,
        "duplicate": 0,
        "near_duplicate": 0,
    }


def test_empty_system_message_is_removed_not_the_row() -> None:
    rows = [
        {
            "messages": [
                {"role": "system", "content": " "},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ]
        }
    ]
    cleaned, report = clean(rows, CleanOptions())
    assert [m["role"] for m in cleaned[0]["messages"]] == ["user", "assistant"]
    assert report["dropped"]["empty"] == 0


def test_bad_options_are_refused() -> None:
    with pytest.raises(InvalidInputError, match="languages"):
        clean([{"text": "a"}], CleanOptions(languages=("xx",)))
    with pytest.raises(InvalidInputError, match="near_threshold"):
        clean([{"text": "a"}], CleanOptions(near_threshold=1.5))
    with pytest.raises(InvalidInputError, match="row 1 has shape 'completion'"):
        clean([{"text": "a"}, {"prompt": "p", "completion": "c"}])
