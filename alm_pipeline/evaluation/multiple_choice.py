"""Multiple-choice tasks scored tokenizer-agnostically: the log-likelihood of each choice's bytes given the
context's bytes, summed (accuracy) and per byte (accuracy per byte), for any causal LM and its own tokenizer.

Tasks are BIG-bench JSON tasks (:func:`load_bigbench_task`: a ``task.json`` file, or the short name of one
that ``python -m alm_pipeline.setup_assets prepare`` installed) or :class:`MCTask` objects built directly.

**Prompt (BIG-bench's zero-shot format, as ``bigbench`` 1.0.0 builds it).** For an example with ``input`` and
``target_scores``, the context is::

    task_prefix + example_input_prefix + input [+ choice_prefix + choice_prefix.join(listed)] + example_output_prefix

with the task's own prefixes, defaulting to ``""``, ``"\\nQ: "``, ``"\\nA: "`` and ``"\\n  choice: "``; the bracket
is there when ``append_choices_to_input`` is true (the default), ``listed`` being the sorted choices permuted
by ``numpy.random.RandomState(42)``, as BIG-bench does. Each choice (a ``target_scores`` key) is scored as the
continuation of the context, directly appended (no separator). Exact duplicate examples are dropped, as
BIG-bench does. With ``max_examples``, the examples scored are BIG-bench's own subset,
``RandomState(42).choice(n, max_examples, replace=False)``.

**Log-likelihood of a continuation** (:func:`choice_loglikelihoods`; lm-evaluation-harness 0.4.13's
``loglikelihood`` convention for causal models):

1. Trailing whitespace of the context moves to the start of the continuation (``"A: "`` + ``"Yes"`` is scored as
   ``"A:"`` + ``" Yes"``), so that the word-boundary space is tokenized with the word.
2. Context and continuation are each unicode-normalized as the tokenizer does (if it does), joined, and the
   whole string is encoded once as plain text (:meth:`ByteView.encode`, exact byte offsets) with the
   tokenizer's own prefix special tokens (BOS, if it adds one) and no suffix (no EOS).
3. The scored tokens are those whose bytes end after the context's last byte. Their log-probabilities
   (fp32 log-softmax over the tokenizer's ids, LM head in slices: :meth:`EvalModel.token_stats`) are summed
   in float64. When the first scored token has nothing before it (an empty context, or one token spanning
   the whole context, with no BOS), the tokenizer's BOS id, else its EOS id, is put before it, as
   lm-evaluation-harness does for an empty context.
4. A token that covers bytes of both the context and the continuation is scored (it is part of the choice);
   such choices are counted (``boundary_tokens``). Where there is none, the scored tokens are exactly the
   continuation's and the numbers are lm-evaluation-harness's (checked by
   ``benchmarks/check_multiple_choice_vs_lm_eval.py``).
5. A sequence longer than ``max_length`` tokens loses its oldest tokens (left truncation, as
   lm-evaluation-harness); the continuation itself is never cut (a choice that does not fit is an error).

The choices of one question share every token before their first scored one, so that prefix runs once and its
KV cache serves all of them (same numbers as scoring each whole sequence, checked on the first question).

**Metrics** (:class:`MCResult`). Per example, the predicted choice is the argmax (first on ties) of the summed
log-likelihood (*accuracy*), or of the log-likelihood divided by the UTF-8 bytes of the choice string, without
the moved whitespace (*accuracy per byte*; lm-evaluation-harness's ``acc_bytes``; its ``acc_norm`` divides by
characters instead, the same for ASCII choices). The example's credit is the ``target_scores`` value of the
predicted choice (BIG-bench's ``multiple_choice_grade``: 1 right, 0 wrong); accuracy is the mean credit, with
the standard error ``std(credit) / sqrt(n)`` (the binomial ``sqrt(p (1 - p) / n)`` for 0/1 scores). Chance is
the mean over examples of the mean target score (1/k for one right answer among k choices), BIG-bench's
``low_score``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from alm_pipeline.evaluation.models import EvalError

if TYPE_CHECKING:
    from alm_pipeline.evaluation.models import EvalModel

__all__ = [
    "BIGBENCH_SEED",
    "MULTIPLE_CHOICE_CONVENTION",
    "ChoiceScore",
    "MCExample",
    "MCResult",
    "MCTask",
    "bigbench_context",
    "choice_loglikelihoods",
    "load_bigbench_task",
    "score_tasks",
]

BIGBENCH_SEED = 42  # bigbench's JsonTask default random_seed: choice listing order and max_examples subsets
MULTIPLE_CHOICE_CONVENTION = (
    "score of a choice = sum of log p over the tokens whose bytes end after the context (context and choice "
    "encoded together, the context's trailing whitespace moved to the choice, the tokenizer's BOS if it adds "
    "one, else BOS/EOS only where nothing precedes the first scored token); accuracy: argmax of the score; "
    "accuracy per byte: argmax of score / UTF-8 bytes of the choice; credit = the choice's target score"
)
_DEFAULT_PREFIXES = {
    "task_prefix": "",
    "example_input_prefix": "\nQ: ",
    "example_output_prefix": "\nA: ",
    "choice_prefix": "\n  choice: ",
}


# ----------------------------------------------------------------------------------------------------------
# tasks
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice question: the context, the choices (each scored as the context's continuation) and
    each choice's target score (1 right, 0 wrong; BIG-bench's ``target_scores``)."""

    context: str
    choices: tuple[str, ...]
    scores: tuple[float, ...]
    ref: str = ""  # where it comes from, for error messages ("<file>: examples[3]")

    @property
    def gold(self) -> int:
        """Index of the (first) best-scored choice."""
        return int(np.argmax(self.scores))


