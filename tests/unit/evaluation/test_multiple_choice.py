"""Multiple-choice scoring (alm_pipeline.evaluation.multiple_choice): choice log-likelihoods against a plain
transformers forward (tokenizer with BOS, without BOS, the bytes tokenizer), BIG-bench task loading and its
refusals, the prompt template, and accuracy on crafted cases whose answer is known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from alm_pipeline.assets import BIGBENCH, task_data_installed
from alm_pipeline.evaluation.models import EvalError, load_eval_model
from alm_pipeline.evaluation.multiple_choice import (
    MCExample,
    MCTask,
    bigbench_context,
    choice_loglikelihoods,
    load_bigbench_task,
    score_tasks,
)
from alm_pipeline.pipeline.byte_tokenizer import build_byte_tokenizer
from tests import factories

# (context, continuation): trailing whitespace that moves, a newline, non-ASCII, no space at the join, an
# empty context, and a join inside a word (a token spans it for the BPE tokenizers)
REQUESTS = [
    ("Q: Is the sky blue?\nA: ", "Yes"),
    ("Statement: the cat sat on the mat\nPlausible/implausible? ", "implausible"),
    ("Does it rain?\n", "No"),
    ("Café crème? ", "naïve 中文 👍🏽"),
    ("To be, or not to be", ", that is the question"),
    ("", "Hello world"),
    ("The quick brown fox jum", "ps over the lazy dog"),
]


@pytest.fixture(scope="module")
def bytes_model(tmp_path_factory) -> Path:
    """Tiny Llama with the built-in bytes tokenizer (BOS, one token per byte)."""
    folder = tmp_path_factory.mktemp("bytes_tok")
    build_byte_tokenizer().save_pretrained(str(folder))
    return factories.make_model("llama", folder, tmp_path_factory.mktemp("bytes_llama"))


def reference_loglikelihood(model_dir: Path, context: str, continuation: str, max_length: int | None = None):
    """Plain computation: HF tokenizer on the joined text, one forward, fp32 log_softmax, gather over the tokens
    whose character span ends after the (whitespace-stripped) context. Returns (ll, scored tokens, lm-eval's
    split = the context's own token count)."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ctx = context.rstrip()
    cont = context[len(ctx) :] + continuation
    enc = tok(ctx + cont, return_offsets_mapping=True)
    ids, spans = list(enc["input_ids"]), list(enc["offset_mapping"])
    special = set(tok.all_special_ids)
    first = next(
        u
        for u, (i, (_, end)) in enumerate(zip(ids, spans, strict=True))
        if i not in special and (end > len(ctx) or not ctx)
    )
    lm_eval_split = len(tok(ctx)["input_ids"]) if ctx else None
    if first == 0:  # nothing before the first scored token: BOS, else EOS
        ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id, *ids]
        first = 1
    if max_length is not None and len(ids) > max_length:
        cut = len(ids) - max_length
        ids, first = ids[cut:], first - cut
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    ll = sum(float(logp[u - 1, ids[u]]) for u in range(first, len(ids)))
    return ll, len(ids) - first, lm_eval_split, first


@pytest.mark.parametrize("model_fixture", ["llama_sp_model", "gpt2_bl_model", "bytes_model"])
def test_choice_loglikelihoods_match_a_plain_forward(request, model_fixture):
    model_dir = request.getfixturevalue(model_fixture)
    model = load_eval_model(str(model_dir), max_logit_elements=3000)
    got = choice_loglikelihoods(model, REQUESTS, batch_tokens=64)
    has_bos = bool(model.view.prefix_ids)
    assert has_bos == (model_fixture != "gpt2_bl_model")
    for (context, continuation), score in zip(REQUESTS, got, strict=True):
        ll, n, lm_eval_split, first = reference_loglikelihood(model_dir, context, continuation)
        assert score.loglikelihood == pytest.approx(ll, rel=1e-5, abs=1e-4), (context, continuation)
        assert score.tokens == n and not score.truncated
        if not score.boundary_token and lm_eval_split is not None:
            assert first == lm_eval_split  # a clean join: exactly lm-eval's split of the joined encoding
    boundary = [s.boundary_token for s in got]
    if model_fixture == "bytes_model":  # one byte per token: every join is clean, every byte is scored
        assert not any(boundary)
        for (context, continuation), score in zip(REQUESTS, got, strict=True):
            moved = context[len(context.rstrip()) :]
            assert score.tokens == len((moved + continuation).encode("utf-8"))
    else:  # the join inside "jumps" is spanned by a token, and that token is scored
        assert boundary[-1] and not any(boundary[:4])
    # batching does not change the numbers
    one_by_one = choice_loglikelihoods(model, REQUESTS, batch_tokens=1)
    for a, b in zip(got, one_by_one, strict=True):
        assert a.loglikelihood == pytest.approx(b.loglikelihood, rel=1e-5, abs=1e-5)


