"""Stage modules, one per pipeline stage (`sNN_<name>.py`: `SPEC`, checks, `run(cfg, paths)`), listed in order by
`registry.py`; `results.py` maps a run's folders and opens a stage for its notebook. Nothing here imports `run/`."""
