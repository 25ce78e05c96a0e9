"""What a site keeps of its own model between rounds (``lora-aggregation`` fedsa).

With FedSA-LoRA the LoRA B matrices train at every site but never leave it: after
local training the client stores them in the node's ``context.state`` (which Flower
keeps between rounds, as it keeps the top-k residual and the DP-SGD accountant), and
puts them back into the model each time the site is sampled, for training and for
federated evaluation, on top of the global A and head it received. A site that has not
trained yet uses B at its initialisation (zero for Linear layers). For every other
model the site state is empty and nothing is stored.

The state lives in the node's memory: a restarted SuperNode, or a resumed simulation
(new client processes), has lost it, which is why the config refuses ``resume-from``
with fedsa.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, RecordDict

from common.model import get_site_state, set_site_state
from common.records import array_record, numpy_arrays

SITE_STATE_KEY = "site-state"  # in context.state: this site's own B matrices (fedsa)


def restore_site_state(model: torch.nn.Module, state: RecordDict) -> None:
    """Put this site's kept tensors back into ``model``, which ``set_exchanged_state``
    has just reset to their init; a site with none stored keeps the init."""
    if SITE_STATE_KEY in state:
        set_site_state(model, numpy_arrays(array_record(state, SITE_STATE_KEY)))


def keep_site_state(model: torch.nn.Module, state: RecordDict) -> None:
    """Store ``model``'s site-local tensors (after local training) in the node's state."""
    site = get_site_state(model)
    if site:
        state[SITE_STATE_KEY] = ArrayRecord({name: Array(v) for name, v in site.items()})