@dataclass(frozen=True)
class MCTask:
    """A named list of :class:`MCExample` (see :func:`load_bigbench_task`)."""

    name: str
    examples: tuple[MCExample, ...]
    source: str = ""
    duplicates_dropped: int = 0

    @property
    def chance(self) -> float:
        """Expected credit of a uniformly random choice: the mean over examples of the mean target score."""
        return float(np.mean([np.mean(ex.scores) for ex in self.examples]))

    def subset(self, max_examples: int | None, seed: int = BIGBENCH_SEED) -> MCTask:
        """BIG-bench's zero-shot subset of at most ``max_examples`` examples (file order kept)."""
        n = len(self.examples)
        if max_examples is None or max_examples >= n:
            return self
        if max_examples < 1:
            raise EvalError(f"max_examples must be >= 1, got {max_examples}")
        chosen = np.random.RandomState(seed).choice(n, max_examples, replace=False)
        keep = tuple(self.examples[i] for i in sorted(chosen.tolist()))
        return MCTask(self.name, keep, self.source, self.duplicates_dropped)


def bigbench_context(task_data: dict, example: dict) -> str:
    """The zero-shot context BIG-bench 1.0.0 builds for ``example`` of a task (module docstring)."""
    pre = {key: task_data.get(key, default) for key, default in _DEFAULT_PREFIXES.items()}
    text = example["input"]
    if task_data.get("append_choices_to_input", True):
        listed = np.random.RandomState(BIGBENCH_SEED).permutation(sorted(example["target_scores"]))
        text = text + pre["choice_prefix"] + pre["choice_prefix"].join(str(c) for c in listed)
    return pre["task_prefix"] + pre["example_input_prefix"] + text + pre["example_output_prefix"]


