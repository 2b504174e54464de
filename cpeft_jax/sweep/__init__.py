"""The paper's tables as one sweep: every cell of a config's grid x seeds, trained, evaluated and
tabulated in DIR/RESULTS.md (`python -m cpeft_jax.sweep`; runner.py runs, report.py writes)."""
