"""The fedsft ServerApp: read the run config, run the federation (server/run.py)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from server.run import run_federation

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls once per run."""
    run_federation(grid, RunConfig.from_flower(context.run_config))
