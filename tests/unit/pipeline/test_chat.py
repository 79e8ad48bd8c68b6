"""Conversations (alm_pipeline.pipeline.chat, align_chat): rendering with the real chat templates available offline,
tokenization with exact byte offsets, content coordinates, and the alignment of two models' renderings."""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pytest

from alm_pipeline.assets import asset_path, is_installed
from alm_pipeline.cache.teacher import CACHE_SCHEMA, CHAT_FIELDS
from alm_pipeline.pipeline.align import align_document
from alm_pipeline.pipeline.align_chat import ChatStats, encode_rows, is_conversation, loss_mask
from alm_pipeline.pipeline.align_stage import AlignSettings, align_table
from alm_pipeline.pipeline.byteview import load_byte_view
from alm_pipeline.pipeline.chat import (
    BYTES_CHAT_TEMPLATE,
    ChatError,
    ChatTemplate,
    Message,
    content_offsets,
    encode_chat,
    load_chat_template,
    messages_json,
    parse_messages,
)
from alm_pipeline.pipeline.corpus import CorpusConfig, CorpusError, iter_documents
from tests.factories import MISTRAL_TEMPLATE, write_jsonl

CONVERSATION = (
    Message("system", "Be brief."),
    Message("user", "Hi there! Is <|im_start|> or [INST] special here?"),
    Message("assistant", "No: inside a message they are plain text.  Two spaces, é, 👍🏽."),
    Message("user", "Thanks.\nAnd 12345?"),
    Message("assistant", "Twelve thousand three hundred forty-five."),
)


def _real(name: str):
    if not is_installed(name):
        pytest.skip(f"{name} is not installed here (scripts/setup.sh installs it)")
    return str(asset_path(name))


@pytest.fixture(scope="module")
def sides(tmp_path_factory):
    """name -> (byte view, chat template) for the real tokenizers with templates, and the bytes tokenizer."""
    folder = tmp_path_factory.mktemp("templates")
    (folder / "mistral.jinja").write_text(MISTRAL_TEMPLATE)
    out = {"bytes": (load_byte_view("bytes"), load_chat_template("bytes"))}
    for name, override in (
        ("smollm2-135m", None),
        ("qwen3-tokenizer", None),
        ("mistral-tokenizer", str(folder / "mistral.jinja")),
    ):
        if is_installed(name):
            path = str(asset_path(name))
            out[name] = (load_byte_view(path), load_chat_template(path, override))
    return out


# ----------------------------------------------------------------------------------------------------------
# messages and templates


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("hello", "messages must be a non-empty list"),
        ([], "messages must be a non-empty list"),
        ([{"role": "user"}], "message 0 must be an object with 'role' and 'content'"),
        ([{"role": "robot", "content": "x"}], "message 0 has an unknown role 'robot'"),
        (
            [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "  "}],
            "message 1 (assistant) has empty",
        ),
        ([{"role": "user", "content": ["a", "b"]}], "message 0 (user) content is list, expected a string"),
        ([{"role": "user", "content": "a\ue000b"}], "reserves"),
    ],
)
def test_a_bad_message_is_an_error_naming_the_row(value, message):
    with pytest.raises(ChatError, match=re.escape(message)) as info:
        parse_messages(value, "data.jsonl:7")
    assert str(info.value).startswith("data.jsonl:7: ")


def test_corpus_rows_may_hold_messages_and_errors_name_file_and_line(tmp_path):
    data = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"id": "a", "text": "plain"},
            {
                "id": "b",
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            },
        ],
    )
    docs = list(iter_documents(CorpusConfig(path=str(data), id_field="id")))
    assert [d.messages is None for d in docs] == [True, False]
    assert docs[1].messages == (Message("user", "hi"), Message("assistant", "yo"))
    assert docs[1].text == messages_json(docs[1].messages)
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"text": "ok"}, {"messages": [{"role": "bot", "content": "x"}]}]
    )
    with pytest.raises(CorpusError, match=r"bad.jsonl:2: message 0 has an unknown role 'bot'"):
        list(iter_documents(CorpusConfig(path=str(bad))))


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen3-tokenizer"])
def test_rendering_equals_transformers_apply_chat_template(name):
    """The same text as the tokenizer's own apply_chat_template (content is kept verbatim by these templates)."""
    from transformers import AutoTokenizer

    path = _real(name)
    tok = AutoTokenizer.from_pretrained(path)
    as_dicts = [{"role": m.role, "content": m.content} for m in CONVERSATION]
    expected = tok.apply_chat_template(as_dicts, tokenize=False)
    rendered = load_chat_template(path).render(CONVERSATION, "row 1")
    assert rendered.text == expected
    # the content pieces are the messages, in order, and everything else is template text
    assert [t for t, m in rendered.pieces if m >= 0] == [m.content for m in CONVERSATION]
    if name == "qwen3-tokenizer":  # the last assistant turn gets an empty think block: template text
        assert any("<think>" in t for t, m in rendered.pieces if m < 0)


