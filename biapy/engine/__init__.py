"""The training engine: metrics, losses, optimizers and schedules, checkpoints, distributed set-up,
data loaders and the one training loop (`biapy.engine.trainer.Trainer`).

Submodules are imported where used (`from biapy.engine import metrics as M`), so importing the
package stays cheap.
"""
