"""Quickstart-style ClientApp: reload, re-tokenize, train, send the full weights back."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from hfbaseline.task import load_data, load_model, test, train

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    """Train the received full model on the local partition."""
    cfg = context.run_config
    model = load_model(cfg)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    trainloader, _, num_examples = load_data(
        int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]),
        cfg,
    )
    loss = train(model, trainloader, steps=int(cfg["local-steps"]),
                 lr=float(cfg["learning-rate"]))
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"train_loss": loss, "num-examples": num_examples}),
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    """Evaluate the received model; the reply carries the weights back as well."""
    cfg = context.run_config
    model = load_model(cfg)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, testloader, _ = load_data(
        int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]),
        cfg,
    )
    loss, accuracy = test(model, testloader)
    content = RecordDict({
        "arrays": ArrayRecord(model.state_dict()),
        "metrics": MetricRecord({"eval_loss": loss, "eval_acc": accuracy,
                                 "num-examples": len(testloader.dataset)}),
    })
    return Message(content=content, reply_to=msg)
