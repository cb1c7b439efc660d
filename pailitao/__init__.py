"""Pailitao-VL: the roof and the stage layer: the CLI (cli.py), the lineage declared once (lineage.py) and the stage functions (stages/)."""
