"""cwt-ray: chunk-wise (CWT) and skip-thinking (STT) chain-of-thought distillation on Ray.

Stages live in one module each (data, chunk, train, eval, report); `pipeline.run_stages` runs them
over a run directory and `cli` is the `cwt-ray` command. Heavy imports (torch, ray) stay inside
the stage modules, so `cwt-ray --help` and config errors answer fast.
"""
__version__ = "0.1.0"
