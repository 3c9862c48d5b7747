"""`maetok pilot`: AE, VAE and MAETok tokenizers trained under one budget on your data, the same diffusion model
on each, and one report (see `maetok.pilot.run`).

    budgets  what each budget fixes (`PilotBudget`, `BUDGETS`, `pilot_settings`)
    plan     a pilot as one typed value (`PilotPlan`), JSON and back
    target_sets  MAETok variants named by their auxiliary targets (`maetok[hog+sobel]`, --target-sets)
    stages   the data, the training stages and the file of finished stages' results
    evaluation  the feature network, the metrics, the costs and the latent analysis
    run      `run_pilot`: every stage in order, alone or under torchrun
    report   report.md and report.json
"""
from .budgets import BUDGETS, PilotBudget, pilot_settings
from .plan import DataFacts, PilotPlan, TokenizerRun
from .run import PILOT_COLLECTIVE_TIMEOUT, run_pilot, run_plan
from .stages import PilotData, PilotInterrupted, open_pilot_data

__all__ = ["BUDGETS", "DataFacts", "PILOT_COLLECTIVE_TIMEOUT", "PilotBudget", "PilotData", "PilotInterrupted",
           "PilotPlan", "TokenizerRun", "open_pilot_data", "pilot_settings", "run_pilot", "run_plan"]
