"""Class weighting on an imbalanced site, and augmentation on a small one: measured.

``python -m simulations.benchmarks.imbalance [--model minilm] [--seeds 0 1 2]
[--steps 40] [--dataset builtin | PATH]``

In-process and on one site (``common.training.train_local`` then the task's
``evaluate``, no Flower): the question is what the local objective does, which is the
same at every site of a federation. Two experiments, each over the seeds given:

- **imbalance**: the training rows subsampled so that the last class is 10 % of them
  (the others keep their share), trained with ``class-weighting`` none,
  inverse-frequency and effective-number; macro-F1 and the worst class recall on the
  untouched (balanced as the source is) eval split.
- **small data**: 200 training rows, ``augment`` none vs both.

Prints one line per run and a JSON summary (mean and the values per seed); writes it to
``--output`` when given. The numbers are whatever this invocation measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import pandas as pd


def _run(overrides: dict[str, Any], *, keep: str, seed: int) -> dict[str, float]:
    import datasets
    import torch

    from common.config import RunConfig
    from common.data import load_splits, split_for_local_eval
    from common.model import build_model
    from common.specs import EncodeSpec, ModelSpec
    from common.tasks import get_task
    from common.tasks.base import EvalContext
    from common.training import train_local

    cfg = RunConfig.from_flower({**overrides, "seed": seed})
    splits = load_splits(cfg)
    train, _ = split_for_local_eval(splits.train, fraction=0.01, seed=seed)
    train = _subsample(train, keep=keep, seed=seed, num_classes=len(splits.label_names))
    task = get_task(cfg.task)
    model, tokenizer = build_model(ModelSpec.of(cfg, splits.label_names))
    spec = EncodeSpec.of(cfg, tokenizer_path=tokenizer.name_or_path)
    data = task.encode(datasets.Dataset.from_pandas(train, preserve_index=False), tokenizer,
                       spec=spec)
    started = time.perf_counter()
    train_local(model, data, cfg, task=task, seed=seed, device=torch.device("cpu"),
                pad_token_id=tokenizer.pad_token_id)
    metrics = task.evaluate(model, tokenizer, task.encode(splits.eval, tokenizer, spec=spec),
                            EvalContext(batch_size=64, device=torch.device("cpu"),
                                        precision="fp32"))
    return {"f1_macro": metrics["f1_macro"], "recall_min": metrics["recall_min"],
            "accuracy": metrics["accuracy"], "train_rows": len(data),
            "seconds": time.perf_counter() - started}


def _subsample(rows: Any, *, keep: str, seed: int, num_classes: int) -> Any:
    """The training rows as a data frame: ``keep`` "minority" cuts the last class to
    10 % of the rows, "200" keeps 200 random rows."""
    frame = rows.to_pandas()
    if keep == "200":
        return frame.sample(n=min(200, len(frame)), random_state=seed)
    last = num_classes - 1
    others = frame[frame["label"] != last]
    minority = frame[frame["label"] == last]
    wanted = min(max(1, round(len(others) / 9)), len(minority))  # 10 % of the result
    mixed = pd.concat([others, minority.sample(n=wanted, random_state=seed)])
    return mixed.sample(frac=1.0, random_state=seed)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--dataset", default="builtin")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    base = {"model": args.model, "dataset": args.dataset, "builtin-examples": 2000,
            "max-length": 32, "batch-size": 16, "local-steps": args.steps,
            "learning-rate": 0.002, "precision": "fp32", "device": "cpu"}
    experiments = {
        "imbalance": ("minority", [{"class-weighting": "none"},
                                   {"class-weighting": "inverse-frequency"},
                                   {"class-weighting": "effective-number"}]),
        "small-data": ("200", [{"augment": "none"}, {"augment": "both"}]),
    }
    summary: dict[str, Any] = {"settings": {**base, "seeds": args.seeds}}
    for name, (keep, variants) in experiments.items():
        for variant in variants:
            label = f"{name} {' '.join(f'{k}={v}' for k, v in variant.items())}"
            runs = [_run({**base, **variant}, keep=keep, seed=seed) for seed in args.seeds]
            for seed, run in zip(args.seeds, runs, strict=True):
                print(f"[bench] {label} seed {seed}: macro-F1 {run['f1_macro']:.4f}  "
                      f"recall_min {run['recall_min']:.4f}  ({run['train_rows']} rows, "
                      f"{run['seconds']:.1f} s)", flush=True)
            summary[label] = {
                metric: {"mean": statistics.mean(r[metric] for r in runs),
                         "per_seed": [r[metric] for r in runs]}
                for metric in ("f1_macro", "recall_min", "accuracy")}
    print(json.dumps(summary, indent=2))
    if args.output:
        args.output.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


if __name__ == "__main__":
    main()