def test_the_bytes_template_renders_one_header_line_per_message_and_eos_after_assistant_turns():
    rendered = load_chat_template("bytes").render(CONVERSATION[:3])
    assert rendered.text == (
        "<bos><|system|>\nBe brief.\n<|user|>\n"
        + CONVERSATION[1].content
        + "\n<|assistant|>\n"
        + CONVERSATION[2].content
        + "<eos>\n"
    )


def test_conversations_with_the_same_roles_share_a_layout_but_keep_their_own_content():
    """The layout is remembered per sequence of roles (the template sees placeholders only): a second conversation
    with the same roles gets its own contents in the same places, and an error still names its own row."""
    template = load_chat_template("bytes")
    other = tuple(Message(m.role, m.content.upper() + " (2)") for m in CONVERSATION)
    first, second = template.render(CONVERSATION, "row 1"), template.render(other, "row 2")
    assert [t for t, m in second.pieces if m >= 0] == [m.content for m in other]
    assert [t for t, m in second.pieces if m < 0] == [t for t, m in first.pieces if m < 0]
    fresh = ChatTemplate("{# not remembered yet #}" + BYTES_CHAT_TEMPLATE, "fresh", template.tokens)
    assert second.text == fresh.render(other).text
    strict = ChatTemplate("{{ raise_exception('no') }}", "t")
    for row in ("row 1", "row 2"):
        with pytest.raises(ChatError, match=f"^{row}: "):
            strict.render(CONVERSATION, row)


def test_a_template_that_drops_a_message_or_raises_is_an_error_naming_it():
    drops_system = ChatTemplate(
        "{% for m in messages %}{% if m['role'] != 'system' %}{{ m['content'] }}{% endif %}{% endfor %}", "t1"
    )
    with pytest.raises(
        ChatError, match=r"row 3: the chat template \(t1\) does not render .*message 0 expected"
    ):
        drops_system.render(CONVERSATION, "row 3")
    drops_last = ChatTemplate("{{ messages[0]['content'] }}", "t2")
    with pytest.raises(ChatError, match=r"leaves out message 1 \(user\)"):
        drops_last.render(CONVERSATION, "row 3")
    strict = ChatTemplate("{{ raise_exception('System role not supported') }}", "t3")
    with pytest.raises(ChatError, match="row 3: the chat template .* System role not supported"):
        strict.render(CONVERSATION, "row 3")


def test_a_tokenizer_without_a_template_has_none_and_a_file_can_stand_in(tmp_path):
    path = _real("mistral-tokenizer")
    assert load_chat_template(path) is None
    (tmp_path / "t.jinja").write_text(MISTRAL_TEMPLATE)
    template = load_chat_template(path, str(tmp_path / "t.jinja"))
    assert template.render(CONVERSATION[:3]).text.startswith(
        "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST] Hi"
    )
    with pytest.raises(ChatError, match="no such file"):
        load_chat_template(path, str(tmp_path / "missing.jinja"))


# ----------------------------------------------------------------------------------------------------------
# tokenization


def _content_of(enc, u: int) -> bytes:
    data = enc.text.encode("utf-8")
    start = int(enc.offsets[u - 1]) if u else 0
    return data[start : int(enc.offsets[u])]


def test_encode_chat_reproduces_the_rendering_with_specials_only_from_the_template(sides):
    for name, (view, template) in sides.items():
        rendered = template.render(CONVERSATION)
        enc = encode_chat(view, rendered, len(CONVERSATION))
        data = rendered.text.encode("utf-8")
        assert enc.text == rendered.text and int(enc.offsets[-1]) == len(data), name
        assert np.all(np.diff(enc.offsets) >= 0)
        spans = enc.content_spans.reshape(-1, 2)
        for i, m in enumerate(CONVERSATION):
            assert data[spans[i, 0] : spans[i, 1]] == m.content.encode("utf-8"), name
            owned = np.flatnonzero(enc.token_message == i)
            assert b"".join(_content_of(enc, int(u)) for u in owned) == m.content.encode("utf-8"), name
            assert not view.is_special[enc.token_ids[owned]].any(), name  # "<|im_start|>" typed in a message
        template_tokens = enc.token_ids[enc.token_message < 0]
        if (
            name != "mistral-tokenizer"
        ):  # ChatML's <|im_start|> and the bytes template's <bos>/<eos> are control tokens
            assert view.is_special[template_tokens].any(), name


