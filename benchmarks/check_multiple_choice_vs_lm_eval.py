"""Cross-check: alm-pipeline's multiple-choice log-likelihoods and accuracies against lm-evaluation-harness.

For each model and each BIG-bench task, the first ``--examples`` examples (alm-pipeline's zero-shot prompts,
:mod:`alm_pipeline.evaluation.multiple_choice`) are written to a JSON-lines file with a local lm-eval task
YAML (``dataset_path: json``, ``doc_to_text: context``, ``target_delimiter: ""``: lm-eval gets exactly the same
context and choice strings), lm-eval's ``HFLM`` (float32, CPU, batch size 1) scores them, and its per-choice
log-likelihoods (``log_samples``) are compared with :func:`choice_loglikelihoods`; its ``acc`` and
``acc_bytes`` with :func:`score_tasks`'s accuracy and accuracy per byte. Prints one row per (model, task) and
the largest absolute log-likelihood difference; exits 1 if it exceeds ``--tolerance``.

Models: ``smollm2-135m`` (the real model) and, for a tokenizer name (``mistral-tokenizer``: SentencePiece with
a BOS; ``gpt2-tokenizer``: no BOS; ``bytes``: one token per byte), a random small Llama with that tokenizer.
lm-eval 0.4.13 must be importable but is not a dependency of alm-pipeline: install it into a separate
environment that also sees this project's packages, e.g.::

    python3.11 -m venv /tmp/lmv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/lmv/lib/python3.11/site-packages/alm.pth
    /tmp/lmv/bin/pip install lm-eval==0.4.13
    PYTHONPATH=$PWD /tmp/lmv/bin/python benchmarks/check_multiple_choice_vs_lm_eval.py [--examples 5]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from models import random_llama  # noqa: E402

from alm_pipeline.assets import BIGBENCH, resolve_model  # noqa: E402
from alm_pipeline.evaluation.models import load_eval_model  # noqa: E402
from alm_pipeline.evaluation.multiple_choice import (  # noqa: E402
    MCTask,
    choice_loglikelihoods,
    load_bigbench_task,
    score_tasks,
)


def model_folder(name: str, workdir: Path) -> str:
    """The real SmolLM2, or a random small Llama with the named tokenizer."""
    if name == "smollm2-135m":
        return resolve_model(name)
    tokenizer_dir = workdir / f"tok-{name}"
    if name == "bytes":
        from alm_pipeline.pipeline.byte_tokenizer import build_byte_tokenizer

        build_byte_tokenizer().save_pretrained(str(tokenizer_dir))
    else:
        tokenizer_dir = Path(resolve_model(name))
    return random_llama(str(tokenizer_dir), workdir / f"llama-{name}", "small")


def write_lm_eval_task(task: MCTask, workdir: Path) -> str:
    """A JSON-lines file of the task's examples and an lm-eval task YAML reading it; returns the task name."""
    name = f"alm_check_{task.name}"
    data = workdir / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for ex in task.examples:
            f.write(json.dumps({"context": ex.context, "choices": list(ex.choices), "gold": ex.gold}) + "\n")
    (workdir / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: context\n"
        "doc_to_choice: choices\n"
        "doc_to_target: gold\n"
        'target_delimiter: ""\n'
        "metric_list:\n"
        "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        "  - {metric: acc_bytes, aggregation: mean, higher_is_better: true}\n",
        encoding="utf-8",
    )
    return name


def run_lm_eval(folder: str, names: list[str], workdir: Path) -> dict:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=folder, dtype="float32", device="cpu", batch_size=1)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=names,
        num_fewshot=0,
        task_manager=TaskManager(include_path=str(workdir)),
        log_samples=True,
        bootstrap_iters=0,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,mistral-tokenizer,gpt2-tokenizer,bytes")
    ap.add_argument(
        "--tasks", default=",".join(BIGBENCH.tasks), help="installed task names or task.json paths"
    )
    ap.add_argument("--examples", type=int, default=5, help="the first N examples of each task")
    ap.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed |Δ log-likelihood| (nats)")
    args = ap.parse_args()
    import datasets
    import lm_eval

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    datasets.disable_progress_bars()

    print(f"lm-eval {lm_eval.__version__}; {args.examples} examples per task")
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        os.environ.setdefault("HF_DATASETS_CACHE", str(workdir / "hf-datasets"))
        tasks = []
        for spec in args.tasks.split(","):
            task = load_bigbench_task(spec)
            tasks.append(MCTask(task.name, task.examples[: args.examples], task.source))
        names = {task.name: write_lm_eval_task(task, workdir) for task in tasks}
        header = f"{'model':<18} {'task':<26} {'choices':>7} {'max |Δll|':>10} {'acc ours/lm-eval':>17} {'acc/byte ours/lm-eval':>22} {'boundary':>8}"
        print(header)
        for model_name in args.models.split(","):
            t0 = time.time()
            folder = model_folder(model_name, workdir)
            theirs = run_lm_eval(folder, list(names.values()), workdir)
            model = load_eval_model(folder)
            ours = score_tasks(model, tasks)
            for task in tasks:
                samples = sorted(theirs["samples"][names[task.name]], key=lambda s: s["doc_id"])
                requests = [(ex.context, c) for ex in task.examples for c in ex.choices]
                mine = choice_loglikelihoods(model, requests)
                their_ll = [float(r[0]) for s in samples for r in s["filtered_resps"]]
                diff = max(abs(a.loglikelihood - b) for a, b in zip(mine, their_ll, strict=True))
                worst = max(worst, diff)
                res = theirs["results"][names[task.name]]
                r = ours[task.name]
                print(
                    f"{model_name:<18} {task.name:<26} {len(mine):>7} {diff:>10.2e} "
                    f"{r.accuracy:>8.3f}/{res['acc,none']:<8.3f} {r.accuracy_per_byte:>11.3f}/{res['acc_bytes,none']:<10.3f}"
                    f" {r.boundary_tokens:>8}"
                )
            print(f"  ({model_name}: {time.time() - t0:.0f}s)", flush=True)
    print(f"largest |Δ log-likelihood| over all choices: {worst:.2e} nats (tolerance {args.tolerance:g})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
