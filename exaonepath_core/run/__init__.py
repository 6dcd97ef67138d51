"""The papermill runner, locks, sweeps and CLI; nothing in the package imports it."""