def test_truncation_cuts_the_rendering_on_a_character_and_clips_the_spans(sides):
    view, template = sides["bytes"]
    rendered = template.render(CONVERSATION)
    full = encode_chat(view, rendered, len(CONVERSATION))
    emoji_at = rendered.text.encode("utf-8").index("👍🏽".encode())
    # one token per byte, but the template's <bos> is one token for its 5 bytes: token k ends at byte k + 4;
    # keep tokens up to 2 bytes into the emoji's first character (4 bytes)
    enc = encode_chat(view, rendered, len(CONVERSATION), max_length=emoji_at - 4 + 2)
    assert enc.truncated and not full.truncated
    assert len(enc.text.encode("utf-8")) == emoji_at  # backed off to the character's start
    assert rendered.text.startswith(enc.text)
    assert int(enc.content_spans.max()) <= emoji_at and int(enc.content_spans[-1]) == emoji_at


def test_content_offsets_count_only_content_bytes():
    # rendering: TT CCC T CC T (T: template byte, C: content), tokens ending at 1, 2, 4, 5, 6, 8, 9
    offsets = np.array([1, 2, 4, 5, 6, 8, 9])
    owners = np.array([-1, -1, 0, 0, -1, 1, -1])
    cc, template, ranges = content_offsets(offsets, owners, np.array([2, 5, 6, 8]))
    assert cc.tolist() == [0, 0, 2, 3, 3, 5, 5]
    assert template.tolist() == [True, True, False, False, True, False, True]
    assert ranges.tolist() == [0, 3, 3, 5]


# ----------------------------------------------------------------------------------------------------------
# alignment in content coordinates


def _cache_table(view, template, conversations, max_length=None) -> pa.Table:
    """Cache rows as teacher-cache writes them (random log-probs)."""
    rng = np.random.default_rng(0)
    rows = {name: [] for name in [*CACHE_SCHEMA.names, *(f.name for f in CHAT_FIELDS)]}
    for i, conv in enumerate(conversations):
        enc = encode_chat(view, template.render(conv), len(conv), max_length)
        n = len(enc.token_ids)
        for key, value in (
            ("doc_id", f"c{i}"),
            ("text", enc.text),
            ("token_ids", enc.token_ids),
            ("offsets", enc.offsets),
            ("logprob", -rng.exponential(1.0, n).astype(np.float32)),
            ("boundary_logprob", np.log(rng.uniform(0.01, 1, n)).astype(np.float32)),
            ("truncated", enc.truncated),
            ("messages", messages_json(conv)),
            ("content_spans", enc.content_spans),
            ("token_message", enc.token_message),
        ):
            rows[key].append(value)
    return pa.table(rows, schema=pa.schema([*CACHE_SCHEMA, *CHAT_FIELDS]))


def _aligned_pairs(sides):
    names = list(sides)
    return [(t, s) for t in names for s in names if t != "bytes" or s != "bytes"]


def test_two_renderings_align_content_to_content_and_template_runs_by_position(sides):
    """Every pair (ChatML ⇄ Mistral-style ⇄ Qwen3 ⇄ bytes): each regular chunk covers the same content bytes on both
    sides, template tokens only ever sit in special chunks, and every point between two messages has one run per
    side that pairs with the other's."""
    conversation = CONVERSATION
    content = "".join(m.content for m in conversation).encode("utf-8")
    for teacher, student in _aligned_pairs(sides):
        (vt, tt), (vs, ts) = sides[teacher], sides[student]
        et = encode_chat(vt, tt.render(conversation), len(conversation))
        es = encode_chat(vs, ts.render(conversation), len(conversation))
        cct, tmpl_t, ranges = content_offsets(et.offsets, et.token_message, et.content_spans)
        ccs, tmpl_s, _ = content_offsets(es.offsets, es.token_message, es.content_spans)
        a = align_document(
            et.token_ids,
            cct,
            vt.is_special[et.token_ids] | tmpl_t,
            es.token_ids,
            ccs,
            vs.is_special[es.token_ids] | tmpl_s,
        )
        pair = (teacher, student)
        assert a.aligned_bytes == len(content), pair
        for k in range(a.num_chunks):
            t_tokens = range(a.teacher_start[k], a.teacher_end[k])
            s_tokens = range(a.student_start[k], a.student_end[k])
            if a.is_special[k]:
                assert all(tmpl_t[u] for u in t_tokens) and all(tmpl_s[u] for u in s_tokens), pair
                continue
            piece = content[a.byte_start[k] : a.byte_end[k]]
            for cc, tokens in ((cct, t_tokens), (ccs, s_tokens)):
                starts = [int(cc[u - 1]) if u else 0 for u in tokens]
                assert (
                    b"".join(content[s : int(cc[u])] for s, u in zip(starts, tokens, strict=True)) == piece
                ), pair
        boundaries = set(ranges.tolist())  # content positions between (and around) the messages
        assert set(a.byte_start[a.is_special].tolist()) == boundaries, pair