# the choices of three questions: each question's prefix is run once (KV cache) for all its choices
SHARED = (
    [("Q: Is the sky blue?\nA: ", c) for c in ("Yes", "No", "It depends on the weather", "Café naïve 中文")]
    + [("Statement: the cat sat\nPlausible/implausible? ", c) for c in ("plausible", "implausible")]
    + [
        ("The quick brown fox jum", c)
        for c in ("ps over the lazy dog", "bled", " quietly")  # joins inside a word
    ]
)


@pytest.mark.parametrize("model_fixture", ["llama_sp_model", "gpt2_bl_model", "bytes_model"])
def test_shared_context_gives_the_plain_numbers(request, model_fixture):
    model_dir = request.getfixturevalue(model_fixture)
    model = load_eval_model(str(model_dir), max_logit_elements=3000)
    calls: list[tuple[int, ...]] = []
    hook = model.body.register_forward_pre_hook(
        lambda mod, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    try:
        shared = choice_loglikelihoods(model, SHARED, batch_tokens=64)
    finally:
        hook.remove()
    # the two first questions ran their prefix once ([1, prefix]) and their choices once ([k, longest choice])
    assert sum(1 for shape in calls if shape[0] == 1) >= 2
    assert (4, max(s.tokens for s in shared[:4])) in calls
    assert (2, max(s.tokens for s in shared[4:6])) in calls
    plain = choice_loglikelihoods(model, SHARED, batch_tokens=64, share_context=False)
    for (context, continuation), a, b in zip(SHARED, shared, plain, strict=True):
        assert a.loglikelihood == pytest.approx(b.loglikelihood, rel=1e-5, abs=1e-4), (context, continuation)
        assert (a.tokens, a.boundary_token) == (b.tokens, b.boundary_token)
    ll, _, _, _ = reference_loglikelihood(model_dir, *SHARED[3])
    assert shared[3].loglikelihood == pytest.approx(ll, rel=1e-5, abs=1e-4)


def test_full_logits_models_are_scored_the_plain_way(llama_sp_model):
    from alm_pipeline.evaluation.models import EvalModel
    from alm_pipeline.pipeline.byteview import load_byte_view

    model = AutoModelForCausalLM.from_pretrained(str(llama_sp_model), dtype=torch.float32)
    model.config.logit_scale = 2.0  # a logit scale Llama's forward does not apply: the sliced head disagrees
    wrapped = EvalModel(model, load_byte_view(llama_sp_model))
    assert wrapped.lm_head == "full_logits" and wrapped.continuation_logprobs([1, 2], [[3], [4]]) is None
    got = choice_loglikelihoods(wrapped, SHARED[:4])
    for (context, continuation), score in zip(SHARED[:4], got, strict=True):
        ll, _, _, _ = reference_loglikelihood(llama_sp_model, context, continuation)
        assert score.loglikelihood == pytest.approx(ll, rel=1e-5, abs=1e-4)


def test_left_truncation_keeps_the_choice(gpt2_bl_model):
    model = load_eval_model(str(gpt2_bl_model))
    context, continuation = "one two three four five six seven eight nine ten. Answer: ", "eleven"
    score = choice_loglikelihoods(model, [(context, continuation)], max_length=8)[0]
    ll, n, _, _ = reference_loglikelihood(gpt2_bl_model, context, continuation, max_length=8)
    assert score.truncated and score.tokens == n
    assert score.loglikelihood == pytest.approx(ll, rel=1e-5, abs=1e-4)
    with pytest.raises(EvalError, match="my question, choice 'eleven'.*does not fit in max_length=2"):
        choice_loglikelihoods(
            model, [(context, continuation)], refs=["my question, choice 'eleven'"], max_length=2
        )


# ----------------------------------------------------------------------------------------------------------
# BIG-bench task files
# ----------------------------------------------------------------------------------------------------------


def write_task(path: Path, examples: list, **fields) -> Path:
    path.write_text(json.dumps({"name": "crafted", "examples": examples, **fields}), encoding="utf-8")
    return path


def test_bigbench_template_defaults_and_task_prefixes(tmp_path):
    ex = {"input": "Pick one.", "target_scores": {"d": 0, "b": 0, "a": 1, "c": 0}}
    # defaults: "\nQ: ", choices listed after "\n  choice: " in BIG-bench's order (sorted, then permuted by
    # RandomState(42): for four choices b, d, a, c), then "\nA: "
    assert (
        bigbench_context({}, ex) == "\nQ: Pick one.\n  choice: b\n  choice: d\n  choice: a\n  choice: c\nA: "
    )
    task_data = {
        "task_prefix": "Answer yes or no.",
        "example_input_prefix": "\nStatement: ",
        "example_output_prefix": "\nPlausible? ",
        "append_choices_to_input": False,
    }
    assert bigbench_context(task_data, ex) == "Answer yes or no.\nStatement: Pick one.\nPlausible? "
    path = write_task(tmp_path / "task.json", [ex, ex, {**ex, "input": "Other."}], **task_data)
    task = load_bigbench_task(path)
    assert task.name == "crafted" and task.duplicates_dropped == 1 and len(task.examples) == 2
    assert task.examples[0].choices == ("d", "b", "a", "c") and task.examples[0].gold == 2
    assert task.examples[1].context == "Answer yes or no.\nStatement: Other.\nPlausible? "
    assert task.chance == pytest.approx(0.25)


BAD_EXAMPLES = [
    ({"target_scores": {"a": 1, "b": 0}}, "examples\\[1\\]: 'input' must be a string"),
    ({"input": "x", "target_scores": {"a": 1}}, "examples\\[1\\]: 'target_scores' must map at least two"),
    (
        {"input": "x", "target_scores": {"a": 1, "b": 2}},
        "examples\\[1\\]: the score of choice 'b' must be a number",
    ),
    ({"input": "x", "target_scores": {"a": True, "b": 0}}, "examples\\[1\\]: the score of choice 'a'"),
    ({"input": "x", "target_scores": {"a": 0, "b": 0}}, "examples\\[1\\]: no choice is scored above"),
    ({"input": "x", "target_scores": {"": 1, "b": 0}}, "examples\\[1\\]: an empty choice"),
    (
        {"input": "x\ud800", "target_scores": {"a": 1, "b": 0}},
        "examples\\[1\\]: its prompt is not valid Unicode",
    ),
    (["not", "an", "object"], "examples\\[1\\]: expected an object"),
]


@pytest.mark.parametrize("bad,message", BAD_EXAMPLES)
def test_bad_example_is_refused_naming_file_and_example(tmp_path, bad, message):
    good = {"input": "fine", "target_scores": {"a": 1, "b": 0}}
    path = write_task(tmp_path / "bad_task.json", [good, bad])
    with pytest.raises(EvalError, match=f"bad_task.json: {message}"):
        load_bigbench_task(path)


def test_bad_task_file_is_refused_naming_it(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(EvalError, match="nope.json: cannot read"):
        load_bigbench_task(missing)
    broken = tmp_path / "broken.json"
    broken.write_text('{"examples": [', encoding="utf-8")
    with pytest.raises(EvalError, match="broken.json: not a valid JSON task file"):
        load_bigbench_task(broken)
    with pytest.raises(EvalError, match="empty.json: expected a JSON object with a non-empty 'examples'"):
        load_bigbench_task(write_task(tmp_path / "empty.json", []))
    prefix = write_task(
        tmp_path / "prefix.json", [{"input": "x", "target_scores": {"a": 1, "b": 0}}], task_prefix=3
    )
    with pytest.raises(EvalError, match="prefix.json: 'task_prefix' must be a string"):
        load_bigbench_task(prefix)


def test_installed_task_name_without_task_data_says_how_to_install(tmp_path):
    with pytest.raises(EvalError, match="setup_assets prepare"):
        load_bigbench_task(BIGBENCH.tasks[0], home=tmp_path)


# ----------------------------------------------------------------------------------------------------------
# accuracy
# ----------------------------------------------------------------------------------------------------------


def test_accuracy_on_a_case_whose_answer_is_known(bytes_model):
    """With one token per byte, a choice that extends another has a strictly lower summed log-likelihood
    (each extra byte costs -log p > 0): the summed score always picks the shorter one."""
    model = load_eval_model(str(bytes_model))
    short, long = "ab", "abcdefgh"
    examples = [
        MCExample(f"Q{i}: which?\nA: ", (short, long), (1.0, 0.0))
        for i in range(3)  # right: the short one
    ] + [MCExample("Q3: which?\nA: ", (long, short), (1.0, 0.0))]  # right: the long one, never picked
    examples.append(MCExample("Q4: graded?\nA: ", (short, long, "abcd"), (0.5, 1.0, 0.0)))  # credit 0.5
    task = MCTask("known", tuple(examples))
    result = score_tasks(model, [task])["known"]
    credits = np.array([1.0, 1.0, 1.0, 0.0, 0.5])
    assert result.accuracy == pytest.approx(credits.mean())
    assert result.accuracy_stderr == pytest.approx(credits.std() / math.sqrt(5))
    assert result.chance == pytest.approx((0.5 * 4 + 0.5) / 5)
    assert result.examples == 5 and result.choices == 11 and result.boundary_tokens == 0

    # accuracy per byte against the per-choice log-likelihoods divided by the choices' UTF-8 bytes
    lls = choice_loglikelihoods(model, [(ex.context, c) for ex in examples for c in ex.choices])
    per_byte, k = [], 0
    for ex in examples:
        ll = np.array([s.loglikelihood for s in lls[k : k + len(ex.choices)]])
        k += len(ex.choices)
        per_byte.append(ex.scores[int(np.argmax(ll / np.array([len(c.encode()) for c in ex.choices])))])
    assert result.accuracy_per_byte == pytest.approx(np.mean(per_byte))


def test_binomial_stderr_and_subset(bytes_model):
    model = load_eval_model(str(bytes_model))
    examples = tuple(MCExample(f"Question {i}?\nA: ", ("x", "xyz"), (1.0, 0.0)) for i in range(10))
    task = MCTask("ten", examples)
    full = score_tasks(model, [task])["ten"]
    assert full.accuracy == 1.0 and full.accuracy_stderr == 0.0 and full.chance == 0.5
    half = score_tasks(model, [task], max_examples=4)["ten"]
    assert half.examples == 4
    chosen = np.random.RandomState(42).choice(10, 4, replace=False)
    assert [ex.context for ex in task.subset(4).examples] == [examples[i].context for i in sorted(chosen)]
    with pytest.raises(EvalError, match="task names repeat"):
        score_tasks(model, [task, task])


@pytest.mark.skipif(not task_data_installed(), reason="BIG-bench task files not installed (scripts/setup.sh)")
def test_installed_bigbench_tasks_load():
    for name in BIGBENCH.tasks:
        task = load_bigbench_task(name)
        assert task.name == name and len(task.examples) >= 70
        assert all(len(ex.choices) >= 2 for ex in task.examples)
    winowhy = load_bigbench_task("winowhy")
    assert winowhy.examples[0].context == (
        "Please answer the following questions about which words certain pronouns refer to.\n\nThe city "
        "councilmen refused the demonstrators a permit because they feared violence. The 'they' refers to the "
        "city councilmen because city councilmen are administrative so they are more likely to fear.\n"
        "The above reasoning is "
    )
    assert winowhy.examples[0].choices == ("correct", "incorrect") and winowhy.duplicates_dropped == 3
