"""Reporting: figures (seaborn house style), tables, the HTML index."""