def load_bigbench_task(spec: str | os.PathLike[str], home: str | os.PathLike[str] | None = None) -> MCTask:
    """A BIG-bench JSON task as an :class:`MCTask`: ``spec`` is a ``task.json`` path or the name of a task that
    the set-up step installs (:data:`alm_pipeline.assets.BIGBENCH`, looked up under ``home``).

    Refused with an :class:`EvalError` naming the file (and ``examples[i]``): unreadable or invalid JSON, no
    ``examples`` list, an example without a string ``input`` or with fewer than two ``target_scores``, an empty
    choice, a score that is not a number in [0, 1], no choice scored above the others, text that is not valid
    Unicode (lone surrogates), prefixes that are not strings."""
    from alm_pipeline.assets import BIGBENCH, bigbench_task_file

    text = os.fspath(spec)
    if text in BIGBENCH.tasks and not os.path.exists(text):
        try:
            path = bigbench_task_file(text, home)
        except FileNotFoundError as err:
            raise EvalError(str(err)) from None
    else:
        path = Path(text).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise EvalError(f"{path}: cannot read the task file ({err.strerror or err})") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise EvalError(f"{path}: not a valid JSON task file ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list) or not data["examples"]:
        raise EvalError(f"{path}: expected a JSON object with a non-empty 'examples' list")
    for key in (*_DEFAULT_PREFIXES, "name"):
        if key in data and not isinstance(data[key], str):
            raise EvalError(f"{path}: '{key}' must be a string, got {type(data[key]).__name__}")
    if not isinstance(data.get("append_choices_to_input", True), bool):
        raise EvalError(f"{path}: 'append_choices_to_input' must be true or false")

    examples: list[MCExample] = []
    seen: set[str] = set()
    for i, raw in enumerate(data["examples"]):
        ref = f"{path}: examples[{i}]"
        _check_example(raw, ref)
        key = json.dumps(raw)
        if key in seen:
            continue
        seen.add(key)
        context = bigbench_context(data, raw)
        _check_text(context, ref, "its prompt")
        examples.append(
            MCExample(
                context=context,
                choices=tuple(raw["target_scores"]),
                scores=tuple(float(v) for v in raw["target_scores"].values()),
                ref=ref,
            )
        )
    name = data.get("name") or (path.parent.name if path.stem == "task" else path.stem)
    return MCTask(name, tuple(examples), str(path), len(data["examples"]) - len(examples))


def _check_example(raw: object, ref: str) -> None:
    if not isinstance(raw, dict):
        raise EvalError(f"{ref}: expected an object, got {type(raw).__name__}")
    if not isinstance(raw.get("input"), str):
        raise EvalError(f"{ref}: 'input' must be a string")
    scores = raw.get("target_scores")
    if not isinstance(scores, dict) or len(scores) < 2:
        raise EvalError(f"{ref}: 'target_scores' must map at least two choices to scores")
    for choice, value in scores.items():
        if not choice:
            raise EvalError(f"{ref}: an empty choice in 'target_scores'")
        _check_text(choice, ref, f"choice {choice!r}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise EvalError(
                f"{ref}: the score of choice {choice!r} must be a number in [0, 1], got {value!r}"
            )
    if max(scores.values()) <= min(scores.values()):
        raise EvalError(f"{ref}: no choice is scored above the others ({scores})")


def _check_text(text: str, ref: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise EvalError(f"{ref}: {what} is not valid Unicode (a lone surrogate)") from None


# ----------------------------------------------------------------------------------------------------------
# log-likelihoods
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChoiceScore:
    """The log-likelihood (nats, float64 sum of fp32 log-probabilities) of a continuation given its context."""

    loglikelihood: float
    tokens: int  # scored tokens
    boundary_token: bool  # the first scored token also covers bytes of the context
    truncated: bool  # the sequence lost its oldest tokens to max_length


@dataclass(frozen=True)
class _Encoded:
    ids: np.ndarray
    first: int  # index of the first scored token
    boundary_token: bool
    truncated: bool


def _encode_pair(model: EvalModel, context: str, continuation: str, max_length: int, ref: str) -> _Encoded:
    from alm_pipeline.pipeline.byteview import TokenizerMismatchError

    view = model.view
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
    context = view.normalize_text(context)
    continuation = view.normalize_text(continuation)
    if not continuation:
        raise EvalError(f"{ref}: empty continuation")
    split = len(context.encode("utf-8"))
    try:
        enc = view.encode(context + continuation, add_special_tokens=False, doc_ref=ref)
    except (TokenizerMismatchError, UnicodeEncodeError) as err:
        raise EvalError(f"{err}; the model's tokenizer cannot represent this text exactly") from None
    ends = enc.offsets.astype(np.int64)
    # the first token ending after the context (with an empty context, the first token: a SentencePiece
    # dummy-prefix piece covers no byte but belongs to the continuation)
    first = int(np.searchsorted(ends, split, side="right")) if split else 0
    starts = np.concatenate([[0], ends[:-1]])
    boundary_token = bool(first < len(ends) and starts[first] < split)
    prefix = list(view.prefix_ids)
    if not prefix and first == 0:
        lone = view.bos_id if view.bos_id is not None else view.eos_id
        if lone is None:
            raise EvalError(
                f"{ref}: the first scored token has nothing before it and the tokenizer has neither a BOS nor an "
                "EOS token to put there"
            )
        prefix = [lone]
    ids = np.concatenate([np.asarray(prefix, dtype=np.int64), enc.token_ids.astype(np.int64)])
    first += len(prefix)
    truncated = len(ids) > max_length
    if truncated:
        cut = len(ids) - max_length
        if cut >= first:
            raise EvalError(
                f"{ref}: the continuation {continuation!r} alone is {len(ids) - first} tokens; with at least one "
                f"token of context it does not fit in max_length={max_length}"
            )
        ids, first = ids[cut:], first - cut
    return _Encoded(ids, first, boundary_token, truncated)


def choice_loglikelihoods(
    model: EvalModel,
    requests: Sequence[tuple[str, str]],
    *,
    refs: Sequence[str] | None = None,
    max_length: int | None = None,
    batch_tokens: int = 8192,
    share_context: bool = True,
) -> list[ChoiceScore]:
    """The log-likelihood of each ``(context, continuation)`` under the module's convention, in request order.

    With ``share_context`` (default), requests whose sequences share every token before the first scored one
    (the choices of one question) run that shared prefix once and reuse its KV cache
    (:meth:`EvalModel.continuation_logprobs`); the first such group is also scored the plain way and, should
    the two disagree beyond the LM-head self-check tolerance, every request is scored the plain way. The
    plain way: whole sequences, sorted by length and packed into batches of at most ``batch_tokens`` padded
    tokens. ``max_length`` defaults to the model's position limit (2048 when it has none). ``refs[i]`` names
    request ``i`` in error messages."""
    from alm_pipeline.modeling import length_batches, pad_batch

    if max_length is None:
        max_length = model.max_positions or 2048
    if max_length < 2:
        raise EvalError(f"max_length must be >= 2, got {max_length}")
    if batch_tokens < 1:
        raise EvalError(f"batch_tokens must be >= 1, got {batch_tokens}")
    encoded = [
        _encode_pair(model, context, continuation, max_length, refs[i] if refs else f"request {i}")
        for i, (context, continuation) in enumerate(requests)
    ]
    view = model.view
    pad_id = view.pad_id if view.pad_id is not None and 0 <= view.pad_id < view.vocab_size else 0

    def plain(indices: list[int]) -> dict[int, float]:
        out: dict[int, float] = {}
        for batch in length_batches([len(encoded[i].ids) for i in indices], batch_tokens):
            rows = [indices[j] for j in batch]
            ids, mask = pad_batch([encoded[i].ids for i in rows], pad_id)
            logprob = model.token_stats(ids, mask).token_logprob.double().cpu()
            for row, i in enumerate(rows):
                out[i] = float(logprob[row, encoded[i].first : len(encoded[i].ids)].sum())
        return out

    sums: dict[int, float] = {}
    if share_context:
        sums = _shared_prefix_sums(model, encoded, pad_id, plain)
    sums.update(plain([i for i in range(len(encoded)) if i not in sums]))
    return [
        ChoiceScore(sums[i], len(e.ids) - e.first, e.boundary_token, e.truncated)
        for i, e in enumerate(encoded)
    ]


def _shared_prefix_sums(
    model: EvalModel, encoded: list[_Encoded], pad_id: int, plain: Callable[[list[int]], dict[int, float]]
) -> dict[int, float]:
    """Scores of the requests that share their unscored prefix with another request, computed one group at a
    time through :meth:`EvalModel.continuation_logprobs`; ``{}`` when the model has no such path or the first
    group disagrees with ``plain``."""
    from alm_pipeline.modeling import self_check_tolerance

    groups: dict[bytes, list[int]] = {}
    for i, e in enumerate(encoded):
        if not e.truncated and e.first >= 1:
            groups.setdefault(e.ids[: e.first].tobytes(), []).append(i)
    out: dict[int, float] = {}
    checked = False
    for group in (g for g in groups.values() if len(g) >= 2):
        head = encoded[group[0]]
        logprobs = model.continuation_logprobs(
            head.ids[: head.first].tolist(),
            [encoded[i].ids[encoded[i].first :].tolist() for i in group],
            pad_id,
        )
        if logprobs is None:
            return {}
        values = {i: float(lp.double().sum()) for i, lp in zip(group, logprobs, strict=True)}
        if not checked:
            reference = plain(group)
            tolerance = self_check_tolerance(model.dtype) * max(
                len(encoded[i].ids) - encoded[i].first for i in group
            )
            if any(abs(values[i] - reference[i]) > tolerance for i in group):
                return {}
            checked = True
        out.update(values)
    return out


# ----------------------------------------------------------------------------------------------------------
# accuracy
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MCResult:
    """A task's zero-shot multiple-choice scores (module docstring for the definitions)."""

    task: str
    examples: int
    accuracy: float
    accuracy_stderr: float
    accuracy_per_byte: float
    accuracy_per_byte_stderr: float
    chance: float
    choices: int  # choices scored, over all examples
    scored_tokens: int
    boundary_tokens: int  # choices whose first scored token also covers context bytes
    truncated: int  # choices whose sequence lost context tokens to max_length

    def to_json(self) -> dict:
        return asdict(self)


def _mean_and_stderr(credits: np.ndarray) -> tuple[float, float]:
    return float(credits.mean()), float(credits.std() / math.sqrt(len(credits)))


def score_tasks(
    model: EvalModel,
    tasks: Sequence[MCTask],
    *,
    max_examples: int | None = None,
    max_length: int | None = None,
    batch_tokens: int = 8192,
    progress: Callable[[str], None] | None = None,
) -> dict[str, MCResult]:
    """Zero-shot accuracy and accuracy per byte of ``model`` on each task (``{task name: MCResult}``), on at most
    ``max_examples`` examples per task (BIG-bench's subset: :meth:`MCTask.subset`)."""
    names = [task.name for task in tasks]
    if len(set(names)) != len(names):
        raise EvalError(f"task names repeat: {names}")
    results: dict[str, MCResult] = {}
    t0 = time.time()
    for task in tasks:
        task = task.subset(max_examples)
        if not task.examples:
            raise EvalError(f"task {task.name}: no examples")
        requests, refs = [], []
        for k, ex in enumerate(task.examples):
            if len(ex.choices) != len(ex.scores) or len(ex.choices) < 2:
                raise EvalError(f"{ex.ref or task.name}: needs at least two choices, each with a score")
            for choice in ex.choices:
                requests.append((ex.context, choice))
                refs.append(f"{ex.ref or f'task {task.name} example {k}'}, choice {choice!r}")
        scores = choice_loglikelihoods(
            model, requests, refs=refs, max_length=max_length, batch_tokens=batch_tokens
        )
        credit, credit_per_byte = [], []
        start = 0
        for ex in task.examples:
            part = scores[start : start + len(ex.choices)]
            start += len(ex.choices)
            ll = np.array([s.loglikelihood for s in part])
            nbytes = np.array([len(model.view.normalize_text(c).encode("utf-8")) for c in ex.choices])
            credit.append(ex.scores[int(np.argmax(ll))])
            credit_per_byte.append(ex.scores[int(np.argmax(ll / nbytes))])
        acc, acc_se = _mean_and_stderr(np.array(credit))
        acc_b, acc_b_se = _mean_and_stderr(np.array(credit_per_byte))
        results[task.name] = MCResult(
            task=task.name,
            examples=len(task.examples),
            accuracy=acc,
            accuracy_stderr=acc_se,
            accuracy_per_byte=acc_b,
            accuracy_per_byte_stderr=acc_b_se,
            chance=task.chance,
            choices=len(scores),
            scored_tokens=sum(s.tokens for s in scores),
            boundary_tokens=sum(s.boundary_token for s in scores),
            truncated=sum(s.truncated for s in scores),
        )
        if progress:
            progress(
                f"multiple choice: {task.name}: accuracy {acc:.3f} ± {acc_se:.3f} (chance {task.chance:.3f}), "
                f"{len(task.examples)} examples ({time.time() - t0:.1f}s)"
            )
    return results
