"""One federated fine-tuning run on the server side, from config to exported model.

Every run that got as far as its folder ends with ``outcome.json`` (see
server/run_outputs.py): ``completed`` with ``final/`` (the round ``select-model``
chose, server/model_selection.py, named in ``selection``), or ``failed`` with the reason,
also when no round aggregated (then ``RunFailed`` is raised and no ``final/`` written:
the initial model is not a result) or when anything else raised.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from common.config import RunConfig
from common.data import load_server_eval, load_site_data, load_splits
from common.model import get_exchanged_state, get_model, select_device, set_exchanged_state
from common.specs import DataSpec, EncodeSpec, ModelSpec
from common.tasks import TASK_METRICS, get_task
from server.export import export_final_model
from server.grid import NodeWaitingGrid
from server.metric_sinks import open_sinks
from server.model_selection import Selection
from server.preflight import NO_CENTRAL_EVALUATION, check_new_run_folder
from server.privacy import PrivacyReport, sampled_per_round, wrap_with_dp
from server.recorder import EarlyStop, RoundRecorder, arrays_to_state
from server.results import ResultsError
from server.run_outputs import (
    AppRecord,
    RunFailed,
    RunOutputs,
    check_resume,
    no_aggregation_message,
    outcome_of,
    rounds_aggregated,
    run_folder,
    write_outcome,
)
from server.secure_aggregation import SecureAggregator
from server.strategies import build_strategy, restore_strategy_state
from server.tracked_strategy import TrackedStrategy
from server.validation import array_specs

log = logging.getLogger(__name__)


def run_federation(grid: Grid, cfg: RunConfig, *, app: AppRecord | None = None) -> Path:
    """Run ``cfg.num_server_rounds`` rounds (or the rest of them, when resuming).

    Returns the run folder, which then holds config.json, results.jsonl, checkpoints,
    the final model and outcome.json (see server/run_outputs.py); ``app``, the FAB
    Flower ran, is added to its app.json.

    Raises
    ------
    RunFailed
        No round aggregated a client update (outcome.json says why, no final/).
    ConfigError
        ``resume-from`` names no resumable run, or a new run's folder holds an earlier
        run (checked before anything is written, also when no preflight ran).
    """
    outputs = RunOutputs(run_folder(cfg), keep_checkpoints=cfg.keep_checkpoints)
    if cfg.resume_from:
        check_resume(outputs.folder, cfg)
    else:
        check_new_run_folder(cfg)
    try:
        return _run(grid, cfg, outputs, app)
    except RunFailed:
        raise  # its outcome is written
    except BaseException as exc:
        # Only a folder that is this run's: never an older run's that shares the name.
        if outputs.started or cfg.resume_from:
            message = f"the server stopped with {type(exc).__name__}: {exc}"
            try:
                rows = outputs.read_results()
            except ResultsError as damaged:  # the outcome is still written
                rows = []
                message += f"; results.jsonl cannot be read: {damaged}"
            if rounds_aggregated(rows):  # recorded rounds are kept: say how to go on
                message += (f"; rounds up to {rows[-1].round} are recorded with their "
                            f"checkpoints: continue with resume-from={outputs.folder}")
            write_outcome(outputs.folder, outcome_of(
                rows, status="failed", message=message, final_model=False))
        raise


def _run(grid: Grid, cfg: RunConfig, outputs: RunOutputs, app: AppRecord | None) -> Path:
    """``run_federation`` once the run folder is known (and any resume checked)."""
    task = get_task(cfg.task)
    label_names, eval_set = load_server_eval(cfg)
    if eval_set is None:
        print(f"[fedsft] {NO_CENTRAL_EVALUATION}", flush=True)
    device = select_device(cfg.device)
    model, tokenizer = get_model(ModelSpec.of(cfg, label_names), device,
                                 max_length=cfg.max_length)
    encoding = EncodeSpec.of(cfg, tokenizer_path=tokenizer.name_or_path)
    eval_data = None if eval_set is None else task.encode(eval_set, tokenizer, spec=encoding)
    validation_data = None
    if cfg.validation_fraction > 0:  # RunConfig refuses it when the server reads no dataset
        validation_set = load_splits(DataSpec.of(cfg)).validation
        assert validation_set is not None  # load_splits holds it out at this fraction
        validation_data = task.encode(validation_set, tokenizer, spec=encoding)
    retention_data = None
    if cfg.retention_dataset:  # the forgetting monitor: one file, read as a site's is
        retention = load_site_data(cfg.retention_dataset, DataSpec.of(cfg), label_names)
        retention_data = task.encode(retention, tokenizer, spec=encoding)

    # The key query is each node's first message (a cold ClientApp under load can take
    # a minute): one that times out stays in flight, and in a simulation its late end
    # writes back the node's older context, losing the secure-aggregation keys stored
    # meanwhile. A node gets as long to answer it as to answer a round.
    waiting_grid = NodeWaitingGrid(
        grid, min_nodes=cfg.min_nodes, wait_timeout=cfg.node_wait_timeout,
        query_timeout=cfg.round_timeout,
    )
    strategy = build_strategy(cfg)
    privacy = None
    if cfg.dp_enabled:
        # Flower's DP wrappers calibrate noise to the number sampled per round.
        connected = len(waiting_grid.get_node_ids())
        sampled = sampled_per_round(connected, cfg.fraction_train)
        strategy = wrap_with_dp(strategy, cfg, num_sampled=sampled)
        privacy = PrivacyReport(cfg, sampling_rate=sampled / connected)
    state = get_exchanged_state(model)
    exchanged_spec = array_specs(state)
    done_rounds = 0
    if cfg.resume_from:
        checkpoint = outputs.last_checkpoint()
        done_rounds, state = checkpoint.round, checkpoint.global_state
        restore_strategy_state(strategy, checkpoint.strategy_state)
        print(f"[fedsft] resuming {outputs.folder} after round {done_rounds}", flush=True)
    outputs.start(cfg, label_names)
    if app is not None:
        outputs.record_app(app)
    print(f"[fedsft] run folder: {outputs.folder}", flush=True)

    tracked = TrackedStrategy(
        strategy, exchanged_spec=exchanged_spec, seed=cfg.seed,
        encoding=cfg.encoding, min_replies=cfg.min_replies, round_offset=done_rounds,
        uniform_weights=cfg.dp_enabled, max_update_norm=cfg.max_update_norm,
        round_feedback=task.round_feedback(task.loss_spec(cfg)),
        headline_metric=TASK_METRICS[cfg.task][0].name,
        secure=SecureAggregator(
            threshold_fraction=cfg.secagg_threshold, clip_range=cfg.secagg_clip_range,
            max_weight=cfg.secagg_max_weight, timeout=cfg.round_timeout,
        ) if cfg.secure_aggregation else None,
    )
    sinks = open_sinks(cfg.metric_sinks, outputs.folder, outputs.folder.name,
                       cfg.to_flower())
    last_round = cfg.num_server_rounds
    stopped_early = None
    if privacy is not None:
        last_round = privacy.rounds_within_budget(cfg.num_server_rounds)
        if last_round < cfg.num_server_rounds:
            stopped_early = (f"privacy budget: stopping after round {last_round}; round "
                             f"{last_round + 1} would exceed dp-target-epsilon="
                             f"{cfg.dp_target_epsilon:g} (delta {cfg.dp_delta:g})")
            print(f"[fedsft] {stopped_early}", flush=True)
    recorder = RoundRecorder(
        cfg=cfg, task=task, model=model, tokenizer=tokenizer, eval_data=eval_data,
        device=device, strategy=tracked, outputs=outputs, total_rounds=cfg.num_server_rounds,
        last_round=last_round, privacy=privacy, sinks=sinks,
        validation_data=validation_data, retention_data=retention_data,
    )
    # Clients learn the label map from the server, so every site encodes labels alike.
    round_config = ConfigRecord({"label-names": list(label_names)})
    if done_rounds and (patience_spent := recorder.early_stop_reason()):
        # Resuming a run whose earlier rows already exhausted the patience.
        stopped_early, last_round = patience_spent, done_rounds
        print(f"[fedsft] {stopped_early}", flush=True)
    remaining = last_round - done_rounds
    final_state = state
    try:
        if remaining > 0:
            result = tracked.start(
                grid=waiting_grid,
                initial_arrays=ArrayRecord({k: Array(v) for k, v in state.items()}),
                num_rounds=remaining,
                timeout=cfg.round_timeout,
                train_config=round_config,
                evaluate_config=ConfigRecord(dict(round_config)),
                evaluate_fn=recorder,
            )
            final_state = arrays_to_state(result.arrays) if len(result.arrays) else state
    except EarlyStop as stop:
        # Raised after the round's checkpoint and results line (see server/recorder.py).
        stopped_early = str(stop)
        final_state = recorder.last_state if recorder.last_state is not None else state
    finally:
        for sink in sinks:
            sink.close()
    rows = outputs.read_results()
    if rounds_aggregated(rows) == 0:
        message = no_aggregation_message(outputs.folder, rows, stopped_early=stopped_early)
        write_outcome(outputs.folder, outcome_of(
            rows, status="failed", message=message, final_model=False,
            stopped_early=stopped_early))
        raise RunFailed(message)
    selection = recorder.selection()
    assert selection is not None  # a round aggregated, so the rows hold a round > 0
    set_exchanged_state(model, _selected_state(selection, recorder, outputs, final_state))
    paths = export_final_model(model, tokenizer, outputs.folder / "final")
    print(f"[fedsft] final model: {paths['model']} ({selection.note})", flush=True)
    print(f"[fedsft] results: {outputs.results_path}", flush=True)
    done = rounds_aggregated(rows)
    write_outcome(outputs.folder, outcome_of(
        rows, status="completed", final_model=True, stopped_early=stopped_early,
        selection=selection.to_json(),
        message=f"{done} round(s) aggregated a client update; final model in "
                f"{paths['model']}: {selection.note}"))
    return outputs.folder


def _selected_state(
    selection: Selection, recorder: RoundRecorder, outputs: RunOutputs,
    last_state: dict[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """The exchanged state of the selected round: in memory, or its checkpoint.

    ``last_state`` is the state after the last round of the rows (this attempt's, or
    the resumed checkpoint's when this attempt ran no round).
    """
    if selection.round == selection.last_round:
        return last_state
    if recorder.best_state is not None and recorder.best_state[0] == selection.round:
        return recorder.best_state[1]
    # The best round of an earlier attempt of a resumed run: the recorder kept its
    # checkpoint from being pruned.
    return outputs.load_checkpoint(selection.round).global_state
