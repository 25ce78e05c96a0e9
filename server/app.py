"""The fedsft ServerApp: read the run config, run the federation (server/run.py)."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from server.run import run_federation
from server.run_outputs import AppRecord

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point Flower calls once per run."""
    run = grid.run  # Flower's record of the run: which FAB (app bundle) it runs
    run_federation(grid, RunConfig.from_flower(context.run_config), app=AppRecord(
        fab_id=run.fab_id, fab_version=run.fab_version, fab_hash=run.fab_hash,
        run_id=int(run.run_id)))
