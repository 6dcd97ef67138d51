"""One module per pipeline stage; notebooks call these."""
