"""The fedsft ClientApp: fine-tune the global state locally, reply with the new state.

Only the exchanged (trainable) tensors and scalar metrics leave the site; evaluation
replies carry metrics only. With ``lora-aggregation`` fedsa the site's own LoRA B
matrices stay in its node state (client/site_state.py) and are used for its training
and its federated evaluation. Under secure aggregation the task's site statistics leave
only masked, inside the update's sum.
"""

from __future__ import annotations

import logging
import math
import time
from typing import cast

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.attacks import attacker_partition, is_attacker
from client.compute import compute_metrics, start_gpu_measurement
from client.egress_audit import egress_audit_mod
from client.local_data import (
    client_key,
    data_stats_metrics,
    load_local_data,
    log_partition_warnings,
)
from client.outgoing import outgoing_update, plaintext_site_metrics
from client.sample_dp import train_with_dp_sgd
from client.secagg import STAGE, handle_stage
from client.site_state import keep_site_state, restore_site_state
from common.config import RunConfig
from common.model import get_exchanged_state, get_model, select_device, set_exchanged_state
from common.records import array_record, config_record, config_strs, numpy_arrays
from common.specs import DPSGDSpec, ModelSpec, TrainSpec
from common.tasks import get_task
from common.tasks.base import ClassTask, EvalContext, TrainContext
from common.training import derive_seed, train_local

log = logging.getLogger(__name__)
app = ClientApp(mods=[egress_audit_mod])


def _setup(msg: Message, context: Context):  # type: ignore[no-untyped-def]
    """Config, the received global state, the model holding it, and this site's data."""
    cfg = RunConfig.from_flower(context.run_config)
    config = config_record(msg.content, "config")
    label_names = config_strs(config, "label-names")
    device = select_device(cfg.device)
    model, tokenizer = get_model(ModelSpec.of(cfg, label_names), device,
                                 max_length=cfg.max_length)
    received = numpy_arrays(array_record(msg.content, "arrays"))
    set_exchanged_state(model, received)
    restore_site_state(model, context.state)  # fedsa: this site's own B; else a no-op
    try:
        data = load_local_data(cfg, context.node_config, label_names, tokenizer)
    except Exception:
        log.exception("fedsft client %s cannot load its data", context.node_id)
        raise  # Flower reports it to the server as a failed reply with the reason
    log_partition_warnings(data, context.node_config, context.state)  # simulation only
    return cfg, config, received, model, tokenizer, data, device


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer a secure-aggregation stage, or tell the server this client's stable key."""
    if STAGE in msg.content["config"]:
        return handle_stage(msg, context)
    key = client_key(context.node_config, context.node_id)
    return Message(RecordDict({"config": ConfigRecord({"client-key": key})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local fine-tuning on the site's data starting from the received global state."""
    cfg, config, received, model, tokenizer, data, device = _setup(msg, context)
    task = get_task(cfg.task)
    server_round = int(config["server-round"])
    key = client_key(context.node_config, context.node_id)
    attacker = False
    if cfg.attack != "none":  # simulation-only: the client knows its partition
        partition, partitions = attacker_partition(context.node_config)
        attacker = is_attacker(partition, num_partitions=partitions,
                               fraction=cfg.attack_fraction, seed=cfg.seed)
    train_data = data.train
    if attacker and cfg.attack == "label-flip":  # RunConfig: only for a task with classes
        train_data = cast(ClassTask, task).flip_labels(
            train_data, num_classes=len(config["label-names"]))
    seed = derive_seed(cfg.seed, server_round, key)
    privacy: dict[str, float] = {}
    loss_spec = task.loss_spec(cfg)
    start_gpu_measurement(device)
    if cfg.dp_sgd_enabled:
        result, privacy = train_with_dp_sgd(
            model, train_data, TrainSpec.of(cfg), dp=DPSGDSpec.of(cfg), task=task,
            loss_spec=loss_spec, seed=seed, device=device,
            pad_token_id=tokenizer.pad_token_id, state=context.state, round_config=config,
        )
    else:
        result = train_local(
            model, train_data, TrainSpec.of(cfg), task=task, loss_spec=loss_spec, seed=seed,
            device=device, proximal_mu=float(config.get("proximal-mu", 0.0)),
            pad_token_id=tokenizer.pad_token_id, round_config=config,
        )
    keep_site_state(model, context.state)  # fedsa: B stays here for the next round
    # What the run's keys ask of the site (label counts): masked under secure aggregation.
    statistics = task.site_metrics(train_data, spec=loss_spec,
                                   ctx=TrainContext(seed=seed, round_config=config))
    payload, extra = outgoing_update(
        get_exchanged_state(model), received, cfg=cfg, config=config, context=context,
        num_examples=result.num_examples,
        attack_seed=derive_seed(cfg.seed, server_round, key, "attack") if attacker else None,
        statistics=statistics,
    )
    arrays = ArrayRecord({k: Array(v) for k, v in payload.items()})
    # A DP-SGD round whose Poisson batches were all empty computed no loss (NaN): leave
    # it out rather than send a metric that is not a number.
    losses = {"train-loss": result.train_loss, "train-first-loss": result.first_loss}
    metrics = MetricRecord({
        **extra,
        **privacy,
        **{name: loss for name, loss in losses.items() if math.isfinite(loss)},
        "train-steps": result.steps,
        **compute_metrics(result, device),  # seconds, throughput, memory (client/compute.py)
        **data_stats_metrics(data, context.node_config, context.state),  # site opt-in
        **plaintext_site_metrics(statistics, config),
    })
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the global state (with fedsa: plus this site's own B) on this site's
    local eval split: metrics only."""
    cfg, config, _, model, tokenizer, data, device = _setup(msg, context)
    started = time.monotonic()
    if len(data.eval) == 0:
        metrics = MetricRecord({"num-examples": 0})
    else:
        task = get_task(cfg.task)
        result = task.evaluate(model, tokenizer, data.eval, EvalContext(
            batch_size=max(cfg.batch_size, 64), device=device, precision=cfg.precision,
            server_round=int(config.get("server-round", 0)), spec=task.eval_spec(cfg)))
        # Reply metric names: "eval-" + the task's metric name, dashed (eval-f1-macro).
        metrics = MetricRecord({
            "num-examples": int(result["num_examples"]),
            **{f"eval-{name.replace('_', '-')}": value
               for name, value in result.items() if name != "num_examples"},
            "eval-seconds": time.monotonic() - started,
        })
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