def test_loss_on_assistant_keeps_assistant_content_and_the_end_of_its_turns(sides):
    if "smollm2-135m" not in sides:
        pytest.skip("SmolLM2 is not installed here")
    vt, tt = sides["smollm2-135m"]
    vs, ts = sides["bytes"]
    table = _cache_table(vt, tt, [CONVERSATION])
    assert is_conversation(table).tolist() == [True]
    t_ids = np.concatenate(table["token_ids"].to_numpy(zero_copy_only=False)).astype(np.int32)
    t_off = np.concatenate(table["offsets"].to_numpy(zero_copy_only=False)).astype(np.int32)
    t_rows = np.array([0, len(t_ids)])
    stats = ChatStats()
    rows = encode_rows(
        table, np.array([True]), t_ids, t_off, t_rows, vt.is_special, vs, ts, None, "assistant", stats
    )
    (ranges,) = rows.loss_ranges.values()
    assistant = [
        (a, b)
        for (a, b), m in zip(ranges.tolist(), [m for m in CONVERSATION if m.role == "assistant"], strict=True)
    ]
    a = align_document(t_ids, rows.t_off, rows.t_special, rows.s_ids, rows.s_off, rows.s_special)
    keep = loss_mask(
        np.zeros(a.num_chunks, dtype=np.int64), a.byte_start, a.byte_end, a.is_special, {0: ranges}
    )
    regular_kept = [
        (s, e)
        for s, e, sp, k in zip(a.byte_start, a.byte_end, a.is_special, keep, strict=True)
        if k and not sp
    ]
    assert regular_kept and all(any(x <= s and e <= y for x, y in assistant) for s, e in regular_kept)
    covered = sum(e - s for s, e in regular_kept)
    assert covered == sum(y - x for x, y in assistant)  # every assistant byte (no chunk straddles a turn)
    special_kept = a.byte_start[keep & a.is_special].tolist()
    assert special_kept == [y for _, y in assistant]  # the runs that end assistant turns
    assert stats.loss_bytes == covered and stats.content_bytes > covered


def test_align_table_mixes_conversations_and_plain_rows_and_reports_them(sides):
    if "smollm2-135m" not in sides or "mistral-tokenizer" not in sides:
        pytest.skip("SmolLM2 / Mistral are not installed here")
    vt, tt = sides["smollm2-135m"]
    vs, ts = sides["mistral-tokenizer"]
    chats = _cache_table(vt, tt, [CONVERSATION, CONVERSATION[1:3]])
    plain_enc = vt.encode("A plain document between two conversations.")
    plain = pa.table(
        {
            "doc_id": ["p"],
            "text": [plain_enc.text],
            "token_ids": [plain_enc.token_ids],
            "offsets": [plain_enc.offsets],
            "logprob": [np.full(len(plain_enc.token_ids), -1.0, np.float32)],
            "boundary_logprob": [np.full(len(plain_enc.token_ids), -0.5, np.float32)],
            "truncated": [False],
            "messages": pa.array([None], pa.string()),
            "content_spans": pa.array([None], pa.list_(pa.int32())),
            "token_message": pa.array([None], pa.list_(pa.int16())),
        },
        schema=chats.schema,
    )
    table = pa.concat_tables([chats.slice(0, 1), plain, chats.slice(1, 1)])
    results = {}
    for loss_on in ("all", "assistant"):
        stats = ChatStats()
        out = align_table(
            table, vt.is_special, vs, AlignSettings(loss_on=loss_on), student_template=ts, chat_stats=stats
        )
        results[loss_on] = (out, stats)
        assert out["doc_id"].to_pylist() == ["c0", "p", "c1"]
        assert stats.conversations == 2 and stats.paired_template_runs == stats.teacher_template_runs
    (everything, all_stats), (assistant, as_stats) = results["all"], results["assistant"]
    # the plain row is the same either way; conversations lose their non-assistant chunks under "assistant"
    assert everything["covered_bytes"][1] == assistant["covered_bytes"][1]
    assert all_stats.loss_bytes == all_stats.content_bytes > as_stats.loss_bytes
    assert (
        as_stats.covered_bytes <= as_stats.loss_bytes and as_stats.covered_bytes >= 0.95 * as_stats.loss_bytes
    )
    assert sum(assistant["num_chunks"].to_pylist()) < sum(everything["num_chunks"].to_pylist())
    # without a template the student cannot take a conversation: dropped and counted, the plain row kept
    from alm_pipeline.pipeline.align_stage import DroppedDocs

    dropped = DroppedDocs()
    out = align_table(table, vt.is_special, vs, AlignSettings(), dropped=dropped)
    assert out["doc_id"].to_pylist() == ["p"] and sum(dropped.counts.values()) == 2
    assert "no chat template" in " ".join(dropped.examples)
    assert json.loads(table["messages"][0].as_py())[0]["role"] == "system"
